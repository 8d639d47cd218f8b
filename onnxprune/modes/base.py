"""What a strategy is: the steps of the pruner's loop it decides (find, score, select, edit, what the
repair refits, the report), over one ``State`` per model version.

The pruner (``pipeline.Pruner``) owns the loop, the data, the statistics, the repair and the checks;
a strategy never runs a session of its own except through them. Two exist: ``weights`` (zeros and
bias shifts) and ``units`` (whole units sliced away).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx

from onnxprune.find.layers import Layer
from onnxprune.find.unitgroups import UnitGroup
from onnxprune.select.schedule import Schedule


@dataclass
class State:
    """One model version of a run: the model, its layers (and unit groups), and what the strategy
    carries from step to step (masks so far, units kept so far)."""

    model: onnx.ModelProto
    layers: list[Layer]
    groups: list[UnitGroup] = field(default_factory=list)
    carried: dict[str, np.ndarray] = field(default_factory=dict)  # weights: masks so far; units: kept indices
    changes: list = field(default_factory=list)                   # the last edit's per-layer record

    def by_name(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self.layers}


@dataclass(frozen=True)
class Preset:
    """A method name for a scorer, a schedule and a repair; with ``fallback`` the one-shot model
    is kept instead when its held-out calibration error is the lower."""

    scorer: str
    schedule: Schedule | None = None
    refit: bool = False
    then: Any = None   # a repair that follows the refit
    fallback: bool = False


class Mode(Protocol):
    """The strategy interface the pruner's loop calls, in its order."""

    name: str
    masked: bool  # whether the repair must keep zeros at zero (weights) or may move every weight (units)

    def preset(self, method: str) -> Preset: ...

    def make_scorer(self, method: str) -> Any: ...

    def find(self, model: onnx.ModelProto, layers: list[Layer], output: str) -> list: ...

    def begin(self, model: onnx.ModelProto, layers: list[Layer]) -> State: ...

    def select(self, state: State, scores: dict, target: float) -> dict: ...

    def edit(self, state: State, selection: dict, scores: dict) -> State: ...

    def to_repair(self, state: State) -> tuple[list[Layer], dict[str, np.ndarray] | None]: ...

    def report(self, dense: State, state: State, scores: dict, selection: dict, data) -> tuple[list, dict]: ...
