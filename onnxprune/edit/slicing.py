"""The structured rewrite: fold each removed unit's constant into its consumers' biases, then slice.

Removing unit j of a group and feeding the constant c_j in its place changes every consumer's
pre-activation by W[:, cols_j] c_j (one constant per unit, spread over its block of columns: a
Conv's kernel taps, a Flatten's positions), which is added to the consumer's bias (Gemm's beta, a
BatchNormalization holding the bias and a missing bias handled as in ``rewrite.shift_bias``). A
padded Conv sees zeros, not c_j, where its kernel overhangs the input: what the bias cannot hold
(the difference at the border, zero inside) is an Add of a constant map after it (``border_node``),
grown by later folds, sliced with the Conv's channels, dropped when the Conv is refit. Then
every initializer of the group (``units.Cut``) keeps only the surviving entries, depthwise Convs'
``group`` shrinks, and Reshape constants follow. Names, dtypes, opset, metadata and the graph's
inputs and outputs are kept; intermediate shapes (value_info) keep their ranks, not their sizes.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.edit.graphedit import Store, declare_inputs, edit_shape, select_units
from onnxprune.edit.rewrite import shift_bias
from onnxprune.find.geometry import im2col
from onnxprune.find.layers import BORDER, BORDER_CONV, Layer, analyse_graph, full_rows
from onnxprune.find.unitgroups import Cut, UnitGroup
from onnxprune.find.units import find_units, selection_node
from onnxprune.graph.index import read_initializer
from onnxprune.prepare.shapes import tensor_shapes_static


def fold_constants(model: onnx.ModelProto, groups: list[UnitGroup], removed: dict[str, np.ndarray],
                   constants: dict[str, np.ndarray] | None) -> onnx.ModelProto:
    """``model`` (changed in place) with the constants of the removed units in its consumers' biases."""
    new = model
    if constants is None:
        return new
    found, seen = analyse_graph(new).by_name(), (len(new.graph.node), len(new.graph.initializer))
    for group in groups:
        gone = removed.get(group.name, np.zeros(0, int))
        if not len(gone) or group.name not in constants:
            continue
        for consumer in group.consumers:
            if (len(new.graph.node), len(new.graph.initializer)) != seen:  # a fold inserted a bias or a border map
                found, seen = analyse_graph(new).by_name(), (len(new.graph.node), len(new.graph.initializer))
            layer = found[consumer.layer]
            stored = read_initializer(new, layer.weight)
            rows = full_rows(layer, layer.to_rows(stored))
            per_column = np.zeros(rows.shape[1])
            cols = _columns(consumer.offset + consumer.stride * gone, consumer.block)
            per_column[cols] = np.repeat(constants[group.name][gone], consumer.block)
            shift = rows @ per_column
            shift_bias(new, layer, layer.bias_shift_to_stored(shift), stored.dtype)
            if layer.op == "Conv":
                channels = np.zeros(layer.geometry.in_channels)
                channels[consumer.offset + consumer.stride * gone] = constants[group.name][gone]
                _fold_border(new, layer, layer.to_rows(stored), channels, shift)
    return new


def border_node(layer: Layer) -> str:
    """Name of the Add that carries a padded Conv's border correction."""
    return f"{layer.node}{BORDER}"


def _fold_border(model: onnx.ModelProto, layer: Layer, rows: np.ndarray, channels: np.ndarray, shift: np.ndarray) -> None:
    """Add to the border map of Conv ``layer`` what constant input ``channels`` gives minus ``shift``
    (its value inside the map, which the bias took); computed in the graph where the sizes are known at
    run time only."""
    shapes = tensor_shapes_static(model)
    shape, out_shape = shapes.get(layer.input), shapes.get(layer.preact)
    if shape is None or out_shape is None or any(d is None for d in (*shape[2:], *out_shape[2:])):
        _fold_border_at_run_time(model, layer, rows, channels, shift)
        return
    constant = np.broadcast_to(channels.reshape(1, -1, *[1] * (len(shape) - 2)), (1, len(channels), *shape[2:]))
    patches = im2col(constant, layer.geometry)
    groups, per_out = patches.shape[1], layer.out_features // patches.shape[1]
    full = np.concatenate([rows[g * per_out:(g + 1) * per_out] @ patches[0, g] for g in range(groups)])
    border = full - shift[:, None]
    if not np.any(np.abs(border) > 1e-7 * max(1.0, float(np.abs(full).max()))):
        return  # no padding reached, or nothing to fold
    border = border.reshape(layer.out_features, *out_shape[2:])
    graph, name = model.graph, border_node(layer)
    node = next((n for n in graph.node if n.name == name), None)
    if node is None:
        if layer.preact in {o.name for o in graph.output}:
            raise ValueError(f"padded Conv {layer.name!r} writes the graph output; its border cannot be folded")
        out = f"{layer.preact}__onnxprune_bordered"
        for n in graph.node:
            n.input[:] = [out if i == layer.preact else i for i in n.input]
        graph.initializer.append(numpy_helper.from_array(border.astype(np.float32), name))
        position = next(i for i, n in enumerate(graph.node) if layer.preact in n.output)
        graph.node.insert(position + 1, helper.make_node("Add", [layer.preact, name], [out], name=name))
        return
    init = next(t for t in graph.initializer if t.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) + border).astype(np.float32), init.name))


