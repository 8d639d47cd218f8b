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


def score(model, data, *, method: str = "ecp", output: str | None = None, seed: int = 0,
          probes: int | None = None, batch_size: int = 256, labels_key: str | None = None,
          provider: str = "cpu", threads: int | None = None, force: bool = False,
          progress: Callable[[str, int, int], None] | None = None):
    """Per-layer saliencies of ``method`` on the calibration ``data``: (model copy, layers, saliencies, context).

    The returned model copy has every node named; masks and rewrites refer to it.
    """
    source = as_model(model)
    work = onnx.ModelProto()
    work.CopyFrom(source)
    found = find_layers(work)
    scorer = make_scorer(method)
    dataset = as_dataset(data, work, labels_key, require_labels=method == "gradmag")
    if probes is not None and probes < 1:
        raise InputError(f"--probes must be a positive number, got {probes}")
    ctx = ScoringContext(
        model=work, layers=found.layers, weights=effective_weights(work, found.layers), data=dataset,
        output=protected_output(work, output), seed=seed, probes=probes, batch_size=batch_size,
        provider=provider, threads=threads, force=force, progress=progress)
    start = time.perf_counter()
    saliencies = scorer(ctx)
    ctx.timings["scoring"] = time.perf_counter() - start
    return work, found, saliencies, ctx


def prune(model, data, sparsity: float, *, method: str = "ecp", compensation: bool = True,
          scope: str = "global", exclude=(), seed: int = 0, output: str | None = None,
          probes: int | None = None, batch_size: int = 256, labels_key: str | None = None,
          provider: str = "cpu", threads: int | None = None, force: bool = False,
          progress: Callable[[str, int, int], None] | None = None) -> PruneResult:
    """Prune ``model`` one-shot to ``sparsity`` with ``method`` scored on calibration ``data``.

    ``model``: a path or ModelProto (never modified). ``data``: a .npz path, a Dataset, or a dict of
    arrays keyed by input name. Returns a PruneResult whose ``model`` passed onnx.checker and ran on
    onnxruntime; save it with ``onnxprune.save_model``.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise InputError(f"sparsity must be between 0 and 1, got {sparsity}")
    work, found, saliencies, ctx = score(
        model, data, method=method, output=output, seed=seed, probes=probes, batch_size=batch_size,
        labels_key=labels_key, provider=provider, threads=threads, force=force, progress=progress)
    scores = {name: s.scores for name, s in saliencies.items()}
    masks = choose_masks(found.layers, scores, sparsity, scope, exclude)
    shifts = _shifts(saliencies) if compensation else None
    pruned, changes = rewrite(work, found.layers, masks, shifts)
    validate(pruned, ctx.data)
    return PruneResult(
        model=pruned, method=method, compensation=compensation and shifts is not None, scope=scope,
        target_sparsity=sparsity, protected_output=ctx.output, changes=changes, skipped=found.skipped,
        excluded=[layer.name for layer in found.layers if excluded(layer, exclude)],
        predicted_error=float(sum(scores[name][m].sum() for name, m in masks.items())),
        seconds=dict(ctx.timings))


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
