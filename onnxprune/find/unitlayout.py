"""The unit walk's steps through nodes that move the units without computing on them: reductions
over other axes, Flatten, Reshape, Transpose, Squeeze/Unsqueeze, Gather/Slice/Split/Pad/Tile/
Resize along other axes, and Concat (along the units' axis: an offset among the joined channels)."""
from __future__ import annotations

import numpy as np

from onnxprune.find.constants import shape_entries, sole_entry
from onnxprune.find.unitgroups import Cut, ShapeEdit
from onnxprune.find.unitplace import Divide, channel_axis, node_axes, per_channel_cut
from onnxprune.graph.index import Rejection, attributes


def reduce(ctx, walk, node, tensor, outs):
    """A reduction over other axes than the units' (a spatial mean) keeps every unit apart."""
    rank = ctx.rank(tensor)
    axis = channel_axis(ctx, walk, tensor)
    axes = node_axes(ctx, node, rank)
    if axes is None:
        if int(attributes(node).get("noop_with_empty_axes", 0)):
            return outs[:1]
        raise Rejection(f"{node.op_type} {node.name!r} reduces over every axis, the units' channels included")
    if axis in axes:
        raise Rejection(f"{node.op_type} {node.name!r} reduces over the units' channels")
    if walk.block != 1 and any(a > axis for a in axes):
        raise Rejection(f"{node.op_type} {node.name!r} reduces flattened units")
    if not int(attributes(node).get("keepdims", 1)):
        walk.axis_from_end -= sum(1 for a in axes if a > axis)
    return outs[:1]


def flatten(ctx, walk, node, tensor, outs):
    shape = ctx.shapes.get(tensor)
    if shape is None:
        raise Rejection(f"Flatten {node.name!r} of a tensor of unknown shape")
    axis = channel_axis(ctx, walk, tensor)
    first = int(attributes(node).get("axis", 1)) % (len(shape) or 1)
    if axis < first or any(d != 1 for d in shape[first:axis]) or walk.block != 1:
        raise Rejection(f"Flatten {node.name!r} merges the units' channels with the axes before them")
    after = shape[axis + 1:]
    if any(d is None for d in after):
        raise Rejection(f"Flatten {node.name!r} of a tensor whose spatial size shape inference cannot tell")
    walk.block, walk.axis_from_end = int(np.prod(after)) if after else 1, 1
    return outs[:1]


def reshape(ctx, walk, node, tensor, outs):
    """A Reshape that keeps the units' axis (moving it, merging the axes around it) or merges it with
    every axis after it (a Flatten): the new place; the shape entry that counts the units follows them."""
    shape, target = ctx.shapes.get(tensor), ctx.shapes.get(outs[0])
    if shape is None or target is None:
        raise Rejection(f"Reshape {node.name!r} of a tensor of unknown shape")
    axis = channel_axis(ctx, walk, tensor)
    entries = shape_entries(ctx.g, ctx.constants, node.input[1], ctx.shapes, node.name, 1)
    if entries is None or len(entries) != len(target):
        raise Rejection(f"Reshape {node.name!r} has a shape whose entries cannot be told")
    after = shape[axis + 1:]
    size = walk.width * walk.block
    if any(d is None for d in after):  # sizes known at run time only (a detector's grid): the axes before must match
        before = shape[:axis]
        b = len(before)
        known = [e.value if e.value and e.value > 0 else d for e, d in zip(entries, target)]
        if walk.block != 1 or any(d is None for d in before) or b >= len(known) \
                or any(d is None for d in known[:b]) or int(np.prod(known[:b])) != int(np.prod(before)):
            raise Rejection(f"Reshape {node.name!r} of a tensor whose size after the units' axis shape inference cannot tell")
        if known[b] != size:
            raise Rejection(f"Reshape {node.name!r} from {list(shape)} to {known} splits the units' channel axis")
        follow_entry(ctx.g, walk, node, entries, b, 1)
        walk.axis_from_end = len(target) - b
        return outs[:1]
    inner = int(np.prod(after)) if after else 1
    found = None
    for b in range(len(target) - 1, -1, -1):
        rest = target[b + 1:]
        if any(d is None for d in rest):
            break
        outer = int(np.prod(rest)) if rest else 1
        if target[b] == size and outer == inner:
            found = (b, walk.block)
            break
        if b == len(target) - 1 and target[b] is not None and walk.block == 1 and target[b] == size * inner:
            found = (b, inner)  # the units' axis and every axis after it merged: a Flatten
            break
    if found is None:
        raise Rejection(f"Reshape {node.name!r} from {list(shape)} to {list(target)} splits the units' channel axis"
                   + (" (a channel shuffle: its groups must keep equal counts)" if _shuffles(ctx, node, axis) else ""))
    b, block = found
    follow_entry(ctx.g, walk, node, entries, b, block)
    walk.block, walk.axis_from_end = block, len(target) - b
    return outs[:1]


