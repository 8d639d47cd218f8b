"""Gibbs weights over member energies, temperature selection, curves and the effective size.

p_k = exp(-E_k / T) / Z is computed in log space (log-sum-exp), so no temperature underflows:
T = 0 is the limit "uniform over the members of minimal energy" (the best member when it is
unique), T = inf the uniform average.

Weights used for voting are *quantised* to multiples of 2^-50 (weights below 2^-51 become 0, far
below anything that can change a float64 sum of weights near 1). Every partial sum of quantised
weights below 2 is then exactly representable in float64, so a weighted hard vote is exact whatever
the order of summation: numpy (blocked over members) and onnxruntime (one MatMul) give bit-identical
votes, ties included. The votes are used as probabilities directly: the quantised weights sum to 1
within M * 2^-51. (No rescaling by 1/sum: onnxruntime's optimiser removes a Mul/Div by a constant
within float32 epsilon of 1, even in double, which would make its output differ from numpy's.)
Effective sizes are computed from the unquantised log weights.
"""
from __future__ import annotations

import math

import numpy as np

from onnxprune.errors import InputError
from onnxprune.io.files import available_memory

MAX_GRID = 10_000  # temperatures of a validation grid or curve: each is a column of weights and of votes

QUANTUM = 2.0 ** -50
LOSS_CLIP = 1e-12  # ensemble log loss uses max(p, LOSS_CLIP): hard votes can give a class 0


def check_energies(energies) -> np.ndarray:
    e = np.asarray(energies, dtype=np.float64)
    if e.ndim != 1 or e.size == 0:
        raise InputError(f"energies must be a non-empty 1-D array, got shape {list(e.shape)}")
    if not np.all(np.isfinite(e)):
        raise InputError("energies contain NaN or Inf")
    return e


def check_temperature(temperature, allow_zero: bool = True) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise InputError(f"temperature must be a number, got {temperature!r}") from None
    if math.isnan(t) or t < 0 or (t == 0 and not allow_zero):
        raise InputError(f"temperature must be {'non-negative' if allow_zero else 'positive'}, got {temperature!r}")
    return t


def logsumexp(a: np.ndarray) -> float:
    top = np.max(a)
    if not np.isfinite(top):
        return float(top)
    return float(top + np.log(np.sum(np.exp(a - top))))


def log_gibbs_weights(energies, temperature) -> np.ndarray:
    """log p_k for p_k = exp(-E_k/T)/Z; T = 0 and T = inf are the limits (ties at the minimum share)."""
    e = check_energies(energies)
    t = check_temperature(temperature)
    if t == 0:
        best = e == e.min()
        return np.where(best, -np.log(best.sum()), -np.inf)
    if math.isinf(t):
        return np.full(e.size, -np.log(e.size))
    a = -(e - e.min()) / t
    return a - logsumexp(a)


def gibbs_weights(energies, temperature) -> np.ndarray:
    """p_k (float64, sums to 1 up to rounding), from the log-space computation."""
    return np.exp(log_gibbs_weights(energies, temperature))


def quantize(weights: np.ndarray) -> np.ndarray:
    """Weights rounded to multiples of 2^-50: float64 sums of them are exact in any order (see the
    module docstring). Equal weights stay equal, so exact ties between classes stay ties."""
    return np.round(np.asarray(weights, dtype=np.float64) / QUANTUM) * QUANTUM


def vote_weights(energies, temperature) -> np.ndarray:
    """The quantised weights the ensemble votes with."""
    return quantize(gibbs_weights(energies, temperature))


def weight_matrix(energies, temperatures) -> np.ndarray:
    """Quantised weights for several temperatures, shape (M, len(temperatures)); refused before it
    is allocated when it (and its columns, made first) would not fit in the memory available."""
    need, available = 2 * 8 * len(energies) * len(temperatures), available_memory()
    if need > available:
        raise InputError(f"{len(energies):,} members x {len(temperatures):,} temperatures need {need / 1e9:,.1f} GB of "
                         f"weights; {available / 1e9:,.1f} GB are available: use fewer members or temperatures")
    return np.stack([vote_weights(energies, t) for t in temperatures], axis=1)


def entropy(log_weights: np.ndarray) -> float:
    lw = np.asarray(log_weights, dtype=np.float64)
    p = np.exp(lw)
    keep = p > 0
    return float(-np.sum(p[keep] * lw[keep]))


def effective_size(log_weights: np.ndarray) -> float:
    """exp(entropy(p)): 1 for a single member, M for the uniform average."""
    return float(np.exp(entropy(log_weights)))


def std_temperature(energies) -> float:
    """The label-free estimate T = std(E_k) (population std, ddof = 0)."""
    return float(np.std(check_energies(energies)))


def default_grid(energies, num: int = 41, decades: float = 2.0) -> np.ndarray:
    """A log grid of ``num`` temperatures spanning +-``decades`` around std(E) (or 1 if std(E) = 0)."""
    s = std_temperature(energies)
    centre = np.log10(s) if s > 0 else 0.0
    return np.logspace(centre - decades, centre + decades, num)


def check_grid(temperatures, allow_limits: bool = False) -> np.ndarray:
    t = np.asarray(temperatures, dtype=np.float64).ravel()
    if t.size == 0:
        raise InputError("the temperature grid is empty")
    if t.size > MAX_GRID:
        raise InputError(f"the temperature grid has {t.size:,} temperatures; at most {MAX_GRID:,} are taken")
    if np.any(np.isnan(t)) or np.any(t < 0) or (not allow_limits and (np.any(t <= 0) or np.any(np.isinf(t)))):
        raise InputError("temperatures must be positive finite numbers" if not allow_limits
                         else "temperatures must be non-negative numbers (0 and inf are the limits)")
    return t


def choose_temperature(temperatures: np.ndarray, errors: np.ndarray) -> float:
    """The grid temperature with the fewest errors; among ties, the middle one of the tied set."""
    errors = np.asarray(errors)
    tied = np.flatnonzero(errors == errors.min())
    return float(np.asarray(temperatures)[tied[len(tied) // 2]])


def vote_statistics(votes: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Errors (count) and summed log loss per temperature for votes (nT, S, K) against labels y (S,).

    Votes are normalised by their row sum (the total weight); the predicted class is the first
    argmax of the votes.
    """
    pred = np.argmax(votes, axis=2)
    errors = (pred != y[None, :]).sum(axis=1)
    total = votes.sum(axis=2)
    rows = np.arange(votes.shape[1])
    p_true = votes[:, rows, y] / np.where(total > 0, total, 1.0)
    loss = -np.log(np.maximum(p_true, LOSS_CLIP)).sum(axis=1)
    return errors.astype(np.int64), loss
