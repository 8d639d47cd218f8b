"""Unit scores: the ECP error of removing units with their constants, and the baselines."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from onnxprune.derivatives.units import UnitStatistics
from onnxprune.errors import InputError


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


def score_group(method: str, stats: UnitStatistics | None, producer_rows: np.ndarray | None, units: int,
                contiguous: bool = False, seed: int = 0) -> UnitScores:
    """The removal order of one group under ``method`` (producer_rows: the producers' (out, in) weights,
    None for input features, whose l2/wanda use the consumer columns); ``contiguous``: only the
    complement of one range may go (input features kept by a Slice)."""
    scorer = make_unit_scorer(method)
    scores = scorer.rank(stats, producer_rows, units, seed)
    if not contiguous:
        return scores
    m = ecp_constants(stats)[1] if stats is not None and method == "ecp" else np.diag(scores.costs[np.argsort(scores.order)])
    offsets, errors = best_bands(m)
    # costs[t]: the joint error's rise from t to t + 1 features removed (kept length n - t to n - t - 1)
    return UnitScores(np.arange(len(m)), np.diff(errors[::-1]), scores.constants, offsets)


def _ordered(score: np.ndarray, constants: np.ndarray | None) -> UnitScores:
    order = np.argsort(score, kind="stable")
    return UnitScores(order, score[order], constants)


def _rows(stats: UnitStatistics, producer_rows: np.ndarray | None) -> np.ndarray:
    return np.sqrt(stats.column_norm2)[:, None] if producer_rows is None else producer_rows


class UnitScorer:
    """A structured method: ``rank`` orders one group's units (cheapest first) from its statistics;
    ``__call__`` ranks every group of a ScoringContext. ``jacobians``: whether it needs the output
    derivatives (else only activation moments)."""

    name = ""
    jacobians = False
    needs_statistics = True

    def rank(self, stats, producer_rows: np.ndarray | None, units: int, seed: int) -> UnitScores:
        raise NotImplementedError

    def __call__(self, ctx) -> dict[str, UnitScores]:
        stats = ctx.unit_statistics(self.jacobians) if self.needs_statistics else {}
        return {g.name: replace(score_group(self.name, stats.get(g.name), ctx.producer_rows(g), g.units,
                                            contiguous=g.selection == "Slice", seed=ctx.seed + k), lanes=g.lanes)
                for k, g in enumerate(ctx.groups)}


class JointECP(UnitScorer):
    """ECP with constants c_j, units removed greedily by the rise of the joint first-order error."""

    name, jacobians = "ecp", True

    def rank(self, stats, producer_rows, units, seed):
        c, m = ecp_constants(stats)
        order, costs = greedy_joint(m)
        return UnitScores(order, costs, c)


class UnitECP(UnitScorer):
    """Each unit's own ECP error with its constant (no cross terms)."""

    name, jacobians = "ecp-unit", True

    def rank(self, stats, producer_rows, units, seed):
        c, m = ecp_constants(stats)
        return _ordered(np.diag(m), c)


class FLAP(UnitScorer):
    """FLAP's fluctuation sum_cols ||W[:, col]||^2 Var(x_col), the mean E[z_j] as the constant."""

    name = "flap"

    def rank(self, stats, producer_rows, units, seed):
        return _ordered(stats.fluctuation, stats.mean_z)


class StructuredWanda(UnitScorer):
    """onnxsim's structured Wanda: ||producer row j||_2 * ||z_j||_2, no constant."""

    name = "wanda"

    def rank(self, stats, producer_rows, units, seed):
        return _ordered(np.linalg.norm(_rows(stats, producer_rows), axis=1) * np.sqrt(stats.sum_z2), None)


class L2(UnitScorer):
    """Li et al. / onnxsim: ||producer row j||_2, no constant."""

    name = "l2"

    def rank(self, stats, producer_rows, units, seed):
        return _ordered(np.linalg.norm(_rows(stats, producer_rows), axis=1), None)


class RandomUnits(UnitScorer):
    """Units in a seeded random order, no constant: the floor every method must beat."""

    name, needs_statistics = "random", False

    def rank(self, stats, producer_rows, units, seed):
        return _ordered(np.random.default_rng(seed).random(units), None)


UNIT_SCORERS: dict[str, type[UnitScorer]] = {cls.name: cls for cls in (JointECP, UnitECP, FLAP, StructuredWanda, L2,
                                                                         RandomUnits)}
METHODS = tuple(UNIT_SCORERS)


def make_unit_scorer(method: str) -> UnitScorer:
    try:
        return UNIT_SCORERS[method]()
    except KeyError:
        raise InputError(f"unknown structured method {method!r}; choose one of {', '.join(METHODS)}") from None