def _shuffles(ctx, node, axis) -> bool:
    """Whether Reshape ``node`` splits channel axis ``axis`` in two that a Transpose then swaps (ShuffleNet)."""
    readers = ctx.g.consumers[node.output[0]]
    perm = list(attributes(readers[0]).get("perm", [])) if len(readers) == 1 and readers[0].op_type == "Transpose" else []
    return len(perm) > axis + 1 and perm[axis] == axis + 1 and perm[axis + 1] == axis


def follow_entry(g, walk, node, entries, b, per_unit) -> None:
    """Make Reshape ``node``'s entry ``b`` (the units' axis) follow the units."""
    entry = entries[b]
    if entry.value == -1 or (entry.source is not None and walk.places.get(entry.source[0], (None, None))[1] == entry.source[1]
                             and walk.block == 1 and per_unit == 1):
        return  # inferred, or read at run time from the units' axis of a tensor that carries them
    if entry.value == 0 and walk.places.get(node.input[0], (None, None))[1] == b and per_unit == walk.block:
        return  # copied from the input's same axis
    if entry.tensor is not None and entry.value is not None and entry.value > 0 and sole_entry(g, entry, node):
        walk.reshapes.append(ShapeEdit(entry.reader, entry.slot, entry.tensor, entry.index, per_unit))
        return
    if any(e.value == -1 for e in entries):
        raise Rejection(f"Reshape {node.name!r}: the entry for the units' axis is computed and another entry is -1")
    walk.reshapes.append(pinned(node, b, entry, per_unit))


def pinned(node, b: int, entry, per_unit: int) -> ShapeEdit:
    """Reshape ``node``'s entry ``b`` written by the edit: its known value shrinking by ``per_unit`` per unit,
    or -1 where only the run time knows it."""
    known = entry.value is not None and entry.value > 0
    return ShapeEdit(node.name, 1, None, b, per_unit if known else 0, entry.value if known else None)


def transpose(ctx, walk, node, tensor, outs):
    rank = ctx.rank(tensor)
    axis = channel_axis(ctx, walk, tensor)
    perm = attributes(node).get("perm", list(range(rank))[::-1])
    if walk.block != 1:
        raise Rejection(f"Transpose {node.name!r} of flattened units")
    walk.axis_from_end = rank - list(perm).index(axis)
    return outs[:1]


def unsqueeze(ctx, walk, node, tensor, outs):
    rank_in, rank_out = ctx.rank(tensor), ctx.rank(outs[0])
    axes = node_axes(ctx, node, rank_out) if rank_out is not None else None
    if rank_in is None or rank_out is None or axes is None:
        raise Rejection(f"Unsqueeze {node.name!r} with unknown axes or rank")
    kept = [a for a in range(rank_out) if a not in axes]  # where the input's axes go
    walk.axis_from_end = rank_out - kept[rank_in - walk.axis_from_end]
    if walk.block != 1 and walk.axis_from_end != 1:
        raise Rejection(f"Unsqueeze {node.name!r} after flattened units")
    return outs[:1]


def squeeze(ctx, walk, node, tensor, outs):
    rank = ctx.rank(tensor)
    axis = channel_axis(ctx, walk, tensor)
    axes = node_axes(ctx, node, rank)
    if axes is None:
        shape = ctx.shapes.get(tensor)
        if shape is None or any(d is None for d in shape):
            raise Rejection(f"Squeeze {node.name!r} without axes of a tensor of unknown shape")
        axes = [a for a, d in enumerate(shape) if d == 1]
    if axis in axes:
        raise Rejection(f"Squeeze {node.name!r} removes the units' axis")
    walk.axis_from_end -= sum(1 for a in axes if a > axis)
    return outs[:1]


