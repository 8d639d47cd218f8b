"""Repairs: what is done to the surviving weights after a mask (the second ingredient of ``ecp-refit``).

A repair is an object with ``start(dense, layers, data, output, ...)`` that returns a run, applied
after every step of a schedule: ``run(current, layers, final) -> (model, reports)``, one
``LayerRefit`` per layer. ``NONE`` leaves the mask's model as it is; ``Compose`` applies repairs
one after the other. The repairs themselves: ``refit.Refit`` (ridge least squares per layer),
``distill.Distill`` (label-free distillation of the whole network) and ``blockrefit.BlockRefit``
(Gauss-Newton on two-layer blocks). Here is also what they share: where a layer's pre-activation
with its bias is read (``fit_target``), its inputs and outputs as rows (``patch_rows``,
``position_rows``), and writing re-solved weights back in the layer's own layout (``write_layer``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune import runtime
from onnxprune.derivatives.statistics import layer_patches
from onnxprune.edit.rewrite import shift_bias
from onnxprune.find.layers import Layer, analyse_graph, by_position
from onnxprune.graph.index import read_initializer
from onnxprune.io.data import Dataset


class RepairRun(Protocol):
    """One pruning run's repair: called after every step with the pruned model and its layers."""

    def __call__(self, current: onnx.ModelProto, layers: list[Layer], final: bool,
                 rows: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, list]:
        ...


class Repair(Protocol):
    """What ``Pruner(repair=...)`` takes: a name for reports, and ``start`` for one run."""

    @property
    def name(self) -> str:
        ...

    def start(self, dense: onnx.ModelProto, layers: list[Layer], data: Dataset, output: str, **options) -> RepairRun:
        ...


@dataclass
class LayerRefit:
    """What the refit did to one layer: the damping chosen and the mean squared pre-activation error
    against the dense model on the held-out calibration samples, before and after (G-weighted when
    ``weighted``); ``skipped`` says why a layer was left as it was."""

    layer: str
    damping: float | None = None
    heldout_error_before: float | None = None
    heldout_error_after: float | None = None
    weighted: bool = False
    skipped: str | None = None


def refit_problem(layer: Layer) -> str | None:
    """Why ``layer`` cannot be refit, or None."""
    if any(step.op == "DequantizeLinear" for step in layer.weight_path):
        return "quantized weights are not re-solved"
    return None


def groups_of(layer: Layer) -> int:
    return layer.conv.groups if layer.conv is not None else 1


def fit_target(model: onnx.ModelProto, layer: Layer) -> tuple[str, np.ndarray | None]:
    """The tensor holding the layer's pre-activation with its bias, and per output the factor it
    is divided by: a following BatchNormalization that holds the bias gives its output / scale."""
    if layer.bias_node and layer.bias_factors is not None:
        node = next((n for n in model.graph.node if n.name == layer.bias_node), None)
        if node is not None and node.op_type == "BatchNormalization":
            factors = np.asarray(layer.bias_factors, np.float64)
            return node.output[0], np.where(factors == 0, 1.0, factors)
    return layer.preact, None


def patch_rows(layer: Layer, z: np.ndarray) -> np.ndarray:
    """What the weights multiply, one row per (sample, position): (M, groups, in)."""
    if not layer.shared:
        return np.asarray(z, np.float64).reshape(len(z), 1, -1)
    p = layer_patches(layer, z)  # (n, groups, in, positions)
    return np.ascontiguousarray(p.transpose(0, 3, 1, 2)).reshape(-1, p.shape[1], p.shape[2]).astype(np.float64)


def position_rows(layer: Layer, a: np.ndarray, factors: np.ndarray | None = None) -> np.ndarray:
    """Per-output values at every position, one row per (sample, position): (M, out)."""
    rows = by_position(layer, np.asarray(a, np.float64)).transpose(0, 2, 1).reshape(-1, layer.out_features)
    return rows if factors is None else rows / factors


