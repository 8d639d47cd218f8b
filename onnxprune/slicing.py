"""The structured rewrite: fold each removed unit's constant into its consumers' biases, then slice.

Removing unit j of a group and feeding the constant c_j in its place changes every consumer's
pre-activation by W[:, cols_j] c_j (one constant per unit, spread over its block of columns: a
Conv's kernel taps, a Flatten's positions), which is added to the consumer's bias (Gemm's beta, a
BatchNormalization holding the bias and a missing bias handled as in ``rewrite.shift_bias``). Then
every initializer of the group (``units.Cut``) keeps only the surviving entries, depthwise Convs'
``group`` shrinks, and Reshape constants follow. Names, dtypes, opset, metadata and the graph's
inputs and outputs are kept; stale intermediate shapes (value_info) are dropped.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .layers import analyse_graph, read_initializer
from .rewrite import shift_bias
from .units import UnitGroup, find_units


def fold_constants(model: onnx.ModelProto, groups: list[UnitGroup], removed: dict[str, np.ndarray],
                   constants: dict[str, np.ndarray] | None) -> onnx.ModelProto:
    """A copy of ``model`` whose consumer biases carry the constants of the removed units."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    if constants is None:
        return new
    for group in groups:
        gone = removed.get(group.name, np.zeros(0, int))
        if not len(gone) or group.name not in constants:
            continue
        for consumer in group.consumers:
            layer = analyse_graph(new).by_name()[consumer.layer]  # fresh: a fold may have inserted a bias
            stored = read_initializer(new, layer.weight)
            rows = layer.to_rows(stored)
            per_column = np.zeros(rows.shape[1])
            cols = _columns(gone, consumer.block)
            per_column[cols] = np.repeat(constants[group.name][gone], consumer.block)
            shift = rows @ per_column
            shift_bias(new, layer, layer.bias_shift_to_stored(shift), stored.dtype)
    return new


def _columns(units: np.ndarray, block: int) -> np.ndarray:
    units = np.asarray(units, int)
    return (units[:, None] * block + np.arange(block)[None, :]).ravel()


def slice_units(model: onnx.ModelProto, keep: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with only the ``keep`` units (sorted indices per group name) of each group."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    groups = find_units(new).by_name()
    inits = {t.name: t for t in new.graph.initializer}
    nodes = {n.name: n for n in new.graph.node}
    for name, kept in keep.items():
        group = groups[name]
        kept = np.asarray(kept, int)
        if len(kept) == group.units:
            continue
        for cut in group.cuts:
            init = inits[cut.tensor]
            value = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.take(value, _columns(kept, cut.block), axis=cut.axis), cut.tensor))
        for node_name in group.group_attributes:
            for attr in nodes[node_name].attribute:
                if attr.name == "group":
                    attr.i = len(kept)
        for tensor, index, per_unit in group.reshapes:
            value = numpy_helper.to_array(inits[tensor]).copy()
            value[index] = len(kept) * per_unit
            inits[tensor].CopyFrom(numpy_helper.from_array(value, tensor))
    del new.graph.value_info[:]
    return new


def remove_units(model: onnx.ModelProto, removed: dict[str, np.ndarray],
                 constants: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """``model`` without the ``removed`` units (indices per group), their constants folded first."""
    work = onnx.ModelProto()
    work.CopyFrom(model)  # find_units names unnamed nodes
    groups = find_units(work).by_name()
    folded = fold_constants(work, list(groups.values()), removed, constants)
    keep = {name: np.setdiff1d(np.arange(groups[name].units), gone) for name, gone in removed.items() if len(gone)}
    return slice_units(folded, keep)
