"""The Pruner: one loop for both strategies.

load -> prepare the analysis copy -> find -> for each step of the schedule: score -> select -> edit
-> repair -> validate -> restore the model's own form. What is found, scored, selected and edited is
the strategy's (``modes.weights``: zeros and bias shifts; ``modes.units``: whole units sliced away);
the data, the derivatives, the schedule, the repair and the checks are the same for both.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from onnxprune import runtime
from onnxprune.check.relative import compare_outputs, damage_warnings, emptied_layers
from onnxprune.check.timing import select_inputs
from onnxprune.check.validate import check_finite_weights, check_runs, few_samples, per_sample, validate
from onnxprune.derivatives.plan import MEMORY_BUDGET, DerivativeSettings, protected
from onnxprune.derivatives.workers import import_ray
from onnxprune.errors import InputError
from onnxprune.find.inventory import find_layers
from onnxprune.find.objective import measure_objective
from onnxprune.find.outputs import reaching
from onnxprune.io.data import as_dataset, declared_batch
from onnxprune.io.models import as_model
from onnxprune.modes.base import State
from onnxprune.modes.units import UnitsMode
from onnxprune.modes.weights import METHOD_NAMES as WEIGHT_METHODS
from onnxprune.modes.weights import PRESETS, WeightsMode, model_defaults
from onnxprune.prepare.analysis import (
    AnalysisCopy,
    BatchFirstInputs,
    FoldFixedInputs,
    FreeDeclaredBatch,
    declared_shapes_for,
)
from onnxprune.prepare.pads import explicit_pads_for
from onnxprune.repair.base import NONE, Compose, LayerRefit, Repair
from onnxprune.repair.lstsq import HOLDOUT_EVERY
from onnxprune.repair.refit import Refit
from onnxprune.score.context import ScoringContext
from onnxprune.score.units import METHODS as UNIT_METHODS
from onnxprune.select.masks import excluded, parse_pattern
from onnxprune.select.schedule import Schedule, geometric, one_shot, path

METHOD_NAMES = WEIGHT_METHODS
ERRORS_AT = ("output", "layer")
__all__ = ["METHOD_NAMES", "PRESETS", "UNIT_METHODS", "Pruner", "PruneResult"]


@dataclass(frozen=True)
class Choices:
    """What a run uses where the user may leave the choice to the model (``model_defaults``)."""

    scope: str = "global"
    refit: bool | None = None   # None: the method's preset says
    conv_statistics: str = "exact"
    probes: int | None = None   # None: exact up to EXACT_LIMIT outputs, then automatic
    error_at: str = "output"    # ECP's error at the protected output (G) or at each layer's own output (G = 1)


@dataclass
class PruneResult:
    """The pruned model and what was done to it: the same fields for both strategies, and the
    strategy's own summary (``summary``) and per-layer rows (``layers``)."""

    model: onnx.ModelProto
    mode: str                   # "weights" or "units"
    method: str
    scope: str
    target: float               # the fraction asked for (of the weights, the units or the MACs)
    protected_output: str
    layers: list                # weights: LayerChange per layer; units: LayerShrink per layer
    summary: dict               # the strategy's totals (see modes.weights / modes.units ``report``)
    skipped: list               # layers or groups left out, each with its reason
    excluded: list[str]
    repair: str = "none"
    steps: int = 1
    refits: list[LayerRefit] = field(default_factory=list)  # the last step's repair, layer by layer
    seconds: dict[str, float] = field(default_factory=dict)
    engine: dict | None = None  # the gradient engine that ran and why ({"name", "reason"})
    derivatives: dict = field(default_factory=dict)  # probes (None: exact), exact, automatic_probes, outputs, batch
    heldout_error: float | None = None  # a fallback's judge: E||y - y_dense||^2 on the held-out calibration fifth
    fell_back: bool = False             # the one-shot model was kept (its held-out error was the lower)
    kept_inputs: dict[str, list[int]] = field(default_factory=dict)  # units with --prune-inputs: the features to feed
    protected_outputs: list[str] = field(default_factory=list)  # every protected output (``protected_output``: the first)
    output_error: dict | None = None    # relative error per protected output and part on the calibration data (check.relative)
    warnings: list[str] = field(default_factory=list)  # damage: layers emptied, output parts that stopped varying or lost it
    defaults: dict | None = None  # the model's defaults (``modes.weights.model_defaults``) and which of them applied

    @property
    def sparsity(self) -> float:
        """The fraction reached: of the prunable weights, or of the units."""
        return float(self.summary["sparsity"])

    @property
    def pruned(self) -> int:
        return int(self.summary["pruned"] if self.mode == "weights" else
                   self.summary["units_before"] - self.summary["units_after"])

    @property
    def weights(self) -> int:
        return int(self.summary["weights"] if self.mode == "weights" else self.summary["units_before"])

    @property
    def score_sum(self) -> float | None:
        return self.summary.get("score_sum")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "method": self.method, "scope": self.scope, "target": self.target,
                "protected_output": self.protected_output, "steps": self.steps, "repair": self.repair,
                "refits": [asdict(r) for r in self.refits], "heldout_error": self.heldout_error,
                "fell_back": self.fell_back, "engine": self.engine, "derivatives": self.derivatives,
                "seconds": self.seconds, "skipped": [asdict(s) for s in self.skipped], "excluded": self.excluded,
                "kept_inputs": self.kept_inputs, "inputs_changed": bool(self.kept_inputs), "defaults": self.defaults,
                "protected_outputs": self.protected_outputs, "output_error": self.output_error, "warnings": self.warnings,
                self.mode: {**self.summary, "layers": [asdict(c) for c in self.layers]}}


