"""The independent reference of the structured rewrite: the dense model with the removed units of a
group replaced by their constants (z * m + k on the tensor each consumer reads), built with onnx.helper."""
import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.find.layers import analyse_graph


def replaced(model, group, removed, constants, prefix=""):
    """A copy of ``model`` whose consumers of ``group`` read its ``removed`` units as ``constants``."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    layers = analyse_graph(ref).by_name()
    inferred = onnx.shape_inference.infer_shapes(ref).graph
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*inferred.input, *inferred.value_info]
             if vi.type.tensor_type.HasField("shape")}
    readers = {}
    for consumer in group.consumers:  # a layer may read the units at several offsets (a Concat of them twice)
        readers.setdefault(consumer.layer, []).append(consumer)
    for index, (name, reads) in enumerate(readers.items()):
        tensor = reads[0].tensor
        width = reads[0].width or group.units  # a Concat's channels: the group's at its offset
        m, k = np.ones(width, np.float32), np.zeros(width, np.float32)
        for consumer in reads:
            m[consumer.offset + removed], k[consumer.offset + removed] = 0, constants[removed]
        layer = layers[name]
        if layer.kind == "conv":  # (N, C, *spatial)
            shape = [1, -1] + [1] * (ranks[tensor] - 2)
            m, k = m.reshape(shape), k.reshape(shape)
        else:  # the units (each a block of features) on the last axis
            m, k = np.repeat(m, reads[0].block), np.repeat(k, reads[0].block)
        node = next(n for n in ref.graph.node if n.name == layer.node)
        tag = f"{prefix}ref{index}"
        tensor = node.input[0]  # the layer's input, or another group's replacement of it
        node.input[0] = f"{tag}_replaced"
        ref.graph.initializer.extend([numpy_helper.from_array(m, f"{tag}_m"), numpy_helper.from_array(k, f"{tag}_k")])
        ref.graph.node.extend([helper.make_node("Mul", [tensor, f"{tag}_m"], [f"{tag}_masked"]),
                               helper.make_node("Add", [f"{tag}_masked", f"{tag}_k"], [f"{tag}_replaced"])])
    ref.graph.ClearField("value_info")
    ordered = toposort(ref.graph)
    del ref.graph.node[:]
    ref.graph.node.extend(ordered)
    return ref


def toposort(graph):
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes, out = list(graph.node), []
    while nodes:
        node = next(n for n in nodes if all(i in ready for i in n.input))
        out.append(node)
        ready.update(node.output)
        nodes.remove(node)
    return out


def removal(group, rng):
    """About half of every lane's units (a grouped Conv's groups each lose as many), sorted."""
    lane = group.units // group.lanes
    return np.sort(np.concatenate([k * lane + rng.choice(lane, size=max(1, lane // 2), replace=False)
                                   for k in range(group.lanes)]))
