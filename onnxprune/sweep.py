"""The dry run: how the output error and the loss grow with sparsity, before anything is written.

``sensitivity`` scores once (``Pruner.fit``, either strategy) and prunes to every ratio of a list
(``Pruner.prune_many``, which checks each result on onnxruntime): one-shot, every ratio from the
dense scores; with a schedule of several steps, one run of it through every ratio. For each ratio
it reports the score sum (the pruned weights' own scores added up: for ECP, each weight's
first-order E||Δy||² when removed alone, so cross terms between pruned weights are missing; a
ranking aid, not the error of the pruned model) and, with evaluation data, the measured output
error, the loss and the accuracy. With a loss budget (``max_loss_increase``, relative to the dense model's loss on the
same data) it names the largest ratio that keeps the loss within it, which is what a deployment
pipeline wants to know. With the units strategy every point also has the MACs removed and the
paired time of the pruned model against the dense one (batch TIME_BATCH, one thread): accuracy and
time against MACs.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from onnxprune.check.evaluate import evaluate_dataset
from onnxprune.check.relative import compare_outputs
from onnxprune.check.timing import measure_latency, select_inputs
from onnxprune.errors import InputError, OnnxPruneError
from onnxprune.io.data import as_dataset
from onnxprune.io.models import as_model
from onnxprune.pipeline import Pruner

if TYPE_CHECKING:
    from onnxprune.pipeline import PruneResult

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
STRUCTURED_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TIME_BATCH = 256


@dataclass
class SensitivityPoint:
    ratio: float                       # the target sparsity
    sparsity: float                    # the sparsity reached (exact counts round)
    pruned: int
    score_sum: float | None            # sum of the pruned weights' own scores (no cross terms); None for units
    output_error: float | None = None  # relative output error on the evaluation data (the worst part; check.relative)
    loss: float | None = None
    accuracy: float | None = None
    loss_increase: float | None = None  # (loss - dense loss) / dense loss
    within_budget: bool | None = None
    macs_removed: float | None = None   # units: the fraction of the dense MACs removed
    time_ratio: float | None = None     # units: paired time of the pruned model / the dense one (median)
    calibration_error: float | None = None  # relative output error on the calibration data (the worst part)
    output_parts: list = field(default_factory=list)  # per output and part, on the evaluation data (else calibration)
    warnings: list[str] = field(default_factory=list)  # the prune's damage warnings (layers emptied, outputs still)


@dataclass
class SensitivityReport:
    method: str
    weights: int                            # what the ratios are fractions of: prunable weights, or units
    protected_output: str
    points: list[SensitivityPoint]
    dense: dict | None = None               # loss / accuracy of the unpruned model on the evaluation data
    max_loss_increase: float | None = None  # the budget, relative
    best_ratio: float | None = None         # the largest ratio within budget (every smaller one too)
    seconds: dict[str, float] = field(default_factory=dict)
    max_accuracy_drop: float | None = None  # the accuracy budget, in percentage points
    best_result: PruneResult | None = field(default=None, repr=False)  # with keep_best: the model at best_ratio
    engine: dict | None = None              # the gradient engine that scored, and why
    derivatives: dict = field(default_factory=dict)  # probes, exact, batch (see PruneResult)
    mode: str = "weights"
    max_output_error: float | None = None   # the budget on the relative output error
    error_data: str = "calibration"         # where the relative output errors were measured: "test" or "calibration"
    protected_outputs: list[str] = field(default_factory=list)

    @property
    def budget_text(self) -> str:
        """The budget in words ('' when there is none)."""
        parts = ([f"the loss within +{100 * self.max_loss_increase:g}%"] if self.max_loss_increase is not None else []) + (
            [f"the accuracy within {self.max_accuracy_drop:g} points"] if self.max_accuracy_drop is not None else []) + (
            [f"the relative output error within {100 * self.max_output_error:g}% (on the {self.error_data} data)"]
            if self.max_output_error is not None else [])
        return " and ".join(parts)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "method": self.method, "weights": self.weights, "protected_output": self.protected_output,
                "dense": self.dense, "max_loss_increase": self.max_loss_increase,
                "max_accuracy_drop": self.max_accuracy_drop, "max_output_error": self.max_output_error,
                "error_data": self.error_data, "protected_outputs": self.protected_outputs, "best_ratio": self.best_ratio,
                "points": [asdict(p) for p in self.points], "seconds": self.seconds, "engine": self.engine,
                "derivatives": self.derivatives}


def parse_ratios(text: str | list | tuple) -> list[float]:
    """'0.1,0.2,0.5' (or a list) -> sorted unique ratios, each in [0, 1]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        ratios = sorted({float(str(item).strip()) for item in items if str(item).strip()})
    except ValueError:
        raise InputError(f"ratios must be numbers separated by commas, got {text!r}") from None
    if not ratios:
        raise InputError("give at least one ratio")
    bad = [r for r in ratios if not 0.0 <= r <= 1.0 or not np.isfinite(r)]
    if bad:
        raise InputError(f"ratios must lie between 0 and 1, got {bad[0]}")
    return ratios


