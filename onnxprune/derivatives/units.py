"""Unit statistics, unit saliency with compensation, and the choice of the units to remove.

ECP lifted to units (docs: structured-ecp.md). Unit j of a group feeds its consumers' pre-activations
a = W z + b; feeding a constant c_j instead changes the protected output to first order by
dy = sum_p J_p (c_j - z_jp) over the unit's positions p (one position for a neuron; a feature map's
positions, or a Flatten's block of columns), J = dy/dz = sum_i W_ij dy/da_i from the consumers'
pre-activation derivatives (``engines.output_jacobians``). Per sample s and probe r let

    v_srj = sum_p J_srjp        u_srj = sum_p J_srjp z_sjp

(summed over every consumer of the group). Then c_j = E[v.u]/E[v.v] (sums over probes), the unit's
error is E[u.u] - E[v.u]^2/E[v.v] (for a neuron: E[G'_j (z_j - c_j)^2] with G'_j = sum_k (dy_k/dz_j)^2),
and removing a set S together costs the joint first-order error E||sum_{j in S} (c_j v_j - u_j)||^2,
a quadratic form 1' M_S 1 whose cross terms the ``ecp`` selection takes into account (greedily:
each step removes the unit whose addition raises the joint error least). The Gram matrices of u
and v over samples and probes are all it needs, streamed over the calibration data.

Baselines in the same framework (scores per unit, no cross terms): ``ecp-unit`` (the per-unit error
with c_j), ``flap`` (FLAP's fluctuation sum_cols ||W[:, col]||^2 Var(x_col), with the mean E[z_j] as
the constant), ``wanda`` (onnxsim's structured Wanda: ||producer row j||_2 * ||z_j||_2, no constant)
and ``l2`` (Li et al. / onnxsim: ||producer row j||_2, no constant).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune import runtime
from onnxprune.derivatives import shards
from onnxprune.derivatives.plan import DerivativePlan, DerivativeSettings, Progress, plan
from onnxprune.derivatives.shards import shard_seed
from onnxprune.derivatives.statistics import layer_patches
from onnxprune.find.layers import Layer, full_rows
from onnxprune.find.unitgroups import Consumer, UnitGroup
from onnxprune.graph.index import read_initializer
from onnxprune.io.data import Dataset

CHUNK = 1 << 22  # float64 entries of one temporary (32 MB)


@dataclass
class UnitStatistics:
    """Sums over n samples for one group: Gram matrices of v and u (over samples and probes), the
    units' values (over samples and positions) and their consumers' input columns."""

    n: int
    vv: np.ndarray | None
    vu: np.ndarray | None       # vu[j, l] = sum v_j u_l
    uu: np.ndarray | None
    sum_z: np.ndarray
    sum_z2: np.ndarray
    count_z: int
    fluctuation: np.ndarray     # sum over consumer columns of ||W[:, col]||^2 * Var(x_col), per unit
    column_norm2: np.ndarray    # sum over consumer columns of ||W[:, col]||^2, per unit

    @property
    def mean_z(self) -> np.ndarray:
        return self.sum_z / max(self.count_z, 1)


def _unit_values(layer: Layer, consumer: Consumer, units: int, z: np.ndarray) -> np.ndarray:
    """The unit values a consumer reads, (samples, units, positions)."""
    z = np.asarray(z, np.float64)
    block, width, own = consumer.block, consumer.width or units, consumer.own(units)
    if layer.kind in ("sequence", "folded"):  # (samples, ..., units x block): positions and the block's features
        return z.reshape(len(z), -1, width, block)[:, :, own].transpose(0, 2, 1, 3).reshape(len(z), units, -1)
    if layer.kind == "conv":
        return z.reshape(len(z), width, -1)[:, own]
    return z.reshape(len(z), width, block)[:, own]


def _uv(layer: Layer, weight: np.ndarray, g: np.ndarray, z: np.ndarray, units: int, consumer: Consumer, scale: float):
    """u and v (samples, R, units) of one consumer from its pre-activation derivatives g (s, R, out, T)."""
    s, r = g.shape[:2]
    if not layer.shared:
        d = np.einsum("sro,oi->sri", g[..., 0].astype(np.float64), weight)
        x = np.asarray(z, np.float64).reshape(s, -1)
        u, v = d * x[:, None, :], d
    else:
        patches = layer_patches(layer, z)
        patches = patches.reshape(s, -1, patches.shape[-1])  # (s, in of every group, T)
        per = max(1, CHUNK // max(1, r * weight.shape[1] * patches.shape[-1]))
        u, v = np.empty((s, r, weight.shape[1])), np.empty((s, r, weight.shape[1]))
        for start in range(0, s, per):
            d = np.einsum("sroq,oi->sriq", g[start:start + per].astype(np.float64), weight)
            u[start:start + per] = np.einsum("sriq,siq->sri", d, patches[start:start + per])
            v[start:start + per] = d.sum(-1)
    root = np.sqrt(scale)
    width, own = consumer.width or units, consumer.own(units)
    return (root * u.reshape(s, r, width, consumer.block)[:, :, own].sum(-1),
            root * v.reshape(s, r, width, consumer.block)[:, :, own].sum(-1))


def _consumer_columns(layer: Layer, z: np.ndarray) -> np.ndarray:
    """The values each consumer column multiplies, (samples x positions, in)."""
    if not layer.shared:
        return np.asarray(z, np.float64).reshape(len(z), -1)
    p = layer_patches(layer, z)
    p = p.reshape(len(p), -1, p.shape[-1])  # every group's columns side by side
    return p.transpose(0, 2, 1).reshape(-1, p.shape[1])


def unit_statistics(model: onnx.ModelProto, groups: list[UnitGroup], layers: dict[str, Layer], data: Dataset,
                    output: str, *, jacobians: bool = True, progress: Progress | None = None, info: dict | None = None,
                    **settings) -> dict[str, UnitStatistics]:
    """Streamed statistics of every group over ``data``: the Jacobian sums (only when ``jacobians``)
    from the output derivatives ``plan`` chooses (``settings``: a DerivativeSettings' fields), as
    the layer statistics do, in this process or on the sharded service; ``info`` receives what ran."""
    chosen = DerivativeSettings(**settings)
    job = UnitJob(model, groups, layers, output, None, chosen)
    ran: dict = {}
    step = chosen.batch_size
    if jacobians:
        derivatives = plan(model, job.consumers, data, output, chosen)
        job.plan, step, ran = derivatives.detached(), derivatives.step, derivatives.info()
    if chosen.sharded:
        sums, sharding = shards.run(job, data, step, progress)
        ran.update(sharding)
        weights = job.weights()
    else:
        job.start()
        with runtime.blas_threads(chosen.threads):
            sums = job.sums(data, progress)
        weights = job.consumer_weights
    if info is not None:
        info.update(ran)
    return {g.name: _finish(sums[g.name], g, weights, jacobians) for g in groups}


@dataclass
class UnitSums:
    """One group's sums over n samples: the Gram matrices of v and u (when Jacobians are taken), the
    unit values' moments, and per consumer the count, sum and sum of squares of its input columns."""

    n: int
    vv: np.ndarray
    vu: np.ndarray
    uu: np.ndarray
    sum_z: np.ndarray
    sum_z2: np.ndarray
    count: int
    col: dict[str, np.ndarray]  # consumer layer -> (3, its inputs)

    @classmethod
    def zeros(cls, group: UnitGroup, weights: dict[str, np.ndarray]) -> UnitSums:
        k = group.units
        return cls(0, np.zeros((k, k)), np.zeros((k, k)), np.zeros((k, k)), np.zeros(k), np.zeros(k), 0,
                   {c.layer: np.zeros((3, weights[c.layer].shape[1])) for c in group.consumers})

    def merge(self, other: UnitSums) -> UnitSums:
        """Add ``other``'s sums (another set of samples) to these; return self."""
        self.n += other.n
        self.count += other.count
        for name in ("vv", "vu", "uu", "sum_z", "sum_z2"):
            getattr(self, name)[...] += getattr(other, name)
        for layer, values in self.col.items():
            values += other.col[layer]
        return self


@dataclass
class UnitJob:
    """``unit_statistics``' sums, in this process or on a worker shard by shard: ``plan`` (the driver's
    derivative choices, detached) when the Jacobian sums are taken, else plain forward passes."""

    model: onnx.ModelProto
    groups: list[UnitGroup]
    layers: dict[str, Layer]
    output: str
    plan: DerivativePlan | None
    settings: DerivativeSettings

    @property
    def consumers(self) -> list[Layer]:
        return list({c.layer: self.layers[c.layer] for g in self.groups for c in g.consumers}.values())

    def weights(self) -> dict[str, np.ndarray]:
        return {layer.name: full_rows(layer, layer.to_rows(read_initializer(self.model, layer.weight)))
                for layer in self.consumers}

    def start(self) -> None:
        s = self.settings
        self.consumer_weights = self.weights()
        if self.plan is not None:
            self.derivatives = self.plan.attached(self.model, self.consumers, self.output, s)
        else:
            self.names = list(dict.fromkeys(layer.input for layer in self.consumers))
            self.session = runtime.tensor_session(self.model, self.names, s.provider, s.threads)

    def sums(self, data: Dataset, progress: Progress | None = None) -> dict[str, UnitSums]:
        sums = {g.name: UnitSums.zeros(g, self.consumer_weights) for g in self.groups}
        if self.plan is not None:
            for feeds in self.derivatives.batches(data, progress):
                rows, inputs = self.derivatives.jac.rows(feeds, self.derivatives.shape)
                for g in self.groups:
                    _add_batch(sums[g.name], g, self.layers, self.consumer_weights, rows, inputs, self.derivatives.jac.scale)
            return sums
        done = 0
        for feeds, _ in data.batches(self.settings.batch_size):
            values = dict(zip(self.names, self.session.run(self.names, feeds)))
            inputs = {c.name: values[c.input] for c in self.consumers}
            for g in self.groups:
                _add_batch(sums[g.name], g, self.layers, self.consumer_weights, None, inputs, 1.0)
            done += len(next(iter(feeds.values())))
            if progress:
                progress(done, len(data))
        return sums

    def shard(self, index: int, data: Dataset) -> tuple[dict[str, UnitSums], dict]:
        if self.plan is not None:
            self.derivatives.jac.reseed(shard_seed(self.settings.seed, index))
        with runtime.blas_threads(self.settings.threads):
            sums = self.sums(data)
        return sums, {"engine": self.derivatives.jac.choice} if self.plan is not None else {}

    @staticmethod
    def merge(first: dict[str, UnitSums], second: dict[str, UnitSums]) -> dict[str, UnitSums]:
        for name, sums in first.items():
            sums.merge(second[name])
        return first


def _add_batch(acc: UnitSums, group: UnitGroup, layers, weights, rows, inputs, scale: float) -> None:
    first = group.consumers[0]
    z = inputs[first.layer]
    values = _unit_values(layers[first.layer], first, group.units, z)
    acc.sum_z += values.sum((0, 2))
    acc.sum_z2 += (values * values).sum((0, 2))
    acc.count += values.shape[0] * values.shape[2]
    acc.n += len(z)
    uv: tuple[np.ndarray, np.ndarray] | None = None  # the consumers' u and v summed
    for consumer in group.consumers:
        layer = layers[consumer.layer]
        x = _consumer_columns(layer, inputs[consumer.layer])
        acc.col[consumer.layer] += [np.full(x.shape[1], len(x)), x.sum(0), (x * x).sum(0)]
        if rows is not None:
            cu, cv = _uv(layer, weights[layer.name], rows[layer.name], inputs[layer.name], group.units,
                         consumer, scale)
            uv = (cu, cv) if uv is None else (uv[0] + cu, uv[1] + cv)
    if uv is not None:
        u, v = uv
        u2, v2 = u.reshape(-1, group.units), v.reshape(-1, group.units)
        acc.vv += v2.T @ v2
        acc.vu += v2.T @ u2
        acc.uu += u2.T @ u2


def _finish(acc: UnitSums, group: UnitGroup, weights, jacobians: bool) -> UnitStatistics:
    fluctuation, norm2 = np.zeros(group.units), np.zeros(group.units)
    for consumer in group.consumers:
        count, first, second = acc.col[consumer.layer]
        var = np.maximum(second / np.maximum(count, 1) - (first / np.maximum(count, 1)) ** 2, 0.0)
        squares = (weights[consumer.layer] ** 2).sum(0)
        width, own = consumer.width or group.units, consumer.own(group.units)
        fluctuation += (squares * var).reshape(width, consumer.block)[own].sum(1)
        norm2 += squares.reshape(width, consumer.block)[own].sum(1)
    n = acc.n
    scaled = {k: getattr(acc, k) / n if jacobians else None for k in ("vv", "vu", "uu")}
    return UnitStatistics(n=n, sum_z=acc.sum_z, sum_z2=acc.sum_z2, count_z=acc.count,
                          fluctuation=fluctuation, column_norm2=norm2, **scaled)
