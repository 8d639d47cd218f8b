"""Chained least-squares refit of the surviving weights (the second ingredient of ``ecp-refit``).

After a mask is chosen, each row's surviving weights and bias are re-solved so that the layer
reproduces the dense model's pre-activations from the inputs it actually receives: the pruned
network's own activations when ``chained`` (so every layer repairs the error it inherits), or the
dense network's otherwise. Pruned weights stay exactly zero. With ``g_weighted`` each sample's
squared error in row i is weighted by G_i, the output sensitivity ECP already computes, so the fit
spends its capacity where the output is sensitive.

Per layer this is one streamed pass over the calibration data, accumulating Gram matrices of
[z, 1] (shared by all rows when unweighted, one per row over its survivors when weighted, in row
blocks that fit a memory budget) and cross-terms with the dense targets; no activations are kept.
The ridge damping lambda = delta * mean(diag Gram) is chosen per layer from a small grid by the
error on held-out calibration samples (every fifth), never on test data; the final solve uses all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from . import runtime
from .data import Dataset
from .jacobians import OutputJacobians, output_shape
from .layers import Layer, analyse_graph, read_initializer
from .rewrite import _insert_bias

DAMPING_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
HOLDOUT_EVERY = 5
GRID_ROWS = 32
ROW_BLOCK_BYTES = 256 * 2**20


@dataclass
class LayerRefit:
    """What the refit did to one layer (errors are mean squared pre-activation errors vs the dense
    model on the held-out calibration samples, before and after)."""

    layer: str
    damping: float
    heldout_error_before: float
    heldout_error_after: float
    weighted: bool


class _Moments:
    """Streamed sums for rows' least squares: Gram of x = [z, 1], cross-terms with targets t."""

    def __init__(self, layer: Layer, survivors: list[np.ndarray], weighted: bool, rows: np.ndarray):
        self.rows, self.weighted = rows, weighted
        d = layer.in_features + 1
        if weighted:
            self.gram = [np.zeros((len(survivors[i]) + 1,) * 2) for i in rows]
            self.cross = [np.zeros(len(survivors[i]) + 1) for i in rows]
        else:
            self.gram = np.zeros((d, d))
            self.cross = np.zeros((d, layer.out_features))
        self.tt = np.zeros(layer.out_features)
        self.survivors = survivors

    def add(self, z: np.ndarray, t: np.ndarray, g: np.ndarray | None) -> None:
        x = np.hstack([z, np.ones((len(z), 1))])
        if not self.weighted:
            self.gram += x.T @ x
            self.cross += x.T @ t
            self.tt += (t * t).sum(0)
            return
        for slot, i in enumerate(self.rows):
            cols = np.append(self.survivors[i], x.shape[1] - 1)
            xs = x[:, cols]
            w = g[:, i]
            self.gram[slot] += (xs * w[:, None]).T @ xs
            self.cross[slot] += xs.T @ (w * t[:, i])
            self.tt[i] += w @ (t[:, i] ** 2)

    def system(self, slot: int, i: int):
        """(Gram, cross, t.t) of row i over its survivors and the bias (last)."""
        if self.weighted:
            return self.gram[slot], self.cross[slot], self.tt[i]
        cols = np.append(self.survivors[i], self.gram.shape[0] - 1)
        return self.gram[np.ix_(cols, cols)], self.cross[cols, i], self.tt[i]


class _RowProblem:
    """One row's ridge problem over its survivors w and an undamped bias b (last coordinate).

    The bias is eliminated exactly (Schur complement), leaving (S + lambda I) w = r with
    lambda = delta * mean(diag of the weights' Gram).
    """

    def __init__(self, gram: np.ndarray, cross: np.ndarray):
        self.gram, self.cross = gram, cross
        h_ww, h_wb, h_bb = gram[:-1, :-1], gram[:-1, -1], max(gram[-1, -1], 1e-12)
        self.schur = h_ww - np.outer(h_wb, h_wb) / h_bb
        self.reduced = cross[:-1] - h_wb * cross[-1] / h_bb
        self.h_wb, self.h_bb = h_wb, h_bb
        self.scale = max(float(np.mean(np.diag(h_ww))), 1e-12) if len(h_ww) else 1.0

    def _with_bias(self, w: np.ndarray) -> np.ndarray:
        return np.append(w, (self.cross[-1] - self.h_wb @ w) / self.h_bb)

    def solve(self, delta: float) -> np.ndarray:
        a = self.schur + delta * self.scale * np.eye(len(self.schur))
        try:
            w = np.linalg.solve(a, self.reduced)
        except np.linalg.LinAlgError:
            w = np.linalg.lstsq(a, self.reduced, rcond=None)[0]
        return self._with_bias(w)

    def path(self, deltas) -> list[np.ndarray]:
        """Solutions for every damping in ``deltas`` (LU per damping: measured ~100x faster here
        than one eigendecomposition shared by the grid)."""
        return [self.solve(d) for d in deltas]


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


