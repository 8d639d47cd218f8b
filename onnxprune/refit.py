"""Chained least-squares refit of the surviving weights (the second ingredient of ``ecp-refit``).

After a mask is chosen, each row's surviving weights and bias are re-solved so that the layer
reproduces the dense model's pre-activations from the inputs it actually receives: the pruned
network's own activations when ``chained`` (so every layer repairs the error it inherits), or the
dense network's otherwise. Pruned weights stay exactly zero. With ``g_weighted`` each sample's
squared error in row i is weighted by G_i, the output sensitivity ECP already computes, so the fit
spends its capacity where the output is sensitive.

Rows are fit over what the weights multiply: the layer input for a dense layer, every position's
patch for a Conv (im2col) or a sequence MatMul, so positions count as samples of the least squares
(the exact objective for matching the pre-activation everywhere). Per layer this is one streamed pass
over the calibration data, accumulating Gram matrices of [x, 1] (shared by a group's rows when
unweighted, one per row over its survivors when weighted, in row blocks within a memory budget)
and cross-terms with the dense targets; no activations are kept. The ridge damping
lambda = delta * mean(diag Gram) is chosen per layer from a small grid by the error on held-out
calibration samples (every fifth), never on test data; the final solve uses all of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from . import runtime
from .data import Dataset
from .engines import output_jacobians
from .jacobians import by_position, output_shape
from .layers import Layer, analyse_graph, read_initializer
from .rewrite import shift_bias
from .statistics import layer_patches

DAMPING_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
HOLDOUT_EVERY = 5
GRID_ROWS = 32
ROW_BLOCK_BYTES = 256 * 2**20


@dataclass
class LayerRefit:
    """What the refit did to one layer: the damping chosen and the mean squared pre-activation error
    against the dense model on the held-out calibration samples, before and after (G-weighted when
    ``weighted``); ``skipped`` says why a layer was left as it was."""

    layer: str
    damping: float | None = None
    heldout_error_before: float | None = None
    heldout_error_after: float | None = None
    weighted: bool = False
    skipped: str | None = None


def refit_problem(layer: Layer) -> str | None:
    """Why ``layer`` cannot be refit, or None."""
    if any(step.op == "DequantizeLinear" for step in layer.weight_path):
        return "quantized weights are not re-solved"
    return None


def _groups(layer: Layer) -> int:
    return layer.conv.groups if layer.kind == "conv" else 1


class _Moments:
    """Streamed sums for rows' least squares: Gram of x = [patch, 1], cross-terms with targets t."""

    def __init__(self, layer: Layer, survivors: list[np.ndarray], weighted: bool, rows: np.ndarray):
        self.rows, self.weighted, self.survivors = rows, weighted, survivors
        self.per_group = layer.out_features // _groups(layer)
        d = layer.in_features + 1
        if weighted:
            self.gram = [np.zeros((len(survivors[i]) + 1,) * 2) for i in rows]
            self.cross = [np.zeros(len(survivors[i]) + 1) for i in rows]
        else:
            self.gram = np.zeros((_groups(layer), d, d))
            self.cross = np.zeros((_groups(layer), d, layer.out_features))
        self.tt = np.zeros(layer.out_features)

    def add(self, x: np.ndarray, t: np.ndarray, g: np.ndarray | None) -> None:
        """x (M, groups, in), t and g (M, out): M = samples x positions."""
        x = np.concatenate([x, np.ones(x.shape[:2] + (1,))], axis=2)
        if not self.weighted:
            for group in range(x.shape[1]):
                xg = x[:, group]
                self.gram[group] += xg.T @ xg
                self.cross[group] += xg.T @ t
            self.tt += (t * t).sum(0)
            return
        for slot, i in enumerate(self.rows):
            xs = x[:, i // self.per_group, np.append(self.survivors[i], x.shape[2] - 1)]
            w = g[:, i]
            self.gram[slot] += (xs * w[:, None]).T @ xs
            self.cross[slot] += xs.T @ (w * t[:, i])
            self.tt[i] += w @ (t[:, i] ** 2)

    def system(self, slot: int, i: int):
        """(Gram, cross, t.t) of row i over its survivors and the bias (last)."""
        if self.weighted:
            return self.gram[slot], self.cross[slot], self.tt[i]
        group = i // self.per_group
        cols = np.append(self.survivors[i], self.gram.shape[1] - 1)
        return self.gram[group][np.ix_(cols, cols)], self.cross[group][cols, i], self.tt[i]


class _RowProblem:
    """One row's ridge problem over its survivors w and an undamped bias b (last coordinate).

    The bias is eliminated exactly (Schur complement), leaving (S + lambda I) w = r with
    lambda = delta * mean(diag of the weights' Gram).
    """

    def __init__(self, gram: np.ndarray, cross: np.ndarray):
        self.cross = cross
        h_ww, h_wb, h_bb = gram[:-1, :-1], gram[:-1, -1], max(gram[-1, -1], 1e-12)
        self.schur = h_ww - np.outer(h_wb, h_wb) / h_bb
        self.reduced = cross[:-1] - h_wb * cross[-1] / h_bb
        self.h_wb, self.h_bb = h_wb, h_bb
        self.scale = max(float(np.mean(np.diag(h_ww))), 1e-12) if len(h_ww) else 1.0

    def solve(self, delta: float) -> np.ndarray:
        a = self.schur + delta * self.scale * np.eye(len(self.schur))
        try:
            w = np.linalg.solve(a, self.reduced)
        except np.linalg.LinAlgError:
            w = np.linalg.lstsq(a, self.reduced, rcond=None)[0]
        return np.append(w, (self.cross[-1] - self.h_wb @ w) / self.h_bb)


def _error(theta, gram, cross, tt) -> float:
    """Sum of squared errors of x.theta against t, from the moments of (x, t)."""
    return float(theta @ gram @ theta - 2 * theta @ cross + tt)


def _row_blocks(survivors: list[np.ndarray], weighted: bool) -> list[np.ndarray]:
    """Rows grouped so that one block's per-row Gram matrices fit in ROW_BLOCK_BYTES."""
    rows = np.arange(len(survivors))
    if not weighted:
        return [rows]
    blocks, current, size = [], [], 0
    for i in rows:
        need = 8 * (len(survivors[i]) + 1) ** 2
        if current and size + need > ROW_BLOCK_BYTES:
            blocks.append(np.array(current))
            current, size = [], 0
        current.append(i)
        size += need
    blocks.append(np.array(current))
    return blocks


def _patch_rows(layer: Layer, z: np.ndarray) -> np.ndarray:
    """What the weights multiply, one row per (sample, position): (M, groups, in)."""
    if not layer.shared:
        return np.asarray(z, np.float64).reshape(len(z), 1, -1)
    p = layer_patches(layer, z)  # (n, groups, in, positions)
    return np.ascontiguousarray(p.transpose(0, 3, 1, 2)).reshape(-1, p.shape[1], p.shape[2]).astype(np.float64)


def _position_rows(layer: Layer, a: np.ndarray) -> np.ndarray:
    """Per-output values at every position, one row per (sample, position): (M, out)."""
    return by_position(layer, np.asarray(a, np.float64)).transpose(0, 2, 1).reshape(-1, layer.out_features)


class _Source:
    """Per batch: the layer's input patches (from the current or the dense network), the dense
    targets, and, when weighted, G_i of the current network (its Jacobian pass gives z too)."""

    def __init__(self, dense, current, layer, output, weighted, chained, provider, threads, shape):
        if weighted and not chained:
            raise ValueError("a G-weighted refit is always chained")
        self.layer, self.shape = layer, shape
        self.targets = runtime.tensor_session(dense, [layer.preact], provider, threads)
        self.jac = None
        if weighted:
            width = int(np.prod(shape)) if shape else 1
            self.jac = output_jacobians(current, [layer], output, width, provider=provider, threads=threads)
        self.inputs = runtime.tensor_session(current if chained else dense, [layer.input], provider, threads)

    def __call__(self, feeds):
        layer = self.layer
        (t,) = self.targets.run([layer.preact], feeds)
        g = None
        if self.jac is not None:
            gs, zs = self.jac(feeds, self.shape)
            g, z = gs[layer.name], zs[layer.name]
            # G is (batch, out) or, for a shared weight, already (batch, out, positions)
            g = g.reshape(len(g), layer.out_features, -1).transpose(0, 2, 1).reshape(-1, layer.out_features)
        elif layer.input in feeds:
            z = feeds[layer.input]
        else:
            (z,) = self.inputs.run([layer.input], feeds)
        return _patch_rows(layer, z), _position_rows(layer, t), g


def current_bias(model: onnx.ModelProto, layer: Layer, feeds: dict[str, np.ndarray], provider: str = "cpu") -> np.ndarray:
    """The layer's constant term per output in pre-activation units, read off the model itself
    (a - W x on a few samples), so Gemm's beta, a BatchNormalization or a Conv's Add all count."""
    few = {k: v[:8] for k, v in feeds.items()}
    z, a = runtime.run_tensors(model, few, [layer.input, layer.preact], provider) if layer.input not in few else (
        few[layer.input], runtime.run_tensors(model, few, [layer.preact], provider)[0])
    x, t = _patch_rows(layer, z), _position_rows(layer, a)
    weight = layer.to_rows(read_initializer(model, layer.weight))
    per_group = layer.out_features // _groups(layer)
    linear = np.stack([x[:, i // per_group] @ weight[i] for i in range(layer.out_features)], axis=1)
    return (t - linear).mean(0)


def refit(dense: onnx.ModelProto, current: onnx.ModelProto, layers: list[Layer], data: Dataset, output: str, *,
          chained: bool = True, g_weighted: bool = False, batch_size: int = 256, provider: str = "cpu",
          threads: int | None = None, progress: Callable[[int, int], None] | None = None):
    """Refit every layer of ``current`` (pruned; zeros are the mask) towards ``dense``, in graph order.

    Returns the refit model and one LayerRefit per layer.
    """
    shape = output_shape(dense, output, data.feeds, provider) if g_weighted else None
    model = onnx.ModelProto()
    model.CopyFrom(current)
    first = next(data.batches(batch_size))[0]
    reports = []
    for done, name in enumerate(layer.name for layer in layers):
        layer = analyse_graph(model).by_name()[name]  # fresh: an earlier step may have inserted its bias
        problem = refit_problem(layer)
        if problem:
            reports.append(LayerRefit(name, skipped=problem))
            continue
        weight = layer.to_rows(read_initializer(model, layer.weight))
        survivors = [np.flatnonzero(row) for row in weight]
        bias = current_bias(model, layer, first, provider)
        before, after = np.zeros(layer.out_features), np.zeros(layer.out_features)
        new_weight, new_bias = np.zeros_like(weight), bias.copy()
        dampings = []
        for rows in _row_blocks(survivors, g_weighted):
            fit = _Moments(layer, survivors, g_weighted, rows)
            held = _Moments(layer, survivors, g_weighted, rows)
            source = _Source(dense, model, layer, output, g_weighted, chained, provider, threads, shape)
            n_held = 0
            for feeds, _ in data.batches(batch_size):
                x, t, g = source(feeds)
                n = len(next(iter(feeds.values())))
                hold = np.repeat(np.arange(n) % HOLDOUT_EVERY == 0, len(x) // n)  # whole samples
                fit.add(x[~hold], t[~hold], None if g is None else g[~hold])
                held.add(x[hold], t[hold], None if g is None else g[hold])
                n_held += int(hold.sum())
            systems = [(i, fit.system(slot, i), held.system(slot, i)) for slot, i in enumerate(rows)]
            problems = [_RowProblem(f[0], f[1]) for _, f, _ in systems]
            # one damping per row block (a layer, unless split for memory): the least held-out
            # error over up to GRID_ROWS rows spread over the block
            errors = np.zeros(len(DAMPING_GRID))
            for k in np.unique(np.linspace(0, len(systems) - 1, GRID_ROWS).astype(int)):
                errors += [_error(problems[k].solve(delta), *systems[k][2]) for delta in DAMPING_GRID]
            delta = DAMPING_GRID[int(np.argmin(errors))]
            dampings.append(delta)
            for (i, f, h), fitted in zip(systems, problems):
                before[i] = _error(np.append(weight[i, survivors[i]], bias[i]), *h) / max(n_held, 1)
                after[i] = _error(fitted.solve(delta), *h) / max(n_held, 1)
                theta = _RowProblem(f[0] + h[0], f[1] + h[1]).solve(delta)
                new_weight[i, survivors[i]], new_bias[i] = theta[:-1], theta[-1]
        _write_layer(model, layer, new_weight, new_bias - bias)
        reports.append(LayerRefit(name, float(np.median(dampings)), float(before.mean()), float(after.mean()),
                                  g_weighted))
        if progress:
            progress(done + 1, len(layers))
    return model, reports


def _write_layer(model: onnx.ModelProto, layer: Layer, weight_rows: np.ndarray, bias_shift: np.ndarray) -> None:
    """Store effective (out, in) weights back in the layer's own layout and shift its bias."""
    stored = next(t for t in model.graph.initializer if t.name == layer.weight)
    dtype = numpy_helper.to_array(stored).dtype
    stored.CopyFrom(numpy_helper.from_array(layer.mask_to_stored(weight_rows / layer.alpha).astype(dtype), layer.weight))
    shift_bias(model, layer, layer.bias_shift_to_stored(bias_shift), dtype)
