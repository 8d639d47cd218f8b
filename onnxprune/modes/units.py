"""The units strategy: whole neurons, channels and attention heads removed (``find.units`` groups
them), so the written model has smaller initializers and runs faster on every runtime.

A step scores every group's units (``score.units``), chooses how many each group keeps
(``select.counts``: a fraction of the units or of the MACs, globally or per layer, rounded to
``multiple``), folds the removed units' constants into their consumers' biases and slices them away
(``edit.slicing``); the repair then re-solves every layer that reads removed units towards the dense
model's pre-activations (of the rows it kept), chained in graph order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.edit.slicing import drop_border, input_contract, remove_units
from onnxprune.errors import InputError
from onnxprune.find.layers import Layer, Skipped, analyse_graph
from onnxprune.find.unitgroups import UnitGroup
from onnxprune.find.units import find_units
from onnxprune.io.data import Dataset
from onnxprune.modes.base import Preset, State
from onnxprune.modes.weights import fresh
from onnxprune.score.units import METHODS, UnitScores, make_unit_scorer
from onnxprune.select.counts import choose_counts, layer_costs, total_macs
from onnxprune.select.fastpath import conv_channel_block
from onnxprune.select.masks import SCOPES, check_patterns, excluded
from onnxprune.select.schedule import geometric

DEFAULT_STEPS = {"ecp": 5}
INPUT_MODES = {"keep": None, "slice": "slice", "prune": "gather"}


@dataclass
class LayerShrink:
    """One layer before and after: output and input units, parameters, MACs and bytes of its tensors."""

    layer: str
    out_before: int
    out_after: int
    in_before: int
    in_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    bytes_before: int
    bytes_after: int


class UnitsMode:
    """Unit groups removed whole. The target is a fraction of the units, or of the dense MACs with
    ``macs``; ``multiple`` rounds every group's kept count (None: a group of Conv channels is rounded to
    the channel block ``provider`` runs fast, measured: ``select.fastpath``); ``inputs``: "keep" never removes input
    features, "slice" keeps one contiguous range of a first dense layer's inputs by a Slice inside the
    model, "prune" lets any go and changes the model's input to the kept features."""

    name = "units"
    masked = False

    def __init__(self, scope: str = "global", macs: bool = False, multiple: int | None = None, inputs: str = "keep",
                 exclude=(), provider: str = "cpu"):
        if scope not in SCOPES:
            raise InputError(f"scope must be one of {SCOPES}, got {scope!r}")
        if multiple is not None and multiple < 1:
            raise InputError(f"--multiple must be a positive number, got {multiple}")
        self.provider = provider
        if inputs not in INPUT_MODES:
            raise InputError(f"inputs must be one of {', '.join(INPUT_MODES)}, got {inputs!r}")
        self.scope, self.macs, self.multiple, self.inputs, self.exclude = scope, macs, multiple, inputs, tuple(exclude)
        self.selection = INPUT_MODES[inputs]
        self.kinds: dict[str, str] = {}  # every layer's kind on the analysis copy (find), for the edited models' groups

    @property
    def what(self) -> str:
        return "MACs" if self.macs else "units"

    def preset(self, method: str) -> Preset:
        if method not in METHODS:
            raise InputError(f"--method {method} is not a structured method; choose one of {', '.join(METHODS)}")
        return Preset(method, geometric(DEFAULT_STEPS.get(method, 1)), refit=True)

    def make_scorer(self, method: str):
        return make_unit_scorer(method)

    def check(self, target: float) -> None:
        if not 0.0 <= target < 1.0:
            flag = "--macs" if self.macs else "--sparsity"
            raise InputError(f"{flag} must be at least 0 and below 1 with --structured (1 would remove every unit), "
                             f"got {target:g}")

    def find(self, model: onnx.ModelProto, layers: list[Layer], output: str, all_layers: list[Layer],
             data: Dataset) -> list:
        """The unit groups of ``layers`` (those that reach the protected output) that no --exclude
        pattern touches; their MACs accounting over ``all_layers``. Returns the rejections."""
        check_patterns(all_layers, self.exclude)
        self.kinds = {layer.name: layer.kind for layer in all_layers}  # as measured on the analysis copy
        units = find_units(model, layers, inputs=self.selection, kinds=self.kinds)
        by_name, reaching = {layer.name: layer for layer in all_layers}, {layer.name for layer in layers}
        rejected = list(units.rejected)
        for g in units.groups:  # a consumer beyond the protected output: the units are part of that output
            beyond = [c.layer for c in g.consumers if c.layer not in reaching]
            if beyond:
                rejected.append(Skipped(g.producer or g.name, by_name[g.producer].op if g.producer else "input",
                                         f"its units reach the protected output {output!r} directly (their consumer "
                                         f"{beyond[0]} lies beyond it)"))
        self.groups = [g for g in units.groups if all(c.layer in reaching for c in g.consumers)
                       and not any(excluded(by_name[n], self.exclude) for n in (*g.producers, *(c.layer for c in g.consumers)))]
        if not self.groups:
            reasons = "; ".join(f"{r.node} ({r.op}): {r.reason}" for r in rejected[:3])
            raise InputError(f"the model has no unit group that can be removed ({reasons or 'no prunable layers'})")
        self.original = {g.name: g.units for g in self.groups}
        self.multiples = self._multiples(by_name)
        self.costs = layer_costs(model, all_layers, self.groups, data.feeds)
        self.all_layers, self.data = all_layers, data
        return rejected

    def _multiples(self, layers: dict[str, Layer]) -> dict[str, int]:
        """Per group the multiple its kept count is rounded to: the one asked for, else for channels of a
        Conv the provider's fast channel block where the dense model is on it (off it, rounding buys
        nothing; a group of one block stays whole: fewer channels would take the slow path)."""
        if self.multiple is not None:
            return {g.name: self.multiple for g in self.groups}
        convs = [g for g in self.groups
                 if any(layers[n].op == "Conv" for n in (*g.producers, *(c.layer for c in g.consumers)))]
        block = conv_channel_block(self.provider) if convs else 1
        return {g.name: block if g in convs and g.units % block == 0 else 1 for g in self.groups}

    def begin(self, model: onnx.ModelProto, layers: list[Layer]) -> State:
        kept = {name: np.arange(n) for name, n in self.original.items()}
        return State(model, layers, self._groups(model), carried=kept)

    def _groups(self, model: onnx.ModelProto):
        """The groups as they are in ``model`` (a fold may have inserted a bias, a cut to follow)."""
        return [g for g in find_units(model, inputs=self.selection, kinds=self.kinds).groups if g.name in self.original]

    def select(self, state: State, scores: dict[str, UnitScores], target: float) -> dict[str, np.ndarray]:
        """Per group the units to remove (indices among those it has now)."""
        counts = {name: len(index) for name, index in state.carried.items()}
        kept = choose_counts(scores, counts, self.original, self.costs, sparsity=None if self.macs else target,
                             macs=target if self.macs else None, scope=self.scope, multiple=self.multiples,
                             lanes={g.name: g.lanes for g in self.groups})
        return {name: scores[name].removal(counts[name] - kept[name]) if name in scores and kept[name] < counts[name]
                else np.array([], int) for name in counts}  # a group this step no longer finds keeps its units

    def edit(self, state: State, removed: dict[str, np.ndarray], scores: dict[str, UnitScores]) -> State:
        constants = {name: s.constants for name, s in scores.items() if s.constants is not None}
        model = remove_units(state.model, removed, constants, inputs=self.selection, kinds=self.kinds)
        kept = {name: np.delete(index, removed[name]) for name, index in state.carried.items()}
        return State(model, fresh(model, state.layers), self._groups(model), carried=kept)

    def repaired(self, state: State, model: onnx.ModelProto) -> State:
        """``state`` after a repair wrote ``model`` (an inserted bias is a cut of its group)."""
        return State(model, fresh(model, state.layers), self._groups(model), carried=state.carried)

    def to_repair(self, state: State) -> tuple[list[Layer], dict[str, np.ndarray]]:
        """The layers that read removed units (graph order), and for those that also lost output units
        the dense rows they kept. A padded Conv's border correction goes: the refit fits the layer as
        it is (``state.model`` changes in place)."""
        changed = {c.layer for g in self.groups if len(state.carried[g.name]) < self.original[g.name]
                   for c in g.consumers}
        dense = {layer.name: layer for layer in self.all_layers}
        kept: dict[str, list[np.ndarray]] = {}
        for g in self.groups:
            for producer in g.producers:
                if producer in changed:  # a split layer produces several groups, each its own rows
                    kept.setdefault(producer, []).append(_kept_rows(g, dense[producer], self.original[g.name],
                                                                    state.carried[g.name]))
        rows = {producer: np.sort(np.concatenate(parts)) for producer, parts in kept.items()}
        layers = [layer for layer in state.layers if layer.name in changed]
        for layer in layers:
            drop_border(state.model, layer)
        return layers, rows

    def finish(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
        """The model as it is written: with --prune-inputs, taking only its kept input features."""
        return input_contract(model) if self.inputs == "prune" else (model, {})

    def report(self, dense: State, state: State, scores: dict, removed: dict, data: Dataset,
               repaired: bool) -> tuple[list, dict]:
        final = {name: len(index) for name, index in state.carried.items()}
        layers = _layer_report(dense.model, state.model, self.all_layers, self.costs, self.original, final)
        units_before, units_after = sum(self.original.values()), sum(final.values())
        return layers, {
            "of": self.what, "multiple": self.multiple, "multiples": self.multiples, "inputs": self.inputs,
            "units_before": units_before, "units_after": units_after,
            "sparsity": 1 - units_after / units_before if units_before else 0.0,
            "params_before": sum(r.params_before for r in layers), "params_after": sum(r.params_after for r in layers),
            "macs_before": total_macs(self.costs, self.original), "macs_after": total_macs(self.costs, final),
            "groups": {name: {"units_before": self.original[name], "units_after": final[name],
                              "removed": np.setdiff1d(np.arange(self.original[name]), state.carried[name]).tolist()}
                       for name in self.original}}


def _layer_report(dense, pruned, layers, costs, original, final) -> list[LayerShrink]:
    after = analyse_graph(pruned).by_name()
    by_cost = {c.layer: c for c in costs}
    inits = {m: {t.name: t for t in model.graph.initializer} for m, model in (("before", dense), ("after", pruned))}
    rows = []
    for layer in layers:
        new = after[layer.name]
        tensors = {m: [inits[m][n] for n in (view.weight, view.bias) if n in inits[m]]
                   for m, view in (("before", layer), ("after", new))}
        size = {m: sum(int(np.prod(t.dims)) for t in ts) for m, ts in tensors.items()}
        nbytes = {m: sum(int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
                         for t in ts) for m, ts in tensors.items()}
        rows.append(LayerShrink(layer.name, layer.out_features, new.out_features, layer.in_features, new.in_features,
                                size["before"], size["after"], by_cost[layer.name].macs(original),
                                by_cost[layer.name].macs(final), nbytes["before"], nbytes["after"]))
    return rows


def _kept_rows(group: UnitGroup, layer: Layer, units: int, carried: np.ndarray) -> np.ndarray:
    """The dense output rows of ``layer`` that the kept units of ``group`` hold: its cut's entries (a
    part of a split layer, the D rows of each part of a fused QKV per head), else D rows per unit."""
    try:
        return group.unit_entries(layer.weight)[carried].ravel()
    except ValueError:  # no plain cut of the weight (a grouped Conv): D consecutive rows per unit
        per = layer.out_features // units
        return (carried[:, None] * per + np.arange(per)).ravel()