class _Source:
    """Per batch: the layer's input z (from the current or the dense network), the dense target t,
    and, when weighted, G_i of the current network (its output Jacobians give z along the way)."""

    def __init__(self, dense, current, layer, output, weighted, chained, provider, threads, shape):
        self.layer, self.shape = layer, shape
        self.targets = runtime.tensor_session(dense, [layer.preact], provider, threads)
        self.jac = self.inputs = None
        if weighted and chained:
            width = int(np.prod(shape)) if shape else 1
            self.jac = OutputJacobians(current, [layer], output, width, provider=provider, threads=threads)
        elif weighted:
            raise ValueError("a G-weighted refit is always chained")
        self.inputs = runtime.tensor_session(current if chained else dense, [layer.input], provider, threads)

    def __call__(self, feeds):
        layer = self.layer
        (t,) = self.targets.run([layer.preact], feeds)
        g = None
        if self.jac is not None:
            gs, zs = self.jac(feeds, self.shape)
            g, z = gs[layer.name], zs[layer.name]
        elif layer.input in feeds:
            z = feeds[layer.input]
        else:
            (z,) = self.inputs.run([layer.input], feeds)
        n = len(t)
        return np.asarray(z, np.float64).reshape(n, -1), t.reshape(n, -1).astype(np.float64), g


def refit(dense: onnx.ModelProto, current: onnx.ModelProto, layers: list[Layer], data: Dataset, output: str, *,
          chained: bool = True, g_weighted: bool = False, batch_size: int = 256, provider: str = "cpu",
          threads: int | None = None, progress: Callable[[int, int], None] | None = None):
    """Refit every layer of ``current`` (pruned; zeros are the mask) towards ``dense``, in graph order.

    Returns the refit model and one LayerRefit per layer.
    """
    shape = output_shape(dense, output, data.feeds, provider) if g_weighted else None
    model = onnx.ModelProto()
    model.CopyFrom(current)
    names = [layer.name for layer in layers]
    reports = []
    for done, name in enumerate(names):
        layer = analyse_graph(model).by_name()[name]  # fresh: an earlier step may have inserted its bias
        weight = layer.to_rows(read_initializer(model, layer.weight))
        survivors = [np.flatnonzero(row) for row in weight]
        bias = bias_rows(model, layer)
        before, after = np.zeros(layer.out_features), np.zeros(layer.out_features)
        new_weight, new_bias = np.zeros_like(weight), bias.copy()
        dampings = []
        for rows in _row_blocks(survivors, g_weighted):
            fit = _Moments(layer, survivors, g_weighted, rows)
            held = _Moments(layer, survivors, g_weighted, rows)
            source = _Source(dense, model, layer, output, g_weighted, chained, provider, threads, shape)
            n_held = 0
            for feeds, _ in data.batches(batch_size):
                z, t, g = source(feeds)
                hold = np.arange(len(z)) % HOLDOUT_EVERY == 0
                fit.add(z[~hold], t[~hold], None if g is None else g[~hold])
                held.add(z[hold], t[hold], None if g is None else g[hold])
                n_held += int(hold.sum())
            systems = [(i, fit.system(slot, i), held.system(slot, i)) for slot, i in enumerate(rows)]
            problems = [_RowProblem(f[0], f[1]) for _, f, _ in systems]
            # one damping per row block (a layer, unless split for memory), by held-out error on up
            # to GRID_ROWS rows spread over the block
            errors = np.zeros(len(DAMPING_GRID))
            for k in np.unique(np.linspace(0, len(systems) - 1, GRID_ROWS).astype(int)):
                errors += [_error(theta, *systems[k][2]) for theta in problems[k].path(DAMPING_GRID)]
            delta = DAMPING_GRID[int(np.argmin(errors))]
            dampings.append(delta)
            for (i, f, h), problem in zip(systems, problems):
                before[i] = _error(np.append(weight[i, survivors[i]], bias[i]), *h) / max(n_held, 1)
                after[i] = _error(problem.solve(delta), *h) / max(n_held, 1)
                theta = _RowProblem(f[0] + h[0], f[1] + h[1]).solve(delta)
                new_weight[i, survivors[i]], new_bias[i] = theta[:-1], theta[-1]
        _write_layer(model, layer, new_weight, new_bias)
        reports.append(LayerRefit(name, float(np.median(dampings)), float(before.mean()), float(after.mean()),
                                  g_weighted))
        if progress:
            progress(done + 1, len(names))
    return model, reports


def bias_rows(model: onnx.ModelProto, layer: Layer) -> np.ndarray:
    """The layer's bias in pre-activation units (beta * C), broadcast to (out,)."""
    if layer.bias is None:
        return np.zeros(layer.out_features)
    stored = read_initializer(model, layer.bias).astype(np.float64).reshape(-1)
    return np.broadcast_to(stored * layer.beta, (layer.out_features,)).copy()


def _write_layer(model: onnx.ModelProto, layer: Layer, weight_rows: np.ndarray, bias_rows: np.ndarray) -> None:
    """Store effective (out, in) weights and pre-activation biases back in the layer's own layout."""
    inits = {t.name: t for t in model.graph.initializer}
    stored = inits[layer.weight]
    dtype = numpy_helper.to_array(stored).dtype
    stored.CopyFrom(numpy_helper.from_array(layer.mask_to_stored(weight_rows / layer.alpha).astype(dtype), layer.weight))
    bias_name = layer.bias
    if bias_name is None:
        if not np.any(bias_rows):
            return
        node = next(n for n in model.graph.node if n.name == layer.node)
        bias_name = _insert_bias(model, node, layer, dtype)
        inits[bias_name] = model.graph.initializer[-1]
    old = numpy_helper.to_array(inits[bias_name])
    values = layer.bias_shift_to_stored(bias_rows)
    shape = old.shape if old.size == values.size else values.shape
    inits[bias_name].CopyFrom(numpy_helper.from_array(values.reshape(shape).astype(old.dtype), bias_name))
