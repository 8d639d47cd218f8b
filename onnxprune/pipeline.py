"""The Pruner: prepare -> find -> for each step: score -> select -> edit -> repair -> validate -> restore."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from onnxprune import runtime
from onnxprune.check.validate import check_finite_weights, check_runs, few_samples, per_sample, validate
from onnxprune.derivatives.plan import MEMORY_BUDGET
from onnxprune.edit.rewrite import LayerChange, rewrite
from onnxprune.errors import InputError
from onnxprune.find.inspection import inspect  # noqa: F401 - part of the API (onnxprune.inspect, the CLI)
from onnxprune.find.inventory import find_layers
from onnxprune.find.layers import Layer, Skipped, analyse_graph, effective_weights
from onnxprune.find.outputs import protected_output, reaching
from onnxprune.io.data import as_dataset
from onnxprune.io.models import as_model
from onnxprune.prepare.analysis import AnalysisCopy, BatchFirstInputs, FoldFixedInputs, declared_shapes_for
from onnxprune.repair.base import NONE, Compose, LayerRefit, Repair, current_bias
from onnxprune.repair.distill import Distill
from onnxprune.repair.lstsq import HOLDOUT_EVERY
from onnxprune.repair.refit import Refit
from onnxprune.score.weights import METHODS, Saliency, ScoringContext, make_scorer
from onnxprune.select.masks import choose_masks, excluded
from onnxprune.select.schedule import Schedule, geometric, one_shot, path


@dataclass
class PruneResult:
    """The pruned model and what was done to it."""

    model: onnx.ModelProto
    method: str
    compensation: bool
    scope: str
    target_sparsity: float
    protected_output: str
    changes: list[LayerChange]
    skipped: list[Skipped]
    excluded: list[str]
    score_sum: float            # sum over the pruned weights of each one's own score (no cross terms; see README)
    seconds: dict[str, float] = field(default_factory=dict)
    steps: int = 1
    refit: list[LayerRefit] = field(default_factory=list)  # the last step's refit, when one was done
    heldout_error: float | None = None  # a fallback's judge: E||y - y_dense||^2 on the held-out calibration fifth
    fell_back: bool = False             # the one-shot model was kept (its held-out error was the lower)
    engine: dict | None = None  # the gradient engine that ran and why ({"name", "reason"}), see onnxprune.derivatives.engines
    derivatives: dict = field(default_factory=dict)  # probes (None: exact), exact, automatic_probes, outputs, batch

    @property
    def weights(self) -> int:
        return sum(c.weights for c in self.changes)

    @property
    def pruned(self) -> int:
        return sum(c.pruned for c in self.changes)

    @property
    def sparsity(self) -> float:
        return self.pruned / self.weights if self.weights else 0.0

    def to_dict(self) -> dict:
        return {
            "method": self.method, "compensation": self.compensation, "scope": self.scope,
            "target_sparsity": self.target_sparsity, "sparsity": self.sparsity,
            "weights": self.weights, "pruned": self.pruned, "protected_output": self.protected_output,
            "score_sum": self.score_sum, "seconds": self.seconds,
            "steps": self.steps, "refit": [asdict(r) for r in self.refit],
            "heldout_error": self.heldout_error, "fell_back": self.fell_back,
            "engine": self.engine, "derivatives": self.derivatives,
            "layers": [asdict(c) for c in self.changes], "excluded": self.excluded,
            "skipped": [asdict(s) for s in self.skipped],
        }


@dataclass(frozen=True)
class Preset:
    """A method name for a scorer, a schedule and a repair; with ``fallback`` the one-shot model
    is kept instead when its held-out calibration error is the lower (``Pruner.prune``)."""

    scorer: str
    schedule: Schedule = one_shot
    refit: bool = False
    then: Repair | None = None   # a repair that follows the refit
    fallback: bool = False


PRESETS = {
    "ecp-refit": Preset("ecp", geometric(5), refit=True, then=Distill(epochs=40, lr=1e-2, batch=256, patience=8),
                        fallback=True),
}


METHOD_NAMES = (*METHODS, *PRESETS)


class Pruner:
    """Score once, prune to any sparsity: ``Pruner(method="ecp").fit(model, data).prune(0.8)``.

    Parameters are set in ``__init__``; ``fit`` computes the saliencies of the dense model on the
    calibration data and leaves its state in attributes ending in ``_``; ``prune`` reuses them, so a
    sweep over ratios scores once. A ``schedule`` (``onnxprune.select.schedule``: ``one_shot``,
    ``geometric(S)``) gives the steps that reach the target, the current network re-scored at each;
    a ``repair`` (``onnxprune.repair.base``: ``NONE``, ``Compose``; ``refit.Refit(chained, g_weighted)``) is applied after
    every step. ``steps``, ``refit``, ``chained`` and ``g_weighted`` are the CLI's spelling of the
    same: geometric(steps), and a Refit (G-weighted on the last step with ``g_weighted``) when
    ``refit``. Method ``ecp-refit`` is the preset ECP + geometric(5) + Refit(chained) followed, at
    the final step, by a label-free distillation (``distill.Distill``).
    """

    def __init__(self, method: str = "ecp", *, schedule: Schedule | None = None, repair: Repair | None = None,
                 compensation: bool = True, scope: str = "global", exclude=(),
                 seed: int = 0, output: str | None = None, probes: int | None = None, batch_size: int = 256,
                 labels_key: str | None = None, provider: str = "cpu", threads: int | None = None,
                 force: bool = False, steps: int | None = None, refit: bool | None = None, chained: bool = True,
                 g_weighted: bool = False, conv_statistics: str = "exact", engine: str = "auto",
                 memory_budget: int = MEMORY_BUDGET, progress: Callable[[str, int, int], None] | None = None):
        self.method, self.compensation, self.scope, self.exclude = method, compensation, scope, tuple(exclude)
        self.seed, self.output, self.probes, self.batch_size = seed, output, probes, batch_size
        self.labels_key, self.provider, self.threads, self.force, self.progress = labels_key, provider, threads, force, progress
        self.schedule, self.repair = schedule, repair
        self.steps, self.refit, self.chained, self.g_weighted = steps, refit, chained, g_weighted
        self.conv_statistics, self.engine, self.memory_budget = conv_statistics, engine, memory_budget

    def _plan(self) -> tuple[str, Schedule, Repair]:
        """(scorer name, schedule, repair): the preset's, unless given."""
        if self.method not in METHOD_NAMES:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHOD_NAMES)}")
        preset = PRESETS.get(self.method, Preset(self.method))
        scorer, schedule, refit, then = preset.scorer, preset.schedule, preset.refit, preset.then
        self.fallback_ = preset.fallback
        if self.schedule is not None:
            schedule = self.schedule
        elif self.steps is not None:
            schedule = geometric(self.steps)
        repair: Repair | None = self.repair
        if repair is None:
            refit = refit if self.refit is None else self.refit
            repair = Refit(chained=self.chained, g_weighted=self.g_weighted) if refit else NONE
            if refit and then is not None:
                repair = Compose((repair, then))
        return scorer, schedule, repair

    def fit(self, model, data) -> Pruner:
        """Find the layers of ``model`` (a path or ModelProto, never modified) and score their weights
        on ``data`` (a .npz path, a Dataset, or a dict of arrays keyed by input name)."""
        method, self.schedule_, self.repair_ = self._plan()
        self.scorer_ = make_scorer(method)
        if self.probes is not None and self.probes < 1:
            raise InputError(f"--probes must be a positive number, got {self.probes}")
        source = as_model(model)
        # Constants read as initializers, shared initializers unshared; every node gets a name in this
        # copy, and masks refer to it. ``prune`` gives the result the source's own form back.
        self.analysis_ = AnalysisCopy.of(source)
        self.model_ = self.analysis_.model
        self.full_data_ = as_dataset(data, self.model_, self.labels_key, require_labels=method == "gradmag")
        if self.full_data_.fixed:  # inputs without a batch axis: constants of the analysis copy
            self.analysis_.apply(FoldFixedInputs(self.full_data_.fixed))
        if self.full_data_.axes:  # the batch on another axis: batch-first in the analysis copy
            self.analysis_.apply(BatchFirstInputs(self.full_data_.axes))
        self.data_ = self.full_data_.per_sample()
        check_runs(self.model_, self.provider, few_samples(self.model_, self.data_))
        shapes = declared_shapes_for(self.model_, self.data_.subset(1).arrays(), self.provider)
        if shapes is not None:  # ranks shape inference cannot tell (dynamic H/W): measured on one sample
            self.analysis_.apply(shapes)
        found = find_layers(self.model_)
        self.layers_, self.skipped_ = found.layers, found.skipped
        check_finite_weights(self.model_, self.layers_)
        self.output_ = protected_output(self.model_, self.output)
        self.layers_, unreached = reaching(self.model_, self.layers_, self.output_)
        self.layers_, folded = per_sample(self.model_, self.layers_, self.data_, self.provider)
        self.skipped_ = self.skipped_ + unreached + folded
        if not self.layers_:
            raise InputError(f"no prunable layer reaches the protected output {self.output_!r}; choose one with --output")
        self.seconds_: dict[str, float] = {}
        self.saliencies_ = self._score(self.model_, self.layers_)
        return self

    def _score(self, model: onnx.ModelProto, layers: list[Layer]) -> dict[str, Saliency]:
        ctx = ScoringContext(
            model=model, layers=layers, weights=effective_weights(model, layers), data=self.data_,
            output=self.output_, seed=self.seed, probes=self.probes, batch_size=self.batch_size,
            provider=self.provider, threads=self.threads, force=self.force, progress=self.progress,
            conv_statistics=self.conv_statistics, engine=self.engine, memory_budget=self.memory_budget)
        start = time.perf_counter()
        saliencies = self.scorer_(ctx)
        used = ctx.derivatives
        self.engine_ = used["engine"].as_json() if "engine" in used else {
            "name": None, "reason": f"method {self.method!r} needs no derivatives"}
        self.derivatives_ = {k: v for k, v in used.items() if k != "engine"}
        ctx.timings["scoring"] = time.perf_counter() - start
        for step, seconds in ctx.timings.items():
            self.seconds_[step] = self.seconds_.get(step, 0.0) + seconds
        return saliencies

    def prune(self, sparsity: float) -> PruneResult:
        """The model pruned to ``sparsity``; it passed onnx.checker and ran on onnxruntime."""
        return self._run(self.schedule_(sparsity), [sparsity])[0]

    def prune_many(self, ratios: list[float]) -> list[PruneResult]:
        """The model pruned to every ratio. One-shot, each ratio is pruned from the dense model's
        scores; with a schedule of several steps, one run of it to the largest ratio with the others
        inserted as steps (``schedule.path``) gives every ratio: the model at a ratio is that run's
        state after the step reaching it (its repair then counts as the final one)."""
        ratios = sorted(ratios)
        if len(self.schedule_(max(ratios))) == 1:
            return [self.prune(r) for r in ratios]
        return self._run(path(self.schedule_, ratios), ratios)

    def _run(self, targets: list[float], ratios: list[float]) -> list[PruneResult]:
        """Prune in steps to ``targets``, repairing after each; a result at every one of ``ratios``."""
        fitted_seconds = dict(self.seconds_)
        current, layers, saliencies = self.model_, self.layers_, self.saliencies_
        repaired = [layer.name for layer in layers if not excluded(layer, self.exclude)]
        pruned_before = {layer.name: np.zeros((layer.out_features, layer.in_features), bool) for layer in layers}
        run = self.repair_.start(self.model_, [layer for layer in layers if layer.name in repaired], self.data_,
                                 self.output_, batch_size=self.batch_size, provider=self.provider,
                                 threads=self.threads, progress=self._progress("refit"))
        results: list[PruneResult] = []
        refits: list[LayerRefit] = []
        for step, target in enumerate(targets):
            if step:
                saliencies = self._score(current, layers)
            scores = {name: s.scores for name, s in saliencies.items()}
            masks = choose_masks(layers, _keep_pruned(scores, pruned_before), target, self.scope, self.exclude)
            shifts = _shifts(saliencies) if self.compensation else None
            current, changes = rewrite(current, layers, masks, shifts)
            layers = _fresh(current, layers)
            if self.repair_ is not NONE:
                start = time.perf_counter()
                current, refits = run(current, [layer for layer in layers if layer.name in repaired],
                                      final=target in ratios)
                self.seconds_["repair"] = self.seconds_.get("repair", 0.0) + time.perf_counter() - start
                layers = _fresh(current, layers)
            pruned_before = masks
            if target in ratios:
                result = self._result(current, layers, changes, masks, scores, shifts, target, step + 1, refits)
                result = self._fall_back(result) if self.fallback_ and self.repair_ is not NONE else result
                results.append(self._own_form(result))
        self.seconds_ = fitted_seconds  # prune() may be called again
        return results

    def _own_form(self, result: PruneResult) -> PruneResult:
        """``result`` with the source's own form back (Constants, shared tensors, fixed inputs; see
        onnxprune.prepare.analysis), checked again on every input."""
        model = self.analysis_.restore(_copy(result.model))
        validate(model, self.full_data_)
        return replace(result, model=model)

    def _result(self, current, layers, changes, masks, scores, shifts, sparsity, steps, refits) -> PruneResult:
        if steps > 1 or self.repair_ is not NONE:  # report the bias change against the dense model, not the last step
            feeds = self.data_.subset(8).feeds
            changes = [replace(c, max_bias_shift=_bias_change(self.model_, current, before, after, feeds))
                       for c, before, after in zip(changes, self.layers_, layers)]
        validate(current, self.data_)
        return PruneResult(
            model=current, method=self.method, compensation=shifts is not None, scope=self.scope,
            target_sparsity=sparsity, protected_output=self.output_, changes=changes, skipped=self.skipped_,
            excluded=[layer.name for layer in layers if excluded(layer, self.exclude)],
            score_sum=float(sum(scores[name][m].sum() for name, m in masks.items())),
            seconds=dict(self.seconds_), steps=steps, refit=refits, engine=self.engine_,
            derivatives=self.derivatives_)

    def _fall_back(self, result: PruneResult) -> PruneResult:
        """The one-shot model at the same sparsity (the dense scores' mask and compensation) when its
        error on the held-out fifth of the calibration data (unseen by the refits and the
        distillation) is below ``result``'s; else ``result``. Both errors are recorded."""
        held = self.data_.subset(len(self.data_))
        rows = np.flatnonzero(np.arange(len(held)) % HOLDOUT_EVERY == 0)
        feeds = {k: v[rows] for k, v in held.feeds.items()}

        def error(model):
            (y,) = runtime.tensor_session(model, [self.output_], self.provider, self.threads).run([self.output_], feeds)
            return float(((np.asarray(y, np.float64) - dense) ** 2).reshape(len(y), -1).sum(1).mean())

        (dense,) = runtime.tensor_session(self.model_, [self.output_], self.provider, self.threads).run([self.output_], feeds)
        dense = np.asarray(dense, np.float64)
        scores = {name: s.scores for name, s in self.saliencies_.items()}
        masks = choose_masks(self.layers_, scores, result.target_sparsity, self.scope, self.exclude)
        shifts = _shifts(self.saliencies_) if self.compensation else None
        one_shot_model, changes = rewrite(self.model_, self.layers_, masks, shifts)
        result.heldout_error, one_shot_error = error(result.model), error(one_shot_model)
        if one_shot_error >= result.heldout_error:
            return result
        validate(one_shot_model, self.data_)
        return replace(result, model=one_shot_model, changes=changes, refit=[], steps=1, fell_back=True,
                       heldout_error=one_shot_error,
                       score_sum=float(sum(scores[name][m].sum() for name, m in masks.items())))

    def _progress(self, step: str):
        return (lambda done, total: self.progress(step, done, total)) if self.progress else None


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _keep_pruned(scores: dict[str, np.ndarray], pruned: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scores where already-pruned weights rank below every other, so they stay pruned."""
    if not any(m.any() for m in pruned.values()):
        return scores
    floor = min(float(s.min()) for s in scores.values()) - 1.0
    return {name: np.where(pruned[name], floor, s) for name, s in scores.items()}


def _bias_change(original: onnx.ModelProto, final: onnx.ModelProto, before: Layer, after: Layer, feeds) -> float:
    """Largest |change| of a layer's stored bias between two versions of the model."""
    old, new = current_bias(original, before, feeds), current_bias(final, after, feeds)
    return float(np.max(np.abs(after.bias_shift_to_stored(new - old))))


def _fresh(model: onnx.ModelProto, layers: list[Layer]) -> list[Layer]:
    """The same layers re-read from ``model`` (a rewrite may have inserted biases)."""
    found = analyse_graph(model).by_name()
    return [found[layer.name] for layer in layers]


def _shifts(saliencies: dict[str, Saliency]) -> dict[str, np.ndarray] | None:
    shifts = {name: s.shifts for name, s in saliencies.items() if s.shifts is not None}
    return shifts if len(shifts) == len(saliencies) else None
