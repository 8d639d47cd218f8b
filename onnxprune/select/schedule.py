"""How a target sparsity is reached: a schedule maps the target to the sparsities of its steps.

A schedule is a plain function ``target -> [s_1, ..., s_S]`` ending at the target; the pruner
re-scores the current network and repairs it after every step. ``one_shot`` is one step;
``geometric(S)`` keeps the same fraction of the surviving weights at every step, the density
(1 - r)^(t/S), so late steps, where each weight matters more, remove fewer.
"""
from __future__ import annotations

from collections.abc import Callable

from onnxprune.errors import InputError

Schedule = Callable[[float], list[float]]


def one_shot(sparsity: float) -> list[float]:
    """The target in one step."""
    return [sparsity]


def geometric(steps: int) -> Schedule:
    """S steps of the geometric density schedule (1 - r)^(t/S), the last exactly at r."""
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"--steps must be a positive number, got {steps}")
    if steps == 1:
        return one_shot

    def schedule(sparsity: float) -> list[float]:
        return [1 - (1 - sparsity) ** (t / steps) for t in range(1, steps)] + [sparsity]

    schedule.__name__ = schedule.__qualname__ = f"geometric({steps})"
    return schedule


def path(schedule: Schedule, ratios: list[float]) -> list[float]:
    """One run's step targets that pass through every ratio: the schedule to the largest ratio with
    the others inserted as extra steps (sorted, no repeats)."""
    top = max(ratios)
    return sorted(set(schedule(top)) | set(ratios))
