"""The independent reference of the structured rewrite: the dense model with the removed units of a
group replaced by their constants (z * m + k on the tensor each consumer reads), built with onnx.helper."""
import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.find.layers import analyse_graph
from onnxprune.graph.index import topological


def replaced(model, group, removed, constants, prefix=""):
    """A copy of ``model`` whose consumers of ``group`` read its ``removed`` units as ``constants``."""
    return replaced_all(model, [group], {group.name: removed}, {group.name: constants}, prefix)


def replaced_all(model, groups, removed, constants, prefix=""):
    """A copy of ``model`` whose consumers of every group read its ``removed[name]`` units as
    ``constants[name]`` (groups whose consumers share a tensor at other offsets compose)."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    layers = analyse_graph(ref).by_name()
    inferred = onnx.shape_inference.infer_shapes(ref).graph
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*inferred.input, *inferred.value_info]
             if vi.type.tensor_type.HasField("shape")}
    nodes = {n.name: n for n in ref.graph.node}
    added = []
    for number, group in enumerate(g for g in groups if g.name in removed):
        gone, values = removed[group.name], constants[group.name]
        readers = {}
        for consumer in group.consumers:  # a layer may read the units at several offsets (a Concat of them twice)
            readers.setdefault(consumer.layer, []).append(consumer)
        for index, (name, reads) in enumerate(readers.items()):
            width = reads[0].width or group.units  # a Concat's channels: the group's at its offset
            m, k = np.ones(width, np.float32), np.zeros(width, np.float32)
            for consumer in reads:
                at = consumer.offset + consumer.stride * gone
                m[at], k[at] = 0, values[gone]
            layer = layers[name]
            if layer.kind == "conv":  # (N, C, *spatial)
                shape = [1, -1] + [1] * (ranks[reads[0].tensor] - 2)
                m, k = m.reshape(shape), k.reshape(shape)
            else:  # the units (each a block of features) on the last axis
                m, k = np.repeat(m, reads[0].block), np.repeat(k, reads[0].block)
            node = nodes[layer.node]
            tag = f"{prefix}g{number}_ref{index}"
            tensor = node.input[0]  # the layer's input, or another group's replacement of it
            node.input[0] = f"{tag}_replaced"
            ref.graph.initializer.extend([numpy_helper.from_array(m, f"{tag}_m"), numpy_helper.from_array(k, f"{tag}_k")])
            added += [helper.make_node("Mul", [tensor, f"{tag}_m"], [f"{tag}_masked"]),
                      helper.make_node("Add", [f"{tag}_masked", f"{tag}_k"], [f"{tag}_replaced"])]
    ref.graph.ClearField("value_info")
    ordered = toposort(ref.graph, added)
    del ref.graph.node[:]
    ref.graph.node.extend(ordered)
    return ref


def toposort(graph, added=()):
    """The graph's nodes and ``added`` in an order where every input is computed first."""
    return topological(list(graph.node) + list(added))


def removal(group, rng):
    """About half of every lane's units (a grouped Conv's groups each lose as many), sorted."""
    lane = group.units // group.lanes
    return np.sort(np.concatenate([k * lane + rng.choice(lane, size=max(1, lane // 2), replace=False)
                                   for k in range(group.lanes)]))
