"""Least squares with a fixed support per row: the refits' one factorisation per layer.

Every row i of a layer keeps a set S_i of its inputs (the mask's survivors); its weights solve the
ridge system (X_S' X_S + lambda I) w = X_S' t_i. Rows with sets of similar size are stacked and
padded to one batched solve (``solve_rows``); the damping lambda = delta * mean(diag Gram) is chosen
from ``DAMPING_GRID`` by the error on held-out samples (every ``HOLDOUT_EVERY``-th).
"""
from __future__ import annotations

import numpy as np

from onnxprune import runtime
from onnxprune.find.layers import Layer
from onnxprune.repair.base import groups_of

DAMPING_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
HOLDOUT_EVERY = 5
GRID_ROWS = 8                 # rows whose held-out solves choose a layer's damping
SOLVE_BYTES = 64 * 2**20      # bound on one stacked batch of padded row systems
SOLVE_CHUNK = 16              # rows per stacked solve (of similar set sizes: little padding)


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


def solve_own(grams: list[np.ndarray], crosses: list[np.ndarray], scales: np.ndarray, delta: float) -> list[np.ndarray]:
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


def moment_errors(theta: np.ndarray, gram: np.ndarray, cross: np.ndarray, tt: np.ndarray) -> np.ndarray:
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
        errors = [moment_errors(solve_rows(fit.T @ fit, fit.T @ t[~hold][:, rows], keep[rows], delta), held.T @ held,
                          held.T @ t[hold][:, rows], (t[hold][:, rows] ** 2).sum(0)).sum() for delta in DAMPING_GRID]
        damping = DAMPING_GRID[int(np.argmin(errors))]
    theta = solve_rows(xb.T @ xb, xb.T @ t, keep, damping)
    return theta[:, :-1], theta[:, -1], damping


def damping_candidates(previous: float | None, fixed: float | None = None, explore: bool = True) -> list[float]:
    """Dampings to try: the whole grid first, then the previous step's choice and its neighbours,
    or the previous choice alone when not ``explore`` (only ``fixed`` when given)."""
    if fixed is not None:
        return [fixed]
    if previous is None:
        return list(DAMPING_GRID)
    if not explore:
        return [previous]
    return [d for d in DAMPING_GRID if previous / 10.01 <= d <= previous * 10.01]


class Moments:
    """Streamed sums for rows' least squares: Gram of x = [patch, 1] and cross-terms with targets t
    (``gram``, ``cross``: one per group), or, when ``weighted``, one G-weighted Gram per row over its
    survivors (``row_gram``, ``row_cross``, ``diag``: one per row of ``rows``)."""

    def __init__(self, layer: Layer, survivors: list[np.ndarray] | None = None, rows: np.ndarray | None = None):
        self.per_group = layer.out_features // groups_of(layer)
        self.weighted = survivors is not None
        self.survivors: list[np.ndarray] = [] if survivors is None else survivors
        self.rows: np.ndarray = np.zeros(0, dtype=int) if rows is None else rows
        d = layer.in_features + 1
        self.gram = np.zeros((0, d, d))
        self.cross = np.zeros((0, d, layer.out_features))
        self.row_gram: list[np.ndarray] = []
        self.row_cross: list[np.ndarray] = []
        self.diag = np.zeros(0)
        if self.weighted:
            self.row_gram = [np.zeros((len(self.survivors[i]) + 1,) * 2) for i in self.rows]
            self.row_cross = [np.zeros(len(self.survivors[i]) + 1) for i in self.rows]
            self.diag = np.zeros(len(self.rows))  # sum_s g_si |x_s|^2 / in: the damping's scale per row
        else:
            self.gram = np.zeros((groups_of(layer), d, d))
            self.cross = np.zeros((groups_of(layer), d, layer.out_features))
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
        if g is None:
            raise ValueError("weighted moments need the weights g")
        square = (x[:, :, :-1] ** 2).mean(2)  # (M, groups)
        for slot, i in enumerate(self.rows):
            xg = x[:, i // self.per_group]
            xs = xg[:, np.append(self.survivors[i], xg.shape[1] - 1)]
            w = g[:, i]
            self.row_gram[slot] += (xs * w[:, None]).T @ xs
            self.row_cross[slot] += xs.T @ (w * t[:, i])
            self.diag[slot] += w @ square[:, i // self.per_group]
            self.tt[i] += w @ (t[:, i] ** 2)
