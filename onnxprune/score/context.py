"""What scorers may ask for, computed once on first request: the weight scorers read per-layer sums
and loss gradients, the unit scorers per-group sums; every derivative goes through one plan
(``derivatives.plan``) so both strategies share the engine, probes, memory budget and batches."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.derivatives.plan import DerivativeSettings
from onnxprune.derivatives.statistics import LayerStatistics, collect_loss_gradients, collect_moments, collect_statistics
from onnxprune.derivatives.units import UnitStatistics, unit_statistics
from onnxprune.errors import InputError
from onnxprune.find.layers import Layer, effective_weights
from onnxprune.find.unitgroups import UnitGroup
from onnxprune.graph.index import read_initializer
from onnxprune.io.data import Dataset
from onnxprune.prepare.shapes import output_shape


@dataclass
class ScoringContext:
    """One model version to score: its layers (and unit groups, for the units strategy), the
    calibration data, the protected output, how derivatives are computed, and what was measured."""

    model: onnx.ModelProto
    layers: list[Layer]
    data: Dataset
    output: str
    settings: DerivativeSettings = field(default_factory=DerivativeSettings)
    groups: list[UnitGroup] = field(default_factory=list)
    conv_statistics: str = "exact"          # shared-weight layers: "exact" or "positions" (see derivatives.shared)
    error_at: str = "output"                # ECP's error: at the protected output (G from derivatives) or each layer's (G = 1)
    force: bool = False
    progress: Callable[[str, int, int], None] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    derivatives: dict = field(default_factory=dict)  # what computed them: engine, probes, exact, batch
    _weights: dict[str, np.ndarray] | None = None
    _statistics: dict[str, LayerStatistics] | None = None
    _moments: dict[str, LayerStatistics] | None = None
    _loss_gradients: dict[str, np.ndarray] | None = None
    _unit_statistics: dict[bool, dict[str, UnitStatistics]] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def provider(self) -> str:
        return self.settings.provider

    @property
    def threads(self) -> int | None:
        return self.settings.threads

    @property
    def weights(self) -> dict[str, np.ndarray]:
        """Effective (out, in) float64 weights by layer name."""
        if self._weights is None:
            self._weights = effective_weights(self.model, self.layers)
        return self._weights

    def _report(self, step: str):
        return (lambda done, total: self.progress(step, done, total)) if self.progress else None

    def _timed(self, step: str, compute):
        start = time.perf_counter()
        value = compute()
        self.timings[step] = self.timings.get(step, 0.0) + time.perf_counter() - start
        return value

    def statistics(self) -> dict[str, LayerStatistics]:
        if self._statistics is None:
            s = self.settings
            self._statistics = self._timed("statistics", lambda: collect_statistics(
                self.model, self.layers, self.data, self.output, shared=self.conv_statistics,
                progress=self._report("statistics"), info=self.derivatives, probes=s.probes, seed=s.seed,
                engine=s.engine, memory_budget=s.memory_budget, batch_size=s.batch_size, provider=s.provider,
                threads=s.threads, objective=s.objective, workers=s.workers, ray=s.ray, shard_size=s.shard_size))
        return self._statistics

    def moments(self) -> dict[str, LayerStatistics]:
        """The activation moments (mean_z, var_z): the full statistics when computed already, else
        from forward passes alone."""
        if self._statistics is not None:
            return self._statistics
        if self._moments is None:
            s = self.settings
            self._moments = self._timed("moments", lambda: collect_moments(
                self.model, self.layers, self.data, batch_size=s.batch_size, provider=s.provider, threads=s.threads,
                memory_budget=s.memory_budget, progress=self._report("moments")))
        return self._moments

    def loss_gradients(self) -> dict[str, np.ndarray]:
        if self._loss_gradients is None:
            if self.data.labels is None:
                raise InputError("this method needs labels in the calibration data (array 'y' or 'labels')")
            classes = int(np.prod(output_shape(self.model, self.output, self.data.subset(1).arrays(), self.provider)))
            if self.data.labels.max() >= classes:  # onnxruntime's loss kernel would read out of bounds
                raise InputError(f"labels go up to {self.data.labels.max()} but output {self.output!r} has "
                                 f"{classes} classes")
            s = self.settings
            self._loss_gradients = self._timed("loss gradients", lambda: collect_loss_gradients(
                self.model, self.layers, self.data, self.output, batch_size=s.batch_size, provider=s.provider,
                threads=s.threads, progress=self._report("loss gradients"), engine=s.engine,
                memory_budget=s.memory_budget, info=self.derivatives, workers=s.workers, ray=s.ray,
                shard_size=s.shard_size))
        return self._loss_gradients

    def unit_statistics(self, jacobians: bool = True) -> dict[str, UnitStatistics]:
        """Per-group sums: the Jacobian Gram matrices only when ``jacobians``."""
        if jacobians not in self._unit_statistics:
            s = self.settings
            by_name = {layer.name: layer for layer in self.layers}
            self._unit_statistics[jacobians] = self._timed("statistics", lambda: unit_statistics(
                self.model, self.groups, by_name, self.data, self.output, jacobians=jacobians,
                progress=self._report("statistics"), info=self.derivatives, probes=s.probes,
                seed=s.seed, engine=s.engine, memory_budget=s.memory_budget, batch_size=s.batch_size,
                provider=s.provider, threads=s.threads, objective=s.objective, workers=s.workers, ray=s.ray,
                shard_size=s.shard_size))
        return self._unit_statistics[jacobians]

    def producer_rows(self, group: UnitGroup) -> np.ndarray | None:
        """The rows of every producer of ``group`` side by side, (units, sum of their inputs; an attention
        head's D rows in one); None for input features."""
        if not group.producers:
            return None
        by_name = {layer.name: layer for layer in self.layers}
        return np.hstack([_unit_rows(group, by_name[p], read_initializer(self.model, by_name[p].weight))
                          for p in group.producers])


def _unit_rows(group: UnitGroup, layer: Layer, weight: np.ndarray) -> np.ndarray:
    """(units, rest): the rows of ``layer`` that each unit of ``group`` holds, by the group's cut of the
    weight (one part of a split layer, the D rows of each part of a fused QKV), else consecutive rows."""
    rows = layer.to_rows(weight)
    try:
        return rows[group.unit_entries(layer.weight)].reshape(group.units, -1)
    except ValueError:  # no plain cut of the weight (a grouped Conv): the rows in order
        return rows.reshape(group.units, -1)