def along_other_axes(ctx, walk, node, tensor, outs):
    """Gather, Slice, Split, Pad, Tile, Softmax along axes other than the units': per unit."""
    rank = ctx.rank(tensor)
    axis = channel_axis(ctx, walk, tensor)
    op, attrs = node.op_type, attributes(node)
    if op == "Gather":
        if node.input[0] != tensor:
            raise Rejection(f"Gather {node.name!r} uses the units as indices")
        along = int(attrs.get("axis", 0)) % rank
        indices = ctx.rank(node.input[1])
        if along == axis:
            return _gather_channels(ctx, walk, node, outs)
        if indices is None:
            raise Rejection(f"Gather {node.name!r} with indices of unknown rank")
        if along > axis:
            walk.axis_from_end += indices - 1
        return outs[:1]
    if op == "Slice":
        starts = ctx.constants.value(node.input[1])
        axes = node_axes(ctx, node, rank, slot=3)
        if axes is None and starts is not None:
            axes = list(range(starts.size))
        if axes is None or (walk.block != 1 and any(a >= axis for a in axes)):
            raise Rejection(f"Slice {node.name!r} of flattened units, or along axes it computes")
        if axis in axes:
            return _slice_channels(ctx, walk, node, outs, axes.index(axis))
        return outs[:1]
    if op == "Split":
        if int(attrs.get("axis", 0)) % rank == axis:
            return _split_channels(ctx, walk, node, outs)
        return outs
    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        if int(attrs.get("axis", -1)) % rank == axis:
            raise Rejection(f"{op} {node.name!r} normalizes over the units' channels")
        return outs[:1]
    if op in ("Pad", "Tile", "Resize", "Upsample"):
        _keeps_channels(ctx, walk, node, tensor, rank, axis)
        return outs[:1]
    raise Rejection(f"{op} {node.name!r} between layers is not a per-unit operation")


