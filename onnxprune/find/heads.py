"""Attention heads as units, in every exporter's spelling.

Head h of an attention block is D rows of each of the Q, K and V projections (of a fused QKV
projection: the same D rows in each of its three parts) and D columns of the output projection,
removed together. The matcher does not look for one exporter's node sequence: it walks back from
the output projection's input and follows the layout of the heads through whatever nodes move
them (Reshape with a constant or a computed shape, Transpose, Squeeze/Unsqueeze, a scale by a
constant or by a value computed from shapes, Gather/Split/Slice taking Q, K or V out of a fused
projection), through ``softmax(Q K^T)`` V (with masks and biases added to the scores: one per
head is cut, or narrowed by a Gather when it is computed) to the projections. Each axis of a
tensor on the way is a list of factors: heads ``h``, head size ``d`` (values) or ``e`` (queries
and keys), the part ``p`` of a fused projection, and others ``o``. Every shape entry that counts
the heads is made to follow them (``ShapeEdit``); windows (Swin) and batch-folded heads are just
other factors.
"""
from __future__ import annotations

import numpy as np
import onnx

from onnxprune.find.constants import kept_last_axis, shape_entries, sole_entry
from onnxprune.find.headlayout import Layout, input_mask, part, reaches_matmul, regroup, squeezed, structured
from onnxprune.find.layers import Layer
from onnxprune.find.rotary import HEADWISE, head_source, head_span
from onnxprune.find.unitgroups import Consumer, Cut, Select, ShapeEdit, UnitGroup, in_axis, out_axis, stored_axis
from onnxprune.find.unitlayout import pinned
from onnxprune.find.unitplace import Context
from onnxprune.graph.index import Rejection, attributes

Factor = tuple  # (kind, size, part index or None)
PASS = ("Identity", "Cast", "Dropout")
SCORE_OPS = ("Add", "Sub", "Mul", "Div", "Where", "Max", "Min")


