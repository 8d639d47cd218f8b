"""The Python API, a facade over the pipeline: prune, prune_structured, evaluate, inspect, sensitivity."""
from __future__ import annotations

from onnxprune.check.evaluate import evaluate_dataset
from onnxprune.check.validate import check_runs, few_samples
from onnxprune.errors import InputError
from onnxprune.find.inspection import inspect
from onnxprune.io.data import as_dataset
from onnxprune.io.models import as_model
from onnxprune.pipeline import METHOD_NAMES, PRESETS, UNIT_METHODS, Pruner, PruneResult

__all__ = ["METHOD_NAMES", "PRESETS", "UNIT_METHODS", "Pruner", "PruneResult", "as_dataset", "as_model", "evaluate",
           "inspect", "prune", "prune_structured"]


def prune(model, data, sparsity: float, *, method: str = "ecp", **params) -> PruneResult:
    """Prune ``model`` to ``sparsity`` with ``method`` scored on calibration ``data`` (no training).

    ``params`` are Pruner's (compensation, scope, exclude, seed, output, probes, batch_size,
    labels_key, provider, threads, force, schedule, repair, steps, refit, chained, g_weighted, engine,
    memory_budget, workers, ray, progress; structured with macs, multiple, inputs). Save the result
    with ``onnxprune.save_model``.
    """
    return Pruner(method, **params).fit(model, data).prune(sparsity)


def prune_structured(model, data, *, sparsity: float | None = None, macs: float | None = None, method: str = "ecp",
                     **params) -> PruneResult:
    """Remove whole units (neurons, channels, heads) of ``model``: ``sparsity`` of its prunable units,
    or ``macs`` of its multiply-accumulates (give one). ``params`` are Pruner's (scope, multiple,
    steps, refit, inputs, exclude, probes, seed, ...). ``result.kept_inputs`` names the features a
    model whose inputs changed (``inputs="prune"``) takes."""
    if (sparsity is None) == (macs is None):
        raise InputError("give exactly one of --sparsity (fraction of units) and --macs (fraction of MACs) with --structured")
    fraction = sparsity if sparsity is not None else macs
    assert fraction is not None
    return Pruner(method, structured=True, macs=macs is not None, **params).fit(model, data).prune(fraction)


def evaluate(model, data, *, reference=None, output: str | None = None, provider: str = "cpu",
             batch_size: int = 1024, labels_key: str | None = None, threads: int | None = None,
             latency: bool = True, output_axes: dict[str, int] | None = None) -> dict:
    """Loss and accuracy (when ``data`` has labels), discrepancy against ``reference`` (the relative
    error of every protected output and Concat part, ``check.relative``; mean squared and max abs
    difference of the scored output), and latency (paired with ``reference``), all measured on
    onnxruntime. ``output_axes``: batch axes of outputs the model's runs cannot tell."""
    model = as_model(model)
    reference = as_model(reference) if reference is not None else None
    dataset = as_dataset(data, model, labels_key)
    for m in (model, reference):
        if m is not None:
            check_runs(m, provider, few_samples(m, dataset))
    return evaluate_dataset(model, dataset, reference=reference, output=output, provider=provider,
                            batch_size=batch_size, threads=threads, latency=latency, output_axes=output_axes)
