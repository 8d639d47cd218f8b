"""The relative output error, one definition everywhere: how much of a reference output's variation a model loses.

    relative_error(y, y_ref) = mean((y - y_ref)^2) / mean((y_ref - mean y_ref)^2)

with the inner mean over samples (each element's own mean) and the outer means over samples and
elements. 0 is the reference itself; 1 is what a model that outputs each element's calibration
mean would get; it compares across models and outputs of any scale. It is reported per output and
per Concat part of an output (a detector's boxes and class scores), and the worst of those is the
model's (``--max-output-error`` bounds it). ``prune --test``, ``evaluate --reference``, the dry run
and the warnings of every prune (measured on the calibration data) read it from here.
"""
from __future__ import annotations

import numpy as np
import onnx

from onnxprune import runtime
from onnxprune.check.timing import select_inputs
from onnxprune.find.objective import (
    ElementMoments,
    OutputPart,
    batch_first,
    find_parts,
    free_runs,
    output_batch_axes,
    part_sources,
    row_chunks,
)
from onnxprune.find.outputs import protected_outputs
from onnxprune.io.data import Dataset, declared_batch

STILL = 1e-6  # an element whose variance falls below this fraction of its reference variance stopped varying


def relative_error(y: np.ndarray, y_ref: np.ndarray) -> float | None:
    """mean((y - y_ref)^2) / mean((y_ref - mean y_ref)^2), samples on axis 0 (None when y_ref does not vary)."""
    y, y_ref = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
    spread = float(np.mean((y_ref - y_ref.mean(0)) ** 2))
    return float(np.mean((y - y_ref) ** 2)) / spread if spread > 0 else None


class _OutputSums:
    """Streamed per-element sums of one output over the samples: the squared difference to the
    reference, and the moments of both."""

    def __init__(self):
        self.squared: np.ndarray | None = None
        self.model, self.reference = ElementMoments(), ElementMoments()

    def add(self, y: np.ndarray, y_ref: np.ndarray) -> None:
        for rows in row_chunks(y):
            d = np.asarray(y[rows], np.float64) - np.asarray(y_ref[rows], np.float64)
            self.squared = (d * d).sum(0) + (0.0 if self.squared is None else self.squared)
        self.model.add(y)
        self.reference.add(y_ref)


def part_rows(parts: list[OutputPart], sums: dict[str, _OutputSums]) -> list[dict]:
    """Per part: the relative error, the mean squared error, the reference's spread, and how many of its
    elements varied in the reference but no longer vary in the model."""
    rows = []
    for part in parts:
        s = sums[part.output]
        assert s.squared is not None
        n = s.reference.n
        squared, reference_var = part.take(s.squared[None]), part.take(s.reference.variance()[None])
        model_var = part.take(s.model.variance()[None])
        mse, spread = float(squared.sum() / (n * squared.size)), float(reference_var.mean())
        varied = reference_var > STILL * max(spread, np.finfo(float).tiny)
        rows.append({"output": part.output, "part": part.name, "whole": part.stop is None,
                     "source": part.source or None, "elements": int(squared.size),
                     "relative_error": mse / spread if spread > 0 else None, "mse": mse, "spread": spread,
                     "stopped_varying": int((varied & (model_var <= STILL * reference_var)).sum())})
    return rows


def compare_outputs(model: onnx.ModelProto, reference: onnx.ModelProto, data: Dataset, outputs: list[str] | None = None,
                    *, axes: dict[str, int] | None = None, parts: list[OutputPart] | None = None,
                    provider: str = "cpu", threads: int | None = None, batch_size: int = 256,
                    kept_inputs: dict[str, list[int]] | None = None, given_axes: dict[str, int] | None = None) -> dict:
    """``model`` against ``reference`` on ``data``, per output (``outputs``, or those pruning protects
    by default: every float output, logits before a final Softmax or Sigmoid) and per Concat part of
    each: ``{"relative_error": the worst, "worst": its part, "parts": rows of ``part_rows``}``.
    ``axes`` and ``parts`` when the caller knows them (the pruner's objective); else measured here.
    ``kept_inputs``: the features a model whose inputs were pruned takes (``check.timing.select_inputs``);
    ``given_axes``: outputs' batch axes named by the user (``--batch-axis``)."""
    outputs = protected_outputs(reference, list(outputs) if outputs else None)
    measuring = axes is None or parts is None  # one session of the reference for its axes and parts
    run = free_runs(reference, part_sources(reference, outputs), provider, threads) if measuring else None
    fixed = declared_batch(model, data) or declared_batch(reference, data)  # a fixed batch runs on exactly that many
    if axes is None:
        found = output_batch_axes(reference, outputs, data.subset(1).inputs(), data.repeated(2).inputs(), given_axes,
                                  provider, run, fixed)
        outputs = [name for name in outputs if found[name] is not None]
        axes = {name: int(found[name] or 0) for name in outputs}
    if parts is None:
        parts, _ = find_parts(reference, outputs, axes, data.subset(1).inputs(), provider, run)
    rows = [OutputPart(name) for name in outputs]
    rows += [part for part in parts if part.stop is not None]
    sessions = [runtime.tensor_session(m, outputs, provider, threads) for m in (model, reference)]
    sums = {name: _OutputSums() for name in outputs}
    for feeds, real in data.runs(batch_size, fixed):
        mine = sessions[0].run(outputs, select_inputs(feeds, kept_inputs or {}))
        theirs = sessions[1].run(outputs, feeds)
        for name, y, y_ref in zip(outputs, mine, theirs):
            sums[name].add(batch_first(np.asarray(y), axes[name])[:real], batch_first(np.asarray(y_ref), axes[name])[:real])
    table = part_rows(rows, sums)
    errors = [(row["relative_error"], row["part"]) for row in table if row["relative_error"] is not None]
    worst = max(errors) if errors else (None, None)
    return {"relative_error": worst[0], "worst": worst[1], "parts": table}


LOST = 0.5  # relative error from which an output part has lost most of what it says about the samples


def damage_warnings(comparison: dict, data: str = "the calibration data") -> list[str]:
    """One sentence per part of an output (the output itself where it has no parts) with elements that
    no longer vary over ``data``, or with a relative error of LOST or more there."""
    split = {row["output"] for row in comparison["parts"] if not row["whole"]}
    rows = [row for row in comparison["parts"] if row["whole"] != (row["output"] in split)]
    still = [f"{row['stopped_varying']:,} of the {row['elements']:,} values of output {row['part']} no longer vary over "
             f"{data} (the pruned model gives each the same value for every sample)"
             for row in rows if row["stopped_varying"]]
    lost = [f"output {row['part']} has a relative error of {row['relative_error']:.3g} on {data} (0: as "
            f"dense, 1: no better than its mean over the samples): prune less, or refit"
            for row in rows if row["relative_error"] is not None and row["relative_error"] >= LOST]
    return still + lost


def emptied_layers(changes: list) -> list[str]:
    """One sentence per layer a prune left without any weight (weights: every weight zero; units:
    every output unit gone)."""
    found = []
    for change in changes:
        if getattr(change, "weights", 0) and change.pruned == change.weights:
            found.append(f"layer {change.layer} is pruned to 100% (all {change.weights:,} weights are zero): its "
                         "output is its bias alone")
        elif getattr(change, "out_before", 0) and change.out_after == 0:
            found.append(f"layer {change.layer} lost all its {change.out_before:,} output units")
    return found