def _fold_border_at_run_time(model: onnx.ModelProto, layer: Layer, rows: np.ndarray, channels: np.ndarray,
                             shift: np.ndarray) -> None:
    """The border map of a padded Conv whose input size is known at run time only: the constant
    channels' contribution is a Conv of an all-ones image (of the input's size, one channel) with
    their kernel summed over the channels (``border_kernel``), computed in the graph; minus the
    ``shift`` the bias took. Later folds add to its kernel and shift."""
    geo = layer.geometry
    if geo.auto_pad in ("NOTSET", "VALID") and not any(geo.pads):
        return  # no padding: the bias holds it all
    weight = rows.reshape(layer.out_features, -1, *geo.kernel)
    per_out = layer.out_features // geo.groups
    own = channels.reshape(geo.groups, -1)[np.arange(layer.out_features) // per_out]  # (out, in per group)
    kernel = np.einsum("oi...,oi->o...", weight, own)[:, None].astype(np.float32)
    offset = shift.reshape(-1, *[1] * geo.rank).astype(np.float32)
    graph, name = model.graph, border_node(layer)
    inits = {t.name: t for t in graph.initializer}
    if name in {n.name for n in graph.node}:
        for suffix, value in (("kernel", kernel), ("shift", offset)):
            init = inits[f"{name}__{suffix}"]
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + value, init.name))
        return
    if layer.preact in {o.name for o in graph.output}:
        raise ValueError(f"padded Conv {layer.name!r} writes the graph output; its border cannot be folded")
    out = f"{layer.preact}__onnxprune_bordered"
    for n in graph.node:
        n.input[:] = [out if i == layer.preact else i for i in n.input]
    for suffix, value in (("kernel", kernel), ("shift", offset), ("two", np.array([2], np.int64)),
                          ("end", np.array([1 << 62], np.int64)), ("ones", np.array([1, 1], np.int64))):
        graph.initializer.append(numpy_helper.from_array(value, f"{name}__{suffix}"))
    attrs: dict[str, object] = {"strides": list(geo.strides), "dilations": list(geo.dilations)}
    attrs.update({"auto_pad": geo.auto_pad} if geo.auto_pad not in ("NOTSET", "") else {"pads": list(geo.pads)})
    n = helper.make_node
    nodes = [n("Shape", [layer.input], [f"{name}__shape"], name=f"{name}__shape"),
             n("Slice", [f"{name}__shape", f"{name}__two", f"{name}__end"], [f"{name}__size"], name=f"{name}__size"),
             n("Concat", [f"{name}__ones", f"{name}__size"], [f"{name}__image_shape"], name=f"{name}__image_shape", axis=0),
             n("ConstantOfShape", [f"{name}__image_shape"], [f"{name}__image"], name=f"{name}__image",
               value=numpy_helper.from_array(np.ones(1, np.float32))),
             n("Conv", [f"{name}__image", f"{name}__kernel"], [f"{name}__full"], name=border_kernel(layer)),
             n("Sub", [f"{name}__full", f"{name}__shift"], [f"{name}__map"], name=f"{name}__map"),
             n("Add", [layer.preact, f"{name}__map"], [out], name=name)]
    nodes[4].attribute.extend(helper.make_attribute(key, value) for key, value in attrs.items())
    position = next(i for i, node in enumerate(graph.node) if layer.preact in node.output)
    for k, node in enumerate(nodes, start=position + 1):
        graph.node.insert(k, node)