class _Trace:
    """One attention block's findings while it is walked back from the output projection."""

    def __init__(self, ctx: Context, out: Layer):
        self.ctx, self.out = ctx, out
        self.nodes: list[str] = []
        self.tensors: list[str] = []
        self.edits: list[ShapeEdit] = []
        self.selects: list[Select] = []
        self.cuts: list[Cut] = []
        self.projections: list[tuple[Layer, tuple[Factor, ...]]] = []
        self.biases: list[tuple[str, tuple[Factor, ...]]] = []  # biases added after a projection, with its last axis
        self.heads = 0

    # ---------------------------------------------------------------- the pattern
    def match(self) -> UnitGroup:
        ctx, out = self.ctx, self.out
        heads, size = self._merged_heads()
        self.heads = heads
        rank = ctx.rank(out.input)
        if rank is None:
            raise Rejection(f"the rank of {out.input!r} is unknown")
        layout = [(("o", None, None),)] * (rank - 1) + [(("h", heads, None), ("d", size, None))]
        tensor, layout, node = self._back(out.input, layout)
        if node is None or node.op_type != "MatMul":
            raise Rejection(f"no MatMul of the attention probabilities and the values reads into {out.name!r}")
        self.nodes.append(node.name)
        probabilities, values = node.input
        if layout[-1] != (("d", size, None),) or structured(layout[-2]) or not any(structured(a) for a in layout[:-2]):
            raise Rejection(f"MatMul {node.name!r} does not keep the heads on a batch axis and the head size last")
        batch = layout[:-2]
        self._projection(values, batch + [(("o", None, None),), layout[-1]])
        scores, scores_layout = self._scores(probabilities, batch + [layout[-2], (("o", None, None),)])
        q, k = scores.input
        qk = self._head_size(q, k, size)
        self._projection(q, scores_layout[:-2] + [scores_layout[-2], (("e", qk, None),)])
        self._projection(k, scores_layout[:-2] + [(("e", qk, None),), scores_layout[-1]])
        self._check_users()
        return self._group(heads, size)

    def _merged_heads(self) -> tuple[int, int]:
        """(heads, head size) from the Reshape that merges them before the output projection."""
        tensor, width, tried = self.out.input, self.out.in_features, ""
        for attempt in range(2 if self.out.kind == "folded" else 1):  # tokens folded into rows: maybe by a Reshape of its own
            node = self.ctx.g.producers.get(tensor)
            while node is not None and node.op_type in PASS:
                node = self.ctx.g.producers.get(node.input[0])
            if node is None or node.op_type != "Reshape":
                raise Rejection(f"{self.out.name!r} does not read heads merged by a Reshape")
            shape, tried = self.ctx.shapes.get(node.input[0]), node.name
            if shape is None or len(shape) < 2:
                raise Rejection(f"Reshape {node.name!r} merges a tensor of unknown shape")
            heads, size = shape[-2], shape[-1]
            # one head, where the count is inferred, may be a (batch, tokens, features) fold read as a merge: look further
            told = heads is not None or attempt == 1 or self.out.kind != "folded"
            if size is None and heads:
                size = width // heads
            if heads is None and size:
                heads = width // size
            if heads and size and heads * size == width and (told or size != width):
                return int(heads), int(size)
            tensor = node.input[0]
        raise Rejection(f"Reshape {tried!r} does not merge heads x head size = {width}")

    def _head_size(self, q: str, k: str, default: int) -> int:
        for name, axis in ((q, -1), (k, -2)):
            shape = self.ctx.shapes.get(name)
            if shape is not None and len(shape) >= 2 and shape[axis]:
                return int(shape[axis])
        return default

    # ---------------------------------------------------------------- walking back
    def _back(self, tensor: str, layout: Layout):
        """Back from ``tensor`` through nodes that only move the heads: the tensor reached, its layout,
        and the node that writes it (None when it is a projection's output)."""
        g = self.ctx.g
        while True:
            self.tensors.append(tensor)
            if tensor in self.ctx.by_preact:
                return tensor, layout, None
            node = g.producers.get(tensor)
            if node is None:
                raise Rejection(f"the heads come from the graph input {tensor!r}")
            rotary = self._rotary(tensor, layout)
            if rotary is not None:  # a rotary embedding: head-wise, the same for every head
                tensor = rotary
                continue
            moved = self._move(node, tensor, layout)
            if moved is None:
                return tensor, layout, node
            self.nodes.append(node.name)
            tensor, layout = moved

    def _rotary(self, tensor: str, layout: Layout) -> str | None:
        """The tensor a rotary embedding (or other head-wise ops, ``find.rotary``) writing ``tensor``
        starts from, its nodes added to the walk's; None where none does."""
        head = next((i for i, a in enumerate(layout) if any(f[0] == "h" for f in a)), None)
        node = self.ctx.g.producers[tensor]
        if head is None or node.op_type not in HEADWISE or node.op_type in ("Cast", "Identity"):
            return None
        source = head_source(self.ctx.g, tensor, head)
        span = None if source is None or source == tensor else head_span(self.ctx.g, source, head)
        if span is None or span[0] != tensor:
            return None
        self.nodes.extend(span[1])
        self.tensors.extend(o for n in span[1] for o in self.ctx.g.nodes[n].output if o and o != tensor)
        return source

    def _move(self, node: onnx.NodeProto, tensor: str, layout: Layout):
        """The input and its layout when ``node`` only moves the heads; None when it does something else."""
        op = node.op_type
        if op in PASS:
            return node.input[0], layout
        if op == "Transpose":
            perm = list(attributes(node).get("perm", range(len(layout))[::-1]))
            before: Layout = [None] * len(layout)
            for i, p in enumerate(perm):
                before[p] = layout[i]
            return node.input[0], before
        if op == "Reshape":
            return node.input[0], self._reshape(node, layout)
        if op in ("Squeeze", "Unsqueeze"):
            return node.input[0], squeezed(self.ctx, node, layout)
        if op in ("Mul", "Div"):
            return self._scaled(node, layout)
        if op == "Add":
            return self._biased(node, layout)
        if op in ("Gather", "Split", "Slice"):
            return node.input[0], part(self.ctx, node, tensor, layout, self.edits)
        return None

    def _reshape(self, node: onnx.NodeProto, layout: Layout) -> Layout:
        shape = self.ctx.shapes.get(node.input[0])
        if shape is None:
            raise Rejection(f"Reshape {node.name!r} of a tensor of unknown shape")
        if shape[-1] is None and not any(structured(a) for a in layout[:-1]) \
                and kept_last_axis(self.ctx.g, self.ctx.constants, node, len(shape)) == len(layout):  # x.view(-1, x.size(-1))
            return [(("o", None, None),)] * (len(shape) - 1) + [layout[-1]]
        before = regroup(layout, list(shape), node.name)
        entries = None
        for b, axis in enumerate(layout):
            if not any(f[0] == "h" for f in axis):
                continue
            others = [f[1] for f in axis if f[0] != "h"]
            if any(s is None for s in others):
                raise Rejection(f"Reshape {node.name!r} merges the heads with an axis of unknown size")
            if entries is None:
                entries = shape_entries(self.ctx.g, self.ctx.constants, node.input[1], self.ctx.shapes, node.name, 1)
                if entries is None or len(entries) != len(layout):
                    raise Rejection(f"Reshape {node.name!r} has a shape whose entries cannot be told")
            entry, per_unit = entries[b], int(np.prod(others)) if others else 1
            if entry.value == -1 or (entry.value == 0 and b < len(before) and before[b] == axis):
                continue
            if entry.source is not None and _read_from_heads(self.ctx, entry.source, node.input[0], per_unit * self.heads):
                continue  # read at run time from a tensor upstream whose axis holds the same heads
            if entry.source is not None and entry.source[0] == node.input[0] and before[entry.source[1]] == axis:
                continue  # read at run time from the same factors of its own input (x.view(-1, x.size(-1)))
            if entry.tensor is not None and entry.value is not None and entry.value > 0 and sole_entry(self.ctx.g, entry, node):
                self.edits.append(ShapeEdit(entry.reader, entry.slot, entry.tensor, entry.index, per_unit))
            elif any(e.value == -1 for e in entries):
                raise Rejection(f"Reshape {node.name!r}: the entry that counts the heads is computed and another is -1")
            else:
                self.edits.append(pinned(node, b, entry, per_unit))
        return before

    def _scaled(self, node: onnx.NodeProto, layout: Layout):
        """Q or K scaled by a value the same for every head (a constant, or computed from shapes)."""
        rank = len(layout)
        computed = [i for i in node.input if i and self.ctx.constants.value(i) is None]
        if len(computed) == 1:  # the other a constant: the same for every head when broadcast along them
            traced = computed if all(self._head_uniform(i, layout, rank) for i in node.input if i and i not in computed) else []
        else:
            uniform = [i for i in node.input if i and self._head_uniform(i, layout, rank)]
            traced = [i for i in node.input if i and i not in uniform]
        if len(traced) != 1 or (node.op_type == "Div" and traced[0] != node.input[0]):
            return None
        return traced[0], layout

    def _biased(self, node: onnx.NodeProto, layout: Layout):
        """A projection's bias added after it (a layer whose bias is not its own: one constant shared by
        several Identities): cut with the projection's rows."""
        computed = [i for i in node.input if i and self.ctx.constants.value(i) is None]
        if len(computed) != 1 or structured(tuple(f for axis in layout[:-1] for f in axis)):
            return None
        bias = next(i for i in node.input if i and i != computed[0])
        value = self.ctx.constants.value(bias)
        total = int(np.prod([f[1] for f in layout[-1]])) if all(f[1] for f in layout[-1]) else None
        if value is None or value.size != total or (value.ndim and value.shape[-1] != total):
            return None
        self.biases.append((bias, tuple(layout[-1])))
        return computed[0], layout

    def _head_uniform(self, name: str, layout: Layout, rank: int) -> bool:
        """Whether operand ``name`` is the same for every head (broadcast along the heads' axes). Where
        shape inference cannot tell its size there, a value computed from the model's inputs alone (a
        mask), with no constant of a heads-long axis behind it, is taken to be the same for all heads."""
        shape = self.ctx.shapes.get(name)
        if shape is None and self.ctx.rank(name) is None:
            return False
        unknown = False
        for i, axis in enumerate(layout):
            j = i - (rank - len(shape)) if shape is not None else 0
            if any(f[0] in "hp" for f in axis) and j >= 0:
                if shape is None or shape[j] is None:
                    unknown = True
                elif shape[j] != 1:
                    return False
        return not unknown or input_mask(self.ctx, name, self.heads, set(self.tensors))

    def _scores(self, probabilities: str, layout: Layout):
        """Back from the attention probabilities through the softmax, scale, masks and biases to Q K^T."""
        g, tensor = self.ctx.g, probabilities
        while True:
            self.tensors.append(tensor)
            node = g.producers.get(tensor)
            if node is None:
                raise Rejection("the attention probabilities come from a graph input")
            if node.op_type == "MatMul" and tensor not in self.ctx.by_preact:
                self.nodes.append(node.name)
                return node, layout
            self.nodes.append(node.name)
            if node.op_type in ("Softmax", "LogSoftmax"):
                axis = int(attributes(node).get("axis", -1)) % len(layout)
                if structured(layout[axis]):
                    raise Rejection(f"Softmax {node.name!r} normalizes over the heads")
                tensor = node.input[0]
            elif node.op_type in SCORE_OPS:
                tensor = self._score_operand(node, layout)
            else:
                moved = self._move(node, tensor, layout)
                if moved is None:
                    raise Rejection(f"{node.op_type} {node.name!r} between Q K^T and the softmax is not a scale, mask or bias")
                tensor, layout = moved

    def _score_operand(self, node: onnx.NodeProto, layout: Layout) -> str:
        """The scores' operand of an Add/Mul/Where on them; the others are the same for every head,
        or one per head (cut when stored, else narrowed by a Gather)."""
        traced = [i for i in node.input if i and reaches_matmul(self.ctx, i)]
        skipped = set(traced)
        guard = self.ctx.g.producers.get(node.input[0])
        if node.op_type == "Where" and len(traced) == 2 and guard is not None and guard.op_type in ("IsNaN", "IsInf") \
                and guard.input[0] in node.input[1:]:  # where(isnan(p), 0, p): a guard of each score on itself
            self.nodes.append(guard.name)
            traced = [guard.input[0]]
        if len(traced) != 1:
            raise Rejection(f"{node.op_type} {node.name!r} on the attention scores has {len(traced)} operands from Q K^T")
        rank = len(layout)
        head = next(i for i, a in enumerate(layout) if any(f[0] == "h" for f in a))
        for slot, name in enumerate(node.input):
            if not name or name in skipped or self._head_uniform(name, layout, rank):
                continue
            shape = self.ctx.shapes.get(name)
            axis = head - (rank - len(shape)) if shape is not None else -1
            others = any(structured(a) for i, a in enumerate(layout) if i != head)
            if shape is None or axis < 0 or shape[axis] != self.heads or others:
                raise Rejection(f"{node.op_type} {node.name!r} adds {name!r} of shape {shape} to the scores")
            if self.ctx.constants.stored(name) and self.ctx.g.users(name) == 1:
                self.cuts.append(Cut(name, axis))
            else:
                self.selects.append(Select(node.name, slot, axis))
        return traced[0]

    def _projection(self, tensor: str, layout: Layout) -> None:
        """Back to the projection that writes Q, K or V: its rows in blocks of the head size."""
        tensor, layout, node = self._back(tensor, layout)
        layer = self.ctx.by_preact.get(tensor)
        if node is not None or layer is None or layer.kind not in ("sequence", "folded"):
            what = f"{node.op_type} {node.name!r}" if node is not None else repr(tensor)
            raise Rejection(f"{what} is between the attention and the Q, K or V projection")
        last = tuple(layout[-1])
        parts = [f for f in last if f[0] == "p"]
        body = [f for f in last if f[0] != "p"]
        if any(structured(a) for a in layout[:-1]) or len(parts) > 1 or len(body) != 2 or body[0][0] != "h" \
                or body[1][0] not in "de" or (parts and last[0][0] != "p"):
            raise Rejection(f"projection {layer.name!r} does not write heads x head size on its last axis")
        total = (parts[0][1] if parts else 1) * self.heads * body[1][1]
        if layer.out_features != total:
            raise Rejection(f"projection {layer.name!r} has {layer.out_features} outputs, not {total}")
        self.projections.append((layer, last))

    def _check_users(self) -> None:
        g, inside = self.ctx.g, set(self.nodes) | {self.out.node}
        for tensor in self.tensors:
            readers = [n for n in g.consumers[tensor] if n.name not in inside and not _read_for_shape(self.ctx, n)]
            if readers or tensor in g.outputs or tensor in g.subgraph_readers:
                what = f"{readers[0].op_type} {readers[0].name!r}" if readers else "a graph output or subgraph"
                raise Rejection(f"{what} also reads {tensor!r} of the attention")

    def _group(self, heads: int, size: int) -> UnitGroup:
        cuts, producers = list(self.cuts), []
        for layer, last in self.projections:
            part = last[0] if last[0][0] == "p" else None
            block = last[-1][1]
            offset, width = (part[2] * heads, part[1] * heads) if part else (0, 0)
            cuts.append(Cut(layer.weight, stored_axis(layer, out_axis(layer)), block, offset=offset, width=width))
            bias = self.ctx.g.constant(layer.bias) if layer.bias is not None else None
            if layer.bias is not None and bias is not None and bias.size > 1:
                cuts.append(Cut(layer.bias, bias.ndim - 1, block, offset=offset, width=width))
            if layer.name not in producers:
                producers.append(layer.name)
        for name, last in self.biases:
            part = last[0] if last[0][0] == "p" else None
            offset, width = (part[2] * heads, part[1] * heads) if part else (0, 0)
            if not self.ctx.constants.stored(name) and not _identity(self.ctx, name):
                raise Rejection(f"bias {name!r} of a Q, K or V projection is computed from other constants")
            if self.ctx.constants.stored(name) and self.ctx.g.users(name) > 1:
                raise Rejection(self.ctx.g.shared_reason(name, "bias"))
            cuts.append(Cut(name, max(self.ctx.rank(name) or 1, 1) - 1, last[-1][1], offset=offset, width=width))
        out = self.out
        cuts.append(Cut(out.weight, stored_axis(out, in_axis(out)), size))
        return UnitGroup(name=f"heads:{out.name}", producers=tuple(producers), units=heads, tensor=out.input,
                         consumers=(Consumer(out.name, size, out.input),), cuts=tuple(dict.fromkeys(cuts)),
                         reshapes=tuple(dict.fromkeys(self.edits)), selects=tuple(dict.fromkeys(self.selects)),
                         path=tuple(dict.fromkeys(self.nodes)))


