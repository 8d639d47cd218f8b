"""Evaluate a model on onnxruntime: loss and accuracy against labels, discrepancy against a
reference model, and latency."""
from __future__ import annotations

import time

import numpy as np
import onnx

from . import runtime
from .data import Dataset
from .errors import CheckFailed, InputError
from .layers import output_kind, scored_output


def predict(model: onnx.ModelProto, data: Dataset, output: str, provider: str = "cpu", batch_size: int = 1024,
            threads: int | None = None) -> tuple[np.ndarray, float]:
    """All values of tensor ``output`` over ``data``, and the seconds the runs took (after a warm-up)."""
    session = runtime.tensor_session(model, [output], provider, threads)
    first = next(data.batches(batch_size))[0]
    session.run([output], first)  # warm-up: allocations and kernel selection are not latency
    chunks, seconds = [], 0.0
    for feeds, _ in data.batches(batch_size):
        start = time.perf_counter()
        (value,) = session.run([output], feeds)
        seconds += time.perf_counter() - start
        chunks.append(value)
    return np.concatenate(chunks), seconds


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
                     output: str | None = None, provider: str = "cpu", batch_size: int = 1024,
                     threads: int | None = None) -> dict:
    """The evaluation report of ``model`` on ``data`` (see ``onnxprune.evaluate``)."""
    output = scored_output(model, output)
    values, seconds = predict(model, data, output, provider, batch_size, threads)
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
    report["latency_us_per_sample"] = 1e6 * seconds / len(data)
    report["batch_size"] = batch_size
    return report
