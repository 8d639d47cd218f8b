"""Streaming per-layer sums over the calibration data; memory does not grow with its size.

For each layer: C_i = E[G_i], B_ij = E[G_i z_j], A_ij = E[G_i z_j^2] (the ECP statistics), and the
plain activation moments E[z_j], E[z_j^2]. Loss gradients give E[dL/dW] for gradmag.

Layers whose weight is shared across positions (Conv, MatMul on sequences) use the generalisation
in ``conv``: per sample, u = sum_t g z_t and v = sum_t g replace g z and g, either exactly
(``shared="exact"``) or without the cross-position terms (``shared="positions"``). Their activation
moments are over samples and positions (the im2col patch values).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import onnx

from onnxprune.derivatives.engines import loss_gradients
from onnxprune.derivatives.plan import MEMORY_BUDGET, DerivativePlan, DerivativeSettings, Progress, batch_step, plan
from onnxprune.derivatives.shared import CHUNK_ELEMENTS, STATISTICS, accumulate_shared, shared_loss_gradient
from onnxprune.errors import InputError
from onnxprune.find.geometry import im2col
from onnxprune.find.layers import Layer, sample_major
from onnxprune.io.data import Dataset
from onnxprune.runtime import blas_threads, one_blas_thread


@dataclass
class LayerStatistics:
    """Sums over n samples; the properties give the expectations the saliencies use.

    For a 2-D layer (``add``) the products of one batch are taken in float32 (float64 when the data
    is float64) on z shifted by a fixed per-input value c (the first batch's mean, rounded to
    float32), and summed across batches in float64: ``sum_gz`` and ``sum_gz2`` then hold
    sum G (z - c) and sum G (z - c)^2, which the properties A and B undo in float64. The shift
    keeps the G-weighted variance A - B^2/C, the ECP residual, accurate when |E z| >> std z.
    """

    n: int
    sum_g: np.ndarray       # (out,)     sum_s G_si
    sum_gz: np.ndarray      # (out, in)  sum_s G_si (z_sj - c_j)
    sum_gz2: np.ndarray     # (out, in)  sum_s G_si (z_sj - c_j)^2
    sum_z: np.ndarray       # (in,) or, for a grouped Conv, (groups, in)
    sum_z2: np.ndarray      # like sum_z
    count_z: int = 0        # values summed in sum_z per entry (samples x positions)
    shift: np.ndarray | None = None  # c (in,), set by the first ``add``; None: c = 0
    sum_g_positions: np.ndarray | None = None  # (out,) sum_s sum_t G_sti: sum_g without cross-position terms

    @classmethod
    def zeros(cls, layer: Layer) -> LayerStatistics:
        o, i = layer.out_features, layer.in_features
        groups = layer.conv.groups if layer.conv is not None else 1
        zshape = (i,) if groups == 1 else (groups, i)
        return cls(0, np.zeros(o), np.zeros((o, i)), np.zeros((o, i)), np.zeros(zshape), np.zeros(zshape),
                    sum_g_positions=np.zeros(o))

    def add(self, g: np.ndarray, z: np.ndarray) -> None:
        """Accumulate a batch: g = per-sample G (batch, out), z = layer input (batch, in)."""
        z = np.asarray(z).reshape(len(z), -1)
        dtype = np.float64 if np.float64 in (np.asarray(g).dtype, z.dtype) else np.float32
        if self.shift is None:
            self.shift = z.mean(0, dtype=np.float64).astype(np.float32).astype(np.float64)
        zc = z.astype(dtype, copy=False) - self.shift.astype(dtype)
        zc2 = zc * zc
        g = np.asarray(g, dtype)
        with one_blas_thread():  # OpenBLAS rounds differently with other thread counts: same bytes for any --threads
            products = g.T @ np.concatenate([zc, zc2], axis=1)  # one (out, 2 in) product: faster than two
        if dtype == np.float32 and not np.isfinite(products).all():
            return self.add(np.asarray(g, np.float64), z.astype(np.float64))  # beyond float32's range
        n = len(z)
        self.n += n
        self.count_z += n
        self.sum_g += g.sum(0, dtype=np.float64)
        if self.sum_g_positions is not None:  # one position: no cross terms
            self.sum_g_positions += g.sum(0, dtype=np.float64)
        self.sum_gz += products[:, :zc.shape[1]]
        self.sum_gz2 += products[:, zc.shape[1]:]
        first, second = zc.sum(0, dtype=np.float64), zc2.sum(0, dtype=np.float64)
        self.sum_z += first + n * self.shift
        self.sum_z2 += second + 2 * self.shift * first + n * self.shift**2

    def add_shared(self, layer: Layer, g: np.ndarray, z: np.ndarray, scale: float = 1.0, exact: bool = True) -> None:
        """Accumulate a batch of a shared-weight layer: g (batch, R, out, positions) the probes'
        derivatives at the pre-activation (scale 1/R for random probes), z the layer input as the
        graph has it. Patches are built in chunks of samples so memory stays bounded. As in ``add``,
        products are float32 for float32 data, on patches shifted by a fixed per-column value c (the
        first chunk's mean over samples, groups and positions, rounded to float32), and each chunk's
        sums are added in float64; a chunk beyond float32's range is summed again in float64."""
        n, r, out, positions = g.shape
        per_sample = r * out * positions + 2 * layer.in_features * positions * (layer.conv.groups if layer.conv else 1)
        chunk = max(1, CHUNK_ELEMENTS // max(1, per_sample))
        dtype = np.float64 if np.float64 in (np.asarray(g).dtype, np.asarray(z).dtype) else np.float32
        for start in range(0, n, chunk):
            patches = layer_patches(layer, z[start:start + chunk], dtype)
            if patches.shape[-1] != positions:
                raise InputError(f"layer {layer.name}: {patches.shape[-1]} input windows but {positions} output "
                                 "positions; its geometry is not understood")
            if self.shift is None:
                mean = patches.mean((0, 1, 3), dtype=np.float64)
                self.shift = mean.astype(np.float32).astype(np.float64)
            block = self._shared_block(g[start:start + chunk], patches - self.shift.astype(dtype)[:, None], scale, exact)
            if not all(np.isfinite(v).all() for v in block):
                block = self._shared_block(np.asarray(g[start:start + chunk], np.float64),
                                           patches.astype(np.float64) - self.shift[:, None], scale, exact)
            self.sum_g += block[0]
            self.sum_gz += block[1]
            self.sum_gz2 += block[2]
            if self.sum_g_positions is not None:
                self.sum_g_positions += block[3]
            self.sum_z += patches.sum(-1, dtype=np.float64).sum(0).reshape(self.sum_z.shape)
            self.sum_z2 += np.einsum("ngjt,ngjt->gj", patches, patches, dtype=np.float64).reshape(self.sum_z2.shape)
        self.n += n
        self.count_z += n * positions

    def _shared_block(self, g: np.ndarray, centred: np.ndarray, scale: float, exact: bool) -> tuple[np.ndarray, ...]:
        """(sum_g, sum_gz, sum_gz2, sum_g_positions) of one chunk, from patches less the shift; the last
        is what tells ECP a row reaches the output (``C_positions``): without it every row reads as cut off."""
        block = SimpleNamespace(sum_g=np.zeros_like(self.sum_g), sum_gz=np.zeros_like(self.sum_gz),
                                sum_gz2=np.zeros_like(self.sum_gz2), sum_g_positions=np.zeros_like(self.sum_g))
        with one_blas_thread():  # the same rounding whatever --threads says, as in ``add``
            accumulate_shared(block, g, centred, scale, exact)
        return block.sum_g, block.sum_gz, block.sum_gz2, block.sum_g_positions

    @property
    def A(self) -> np.ndarray:
        if self.shift is None:
            return self.sum_gz2 / self.n
        c = self.shift[None, :]
        return (self.sum_gz2 + 2 * c * self.sum_gz + self.sum_g[:, None] * c * c) / self.n

    @property
    def B(self) -> np.ndarray:
        if self.shift is None:
            return self.sum_gz / self.n
        return (self.sum_gz + self.sum_g[:, None] * self.shift[None, :]) / self.n

    @property
    def C(self) -> np.ndarray:
        return self.sum_g / self.n

    @property
    def C_positions(self) -> np.ndarray:
        """E[sum_t G_ti]: C without the cross-position terms, the scale C would have if the positions'
        derivatives did not cancel (a shift of every key is invisible through a softmax: C ~ 0 there)."""
        return self.C if self.sum_g_positions is None else self.sum_g_positions / self.n

    def _rows(self, values: np.ndarray) -> np.ndarray:
        """Per-group moments (groups, in) -> one row per output (out, in); (in,) stays."""
        if values.ndim == 1:
            return values
        return np.repeat(values, len(self.sum_g) // len(values), axis=0)

    @property
    def mean_z(self) -> np.ndarray:
        """E[z_j] over samples (and positions): (in,), or (out, in) for a grouped Conv."""
        return self._rows(self.sum_z / max(self.count_z, 1))

    @property
    def var_z(self) -> np.ndarray:
        mean = self.sum_z / max(self.count_z, 1)
        return self._rows(np.maximum(self.sum_z2 / max(self.count_z, 1) - mean**2, 0.0))


def layer_patches(layer: Layer, z: np.ndarray, dtype=np.float64) -> np.ndarray:
    """What each weight of a shared-weight layer multiplies, (batch, groups, in, positions)."""
    z = np.asarray(z)
    if layer.conv is not None:
        return im2col(z, layer.conv, dtype)
    n = len(z)
    return np.asarray(z, dtype).reshape(n, -1, layer.in_features).transpose(0, 2, 1)[:, None]


def collect_statistics(model: onnx.ModelProto, layers: list[Layer], data: Dataset, output: str, *,
                       shared: str = "exact", progress: Progress | None = None, info: dict | None = None,
                       **settings) -> dict[str, LayerStatistics]:
    """ECP statistics of every layer over ``data`` from the output derivatives ``plan`` chooses
    (``settings``: a DerivativeSettings' fields: probes, seed, engine, memory_budget, batch_size,
    provider, threads); ``shared`` ("exact" or "positions") chooses how shared-weight layers are
    summed (see ``shared``). ``info`` receives what ran (``DerivativePlan.info``)."""
    if shared not in STATISTICS:
        raise InputError(f"shared-weight statistics must be one of {STATISTICS}, got {shared!r}")
    chosen = DerivativeSettings(**settings)
    derivatives = plan(model, layers, data, output, chosen)
    stats = {layer.name: LayerStatistics.zeros(layer) for layer in layers}
    with blas_threads(chosen.threads):
        _accumulate(derivatives, layers, data, stats, shared, progress, chosen.threads or os.cpu_count() or 1)
    if all(not np.any(st.sum_g) for st in stats.values()):
        raise InputError(f"the derivative of {output!r} is zero at every layer (a piecewise-constant op such as "
                         "Round, Sign or ArgMax lies on the way?); protect a tensor before it with --output")
    if info is not None:
        info.update(derivatives.info())
    return stats


def _accumulate(derivatives: DerivativePlan, layers, data, stats, shared, progress, workers: int = 1) -> None:
    """Add every batch of ``data`` to ``stats``: G in the runtime's float type, products in ``add``.
    The shared-weight layers' sums (the costly part) run on ``workers`` threads, a layer per thread
    with one BLAS thread each: every layer's sums are computed alone and in the same order, so the
    bytes are the same for any number of threads."""
    jac, shape = derivatives.jac, derivatives.shape
    sharing = [layer for layer in layers if layer.shared]
    with ThreadPoolExecutor(max(1, min(workers, len(sharing)))) as pool, one_blas_thread():
        for feeds in derivatives.batches(data, progress):
            squares, inputs = jac.squares(feeds, shape)
            pending = [pool.submit(stats[layer.name].add_shared, layer, squares[layer.name], inputs[layer.name], jac.scale,
                                   shared == "exact") for layer in sharing]
            for layer in layers:
                if layer.shared:
                    continue
                g = squares[layer.name]
                if not np.isfinite(g).all():  # beyond float32's range: square the rows in float64
                    rows = jac.rows(feeds, shape)[0][layer.name][..., 0].astype(np.float64)
                    g = np.einsum("sro,sro->so", rows, rows) * jac.scale
                stats[layer.name].add(g, inputs[layer.name])
            for done in pending:
                done.result()


def collect_moments(model: onnx.ModelProto, layers: list[Layer], data: Dataset, *, batch_size: int = 256,
                    provider: str = "cpu", threads: int | None = None, memory_budget: int = MEMORY_BUDGET,
                    progress: Progress | None = None) -> dict[str, LayerStatistics]:
    """The activation moments alone (E[z_j], Var z_j over samples and positions; no derivative, G
    stays 0) from forward passes: what the mean-compensation scorer needs, at a forward pass's cost."""
    from onnxprune import runtime

    stats = {layer.name: LayerStatistics.zeros(layer) for layer in layers}
    names = list(dict.fromkeys(layer.input for layer in layers if layer.input not in data.feeds))
    session = runtime.tensor_session(model, names, provider, threads, arena=False) if names else None
    step = batch_step(model, layers, data, 1, batch_size, provider, memory_budget)
    done = 0
    with blas_threads(threads):
        for feeds, _ in data.batches(step):
            n = len(next(iter(feeds.values())))
            values = {**feeds, **dict(zip(names, session.run(names, feeds) if session else []))}
            for layer in layers:
                z = sample_major(layer, np.asarray(values[layer.input]), n)
                if layer.shared:
                    patches = layer_patches(layer, z)                      # (n, groups, in, positions)
                    first, second = patches.sum((0, 3)), (patches * patches).sum((0, 3))
                    count = n * patches.shape[-1]
                else:
                    flat = z.reshape(n, -1).astype(np.float64)
                    first, second, count = flat.sum(0), (flat * flat).sum(0), n
                st = stats[layer.name]
                st.sum_z += first.reshape(st.sum_z.shape)
                st.sum_z2 += second.reshape(st.sum_z2.shape)
                st.count_z += count
                st.n += n
            done += n
            if progress:
                progress(done, len(data))
    return stats


def collect_loss_gradients(model: onnx.ModelProto, layers: list[Layer], data: Dataset, output: str, *,
                           batch_size: int = 256, provider: str = "cpu", threads: int | None = None,
                           progress: Progress | None = None, engine: str = "auto",
                           memory_budget: int = MEMORY_BUDGET, info: dict | None = None) -> dict[str, np.ndarray]:
    """E[dL/dW] in the (out, in) view, L = softmax cross-entropy of ``output`` against the labels."""
    if data.labels is None:
        raise InputError("loss gradients need labels in the data (array 'y' or 'labels')")
    grads = loss_gradients(model, layers, output, provider=provider, threads=threads, engine=engine)
    sums = {layer.name: np.zeros((layer.out_features, layer.in_features)) for layer in layers}
    step = batch_step(model, layers, data, 1, batch_size, provider, memory_budget)
    done = 0
    with blas_threads(threads):
        for feeds, labels in data.batches(step):
            assert labels is not None  # checked above
            g, z = grads(feeds, labels)
            for layer in layers:
                if layer.shared:
                    sums[layer.name] += shared_loss_gradient(g[layer.name], layer_patches(layer, z[layer.name]))
                else:
                    sums[layer.name] += g[layer.name].T @ np.asarray(z[layer.name], np.float64).reshape(len(labels), -1)
            done += len(labels)
            if progress:
                progress(done, len(data))
    if info is not None and "engine" not in info:
        info.update(engine=grads.choice, batch=step)
    return {name: s / len(data) for name, s in sums.items()}