def parse_budget(text: str | float, option: str = "--max-loss-increase") -> float:
    """A relative budget: '1%' or '0.01' -> 0.01."""
    raw = str(text).strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)", raw)
    if not match:
        raise InputError(f"{option} must be a fraction (0.01) or a percentage (1%), got {text!r}")
    value = float(match.group(1)) / (100.0 if match.group(2) else 1.0)
    if not np.isfinite(value):
        raise InputError(f"{option} must be finite, got {text!r}")
    return value


def sensitivity(model, data, ratios=DEFAULT_RATIOS, *, method: str = "ecp", evaluate=None,
                max_loss_increase: float | str | None = None, labels_key: str | None = None,
                output: str | None = None, provider: str = "cpu", threads: int | None = None,
                batch_size: int = 256, progress: Callable[[str, int, int], None] | None = None,
                max_accuracy_drop: float | None = None, keep_best: bool = False,
                max_output_error: float | str | None = None, **params) -> SensitivityReport:
    """The loss-vs-sparsity curve of ``model`` pruned with ``method`` (scored once on ``data``).

    ``evaluate``: data (a .npz path, dict or Dataset; labels for the loss) on which every pruned
    model is measured against the dense one. ``max_loss_increase`` (0.01 or "1%"): the budget
    relative to the dense loss on that data; the report's ``best_ratio`` is the largest ratio that
    keeps the loss within it, every smaller ratio included (None when even the smallest does not).
    ``max_accuracy_drop`` (percentage points) bounds the accuracy the same way, alone or with the
    loss budget; ``max_output_error`` (0.05 or "5%") the relative output error of every protected
    output and part (``check.relative``), on ``evaluate`` or else on the calibration data: a budget
    without labels. With ``keep_best`` the report's ``best_result`` is the PruneResult at ``best_ratio``
    (what ``prune --max-loss-increase`` writes, without scoring again).
    ``params`` are Pruner's (compensation, scope, exclude, seed, probes, ...). Nothing is written.
    """
    ratios = parse_ratios(ratios)
    budget = None if max_loss_increase is None else parse_budget(max_loss_increase)
    error_budget = None if max_output_error is None else parse_budget(max_output_error, "--max-output-error")
    budgeted = budget is not None or max_accuracy_drop is not None or error_budget is not None
    if budget is not None and evaluate is None:
        raise InputError("--max-loss-increase needs evaluation data with labels (--test TEST.npz)")
    if max_accuracy_drop is not None and (evaluate is None or not 0 <= max_accuracy_drop <= 100):
        raise InputError("--max-accuracy-drop needs evaluation data with labels (--test TEST.npz) and 0..100 points")
    source = as_model(model)
    scored = output[0] if isinstance(output, (list, tuple)) else output  # the loss and accuracy: of the first
    test = None
    if evaluate is not None:
        test = as_dataset(evaluate, source, labels_key, require_labels=budget is not None or max_accuracy_drop is not None)
    start = time.perf_counter()
    pruner = Pruner(method, labels_key=labels_key, output=output, provider=provider, threads=threads,
                    batch_size=batch_size, progress=progress, **params).fit(source, data)
    seconds = dict(pruner.seconds_)
    seconds["fit"] = time.perf_counter() - start
    dense = None
    if test is not None:
        dense = _metrics(evaluate_dataset(source, test, output=scored, provider=provider, threads=threads,
                                          latency=False))
        if budget is not None and dense.get("loss") is None:
            raise InputError("--max-loss-increase needs a loss: the evaluation data has no labels")
    points, best_result, all_within = [], None, True
    start = time.perf_counter()
    for done, (ratio, result) in enumerate(zip(ratios, pruner.prune_many(ratios)), start=1):
        point = SensitivityPoint(ratio=ratio, sparsity=result.sparsity, pruned=result.pruned,
                                 score_sum=result.score_sum)
        seen = test if test is not None else pruner.full_data_
        if result.mode == "units":
            point.macs_removed = 1 - result.summary["macs_after"] / result.summary["macs_before"]
            timing = measure_latency({"dense": source, "pruned": result.model}, seen, (TIME_BATCH,), provider=provider,
                                     threads=(1,), kept_inputs={"pruned": result.kept_inputs})
            point.time_ratio = timing["batches"][0]["ratio"]["median"]
        assert result.output_error is not None  # every prune measures it on the calibration data
        point.calibration_error = result.output_error["relative_error"]
        point.output_parts, point.warnings = result.output_error["parts"], result.warnings
        if test is not None:
            assert dense is not None  # measured with the test data above
            fed = replace(test, feeds=select_inputs(test.feeds, result.kept_inputs))
            measured = _metrics(evaluate_dataset(result.model, fed, output=scored, provider=provider,
                                                 threads=threads, latency=False))
            compared = compare_outputs(result.model, source, test, pruner.outputs_, axes=pruner.objective_.axes,
                                       parts=list(pruner.objective_.parts), provider=provider, threads=threads,
                                       batch_size=batch_size, kept_inputs=result.kept_inputs)
            point.output_error, point.output_parts = compared["relative_error"], compared["parts"]
            point.loss, point.accuracy = measured.get("loss"), measured.get("accuracy")
            if point.loss is not None and dense.get("loss"):
                point.loss_increase = (point.loss - dense["loss"]) / abs(dense["loss"])
        if budgeted:
            point.within_budget = _within(point, dense, budget, max_accuracy_drop, error_budget)
            all_within = all_within and point.within_budget
            if keep_best and all_within:
                best_result = result
        points.append(point)
        if progress:
            progress("ratios", done, len(ratios))
    seconds["prune and evaluate"] = time.perf_counter() - start
    best = None
    if budgeted:
        for point in points:
            if not point.within_budget:
                break
            best = point.ratio
    weights = sum(layer.size for layer in pruner.layers_) if pruner.mode_.name == "weights" else sum(
        pruner.mode_.original.values())
    return SensitivityReport(mode=pruner.mode_.name, method=method, weights=weights, protected_output=pruner.output_,
                             points=points,
                             dense=dense, max_loss_increase=budget, best_ratio=best, seconds=seconds,
                             max_accuracy_drop=max_accuracy_drop, best_result=best_result if best is not None else None,
                             engine=pruner.engine_, derivatives=pruner.derivatives_, max_output_error=error_budget,
                             error_data="test" if test is not None else "calibration", protected_outputs=pruner.outputs_)


