"""Unit scores: the ECP error of removing units with their constants, and the baselines."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.derivatives.units import UnitStatistics
from onnxprune.errors import InputError

METHODS = ("ecp", "ecp-unit", "flap", "wanda", "l2")


JACOBIAN_METHODS = ("ecp", "ecp-unit")


@dataclass
class UnitScores:
    """One group's removal order and the cost of each removal in that order (for ``ecp`` the rise of
    the joint first-order error; otherwise the unit's own score), and the constants fed instead."""

    order: np.ndarray
    costs: np.ndarray
    constants: np.ndarray | None
    bands: np.ndarray | None = None  # contiguous groups: the best offset of a kept range of each length
    lanes: int = 1                   # grouped Convs: the same number removed from each block of units

    def removal(self, count: int) -> np.ndarray:
        """The units to remove, ``count`` of them (for a contiguous group: all outside the best range;
        with lanes: count / lanes from each block, in the order's ranking)."""
        if self.lanes > 1:
            lane = len(self.order) // self.lanes
            return np.sort(np.concatenate([self.order[self.order // lane == k][:count // self.lanes]
                                           for k in range(self.lanes)]))
        if self.bands is None:
            return np.sort(self.order[:count])
        n = len(self.order)
        start = int(self.bands[n - count])
        return np.setdiff1d(np.arange(n), np.arange(start, start + n - count))


def best_bands(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every length L of a kept contiguous range [a, a+L): the offset a whose removed complement
    has the least joint error 1' M_out 1, and that error (index L = 0..n)."""
    n = len(m)
    total = m.sum()
    rows = np.concatenate([[0.0], np.cumsum(m.sum(1))])
    square = np.zeros((n + 1, n + 1))
    square[1:, 1:] = m.cumsum(0).cumsum(1)
    offsets, errors = np.zeros(n + 1, int), np.zeros(n + 1)
    errors[0] = total
    for length in range(1, n + 1):
        a = np.arange(n - length + 1)
        b = a + length
        inside = square[b, b] - square[a, b] - square[b, a] + square[a, a]
        error = total - 2 * (rows[b] - rows[a]) + inside
        best = int(np.argmin(error))
        offsets[length], errors[length] = best, error[best]
    return offsets, errors


def ecp_constants(stats: UnitStatistics) -> tuple[np.ndarray, np.ndarray]:
    """(c_j, the joint error matrix M) of one group."""
    vv, vu, uu = stats.vv, stats.vu, stats.uu
    if vv is None or vu is None or uu is None:
        raise ValueError("ECP constants need the Jacobian sums (unit_statistics with jacobians=True)")
    dvv = np.diag(vv)
    c = np.where(dvv > 0, np.diag(vu) / np.where(dvv > 0, dvv, 1.0), 0.0)
    m = np.outer(c, c) * vv - c[:, None] * vu - (c[:, None] * vu).T + uu
    return c, (m + m.T) / 2


def greedy_joint(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove units one by one, each time the one whose addition raises 1' M_S 1 least."""
    k = len(m)
    marginal = np.diag(m).copy()
    taken = np.zeros(k, bool)
    order, costs = np.empty(k, int), np.empty(k)
    for t in range(k):
        j = int(np.argmin(np.where(taken, np.inf, marginal)))
        order[t], costs[t] = j, marginal[j]
        taken[j] = True
        marginal += 2 * m[:, j]
    return order, costs


def score_group(method: str, stats: UnitStatistics, producer_rows: np.ndarray | None,
                contiguous: bool = False) -> UnitScores:
    """The removal order of one group under ``method`` (producer_rows: the producers' (out, in) weights,
    None for input features, whose l2/wanda use the consumer columns); ``contiguous``: only the
    complement of one range may go (input features kept by a Slice)."""
    scores = _score(method, stats, producer_rows)
    if not contiguous:
        return scores
    m = ecp_constants(stats)[1] if method == "ecp" else np.diag(scores.costs[np.argsort(scores.order)])
    offsets, errors = best_bands(m)
    # costs[t]: the joint error's rise from t to t + 1 features removed (kept length n - t to n - t - 1)
    return UnitScores(np.arange(len(m)), np.diff(errors[::-1]), scores.constants, offsets)


def _score(method: str, stats: UnitStatistics, producer_rows: np.ndarray | None) -> UnitScores:
    if producer_rows is None:
        producer_rows = np.sqrt(stats.column_norm2)[:, None]
    if method == "ecp":
        c, m = ecp_constants(stats)
        order, costs = greedy_joint(m)
        return UnitScores(order, costs, c)
    if method == "ecp-unit":
        c, m = ecp_constants(stats)
        score, constants = np.diag(m), c
    elif method == "flap":
        score, constants = stats.fluctuation, stats.mean_z
    elif method == "wanda":
        score, constants = np.linalg.norm(producer_rows, axis=1) * np.sqrt(stats.sum_z2), None
    elif method == "l2":
        score, constants = np.linalg.norm(producer_rows, axis=1), None
    else:
        raise InputError(f"unknown structured method {method!r}; choose one of {', '.join(METHODS)}")
    order = np.argsort(score, kind="stable")
    return UnitScores(order, score[order], constants)


# --- MACs and the choice of how many units each group loses ---------------------------------------
