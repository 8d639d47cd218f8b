"""Every weight of a model accounted for: the initializers of rank >= 2 that no layer prunes, and why.

The layer matchers name the Gemm/MatMul/Conv nodes they refuse; a user also needs to know about the
weights that are not read by such a node at all (recurrent LSTM/GRU matrices, embeddings read by a
Gather, tensors inside If/Loop/Scan subgraphs), so that "x% prunable" is never a silent claim.
"""
from __future__ import annotations

import onnx

from onnxprune.errors import InputError
from onnxprune.find.layers import GraphLayers, Skipped, analyse_graph
from onnxprune.graph.index import consumers, subgraph_readers

RECURRENT = ("LSTM", "GRU", "RNN")


def unpruned_weights(model: onnx.ModelProto, found: GraphLayers) -> list[Skipped]:
    """One entry per initializer of rank >= 2 that ``found``'s layers do not prune: node = the tensor,
    op = what reads it, reason = why it is not pruned."""
    pruned = {layer.weight for layer in found.layers}
    refused = {s.node: s.reason for s in found.skipped}
    readers, inner = consumers(model.graph), subgraph_readers(model.graph)
    out = []
    for tensor in model.graph.initializer:
        if len(tensor.dims) < 2 or tensor.name in pruned:
            continue
        nodes = readers.get(tensor.name, [])
        recurrent = next((n for n in nodes if n.op_type in RECURRENT), None)
        refusing = next((n for n in nodes if n.name in refused), None)
        holder = next(iter(inner.get(tensor.name, [])), None)
        if recurrent is not None:
            op, reason = recurrent.op_type, (f"input or recurrent weight of {recurrent.op_type} {recurrent.name!r}: "
                                              "recurrent cells are not pruned")
        elif refusing is not None:
            op, reason = refusing.op_type, f"read by {refusing.op_type} {refusing.name!r}: {refused[refusing.name]}"
        elif holder is not None:
            op, reason = holder.op_type, f"read inside the subgraph of {holder.op_type} {holder.name!r}"
        elif nodes:
            op, reason = nodes[0].op_type, (f"read by {nodes[0].op_type} {nodes[0].name!r}, which is not a "
                                             "Gemm, MatMul or Conv layer")
        else:
            op, reason = "", "read by no node"
        out.append(Skipped(tensor.name, op, reason))
    for node in model.graph.node:
        out += [Skipped(name, node.op_type, f"{kind} of the subgraph of {node.op_type} {node.name!r}: subgraphs are not pruned")
                for name, kind in _subgraph_weights(node)]
    return out


def _subgraph_weights(node: onnx.NodeProto):
    """(name, kind) of the tensors of rank >= 2 held inside ``node``'s subgraphs, nested ones included:
    their initializers and Constant nodes (exporters such as torch's write If branches' weights so)."""
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            yield from ((t.name, "initializer") for t in graph.initializer if len(t.dims) >= 2)
            for inner in graph.node:
                value = next((a.t for a in inner.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
                if inner.op_type == "Constant" and value is not None and len(value.dims) >= 2:
                    yield inner.output[0], "Constant"
                yield from _subgraph_weights(inner)


def no_layers_reason(model: onnx.ModelProto, found: GraphLayers) -> str:
    """Why ``found`` holds no layer, in a few words: the refused nodes, else where the weights are."""
    if found.skipped:
        return "; ".join(f"{s.node}: {s.reason}" for s in found.skipped[:3])
    inside = [s for s in unpruned_weights(model, found) if "of the subgraph of" in s.reason]
    if inside:
        holders = sorted({s.reason.split(" of the subgraph of ")[1].split(":")[0] for s in inside})
        return (f"its {len(inside)} weight tensors of rank >= 2 are inside the subgraphs of {', '.join(holders)}, "
                "and subgraphs are not pruned")
    return "no Gemm, MatMul or Conv nodes"


def find_layers(model: onnx.ModelProto) -> GraphLayers:
    """Prunable layers (names unnamed nodes of ``model`` in place); an InputError if there are none."""
    found = analyse_graph(model)
    if not found.layers:
        raise InputError(f"the model has no prunable layers ({no_layers_reason(model, found)})")
    return found
