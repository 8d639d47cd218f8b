"""Calibration and test data: .npz files of arrays keyed by model input name, checked and batched.

A single-input model may take its array under any key; labels live under ``labels_key`` (default
``y`` or ``labels``). uint8 images are scaled by the model's ``onnxprune.input_scale`` metadata, the
preprocessing its README documents.

An .npz file is read lazily (``onnxprune.io.npz``): the feeds are ``NpzColumn``s that decompress
the rows of one batch at a time. Memory therefore holds one batch of inputs, not the data set;
what stays per sample is the labels (8 bytes) and what the caller keeps (evaluation keeps the
scored outputs).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import InputError
from onnxprune.io.npz import LazyMember, NpzColumn, convert, open_npz

DEFAULT_LABEL_KEYS = ("y", "labels")
SCALE_KEY = "onnxprune.input_scale"


MAX_LABEL = 2**31 - 1   # class indices beyond this are not class indices (and overflow onnxruntime's int32 paths)
CHECK_CHUNK = 1 << 20   # bytes of a member checked (finiteness) at a time


@dataclass
class Dataset:
    """Feeds for every per-sample model input (arrays, or NpzColumns read batch by batch), optional
    int64 labels, the ``fixed`` inputs that have no batch axis (a scalar sample rate: fed as given
    with every batch), and the ``axes`` of inputs whose batch is not their first axis (a recurrent
    state shaped (2, batch, 128)); feeds are in the model's own layout."""

    feeds: dict[str, np.ndarray | NpzColumn]
    labels: np.ndarray | None = None
    fixed: dict[str, np.ndarray] = field(default_factory=dict)
    axes: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        name, value = next(iter(self.feeds.items()))
        return value.shape[self.axes[name]] if name in self.axes else len(value)

    def _rows(self, name: str, value, start: int, stop: int):
        axis = self.axes.get(name, 0)
        return value[start:stop] if axis == 0 else value[(slice(None),) * axis + (slice(start, stop),)]

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            labels = None if self.labels is None else self.labels[start:stop]
            yield {**{k: self._rows(k, v, start, stop) for k, v in self.feeds.items()}, **self.fixed}, labels

    def padded_batches(self, size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Batches of exactly ``size`` samples, for a model that declares a fixed batch size: (feeds,
        how many of the batch's samples are real), the last batch filled up with copies of its
        samples (their outputs are to be dropped)."""
        for start, (feeds, _) in zip(range(0, len(self), size), self.batches(size)):
            real = min(size, len(self) - start)
            if real < size:
                feeds = {k: v if k in self.fixed else np.take(v, np.arange(size) % real, axis=self.axes.get(k, 0))
                         for k, v in feeds.items()}
            yield feeds, real

    def runs(self, batch_size: int, fixed: int | None) -> Iterator[tuple[dict[str, np.ndarray], int | None]]:
        """The batches a model runs on: exactly ``fixed`` samples each where it declares that batch
        (``padded_batches``), else at most ``batch_size`` (all of them real: None)."""
        if fixed:
            yield from self.padded_batches(fixed)
        else:
            for feeds, _ in self.batches(batch_size):
                yield feeds, None

    def subset(self, n: int) -> Dataset:
        return Dataset({k: self._rows(k, v, 0, n) for k, v in self.feeds.items()},
                       None if self.labels is None else self.labels[:n], self.fixed, self.axes)

    def repeated(self, n: int) -> Dataset:
        """``n`` samples: the first ones, repeated in order where there are fewer (a timing's batch)."""
        index = np.arange(n) % len(self)
        return Dataset({k: np.take(np.asarray(v), index, axis=self.axes.get(k, 0)) for k, v in self.feeds.items()},
                       None if self.labels is None else self.labels[index], self.fixed, self.axes)

    def inputs(self) -> dict[str, np.ndarray]:
        """Every model input, as arrays: the per-sample feeds (read whole) and the fixed ones."""
        return {**self.arrays(), **self.fixed}

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-sample feeds as arrays (an .npz's columns read whole: for subsets and small data)."""
        return {k: np.asarray(v) for k, v in self.feeds.items()}

    def per_sample(self) -> Dataset:
        """The same samples with the batch first in every feed and without the fixed inputs: the data
        of an analysis copy in which the fixed inputs are constants and the others batch-first
        (``prepare.FoldFixedInputs``, ``prepare.BatchFirstInputs``)."""
        feeds = {k: np.ascontiguousarray(np.moveaxis(np.asarray(v), self.axes[k], 0)) if k in self.axes else v
                 for k, v in self.feeds.items()}
        return Dataset(feeds, self.labels)


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (older exporters also list initializers as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def declared_batch(model: onnx.ModelProto, data: Dataset) -> int | None:
    """The batch size ``model`` declares as a number on the batch axis of every per-sample input (an
    export traced at a fixed batch takes exactly that many samples per run), else None."""
    declared = {vi.name: _dims(vi) for vi in model_inputs(model)}
    sizes = set()
    for name in data.feeds:
        dims, axis = declared.get(name), data.axes.get(name, 0)
        if not dims or axis >= len(dims) or not dims[axis].HasField("dim_value") or dims[axis].dim_value < 1:
            return None
        sizes.add(int(dims[axis].dim_value))
    return sizes.pop() if len(sizes) == 1 else None


def load_dataset(path: str | Path, model: onnx.ModelProto, labels_key: str | None = None,
                 require_labels: bool = False, batch_axes: dict[str, int] | None = None) -> Dataset:
    """Open ``path`` and check it against ``model``'s inputs (names, shapes, dtypes, finiteness),
    reading only the members it uses, batch by batch."""
    return make_dataset(open_npz(path), model, labels_key, require_labels, source=str(path), batch_axes=batch_axes)


def make_dataset(arrays: dict, model: onnx.ModelProto, labels_key: str | None = None,
                 require_labels: bool = False, source: str = "data", batch_axes: dict[str, int] | None = None) -> Dataset:
    """``arrays``: numpy arrays by name, or the lazy members of ``open_npz``; ``batch_axes``: the
    batch axis of inputs whose batch the model's declared shapes and the data cannot tell
    (``--batch-axis NAME=AXIS``)."""
    batch_axes = dict(batch_axes or {})
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
            raise InputError(f"{source}: expected an array named {inputs[0].name!r} (or exactly one array), "
                             f"found {sorted(arrays) or 'none'}")
        arrays = {inputs[0].name: next(iter(arrays.values()))}
    missing = [vi.name for vi in inputs if vi.name not in arrays]
    if missing:
        raise InputError(f"{source}: no array for model input(s) {missing}; found {sorted(arrays)}")
    scale = _input_scale(model)
    fixed = {vi.name: _fixed_input(arrays[vi.name], vi, source) for vi in inputs if _no_batch_axis(vi)}
    feeds = {vi.name: _check_input(arrays[vi.name], vi, scale, source) for vi in inputs if vi.name not in fixed}
    if not feeds:
        raise InputError(f"{source}: every model input is a fixed value; there are no samples")
    _check_batch_axes(batch_axes, inputs, feeds, source)
    axes = {vi.name: axis for vi in inputs if vi.name in feeds and (axis := batch_axes.get(vi.name, _batch_axis(vi, inputs)))}
    sizes = {name: a.shape[axes[name]] if name in axes else len(a) for name, a in feeds.items()}
    if len(set(sizes.values())) > 1:
        axes.update(_axes_from_sizes(inputs, feeds, sizes, batch_axes))
        sizes = {name: a.shape[axes[name]] if name in axes else len(a) for name, a in feeds.items()}
    if len(set(sizes.values())) > 1:
        raise InputError(f"{source}: inputs have different numbers of samples {sizes}; if an input's batch is "
                         "not its first axis, name it with --batch-axis NAME=AXIS")
    axes = {name: axis for name, axis in axes.items() if axis}
    for name in axes:  # batch not first (a recurrent state): small, read whole
        feeds[name] = np.asarray(feeds[name])
    n = next(iter(sizes.values()))
    if labels is not None and len(labels) != n:
        raise InputError(f"{source}: {len(labels)} labels for {n} samples")
    return Dataset(feeds, labels, fixed, axes)


def _batch_axis(vi: onnx.ValueInfoProto, inputs: list[onnx.ValueInfoProto]) -> int:
    """Where the batch is in input ``vi``: 0, unless its declared first dimension is a number and a
    later one is the symbol another input has first (the batch), as in a state (2, 'batch', 128)."""
    dims = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else []
    if not len(dims) or not dims[0].HasField("dim_value"):
        return 0
    firsts = {i.type.tensor_type.shape.dim[0].dim_param for i in inputs if i.name != vi.name
              and i.type.tensor_type.HasField("shape") and len(i.type.tensor_type.shape.dim)} - {""}
    return next((k for k, d in enumerate(dims) if k and d.dim_param and d.dim_param in firsts), 0)


def _check_batch_axes(batch_axes: dict[str, int], inputs: list[onnx.ValueInfoProto], feeds: dict, source: str) -> None:
    """Every named batch axis belongs to a per-sample input and is one of its axes."""
    for name, axis in batch_axes.items():
        if name not in feeds:
            kind = "a scalar input (fed as given)" if name in {vi.name for vi in inputs} else "not an input of the model"
            raise InputError(f"--batch-axis {name}={axis}: {name!r} is {kind}; per-sample inputs: {sorted(feeds)}")
        if not 0 <= axis < len(feeds[name].shape):
            raise InputError(f"--batch-axis {name}={axis}: {name!r} has {len(feeds[name].shape)} axes in {source}")


def _axes_from_sizes(inputs: list[onnx.ValueInfoProto], feeds: dict, sizes: dict[str, int],
                     named: dict[str, int]) -> dict[str, int]:
    """Batch axes the data shows when the declared shapes cannot (no symbols shared between the
    inputs, as in Silero VAD's input (?, ?) and state (2, ?, 128)): an input whose declared first
    dim is a number is batched along its only free dim when that holds the samples every input
    with a free first dim (or a named axis 0) has."""
    free_first = {vi.name for vi in inputs if vi.name in feeds and (named.get(vi.name) == 0 or vi.name not in named
                                                                     and _dims(vi) and not _dims(vi)[0].HasField("dim_value"))}
    counts = {sizes[name] for name in free_first}
    if len(counts) != 1:
        return {}
    (n,) = counts
    found = {}
    for vi in inputs:
        dims = _dims(vi)
        if vi.name not in feeds or vi.name in named or not dims or not dims[0].HasField("dim_value"):
            continue
        free = [k for k, d in enumerate(dims) if not d.HasField("dim_value")]
        if len(free) == 1 and free[0] and feeds[vi.name].shape[free[0]] == n:
            found[vi.name] = free[0]
    return found


def _dims(vi: onnx.ValueInfoProto):
    return vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else []


def _no_batch_axis(vi: onnx.ValueInfoProto) -> bool:
    """A model input declared as a scalar has no batch axis: it is fed as given with every batch."""
    ttype = vi.type.tensor_type
    return ttype.HasField("shape") and len(ttype.shape.dim) == 0


def _fixed_input(array, vi: onnx.ValueInfoProto, source: str) -> np.ndarray:
    """The value of a scalar input, in the model's dtype."""
    want = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    if isinstance(array, LazyMember):
        member = array.get()
        if member.ndim > 1 or (member.ndim == 1 and len(member) != 1):  # never decompress a large member for this
            raise InputError(f"{source}: {vi.name!r} is a scalar input of the model; store one value")
        array = member.read()
    value = np.asarray(array)
    if value.size != 1:
        raise InputError(f"{source}: {vi.name!r} is a scalar input of the model, but its array has shape "
                         f"{list(value.shape)}; store one value")
    if value.dtype.kind not in "biuf" or (want.kind in "iub" and value.dtype.kind == "f"):
        raise InputError(f"{source}: {vi.name!r} has dtype {value.dtype}, the model wants {want}")
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        raise InputError(f"{source}: {vi.name!r} contains NaN or Inf")
    return value.reshape(()).astype(want)


def _pop_labels(arrays: dict[str, np.ndarray], labels_key: str | None, source: str) -> np.ndarray | None:
    keys = [labels_key] if labels_key else [k for k in DEFAULT_LABEL_KEYS if k in arrays]
    if labels_key and labels_key not in arrays:
        raise InputError(f"{source}: no labels array {labels_key!r}; found {sorted(arrays)}")
    if not keys:
        return None
    labels = arrays.pop(keys[0])
    what = f"{source}: labels {keys[0]!r}"
    if isinstance(labels, LazyMember):
        member = labels.get()
        if member.ndim != 1:  # refused before the member is read
            raise InputError(f"{what} must be 1-D integers, got shape {list(member.shape)}")
        labels = member.read()
    return class_labels(labels, what)


def class_labels(values, what: str, n_samples: int | None = None, n_classes: int | None = None) -> np.ndarray:
    """``values`` as int64 class indices, or an InputError about ``what``: 1-D, integer-valued,
    non-negative, an int32 index at most (and below ``n_classes``, ``n_samples`` of them, when given)."""
    y = np.asarray(values)
    if y.ndim != 1:
        raise InputError(f"{what} must be 1-D integers, got shape {list(y.shape)}")
    if n_samples is not None and len(y) != n_samples:
        raise InputError(f"{what} has {len(y)} labels for {n_samples} samples")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise InputError(f"{what} must be integers")
    elif y.dtype.kind not in "iub":
        raise InputError(f"{what} must be integers, got {y.dtype}")
    if y.size and y.min() < 0:
        raise InputError(f"{what} contain negative values (min {y.min():.6g})")
    if y.size and y.max() > MAX_LABEL:
        raise InputError(f"{what} go up to {y.max():.6g}, which is no class index")
    if n_classes is not None and y.size and y.max() >= n_classes:
        raise InputError(f"{what} contain label {int(y.max())} but there are {n_classes} classes (0..{n_classes - 1})")
    return y.astype(np.int64)


def _input_scale(model: onnx.ModelProto) -> float | None:
    """The model's ``onnxprune.input_scale``: a positive number that stays finite and non-zero in the
    model's float32 arithmetic (nan, inf or 1e300 would turn every image into NaN or Inf)."""
    for prop in model.metadata_props:
        if prop.key == SCALE_KEY:
            try:
                value = float(prop.value)
            except ValueError:
                raise InputError(f"model metadata {SCALE_KEY}={prop.value!r} is not a number") from None
            with np.errstate(over="ignore", under="ignore"):
                single = np.float32(value)
            if not (np.isfinite(value) and value > 0 and np.isfinite(single) and single > 0):
                raise InputError(f"model metadata {SCALE_KEY}={prop.value!r} is not a positive number that float32 "
                                 "holds (e.g. 0.00392156862745098 for 1/255)")
            return value
    return None


def _check_input(array, vi: onnx.ValueInfoProto, scale: float | None, source: str):
    """``array`` (a numpy array, or a lazy .npz member) checked against model input ``vi``
    (dtype, shape, finiteness): the array converted to the model's dtype, or for a member an
    NpzColumn that converts batch by batch (checked in one streamed pass)."""
    ttype = vi.type.tensor_type
    try:
        want = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
    except (KeyError, ValueError):
        raise InputError(f"model input {vi.name!r} has an element type ({ttype.elem_type}) onnx does not know") from None
    name = vi.name
    member = array.get() if isinstance(array, LazyMember) else None
    have = member if member is not None else array
    if have.dtype.kind not in "biuf":
        raise InputError(f"{source}: array for {name!r} has dtype {have.dtype}, not numeric")
    if have.ndim == 0 or have.shape[0] == 0:
        raise InputError(f"{source}: array for {name!r} has no samples")
    dtype, applied = _target_dtype(have.dtype, want, scale, name, source)
    _check_shape(have.shape, ttype, name, source)
    converted: np.ndarray | NpzColumn
    chunks: Iterable[np.ndarray]
    if member is None:
        converted = convert(array, dtype, applied)
        chunks = [converted]
    else:  # read through once: the values checked, and the member's CRC
        column = converted = NpzColumn(member, dtype, applied)
        rows = max(1, CHECK_CHUNK // max(member.row_bytes, 1))
        chunks = (column.convert(raw) if raw.dtype.kind == "f" or applied else raw for raw in column.chunks(rows))
    for chunk in chunks:
        if chunk.dtype.kind == "f" and not np.all(np.isfinite(chunk)):
            raise InputError(f"{source}: {name!r} contains NaN or Inf")
    return converted


def _check_shape(shape: tuple[int, ...], ttype, name: str, source: str) -> None:
    if ttype.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
        if len(dims) != len(shape) or any(d not in (None, 0) and d != s for d, s in zip(dims[1:], shape[1:])):
            shown = ["N" if d is None else d for d in dims]
            raise InputError(f"{source}: {name!r} has shape {list(shape)}, the model wants {shown}")


def _target_dtype(have: np.dtype, want: np.dtype, scale: float | None, name: str, source: str):
    """(dtype the data converts to, scale applied) for data of dtype ``have``, or an InputError."""
    if want.kind == "f" and have.kind in "iub":
        if have != np.uint8 or scale is None:
            raise InputError(
                f"{source}: {name!r} is {have} but the model wants {want}; "
                f"store {want} values, or uint8 images with the model's {SCALE_KEY} metadata set")
        return want, scale
    if want.kind == "f" or have == want:
        return want, None
    if have.kind in "iu" and want.kind in "iu" and np.can_cast(have, want, casting="same_kind"):
        return want, None
    raise InputError(f"{source}: {name!r} has dtype {have}, the model wants {want}")


def as_dataset(data, model: onnx.ModelProto, labels_key: str | None = None, require_labels: bool = False) -> Dataset:
    if isinstance(data, Dataset):
        if require_labels and data.labels is None:
            raise InputError("this needs labels, but the data has none")
        return data
    if isinstance(data, dict):
        return make_dataset(data, model, labels_key, require_labels)
    return load_dataset(data, model, labels_key, require_labels)
