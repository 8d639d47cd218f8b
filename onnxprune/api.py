"""The Python API, a facade over the pipeline: prune, prune_structured, evaluate, inspect, sensitivity."""
from __future__ import annotations

from onnxprune.check.evaluate import evaluate_dataset
from onnxprune.check.validate import check_runs, few_samples
from onnxprune.errors import InputError
from onnxprune.find.inspection import inspect
from onnxprune.io.data import as_dataset
from onnxprune.io.models import as_model
from onnxprune.pipeline import METHOD_NAMES, PRESETS, Pruner, PruneResult

__all__ = ["METHOD_NAMES", "PRESETS", "Pruner", "PruneResult", "as_dataset", "as_model", "evaluate", "inspect", "prune",
           "prune_structured"]


def prune(model, data, sparsity: float, *, method: str = "ecp", **params) -> PruneResult:
    """Prune ``model`` to ``sparsity`` with ``method`` scored on calibration ``data`` (no training).

    ``params`` are Pruner's (compensation, scope, exclude, seed, output, probes, batch_size,
    labels_key, provider, threads, force, schedule, repair, steps, refit, chained, g_weighted, engine,
    memory_budget, progress). Save the
    result with ``onnxprune.save_model``.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise InputError(f"sparsity must be between 0 and 1, got {sparsity}")
    return Pruner(method, **params).fit(model, data).prune(sparsity)


def evaluate(model, data, *, reference=None, output: str | None = None, provider: str = "cpu",
             batch_size: int = 1024, labels_key: str | None = None, threads: int | None = None) -> dict:
    """Loss and accuracy (when ``data`` has labels), discrepancy against ``reference`` (mean squared
    and max abs difference of the output), and latency, all measured on onnxruntime."""
    model = as_model(model)
    reference = as_model(reference) if reference is not None else None
    dataset = as_dataset(data, model, labels_key)
    for m in (model, reference):
        if m is not None:
            check_runs(m, provider, few_samples(m, dataset))
    return evaluate_dataset(model, dataset, reference=reference, output=output, provider=provider,
                            batch_size=batch_size, threads=threads)


def prune_structured(model, data, **params):
    """Remove whole units (neurons, channels) of ``model``: see ``onnxprune.modes.units.prune_structured``."""
    from onnxprune.modes.units import prune_structured as run

    return run(model, data, **params)
