"""Checks before and after pruning: onnxruntime runs the model, its rows are samples, its weights
are finite; the pruned model passes onnx.checker and runs to finite outputs."""
from __future__ import annotations

import re

import numpy as np
import onnx

from onnxprune import runtime
from onnxprune.errors import CheckFailed, InputError
from onnxprune.find.layers import Layer, Skipped
from onnxprune.graph.index import read_initializer
from onnxprune.graph.passes import free_batch_copy
from onnxprune.io.data import Dataset, declared_batch, model_inputs


def check_runs(model: onnx.ModelProto, provider: str = "cpu", feeds: dict[str, np.ndarray] | None = None) -> None:
    """onnxruntime loads ``model`` (and runs it on ``feeds``); else an InputError saying why (an op
    or a type it does not know, a shape its kernels refuse)."""
    try:
        session = runtime.make_session(model, provider)
        if feeds is not None:
            session.run(None, feeds)
    except runtime.RuntimeUnavailable:
        raise
    except Exception as exc:  # onnxruntime's own exception types: Fail, NotImplemented, InvalidGraph, ...
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
        raise InputError(f"onnxruntime cannot run the model: {text[:300]}") from None


def few_samples(model: onnx.ModelProto, data: Dataset) -> dict[str, np.ndarray] | None:
    """Two samples to try ``model`` on, or as many as a fixed batch size asks (None if too few)."""
    fixed = {vi.type.tensor_type.shape.dim[0].dim_value for vi in model_inputs(model)
             if vi.type.tensor_type.HasField("shape") and len(vi.type.tensor_type.shape.dim)
             and vi.type.tensor_type.shape.dim[0].dim_value > 0}
    if len(fixed) > 1:
        return None
    n = fixed.pop() if fixed else 2
    return data.subset(n).inputs() if len(data) >= n else None


def per_sample(model: onnx.ModelProto, layers: list[Layer], data: Dataset, provider: str = "cpu"):
    """(layers whose pre-activation's rows group by sample, Skipped for the others). An export may fold
    a sequence into the batch (Reshape to (N*S, F) before a Gemm): such a "folded" layer is kept when
    its rows do group sample by sample (2P rows for two samples, the first P those of the first sample
    alone); any other layer needs one row per sample (measured on two samples)."""
    if len(data) < 2 or not layers:
        return layers, []
    try:
        two = {name: np.asarray(value) for name, value in data.subset(2).feeds.items()}
        values = runtime.run_tensors(free_batch_copy(model), two, [layer.preact for layer in layers], provider)
    except Exception:  # noqa: BLE001 - the statistics will name what fails
        return layers, []
    folded = [layer.preact for layer in layers if layer.kind == "folded"]
    try:
        alone = dict(zip(folded, runtime.run_tensors(model, {k: v[:1] for k, v in two.items()}, folded, provider)
                         if folded else []))
    except Exception:  # noqa: BLE001 - a fixed batch of two: the grouping cannot be measured
        alone = {}
    kept, skipped = [], []
    for layer, value in zip(layers, values):
        rows = value.shape[0] if value.ndim else 2
        if layer.kind == "folded":
            why = (_fold_problem(value, alone[layer.preact]) if layer.preact in alone else
                   "its rows fold the batch with other axes, and the model does not run on one sample to tell how")
            if why:
                skipped.append(Skipped(layer.name, layer.op, why))
                continue
        elif rows != 2:
            skipped.append(Skipped(layer.name, layer.op, f"its output has {rows} rows for 2 samples (a Reshape folds "
                                                         "another axis into the batch): rows are not samples"))
            continue
        kept.append(layer)
    return kept, skipped


def _fold_problem(two: np.ndarray, one: np.ndarray) -> str | None:
    """Why a folded layer's rows on two samples (``two``) do not group sample by sample, given the
    first sample's rows alone (``one``); None when they do."""
    if two.ndim != 2 or one.ndim != 2 or len(two) != 2 * len(one):
        return (f"its output has {two.shape[0] if two.ndim else 1} rows for 2 samples and "
                f"{one.shape[0] if one.ndim else 1} for 1: rows do not group by sample")
    scale = float(np.max(np.abs(one))) if one.size else 0.0
    if not np.allclose(two[:len(one)], one, rtol=1e-3, atol=1e-4 * scale + 1e-30):
        return "its rows fold the batch with other axes, but not sample by sample (not batch-first)"
    return None


def check_finite_weights(model: onnx.ModelProto, layers: list[Layer]) -> None:
    """Layer weights and biases stored as initializers are finite; else an InputError naming one."""
    names = {init.name for init in model.graph.initializer}
    for layer in layers:
        for name in (layer.weight, layer.bias):
            if name is not None and name in names:
                value = read_initializer(model, name)
                if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                    raise InputError(f"initializer {name!r} of layer {layer.name} contains NaN or Inf")


def validate(model: onnx.ModelProto, data: Dataset | None = None) -> None:
    """The model passes onnx.checker and onnxruntime runs it to finite outputs on a few samples."""
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise CheckFailed(f"the pruned model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    if data is not None:
        fixed = declared_batch(model, data)  # an export with a fixed batch runs on exactly that many
        feeds = next(data.padded_batches(fixed))[0] if fixed else data.subset(8).inputs()
        try:
            values = runtime.make_session(model).run(None, feeds)
        except runtime.RuntimeUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's exception types
            raise CheckFailed(f"onnxruntime cannot run the pruned model on {fixed or 8} calibration samples: "
                              f"{runtime.ort_message(exc)}") from None
        for value in values:
            if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.all(np.isfinite(value)):
                raise CheckFailed("the pruned model produces NaN or Inf on the calibration data")


