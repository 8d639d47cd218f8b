"""Where the units are in a tensor the unit walk reached (``Walk``: the channel axis counted from the
end, the entries per unit along it, where they sit among its channels) and what every step reads
(``Context``); the op kinds the walk knows, and how a constant acting per channel is cut."""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from onnxprune.find.constants import Constants, shape_entries
from onnxprune.find.layers import Layer
from onnxprune.find.unitgroups import Cut, ShapeEdit
from onnxprune.graph.index import GraphIndex, Rejection, attributes

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Softplus", "Softsign", "HardSigmoid",
         "HardSwish", "Mish", "ThresholdedRelu", "Identity", "Dropout", "Clip", "Erf", "Abs", "Neg", "Exp", "Sqrt",
         "Reciprocal", "Cast", "Floor", "Ceil", "Round", "Sign", "Log", "Sin", "Cos", "Shrink", "Not", "IsNaN"}
BINARY = {"Mul", "Add", "Sub", "Div", "PRelu", "Pow", "Max", "Min", "Mod", "Sum", "Mean", "Where", "Equal", "Less",
          "Greater", "LessOrEqual", "GreaterOrEqual"}
JOINS = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "Where"}
POOLING = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
          "ReduceProd", "ReduceSumSquare", "ReduceLogSum"}
# ops whose inputs after the first few are parameters (a shape, pads, indices), computed from shapes or not
DATA_INPUTS = {"Reshape": 1, "Expand": 1, "Tile": 1, "Slice": 1, "Pad": 1, "Resize": 1, "Upsample": 1, "Squeeze": 1,
               "Unsqueeze": 1, "Split": 1, "Gather": 1, "Clip": 1, "ConstantOfShape": 0, **{op: 1 for op in REDUCE}}
NORMALIZING = {"LayerNormalization", "GroupNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
               "SkipLayerNormalization"}


@dataclass
class Context:
    """What every step reads: the graph, its constants and static shapes, the layers."""

    g: GraphIndex
    constants: Constants
    shapes: dict
    layers: dict[str, Layer]
    by_node: dict[str, Layer] = field(default_factory=dict)
    by_preact: dict[str, Layer] = field(default_factory=dict)

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return len(shape) if shape is not None else self.g.ranks.get(name)


