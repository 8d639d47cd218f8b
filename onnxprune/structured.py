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

import heapq
import math
from dataclasses import dataclass

import numpy as np
import onnx

from . import runtime
from .data import Dataset
from .engines import output_jacobians
from .errors import InputError
from .graph import read_initializer
from .jacobians import output_shape, tensor_shapes
from .layers import Layer
from .slicing import full_rows
from .statistics import layer_patches
from .unitgroups import Consumer, UnitGroup

METHODS = ("ecp", "ecp-unit", "flap", "wanda", "l2")
JACOBIAN_METHODS = ("ecp", "ecp-unit")
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
    block, width, own = consumer.block, consumer.width or units, slice(consumer.offset, consumer.offset + units)
    if layer.kind == "sequence":  # (samples, ..., units x block): positions and the block's features
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
    width, own = consumer.width or units, slice(consumer.offset, consumer.offset + units)
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
                    output: str, *, jacobians: bool = True, probes: int | None = None, batch_size: int = 256,
                    seed: int = 0, provider: str = "cpu", threads: int | None = None) -> dict[str, UnitStatistics]:
    """Streamed statistics of every group over ``data`` (the Jacobian sums only when ``jacobians``)."""
    consumers = list({c.layer: layers[c.layer] for g in groups for c in g.consumers}.values())
    weights = {layer.name: full_rows(layer, layer.to_rows(read_initializer(model, layer.weight))) for layer in consumers}
    sums = {}
    for g in groups:
        k = g.units
        sums[g.name] = dict(vv=np.zeros((k, k)), vu=np.zeros((k, k)), uu=np.zeros((k, k)), sum_z=np.zeros(k),
                            sum_z2=np.zeros(k), count=0, n=0,
                            col={c.layer: np.zeros((3, weights[c.layer].shape[1])) for c in g.consumers})
    if jacobians:
        shape = output_shape(model, output, data.feeds, provider)
        width = int(np.prod(shape)) if shape else 1
        jac = output_jacobians(model, consumers, output, width, probes=probes, seed=seed, provider=provider,
                              threads=threads)
        step = max(1, min(batch_size, 8192 // jac.repeats))
    else:
        session = runtime.tensor_session(model, list(dict.fromkeys(layer.input for layer in consumers)), provider, threads)
        step = batch_size
    with runtime.blas_threads(threads):
        for feeds, _ in data.batches(step):
            if jacobians:
                rows, inputs = jac.rows(feeds, shape)
            else:
                names = list(dict.fromkeys(layer.input for layer in consumers))
                values = dict(zip(names, session.run(names, feeds)))
                rows, inputs = None, {layer.name: values[layer.input] for layer in consumers}
            for g in groups:
                _add_batch(sums[g.name], g, layers, weights, rows, inputs, jac.scale if jacobians else 1.0)
    return {g.name: _finish(sums[g.name], g, weights, jacobians) for g in groups}


def _add_batch(acc: dict, group: UnitGroup, layers, weights, rows, inputs, scale: float) -> None:
    first = group.consumers[0]
    z = inputs[first.layer]
    values = _unit_values(layers[first.layer], first, group.units, z)
    acc["sum_z"] += values.sum((0, 2))
    acc["sum_z2"] += (values * values).sum((0, 2))
    acc["count"] += values.shape[0] * values.shape[2]
    acc["n"] += len(z)
    uv: tuple[np.ndarray, np.ndarray] | None = None  # the consumers' u and v summed
    for consumer in group.consumers:
        layer = layers[consumer.layer]
        x = _consumer_columns(layer, inputs[consumer.layer])
        acc["col"][consumer.layer] += [np.full(x.shape[1], len(x)), x.sum(0), (x * x).sum(0)]
        if rows is not None:
            cu, cv = _uv(layer, weights[layer.name], rows[layer.name], inputs[layer.name], group.units,
                         consumer, scale)
            uv = (cu, cv) if uv is None else (uv[0] + cu, uv[1] + cv)
    if uv is not None:
        u, v = uv
        u2, v2 = u.reshape(-1, group.units), v.reshape(-1, group.units)
        acc["vv"] += v2.T @ v2
        acc["vu"] += v2.T @ u2
        acc["uu"] += u2.T @ u2


def _finish(acc: dict, group: UnitGroup, weights, jacobians: bool) -> UnitStatistics:
    fluctuation, norm2 = np.zeros(group.units), np.zeros(group.units)
    for consumer in group.consumers:
        count, first, second = acc["col"][consumer.layer]
        var = np.maximum(second / np.maximum(count, 1) - (first / np.maximum(count, 1)) ** 2, 0.0)
        squares = (weights[consumer.layer] ** 2).sum(0)
        width, own = consumer.width or group.units, slice(consumer.offset, consumer.offset + group.units)
        fluctuation += (squares * var).reshape(width, consumer.block)[own].sum(1)
        norm2 += squares.reshape(width, consumer.block)[own].sum(1)
    n = acc["n"]
    scaled = {k: acc[k] / n if jacobians else None for k in ("vv", "vu", "uu")}
    return UnitStatistics(n=n, sum_z=acc["sum_z"], sum_z2=acc["sum_z2"], count_z=acc["count"],
                          fluctuation=fluctuation, column_norm2=norm2, **scaled)


@dataclass
class UnitScores:
    """One group's removal order and the cost of each removal in that order (for ``ecp`` the rise of
    the joint first-order error; otherwise the unit's own score), and the constants fed instead."""

    order: np.ndarray
    costs: np.ndarray
    constants: np.ndarray | None
    bands: np.ndarray | None = None  # contiguous groups: the best offset of a kept range of each length
    lanes: int = 1                   # grouped Convs: the same number removed from each block of units

    def removal(self, count: int) -> np.ndarray:
        """The units to remove, ``count`` of them (for a contiguous group: all outside the best range;
        with lanes: count / lanes from each block, in the order's ranking)."""
        if self.lanes > 1:
            lane = len(self.order) // self.lanes
            return np.sort(np.concatenate([self.order[self.order // lane == k][:count // self.lanes]
                                           for k in range(self.lanes)]))
        if self.bands is None:
            return np.sort(self.order[:count])
        n = len(self.order)
        start = int(self.bands[n - count])
        return np.setdiff1d(np.arange(n), np.arange(start, start + n - count))


def best_bands(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every length L of a kept contiguous range [a, a+L): the offset a whose removed complement
    has the least joint error 1' M_out 1, and that error (index L = 0..n)."""
    n = len(m)
    total = m.sum()
    rows = np.concatenate([[0.0], np.cumsum(m.sum(1))])
    square = np.zeros((n + 1, n + 1))
    square[1:, 1:] = m.cumsum(0).cumsum(1)
    offsets, errors = np.zeros(n + 1, int), np.zeros(n + 1)
    errors[0] = total
    for length in range(1, n + 1):
        a = np.arange(n - length + 1)
        b = a + length
        inside = square[b, b] - square[a, b] - square[b, a] + square[a, a]
        error = total - 2 * (rows[b] - rows[a]) + inside
        best = int(np.argmin(error))
        offsets[length], errors[length] = best, error[best]
    return offsets, errors


def ecp_constants(stats: UnitStatistics) -> tuple[np.ndarray, np.ndarray]:
    """(c_j, the joint error matrix M) of one group."""
    vv, vu, uu = stats.vv, stats.vu, stats.uu
    if vv is None or vu is None or uu is None:
        raise ValueError("ECP constants need the Jacobian sums (unit_statistics with jacobians=True)")
    dvv = np.diag(vv)
    c = np.where(dvv > 0, np.diag(vu) / np.where(dvv > 0, dvv, 1.0), 0.0)
    m = np.outer(c, c) * vv - c[:, None] * vu - (c[:, None] * vu).T + uu
    return c, (m + m.T) / 2


def greedy_joint(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove units one by one, each time the one whose addition raises 1' M_S 1 least."""
    k = len(m)
    marginal = np.diag(m).copy()
    taken = np.zeros(k, bool)
    order, costs = np.empty(k, int), np.empty(k)
    for t in range(k):
        j = int(np.argmin(np.where(taken, np.inf, marginal)))
        order[t], costs[t] = j, marginal[j]
        taken[j] = True
        marginal += 2 * m[:, j]
    return order, costs


def score_group(method: str, stats: UnitStatistics, producer_rows: np.ndarray | None,
                contiguous: bool = False) -> UnitScores:
    """The removal order of one group under ``method`` (producer_rows: the producers' (out, in) weights,
    None for input features, whose l2/wanda use the consumer columns); ``contiguous``: only the
    complement of one range may go (input features kept by a Slice)."""
    scores = _score(method, stats, producer_rows)
    if not contiguous:
        return scores
    m = ecp_constants(stats)[1] if method == "ecp" else np.diag(scores.costs[np.argsort(scores.order)])
    offsets, errors = best_bands(m)
    # costs[t]: the joint error's rise from t to t + 1 features removed (kept length n - t to n - t - 1)
    return UnitScores(np.arange(len(m)), np.diff(errors[::-1]), scores.constants, offsets)


def _score(method: str, stats: UnitStatistics, producer_rows: np.ndarray | None) -> UnitScores:
    if producer_rows is None:
        producer_rows = np.sqrt(stats.column_norm2)[:, None]
    if method == "ecp":
        c, m = ecp_constants(stats)
        order, costs = greedy_joint(m)
        return UnitScores(order, costs, c)
    if method == "ecp-unit":
        c, m = ecp_constants(stats)
        score, constants = np.diag(m), c
    elif method == "flap":
        score, constants = stats.fluctuation, stats.mean_z
    elif method == "wanda":
        score, constants = np.linalg.norm(producer_rows, axis=1) * np.sqrt(stats.sum_z2), None
    elif method == "l2":
        score, constants = np.linalg.norm(producer_rows, axis=1), None
    else:
        raise InputError(f"unknown structured method {method!r}; choose one of {', '.join(METHODS)}")
    order = np.argsort(score, kind="stable")
    return UnitScores(order, score[order], constants)


# --- MACs and the choice of how many units each group loses ---------------------------------------

@dataclass(frozen=True)
class LayerCost:
    """A layer's multiply-accumulates: out x in x per, where out/in shrink with the groups named (the
    input: ``in_units`` fixed units plus those of every group read, several after a Concat)."""

    layer: str
    out_group: str | None
    out_units: int
    in_groups: tuple[tuple[str, int], ...]  # (group, its units) read by the layer
    in_units: int       # input units in no group
    per: int            # MACs per (output unit, input unit) pair: positions x kernel taps / block
    depthwise: bool = False
    groups: int = 1     # a grouped Conv reads 1/groups of its input units per output

    def macs(self, kept: dict[str, int]) -> int:
        out = kept.get(self.out_group, self.out_units) if self.out_group else self.out_units
        if self.depthwise:
            return out * self.per
        inp = self.in_units + sum(kept.get(group, units) for group, units in self.in_groups)
        return out * inp * self.per // self.groups


def layer_costs(model: onnx.ModelProto, layers: list[Layer], groups: list[UnitGroup], feeds) -> list[LayerCost]:
    """MAC accounting of every layer, from one sample's pre-activation shapes."""
    shapes = tensor_shapes(model, [layer.preact for layer in layers], {k: v[:1] for k, v in feeds.items()})
    produced = {p: g for g in groups for p in g.producers}
    consumed: dict[str, list] = {}
    for g in groups:
        for c in g.consumers:
            consumed.setdefault(c.layer, []).append((g, c))
    depthwise = {node: g for g in groups for node in g.group_attributes}
    costs = []
    for layer in layers:
        shape = shapes[layer.preact]
        positions = int(np.prod(shape)) // layer.out_features if shape else 1
        if layer.node in depthwise:
            g = depthwise[layer.node]
            costs.append(LayerCost(layer.name, g.name, layer.out_features, (), 1,
                                   layer.in_features * positions, depthwise=True))
            continue
        out_group, out_units = None, layer.out_features
        if layer.name in produced:  # counted in units of its group (an attention head is D outputs)
            out_group, out_units = produced[layer.name].name, produced[layer.name].units
            positions *= layer.out_features // out_units
        if layer.name in consumed:
            read = consumed[layer.name]
            width = read[0][1].width or read[0][0].units  # input units: a Concat's channels, or the group's
            conv_groups = layer.geometry.groups if layer.op == "Conv" else 1
            costs.append(LayerCost(layer.name, out_group, out_units, tuple((g.name, g.units) for g, _ in read),
                                   width - sum(g.units for g, _ in read),
                                   layer.in_features * conv_groups // width * positions, groups=conv_groups))
        else:
            costs.append(LayerCost(layer.name, out_group, out_units, (), layer.in_features, positions))
    return costs


def total_macs(costs: list[LayerCost], kept: dict[str, int]) -> int:
    return sum(c.macs(kept) for c in costs)


def unit_macs(costs: list[LayerCost], kept: dict[str, int], group: str) -> int:
    """MACs saved by removing one more unit of ``group`` at the current counts."""
    fewer = dict(kept)
    fewer[group] -= 1
    return total_macs(costs, kept) - total_macs(costs, fewer)


def round_kept(kept: int, units: int, multiple: int) -> int:
    """``kept`` rounded to the nearest multiple of ``multiple`` (at least one multiple, at most all)."""
    if multiple <= 1 or units < multiple:
        return kept
    return int(min(units, max(multiple, multiple * round(kept / multiple))))


def choose_counts(scores: dict[str, UnitScores], counts: dict[str, int], original: dict[str, int],
                  costs: list[LayerCost], *, sparsity: float | None, macs: float | None, scope: str,
                  multiple: int = 1, lanes: dict[str, int] | None = None) -> dict[str, int]:
    """How many units each group keeps: ``sparsity`` of the original units or ``macs`` of the dense
    MACs removed, over all groups at once (``global``: by cost, per MAC saved for ``macs``) or the
    same fraction in each (``layer``). ``counts``: units each group has now (earlier steps removed
    the others; a group never gets units back). ``lanes``: groups whose count must be a multiple
    of that many (grouped Convs), at every step."""
    if scope == "layer":
        kept = _layer_counts(counts, original, costs, sparsity, macs)
    else:
        kept = _global_counts(scores, counts, original, costs, sparsity, macs)
    lanes = lanes or {}
    for name, k in kept.items():
        lane = lanes.get(name, 1)
        step = math.lcm(multiple, lane)  # every step: a later one cannot give units back to reach a multiple
        if step == 1:
            continue
        if original[name] < step:  # too few to round: a grouped Conv's group then keeps all
            kept[name] = counts[name] if lane > 1 else k
            continue
        rounded = round_kept(k, original[name], step)
        kept[name] = rounded if rounded <= counts[name] else counts[name]
    for name, k in kept.items():
        if k < 1:
            raise InputError(f"layer {name} would be left with no unit (it has {original[name]}); "
                             "ask for less or use --scope global")
    return kept


def _layer_counts(counts, original, costs, sparsity, macs) -> dict[str, int]:
    def at(fraction: float) -> dict[str, int]:
        return {name: min(counts[name], int(round((1 - fraction) * n))) for name, n in original.items()}

    if macs is None:
        return at(sparsity)
    dense = total_macs(costs, original)
    low, high = 0.0, 1.0
    for _ in range(40):  # the smallest uniform fraction that removes the MACs asked for
        mid = (low + high) / 2
        low, high = (low, mid) if total_macs(costs, at(mid)) <= (1 - macs) * dense else (mid, high)
    return at(high)


def _global_counts(scores, counts, original, costs, sparsity, macs) -> dict[str, int]:
    kept = dict(counts)

    def priority(name: str) -> float:
        cost = float(scores[name].costs[counts[name] - kept[name]])  # scores rank the current units
        return cost / max(unit_macs(costs, kept, name), 1) if macs is not None else cost

    if macs is not None:
        dense = total_macs(costs, original)
        target = (1 - macs) * dense

        def reached():
            return total_macs(costs, kept) <= target
    else:
        goal = int(round(sparsity * sum(original.values())))

        def reached():
            return sum(original[n] - kept[n] for n in kept) >= goal

    heap = [(priority(name), name) for name in kept if kept[name] > 1]  # every group keeps a unit
    heapq.heapify(heap)
    while not reached():
        if not heap:
            raise InputError("the request would leave a layer with no unit: every group is down to one unit "
                             "before the target is reached")
        _, name = heapq.heappop(heap)
        kept[name] -= 1
        if kept[name] > 1:
            heapq.heappush(heap, (priority(name), name))
        if macs is not None:  # removing a unit changes the MACs saved by its neighbours' units
            heap = [(priority(n), n) for _, n in heap]
            heapq.heapify(heap)
    return kept
