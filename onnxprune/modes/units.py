"""Structured pruning end to end: unit groups -> statistics -> scores -> counts -> fold and slice -> refit.

``prune_structured`` removes whole units (neurons, channels) so that the written model has smaller
initializers and is faster on every runtime. With ``steps`` S > 1 the target is reached along
1 - (1 - f)^(t/S), every step re-scoring the current (shrunk and refit) network; the refit re-solves
every layer that reads removed units towards the dense model's pre-activations, chained in graph
order (``unitrefit``). Default: ``ecp`` (joint first-order selection with the constants c_j) in 5
steps with the refit.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxprune.derivatives.units import unit_statistics
from onnxprune.edit.slicing import input_contract, remove_units
from onnxprune.errors import InputError
from onnxprune.find.layers import analyse_graph
from onnxprune.find.outputs import protected_output, reaching
from onnxprune.find.unitgroups import Rejected
from onnxprune.find.units import find_units
from onnxprune.graph.index import read_initializer
from onnxprune.repair.unitrefit import UnitRefit, refit_layer
from onnxprune.score.units import JACOBIAN_METHODS, METHODS, score_group
from onnxprune.select.counts import choose_counts, layer_costs, total_macs
from onnxprune.select.masks import SCOPES, check_patterns, excluded

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


@dataclass
class StructuredResult:
    model: onnx.ModelProto
    method: str
    scope: str
    target: dict
    steps: int
    refit: bool
    protected_output: str
    layers: list[LayerShrink]
    groups: dict[str, dict]           # per group: units before, after, removed (original indices)
    rejected: list[Rejected]
    macs_before: int
    macs_after: int
    seconds: dict[str, float] = field(default_factory=dict)
    refits: list[UnitRefit] = field(default_factory=list)
    timing: list[dict] = field(default_factory=list)
    kept_inputs: dict[str, list[int]] = field(default_factory=dict)  # --prune-inputs: the features to feed

    @property
    def units_before(self) -> int:
        return sum(g["units_before"] for g in self.groups.values())

    @property
    def units_after(self) -> int:
        return sum(g["units_after"] for g in self.groups.values())

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    def to_dict(self) -> dict:
        return {"structured": True, "method": self.method, "scope": self.scope, "target": self.target,
                "steps": self.steps, "refit": self.refit, "protected_output": self.protected_output,
                "units_before": self.units_before, "units_after": self.units_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "layers": [asdict(r) for r in self.layers], "groups": self.groups,
                "rejected": [asdict(r) for r in self.rejected], "seconds": self.seconds,
                "refits": [asdict(r) for r in self.refits], "timing": self.timing, "kept_inputs": self.kept_inputs,
                "inputs_changed": bool(self.kept_inputs)}


def _check_request(sparsity, macs, method, scope, steps, multiple) -> float:
    if (sparsity is None) == (macs is None):
        raise InputError("give exactly one of --sparsity (fraction of units) and --macs (fraction of MACs) with --structured")
    fraction = sparsity if sparsity is not None else macs
    what = "--sparsity" if sparsity is not None else "--macs"
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"{what} must be at least 0 and below 1 with --structured (1 would remove every unit), "
                         f"got {fraction:g}")
    if method not in METHODS:
        raise InputError(f"unknown structured method {method!r}; choose one of {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise InputError(f"scope must be one of {SCOPES}, got {scope!r}")
    if steps is not None and steps < 1:
        raise InputError(f"--steps must be a positive number, got {steps}")
    if multiple < 1:
        raise InputError(f"--multiple must be a positive number, got {multiple}")
    return fraction


def prune_structured(model, data, *, sparsity: float | None = None, macs: float | None = None, method: str = "ecp",
                     scope: str = "global", multiple: int = 1, steps: int | None = None, refit: bool = True,
                     exclude=(), output: str | None = None, probes: int | None = None, batch_size: int = 256,
                     seed: int = 0, labels_key: str | None = None, provider: str = "cpu",
                     threads: int | None = None, inputs: str = "keep") -> StructuredResult:
    """``model`` with ``sparsity`` of its prunable units (or ``macs`` of its MACs) removed by ``method``.

    ``inputs``: "keep" (default) never removes input features; "slice" makes the input features of
    a first dense layer units too, kept as one contiguous range by a Slice inside the model (its
    inputs do not change); "prune" lets any of them go and changes the model's input to the kept
    features (``result.kept_inputs`` lists them, as does the model's metadata)."""
    from onnxprune.check.validate import check_finite_weights, check_runs, few_samples, validate
    from onnxprune.find.inventory import find_layers
    from onnxprune.io.data import as_dataset
    from onnxprune.io.models import as_model

    fraction = _check_request(sparsity, macs, method, scope, steps, multiple)
    if inputs not in INPUT_MODES:
        raise InputError(f"inputs must be one of {', '.join(INPUT_MODES)}, got {inputs!r}")
    selection = INPUT_MODES[inputs]
    steps = steps or DEFAULT_STEPS.get(method, 1)
    dense = onnx.ModelProto()
    dense.CopyFrom(as_model(model))
    found = find_layers(dense)
    check_patterns(found.layers, exclude)
    check_finite_weights(dense, found.layers)
    dataset = as_dataset(data, dense, labels_key)
    check_runs(dense, provider, few_samples(dense, dataset))
    out_name = protected_output(dense, output)
    reached, _ = reaching(dense, found.layers, out_name)
    units = find_units(dense, reached, inputs=selection)
    groups = [g for g in units.groups if not any(excluded(found.by_name()[n], exclude) for n in
                                                 (*g.producers, *(c.layer for c in g.consumers)))]
    if not groups:
        reasons = "; ".join(f"{r.layer}: {r.reason}" for r in units.rejected[:3])
        raise InputError(f"the model has no unit group that can be removed ({reasons or 'no prunable layers'})")
    names = [g.name for g in groups]
    original = {g.name: g.units for g in groups}
    kept_index = {name: np.arange(n) for name, n in original.items()}
    costs = layer_costs(dense, found.layers, groups, dataset.feeds)
    order = [layer.name for layer in found.layers]
    producer_of = {p: g.name for g in groups for p in g.producers}
    current, refits, seconds = dense, [], {"scoring": 0.0, "slicing": 0.0, "refit": 0.0}
    for step in range(1, steps + 1):
        target = 1 - (1 - fraction) ** (step / steps) if step < steps else fraction
        start = time.perf_counter()
        now_groups = [g for g in find_units(current, inputs=selection).groups if g.name in original]
        layers_now = analyse_graph(current).by_name()
        stats = unit_statistics(current, now_groups, layers_now, dataset, out_name,
                                jacobians=method in JACOBIAN_METHODS, probes=probes, batch_size=batch_size,
                                seed=seed, provider=provider, threads=threads)
        scores = {g.name: score_group(method, stats[g.name], _producer_rows(current, layers_now, g),
                                      contiguous=g.selection == "Slice") for g in now_groups}
        for g in now_groups:
            scores[g.name].lanes = g.lanes
        counts = {name: len(kept_index[name]) for name in names}
        kept = choose_counts(scores, counts, original, costs, sparsity=target if sparsity is not None else None,
                             macs=target if macs is not None else None, scope=scope, multiple=multiple,
                             lanes={g.name: g.lanes for g in groups})
        seconds["scoring"] += time.perf_counter() - start
        start = time.perf_counter()
        removed = {name: scores[name].removal(counts[name] - kept[name]) for name in names}
        constants = {name: s.constants for name, s in scores.items() if s.constants is not None}
        current = remove_units(current, removed, constants, inputs=selection)
        kept_index = {name: np.delete(kept_index[name], removed[name]) for name in names}
        seconds["slicing"] += time.perf_counter() - start
        if refit:
            start = time.perf_counter()
            changed = {c.layer for g in groups if len(kept_index[g.name]) < original[g.name] for c in g.consumers}
            refits = [refit_layer(dense, current, name, kept_index.get(producer_of[name]) if name in producer_of
                                  else None, dataset, batch_size, provider, threads)
                      for name in order if name in changed]
            seconds["refit"] += time.perf_counter() - start
    validate(current, dataset)
    kept_inputs: dict[str, list[int]] = {}
    if inputs == "prune":
        current, kept_inputs = input_contract(current)
    final_counts = {name: len(kept_index[name]) for name in names}
    result = StructuredResult(
        model=current, method=method, scope=scope, target={"sparsity": sparsity, "macs": macs, "multiple": multiple},
        steps=steps, refit=refit, protected_output=out_name,
        layers=_layer_report(dense, current, found.layers, costs, original, final_counts),
        groups={name: {"units_before": original[name], "units_after": final_counts[name],
                       "removed": np.setdiff1d(np.arange(original[name]), kept_index[name]).tolist()} for name in names},
        rejected=units.rejected, macs_before=total_macs(costs, original), macs_after=total_macs(costs, final_counts),
        seconds=seconds, refits=refits, kept_inputs=kept_inputs)
    return result


def _producer_rows(model, layers, group) -> np.ndarray | None:
    """The rows of every producer of ``group`` side by side, (units, sum of their inputs; an attention
    head's D rows in one); None for inputs."""
    if not group.producers:
        return None
    return np.hstack([layers[p].to_rows(read_initializer(model, layers[p].weight)).reshape(group.units, -1)
                      for p in group.producers])


def _layer_report(dense, pruned, layers, costs, original, final) -> list:
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
