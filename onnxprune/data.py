"""Calibration and test data: .npz files of arrays keyed by model input name, checked and batched.

A single-input model may take its array under any key; labels live under ``labels_key`` (default
``y`` or ``labels``). uint8 images are scaled by the model's ``onnxprune.input_scale`` metadata, the
preprocessing its README documents.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from .errors import InputError

DEFAULT_LABEL_KEYS = ("y", "labels")
SCALE_KEY = "onnxprune.input_scale"


@dataclass
class Dataset:
    """Feeds for every model input (all with the same first dimension) and optional int64 labels."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.feeds.values())))

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            labels = None if self.labels is None else self.labels[start:stop]
            yield {k: v[start:stop] for k, v in self.feeds.items()}, labels

    def subset(self, n: int) -> "Dataset":
        return Dataset({k: v[:n] for k, v in self.feeds.items()}, None if self.labels is None else self.labels[:n])


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (older exporters also list initializers as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a readable .npz file ({str(exc).splitlines()[0][:200]})") from None


def load_dataset(path: str | Path, model: onnx.ModelProto, labels_key: str | None = None,
                 require_labels: bool = False) -> Dataset:
    """Read ``path`` and check it against ``model``'s inputs (names, shapes, dtypes, finiteness)."""
    return make_dataset(read_npz(path), model, labels_key, require_labels, source=str(path))


def make_dataset(arrays: dict[str, np.ndarray], model: onnx.ModelProto, labels_key: str | None = None,
                 require_labels: bool = False, source: str = "data") -> Dataset:
    arrays = dict(arrays)
    labels = _pop_labels(arrays, labels_key, source)
    if require_labels and labels is None:
        keys = labels_key or " or ".join(DEFAULT_LABEL_KEYS)
        raise InputError(f"{source}: this needs labels, but there is no array {keys!r}")
    inputs = model_inputs(model)
    if not inputs:
        raise InputError("the model has no inputs")
    if len(inputs) == 1 and inputs[0].name not in arrays:
        if len(arrays) != 1:
            raise InputError(f"{source}: expected an array named {inputs[0].name!r} (or exactly one array), found {sorted(arrays) or 'none'}")
        arrays = {inputs[0].name: next(iter(arrays.values()))}
    missing = [vi.name for vi in inputs if vi.name not in arrays]
    if missing:
        raise InputError(f"{source}: no array for model input(s) {missing}; found {sorted(arrays)}")
    scale = _input_scale(model)
    feeds = {vi.name: _check_input(arrays[vi.name], vi, scale, source) for vi in inputs}
    sizes = {name: len(a) for name, a in feeds.items()}
    if len(set(sizes.values())) > 1:
        raise InputError(f"{source}: inputs have different numbers of samples {sizes}")
    n = next(iter(sizes.values()))
    if labels is not None and len(labels) != n:
        raise InputError(f"{source}: {len(labels)} labels for {n} samples")
    return Dataset(feeds, labels)


def _pop_labels(arrays: dict[str, np.ndarray], labels_key: str | None, source: str) -> np.ndarray | None:
    keys = [labels_key] if labels_key else [k for k in DEFAULT_LABEL_KEYS if k in arrays]
    if labels_key and labels_key not in arrays:
        raise InputError(f"{source}: no labels array {labels_key!r}; found {sorted(arrays)}")
    if not keys:
        return None
    labels = arrays.pop(keys[0])
    if labels.ndim != 1:
        raise InputError(f"{source}: labels {keys[0]!r} must be 1-D integers, got shape {labels.shape}")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise InputError(f"{source}: labels {keys[0]!r} must be integers")
    elif labels.dtype.kind not in "iu":
        raise InputError(f"{source}: labels {keys[0]!r} must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise InputError(f"{source}: labels {keys[0]!r} contain negative values")
    return labels.astype(np.int64)


def _input_scale(model: onnx.ModelProto) -> float | None:
    for prop in model.metadata_props:
        if prop.key == SCALE_KEY:
            try:
                return float(prop.value)
            except ValueError:
                raise InputError(f"model metadata {SCALE_KEY}={prop.value!r} is not a number") from None
    return None


def _check_input(array: np.ndarray, vi: onnx.ValueInfoProto, scale: float | None, source: str) -> np.ndarray:
    ttype = vi.type.tensor_type
    try:
        want = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
    except (KeyError, ValueError):
        raise InputError(f"model input {vi.name!r} has an element type ({ttype.elem_type}) onnx does not know") from None
    name = vi.name
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise InputError(f"{source}: array for {name!r} has dtype {array.dtype}, not numeric")
    if array.ndim == 0 or len(array) == 0:
        raise InputError(f"{source}: array for {name!r} has no samples")
    if want.kind == "f" and array.dtype.kind in "iub":
        if array.dtype != np.uint8 or scale is None:
            raise InputError(
                f"{source}: {name!r} is {array.dtype} but the model wants {want}; "
                f"store {want} values, or uint8 images with the model's {SCALE_KEY} metadata set")
        array = array.astype(want) * want.type(scale)
    elif want.kind == "f":
        array = array.astype(want, copy=False)
    elif array.dtype != want:
        if array.dtype.kind in "iu" and want.kind in "iu" and np.can_cast(array, want, casting="same_kind"):
            array = array.astype(want)
        else:
            raise InputError(f"{source}: {name!r} has dtype {array.dtype}, the model wants {want}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InputError(f"{source}: {name!r} contains NaN or Inf")
    if ttype.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
        if len(dims) != array.ndim or any(d not in (None, 0) and d != s for d, s in zip(dims[1:], array.shape[1:])):
            shown = ["N" if d is None else d for d in dims]
            raise InputError(f"{source}: {name!r} has shape {list(array.shape)}, the model wants {shown}")
    return np.ascontiguousarray(array)
