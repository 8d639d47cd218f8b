"""The layout of attention heads in a tensor, and how the nodes that move them change it (``heads``):
each axis is a tuple of factors ``(kind, size, part)``, major first: heads ``h``, head size ``d``
(values) or ``e`` (queries and keys), the part ``p`` of a fused projection (with the index taken),
and other ``o``."""
from __future__ import annotations

import numpy as np
import onnx

from onnxprune.find.constants import shape_entries
from onnxprune.find.unitgroups import ShapeEdit, Stop
from onnxprune.find.unitplace import Context
from onnxprune.graph.index import FLOAT_TYPES, attributes

Layout = list   # one tuple of factors per axis


def structured(axis: tuple) -> bool:
    return any(f[0] != "o" for f in axis)


def squeezed(ctx: Context, node: onnx.NodeProto, layout: Layout) -> Layout:
    """The layout before a Squeeze or an Unsqueeze."""
    attrs = attributes(node)
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = ctx.constants.value(node.input[1])
        axes = None if value is None else value.ravel().tolist()
    if node.op_type == "Unsqueeze":
        if axes is None:
            raise Stop(f"Unsqueeze {node.name!r} with computed axes")
        positions = sorted(int(a) % len(layout) for a in axes)
        if any(structured(layout[p]) for p in positions):
            raise Stop(f"Unsqueeze {node.name!r} adds an axis the heads are on")
        return [a for i, a in enumerate(layout) if i not in positions]
    rank = ctx.rank(node.input[0])
    if rank is None:
        raise Stop(f"Squeeze {node.name!r} of a tensor of unknown rank")
    if axes is None:
        shape = ctx.shapes.get(node.input[0]) or ()
        axes = [i for i, d in enumerate(shape) if d == 1]
    positions = sorted(int(a) % rank for a in axes)
    before, rest = [], iter(layout)
    for i in range(rank):
        before.append((("o", 1, None),) if i in positions else next(rest))
    return before


def part(ctx: Context, node: onnx.NodeProto, tensor: str, layout: Layout, edits: list) -> Layout:
    """Q, K or V taken out of a fused projection: the axis they are taken along gets a part factor (a
    Split's size or a Slice's bounds along the heads follow them: ``edits``)."""
    op, attrs = node.op_type, attributes(node)
    shape = ctx.shapes.get(node.input[0])
    if shape is None:
        raise Stop(f"{op} {node.name!r} of a tensor of unknown shape")
    rank = len(shape)
    if op == "Gather":
        index = ctx.constants.value(node.input[1])
        axis = int(attrs.get("axis", 0)) % rank
        if index is None or index.size != 1 or shape[axis] is None:
            raise Stop(f"Gather {node.name!r} does not take one part of a fused projection")
        part = (("p", int(shape[axis]), int(index.ravel()[0]) % int(shape[axis])),)
        if index.ndim == 0:
            return layout[:axis] + [part] + layout[axis:]
        if structured(layout[axis]):
            raise Stop(f"Gather {node.name!r} takes along the heads' axis")
        return layout[:axis] + [part] + layout[axis + 1:]
    if op == "Split":
        axis = int(attrs.get("axis", 0)) % rank
        position = list(node.output).index(tensor)
        count = len(node.output)
        sizes = ctx.constants.value(node.input[1]) if len(node.input) > 1 and node.input[1] else attrs.get("split")
        if sizes is not None and len(set(np.ravel(sizes).tolist())) != 1:
            if structured(layout[axis]):
                raise Stop(f"Split {node.name!r} into unequal parts along the heads' axis")
            return layout[:axis] + [(("o", shape[axis], None),)] + layout[axis + 1:]
        start, whole = position, count
        bounds = [(1, position, 1)] if sizes is not None else []  # (slot, entry, parts before and with it)
    else:
        args = [ctx.constants.value(i) if i else None for i in list(node.input[1:5]) + [""] * (5 - len(node.input))]
        starts, ends, axes, steps = args[:4]
        axes = np.arange(rank) if axes is None and len(node.input) <= 3 else axes
        if starts is None or ends is None or axes is None or starts.size != 1 or (steps is not None and np.any(steps != 1)):
            raise Stop(f"Slice {node.name!r} is not one part of a fused projection")
        axis = int(axes.ravel()[0]) % rank
        dim = shape[axis]
        if dim is None:
            raise Stop(f"Slice {node.name!r} of an axis of unknown size")
        begin, end = (int(np.clip(v if v >= 0 else v + dim, 0, dim)) for v in (starts.ravel()[0], ends.ravel()[0]))
        length = end - begin
        if length <= 0 or dim % length or begin % length:
            raise Stop(f"Slice {node.name!r} takes {begin}:{end} of {dim}, not one of equal parts")
        if starts.ravel()[0] < 0 or ends.ravel()[0] < 0:
            raise Stop(f"Slice {node.name!r} takes a part counted from the end")
        start, whole = begin // length, dim // length
        bounds = [(1, 0, start)] + ([(2, 0, start + 1)] if ends.ravel()[0] < dim else [])
    own = tuple(f for f in layout[axis] if not (f[0] == "o" and f[1] == 1))
    if own and not structured(own):
        return layout[:axis] + [(("o", shape[axis], None),)] + layout[axis + 1:]  # a split along another axis
    if any(f[0] == "h" for f in own):
        per_head = int(np.prod([f[1] for f in own if f[0] != "h"]))
        for slot, at, parts in bounds:
            entries = shape_entries(ctx.g, ctx.constants, node.input[slot], ctx.shapes, node.name, slot)
            entry = entries[at] if entries is not None and len(entries) > at else None
            if entry is None or entry.tensor is None:
                raise Stop(f"{op} {node.name!r} takes its part by bounds an edit cannot follow")
            if parts:
                edits.append(ShapeEdit(entry.reader, entry.slot, entry.tensor, entry.index, parts * per_head))
    return layout[:axis] + [(("p", whole, start),) + own] + layout[axis + 1:]


