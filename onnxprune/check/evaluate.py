"""Evaluate a model on onnxruntime: loss and accuracy against labels, discrepancy against a
reference model (the relative error of every protected output and part, ``relative``), latency
(the paired timer, ``timing``) and size in bytes."""
from __future__ import annotations

import time
import zlib

import numpy as np
import onnx

from onnxprune import runtime
from onnxprune.check.relative import compare_outputs
from onnxprune.check.timing import measure_latency
from onnxprune.derivatives.plan import MEMORY_BUDGET, sample_bytes
from onnxprune.errors import CheckFailed, InputError
from onnxprune.find.outputs import output_kind, scored_output
from onnxprune.io.data import Dataset, declared_batch


def predict(model: onnx.ModelProto, data: Dataset, output: str, provider: str = "cpu", batch_size: int = 1024,
            threads: int | None = None) -> tuple[np.ndarray, float]:
    """All values of tensor ``output`` over ``data``, and the seconds the runs took."""
    session = runtime.tensor_session(model, [output], provider, threads)
    chunks, seconds = [], 0.0
    fixed = declared_batch(model, data)
    for feeds, real in data.runs(batch_size, fixed):
        start = time.perf_counter()
        (value,) = session.run([output], feeds)
        seconds += time.perf_counter() - start
        chunks.append(value[:real])
    return np.concatenate(chunks), seconds


def model_bytes(model: onnx.ModelProto) -> dict:
    """Bytes of the serialized model, raw and zlib-compressed (level 6): what it costs on disk and to download."""
    from onnxprune.io.models import PROTOBUF_LIMIT, serialized_size

    size = serialized_size(model)
    if size >= PROTOBUF_LIMIT:  # cannot be serialized in one piece: its tensors go to external data
        return {"bytes": size, "zlib_bytes": None}
    raw = model.SerializeToString()
    return {"bytes": len(raw), "zlib_bytes": len(zlib.compress(raw, 6))}


def log_probabilities(values: np.ndarray, kind: str) -> np.ndarray:
    """Per-class log-probabilities from logits, probabilities or log-probabilities (N, K)."""
    values = values.astype(np.float64).reshape(len(values), -1)
    if kind == "logits":
        shifted = values - values.max(1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    if kind == "probabilities":
        return np.log(np.clip(values, 1e-12, None))
    return values


def looks_like_probabilities(values: np.ndarray) -> bool:
    v = values.reshape(len(values), -1)
    return bool(v.shape[1] > 1 and np.all(v >= 0) and np.allclose(v.sum(1), 1.0, atol=1e-4))


def evaluate_dataset(model: onnx.ModelProto, data: Dataset, *, reference: onnx.ModelProto | None = None,
                     output: str | list[str] | None = None, provider: str = "cpu", batch_size: int = 1024,
                     threads: int | None = None, latency: bool = True, output_axes: dict[str, int] | None = None) -> dict:
    """The evaluation report of ``model`` on ``data`` (see ``onnxprune.evaluate``); ``latency``
    times ``model`` (paired with ``reference`` when given) at batch 1 and at ``batch_size``. With
    several ``output`` names the first is scored (loss, accuracy) and all are compared with the
    reference; ``output_axes``: their batch axes where given (``--batch-axis``)."""
    names = [output] if isinstance(output, str) else list(output or [])
    output = scored_output(model, names[0] if names else None)
    values, _ = predict(model, data, output, provider, batch_size, threads)
    kind = output_kind(model, output)
    if kind == "logits" and looks_like_probabilities(values):
        kind = "probabilities"
    report = {"samples": len(data), "output": output, "output_kind": kind, "provider": provider}
    if data.labels is not None:
        if not np.issubdtype(values.dtype, np.floating) or values.ndim < 2:
            raise InputError(f"output {output!r} with shape {list(values.shape)} is not a score per class; "
                             "choose another with --output")
        logp = log_probabilities(values, kind)
        if data.labels.max() >= logp.shape[1]:
            raise InputError(f"labels go up to {data.labels.max()} but output {output!r} has {logp.shape[1]} classes")
        if not np.all(np.isfinite(logp)):
            raise CheckFailed(f"output {output!r} contains NaN or Inf")
        rows = np.arange(len(data))
        report["loss"] = float(-logp[rows, data.labels].mean())
        report["accuracy"] = float((logp.argmax(1) == data.labels).mean())
    if reference is not None:
        ref_values, _ = predict(reference, data, output, provider, batch_size, threads)
        if ref_values.shape != values.shape:
            raise InputError(f"reference output {output!r} has shape {list(ref_values.shape)}, "
                             f"the model's has {list(values.shape)}")
        diff = values.astype(np.float64) - ref_values.astype(np.float64)
        report["mse"] = float(np.mean(diff**2))
        report["max_abs"] = float(np.max(np.abs(diff)))
        compared = compare_outputs(model, reference, data, names or None, provider=provider, threads=threads,
                                   batch_size=batch_size, given_axes=output_axes)
        report.update(relative_error=compared["relative_error"], worst_part=compared["worst"],
                      output_errors=compared["parts"])
    report["batch_size"] = batch_size
    report["size"] = model_bytes(model)
    if reference is not None:
        report["reference_size"] = model_bytes(reference)
    if latency:
        pair = {"reference": reference, "model": model} if reference is not None else {"model": model}
        report["latency"] = measure_latency(pair, data, (1, latency_batch(list(pair.values()), data, batch_size, provider)),
                                            provider=provider, threads=(threads,))
    return report


def latency_batch(models: list[onnx.ModelProto], data: Dataset, batch_size: int, provider: str = "cpu") -> int:
    """The larger batch the latency is timed at: ``batch_size``, or fewer samples where the timed
    sessions of ``models`` (all alive at once, for pairing) would hold more than MEMORY_BUDGET of
    activations (a 224x224 CNN at 32 images: 2 GB for two sessions); measured on one sample, every
    float tensor counted (an upper bound of what onnxruntime keeps). A model that cannot be measured
    (inputs without a batch axis) is timed at ``batch_size``."""
    sizes = [sample_bytes(model, data.subset(1).arrays(), provider) for model in models]
    if not all(sizes):
        return batch_size
    return max(1, min(batch_size, MEMORY_BUDGET // sum(sizes)))
