"""Chained least-squares refit of the layers that read removed units.

After units are sliced away, each consumer layer (in graph order) is re-solved so that it reproduces
the dense model's pre-activations (its surviving rows) from the inputs the shrunk network itself
produces, every earlier layer already refit (chained). Every weight of the smaller layer is free;
the bias is undamped. It is ridge least squares over [x, 1] (x the layer input, or every position's
patch for a Conv or a sequence MatMul), streamed as Gram matrices, with the damping
lambda = delta * mean(diag Gram) chosen on held-out calibration samples (every fifth).

The math is that of ``refit.py`` (``ecp-refit``) without its masks: a structured layer has no
pruned weights inside it, so all rows share one Gram matrix. (Kept separate until refit.py's API
takes a layer's target rows; then the two can merge.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune import runtime
from onnxprune.derivatives.statistics import layer_patches
from onnxprune.edit.rewrite import shift_bias
from onnxprune.edit.slicing import drop_border
from onnxprune.find.layers import Layer, analyse_graph
from onnxprune.graph.index import read_initializer
from onnxprune.io.data import Dataset
from onnxprune.repair.lstsq import DAMPING_GRID, HOLDOUT_EVERY, solve_rows


@dataclass
class UnitRefit:
    """One layer's refit: the damping chosen, and the mean squared pre-activation error against the
    dense model on the held-out calibration samples before and after."""

    layer: str
    damping: float
    heldout_error_before: float
    heldout_error_after: float


def _inputs(layer: Layer, z: np.ndarray) -> np.ndarray:
    """[x, 1] rows, one per (sample, position) and group of a grouped Conv: (M, groups, in + 1)."""
    if layer.shared:
        p = layer_patches(layer, z)  # (n, groups, in, positions)
        x = p.transpose(0, 3, 1, 2).reshape(-1, p.shape[1], p.shape[2])
    else:
        x = np.asarray(z, np.float64).reshape(len(z), 1, -1)
    return np.concatenate([x, np.ones(x.shape[:2] + (1,))], axis=2)


def _targets(layer: Layer, a: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """Pre-activation values, one row per (sample, position), of the output ``rows`` (None: all)."""
    a = np.asarray(a, np.float64)
    if layer.kind == "sequence":
        t = np.moveaxis(a.reshape(len(a), -1, a.shape[-1]), 2, 1)
    else:
        t = a.reshape(len(a), a.shape[1], -1)
    t = t if rows is None else t[:, rows]
    return t.transpose(0, 2, 1).reshape(-1, t.shape[1])


def solve(gram: np.ndarray, cross: np.ndarray, delta: float) -> np.ndarray:
    """Ridge least squares over [x, 1] with an undamped bias (last coordinate), every input kept:
    theta (d + 1, out). The unstructured refit's solver (``refit.solve_rows``) with a full mask."""
    return solve_rows(gram, cross, np.ones((cross.shape[1], len(gram) - 1), bool), delta).T


def _error(theta, gram, cross, tt) -> float:
    return float(np.einsum("io,ij,jo->", theta, gram, theta) - 2 * np.sum(theta * cross) + tt)


def refit_layer(dense: onnx.ModelProto, model: onnx.ModelProto, name: str, rows: np.ndarray | None, data: Dataset,
                batch_size: int = 256, provider: str = "cpu", threads: int | None = None) -> UnitRefit:
    """Refit layer ``name`` of ``model`` in place towards ``dense``'s pre-activation rows ``rows``
    (a grouped Conv: each group's rows on its own inputs)."""
    layer = analyse_graph(model).by_name()[name]
    targets = runtime.tensor_session(dense, [layer.preact], provider, threads)
    current = runtime.tensor_session(model, [layer.input, layer.preact], provider, threads)
    groups = layer.geometry.groups if layer.op == "Conv" else 1
    d, per_out = layer.in_features + 1, layer.out_features // groups
    fit, held = ([np.zeros((groups, d, d)), np.zeros((groups, d, per_out)), np.zeros(groups)] for _ in range(2))
    weight = layer.to_rows(read_initializer(model, layer.weight)).reshape(groups, per_out, -1)
    bias_now: np.ndarray | None = None
    n_held = 0
    for feeds, _ in data.batches(batch_size):
        (a_dense,) = targets.run([layer.preact], feeds)
        z, a_now = (feeds[layer.input], current.run([layer.preact], feeds)[0]) if layer.input in feeds else current.run(
            [layer.input, layer.preact], feeds)
        x = _inputs(layer, z)
        t = _targets(layer, a_dense, rows).reshape(len(x), groups, per_out)
        if bias_now is None:  # the layer's constant term as the model has it (a - W x)
            linear = np.einsum("mgi,goi->mgo", x[:, :, :-1], weight)
            bias_now = (_targets(layer, a_now, None).reshape(len(x), groups, per_out) - linear).mean(0)
        n = len(z)
        hold = np.repeat(np.arange(n) % HOLDOUT_EVERY == 0, len(x) // n)
        for acc, part in ((fit, ~hold), (held, hold)):
            xp, tp = x[part], t[part]
            acc[0] += np.einsum("mgi,mgj->gij", xp, xp)
            acc[1] += np.einsum("mgi,mgo->gio", xp, tp)
            acc[2] += (tp ** 2).sum((0, 2))
        n_held += int(hold.sum())
    if bias_now is None:
        raise ValueError(f"no calibration samples to refit {name!r} on")

    def held_error(thetas) -> float:
        return sum(_error(theta, held[0][g], held[1][g], held[2][g]) for g, theta in enumerate(thetas))

    errors = [held_error([solve(fit[0][g], fit[1][g], delta) for g in range(groups)]) for delta in DAMPING_GRID]
    delta = DAMPING_GRID[int(np.argmin(errors))]
    before = held_error([np.vstack([weight[g].T, bias_now[g]]) for g in range(groups)])
    thetas = [solve(fit[0][g] + held[0][g], fit[1][g] + held[1][g], delta) for g in range(groups)]
    new_rows = np.concatenate([theta[:-1].T for theta in thetas])
    new_bias = np.concatenate([theta[-1] for theta in thetas])
    _write(model, layer, new_rows, new_bias - bias_now.reshape(-1))
    count = max(n_held, 1) * layer.out_features
    return UnitRefit(name, delta, before / count, min(errors) / count)


def _write(model: onnx.ModelProto, layer: Layer, rows: np.ndarray, bias_shift: np.ndarray) -> None:
    stored = next(t for t in model.graph.initializer if t.name == layer.weight)
    dtype = numpy_helper.to_array(stored).dtype
    stored.CopyFrom(numpy_helper.from_array(layer.mask_to_stored(rows / layer.alpha).astype(dtype), layer.weight))
    shift_bias(model, layer, layer.bias_shift_to_stored(bias_shift), dtype)
    drop_border(model, layer)  # the fit is of the layer's own output: a folded border would count twice