def _split_channels(ctx, walk, node, outs):
    """Split along the units' axis: the units go on in the output that holds them all, whose size
    follows them (a Split that divides them starts the walk again per part: ``Divide``)."""
    if walk.block != 1:
        raise Rejection(f"Split {node.name!r} of flattened units")
    count = len(node.output)
    entries = shape_entries(ctx.g, ctx.constants, node.input[1], ctx.shapes, node.name, 1) \
        if len(node.input) > 1 and node.input[1] else None
    if entries is not None and any(e.value is None for e in entries):
        raise Rejection(f"Split {node.name!r} into parts of computed sizes")
    if entries is None and "split" in attributes(node):
        raise Rejection(f"Split {node.name!r} has its sizes in an attribute (opset < 13)")
    sizes = [int(e.value) for e in entries] if entries is not None else [walk.width // count] * count
    if sum(sizes) != walk.width:
        raise Rejection(f"Split {node.name!r} into {sizes}, not the {walk.width} channels it reads")
    low, high, start = walk.offset, walk.end, 0
    for k, size in enumerate(sizes):
        if start <= low and high <= start + size:
            if entries is None or entries[k].tensor is None:
                raise Rejection(f"Split {node.name!r} into equal parts, which removing units would make unequal")
            entry = entries[k]
            walk.reshapes.append(ShapeEdit(entry.reader, entry.slot, entry.tensor, entry.index, 1))
            walk.offset, walk.width = low - start, size
            return [node.output[k]] if node.output[k] else []
        start += size
    bounds = np.cumsum(sizes)[:-1]
    raise Divide(f"Split {node.name!r} divides the units' channels", [walk.index_at(int(b)) for b in bounds if low < b < high])


def _gather_channels(ctx, walk, node, outs):
    """A Gather of the channels by constant indices (a channel shuffle, ``prepare.shuffles``): each unit
    must be taken once, and the units stay evenly spaced (a stride) where they land, else the walk
    starts again per run of them that does (``Divide``); the indices follow the units (``renumbers``)."""
    landed = _landing(ctx, walk, node)
    if walk.units > 1:
        steps = np.diff(landed)
        breaks = [j + 1 for j in range(len(steps)) if steps[j] <= 0 or (j and steps[j] != steps[j - 1])]
        if breaks:
            raise Divide(f"Gather {node.name!r} scatters the units' channels", breaks)
    indices = ctx.constants.value(node.input[1])
    stride = int(landed[1] - landed[0]) if walk.units > 1 else 1
    walk.renumbers.append(Cut(node.input[1], 0, **walk.span))
    walk.cuts.append(Cut(node.input[1], 0, offset=int(landed[0]), width=int(indices.size), stride=stride))
    walk.offset, walk.width, walk.stride = int(landed[0]), int(indices.size), stride
    return outs[:1]


def _landing(ctx, walk, node) -> np.ndarray:
    """Where a Gather along the units' axis puts each unit (its output channel); Rejection unless its
    indices are a 1-D constant of its own that takes every unit once."""
    indices = ctx.constants.value(node.input[1])
    if indices is None or indices.ndim != 1 or not ctx.constants.stored(node.input[1]) or ctx.g.users(node.input[1]) > 1:
        raise Rejection(f"Gather {node.name!r} selects some of the units' channels by computed or shared indices")
    if walk.block != 1:
        raise Rejection(f"Gather {node.name!r} of flattened units")
    if np.any(indices < 0):
        raise Rejection(f"Gather {node.name!r} counts channels from the end")
    channels = walk.offset + walk.stride * np.arange(walk.units)
    hits = indices[None, :] == channels[:, None]
    if np.any(hits.sum(1) != 1):
        raise Rejection(f"Gather {node.name!r} takes some of the units' channels twice or not at all")
    return hits.argmax(1)


def gathered_from(ctx, walk, node, place) -> list[tuple]:
    """The units' place in a channel Gather's input that it moves to ``place`` (walking back), if any."""
    rank, indices = ctx.rank(node.input[0]), ctx.constants.value(node.input[1])
    axis, block, offset, width, stride = place
    if rank is None or indices is None or indices.ndim != 1 or indices.size != width or block != 1 \
            or int(attributes(node).get("axis", 0)) % rank != rank - axis:
        return []
    shape = ctx.shapes.get(node.input[0])
    size = shape[rank - axis] if shape is not None else None
    if size is None:
        return []
    source = indices.astype(np.int64)[offset + stride * np.arange(walk.units)]
    step = int(source[1] - source[0]) if walk.units > 1 else 1
    if walk.units > 1 and (step <= 0 or np.any(np.diff(source) != step)):
        return []
    return [(axis, block, int(source[0]), int(size), step)]


def _slice_channels(ctx, walk, node, outs, position):
    """Slice along the units' axis: the units go on when it holds them all (its end follows them),
    not at all when it holds none (its start and end move when they lie before it)."""
    entries = [shape_entries(ctx.g, ctx.constants, node.input[slot], ctx.shapes, node.name, slot) for slot in (1, 2)]
    steps = ctx.constants.value(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if any(e is None or e[position].value is None for e in entries) or (steps is not None and steps.ravel()[position] != 1):
        raise Rejection(f"Slice {node.name!r} of the units' channels with computed or strided bounds")
    begin, end = (int(e[position].value) for e in entries)
    if begin < 0 or end < 0:
        raise Rejection(f"Slice {node.name!r} of the units' channels counted from the end")
    low, high, total = walk.offset, walk.end, walk.width
    before, after, inside = high <= begin, min(end, total) <= low, begin <= low and high <= min(end, total)
    if before or after or inside:
        follow = [] if after else [entries[1][position]] + ([entries[0][position]] if before else [])
        for entry in follow:
            if entry.value < total:  # an end past the channels needs no change
                if entry.tensor is None:
                    raise Rejection(f"Slice {node.name!r}: a bound that must follow the units is computed")
                walk.reshapes.append(ShapeEdit(entry.reader, entry.slot, entry.tensor, entry.index, 1))
        if before or after:
            return []  # the units are not in this slice
        walk.offset, walk.width = low - begin, min(end, total) - begin
        return outs[:1]
    raise Divide(f"Slice {node.name!r} takes some of the units' channels",
                 [walk.index_at(b) for b in (begin, end) if low < b < high])


def _keeps_channels(ctx, walk, node, tensor, rank, axis) -> None:
    """Pad, Tile, Resize or Upsample: Rejection unless they leave the units' axis as it is."""
    op, attrs = node.op_type, attributes(node)
    if op == "Resize" and len(node.input) > 3 and node.input[3]:
        entries = shape_entries(ctx.g, ctx.constants, node.input[3], ctx.shapes, node.name, 3)
        if entries is None or len(entries) != rank or walk.block != 1:
            raise Rejection(f"Resize {node.name!r} to sizes that cannot be told")
        follow_entry(ctx.g, walk, node, entries, axis, 1)
        return
    slot = {"Pad": 1, "Tile": 1, "Resize": 2, "Upsample": 1}[op]
    name = node.input[slot] if len(node.input) > slot else ""
    values = ctx.constants.value(name) if name else np.asarray(attrs.get("pads", attrs.get("scales", [])))
    if values is None:
        raise Rejection(f"{op} {node.name!r} has computed {'pads' if op == 'Pad' else 'repeats or scales'}")
    values = values.ravel()
    if op == "Pad":
        if len(node.input) > 3 and node.input[3]:
            raise Rejection(f"Pad {node.name!r} with axes")
        changed = values.size != 2 * rank or values[axis] != 0 or values[axis + rank] != 0
    else:
        changed = values.size != rank or values[axis] != 1
    if changed:
        raise Rejection(f"{op} {node.name!r} changes the units' channel axis")


def concat(ctx, walk, node, tensor, outs):
    """Concat along the units' axis puts them at an offset among the joined channels; along another
    axis it keeps them in place (the other inputs must carry the same units: constants are cut)."""
    shape = ctx.shapes.get(tensor)
    if shape is None or list(node.input).count(tensor) != 1:
        raise Rejection(f"Concat {node.name!r} of a tensor of unknown rank, or of itself twice")
    rank = len(shape)
    along = int(attributes(node).get("axis", 0)) % rank
    axis = rank - walk.axis_from_end
    if along != axis:  # the other inputs carry the same units (a roll), or are constants cut with them
        for name in node.input:
            if name != tensor:
                cut = _concat_constant(ctx, walk, node, name, rank)
                walk.cuts.extend([cut] if cut else [])
        return outs[:1]
    if walk.block != 1:
        raise Rejection(f"Concat {node.name!r} of flattened units")
    widths = []
    for name in node.input:
        other = ctx.shapes.get(name)
        if other is None or len(other) != rank or other[along] is None:
            raise Rejection(f"Concat {node.name!r} input {name!r} has a channel count shape inference cannot tell")
        widths.append(int(other[along]))
    index = list(node.input).index(tensor)
    walk.offset += sum(widths[:index])
    walk.width = sum(widths)
    return outs[:1]


def _concat_constant(ctx, walk, node, name, rank) -> Cut | None:
    """Another input of a Concat along another axis (a class token): a constant, cut along the units' axis."""
    source = name
    while ctx.constants.value(source) is None or not ctx.constants.stored(source):
        producer = ctx.g.producers.get(source)
        if producer is None or producer.op_type not in ("Expand", "Tile", "Cast", "Identity"):
            walk.carried.append(name)  # computed from the model's input: it must carry the same units
            return None
        if ctx.g.users(source) > 1:
            raise Rejection(ctx.g.shared_reason(source, f"Concat {node.name!r} input"))
        if producer.op_type in ("Expand", "Tile"):  # its entry for the units' axis is 1, or follows them
            entries = shape_entries(ctx.g, ctx.constants, producer.input[1], ctx.shapes, producer.name, 1)
            position = rank - walk.axis_from_end
            entry = entries[position] if entries is not None and len(entries) == rank else None
            follows = producer.op_type == "Expand" and entry is not None and entry.value == walk.width and entry.tensor
            if entry is None or (entry.value != 1 and not follows):
                raise Rejection(f"{producer.op_type} {producer.name!r} of a Concat input has a computed or foreign size "
                           "along the units' axis")
            if entry.value != 1:
                walk.reshapes.append(ShapeEdit(entry.reader, entry.slot, entry.tensor, entry.index, 1))
        source = producer.input[0]
    cut = per_channel_cut(ctx, walk, source, f"Concat {node.name!r} input", rank)
    if cut is None and walk.width > 1:
        raise Rejection(f"Concat {node.name!r} joins the units with {name!r}, which has one channel")
    return cut