def linear_rows(layer: Layer, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """W x per (sample, position) row: (M, out)."""
    per_group = layer.out_features // groups_of(layer)
    return np.concatenate([x[:, g] @ weight[g * per_group:(g + 1) * per_group].T for g in range(x.shape[1])], axis=1)


def current_bias(model: onnx.ModelProto, layer: Layer, feeds: dict[str, np.ndarray], provider: str = "cpu") -> np.ndarray:
    """The layer's constant term per output in pre-activation units, read off the model itself
    (a - W x on a few samples, a read where ``fit_target`` says), so Gemm's beta, a
    BatchNormalization or a Conv's Add all count."""
    return current_biases(model, [layer], feeds, provider)[layer.name]


def current_biases(model: onnx.ModelProto, layers: list[Layer], feeds: dict, provider: str = "cpu") -> dict[str, np.ndarray]:
    """``current_bias`` of every layer, from one session run (``feeds``: arrays or lazy .npz columns)."""
    few = {k: v[:8] for k, v in feeds.items()}
    targets = {layer.name: fit_target(model, layer) for layer in layers}
    names = list(dict.fromkeys([name for layer in layers for name in (layer.input, targets[layer.name][0])
                                if name not in few]))
    values = {**few, **dict(zip(names, runtime.run_tensors(model, few, names, provider)))}
    out = {}
    for layer in layers:
        target, factors = targets[layer.name]
        weight = layer.to_rows(read_initializer(model, layer.weight))
        rows = position_rows(layer, values[target], factors) - linear_rows(layer, patch_rows(layer, values[layer.input]), weight)
        out[layer.name] = rows.mean(0)
    return out


def structure_key(model: onnx.ModelProto) -> tuple:
    """What a session built for ``model`` depends on apart from initializer values: the nodes and the
    initializers' shapes (units sliced away change the shapes, not the nodes)."""
    return (tuple((n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node),
            tuple((t.name, tuple(t.dims)) for t in model.graph.initializer))


def parametric(m: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``m`` (changed in place) with the initializers ``names`` turned into graph inputs."""
    kept = [t for t in m.graph.initializer if t.name not in names]
    moved = {t.name: t for t in m.graph.initializer if t.name in names}
    declared = {vi.name for vi in m.graph.input}
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    m.graph.input.extend(onnx.helper.make_tensor_value_info(n, t.data_type, list(t.dims))
                         for n, t in moved.items() if n not in declared)
    return m


def write_layer(model: onnx.ModelProto, layer: Layer, weight_rows: np.ndarray, bias_shift: np.ndarray) -> bool:
    """Store effective (out, in) weights back in the layer's own layout and shift its bias; whether
    a bias had to be inserted."""
    stored = next(t for t in model.graph.initializer if t.name == layer.weight)
    dtype = numpy_helper.to_array(stored).dtype
    stored.CopyFrom(numpy_helper.from_array(layer.mask_to_stored(weight_rows / layer.alpha).astype(dtype), layer.weight))
    return shift_bias(model, layer, layer.bias_shift_to_stored(bias_shift), dtype)


class _NoRepairRun:
    def __call__(self, current, layers, final, rows=None):
        return current, []


@dataclass(frozen=True)
class NoRepair:
    """Keep the mask's model (with its bias compensation) as it is."""

    name = "none"

    def start(self, dense, layers, data, output, **options) -> _NoRepairRun:
        return _NoRepairRun()


NONE = NoRepair()


class _ComposedRun:
    def __init__(self, runs):
        self.runs = runs

    def __call__(self, current, layers, final, rows=None):
        reports = []
        for run in self.runs:
            current, report = run(current, layers, final, rows)
            reports += report
            layers = [analyse_graph(current).by_name()[layer.name] for layer in layers]
        return current, reports


@dataclass(frozen=True)
class Compose:
    """Repairs applied one after the other at every step."""

    repairs: tuple

    @property
    def name(self) -> str:
        return " + ".join(r.name for r in self.repairs)

    def start(self, dense, layers, data, output, **options) -> _ComposedRun:
        return _ComposedRun([r.start(dense, layers, data, output, **options) for r in self.repairs])