def _identity(ctx: Context, name: str) -> bool:
    """Whether ``name`` is an Identity (chain) of a stored constant, read by nothing else (slicing stores it)."""
    node = ctx.g.producers.get(name)
    while node is not None and node.op_type == "Identity" and ctx.g.users(name) == 1:
        name = node.input[0]
        if ctx.constants.stored(name):
            return True
        node = ctx.g.producers.get(name)
    return False


def _read_from_heads(ctx: Context, source: tuple[str, int], tensor: str, size: int, depth: int = 8) -> bool:
    """Whether axis ``source[1]`` of ``source[0]``, of ``size`` entries, is upstream of ``tensor`` through nodes
    that only move data (a Reshape of the keys folded with the batch reads the heads back from them)."""
    shape = ctx.shapes.get(source[0])
    if shape is None or source[1] >= len(shape) or shape[source[1]] != size:
        return False
    while depth > 0:
        if tensor == source[0]:
            return True
        node = ctx.g.producers.get(tensor)
        if node is None or node.op_type not in PASS + ("Transpose", "Reshape", "Squeeze", "Unsqueeze"):
            return False
        tensor, depth = node.input[0], depth - 1
    return False


def _read_for_shape(ctx: Context, node: onnx.NodeProto, depth: int = 6) -> bool:
    """Whether only the shape of ``node``'s output is read (a Shape, or a Transpose read by Shape alone):
    such readers follow the heads by themselves (T5 reads the keys' length from a transposed copy)."""
    if node.op_type in ("Shape", "Size"):
        return True
    if node.op_type not in PASS + ("Transpose", "Reshape", "Squeeze", "Unsqueeze") or depth == 0:
        return False
    readers = [n for out in node.output for n in ctx.g.consumers[out]]
    return not any(out in ctx.g.outputs for out in node.output) and all(_read_for_shape(ctx, n, depth - 1) for n in readers)


def attention_groups(ctx: Context, layers: list[Layer]) -> list[UnitGroup]:
    """Head groups of every sequence layer (or layer on folded tokens) that reads merged attention heads."""
    found = []
    for layer in layers:
        if layer.kind not in ("sequence", "folded"):
            continue
        try:
            found.append(_Trace(ctx, layer).match())
        except Rejection:
            continue  # not attention: the ordinary walk names the reason
    return found
