"""The Python API: load -> find layers -> statistics -> score -> mask -> rewrite -> validate."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from . import runtime
from .data import Dataset, load_dataset, make_dataset, model_inputs
from .errors import CheckFailed, InputError
from .evaluate import evaluate_dataset
from .layers import GraphLayers, Layer, Skipped, analyse_graph, protected_output, read_initializer
from .masks import choose_masks, excluded
from .modelio import load_model
from .rewrite import LayerChange, rewrite
from .saliency import Saliency, ScoringContext, make_scorer

ModelLike = "str | Path | onnx.ModelProto"
DataLike = "str | Path | Dataset | dict[str, np.ndarray]"


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
    predicted_error: float      # sum of the pruned weights' scores (for ecp: first-order E||dy||^2)
    seconds: dict[str, float] = field(default_factory=dict)

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
            "predicted_error": self.predicted_error, "seconds": self.seconds,
            "layers": [asdict(c) for c in self.changes], "excluded": self.excluded,
            "skipped": [asdict(s) for s in self.skipped],
        }


def as_model(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return load_model(model)


def as_dataset(data, model: onnx.ModelProto, labels_key: str | None = None, require_labels: bool = False) -> Dataset:
    if isinstance(data, Dataset):
        if require_labels and data.labels is None:
            raise InputError("this needs labels, but the data has none")
        return data
    if isinstance(data, dict):
        return make_dataset(data, model, labels_key, require_labels)
    return load_dataset(data, model, labels_key, require_labels)


def find_layers(model: onnx.ModelProto) -> GraphLayers:
    """Prunable layers (names unnamed nodes of ``model`` in place); an InputError if there are none."""
    found = analyse_graph(model)
    if not found.layers:
        reasons = "; ".join(f"{s.node}: {s.reason}" for s in found.skipped[:3]) or "no Gemm or MatMul nodes"
        raise InputError(f"the model has no prunable layers ({reasons})")
    return found


def effective_weights(model: onnx.ModelProto, layers: list[Layer]) -> dict[str, np.ndarray]:
    return {layer.name: layer.to_rows(read_initializer(model, layer.weight)) for layer in layers}


class Pruner:
    """Score once, prune to any sparsity: ``Pruner(method="ecp").fit(model, data).prune(0.8)``.

    Parameters are set in ``__init__``; ``fit`` computes the saliencies on the calibration data
    (the expensive step) and leaves its state in attributes ending in ``_``; ``prune`` is cheap and
    can be called for many ratios (a sensitivity sweep).
    """

    def __init__(self, method: str = "ecp", *, compensation: bool = True, scope: str = "global", exclude=(),
                 seed: int = 0, output: str | None = None, probes: int | None = None, batch_size: int = 256,
                 labels_key: str | None = None, provider: str = "cpu", threads: int | None = None,
                 force: bool = False, progress: Callable[[str, int, int], None] | None = None):
        self.method, self.compensation, self.scope, self.exclude = method, compensation, scope, tuple(exclude)
        self.seed, self.output, self.probes, self.batch_size = seed, output, probes, batch_size
        self.labels_key, self.provider, self.threads, self.force, self.progress = labels_key, provider, threads, force, progress

    def fit(self, model, data) -> "Pruner":
        """Find the layers of ``model`` (a path or ModelProto, never modified) and score their weights
        on ``data`` (a .npz path, a Dataset, or a dict of arrays keyed by input name)."""
        scorer = make_scorer(self.method)
        if self.probes is not None and self.probes < 1:
            raise InputError(f"--probes must be a positive number, got {self.probes}")
        source = as_model(model)
        self.model_ = onnx.ModelProto()
        self.model_.CopyFrom(source)  # every node gets a name in this copy; masks refer to it
        found = find_layers(self.model_)
        self.layers_, self.skipped_ = found.layers, found.skipped
        self.data_ = as_dataset(data, self.model_, self.labels_key, require_labels=self.method == "gradmag")
        ctx = ScoringContext(
            model=self.model_, layers=self.layers_, weights=effective_weights(self.model_, self.layers_),
            data=self.data_, output=protected_output(self.model_, self.output), seed=self.seed, probes=self.probes,
            batch_size=self.batch_size, provider=self.provider, threads=self.threads, force=self.force,
            progress=self.progress)
        start = time.perf_counter()
        self.saliencies_ = scorer(ctx)
        ctx.timings["scoring"] = time.perf_counter() - start
        self.output_, self.seconds_ = ctx.output, dict(ctx.timings)
        return self

    def prune(self, sparsity: float) -> PruneResult:
        """The model pruned to ``sparsity``; it passed onnx.checker and ran on onnxruntime."""
        scores = {name: s.scores for name, s in self.saliencies_.items()}
        masks = choose_masks(self.layers_, scores, sparsity, self.scope, self.exclude)
        shifts = _shifts(self.saliencies_) if self.compensation else None
        pruned, changes = rewrite(self.model_, self.layers_, masks, shifts)
        validate(pruned, self.data_)
        return PruneResult(
            model=pruned, method=self.method, compensation=shifts is not None, scope=self.scope,
            target_sparsity=sparsity, protected_output=self.output_, changes=changes, skipped=self.skipped_,
            excluded=[layer.name for layer in self.layers_ if excluded(layer, self.exclude)],
            predicted_error=float(sum(scores[name][m].sum() for name, m in masks.items())),
            seconds=dict(self.seconds_))


def prune(model, data, sparsity: float, *, method: str = "ecp", **params) -> PruneResult:
    """Prune ``model`` one-shot to ``sparsity`` with ``method`` scored on calibration ``data``.

    ``params`` are Pruner's (compensation, scope, exclude, seed, output, probes, batch_size,
    labels_key, provider, threads, force, progress). Save the result with ``onnxprune.save_model``.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise InputError(f"sparsity must be between 0 and 1, got {sparsity}")
    return Pruner(method, **params).fit(model, data).prune(sparsity)


