"""Attention heads as units: the Q, K, V projections of a head and its columns of the output
projection, matched as one pattern (Reshape to heads, Transpose, scaled scores, Softmax, the
weighted values, Transpose and Reshape back)."""
from __future__ import annotations

import onnx

from onnxprune.find.layers import Layer
from onnxprune.find.unitgroups import Consumer, Cut, Stop, UnitGroup, in_axis, out_axis, stored_axis
from onnxprune.graph.index import GraphIndex, attributes


def _only(g: GraphIndex, tensor: str, op: str, perm: tuple | None = None) -> onnx.NodeProto:
    """The node producing ``tensor`` when it is an ``op`` (with ``perm``) read by nothing else; else Stop."""
    node = g.producers.get(tensor)
    if node is None or node.op_type != op or g.users(tensor) != 1:
        raise Stop(f"no {op} produces {tensor!r} for this node alone")
    if perm is not None and tuple(attributes(node).get("perm", ())) != perm:
        raise Stop(f"{op} {node.name!r} has perm {list(attributes(node).get('perm', []))}, not {list(perm)}")
    return node


def _head_split(g: GraphIndex, by_preact: dict[str, Layer], tensor: str, perm: tuple):
    """tensor <- Transpose(perm) <- Reshape (N, S, H, D) <- a sequence layer's pre-activation."""
    transpose = _only(g, tensor, "Transpose", perm)
    reshape = _only(g, transpose.input[0], "Reshape")
    shape = g.constant(reshape.input[1])
    layer = by_preact.get(reshape.input[0])
    if shape is None or shape.shape != (4,) or layer is None or layer.kind != "sequence" or g.users(reshape.input[0]) != 1:
        raise Stop(f"Reshape {reshape.name!r} does not split a projection into (N, S, heads, head size)")
    if g.users(reshape.input[1]) > 1:
        raise Stop(f"Reshape shape {reshape.input[1]!r} is shared")
    return layer, reshape, shape, (transpose.name, reshape.name)


def match_heads(g: GraphIndex, by_preact: dict[str, Layer], out: Layer) -> UnitGroup:
    """Attention heads read by the output projection ``out``: head h is columns [hD, (h+1)D) of the
    Q, K and V projections (and their biases) and the same rows of ``out``'s input, removed together.

    The pattern (a batch-first export): ctx = Reshape(Transpose(Softmax(scale(Q K^T)) V)) -> out,
    Q, K, V = Transpose(Reshape(projection, (N, S, H, D))) with K transposed to (N, H, D, S)."""
    back = _only(g, out.input, "Reshape")
    merged = g.constant(back.input[1])
    transpose = _only(g, back.input[0], "Transpose", (0, 2, 1, 3))
    context = _only(g, transpose.input[0], "MatMul")
    probabilities, v_heads = context.input
    path = [back.name, transpose.name, context.name]
    node = _only(g, probabilities, "Softmax")
    path.append(node.name)
    while True:  # a scale, a mask: constants only
        producer = g.producers.get(node.input[0])
        if producer is None or g.users(producer.output[0]) != 1:
            raise Stop("the attention scores have other users")
        node = producer
        path.append(node.name)
        if node.op_type == "MatMul":
            break
        if node.op_type not in ("Mul", "Div", "Add") or g.constant(node.input[1]) is None:
            raise Stop(f"{node.op_type} {node.name!r} between Q K^T and the Softmax is not a constant scale or mask")
    q, q_reshape, q_shape, q_path = _head_split(g, by_preact, node.input[0], (0, 2, 1, 3))
    k, k_reshape, k_shape, k_path = _head_split(g, by_preact, node.input[1], (0, 2, 3, 1))
    v, v_reshape, v_shape, v_path = _head_split(g, by_preact, v_heads, (0, 2, 1, 3))
    heads, size = int(q_shape[2]), int(q_shape[3])
    if heads <= 0 or size <= 0 or any(int(s[2]) not in (heads, -1) or int(s[3]) != size for s in (k_shape, v_shape)):
        raise Stop("the heads' Reshapes do not name the head count and size alike")
    if merged is None or merged.shape != (3,) or int(merged[2]) not in (heads * size, -1) or g.users(back.input[1]) > 1:
        raise Stop(f"Reshape {back.name!r} does not merge the heads into (N, S, heads x head size)")
    if out.in_features != heads * size or any(p.out_features != heads * size for p in (q, k, v)):
        raise Stop("projections of another width than heads x head size")
    cuts = []
    for layer in (q, k, v):
        cuts.append(Cut(layer.weight, stored_axis(layer, out_axis(layer)), size))
        bias = g.constant(layer.bias) if layer.bias is not None else None
        if bias is not None and bias.size > 1:
            cuts.append(Cut(layer.bias, bias.ndim - 1, size))
    cuts.append(Cut(out.weight, stored_axis(out, in_axis(out)), size))
    reshapes = [(r.input[1], 2, 1) for r, s in ((q_reshape, q_shape), (k_reshape, k_shape), (v_reshape, v_shape)) if s[2] > 0]
    if merged[2] > 0:
        reshapes.append((back.input[1], 2, size))
    return UnitGroup(name=f"heads:{out.name}", producers=(q.name, k.name, v.name), units=heads, tensor=out.input,
                     consumers=(Consumer(out.name, size, out.input),), cuts=tuple(cuts),
                     reshapes=tuple(reshapes), path=tuple(path + list(q_path + k_path + v_path)))


def attention_groups(g: GraphIndex, layers: list[Layer]) -> list[UnitGroup]:
    """Head groups of every sequence layer that reads merged attention heads."""
    by_preact = {layer.preact: layer for layer in layers}
    found = []
    for layer in layers:
        if layer.kind == "sequence" and getattr(g.producers.get(layer.input), "op_type", None) == "Reshape":
            try:
                found.append(match_heads(g, by_preact, layer))
            except Stop:
                continue  # not attention: the ordinary walk names the reason
    return found
