"""Channel shuffles written as one Gather of the channels, in the analysis copy.

ShuffleNet interleaves its two branches' channels by Reshape (N, g, C/g, ...) -> Transpose (swapping
those two axes) -> Reshape back to (N, C, ...); torch's ``chunk`` then halves the result by a Split
into equal parts (dynamo exporter) or by Slices whose bounds are computed from the channel count
(legacy exporter). Removing units from one branch only would leave the shuffle's groups unequal,
which no Reshape can hold. Written as a Gather with constant indices (the same permutation, exact)
and the chunk with constant sizes, one branch's units can go: the unit walk follows them through the
indices (``find.unitlayout``) and the edit renumbers them. ``restore`` puts back every shuffle and
chunk whose constants no removal changed, so a model pruned elsewhere keeps its own form.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.graph.index import attributes, consumers, default_opset, producers, topological
from onnxprune.graph.passes import PassResult, ReversiblePass
from onnxprune.graph.values import EVALUATED, constant_node_value, evaluate_node
from onnxprune.prepare.shapes import tensor_shapes_static

SUFFIX = "__onnxprune_shuffle"
FILLS = (2, 3)  # two values for the sizes shape inference cannot tell: a bound equal under both is static


@dataclass
class _Rewrite:
    """One node written by the pass: the constants it reads as written, and the nodes it replaced
    (with the shape computations only they read) in their order."""

    node: str
    constants: dict[str, np.ndarray]
    original: list[onnx.NodeProto] = field(default_factory=list)


class ChannelShuffles(ReversiblePass):
    """ensures: every channel shuffle whose channel count shape inference tells is a Gather along the
    channel axis, and every Split or Slice of its output that divides the channels in parts computed
    from their count reads constant sizes; ``restore`` undoes each rewrite whose constants are intact."""

    def __init__(self) -> None:
        self.rewrites: list[_Rewrite] = []

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        shuffles = chunks = 0
        # a round's chunks, given constant sizes, tell shape inference the next round's shuffles' channels
        while starts := _candidates(model):
            shapes = tensor_shapes_static(model)
            found = [r for r in (self._shuffle(model, producers(model.graph).get(out), shapes) for out in starts) if r]
            if not found:
                break
            shuffles += len(found)
            shapes = tensor_shapes_static(model)
            for tensor, axis in found:
                for out in [r.output[0] for r in consumers(model.graph).get(tensor, []) if r.output]:
                    chunks += self._chunk(model, producers(model.graph)[out], axis, shapes)
        return PassResult(bool(shuffles), f"{shuffles} channel shuffles read as Gathers of the channels"
                          + (f", {chunks} chunks of them with constant sizes" if chunks else ""))

    def _shuffle(self, model: onnx.ModelProto, first: onnx.NodeProto | None, shapes: dict) -> tuple[str, int] | None:
        """Rewrite the shuffle that starts at Reshape ``first``: (its output, the channel axis), or None."""
        graph = model.graph
        if first is None or first.op_type != "Reshape":
            return None
        found = _shuffle_nodes(graph, first, shapes)
        if found is None:
            return None
        transpose, last, axis, groups, channels = found
        per = channels // groups
        indices = np.array([k * per + i for i in range(per) for k in range(groups)], np.int64)
        name = f"{first.name or first.output[0]}{SUFFIX}"
        gather = helper.make_node("Gather", [first.input[0], f"{name}__indices"], [last.output[0]], name=name, axis=axis)
        graph.initializer.append(numpy_helper.from_array(indices, f"{name}__indices"))
        replaced = [first, transpose, last]
        original = _replace(graph, replaced, gather, [first.input[1], last.input[1]])
        self.rewrites.append(_Rewrite(name, {f"{name}__indices": indices}, original))
        return last.output[0], axis

    def _chunk(self, model: onnx.ModelProto, node: onnx.NodeProto, axis: int, shapes: dict) -> int:
        """Give a Split or Slice along ``axis`` of a shuffle's output constant sizes: 1 when done."""
        graph, opset = model.graph, default_opset(model, 0)
        size = (shapes.get(node.input[0]) or (None,) * (axis + 1))[axis]
        if size is None or opset < 13:
            return 0
        name = f"{node.name or node.output[0]}{SUFFIX}"
        if node.op_type == "Split" and int(attributes(node).get("axis", 0)) % len(shapes[node.input[0]]) == axis \
                and (len(node.input) < 2 or not node.input[1]):
            parts = len(node.output)
            if size % parts:
                return 0
            sizes = np.full(parts, size // parts, np.int64)
            split = helper.make_node("Split", [node.input[0], f"{name}__split"], list(node.output), name=name, axis=axis)
            graph.initializer.append(numpy_helper.from_array(sizes, f"{name}__split"))
            self.rewrites.append(_Rewrite(name, {f"{name}__split": sizes}, _replace(graph, [node], split, [])))
            return 1
        if node.op_type != "Slice" or len(node.input) < 4:
            return 0
        found = [_static(graph, node.input[slot], shapes, opset) for slot in range(1, len(node.input))]
        bounds = [np.atleast_1d(b).astype(np.int64) for b in found if b is not None]
        if len(bounds) != len(found) or list(bounds[2] % len(shapes[node.input[0]])) != [axis]:
            return 0
        stored = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        if all(i in stored for i in node.input[1:3]):
            return 0
        inputs = [node.input[0]] + [f"{name}__{k}" for k in ("starts", "ends", "axes", "steps")[:len(node.input) - 1]]
        values = dict(zip(inputs[1:], bounds))
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in values.items())
        sliced = helper.make_node("Slice", inputs, list(node.output), name=name)
        self.rewrites.append(_Rewrite(name, values, _replace(graph, [node], sliced, list(node.input[1:]))))
        return 1

    def restore(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        kept_apart: set[str] = set()  # what the rewrites that stay had read
        for rewrite in reversed(self.rewrites):
            node = next((n for n in graph.node if n.name == rewrite.node), None)
            if node is None or any(k not in inits or not np.array_equal(numpy_helper.to_array(inits[k]), v)
                                   for k, v in rewrite.constants.items()):
                kept_apart.update(i for n in rewrite.original for i in n.input)
                continue
            position = [n.name for n in graph.node].index(node.name)
            graph.node.remove(node)
            for k, original in enumerate(rewrite.original):
                graph.node.insert(position + k, original)
            for constant in rewrite.constants:
                graph.initializer.remove(inits.pop(constant))
        ordered = topological(list(graph.node))  # a computation two chunks shared went back with the last
        del graph.node[:]
        graph.node.extend(ordered)
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        for name in kept_apart - read:  # a shuffle's shape no node reads any more
            if name in inits:
                graph.initializer.remove(inits.pop(name))


def _candidates(model: onnx.ModelProto) -> list[str]:
    """Outputs of the Reshapes read by a Transpose alone that a Reshape alone reads (before shapes are inferred)."""
    readers = consumers(model.graph)

    def sole(tensor: str, op: str) -> onnx.NodeProto | None:
        found = readers.get(tensor, [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    return [node.output[0] for node in model.graph.node if node.op_type == "Reshape"
            and (t := sole(node.output[0], "Transpose")) is not None and sole(t.output[0], "Reshape") is not None]


def _shuffle_nodes(graph: onnx.GraphProto, first: onnx.NodeProto, shapes: dict):
    """(Transpose, last Reshape, channel axis, groups, channels) of a shuffle starting at ``first``, or None."""
    readers, outputs = consumers(graph), {o.name for o in graph.output}
    before, split = shapes.get(first.input[0]), shapes.get(first.output[0])
    after_first = readers.get(first.output[0], [])
    if before is None or split is None or len(split) != len(before) + 1 or len(after_first) != 1:
        return None
    transpose = after_first[0]
    perm = list(attributes(transpose).get("perm", []))
    axis = next((a for a in range(len(perm) - 1) if perm[a] == a + 1 and perm[a + 1] == a), None)
    after_transpose = readers.get(transpose.output[0], [])
    if transpose.op_type != "Transpose" or axis is None \
            or any(perm[k] != k for k in range(len(perm)) if k not in (axis, axis + 1)) \
            or len(after_transpose) != 1 or after_transpose[0].op_type != "Reshape":
        return None
    last = after_transpose[0]
    channels, groups = before[axis], split[axis]
    merged = shapes.get(last.output[0])
    if channels is None or not groups or channels % groups or groups == channels or merged is None \
            or not _same(merged, before) \
            or not _same(before[:axis], split[:axis]) or not _same(before[axis + 1:], split[axis + 2:]) \
            or split[axis + 1] not in (None, channels // groups) \
            or {first.output[0], transpose.output[0]} & outputs:
        return None
    return transpose, last, axis, groups, channels


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _replace(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], new: onnx.NodeProto, inputs: list[str]) -> list[onnx.NodeProto]:
    """Put ``new`` where the first of ``nodes`` was and drop them, with the nodes computing ``inputs``
    that nothing else reads; returns copies of all dropped, in graph order."""
    order = list(graph.node)
    position = [tuple(n.output) for n in order].index(tuple(nodes[0].output))
    dropped = {tuple(n.output) for n in nodes}
    made, readers_of, outputs = producers(graph), consumers(graph), {v.name for v in graph.output}
    pending = [made[i] for i in inputs if i in made]
    while pending:
        node = pending.pop()
        if tuple(node.output) in dropped or len(node.output) != 1 or node.output[0] in outputs \
                or any(tuple(r.output) not in dropped for r in readers_of.get(node.output[0], [])):
            continue
        dropped.add(tuple(node.output))
        if node.op_type not in ("Shape", "Size"):  # what a shape is read from stays
            pending.extend(made[i] for i in node.input if i in made)
    copies = []
    for node in order:
        if tuple(node.output) in dropped:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copies.append(copy)
    at = sum(1 for n in order[:position] if tuple(n.output) not in dropped)  # where the first replaced node was
    kept = [n for n in order if tuple(n.output) not in dropped]
    kept.insert(at, new)
    del graph.node[:]
    graph.node.extend(kept)
    return copies


def _static(graph: onnx.GraphProto, name: str, shapes: dict, opset: int) -> np.ndarray | None:
    """The value of ``name`` when it is computed from constants and sizes shape inference tells only
    (the same whatever the unknown sizes are), else None."""
    first, second = (_evaluate(graph, name, shapes, opset, fill, {}) for fill in FILLS)
    if first is None or second is None or not np.array_equal(first, second):
        return None
    return first


def _evaluate(graph, name, shapes, opset, fill, memo) -> np.ndarray | None:
    if name in memo:
        return memo[name]
    init = next((t for t in graph.initializer if t.name == name), None)
    node = producers(graph).get(name)
    value = None
    if init is not None:
        value = numpy_helper.to_array(init)
    elif node is not None and node.op_type == "Constant":
        value = constant_node_value(node)
    elif node is not None and node.op_type == "Shape" and shapes.get(node.input[0]) is not None:
        dims = np.array([fill if d is None else d for d in shapes[node.input[0]]], np.int64)
        attrs = attributes(node)
        value = dims[int(attrs.get("start", 0)):attrs.get("end", len(dims))]
    elif node is not None and node.op_type in EVALUATED and node.domain in ("", "ai.onnx"):
        inputs = [_evaluate(graph, i, shapes, opset, fill, memo) if i else None for i in node.input]
        if not any(i and v is None for i, v in zip(node.input, inputs)):
            try:
                value = evaluate_node(node, inputs, opset)
            except Exception:  # noqa: BLE001 - a value the reference runtime cannot compute is not static
                value = None
    memo[name] = value
    return value