class Walk:
    """State of one walk from a producer: where the units are in the tensor reached, what to slice."""

    def __init__(self, producer: Layer, span: tuple[int, int] | None = None):
        start, end = span or (0, producer.out_features)
        self.units = end - start
        self.axis_from_end = 1 if producer.op != "Conv" else len(producer.weight_shape) - 1
        self.block = 1  # entries per unit along the channel axis (after a Flatten)
        self.cuts: list[Cut] = []
        self.groups: list[str] = []
        self.reshapes: list[ShapeEdit] = []
        self.renumbers: list[Cut] = []  # Gathers' indices of the units' channels
        self.path: list[str] = []
        self.lanes = 1
        # unit j is channel offset + j*stride of the ``width`` in the tensor reached (a Concat widens them,
        # a Split narrows them, a channel shuffle interleaves them with others; a group of some of a
        # layer's channels starts at their offset)
        self.offset, self.width, self.stride = start, producer.out_features, 1
        self.places: dict[str, tuple[int, int]] = {}  # tensors reached: (their rank, the units' axis in it)
        self.carried: list[str] = []  # tensors a step found joined with the units: walked back to their producers

    @property
    def place(self) -> tuple[int, int, int, int, int]:
        return self.axis_from_end, self.block, self.offset, self.width, self.stride

    @place.setter
    def place(self, value: tuple[int, int, int, int, int]) -> None:
        self.axis_from_end, self.block, self.offset, self.width, self.stride = value

    @property
    def concatenated(self) -> bool:
        return self.offset != 0 or self.width != self.units or self.stride != 1

    @property
    def span(self) -> dict[str, int]:
        """Where the units are among the channels, as a ``Cut`` takes it."""
        return {"offset": self.offset, "width": self.width, "stride": self.stride}

    @property
    def end(self) -> int:
        """One past the last unit's channel."""
        return self.offset + self.stride * (self.units - 1) + 1

    def index_at(self, channel: int) -> int:
        """The first unit at or after ``channel``."""
        return -(-(channel - self.offset) // self.stride)

    def set_lanes(self, groups: int, name: str) -> None:
        """A grouped Conv reads or writes the units: every one of its groups must keep as many."""
        if self.lanes not in (1, groups) or self.units % groups:
            raise Rejection(f"grouped Conv {name!r} (groups={groups}) does not divide the {self.units} units "
                       f"into the same blocks as the rest of the group")
        self.lanes = groups


class Divide(Rejection):
    """A Split or Slice takes some of the units one way and some another: the walk starts again from
    the producer once per part (``at``: the unit indices where a part begins)."""

    def __init__(self, message: str, at: list[int]):
        super().__init__(message)
        self.at = at


def channel_axis(ctx: Context, walk: Walk, tensor: str) -> int:
    """The units' axis in ``tensor`` (from its start); Rejection when its rank is unknown."""
    rank = ctx.rank(tensor)
    if rank is None:
        raise Rejection(f"the rank of {tensor!r} is unknown (shape inference could not tell)")
    return rank - walk.axis_from_end


def node_axes(ctx: Context, node: onnx.NodeProto, rank: int, slot: int = 1) -> list[int] | None:
    """A node's axes (attribute ``axes`` or its input ``slot``), made non-negative; None when absent."""
    attrs = attributes(node)
    axes = attrs.get("axes")
    if axes is None and len(node.input) > slot and node.input[slot]:
        value = ctx.constants.value(node.input[slot])
        if value is None:
            raise Rejection(f"{node.op_type} {node.name!r} has computed axes")
        axes = value.ravel().tolist()
    return None if axes is None else sorted(int(a) % rank for a in axes)


def per_channel_cut(ctx: Context, walk: Walk, name: str, what: str, rank: int | None) -> Cut | None:
    """A constant that acts per channel (or is the same for all): the cut it needs (None: nothing);
    Rejection when it is not one value per unit."""
    value = ctx.constants.value(name)
    if value is None:
        raise Rejection(f"{what} {name!r} is computed, not a constant")
    if value.size == 1:
        return None
    dims = tuple(value.shape)
    if rank is not None and len(dims) > rank:
        raise Rejection(f"{what} {name!r} has shape {list(dims)}, more axes than the units' tensor")
    if len(dims) < walk.axis_from_end:  # the same value for every unit (per position at most)
        return None
    axis = len(dims) - walk.axis_from_end
    if dims[axis] == 1:
        return None
    if walk.block != 1:
        raise Rejection(f"{what} {name!r} acts per feature after a Flatten, not per unit")
    if dims[axis] != walk.width:
        raise Rejection(f"{what} {name!r} has shape {list(dims)}, not one value per unit (and position)")
    if ctx.g.users(name) > 1:
        raise Rejection(ctx.g.shared_reason(name, what))
    if not ctx.constants.stored(name):
        return stored_source(ctx, walk, name, what)
    return Cut(name, axis, **walk.span)


def _identity_of_shared(ctx: Context, name: str) -> bool:
    """Whether ``name`` is an Identity (or a chain of them) of a stored constant other nodes read too."""
    node = ctx.g.producers.get(name)
    while node is not None and node.op_type == "Identity" and ctx.g.users(name) == 1:
        name = node.input[0]
        if ctx.constants.stored(name):
            return ctx.g.users(name) > 1
        node = ctx.g.producers.get(name)
    return False


def stored_source(ctx: Context, walk: Walk, name: str, what: str) -> Cut:
    """A per-unit constant computed from a stored one by Reshape, Unsqueeze or the like (paddle2onnx's
    biases): the stored one is cut, and each Reshape's entry for the units follows them. An Identity of
    a constant that other nodes read too (torch's legacy exporter writes every bias equal to another
    as an Identity of it) is cut itself: slicing gives it a stored copy of its own first."""
    if _identity_of_shared(ctx, name):
        value = ctx.constants.value(name)
        if value is None or value.size != walk.width:
            raise Rejection(f"{what} {name!r} is not one value per unit")
        axes = [k for k, d in enumerate(value.shape) if d != 1]
        return Cut(name, axes[0] if axes else max(value.ndim - 1, 0), **walk.span)
    current, reshapes = name, []
    while not ctx.constants.stored(current):
        node = ctx.g.producers.get(current)
        if node is None or node.op_type not in ("Reshape", "Unsqueeze", "Squeeze", "Identity", "Cast", "Flatten"):
            raise Rejection(f"{what} {name!r} holds one value per unit but is computed from other constants")
        if ctx.g.users(current) > 1:
            raise Rejection(ctx.g.shared_reason(current, what))
        if node.op_type == "Reshape":
            reshapes.append((node, current))
        current = node.input[0]
    source = ctx.constants.value(current)
    if ctx.g.users(current) > 1:
        raise Rejection(ctx.g.shared_reason(current, f"{what} {name!r} is computed from"))
    if source is None or source.size != walk.width:
        raise Rejection(f"{what} {name!r} is computed from {current!r}, which is not one value per unit")
    for node, out in reshapes:
        shape = ctx.constants.value(out)
        position = next((k for k, d in enumerate(shape.shape) if d == walk.width), None) if shape is not None else None
        entries = shape_entries(ctx.g, ctx.constants, node.input[1], ctx.shapes, node.name, 1)
        if position is None or entries is None or entries[position].tensor is None or entries[position].value != walk.width:
            raise Rejection(f"Reshape {node.name!r} of {what} {name!r} has a shape that cannot follow the units")
        entry = entries[position]
        walk.reshapes.append(ShapeEdit(entry.reader, entry.slot, entry.tensor, entry.index, 1))
    axes = [k for k, d in enumerate(source.shape) if d != 1]
    return Cut(current, axes[0] if axes else max(source.ndim - 1, 0), **walk.span)