def _shifts(saliencies: dict[str, Saliency]) -> dict[str, np.ndarray] | None:
    if any(s.shifts is None for s in saliencies.values()):
        return None
    return {name: s.shifts for name, s in saliencies.items()}


def validate(model: onnx.ModelProto, data: Dataset | None = None) -> None:
    """The model passes onnx.checker and onnxruntime runs it to finite outputs on a few samples."""
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise CheckFailed(f"the pruned model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    if data is not None:
        session = runtime.make_session(model)
        for value in session.run(None, data.subset(8).feeds):
            if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.all(np.isfinite(value)):
                raise CheckFailed("the pruned model produces NaN or Inf on the calibration data")


def evaluate(model, data, *, reference=None, output: str | None = None, provider: str = "cpu",
             batch_size: int = 1024, labels_key: str | None = None, threads: int | None = None) -> dict:
    """Loss and accuracy (when ``data`` has labels), discrepancy against ``reference`` (mean squared
    and max abs difference of the output), and latency, all measured on onnxruntime."""
    model = as_model(model)
    reference = as_model(reference) if reference is not None else None
    dataset = as_dataset(data, model, labels_key)
    return evaluate_dataset(model, dataset, reference=reference, output=output, provider=provider,
                            batch_size=batch_size, threads=threads)


def inspect(model) -> dict:
    """Prunable layers with shapes and current sparsity, skipped nodes with reasons, model stamping."""
    model = as_model(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    found = analyse_graph(work)
    layers = []
    for layer in found.layers:
        w = read_initializer(work, layer.weight)
        layers.append({"layer": layer.name, "op": layer.op, "weight": layer.weight, "bias": layer.bias,
                       "shape": [layer.out_features, layer.in_features], "dtype": str(w.dtype),
                       "weights": layer.size, "sparsity": float(np.count_nonzero(w == 0) / w.size)})
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    try:
        protected = protected_output(work)
    except InputError:
        protected = None
    return {
        "ir_version": model.ir_version, "opsets": opsets, "producer": model.producer_name,
        "inputs": [vi.name for vi in model_inputs(model)], "outputs": [o.name for o in model.graph.output],
        "protected_output": protected, "layers": layers,
        "skipped": [asdict(s) for s in found.skipped],
        "runtime_copy": model.ir_version > runtime.MAX_IR_VERSION or any(
            v > runtime.MAX_OPSET for d, v in opsets.items() if d == "ai.onnx"),
    }
