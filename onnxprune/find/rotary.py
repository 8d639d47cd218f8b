"""Head-wise ops a unit walk may pass through: the rotary embedding between a head split and attention.

LLaMA-style blocks rotate q and k after splitting them into heads: t * cos + rotate_half(t) * sin,
rotate_half a Slice of each half of the head dimension, a Neg and a Concat, cos and sin constants
over (positions, head dimension). Every one of these ops acts within a head and treats all heads
alike, so removing heads commutes with them: the rotary of the kept heads is the kept heads of the
rotary, and its constants need no cut. ``head_passthrough`` follows such ops from a tensor with a
head axis to the one tensor they hand on (the attention's MatMul reads it), so a head walk can treat
the two as the same heads.
"""
from __future__ import annotations

import numpy as np

from onnxprune.graph.index import GraphIndex
from onnxprune.graph.values import constant_node_value

HEADWISE = {"Slice", "Neg", "Concat", "Mul", "Add", "Sub", "Cast", "Identity"}


def _axes(g: GraphIndex, node, rank: int) -> list[int] | None:
    """The axes a Slice or Concat acts on, non-negative; None when they are not constants."""
    if node.op_type == "Concat":
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        return None if axis is None else [axis % rank]
    if len(node.input) < 4 or not node.input[3]:  # no axes: the first len(starts) axes
        starts = _constant(g, node.input[1])
        return None if starts is None else list(range(np.atleast_1d(starts).size))
    axes = _constant(g, node.input[3])
    return None if axes is None else [int(a) % rank for a in np.atleast_1d(axes)]


def _constant(g: GraphIndex, name: str) -> np.ndarray | None:
    """An initializer's or a Constant node's value (the legacy exporter writes a Slice's axes as the latter)."""
    node = g.producers.get(name)
    return constant_node_value(node) if node is not None and node.op_type == "Constant" else g.constant(name)


def _alike_over_heads(g: GraphIndex, name: str, rank: int, head_axis: int) -> bool:
    """Whether an operand from outside is the same for every head: size 1 or absent along the head
    axis, broadcast right-aligned to ``rank`` (a constant, or a tensor computed from the positions alone,
    as the dynamo exporter writes cos and sin)."""
    value = g.constant(name)
    dims = value.shape if value is not None else g.dims.get(name)
    if dims is None:
        return False
    shape = (1,) * (rank - len(dims)) + tuple(dims)
    return len(shape) == rank and shape[head_axis] == 1


def head_passthrough(g: GraphIndex, tensor: str, head_axis: int) -> str | None:
    """The tensor that ``tensor``'s head-wise ops hand on (``tensor`` itself when none follow it),
    or None when an op on the way mixes heads: a Slice or Concat along the head axis, a constant that
    differs between heads, a computed operand from outside, or more than one tensor leaving."""
    span = head_span(g, tensor, head_axis)
    return None if span is None else span[0]


def head_span(g: GraphIndex, tensor: str, head_axis: int) -> tuple[str, list[str]] | None:
    """``head_passthrough``'s tensor and the names of the head-wise nodes from ``tensor`` to it (what
    a head walk adds to its path), or None. A Shape reading a tensor on the way (rotate_half's
    half of the head size) follows the kept heads by itself."""
    rank = g.ranks.get(tensor)
    if rank is None or not 0 <= head_axis < rank:
        return None
    inside, stack, nodes = {tensor}, [tensor], []
    while stack:
        for node in g.consumers.get(stack.pop(), []):
            if node.op_type not in HEADWISE or node in nodes:
                continue
            if node.op_type in ("Slice", "Concat"):
                axes = _axes(g, node, rank)
                if axes is None or head_axis in axes:
                    return None
            nodes.append(node)
            inside.update(node.output)
            stack.extend(node.output)
    changed = True
    while changed:  # a node whose other operands are not all inside or head-alike constants is not head-wise
        changed = False
        for node in list(nodes):
            data = node.input[:1] if node.op_type == "Slice" else node.input
            if all(name in inside or _alike_over_heads(g, name, rank, head_axis) for name in data if name):
                continue
            nodes.remove(node)
            inside.difference_update(node.output)
            changed = True
    if any(name not in inside and not _alike_over_heads(g, name, rank, head_axis) for node in nodes
           for name in (node.input[:1] if node.op_type == "Slice" else node.input) if name and name not in g.inits):
        return None
    leaving = [name for name in inside if name in g.outputs or any(
        user not in nodes and user.op_type not in ("Shape", "Size") for user in g.consumers.get(name, []))]
    if len(leaving) != 1:
        return None
    return leaving[0], [node.name for node in nodes]


def head_source(g: GraphIndex, tensor: str, head_axis: int) -> str | None:
    """Back from ``tensor`` through head-wise ops: the one tensor they start from (``tensor`` itself
    when no head-wise op wrote it), for a walk from the attention scores back to the projections; None
    when they start from several tensors or one of them mixes heads (``head_passthrough`` checks)."""
    sources, seen, stack = set(), set(), [tensor]
    rank = g.ranks.get(tensor)
    while stack:
        name = stack.pop()
        node = g.producers.get(name)
        if node is None or node.op_type not in HEADWISE:
            sources.add(name)
            continue
        if node.name in seen:
            continue
        seen.add(node.name)
        data = node.input[:1] if node.op_type == "Slice" else node.input
        stack.extend(i for i in data if i and i not in g.inits and not (rank and _alike_over_heads(g, i, rank, head_axis)))
    if len(sources) != 1:
        return None
    source = sources.pop()
    return source if source == tensor or head_passthrough(g, source, head_axis) == tensor else None