def _within(point: SensitivityPoint, dense: dict | None, loss_budget: float | None, accuracy_drop: float | None,
            error_budget: float | None) -> bool:
    """Whether ``point`` keeps every budget given: the loss and the accuracy against dense on the test
    data, the relative output error (on the test data, else on the calibration data)."""
    kept = True
    if loss_budget is not None:
        assert dense is not None and point.loss is not None
        kept = point.loss <= dense["loss"] + loss_budget * abs(dense["loss"])
    if accuracy_drop is not None:
        assert dense is not None and point.accuracy is not None
        kept = kept and point.accuracy >= dense["accuracy"] - accuracy_drop / 100 - 1e-12
    if error_budget is not None:
        error = point.output_error if point.output_error is not None else point.calibration_error
        kept = kept and error is not None and error <= error_budget
    return bool(kept)


def _metrics(report: dict) -> dict:
    return {k: report[k] for k in ("samples", "output", "output_kind", "loss", "accuracy") if k in report}


def check_plotting() -> None:
    """A clear error when matplotlib (the ``plot`` extra) is missing, before any work is done."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OnnxPruneError("--plot needs matplotlib: pip install 'onnxprune[plot]'") from None


def plot(report: SensitivityReport, path: str | Path) -> None:
    """Draw the dry run's curve as a PNG (atomically): the measured loss against the sparsity
    reached when there is one (the budget as a line, the best ratio marked), else the score sum on
    a log scale."""
    check_plotting()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from onnxprune.io.files import write_with

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    units = report.mode == "units"
    x = [100 * (p.macs_removed if units and p.macs_removed is not None else p.sparsity) for p in report.points]
    if report.dense is not None and report.dense.get("loss") is not None:
        measured = [float("nan") if p.loss is None else p.loss for p in report.points]  # dense has a loss: so do the points
        ax.plot(x, measured, "o-", color="C0", label=report.method)
        ax.axhline(report.dense["loss"], color="0.5", lw=1, ls=":", label="dense")
        if report.max_loss_increase is not None:
            limit = report.dense["loss"] * (1 + report.max_loss_increase)
            ax.axhline(limit, color="C3", lw=1, ls="--", label=f"budget +{100 * report.max_loss_increase:g}%")
        if report.best_ratio is not None:
            best = next(p for p in report.points if p.ratio == report.best_ratio)
            ax.plot([100 * best.sparsity], [measured[report.points.index(best)]], "*", ms=14, color="C3",
                    label=f"largest within budget: {100 * best.sparsity:.1f}%")
        losses = [*measured, report.dense["loss"]]
        if min(losses) > 0 and max(losses) / min(losses) > 10:
            ax.set_yscale("log")  # the budget region stays visible next to a collapse
        ax.set_ylabel("loss on the evaluation data")
    else:
        ax.semilogy(x, [max(p.score_sum or 0.0, 1e-30) for p in report.points], "o-", color="C0",
                    label=f"{report.method}: score sum")
        ax.set_ylabel("score sum (pruned weights' own scores)")
    ax.set_xlabel("MACs removed (%)" if units else "weights removed (%)")
    ax.set_title(f"{report.weights:,} prunable {'units' if units else 'weights'}, output {report.protected_output}")
    if units:  # the speed on a second axis: what structured pruning is for
        twin = ax.twinx()
        times = [float("nan") if p.time_ratio is None else p.time_ratio for p in report.points]
        twin.plot(x, times, "s--", color="C2", label=f"time / dense (batch {TIME_BATCH}, 1 thread)")
        twin.axhline(1.0, color="C2", lw=0.8, ls=":")
        twin.set_ylabel("time of the pruned model / dense")
        twin.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
