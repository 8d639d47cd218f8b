"""The protected objective: which outputs pruning protects, their parts, and the scale each part's error is measured in.

A model's outputs are rarely on one scale: a detector concatenates box coordinates in pixels
(spread 85) with sigmoid class scores (spread 5e-4) into one tensor, a face detector returns box
offsets, landmarks and a face probability. In one squared error the small part costs nothing and
is destroyed first. So the error ECP minimises is relative per part: every protected output
(``--output A --output B``; by default every float output of the model) and every input of a
Concat that produces one (along a non-batch axis) is a part p, and the objective is

    sum over parts of  E||Δy_p||^2 / (n_p * spread_p)  =  sum over parts of relative_error_p

with n_p the part's elements per sample and spread_p = mean over its elements of the variance over
the calibration samples (``check.relative.relative_error``'s denominator). Every part counts once,
whatever its size and units. The derivative engines see it as one more tensor on top of the model
(``Objective.graph``: each output batch-first, flattened, multiplied by its elements' weights
1 / sqrt(n_p spread_p), concatenated), so layer sums, unit sums and the refit's G-weighting all
use it. A single output of one part with its batch first needs no such graph: a constant weight
changes no ranking.

Outputs whose batch is not their first axis (a CTC model's (T, batch, classes)) are found by
running one and two samples (the axis that grows from 1 to 2) or named with ``--batch-axis``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune import runtime
from onnxprune.errors import InputError
from onnxprune.find.outputs import protected_outputs
from onnxprune.graph.index import attributes, producers, tensor_types
from onnxprune.graph.passes import free_batch_copy
from onnxprune.io.data import Dataset, declared_batch

OBJECTIVE = "onnxprune__protected"


@dataclass(frozen=True)
class OutputPart:
    """Elements [start, stop) along ``axis`` of an output with its batch moved first (the whole
    output when ``stop`` is None); ``source``: the Concat input they come from."""

    output: str
    axis: int = 1
    start: int = 0
    stop: int | None = None
    source: str = ""

    @property
    def name(self) -> str:
        return self.output if self.stop is None else f"{self.output}[{self.start}:{self.stop}]"

    def take(self, values: np.ndarray) -> np.ndarray:
        """This part of ``values`` (the output, batch first)."""
        if self.stop is None:
            return values
        index = [slice(None)] * values.ndim
        index[self.axis] = slice(self.start, self.stop)
        return values[tuple(index)]


def batch_first(values: np.ndarray, axis: int) -> np.ndarray:
    """``values`` with its batch axis ``axis`` moved first."""
    return values if axis == 0 else np.moveaxis(values, axis, 0)


Run = Callable[[dict[str, np.ndarray], list[str]], list[np.ndarray]]  # tensors' values for feeds


def free_runs(model: onnx.ModelProto, names: list[str], provider: str = "cpu", threads: int | None = None) -> Run:
    """Runs of ``model`` with a free batch fetching any of ``names``, on one session."""
    session = runtime.tensor_session(free_batch_copy(model), list(dict.fromkeys(names)), provider, threads)
    return lambda feeds, wanted: session.run(wanted, feeds)


def output_batch_axes(model: onnx.ModelProto, outputs: list[str], one: dict[str, np.ndarray], two: dict[str, np.ndarray],
                      given: dict[str, int] | None = None, provider: str = "cpu", run: Run | None = None,
                      fixed: int | None = None) -> dict[str, int | None]:
    """The batch axis of each of ``outputs``: as ``given`` (``--batch-axis NAME=AXIS``), else the one
    axis that holds 1 then 2 when the model runs on the feeds of one sample and of two; 0 when the
    model cannot run on two samples, or when it runs on its traced batch (``fixed``, every run takes
    exactly that many) and its outputs do not grow with more (a Reshape to (1, -1, C) merges them);
    None for an output without one."""
    given = dict(given or {})
    axes: dict[str, int | None] = {name: given[name] for name in outputs if name in given}
    todo = [name for name in outputs if name not in axes]
    if not todo:
        return axes
    try:
        run = run or free_runs(model, todo, provider)
        shapes = [[np.shape(v) for v in run(f, todo)] for f in (one, two)]
    except Exception:  # noqa: BLE001 - a model that runs one sample at a time: the batch is first as declared
        return {**axes, **{name: 0 for name in todo}}
    for name, a, b in zip(todo, *shapes):
        grown = [k for k, (x, y) in enumerate(zip(a, b)) if (x, y) == (1, 2)] if len(a) == len(b) else []
        axes[name] = grown[0] if len(grown) == 1 else (0 if fixed else None)
    return axes


def concat_parts(model: onnx.ModelProto, output: str, axis: int, shapes: dict[str, tuple[int, ...]]) -> list[OutputPart]:
    """The parts of ``output`` (batch axis ``axis``): the inputs of the Concat that produces it (through
    Identity nodes) along a non-batch axis, else the whole output. ``shapes``: full shapes (batch
    included) of the output and of those inputs, measured on one sample."""
    producer_of = producers(model.graph)
    node = producer_of.get(output)
    while node is not None and node.op_type == "Identity":
        node = producer_of.get(node.input[0])
    whole = [OutputPart(output)]
    if node is None or node.op_type != "Concat" or len(node.input) < 2 or output not in shapes:
        return whole
    rank = len(shapes[output])
    along = attributes(node).get("axis", 0)
    along = along + rank if along < 0 else along
    if along == axis or any(name not in shapes or len(shapes[name]) != rank for name in node.input):
        return whole
    sizes = [shapes[name][along] for name in node.input]
    if sum(sizes) != shapes[output][along]:
        return whole
    moved = along + 1 if along < axis else along  # the Concat axis once the batch is first
    edges = np.cumsum([0, *sizes])
    return [OutputPart(output, moved, int(start), int(stop), source) for source, start, stop
            in zip(node.input, edges[:-1], edges[1:]) if stop > start]


CHUNK_ELEMENTS = 1 << 22  # float64 temporaries of a streamed sum: at most this many elements (32 MB) at a time


def row_chunks(y: np.ndarray):
    """Slices of ``y``'s samples (axis 0) whose float64 copies stay within CHUNK_ELEMENTS: a language
    model's (sequences, tokens, vocabulary) logits are summed without copying them all at once."""
    step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(y.shape[1:]))))
    return (slice(start, start + step) for start in range(0, len(y), step))


