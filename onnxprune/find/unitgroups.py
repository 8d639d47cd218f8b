"""The records of structured pruning: a group of units (its producers, consumers and cuts), or why
not; how a unit axis of a layer's view maps to its stored initializer."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.find.layers import Layer, Skipped
from onnxprune.graph.index import Rejection


@dataclass(frozen=True)
class Cut:
    """Slice initializer ``tensor`` along stored ``axis``: unit j owns entries [p*block, (p + 1)*block)
    at its position p = offset + j*stride among the axis's ``width`` units (after a Concat; 0: the
    group's own count; a stride after a channel shuffle interleaved them with others)."""

    tensor: str
    axis: int
    block: int = 1
    groups: int = 1  # a grouped Conv's weight: rows in ``groups`` blocks, each keeps its own units (local indices)
    offset: int = 0
    width: int = 0
    stride: int = 1

    def positions(self, units) -> np.ndarray:
        """Where units ``units`` (indices in the group) sit along the axis, in units of ``block``."""
        return self.offset + self.stride * np.asarray(units, int)


@dataclass(frozen=True)
class Consumer:
    """A layer reading the units (from ``tensor``): unit j is columns [p*block, (p + 1)*block) of its
    (out, in) view, p = offset + j*stride."""

    layer: str
    block: int
    tensor: str = ""
    offset: int = 0   # after a Concat: the units are channels offset + j*stride of ``width``
    width: int = 0
    stride: int = 1   # after a channel shuffle: the units interleaved with others

    def own(self, units: int) -> slice:
        """The units' positions among the ``width`` the consumer reads."""
        return slice(self.offset, self.offset + self.stride * (units - 1) + 1, self.stride)


@dataclass(frozen=True)
class ShapeEdit:
    """A shape entry that counts the units: element ``index`` of constant ``tensor`` (read by node
    ``reader`` at input ``slot``) shrinks by ``per_unit`` for every unit removed (the constant is
    first given to ``reader`` alone when other nodes read it). With ``tensor`` None the entry is
    computed (or a constant other Reshapes share), and Reshape ``reader`` gets entry ``index`` of its
    shape written: ``value`` less ``per_unit`` per unit removed where the entry's value is known (so
    shape inference still tells the axis), else -1, which then follows the units."""

    reader: str
    slot: int
    tensor: str | None
    index: int
    per_unit: int = 0
    value: int | None = None


@dataclass(frozen=True)
class Select:
    """A computed tensor with one entry per unit along ``axis`` (an attention bias per head, shared
    by several layers): node ``node`` reads only the surviving units of its input ``slot``, by a
    Gather inserted in front of it."""

    node: str
    slot: int
    axis: int


@dataclass(frozen=True)
class UnitGroup:
    """Units removed together: rows of the ``producers`` (several when they add into one residual
    stream), the columns of the ``consumers``, and every cut between."""

    name: str
    producers: tuple[str, ...]
    units: int
    tensor: str                                # the unit values as the consumers read them
    consumers: tuple[Consumer, ...]
    cuts: tuple[Cut, ...]
    group_attributes: tuple[str, ...] = ()     # depthwise Conv nodes whose ``group`` equals the unit count
    reshapes: tuple[ShapeEdit, ...] = ()       # shape entries that follow the units
    selects: tuple[Select, ...] = ()           # computed per-unit tensors narrowed by a Gather
    renumbers: tuple[Cut, ...] = ()            # a Gather's indices of the units' channels: renumbered as they go
    path: tuple[str, ...] = ()                 # nodes walked between producer and consumers
    selection: str | None = None               # input features: "Slice" (contiguous) or "Gather" (--prune-inputs)
    lanes: int = 1                             # grouped Convs: units in this many equal blocks, each losing as many

    @property
    def producer(self) -> str | None:
        return self.producers[0] if self.producers else None

    def unit_entries(self, tensor: str) -> np.ndarray:
        """(units, entries): for each unit, the indices along the cut axis of initializer ``tensor`` that
        belong to it (a producer's rows: D rows of each part of a fused QKV per head, the rows of one
        part of a split layer; a consumer's columns: a block per unit at each offset it reads them)."""
        cuts = sorted((c for c in self.cuts if c.tensor == tensor), key=lambda c: c.offset)
        if not cuts or any(c.groups != 1 for c in cuts):
            raise ValueError(f"group {self.name!r} has no plain cut of {tensor!r}")
        unit = np.arange(self.units)[:, None]
        return np.concatenate([c.positions(unit) * c.block + np.arange(c.block)[None, :] for c in cuts], axis=1)

    def to_dict(self) -> dict:
        return {"group": self.name, "producers": list(self.producers), "units": self.units, "tensor": self.tensor,
                "consumers": [c.layer for c in self.consumers], "path": list(self.path)}


@dataclass
class Units:
    groups: list[UnitGroup]
    rejected: list[Skipped]

    def by_name(self) -> dict[str, UnitGroup]:
        return {g.name: g for g in self.groups}


def stored_axis(layer: Layer, view_axis: int) -> int:
    """The stored initializer's axis that the node's view axis ``view_axis`` comes from."""
    axis = view_axis
    for step in reversed(layer.weight_path):
        if step.op == "Transpose":
            assert step.perm is not None  # node_weight gives every Transpose of a weight path its perm
            axis = step.perm[axis]
    return axis


def out_axis(layer: Layer) -> int:
    return 0 if layer.op == "Conv" or (layer.op == "Gemm" and not layer.transposed) else 1


def in_axis(layer: Layer) -> int:
    return 1 - out_axis(layer) if layer.op != "Conv" else 1


class Unavoidable(Rejection):
    """The units cannot be removed by any rewrite: they reach a graph output, or a normalization
    over the channels (LayerNormalization, an RMS norm) mixes them."""

    unavoidable = True