def regroup(layout: Layout, shape: list, name: str) -> Layout:
    """The layout of a Reshape's input (``shape``) whose output has ``layout``: the output's factors,
    in order, regrouped into the input's axes from the last; heads and head sizes are never split."""
    factors = [f for axis in layout for f in axis]
    before: list = []
    i = len(factors) - 1
    for k in range(len(shape) - 1, -1, -1):
        d = shape[k]
        if not any(f[0] != "o" for f in factors[:i + 1]):
            before.insert(0, (("o", d, None),))
            continue
        if d is None:
            before.insert(0, (factors[i],))
            i -= 1
            continue
        group: list[tuple] = []
        product = 1
        while product < d or (d == 1 and i >= 0 and factors[i][1] == 1 and not group):
            if i < 0:
                raise Stop(f"Reshape {name!r} of {list(shape)} does not keep the heads apart")
            kind, size, part = factors[i]
            if size is None and kind == "o" and not group:  # an axis of unknown size: this one
                group.insert(0, (kind, d, None))
                product = d
                i -= 1
                break
            if size is None or product * size > d:
                if kind != "o" or size is None or size % (d // product):
                    raise Stop(f"Reshape {name!r} of {list(shape)} splits the heads or their size")
                factors[i] = (kind, size // (d // product), None)
                group.insert(0, ("o", d // product, None))
                product = d
                break
            group.insert(0, factors[i])
            product *= size
            i -= 1
        if product != d:
            raise Stop(f"Reshape {name!r} of {list(shape)} does not keep the heads apart")
        while i >= 0 and factors[i][1] == 1 and factors[i][0] != "o" and (k == 0 or shape[k - 1] != 1):  # one head left
            group.insert(0, factors[i])
            i -= 1
        before.insert(0, tuple(group) or (("o", 1, None),))
    if any(f[0] != "o" for f in factors[:i + 1]):
        raise Stop(f"Reshape {name!r} of {list(shape)} does not keep the heads apart")
    return before


def input_mask(ctx: Context, name: str, heads: int, traced: set[str]) -> bool:
    """Whether ``name`` is computed from the model's inputs and constants with no float constant that
    has an axis as long as the heads (a per-head bias table) and none of the attention's tensors."""
    seen, stack = set(), [name]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in traced or current in ctx.by_preact:
            return False
        if current in ctx.g.inits:
            tensor = ctx.g.inits[current]
            if tensor.data_type in FLOAT_TYPES and heads in tuple(tensor.dims):
                return False
            continue
        node = ctx.g.producers.get(current)
        if node is not None and node.op_type not in ("Shape", "Size"):
            stack.extend(i for i in node.input if i)
    return True


def reaches_matmul(ctx: Context, name: str, depth: int = 12) -> bool:
    """Whether ``name`` comes from a MatMul of two computed tensors (Q K^T) through single-input nodes."""
    node = ctx.g.producers.get(name)
    while node is not None and depth > 0:
        if node.op_type == "MatMul" and name not in ctx.by_preact:
            return all(ctx.constants.value(i) is None for i in node.input)
        computed = [i for i in node.input if i and ctx.constants.value(i) is None]
        if not computed:
            return False
        name = computed[0]
        node = ctx.g.producers.get(name)
        depth -= 1
    return False