class ElementMoments:
    """Per-element sums of y - c and (y - c)^2 over samples (c: the first samples' mean, for accuracy)."""

    def __init__(self):
        self.n, self.shift, self.first, self.second = 0, None, None, None

    def add(self, y: np.ndarray) -> None:
        for rows in row_chunks(y):
            part = np.asarray(y[rows], np.float64)
            if self.shift is None:
                self.shift = part.mean(0)
                self.first, self.second = np.zeros_like(self.shift), np.zeros_like(self.shift)
            d = part - self.shift
            self.n += len(part)
            self.first += d.sum(0)
            self.second += (d * d).sum(0)

    def variance(self) -> np.ndarray:
        """The variance over samples of every element."""
        mean = self.first / max(self.n, 1)
        return np.maximum(self.second / max(self.n, 1) - mean * mean, 0.0)

    def mean_square(self) -> np.ndarray:
        mean = self.shift + self.first / max(self.n, 1)
        return self.variance() + mean * mean


@dataclass(frozen=True)
class Objective:
    """The protected outputs, their batch axes, their parts and each part's scale sqrt(n_p spread_p)
    on the calibration data (``scales``), and per part how it was measured (``basis``: 'spread',
    or 'mean square' where the part does not vary over the calibration data)."""

    outputs: tuple[str, ...]
    axes: dict[str, int]
    parts: tuple[OutputPart, ...]
    scales: tuple[float, ...] = ()
    spreads: tuple[float, ...] = ()
    basis: tuple[str, ...] = ()
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-sample, batch first

    @property
    def trivial(self) -> bool:
        """One output, batch first, one part: the objective is the output itself up to a constant."""
        return len(self.outputs) == 1 and self.axes.get(self.outputs[0], 0) == 0 and len(self.parts) == 1

    @property
    def width(self) -> int:
        return int(sum(np.prod(self.shapes[name]) for name in self.outputs))

    def weights(self, output: str) -> np.ndarray:
        """Per element of ``output`` (one sample, batch first) the factor 1 / sqrt(n_p spread_p) of its part."""
        weight = np.zeros((1, *self.shapes[output]))
        for part, scale in zip(self.parts, self.scales):
            if part.output == output:
                part.take(weight)[...] = 1.0 / scale
        return weight[0]

    def graph(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
        """A copy of ``model`` with the objective tensor (batch, width) on top, and its name; ``model``
        and the output's name when the objective is trivial."""
        if self.trivial:
            return model, self.outputs[0]
        m = onnx.ModelProto()
        m.CopyFrom(model)
        types = tensor_types(m)
        flat = []
        for k, name in enumerate(self.outputs):
            tag, source = f"{OBJECTIVE}__{k}", name
            elem = types.get(name, onnx.TensorProto.FLOAT)
            axis = self.axes.get(name, 0)
            if axis:
                rank = len(self.shapes[name]) + 1
                perm = [axis] + [d for d in range(rank) if d != axis]
                m.graph.node.append(helper.make_node("Transpose", [source], [f"{tag}__first"], perm=perm,
                                                     name=f"{tag}__first"))
                source = f"{tag}__first"
            weight = self.weights(name).reshape(1, -1).astype(helper.tensor_dtype_to_np_dtype(elem))
            m.graph.initializer.append(numpy_helper.from_array(weight, f"{tag}__weight"))
            m.graph.node.extend([
                helper.make_node("Flatten", [source], [f"{tag}__flat"], axis=1, name=f"{tag}__flat"),
                helper.make_node("Mul", [f"{tag}__flat", f"{tag}__weight"], [f"{tag}__weighted"], name=f"{tag}__weighted")])
            flat.append(f"{tag}__weighted")
        m.graph.node.append(helper.make_node("Concat", flat, [OBJECTIVE], axis=1, name=OBJECTIVE))
        m.graph.output.append(helper.make_tensor_value_info(OBJECTIVE, types.get(self.outputs[0], onnx.TensorProto.FLOAT),
                                                            None))
        return m, OBJECTIVE

    def absolute(self) -> Objective:
        """The same outputs with every element weighted 1: the plain squared error of the outputs."""
        return replace(self, scales=(1.0,) * len(self.parts))

    def as_json(self) -> list[dict]:
        return [{"part": part.name, "output": part.output, "source": part.source or None, "spread": spread,
                 "measured_by": basis} for part, spread, basis in zip(self.parts, self.spreads, self.basis)]


def part_sources(model: onnx.ModelProto, outputs: list[str]) -> list[str]:
    """``outputs`` and the inputs of a Concat that produces one (through Identity nodes)."""
    producer_of = producers(model.graph)
    names = list(outputs)
    for name in outputs:
        node = producer_of.get(name)
        while node is not None and node.op_type == "Identity":
            node = producer_of.get(node.input[0])
        if node is not None and node.op_type == "Concat":
            names += [i for i in node.input if i]
    return list(dict.fromkeys(names))


def find_parts(model: onnx.ModelProto, outputs: list[str], axes, one: dict[str, np.ndarray],
               provider: str = "cpu", run: Run | None = None) -> tuple[list[OutputPart], dict[str, tuple[int, ...]]]:
    """Every part of ``outputs`` (see ``concat_parts``) and each output's per-sample shape, batch first,
    measured on the feeds ``one`` of one sample."""
    names = part_sources(model, outputs)
    try:
        values = (run or free_runs(model, names, provider))(one, names)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's exception types
        raise InputError(f"onnxruntime cannot compute the protected outputs {outputs}: {runtime.ort_message(exc)}") from None
    shapes = {name: tuple(np.shape(v)) for name, v in zip(names, values)}
    axes = {name: int(axes.get(name) or 0) for name in outputs}
    for name in outputs:
        if not 0 <= axes[name] < max(len(shapes[name]), 1):
            raise InputError(f"--batch-axis {name}={axes[name]}: output {name!r} has {len(shapes[name])} axes")
    parts = [part for name in outputs for part in concat_parts(model, name, axes[name], shapes)]
    per_sample = {}
    for name in outputs:
        full = list(shapes[name])
        axis = axes[name]
        per_sample[name] = tuple(full[:axis] + full[axis + 1:])
    return parts, per_sample


def measure_objective(model: onnx.ModelProto, data: Dataset, output: str | list[str] | tuple | None = None,
                      given_axes: dict[str, int] | None = None, provider: str = "cpu", threads: int | None = None,
                      batch_size: int = 256) -> Objective:
    """The objective of ``model`` on the calibration ``data`` (batch-first inputs): the protected
    outputs (``output``: a name, several, or None for every float output), their batch axes, parts
    and scales, streamed over the data in batches."""
    names = [output] if isinstance(output, str) else list(output or [])
    outputs = protected_outputs(model, names or None)
    for name, axis in (given_axes or {}).items():
        if name not in outputs:
            raise InputError(f"--batch-axis {name}={axis}: {name!r} is neither a per-sample input nor a protected "
                             f"output (protected: {outputs})")
    one = data.subset(1).inputs()
    fixed = declared_batch(model, data)  # a graph that holds its traced batch runs on exactly that many
    run: Run | None = None
    if not fixed:  # one session for the axes, the parts and the moments
        try:
            run = free_runs(model, part_sources(model, outputs), provider, threads)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's exception types
            raise InputError(f"onnxruntime cannot compute the protected outputs {outputs}: "
                             f"{runtime.ort_message(exc)}") from None
    found = output_batch_axes(model, outputs, one, data.repeated(2).inputs(), given_axes, provider, run, fixed)
    unbatched = [name for name in outputs if found[name] is None]
    if unbatched and (names or len(unbatched) == len(outputs)):
        name = unbatched[0]
        raise InputError(f"no axis of output {name!r} holds the samples (its shape does not grow with the batch); "
                         f"name it with --batch-axis {name}=AXIS, or protect another tensor with --output")
    outputs = [name for name in outputs if name not in unbatched]  # by default: outputs of every sample only
    axes = {name: int(found[name] or 0) for name in outputs}
    parts, shapes = find_parts(model, outputs, axes, one, provider, run)
    moments = {name: ElementMoments() for name in outputs}
    if run is None:
        session = runtime.tensor_session(model, outputs, provider, threads)
        run = lambda feeds, wanted: session.run(wanted, feeds)  # noqa: E731
    for feeds, real in data.runs(batch_size, fixed):
        for name, value in zip(outputs, run(feeds, outputs)):
            moments[name].add(batch_first(np.asarray(value), axes[name])[:real])
    scales, spreads, basis = [], [], []
    for part in parts:
        variance = part.take(moments[part.output].variance()[None])
        spread, how = float(variance.mean()), "spread"
        if not spread > 0:
            spread, how = float(part.take(moments[part.output].mean_square()[None]).mean()), "mean square"
        if not spread > 0:
            spread, how = 1.0, "constant zero"
        spreads.append(spread)
        basis.append(how)
        scales.append(float(np.sqrt(spread * variance.size)))
    return Objective(tuple(outputs), axes, tuple(parts), tuple(scales), tuple(spreads), tuple(basis), shapes)