class Pruner:
    """Score once, prune to any target: ``Pruner("ecp").fit(model, data).prune(0.8)``.

    Parameters are set in ``__init__``; ``fit`` prepares the analysis copy, finds what can be pruned
    and scores the dense model on the calibration data, leaving its state in attributes ending in
    ``_``; ``prune`` reuses them, so a sweep over targets scores once. ``structured`` chooses the
    units strategy (whole neurons, channels, heads: ``macs``, ``multiple``, ``inputs``) instead of the
    weights strategy (``compensation``). A ``schedule`` (``select.schedule``: ``one_shot``,
    ``geometric(S)``) gives the steps that reach the target, the current network re-scored at each;
    a ``repair`` (``repair.base``: ``NONE``, ``Compose``; ``repair.refit.Refit``) runs after every
    step. ``steps``, ``refit``, ``chained`` and ``g_weighted`` are the command line's spelling of the
    same. A method name may be a preset of scorer, schedule and repair: ``ecp-refit`` (weights) is
    ECP + geometric(5) + Refit + a label-free distillation; structured ``ecp`` runs in 5 steps with
    the refit. ``workers`` (local processes) or ``ray`` (a Ray cluster's address, or "auto") compute
    the statistics shard by shard (``derivatives.shards``): the same seed, the same model for any count.
    """

    def __init__(self, method: str = "ecp", *, structured: bool = False, macs: bool = False, multiple: int | None = None,
                 inputs: str = "keep", schedule: Schedule | None = None, repair: Repair | None = None,
                 compensation: bool = True, scope: str | None = None, exclude=(), seed: int = 0,
                 output: str | list[str] | None = None, probes: int | None = None, batch_size: int = 256,
                 labels_key: str | None = None, provider: str = "cpu", threads: int | None = None,
                 force: bool = False, steps: int | None = None, refit: bool | None = None, chained: bool = True,
                 g_weighted: bool = False, conv_statistics: str | None = None, engine: str = "auto",
                 memory_budget: int = MEMORY_BUDGET, progress: Callable[[str, int, int], None] | None = None,
                 output_axes: dict[str, int] | None = None, objective: str = "relative", pattern: str | None = None,
                 error_at: str | None = None, workers: int | None = None, ray: str | None = None):
        self.method, self.structured, self.macs, self.multiple, self.inputs = method, structured, macs, multiple, inputs
        self.compensation, self.scope, self.exclude = compensation, scope, tuple(exclude)
        self.seed, self.output, self.probes, self.batch_size = seed, output, probes, batch_size
        self.labels_key, self.provider, self.threads, self.force, self.progress = labels_key, provider, threads, force, progress
        self.schedule, self.repair = schedule, repair
        self.steps, self.refit, self.chained, self.g_weighted = steps, refit, chained, g_weighted
        self.conv_statistics, self.engine, self.memory_budget = conv_statistics, engine, memory_budget
        self.workers, self.ray = workers, ray  # the statistics on local worker processes or a Ray cluster
        self.output_axes, self.objective = dict(output_axes or {}), objective
        self.pattern = pattern  # "N:M": at most N nonzero weights in every M consecutive inputs (select.masks)
        # scope, refit and error_at left None take the model's defaults (``model_defaults``)
        self.error_at = error_at
        self.chosen_ = Choices(scope or "global", refit, conv_statistics or "exact", probes, error_at or "output")

    def _plan(self):
        """(strategy, scorer, schedule, repair, fallback): the method's preset, unless given."""
        if self.probes is not None and self.probes < 1:
            raise InputError(f"--probes must be a positive number, got {self.probes}")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers must be a positive number, got {self.workers}")
        if self.ray is not None:
            import_ray()  # a missing extra is said before any work
        if self.chosen_.error_at not in ERRORS_AT:
            raise InputError(f"error_at must be one of {', '.join(ERRORS_AT)}, got {self.chosen_.error_at!r}")
        if self.structured:
            if self.pattern:
                raise InputError("--pattern N:M masks single weights; it does not apply to --structured pruning")
            if not self.compensation:
                raise InputError("--no-compensation does not apply to --structured pruning (units are removed with "
                                 "their constants or without, as the method says)")
            mode = UnitsMode(self.chosen_.scope, self.macs, self.multiple, self.inputs, self.exclude, self.provider)
            if self.repair is not None and self.repair is not NONE and not isinstance(self.repair, Refit):
                raise InputError(f"repair {self.repair.name!r} does not apply to structured pruning; the refit does")
        else:
            if self.macs or self.multiple is not None or self.inputs != "keep":
                raise InputError("macs, multiple and inputs apply to structured pruning (structured=True)")
            mode = WeightsMode(self.chosen_.scope, self.compensation, self.exclude,
                               parse_pattern(self.pattern) if self.pattern else None)
        preset = mode.preset(self.method)
        schedule = self.schedule or (geometric(self.steps) if self.steps is not None else preset.schedule or one_shot)
        repair = self.repair
        if repair is None:
            refit = preset.refit if self.chosen_.refit is None else self.chosen_.refit
            repair = Refit(chained=self.chained, g_weighted=self.g_weighted) if refit else NONE
            if refit and preset.then is not None:
                repair = Compose((repair, preset.then))
        return mode, mode.make_scorer(preset.scorer), schedule, repair, preset.fallback

    def planned_steps(self, target: float) -> int:
        """How many steps reach ``target`` with this method and schedule (before any work)."""
        return len(self._plan()[2](target))

    def fit(self, model, data) -> Pruner:
        """Prepare ``model`` (a path or ModelProto, never modified), find what can be pruned and score
        it on ``data`` (a .npz path, a Dataset, or a dict of arrays keyed by input name)."""
        self.mode_, self.scorer_, self.schedule_, self.repair_, self.fallback_ = self._plan()
        source = as_model(model)
        # Constants read as initializers, shared initializers unshared; every node gets a name in this
        # copy, and what is found refers to it. ``prune`` gives the result the source's own form back.
        self.analysis_ = AnalysisCopy.of(source)
        self.model_ = self.analysis_.model
        self.full_data_ = as_dataset(data, self.model_, self.labels_key, require_labels=self.method == "gradmag")
        if self.full_data_.fixed:  # inputs without a batch axis: constants of the analysis copy
            self.analysis_.apply(FoldFixedInputs(self.full_data_.fixed))
        if self.full_data_.axes:  # the batch on another axis: batch-first in the analysis copy
            self.analysis_.apply(BatchFirstInputs(self.full_data_.axes))
        self.data_ = self.full_data_.per_sample()
        self.analysis_.apply(FreeDeclaredBatch(self.data_.subset(1).arrays(), self.provider))
        check_runs(self.model_, self.provider, few_samples(self.model_, self.data_))
        shapes = declared_shapes_for(self.model_, self.data_.subset(1).arrays(), self.provider)
        if shapes is not None:  # ranks shape inference cannot tell (dynamic H/W): measured on one sample
            self.analysis_.apply(shapes)
        pads = explicit_pads_for(self.model_, self.data_.subset(1).arrays(), self.provider)
        if pads is not None:  # auto_pad SAME pooling: the pads it means at the data's size, written out
            self.analysis_.apply(pads)
        found = find_layers(self.model_)
        self.all_layers_, self.skipped_ = found.layers, list(found.skipped)
        check_finite_weights(self.model_, self.all_layers_)
        # The outputs and their parts, each measured in its own scale (find.objective): the error the
        # statistics describe is relative per part, so no small-valued part is free to destroy.
        if self.objective not in ("relative", "absolute"):
            raise InputError(f"objective must be 'relative' or 'absolute', got {self.objective!r}")
        # a graph that holds its traced batch runs on exactly that many samples: every run takes them
        self.batch_size_ = declared_batch(self.model_, self.data_) or self.batch_size
        self.objective_ = measure_objective(self.model_, self.data_, self.output, self.output_axes, self.provider,
                                            self.threads, self.batch_size_)
        if self.objective == "absolute":  # the plain squared error of the outputs (what ECP minimised before)
            self.objective_ = self.objective_.absolute()
        self.outputs_ = list(self.objective_.outputs)
        self.output_ = self.outputs_[0]
        layers, unreached = reaching(self.model_, self.all_layers_, self.outputs_)
        self.layers_, folded = per_sample(self.model_, layers, self.data_, self.provider)
        self.skipped_ += unreached + folded
        if not self.layers_:
            raise InputError(f"no prunable layer reaches the protected output {self.output_!r}; choose one with --output")
        self.defaults_ = None if self.structured else model_defaults(self.layers_, self.exclude, self.method)
        if self.defaults_ is not None:  # what the model is chooses what the user left open
            sharded = "output" if self.workers or self.ray else None  # workers asked for: the output's statistics
            given = {"scope": self.scope, "refit": self.refit, "conv_statistics": self.conv_statistics,
                     "probes": self.probes, "error_at": self.error_at or sharded}
            self.defaults_["applied"] = {k: v for k, v in self.defaults_["values"].items() if given[k] is None}
            self.chosen_ = replace(self.chosen_, **self.defaults_["applied"])
            self.mode_, self.scorer_, self.schedule_, self.repair_, self.fallback_ = self._plan()
        self.skipped_ += self.mode_.find(self.model_, self.layers_, self.output_, self.all_layers_, self.data_)
        self.settings_ = DerivativeSettings(self.chosen_.probes, self.seed, self.engine, self.memory_budget,
                                            self.batch_size_, self.provider, self.threads, self.objective_,
                                            workers=self.workers, ray=self.ray)
        self.seconds_: dict[str, float] = {}
        self.dense_ = self.mode_.begin(self.model_, self.layers_)
        self.scores_ = self._score(self.dense_)
        return self

    def _score(self, state: State) -> dict:
        ctx = ScoringContext(model=state.model, layers=state.layers, data=self.data_, output=self.output_,
                             settings=self.settings_, groups=state.groups, conv_statistics=self.chosen_.conv_statistics,
                             error_at=self.chosen_.error_at,
                             force=self.force, progress=self.progress)
        start = time.perf_counter()
        scores = self.scorer_(ctx)
        used = ctx.derivatives
        if self.settings_.sharded and "shards" not in used:
            how = " with the error at each layer" if self.chosen_.error_at == "layer" else ""
            raise InputError(f"--workers and --ray spread the derivative statistics over workers, and method "
                             f"{self.method!r}{how} takes none; drop them")
        self.engine_ = used["engine"].as_json() if "engine" in used else {
            "name": None, "reason": f"method {self.method!r} needs no derivatives"}
        self.derivatives_ = {k: v for k, v in used.items() if k != "engine"}
        ctx.timings["scoring"] = time.perf_counter() - start
        for step, seconds in ctx.timings.items():
            self.seconds_[step] = self.seconds_.get(step, 0.0) + seconds
        return scores

    def prune(self, target: float) -> PruneResult:
        """The model pruned to ``target`` (a fraction of the weights, or of the units or MACs with the
        units strategy); it passed onnx.checker and ran on onnxruntime."""
        self.mode_.check(target)
        return self._run(self.schedule_(target), [target])[0]

    def prune_many(self, targets: list[float]) -> list[PruneResult]:
        """The model pruned to every target. One-shot, each from the dense model's scores; with a
        schedule of several steps, one run of it to the largest target with the others inserted as
        steps (``schedule.path``): the model at a target is that run's state after the step reaching it."""
        targets = sorted(targets)
        for target in targets:
            self.mode_.check(target)
        if len(self.schedule_(max(targets))) == 1:
            return [self.prune(t) for t in targets]
        return self._run(path(self.schedule_, targets), targets)

    def _run(self, targets: list[float], asked: list[float]) -> list[PruneResult]:
        """Prune in steps to ``targets``, repairing after each; a result at every one of ``asked``."""
        fitted_seconds = dict(self.seconds_)
        state, scores = self.dense_, self.scores_
        repairable, _ = self.mode_.to_repair(self.dense_)
        run = self.repair_.start(self.model_, repairable if self.mode_.masked else self.layers_, self.data_,
                                 self.output_, batch_size=self.batch_size_, provider=self.provider, threads=self.threads,
                                 progress=self._progress("refit"), masked=self.mode_.masked, objective=self.objective_)
        results: list[PruneResult] = []
        refits: list[LayerRefit] = []
        for step, target in enumerate(targets):
            if step:
                scores = self._score(state)
            start = time.perf_counter()
            selection = self.mode_.select(state, scores, target)
            state = self.mode_.edit(state, selection, scores)
            self.seconds_["edit"] = self.seconds_.get("edit", 0.0) + time.perf_counter() - start
            if self.repair_ is not NONE:
                start = time.perf_counter()
                layers, rows = self.mode_.to_repair(state)
                model, refits = run(state.model, layers, final=target in asked, rows=rows)
                state = self.mode_.repaired(state, model)
                self.seconds_["repair"] = self.seconds_.get("repair", 0.0) + time.perf_counter() - start
            if target in asked:
                result = self._result(state, scores, selection, target, step + 1, refits)
                if self.fallback_ and self.repair_ is not NONE:
                    result = self._fall_back(result)
                results.append(self._own_form(result))
        self.seconds_ = fitted_seconds  # prune() may be called again
        return results

    def _result(self, state: State, scores, selection, target: float, steps: int, refits) -> PruneResult:
        layers, summary = self.mode_.report(self.dense_, state, scores, selection, self.data_,
                                            repaired=steps > 1 or self.repair_ is not NONE)
        error, warnings = self._damage(state.model, layers)
        return PruneResult(
            model=state.model, mode=self.mode_.name, method=self.method, scope=self.chosen_.scope, target=target,
            protected_output=self.output_, layers=layers, summary=summary, skipped=self.skipped_,
            excluded=[layer.name for layer in state.layers if excluded(layer, self.exclude)],
            repair=self.repair_.name, steps=steps, refits=refits, seconds=dict(self.seconds_), engine=self.engine_,
            derivatives=self.derivatives_, protected_outputs=self.outputs_, output_error=error, warnings=warnings,
            defaults=self.defaults_)

    def _damage(self, model: onnx.ModelProto, layers: list) -> tuple[dict, list[str]]:
        """The relative error of every protected output and part on the calibration data, and a warning
        for every layer left without a weight and every part with values that stopped varying."""
        objective = self.objective_
        error = compare_outputs(model, self.model_, self.data_, list(objective.outputs), axes=objective.axes,
                                parts=list(objective.parts), provider=self.provider, threads=self.threads,
                                batch_size=self.batch_size_)
        return error, emptied_layers(layers) + damage_warnings(error)

    def _own_form(self, result: PruneResult) -> PruneResult:
        """``result`` with the source's own form back (Constants, shared tensors, fixed inputs; see
        prepare.analysis), as it is written (``finish``), checked again on every input."""
        model = onnx.ModelProto()
        model.CopyFrom(result.model)
        model, kept_inputs = self.mode_.finish(self.analysis_.restore(model))
        data = self.full_data_
        if kept_inputs:
            data = replace(data, feeds=select_inputs(data.feeds, kept_inputs))
        validate(model, data)
        return replace(result, model=model, kept_inputs=kept_inputs)

    def _fall_back(self, result: PruneResult) -> PruneResult:
        """The one-shot model at the same target (the dense scores' selection, edited once) when its
        error on the held-out fifth of the calibration data (unseen by the refits and the
        distillation) is below ``result``'s; else ``result``. Both errors are recorded."""
        held = self.data_.subset(len(self.data_))
        rows = np.flatnonzero(np.arange(len(held)) % HOLDOUT_EVERY == 0)
        feeds = {k: v[rows] for k, v in held.feeds.items()}

        def objective(model) -> np.ndarray:  # every protected output, relative per part (find.objective)
            target, name = protected(model, self.output_, self.objective_)
            (y,) = runtime.tensor_session(target, [name], self.provider, self.threads).run([name], feeds)
            return np.asarray(y, np.float64)

        def error(model):
            y = objective(model)
            return float(((y - dense) ** 2).reshape(len(y), -1).sum(1).mean())

        dense = objective(self.model_)
        selection = self.mode_.select(self.dense_, self.scores_, result.target)
        one_shot_state = self.mode_.edit(self.dense_, selection, self.scores_)
        result.heldout_error, one_shot_error = error(result.model), error(one_shot_state.model)
        if one_shot_error >= result.heldout_error:
            return result
        validate(one_shot_state.model, self.data_)
        layers, summary = self.mode_.report(self.dense_, one_shot_state, self.scores_, selection, self.data_,
                                            repaired=False)
        measured, warnings = self._damage(one_shot_state.model, layers)
        return replace(result, model=one_shot_state.model, layers=layers, summary=summary, refits=[], steps=1,
                       fell_back=True, heldout_error=one_shot_error, output_error=measured, warnings=warnings)

    def _progress(self, step: str):
        return (lambda done, total: self.progress(step, done, total)) if self.progress else None
