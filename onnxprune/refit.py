"""Repairs: what is done to the surviving weights after a mask (the second ingredient of ``ecp-refit``).

A repair is an object with ``start(dense, layers, data, output, ...)`` that returns a run, applied
after every step of a schedule: ``run(current, layers, final) -> (model, reports)``. ``NONE`` leaves
the mask's model as it is. ``Refit`` re-solves each row's surviving weights and bias so that the
layer reproduces the dense model's pre-activations from the inputs it actually receives: the pruned
network's own activations when ``chained`` (every layer repairs the error it inherits), the dense
network's otherwise. Pruned weights stay exactly zero. With ``g_weighted`` the final step's refit
weights each sample's squared error in row i by G_i, the output sensitivity ECP already computes
(of the network before that refit), so the fit spends its capacity where the output is sensitive.

Rows are fit over what the weights multiply: the layer input for a dense layer, every position's
patch for a Conv (im2col) or a sequence MatMul, so positions count as samples of the least squares.
A layer followed by a BatchNormalization that holds its bias is fit on the BN output divided by
the BN's scale (a - mean + B / scale): the pre-activation with its bias, whatever encodes it.
Per layer this is one streamed pass over the calibration data accumulating the Gram matrix of
[x, 1] (one per group; one per row over its survivors when weighted) and cross-terms with the
dense targets. Rows are solved together from one factorisation per layer (``solve_rows``). The
ridge damping lambda = delta * mean(diag Gram) is chosen per layer by the error on held-out
calibration samples (every fifth), never on test data, from a few rows' solves: the whole grid
at the first step, the previous choice and its neighbours at a final step, the previous choice
alone at the steps between. Rows are fit on
the other four fifths only, so the held-out fifth stays unseen by every choice made on it (the
damping, the distillation's epoch, the ecp-refit preset's fallback). A layer whose refit does not lower its held-out error keeps its weights.

A run keeps, across steps, one session of the dense model (its targets, cached while they fit in
memory), one session of the pruned network with the layers' weights and biases as inputs (a step
feeds new values instead of building a model), and the moments of layers whose inputs do not
depend on any refit weight (the first layer's, or all of them unchained). The products run on one
BLAS thread: the same rounding at any --threads, and on a busy machine the faster.

``Distill`` (label-free distillation of the whole network) and ``blockrefit.BlockRefit``
(Gauss-Newton on two-layer blocks) are the repairs that follow a refit.
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
from .graph import read_initializer, tensor_types
from .jacobians import by_position, output_shape
from .layers import Layer, analyse_graph
from .rewrite import shift_bias
from .statistics import layer_patches

DAMPING_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
HOLDOUT_EVERY = 5
GRID_ROWS = 8                 # rows whose held-out solves choose a layer's damping
SOLVE_BYTES = 64 * 2**20      # bound on one stacked batch of padded row systems
SOLVE_CHUNK = 16              # rows per stacked solve (of similar set sizes: little padding)
CACHE_BYTES = 256 * 2**20     # dense targets kept between steps up to this size
ROW_BLOCK_BYTES = 256 * 2**20  # bound on a block of per-row (G-weighted) Gram matrices


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


# ---------------------------------------------------------------------------------------------
# Row solves

def _padded_solve(matrix: np.ndarray, index: np.ndarray, valid: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve matrix[S_r, S_r] y_r = rhs_r for every row r's index set S_r (``index`` padded, ``valid``
    first in each row) at once: padding points at identity rows appended to ``matrix``, so a chunk of
    rows is one gather of one size. Rows go in order of their set's size, each chunk padded to its
    own largest (SOLVE_CHUNK rows, within SOLVE_BYTES)."""
    rows, k = index.shape
    out = np.zeros((rows, k))
    if k == 0:
        return out
    d = len(matrix)
    augmented = np.zeros((d + k, d + k))
    augmented[:d, :d] = matrix
    augmented[np.arange(d, d + k), np.arange(d, d + k)] = 1.0
    index = np.where(valid, index, d + np.arange(k))
    rhs = np.where(valid, rhs, 0.0)
    counts = valid.sum(1)
    order = np.argsort(counts, kind="stable")
    start = 0
    while start < rows:
        size = max(int(counts[order[min(start + SOLVE_CHUNK, rows) - 1]]), 1)
        step = max(1, min(SOLVE_CHUNK, SOLVE_BYTES // (8 * size * size)))
        chunk = order[start:start + step]
        size = max(int(counts[chunk].max()), 1)
        idx, b = index[chunk, :size], rhs[chunk, :size]
        a = augmented[idx[:, :, None], idx[:, None, :]]
        try:
            out[chunk, :size] = np.linalg.solve(a, b[..., None])[..., 0]
        except np.linalg.LinAlgError:
            out[chunk, :size] = [np.linalg.lstsq(m, v, rcond=None)[0] for m, v in zip(a, b)]
        start += step
    return out


def _index(sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged index lists -> (rows, k) padded indices and their validity."""
    k = max((len(s) for s in sets), default=0)
    index, valid = np.zeros((len(sets), k), int), np.zeros((len(sets), k), bool)
    for r, s in enumerate(sets):
        index[r, :len(s)], valid[r, :len(s)] = s, True
    return index, valid


def solve_rows(gram: np.ndarray, cross: np.ndarray, keep: np.ndarray, delta: float) -> np.ndarray:
    """Ridge least squares of every row over its kept inputs (see ``_solve_rows``), on one BLAS
    thread: the stacked systems are small, and BLAS threads fighting over shared cores made them
    20x slower."""
    with runtime.one_blas_thread():
        return _solve_rows(gram, cross, keep, delta)


def _solve_rows(gram: np.ndarray, cross: np.ndarray, keep: np.ndarray, delta: float) -> np.ndarray:
    """Ridge least squares of every row over its kept inputs and an undamped bias, from moments.

    ``gram`` (d + 1, d + 1) = sum [x, 1][x, 1]', ``cross`` (d + 1, rows) = sum [x, 1] t', ``keep``
    (rows, d) bool. Row i minimises sum (t_i - x_S w - b)^2 + lambda |w|^2 over its kept set S with
    lambda = delta * mean(diag of the weights' Gram). Returns theta (rows, d + 1): weights (zero off
    S) and the bias, last.

    The bias is eliminated exactly (Schur complement). A row keeping few inputs is solved on them
    directly; a row keeping most of them from the one inverse K of the damped layer Gram, as the
    unconstrained solution w* = K r projected onto w_P = 0 over the pruned set P (w = w* - K_P
    K_PP^-1 w*_P), a system of the pruned set's size: rows with the same kept set and size share
    one factorisation, and every row is a small stacked solve.
    """
    d = gram.shape[0] - 1
    h_wb, h_bb = gram[:-1, -1], max(gram[-1, -1], 1e-12)
    schur = gram[:-1, :-1] - np.outer(h_wb, h_wb) / h_bb
    reduced = (cross[:-1] - np.outer(h_wb, cross[-1]) / h_bb).T          # (rows, d)
    lam = delta * max(float(np.mean(np.diag(gram)[:-1])), 1e-12) if d else 0.0
    damped = schur + lam * np.eye(d)
    keep = np.asarray(keep, bool)
    sizes = keep.sum(1).astype(float)
    direct = sizes <= d - sizes
    if (sizes[~direct] ** 3).sum() <= d**3 + ((d - sizes[~direct]) ** 3).sum():
        direct[:] = True  # too few rows gain to pay for the inverse
    w = np.zeros((len(keep), d))
    if direct.any():
        rows = np.flatnonzero(direct)
        index, valid = _index([np.flatnonzero(keep[i]) for i in rows])
        y = _padded_solve(damped, index, valid, np.take_along_axis(reduced[rows], index, 1))
        for r, i in enumerate(rows):
            w[i, index[r, valid[r]]] = y[r, valid[r]]
    if (~direct).any():
        rows = np.flatnonzero(~direct)
        try:
            inverse = np.linalg.inv(damped)
        except np.linalg.LinAlgError:
            inverse = np.linalg.pinv(damped)
        free = reduced[rows] @ inverse                                    # w* per row (K symmetric)
        index, valid = _index([np.flatnonzero(~keep[i]) for i in rows])
        mu = _padded_solve(inverse, index, valid, np.take_along_axis(free, index, 1))
        scattered = np.zeros((len(rows), d))
        for r in range(len(rows)):
            scattered[r, index[r, valid[r]]] = mu[r, valid[r]]
        w[rows] = (free - scattered @ inverse) * keep[rows]
    bias = (cross[-1] - w @ h_wb) / h_bb
    return np.concatenate([w, bias[:, None]], axis=1)


def _solve_own(grams: list[np.ndarray], crosses: list[np.ndarray], scales: np.ndarray, delta: float) -> list[np.ndarray]:
    """Per-row systems over [survivors, 1] (the G-weighted refit): the same ridge problem, each row
    with its own Gram, solved stacked; returns theta over the survivors and the bias per row."""
    out = []
    for g, c, s in zip(grams, crosses, scales):
        h_ww, h_wb, h_bb = g[:-1, :-1], g[:-1, -1], max(g[-1, -1], 1e-12)
        schur = h_ww - np.outer(h_wb, h_wb) / h_bb + delta * s * np.eye(len(h_ww))
        reduced = c[:-1] - h_wb * c[-1] / h_bb
        try:
            wi = np.linalg.solve(schur, reduced)
        except np.linalg.LinAlgError:
            wi = np.linalg.lstsq(schur, reduced, rcond=None)[0]
        out.append(np.append(wi, (c[-1] - h_wb @ wi) / h_bb))
    return out


def _errors(theta: np.ndarray, gram: np.ndarray, cross: np.ndarray, tt: np.ndarray) -> np.ndarray:
    """Per row, the sum of squared errors of [x, 1].theta_i against t_i, from the moments."""
    return ((theta @ gram) * theta).sum(1) - 2 * (theta * cross.T).sum(1) + tt


def refit_rows(x: np.ndarray, targets: np.ndarray, keep: np.ndarray | None = None,
               damping: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Refit one consumer layer's rows towards ``targets`` given its inputs: ridge least squares.

    ``x`` (samples, in) what the weights multiply, ``targets`` (samples, out), ``keep`` (out, in)
    the inputs each row may use (None: all). The damping is chosen on every fifth sample held out
    when not given; the final solve uses all. Returns (weights (out, in), bias (out,), damping).
    """
    x, t = np.asarray(x, np.float64), np.asarray(targets, np.float64)
    keep = np.ones((t.shape[1], x.shape[1]), bool) if keep is None else np.asarray(keep, bool)
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    hold = np.arange(len(x)) % HOLDOUT_EVERY == 0
    if damping is None:
        fit, held = xb[~hold], xb[hold]
        rows = np.unique(np.linspace(0, len(keep) - 1, GRID_ROWS).astype(int))
        errors = [_errors(solve_rows(fit.T @ fit, fit.T @ t[~hold][:, rows], keep[rows], delta), held.T @ held,
                          held.T @ t[hold][:, rows], (t[hold][:, rows] ** 2).sum(0)).sum() for delta in DAMPING_GRID]
        damping = DAMPING_GRID[int(np.argmin(errors))]
    theta = solve_rows(xb.T @ xb, xb.T @ t, keep, damping)
    return theta[:, :-1], theta[:, -1], damping


# ---------------------------------------------------------------------------------------------
# Tensors of a layer

def _groups(layer: Layer) -> int:
    return layer.conv.groups if layer.kind == "conv" else 1


def fit_target(model: onnx.ModelProto, layer: Layer) -> tuple[str, np.ndarray | None]:
    """The tensor holding the layer's pre-activation with its bias, and per output the factor it
    is divided by: a following BatchNormalization that holds the bias gives its output / scale."""
    if layer.bias_node and layer.bias_factors is not None:
        node = next((n for n in model.graph.node if n.name == layer.bias_node), None)
        if node is not None and node.op_type == "BatchNormalization":
            factors = np.asarray(layer.bias_factors, np.float64)
            return node.output[0], np.where(factors == 0, 1.0, factors)
    return layer.preact, None


def _patch_rows(layer: Layer, z: np.ndarray) -> np.ndarray:
    """What the weights multiply, one row per (sample, position): (M, groups, in)."""
    if not layer.shared:
        return np.asarray(z, np.float64).reshape(len(z), 1, -1)
    p = layer_patches(layer, z)  # (n, groups, in, positions)
    return np.ascontiguousarray(p.transpose(0, 3, 1, 2)).reshape(-1, p.shape[1], p.shape[2]).astype(np.float64)


def _position_rows(layer: Layer, a: np.ndarray, factors: np.ndarray | None = None) -> np.ndarray:
    """Per-output values at every position, one row per (sample, position): (M, out)."""
    rows = by_position(layer, np.asarray(a, np.float64)).transpose(0, 2, 1).reshape(-1, layer.out_features)
    return rows if factors is None else rows / factors


def _linear(layer: Layer, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """W x per (sample, position) row: (M, out)."""
    per_group = layer.out_features // _groups(layer)
    return np.concatenate([x[:, g] @ weight[g * per_group:(g + 1) * per_group].T for g in range(x.shape[1])], axis=1)


def current_bias(model: onnx.ModelProto, layer: Layer, feeds: dict[str, np.ndarray], provider: str = "cpu") -> np.ndarray:
    """The layer's constant term per output in pre-activation units, read off the model itself
    (a - W x on a few samples, a read where ``fit_target`` says), so Gemm's beta, a
    BatchNormalization or a Conv's Add all count."""
    few = {k: v[:8] for k, v in feeds.items()}
    target, factors = fit_target(model, layer)
    names = [target] if layer.input in few else [layer.input, target]
    values = runtime.run_tensors(model, few, names, provider)
    z, a = (few[layer.input], values[0]) if layer.input in few else values
    weight = layer.to_rows(read_initializer(model, layer.weight))
    return (_position_rows(layer, a, factors) - _linear(layer, _patch_rows(layer, z), weight)).mean(0)


def _structure(model: onnx.ModelProto) -> tuple:
    return tuple((n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node)


def _parametric(m: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``m`` (changed in place) with the initializers ``names`` turned into graph inputs."""
    kept = [t for t in m.graph.initializer if t.name not in names]
    moved = {t.name: t for t in m.graph.initializer if t.name in names}
    declared = {vi.name for vi in m.graph.input}
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    m.graph.input.extend(onnx.helper.make_tensor_value_info(n, t.data_type, list(t.dims))
                         for n, t in moved.items() if n not in declared)
    return m


class _Network:
    """The pruned network as one session whose refit layers' weights and biases are inputs, so a
    new step (or a refit layer) feeds new values instead of building a new model."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], outputs: list[str], provider, threads):
        self.key = _structure(model)
        self.names = [n for layer in layers for n in (layer.weight, layer.bias) if n]
        m = _parametric(runtime.runtime_copy(model), self.names)
        types = tensor_types(m)
        del m.graph.output[:]
        m.graph.output.extend(onnx.helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None)
                              for n in dict.fromkeys(outputs))
        self.session = runtime.make_session(m, provider, threads)
        self.values = {}
        self.update(model)

    def update(self, model: onnx.ModelProto, names=None) -> None:
        wanted = set(self.names if names is None else names)
        self.values.update({t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted})

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(names, {**feeds, **self.values})


class _DenseTargets:
    """The dense model's fit targets per batch and layer, from one session, kept while they fit."""

    def __init__(self, dense: onnx.ModelProto, layers: list[Layer], provider, threads):
        self.targets = {layer.name: fit_target(dense, layer) for layer in layers}
        self.session = runtime.tensor_session(dense, list(dict.fromkeys(t for t, _ in self.targets.values())),
                                              provider, threads)
        self.cache, self.size = {}, 0

    def __call__(self, index: int, feeds, layer: Layer) -> np.ndarray:
        key = (index, layer.name)
        if key in self.cache:
            return self.cache[key]
        name, factors = self.targets[layer.name]
        (a,) = self.session.run([name], feeds)
        t = _position_rows(layer, a, factors)
        if self.size + t.nbytes <= CACHE_BYTES:
            self.cache[key] = t
            self.size += t.nbytes
        return t


# ---------------------------------------------------------------------------------------------
# Moments

class _Moments:
    """Streamed sums for rows' least squares: Gram of x = [patch, 1] and cross-terms with targets t
    (one per group), or, when ``weighted``, one G-weighted Gram per row over its survivors."""

    def __init__(self, layer: Layer, survivors: list[np.ndarray] | None = None, rows: np.ndarray | None = None):
        self.per_group = layer.out_features // _groups(layer)
        self.weighted = survivors is not None
        self.survivors, self.rows = survivors, rows
        d = layer.in_features + 1
        if self.weighted:
            self.gram = [np.zeros((len(survivors[i]) + 1,) * 2) for i in rows]
            self.cross = [np.zeros(len(survivors[i]) + 1) for i in rows]
            self.diag = np.zeros(len(rows))  # sum_s g_si |x_s|^2 / in: the damping's scale per row
        else:
            self.gram = np.zeros((_groups(layer), d, d))
            self.cross = np.zeros((_groups(layer), d, layer.out_features))
        self.tt = np.zeros(layer.out_features)
        self.count = 0

    def add(self, x: np.ndarray, t: np.ndarray, g: np.ndarray | None = None) -> None:
        """x (M, groups, in), t and g (M, out): M = samples x positions."""
        self.count += len(x)
        x = np.concatenate([x, np.ones(x.shape[:2] + (1,))], axis=2)
        if not self.weighted:
            for group in range(x.shape[1]):
                xg = x[:, group]
                self.gram[group] += xg.T @ xg
                self.cross[group] += xg.T @ t
            self.tt += (t * t).sum(0)
            return
        square = (x[:, :, :-1] ** 2).mean(2)  # (M, groups)
        for slot, i in enumerate(self.rows):
            xg = x[:, i // self.per_group]
            xs = xg[:, np.append(self.survivors[i], xg.shape[1] - 1)]
            w = g[:, i]
            self.gram[slot] += (xs * w[:, None]).T @ xs
            self.cross[slot] += xs.T @ (w * t[:, i])
            self.diag[slot] += w @ square[:, i // self.per_group]
            self.tt[i] += w @ (t[:, i] ** 2)


def _candidates(previous: float | None, fixed: float | None = None, explore: bool = True) -> list[float]:
    """Dampings to try: the whole grid first, then the previous step's choice and its neighbours,
    or the previous choice alone when not ``explore`` (only ``fixed`` when given)."""
    if fixed is not None:
        return [fixed]
    if previous is None:
        return list(DAMPING_GRID)
    if not explore:
        return [previous]
    return [d for d in DAMPING_GRID if previous / 10.01 <= d <= previous * 10.01]


def _shared_fit(layer, fit: _Moments, held: _Moments, keep: np.ndarray, theta_now: np.ndarray, candidates: list[float]):
    """Unweighted rows: (damping, theta on the fit samples, held-out error before and after), the
    errors summed over the GRID_ROWS rows spread over the layer whose held-out solves chose the
    damping (with one candidate, the final solve's rows: there is nothing to choose)."""
    per_group = fit.per_group
    sample = np.unique(np.linspace(0, layer.out_features - 1, GRID_ROWS).astype(int))
    mine = [sample[sample // per_group == g] for g in range(fit.gram.shape[0])]

    def held_error(theta_rows: np.ndarray, g: int) -> float:
        return float(_errors(theta_rows, held.gram[g], held.cross[g][:, mine[g]], held.tt[mine[g]]).sum())

    groups = [g for g in range(fit.gram.shape[0]) if len(mine[g])]
    before = sum(held_error(theta_now[mine[g]], g) for g in groups)
    scores = np.zeros(len(candidates))
    if len(candidates) > 1:
        for c, delta in enumerate(candidates):
            scores[c] = sum(held_error(solve_rows(fit.gram[g], fit.cross[g][:, mine[g]], keep[mine[g]], delta), g)
                            for g in groups)
    best = int(np.argmin(scores))
    theta = np.zeros((layer.out_features, layer.in_features + 1))
    for g in range(fit.gram.shape[0]):
        rows = np.arange(g * per_group, (g + 1) * per_group)
        theta[rows] = solve_rows(fit.gram[g], fit.cross[g][:, rows], keep[rows], candidates[best])
    if len(candidates) == 1:
        scores[0] = sum(held_error(theta[mine[g]], g) for g in groups)
    return candidates[best], theta, before, scores[best]


def _weighted_fit(fit: _Moments, held: _Moments, survivors, in_features: int, theta_now: np.ndarray,
                  candidates: list[float]):
    """G-weighted rows of one block: (damping, theta (rows, in + 1) on the fit samples, held-out error
    before and after summed over the GRID_ROWS rows whose solves chose the damping)."""
    rows = fit.rows
    sample = np.unique(np.linspace(0, len(rows) - 1, GRID_ROWS).astype(int))

    def held_error(slot, theta):
        return float(theta @ held.gram[slot] @ theta - 2 * theta @ held.cross[slot] + held.tt[rows[slot]])

    scales = np.maximum(fit.diag, 1e-12)
    scores = [sum(held_error(s, th) for s, th in zip(sample, _solve_own(
        [fit.gram[s] for s in sample], [fit.cross[s] for s in sample], scales[sample], delta))) for delta in candidates]
    best = int(np.argmin(scores))
    before = sum(held_error(s, np.append(theta_now[rows[s], survivors[rows[s]]], theta_now[rows[s], -1])) for s in sample)
    final = _solve_own(fit.gram, fit.cross, scales, candidates[best])
    theta = np.zeros((len(rows), in_features + 1))
    for slot, (i, th) in enumerate(zip(rows, final)):
        theta[slot, survivors[i]], theta[slot, -1] = th[:-1], th[-1]
    return candidates[best], theta, before, scores[best]


def _row_blocks(survivors: list[np.ndarray]) -> list[np.ndarray]:
    """Rows grouped so that one block's per-row Gram matrices fit in ROW_BLOCK_BYTES."""
    blocks, current, size = [], [], 0
    for i in range(len(survivors)):
        need = 8 * (len(survivors[i]) + 1) ** 2
        if current and size + need > ROW_BLOCK_BYTES:
            blocks.append(np.array(current))
            current, size = [], 0
        current.append(i)
        size += need
    blocks.append(np.array(current))
    return blocks


# ---------------------------------------------------------------------------------------------
# Repairs

class _NoRepairRun:
    def __call__(self, current, layers, final):
        return current, []


@dataclass(frozen=True)
class NoRepair:
    """Keep the mask's model (with its bias compensation) as it is."""

    name = "none"

    def start(self, dense, layers, data, output, **options) -> _NoRepairRun:
        return _NoRepairRun()


NONE = NoRepair()


@dataclass(frozen=True)
class Refit:
    """Ridge least-squares refit of every layer's surviving weights and biases towards the dense
    model's pre-activations, layer by layer in graph order, after every step; ``chained``: on the
    pruned network's own inputs; ``g_weighted``: the final step's refit weights samples by G."""

    chained: bool = True
    g_weighted: bool = False
    damping: float | None = None  # a fixed delta instead of the held-out choice

    @property
    def name(self) -> str:
        return "refit" + ("" if self.chained else " (dense inputs)") + (", G-weighted" if self.g_weighted else "")

    def start(self, dense, layers, data, output, **options) -> "RefitRun":
        if self.g_weighted and not self.chained:
            raise ValueError("a G-weighted refit is always chained")
        return RefitRun(self, dense, layers, data, output, **options)


class RefitRun:
    """One pruning run's refits: the state reused from step to step (see the module docstring)."""

    def __init__(self, spec: Refit, dense: onnx.ModelProto, layers: list[Layer], data: Dataset, output: str, *,
                 batch_size: int = 256, provider: str = "cpu", threads: int | None = None,
                 progress: Callable[[int, int], None] | None = None):
        self.spec, self.dense, self.data, self.output = spec, dense, data, output
        self.batch_size, self.provider, self.threads, self.progress = batch_size, provider, threads, progress
        self.targets = _DenseTargets(dense, layers, provider, threads)
        self.network: _Network | None = None
        self.dense_network: _Network | None = None
        self.fixed: dict[str, tuple[_Moments, _Moments]] = {}   # moments whose inputs never change
        self.damping: dict[str, float] = {}
        self.shape = output_shape(dense, output, data.feeds, provider) if spec.g_weighted else None

    def _session(self, model: onnx.ModelProto, layers: list[Layer]) -> _Network:
        if self.network is None or self.network.key != _structure(model):
            outputs = [n for layer in layers for n in (layer.input, fit_target(model, layer)[0])]
            self.network = _Network(model, layers, outputs, self.provider, self.threads)
        else:
            self.network.update(model)
        return self.network

    def _fixed_input(self, model: onnx.ModelProto, layer: Layer, layers: list[Layer]) -> bool:
        """Whether the layer's input is the same in every step: unchained, or not downstream of any
        refit weight."""
        if not self.spec.chained:
            return True
        params = {n for other in layers for n in (other.weight, other.bias) if n}
        tainted = set(params)
        for node in model.graph.node:  # graph order is topological
            if any(i in tainted for i in node.input):
                tainted.update(node.output)
        return layer.input not in tainted

    def __call__(self, current: onnx.ModelProto, layers: list[Layer], final: bool):
        """Refit ``layers`` of ``current`` (a mask's model; zeros are the mask); the new model and
        one LayerRefit per layer."""
        weighted = self.spec.g_weighted and final
        model = onnx.ModelProto()
        model.CopyFrom(current)
        names = [layer.name for layer in layers]
        jac = None
        if weighted:
            width = int(np.prod(self.shape)) if self.shape else 1
            jac = output_jacobians(model, layers, self.output, width, provider=self.provider, threads=self.threads)
        reports, inserted = [], True
        for done, name in enumerate(names):
            if inserted:  # fresh: a written bias may have been inserted
                found = analyse_graph(model).by_name()
                layers = [found[n] for n in names]
            layer = layers[done]
            problem = refit_problem(layer)
            if problem:
                reports.append(LayerRefit(name, skipped=problem))
                continue
            with runtime.one_blas_thread():  # small products: the same rounding at any --threads, and faster
                report, inserted = self._refit_layer(model, layer, layers, jac, final)
            reports.append(report)
            if self.progress:
                self.progress(done + 1, len(names))
        return model, reports

    def _refit_layer(self, model, layer, layers, jac, final):
        network = self._session(model, layers)
        source = network if self.spec.chained else self._dense_session(layers)
        weight = layer.to_rows(read_initializer(model, layer.weight))
        keep = weight != 0
        survivors = [np.flatnonzero(row) for row in keep]
        target, factors = fit_target(model, layer)
        bias = self._bias(network, layer, weight, target, factors)
        weighted = jac is not None
        fixed = not weighted and self._fixed_input(model, layer, layers)
        blocks = _row_blocks(survivors) if weighted else [None]
        results = []
        for rows in blocks:
            if fixed and layer.name in self.fixed:
                fit, held = self.fixed[layer.name]
            else:
                fit = _Moments(layer, survivors if weighted else None, rows)
                held = _Moments(layer, survivors if weighted else None, rows)
                offset = 0
                for index, (feeds, _) in enumerate(self.data.batches(self.batch_size)):
                    z = feeds[layer.input] if layer.input in feeds else source.run([layer.input], feeds)[0]
                    x, t, g = _patch_rows(layer, z), self.targets(index, feeds, layer), None
                    if weighted:
                        g = jac(feeds, self.shape)[0][layer.name]  # (batch, out) or (batch, out, positions)
                        g = g.reshape(len(g), layer.out_features, -1).transpose(0, 2, 1).reshape(-1, layer.out_features)
                    n = len(next(iter(feeds.values())))
                    hold = np.repeat((offset + np.arange(n)) % HOLDOUT_EVERY == 0, len(x) // n)  # whole samples
                    offset += n
                    fit.add(x[~hold], t[~hold], None if g is None else g[~hold])
                    held.add(x[hold], t[hold], None if g is None else g[hold])
                if fixed:
                    self.fixed[layer.name] = (fit, held)
            theta_now = np.concatenate([weight, bias[:, None]], axis=1)
            candidates = _candidates(self.damping.get(layer.name), self.spec.damping, explore=final)
            if weighted:
                delta, theta, before, after = _weighted_fit(fit, held, survivors, layer.in_features, theta_now, candidates)
            else:
                rows = np.arange(layer.out_features)
                delta, theta, before, after = _shared_fit(layer, fit, held, keep, theta_now, candidates)
            results.append((rows, delta, theta, before, after))
        new_weight, new_bias = weight.copy(), bias.copy()
        for rows, _, theta, _, _ in results:
            new_weight[rows], new_bias[rows] = theta[:, :-1], theta[:, -1]
        dampings = [r[1] for r in results]
        self.damping[layer.name] = float(np.median(dampings))
        sampled = max(held.count, 1) * sum(min(GRID_ROWS, len(r[0])) for r in results)
        report = LayerRefit(layer.name, self.damping[layer.name], sum(r[3] for r in results) / sampled,
                            sum(r[4] for r in results) / sampled, weighted)
        new_weight[~keep] = 0.0
        inserted = _write_layer(model, layer, new_weight, new_bias - bias)
        if self.network is not None and not inserted:
            self.network.update(model, [layer.weight, layer.bias])
        return report, inserted

    def _bias(self, network, layer, weight, target, factors):
        feeds = next(self.data.batches(self.batch_size))[0]
        few = {k: v[:64] for k, v in feeds.items()}
        if layer.input in few:
            z, (cur,) = few[layer.input], network.run([target], few)
        else:
            z, cur = network.run([layer.input, target], few)
        return (_position_rows(layer, cur, factors) - _linear(layer, _patch_rows(layer, z), weight)).mean(0)

    def _dense_session(self, layers) -> _Network:
        if self.dense_network is None:
            outputs = [layer.input for layer in layers]
            self.dense_network = _Network(self.dense, [], outputs, self.provider, self.threads)
        return self.dense_network


def refit(dense: onnx.ModelProto, current: onnx.ModelProto, layers: list[Layer], data: Dataset, output: str, *,
          chained: bool = True, g_weighted: bool = False, damping: float | None = None, batch_size: int = 256,
          provider: str = "cpu", threads: int | None = None, progress: Callable[[int, int], None] | None = None):
    """One refit of every layer of ``current`` (pruned; zeros are the mask) towards ``dense``, in
    graph order: the refit model and one LayerRefit per layer."""
    run = Refit(chained, g_weighted, damping).start(dense, layers, data, output, batch_size=batch_size, provider=provider,
                                           threads=threads, progress=progress)
    return run(current, layers, final=True)


def _write_layer(model: onnx.ModelProto, layer: Layer, weight_rows: np.ndarray, bias_shift: np.ndarray) -> bool:
    """Store effective (out, in) weights back in the layer's own layout and shift its bias; whether
    a bias had to be inserted."""
    stored = next(t for t in model.graph.initializer if t.name == layer.weight)
    dtype = numpy_helper.to_array(stored).dtype
    stored.CopyFrom(numpy_helper.from_array(layer.mask_to_stored(weight_rows / layer.alpha).astype(dtype), layer.weight))
    return shift_bias(model, layer, layer.bias_shift_to_stored(bias_shift), dtype)


class _DistillRun:
    def __init__(self, spec: "Distill", dense, data: Dataset, output: str, provider, threads, batch_size):
        self.spec, self.dense, self.data, self.output = spec, dense, data, output
        self.provider, self.threads, self.batch_size = provider, threads, batch_size
        self.feeds = {k: np.asarray(v) for k, v in data.feeds.items()}  # an .npz's columns are read once, here

    def __call__(self, current: onnx.ModelProto, layers: list[Layer], final: bool):
        if not (final or self.spec.every_step):
            return current, []
        layers = [layer for layer in layers if refit_problem(layer) is None]
        names = [n for layer in layers for n in (layer.weight, layer.bias) if n]
        inits = {t.name: t for t in current.graph.initializer}
        if not names or any(inits[n].data_type != onnx.TensorProto.FLOAT for n in names):
            return current, [LayerRefit(layer.name, skipped="distillation needs float32 weights") for layer in layers]
        (dense_y,) = runtime.tensor_session(self.dense, [self.output], self.provider, self.threads).run(
            [self.output], self.feeds)
        try:
            session = self._session(current, names, dense_y.shape[1:])
        except Exception as exc:  # onnx-ad refuses an op or a shape: keep the refit's model
            reason = f"distillation unavailable: {str(exc).splitlines()[0][:200]}"
            return current, [LayerRefit(layer.name, skipped=reason) for layer in layers]
        n = len(dense_y)
        held = np.arange(n) % HOLDOUT_EVERY == 0
        fit_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)
        values = {k: numpy_helper.to_array(inits[k]).astype(np.float32) for k in names}
        # Adam runs on one flat vector of what may move: the kept weights and the biases
        free = {k: values[k] != 0 if k in {layer.weight for layer in layers} else np.ones(values[k].shape, bool)
                for k in names}
        seed = np.ones(1, np.float32)

        def run(theta, rows, grads):
            feeds = {k: v[rows] for k, v in self.feeds.items()}
            feeds.update(unflat(theta))
            feeds.update({DISTILL_TARGET: dense_y[rows], f"adj_{DISTILL_LOSS}": seed})
            wanted = [DISTILL_LOSS] + ([f"adj_{k}" for k in names] if grads else [])
            return session.run(wanted, feeds)

        def unflat(theta):
            out, at = {}, 0
            for k in names:
                v = np.zeros(values[k].shape, np.float32)
                count = int(free[k].sum())
                v[free[k]] = theta[at:at + count]
                out[k], at = v, at + count
            return out

        def held_error(theta):
            return sum(float(run(theta, held_rows[i:i + self.batch_size], False)[0])
                       for i in range(0, len(held_rows), self.batch_size)) / max(len(held_rows), 1)

        rng = np.random.default_rng(self.spec.seed)
        theta = np.concatenate([values[k][free[k]] for k in names]).astype(np.float64)
        moment, second = np.zeros_like(theta), np.zeros_like(theta)
        best_error, best, best_epoch = held_error(theta.astype(np.float32)), theta.astype(np.float32), 0
        start_error, t = best_error, 0
        self.curve = [start_error]  # held-out error after every epoch (the first: before any)
        b1, b2, eps = 0.9, 0.999, 1e-8
        for epoch in range(1, self.spec.epochs + 1):
            order = rng.permutation(fit_rows)
            for i in range(0, len(order), self.spec.batch):
                rows = np.sort(order[i:i + self.spec.batch])
                grads = run(theta.astype(np.float32), rows, True)[1:]
                g = np.concatenate([grad.reshape(values[k].shape)[free[k]] for k, grad in zip(names, grads)])
                g = g.astype(np.float64) / len(rows)
                t += 1
                moment = b1 * moment + (1 - b1) * g
                second = b2 * second + (1 - b2) * g * g
                theta = theta - self.spec.lr * (moment / (1 - b1**t)) / (np.sqrt(second / (1 - b2**t)) + eps)
            candidate = theta.astype(np.float32)
            error = held_error(candidate)
            self.curve.append(error)
            if error < best_error:
                best_error, best, best_epoch = error, candidate, epoch
            elif self.spec.patience and epoch - best_epoch >= self.spec.patience:
                break
        self.epochs_run = epoch if self.spec.epochs else 0
        best = unflat(best)
        model = onnx.ModelProto()
        model.CopyFrom(current)
        for t_ in model.graph.initializer:
            if t_.name in best:
                t_.CopyFrom(numpy_helper.from_array(best[t_.name], t_.name))
        report = [LayerRefit(layer.name, heldout_error_before=start_error, heldout_error_after=best_error,
                             skipped=None if best_epoch else "distillation did not lower the held-out error")
                  for layer in layers]
        self.epochs_kept = best_epoch
        return model, report

    def _session(self, model: onnx.ModelProto, names: list[str], shape: tuple[int, ...]):
        """The loss sum ||y - T||^2 of the network with ``names`` as inputs, and its gradients."""
        from onnx import helper
        from onnx_ad import reverse

        m = _parametric(runtime.runtime_copy(model), names)
        graph = m.graph
        for vi in graph.input:  # reverse mode needs declared shapes (Conv, Slice): the data's per sample
            if vi.name in self.feeds:
                vi.CopyFrom(helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type,
                                                          ["N", *self.feeds[vi.name].shape[1:]]))
        y = next(o for o in graph.output if o.name == self.output)
        graph.input.append(helper.make_tensor_value_info(DISTILL_TARGET, onnx.TensorProto.FLOAT, ["N", *shape]))
        graph.node.extend([helper.make_node("Sub", [self.output, DISTILL_TARGET], [f"{DISTILL_LOSS}__d"]),
                           helper.make_node("Mul", [f"{DISTILL_LOSS}__d"] * 2, [f"{DISTILL_LOSS}__dd"]),
                           helper.make_node("ReduceSum", [f"{DISTILL_LOSS}__dd"], [DISTILL_LOSS], keepdims=0)])
        del graph.output[:]
        graph.output.append(helper.make_tensor_value_info(DISTILL_LOSS, y.type.tensor_type.elem_type, []))
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
        return runtime.make_session(reverse(inferred, inputs=names, outputs=[DISTILL_LOSS], layout="onnx"),
                                    self.provider, self.threads)


DISTILL_TARGET = "onnxprune__distill_target"
DISTILL_LOSS = "onnxprune__distill_loss"


@dataclass(frozen=True)
class Distill:
    """Label-free distillation at the final step, masks fixed: Adam on the layers' surviving
    weights and biases towards the dense model's protected output on the calibration data (mean
    squared difference), gradients from onnx-ad's reverse-mode graph (any onnxruntime). Trained on
    four fifths of the samples; the epoch with the least error on the held-out fifth is kept, the
    model as it came when none lowers it; with ``patience`` the training stops that many epochs
    after the best one."""

    epochs: int = 30
    lr: float = 1e-3
    patience: int | None = None  # stop after this many epochs without a lower held-out error
    batch: int = 128
    seed: int = 0
    every_step: bool = False  # also after the refits of the steps before the last
    name = "distill"

    def start(self, dense, layers, data, output, *, batch_size=256, provider="cpu", threads=None, **_) -> _DistillRun:
        return _DistillRun(self, dense, data, output, provider, threads, batch_size)


class _ComposedRun:
    def __init__(self, runs):
        self.runs = runs

    def __call__(self, current, layers, final):
        reports = []
        for run in self.runs:
            current, report = run(current, layers, final)
            reports += report
            layers = [analyse_graph(current).by_name()[layer.name] for layer in layers]
        return current, reports


@dataclass(frozen=True)
class Compose:
    """Repairs applied one after the other at every step."""

    repairs: tuple

    @property
    def name(self) -> str:
        return " + ".join(r.name for r in self.repairs)

    def start(self, dense, layers, data, output, **options) -> _ComposedRun:
        return _ComposedRun([r.start(dense, layers, data, output, **options) for r in self.repairs])
