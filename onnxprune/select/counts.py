"""How many units each group keeps: MACs accounting, rounding, global or per-layer counts."""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.errors import InputError
from onnxprune.find.layers import Layer, folded_preacts
from onnxprune.find.unitgroups import UnitGroup
from onnxprune.prepare.shapes import tensor_shapes
from onnxprune.score.units import UnitScores


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
        inp = self.in_units + sum(kept.get(group, units) for group, units in self.in_groups)
        if self.depthwise:  # one output channel per input channel
            return inp * self.per
        return out * inp * self.per // self.groups


def layer_costs(model: onnx.ModelProto, layers: list[Layer], groups: list[UnitGroup], feeds) -> list[LayerCost]:
    """MAC accounting of every layer, from one sample's pre-activation shapes."""
    shapes = tensor_shapes(model, [layer.preact for layer in layers], {k: v[:1] for k, v in feeds.items()},
                           folded=folded_preacts(layers))  # a folded layer's rows are a sample's positions
    produced = {p: g for g in groups for p in g.producers}
    consumed: dict[str, list] = {}
    for g in groups:
        for c in g.consumers:
            consumed.setdefault(c.layer, []).append((g, c))
    depthwise: dict[str, list[UnitGroup]] = {}  # a depthwise Conv: the groups among its channels (parts of them)
    for g in groups:
        for node in g.group_attributes:
            depthwise.setdefault(node, []).append(g)
    costs = []
    for layer in layers:
        shape = shapes[layer.preact]
        positions = int(np.prod(shape)) // layer.out_features if shape else 1
        if layer.node in depthwise:
            among = depthwise[layer.node]
            costs.append(LayerCost(layer.name, None, 0, tuple((g.name, g.units) for g in among),
                                   layer.out_features - sum(g.units for g in among), layer.in_features * positions,
                                   depthwise=True))
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


def round_kept(kept: int, units: int, multiple: int) -> int:
    """``kept`` rounded to the nearest multiple of ``multiple`` (at least one multiple, at most all)."""
    if multiple <= 1 or units < multiple:
        return kept
    return int(min(units, max(multiple, multiple * round(kept / multiple))))


def choose_counts(scores: dict[str, UnitScores], counts: dict[str, int], original: dict[str, int],
                  costs: list[LayerCost], *, sparsity: float | None, macs: float | None, scope: str,
                  multiple: int | dict[str, int] = 1, lanes: dict[str, int] | None = None) -> dict[str, int]:
    """How many units each group keeps: ``sparsity`` of the original units or ``macs`` of the dense
    MACs removed, over all groups at once (``global``: by cost, per MAC saved for ``macs``) or the
    same fraction in each (``layer``). ``counts``: units each group has now (earlier steps removed
    the others; a group never gets units back). ``multiple``: kept counts rounded to it (one for every
    group, or per group); ``lanes``: groups whose count must be a multiple of that many (grouped
    Convs), at every step."""
    lanes = lanes or {}
    steps = {name: math.lcm(multiple.get(name, 1) if isinstance(multiple, dict) else multiple, lanes.get(name, 1))
             for name in counts}  # every step: a later one cannot give units back to reach a multiple
    if scope == "layer":
        kept = _layer_counts(counts, original, costs, sparsity, macs)
    else:  # whole multiples removed at a time where the group has more than one (no rounding after)
        chunks = {name: step if original[name] % step == 0 and counts[name] % step == 0 else 1
                  for name, step in steps.items()}
        kept = _global_counts(scores, counts, original, costs, sparsity, macs, chunks)
    for name, k in kept.items():
        lane, step = lanes.get(name, 1), steps[name]
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


def _global_counts(scores, counts, original, costs, sparsity, macs, chunks: dict[str, int]) -> dict[str, int]:
    """The cheapest removals over all groups until the target: each group's next ``chunks[name]``
    units at a time (its channel multiple), ranked by their mean cost (per MAC saved for ``macs``); a
    chunk that would overshoot the target by more than half of it is left out."""
    kept = dict(counts)

    def removal(name: str) -> tuple[float, float]:
        """(priority, what the chunk removes: units, or MACs) of the group's next chunk."""
        gone, size = counts[name] - kept[name], chunks[name]
        cost = float(np.sum(scores[name].costs[gone:gone + size]))  # scores rank the current units
        if macs is None:
            return cost / size, size
        fewer = dict(kept)
        fewer[name] -= size
        saved = total_macs(costs, kept) - total_macs(costs, fewer)
        return cost / max(saved, 1), saved

    if macs is not None:
        dense = total_macs(costs, original)
        target = (1 - macs) * dense

        def left() -> float:
            return total_macs(costs, kept) - target
    else:
        goal = int(round(sparsity * sum(original.values())))

        def left() -> float:
            return goal - sum(original[n] - kept[n] for n in kept)

    heap = [(removal(name)[0], name) for name in kept  # every group keeps a unit; one a later step no longer
            if name in scores and kept[name] - chunks[name] >= 1]  # finds (no scores) keeps what it has
    heapq.heapify(heap)
    skipped = False
    while left() > 0:
        if not heap:
            if skipped or any(size > 1 for size in chunks.values()):  # the nearest the multiples allow
                break
            raise InputError("the request would leave a layer with no unit: every group is down to one unit "
                             "before the target is reached")
        _, name = heapq.heappop(heap)
        size = removal(name)[1]
        if size - left() > left():  # overshoots by more than it would leave undone
            skipped = True
            continue
        kept[name] -= chunks[name]
        if kept[name] - chunks[name] >= 1:
            heapq.heappush(heap, (removal(name)[0], name))
        if macs is not None:  # removing units changes the MACs saved by its neighbours' units
            heap = [(removal(n)[0], n) for _, n in heap]
            heapq.heapify(heap)
    return kept
