"""Tensor shapes of a model version: measured on one sample, or read from shape inference."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping

import numpy as np
import onnx

from onnxprune import runtime
from onnxprune.graph.index import inferred
from onnxprune.graph.passes import free_batch_copy
from onnxprune.io.npz import NpzColumn


def tensor_shapes(model: onnx.ModelProto, names: list[str], feeds: Mapping[str, np.ndarray | NpzColumn],
                  provider: str = "cpu", folded: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of tensors ``names`` (graph inputs or computed): what shape inference tells
    where it is sure (a free batch on the first axis, every other dim known), measured on one sample of
    ``feeds`` for the rest; a tensor named in ``folded`` holds the batch folded with positions in its
    rows (a folded layer's pre-activation), so its per-sample shape is the one sample's whole shape
    (positions, features), always measured."""
    shapes = {k: tuple(v.shape[1:]) for k, v in feeds.items() if k in names}
    static = tensor_shapes_static(model)
    for name in names:
        known = static.get(name)
        if name not in shapes and name not in folded and known and known[0] is None and all(d is not None for d in known[1:]):
            shapes[name] = tuple(known[1:])
    wanted = [n for n in dict.fromkeys(names) if n not in shapes]
    if wanted:
        free = free_batch_copy(model)
        values = runtime.run_tensors(free, {k: v[:1] for k, v in feeds.items()}, wanted, provider)
        shapes.update({n: tuple(v.shape if n in folded else v.shape[1:]) for n, v in zip(wanted, values)})
    return shapes


def output_shape(model: onnx.ModelProto, output: str, feeds: Mapping[str, np.ndarray | NpzColumn],
                 provider: str = "cpu") -> tuple[int, ...]:
    """Shape of tensor ``output`` for one sample (run on the first sample of ``feeds``)."""
    return tensor_shapes(model, [output], feeds, provider)[output]


def tensor_shapes_static(model: onnx.ModelProto) -> dict[str, tuple]:
    """Static per-tensor shapes shape inference can tell (None for unknown dims), once per model version."""
    graph = inferred(model, data_prop=True).graph
    shapes = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes


class ShapeMemo:
    """``tensor_shapes`` remembered for one graph: a schedule of several steps scores the same graph
    with new layer weights at every step, and no shape depends on those weights' values (the key is
    the graph with every other initializer's value, and the data's per-sample shapes)."""

    def __init__(self):
        self.key, self.shapes = None, {}

    def __call__(self, model, layers, feeds, provider) -> Callable[..., dict[str, tuple[int, ...]]]:
        varying = {n for layer in layers for n in (layer.weight, layer.bias) if n}
        digest = hashlib.sha256(provider.encode())
        for part in [*model.graph.node, *model.graph.input, *model.graph.output]:
            digest.update(part.SerializeToString())
        for t in model.graph.initializer:
            digest.update(f"{t.name}:{tuple(t.dims)}:{t.data_type}".encode())
            if t.name not in varying:
                digest.update(t.SerializeToString())
        for name, value in feeds.items():
            digest.update(f"{name}:{tuple(value.shape[1:])}:{value.dtype}".encode())
        if digest.digest() != self.key:
            self.key, self.shapes = digest.digest(), {}

        def shapes(model_, names, feeds_, provider_=provider):
            missing = [n for n in names if n not in self.shapes]
            if missing:
                self.shapes.update(tensor_shapes(model_, missing, feeds_, provider_))
            return {n: self.shapes[n] for n in names}

        return shapes


SHAPES = ShapeMemo()  # one graph's shapes, the last one scored
