"""What the unit walk needs to know about values that do not depend on the model's inputs: the
constants a graph computes (initializers, Constant nodes, and small subgraphs of them, evaluated
with onnx's reference runtime), the entries of a shape tensor (which are constants an edit can
change, which are read from a tensor's shape at run time), and static shapes with the batch fixed.

Exporters spell the same constant in many ways: an initializer (dynamo), a Constant node (torch's
legacy exporter, paddle2onnx), ``Sqrt(Constant 2)`` or a shape built by ``Concat(Unsqueeze(Gather(
Shape(x))), Constant)``; the walk reads them all through ``Constants``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.graph.index import GraphIndex, attributes, default_opset
from onnxprune.graph.values import EVALUATED, LARGEST, constant_node_value, evaluate_node


class Constants:
    """Values of the tensors of one graph that depend on no graph input (None for the others)."""

    def __init__(self, g: GraphIndex):
        self.g = g
        self.known: dict[str, np.ndarray | None] = {}

    def value(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name not in self.known:
            self.known[name] = self._value(name)
        return self.known[name]

    def stored(self, name: str) -> bool:
        """Whether ``name`` is held as it is (an initializer or a Constant node), so an edit can change it."""
        node = self.g.producers.get(name)
        return name in self.g.inits or (node is not None and node.op_type == "Constant")

    def _value(self, name: str) -> np.ndarray | None:
        g = self.g
        if name in g.inits:
            return g.array(name)
        node = g.producers.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return constant_node_value(node)
        if node.op_type not in EVALUATED or node.domain not in ("", "ai.onnx"):
            return None
        inputs = [self.value(i) if i else None for i in node.input]
        if any(i and v is None for i, v in zip(node.input, inputs)):
            return None
        if any(v is not None and v.size > LARGEST for v in inputs):
            return None
        try:
            value = evaluate_node(node, inputs, default_opset(self.g.model, 17))
        except Exception:  # noqa: BLE001 - a value the reference runtime cannot compute is simply unknown
            return None
        return value if value.size <= LARGEST else None


@dataclass(frozen=True)
class Entry:
    """One entry of a shape tensor: its value when it is a constant (None: known at run time only),
    and where an edit can change it (element ``index`` of constant ``tensor``, read by node
    ``reader`` at input ``slot``); ``tensor`` is None when the value is computed from constants."""

    value: int | None
    tensor: str | None = None
    index: int = 0
    reader: str = ""
    slot: int = 0
    source: tuple[str, int] | None = None  # read at run time from axis [1] of tensor [0]'s shape


def shape_entries(g: GraphIndex, constants: Constants, name: str, shapes: dict, reader: str = "",
                  slot: int = 0) -> list[Entry] | None:
    """The entries of 1-D integer tensor ``name`` (a Reshape's shape), or None when its length is unknown."""
    if constants.stored(name):
        value = constants.value(name)
        if value is None or value.ndim > 1:
            return None
        return [Entry(int(v), name, i, reader, slot) for i, v in enumerate(np.atleast_1d(value))]
    node = g.producers.get(name)
    if node is not None and node.op_type == "Concat" and int(attributes(node).get("axis", 0)) == 0:
        parts = [shape_entries(g, constants, i, shapes, node.name, k) for k, i in enumerate(node.input)]
        if any(p is None for p in parts):
            return None
        return [e for p in parts for e in p]  # type: ignore[union-attr]
    if node is not None and node.op_type in ("Unsqueeze", "Cast", "Identity", "Squeeze"):
        inner = shape_entries(g, constants, node.input[0], shapes, node.name, 0)
        if inner is not None and len(inner) == 1:
            return inner
    if node is not None and node.op_type == "Shape" and shapes.get(node.input[0]) is not None:
        rank = len(shapes[node.input[0]])
        attrs = attributes(node)
        start, end = int(attrs.get("start", 0)), int(attrs.get("end", rank))
        return [Entry(None, source=(node.input[0], k)) for k in range(rank)[slice(start, end)]]
    if node is not None and node.op_type in ("Gather", "Slice") and len(node.input) > 1:
        inner = shape_entries(g, constants, node.input[0], shapes, node.name, 0)
        picked = _pick(node, inner, [constants.value(i) if i else None for i in node.input[1:]])
        if picked is not None:
            return picked
    value = constants.value(name)
    if value is not None and value.ndim <= 1:
        return [Entry(int(v)) for v in np.atleast_1d(value)]
    length = shapes.get(name)
    if length is not None and len(length) == 1 and length[0] is not None:
        return [Entry(None)] * int(length[0])
    return None


def _pick(node: onnx.NodeProto, inner: list[Entry] | None, args: list) -> list[Entry] | None:
    """The entries a Gather (axis 0) or a Slice (steps of 1) of a shape tensor takes."""
    if inner is None or args[0] is None:
        return None
    if node.op_type == "Gather":
        if int(attributes(node).get("axis", 0)) != 0:
            return None
        return [inner[int(i)] for i in np.atleast_1d(args[0])]
    if len(args) < 2 or args[1] is None or any(a is not None and np.any(a != [0]) for a in args[2:3]) or \
            any(a is not None and np.any(a != 1) for a in args[3:4]):
        return None
    start, end = int(args[0].ravel()[0]), int(args[1].ravel()[0])
    return inner[slice(start, end)]


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Per-tensor shapes shape inference can tell (None for unknown dims), with every graph input's
    batch (its first axis when that is not a number, and every axis of the same name) fixed to 1:
    a Reshape to -1 or to a shape read from a tensor then has a number where the walk needs one."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inits = {t.name for t in copy.graph.initializer}
    constant_inputs = [vi for vi in copy.graph.input if vi.name in inits]  # weights exported as inputs too
    for vi in constant_inputs:
        copy.graph.input.remove(vi)
    inputs = [vi for vi in copy.graph.input if vi.name not in inits and vi.type.tensor_type.HasField("shape")]
    batch = {vi.type.tensor_type.shape.dim[0].dim_param for vi in inputs if len(vi.type.tensor_type.shape.dim)}
    for vi in inputs:
        for k, dim in enumerate(vi.type.tensor_type.shape.dim):
            if (k == 0 and not dim.HasField("dim_value")) or (dim.HasField("dim_param") and dim.dim_param in batch - {""}):
                dim.Clear()
                dim.dim_value = 1
    del copy.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, data_prop=True)
    except Exception:  # noqa: BLE001 - advisory: an unknown shape rejects only the patterns that need it
        inferred = copy
    shapes = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    return shapes


def kept_last_axis(g: GraphIndex, constants: Constants, reshape: onnx.NodeProto, rank: int) -> int | None:
    """How many entries Reshape ``reshape``'s shape has when its last is read at run time from its
    (rank ``rank``) input's last axis, as ``x.view(-1, x.size(-1))`` writes it; else None. Every leading
    axis then folds into the others, whatever shape inference knows of their sizes."""
    entries = shape_entries(g, constants, reshape.input[1], {reshape.input[0]: (None,) * rank})
    if not entries or entries[-1].source != (reshape.input[0], rank - 1):
        return None
    return len(entries)


def sole_entry(g, entry, reshape) -> bool:
    """Whether a constant shape entry is ``reshape``'s alone to edit: read by it, or by a node (a Concat
    computing the shape) whose output only it reads; a shape computed once for several blocks' Reshapes
    (the dynamo exporter's) is not."""
    if entry.reader == reshape.name:
        return True
    reader = g.nodes.get(entry.reader)
    return reader is not None and all(user.name == reshape.name for out in reader.output if out
                                      for user in g.consumers.get(out, []))