def border_kernel(layer: Layer) -> str:
    """Name of the Conv that computes a run-time border map (not a layer of the model)."""
    return f"{border_node(layer)}{BORDER_CONV}"


def drop_border(model: onnx.ModelProto, layer: Layer) -> None:
    """Remove the border Add of Conv ``layer`` and what computes its map (a refit fits the layer as
    it is, without it)."""
    graph = model.graph
    name = border_node(layer)
    node = next((n for n in graph.node if n.name == name), None)
    if node is None:
        return
    for n in graph.node:
        n.input[:] = [node.input[0] if i == node.output[0] else i for i in n.input]
    helpers = {n.name for n in graph.node if n.name == name or n.name.startswith(f"{name}__")}
    kept = [n for n in graph.node if n.name not in helpers]
    del graph.node[:]
    graph.node.extend(kept)
    dropped = [t for t in graph.initializer if t.name == node.input[1] or t.name.startswith(f"{name}__")]
    for t in dropped:
        graph.initializer.remove(t)


def _columns(units: np.ndarray, block: int) -> np.ndarray:
    units = np.asarray(units, int)
    return (units[:, None] * block + np.arange(block)[None, :]).ravel()


def _take(value: np.ndarray, kept: np.ndarray, cut: Cut, units: int) -> np.ndarray:
    """``value`` with only the ``kept`` units along a grouped Conv's cut: per block of rows, each its
    own lane of units."""
    lane, rows = units // cut.groups, value.shape[0] // cut.groups
    parts = [np.take(value[g * rows:(g + 1) * rows], _columns(kept[(kept // lane) == g] - g * lane, cut.block), axis=cut.axis)
             for g in range(cut.groups)]
    return np.concatenate(parts, axis=0)


def slice_units(model: onnx.ModelProto, keep: dict[str, np.ndarray], inputs: str | None = None,
                kinds: dict[str, str] | None = None) -> onnx.ModelProto:
    """``model`` (changed in place) with only the ``keep`` units (sorted indices per group name) of each
    group; ``inputs`` ("slice" or "gather") says how input features are selected the first time."""
    new = model
    groups = find_units(new, inputs=inputs, kinds=kinds).by_name()
    changed = [(groups[name], np.asarray(kept, int)) for name, kept in keep.items() if len(kept) < groups[name].units]
    # every cut in the model's own coordinates: the entries of an axis all groups drop go at once, so a
    # Concat's other groups keep their offsets (a grouped Conv's cut is per block of rows, after)
    dropped: dict[tuple[str, int], set[int]] = {}
    renumbered: dict[str, set[int]] = {}  # a Gather's indices: the channels of its input that go
    per_block = []
    for group, kept in changed:
        gone = np.setdiff1d(np.arange(group.units), kept)
        for cut in group.cuts:
            if cut.groups == 1:
                dropped.setdefault((cut.tensor, cut.axis), set()).update(_columns(cut.positions(gone), cut.block).tolist())
            else:
                per_block.append((cut, kept, group.units))
        for cut in group.renumbers:
            renumbered.setdefault(cut.tensor, set()).update(cut.positions(gone).tolist())
    store = Store(new)
    for (tensor, axis), entries in dropped.items():
        store.set(tensor, np.delete(store.get(tensor), sorted(entries), axis=axis))
    for tensor, channels in renumbered.items():  # the channels left count from 0 again
        indices = store.get(tensor)
        store.set(tensor, indices - np.searchsorted(np.array(sorted(channels)), indices).astype(indices.dtype))
    for cut, kept, units in per_block:
        store.set(cut.tensor, _take(store.get(cut.tensor), kept, cut, units))
    for group, kept in changed:
        if group.selection:
            _select_inputs(new, group, kept)
        nodes = {n.name: n for n in new.graph.node}
        for node_name in group.group_attributes:
            for attr in nodes[node_name].attribute:
                if attr.name == "group":
                    attr.i -= group.units - len(kept)
        for edit in group.reshapes:
            edit_shape(new, Store(new), edit, group.units - len(kept))
        for select in group.selects:
            select_units(new, select, kept)
    declare_inputs(new)
    _forget_sizes(new.graph.value_info)
    return new


def _forget_sizes(infos) -> None:
    """Intermediate shapes keep their rank and symbolic dims (the matchers read the rank where shape
    inference cannot tell it) but not their sizes, which the slicing may have changed: onnxruntime
    trusts declared sizes."""
    for vi in infos:
        if vi.type.tensor_type.HasField("shape"):
            for dim in vi.type.tensor_type.shape.dim:
                if dim.HasField("dim_value"):
                    dim.ClearField("dim_value")


def _select_inputs(model: onnx.ModelProto, group: UnitGroup, kept: np.ndarray) -> None:
    """Keep input features ``kept`` (of those the group has now) by a Slice (contiguous) or a Gather
    in front of the consumers, inserted the first time and narrowed afterwards."""
    graph = model.graph
    source = group.tensor if group.tensor in {i.name for i in graph.input} else None
    node = next((n for n in graph.node if n.output and n.output[0] == group.tensor), None) if source is None else None
    if source is not None:
        x = source
    elif node is not None:
        x = node.input[0]
    else:
        raise ValueError(f"input group {group.name!r}: {group.tensor!r} is neither a graph input nor a selection's output")
    name = selection_node(x)
    inits = {t.name: t for t in graph.initializer}
    if group.selection == "Slice":
        if len(kept) != kept[-1] - kept[0] + 1:
            raise ValueError("a Slice keeps a contiguous range of input features")
        start = int(numpy_helper.to_array(inits[f"{name}__starts"])[0]) if node is not None else 0
        values = {"starts": [start + int(kept[0])], "ends": [start + int(kept[-1]) + 1], "axes": [1]}
    else:
        old = numpy_helper.to_array(inits[f"{name}__indices"]) if node is not None else np.arange(group.units)
        values = {"indices": old[kept]}
    for key, value in values.items():
        tensor = numpy_helper.from_array(np.asarray(value, np.int64), f"{name}__{key}")
        if tensor.name in inits:
            inits[tensor.name].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
    if node is None:
        out = f"{x}__onnxprune_selected"
        args = [x, f"{name}__starts", f"{name}__ends", f"{name}__axes"] if group.selection == "Slice" else [x, f"{name}__indices"]
        selector = (helper.make_node("Slice", args, [out], name=name) if group.selection == "Slice"
                    else helper.make_node("Gather", args, [out], name=name, axis=1))  # an input group selects by one of the two
        graph.node.insert(0, selector)
        for n in graph.node[1:]:
            n.input[:] = [out if i == x and n.name in {c.layer for c in group.consumers} else i for i in n.input]


def input_contract(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """--prune-inputs: the Gathers of input features removed, so the model takes only the kept
    features (its input shape changes); returns it and the kept indices per input."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    kept = {}
    for vi in graph.input:
        name = selection_node(vi.name)
        node = next((n for n in graph.node if n.name == name and n.op_type == "Gather"), None)
        if node is None:
            continue
        indices = next(t for t in graph.initializer if t.name == node.input[1])
        kept[vi.name] = numpy_helper.to_array(indices).tolist()
        graph.node.remove(node)
        graph.initializer.remove(indices)
        for n in graph.node:
            n.input[:] = [vi.name if i == node.output[0] else i for i in n.input]
        vi.type.tensor_type.shape.dim[1].Clear()
        vi.type.tensor_type.shape.dim[1].dim_value = len(kept[vi.name])
    if kept:
        entry = new.metadata_props.add()
        entry.key, entry.value = "onnxprune.kept_input_features", json.dumps(kept)
    return new, kept


def remove_units(model: onnx.ModelProto, removed: dict[str, np.ndarray],
                 constants: dict[str, np.ndarray] | None = None, inputs: str | None = None,
                 kinds: dict[str, str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` without the ``removed`` units (indices per group), their constants folded first;
    ``inputs`` ("slice" or "gather") when input features are among them."""
    work = onnx.ModelProto()
    work.CopyFrom(model)  # find_units names unnamed nodes
    groups = find_units(work, inputs=inputs, kinds=kinds).by_name()
    folded = fold_constants(work, list(groups.values()), removed, constants)
    keep = {name: np.setdiff1d(np.arange(groups[name].units), gone) for name, gone in removed.items() if len(gone)}
    return slice_units(folded, keep, inputs, kinds)
