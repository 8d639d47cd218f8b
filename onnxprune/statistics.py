"""Streaming per-layer sums over the calibration data; memory does not grow with its size.

For each layer: C_i = E[G_i], B_ij = E[G_i z_j], A_ij = E[G_i z_j^2] (the ECP statistics), and the
plain activation moments E[z_j], E[z_j^2]. Loss gradients give E[dL/dW] for gradmag.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from .data import Dataset
from .jacobians import LossGradients, OutputJacobians, output_shape
from .layers import Layer

Progress = Callable[[int, int], None]  # (samples done, samples total)


@dataclass
class LayerStatistics:
    """Sums over n samples; the properties give the expectations the saliencies use."""

    n: int
    sum_g: np.ndarray       # (out,)     sum_s G_si
    sum_gz: np.ndarray      # (out, in)  sum_s G_si z_sj
    sum_gz2: np.ndarray     # (out, in)  sum_s G_si z_sj^2
    sum_z: np.ndarray       # (in,)
    sum_z2: np.ndarray      # (in,)

    @classmethod
    def zeros(cls, layer: Layer) -> "LayerStatistics":
        o, i = layer.out_features, layer.in_features
        return cls(0, np.zeros(o), np.zeros((o, i)), np.zeros((o, i)), np.zeros(i), np.zeros(i))

    def add(self, g: np.ndarray, z: np.ndarray) -> None:
        """Accumulate a batch: g = per-sample G (batch, out), z = layer input (batch, in)."""
        z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)
        z2 = z * z
        self.n += len(z)
        self.sum_g += g.sum(0)
        self.sum_gz += g.T @ z
        self.sum_gz2 += g.T @ z2
        self.sum_z += z.sum(0)
        self.sum_z2 += z2.sum(0)

    @property
    def A(self) -> np.ndarray:
        return self.sum_gz2 / self.n

    @property
    def B(self) -> np.ndarray:
        return self.sum_gz / self.n

    @property
    def C(self) -> np.ndarray:
        return self.sum_g / self.n

    @property
    def mean_z(self) -> np.ndarray:
        return self.sum_z / self.n

    @property
    def var_z(self) -> np.ndarray:
        return np.maximum(self.sum_z2 / self.n - self.mean_z**2, 0.0)


def collect_statistics(model: onnx.ModelProto, layers: list[Layer], data: Dataset, output: str, *,
                       probes: int | None = None, batch_size: int = 256, seed: int = 0, provider: str = "cpu",
                       threads: int | None = None, progress: Progress | None = None) -> dict[str, LayerStatistics]:
    """ECP statistics of every layer over ``data`` with exact (or ``probes`` random) output Jacobians."""
    shape = output_shape(model, output, data.feeds, provider)
    width = int(np.prod(shape)) if shape else 1
    jac = OutputJacobians(model, layers, output, width, probes=probes, seed=seed, provider=provider, threads=threads)
    stats = {layer.name: LayerStatistics.zeros(layer) for layer in layers}
    step = max(1, min(batch_size, 16384 // jac.repeats))
    done = 0
    for feeds, _ in data.batches(step):
        g, z = jac(feeds, shape)
        for layer in layers:
            stats[layer.name].add(g[layer.name], z[layer.name])
        done += len(next(iter(feeds.values())))
        if progress:
            progress(done, len(data))
    return stats


def collect_loss_gradients(model: onnx.ModelProto, layers: list[Layer], data: Dataset, output: str, *,
                           batch_size: int = 256, provider: str = "cpu", threads: int | None = None,
                           progress: Progress | None = None) -> dict[str, np.ndarray]:
    """E[dL/dW] in the (out, in) view, L = softmax cross-entropy of ``output`` against the labels."""
    grads = LossGradients(model, layers, output, provider=provider, threads=threads)
    sums = {layer.name: np.zeros((layer.out_features, layer.in_features)) for layer in layers}
    done = 0
    for feeds, labels in data.batches(batch_size):
        g, z = grads(feeds, labels)
        for layer in layers:
            sums[layer.name] += g[layer.name].T @ np.asarray(z[layer.name], np.float64).reshape(len(labels), -1)
        done += len(labels)
        if progress:
            progress(done, len(data))
    return {name: s / len(data) for name, s in sums.items()}
