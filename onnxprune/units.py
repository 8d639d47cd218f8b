"""Unit groups: the neurons, channels (or features) that must be removed together, found on the graph.

A unit j of a group is output row j of a producer layer (a Gemm/MatMul neuron, a Conv channel). It
travels through per-channel nodes (activations, PRelu with its slopes, per-channel Mul/Add/Sub/Div,
inference BatchNormalization, pooling, depthwise Conv, Flatten/Reshape) to the consumer layers that
read it, where it is one column of a dense layer, a block of columns after a Flatten (one per
position), or one input channel (a block of kernel taps) of a Conv. Removing unit j means slicing
every initializer along that path (``Cut``), shrinking depthwise Convs' ``group`` and fixing Reshape
constants. The walk from a producer is a small matcher per op kind: each either lets the unit
through (saying what to slice) or stops with the reason the group cannot be coupled safely
(``Rejected``), which ``inspect`` lists.

Not coupled yet (rejected with their reason): tensors read by a residual Add or a Concat (their
channel masks would be shared by several producers), grouped (non-depthwise) Convs, attention
heads, graph outputs, quantized weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .layers import Layer, _attrs, _bias_target_shape, _Graph, analyse_graph

ELEMENTWISE = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Softplus", "Softsign",
               "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Identity", "Dropout", "Clip", "Erf", "Abs",
               "Neg", "Exp", "Sqrt", "Reciprocal"}
PER_CHANNEL_BINARY = {"Mul", "Add", "Sub", "Div", "PRelu"}
POOLING = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}


@dataclass(frozen=True)
class Cut:
    """Slice initializer ``tensor`` along stored ``axis``: unit j owns entries [j*block, (j+1)*block)."""

    tensor: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class Consumer:
    """A layer reading the units: unit j is columns [j*block, (j+1)*block) of its (out, in) view."""

    layer: str
    block: int


@dataclass(frozen=True)
class UnitGroup:
    """Units removed together: rows of ``producer``, the columns of ``consumers``, and every cut between."""

    name: str
    producer: str
    units: int
    tensor: str                                # the unit values as the consumers read them
    consumers: tuple[Consumer, ...]
    cuts: tuple[Cut, ...]
    group_attributes: tuple[str, ...] = ()     # depthwise Conv nodes whose ``group`` equals the unit count
    reshapes: tuple[tuple[str, int, int], ...] = ()  # (shape initializer, index, entries per unit)
    path: tuple[str, ...] = ()                 # nodes walked between producer and consumers

    def to_dict(self) -> dict:
        return {"group": self.name, "producer": self.producer, "units": self.units, "tensor": self.tensor,
                "consumers": [c.layer for c in self.consumers], "path": list(self.path)}


@dataclass(frozen=True)
class Rejected:
    """A layer whose output units cannot be removed, and why."""

    layer: str
    op: str
    reason: str


@dataclass
class Units:
    groups: list[UnitGroup]
    rejected: list[Rejected]

    def by_name(self) -> dict[str, UnitGroup]:
        return {g.name: g for g in self.groups}


def _shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Static per-tensor shapes shape inference can tell (None for unknown dims)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # advisory: an unknown shape rejects only the patterns that need it
        inferred = model
    shapes = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes


def _stored_axis(layer: Layer, view_axis: int) -> int:
    """The stored initializer's axis that the node's view axis ``view_axis`` comes from."""
    axis = view_axis
    for step in reversed(layer.weight_path):
        if step.op == "Transpose":
            axis = step.perm[axis]
    return axis


def _out_axis(layer: Layer) -> int:
    return 0 if layer.op == "Conv" or (layer.op == "Gemm" and not layer.transposed) else 1


def _in_axis(layer: Layer) -> int:
    return 1 - _out_axis(layer) if layer.op != "Conv" else 1


class _Stop(Exception):
    """The units cannot pass a node; the message says why."""


class _Walk:
    """State of one walk from a producer: the tensor reached, its channel axis, what to slice."""

    def __init__(self, producer: Layer, rank: int | None):
        self.units = producer.out_features
        self.rank = rank
        self.axis_from_end = 1 if producer.op != "Conv" else len(producer.weight_shape) - 1
        self.block = 1  # entries per unit along the last axis (after a Flatten)
        self.cuts: list[Cut] = []
        self.groups: list[str] = []
        self.reshapes: list[tuple[str, int, int]] = []
        self.path: list[str] = []


def _per_channel_cut(g: _Graph, walk: _Walk, name: str, what: str) -> Cut | None:
    """A constant that acts per channel (or is a scalar): the cut it needs (None: nothing); else _Stop."""
    value = g.constant(name)
    if value is None:
        raise _Stop(f"{what} {name!r} is computed, not a constant (a residual or gated connection)")
    if g.users(name) > 1:
        raise _Stop(f"{what} {name!r} is shared with other nodes")
    if value.size == 1:
        return None
    if walk.block != 1:
        raise _Stop(f"{what} {name!r} acts per feature after a Flatten, not per unit")
    dims = tuple(value.shape)
    if _bias_target_shape(dims, walk.units, walk.axis_from_end) is None or len(dims) < walk.axis_from_end:
        raise _Stop(f"{what} {name!r} has shape {list(dims)}, not one value per unit")
    axis = len(dims) - walk.axis_from_end
    return Cut(name, axis) if dims[axis] == walk.units else None


def _step(g: _Graph, layers: dict[str, Layer], walk: _Walk, node: onnx.NodeProto, tensor: str, shapes):
    """Let the units through ``node``: its output tensor, or a reason why they cannot pass."""
    op = node.op_type
    outs = [o for o in node.output if o]
    if op in ELEMENTWISE:
        if op == "Clip" and any(i and g.constant(i) is None for i in node.input[1:]):
            raise _Stop("Clip with computed bounds")
        if len(outs) > 1 and op != "Dropout":
            raise _Stop(f"{op} with several outputs")
        return outs[0]
    if op in PER_CHANNEL_BINARY:
        if op in ("Sub", "Div") and node.input[0] != tensor:
            raise _Stop(f"{op} {node.name!r} has the units as its second operand")
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        cut = _per_channel_cut(g, walk, other, f"{op} operand")
        walk.cuts.extend([cut] if cut else [])
        return outs[0]
    if op == "BatchNormalization":
        attrs = _attrs(node)
        if attrs.get("training_mode", 0) or len(outs) > 1 or walk.block != 1:
            raise _Stop("BatchNormalization in training mode (or after a Flatten)")
        for name in node.input[1:5]:
            if g.constant(name) is None or g.users(name) > 1:
                raise _Stop(f"BatchNormalization parameter {name!r} is not a constant of its own")
            walk.cuts.append(Cut(name, 0))
        return outs[0]
    if op in POOLING:
        if walk.axis_from_end == 1 and walk.rank == 2:
            raise _Stop(f"{op} on a 2-D tensor")
        if len(outs) > 1:
            raise _Stop(f"{op} with an indices output")
        return outs[0]
    if op == "Flatten":
        return _flatten(walk, node, tensor, shapes, outs[0])
    if op == "Reshape":
        return _reshape(g, walk, node, tensor, shapes, outs[0])
    if op == "Conv" and node.name in layers:
        layer = layers[node.name]
        if layer.conv.groups == walk.units and layer.out_features == walk.units:  # depthwise: channels follow
            walk.cuts.append(Cut(layer.weight, _stored_axis(layer, 0)))
            if layer.bias is not None:
                bias_cut = _per_channel_cut(g, walk, layer.bias, "depthwise bias") if layer.bias_node else Cut(layer.bias, 0)
                walk.cuts.extend([bias_cut] if bias_cut else [])
            walk.groups.append(node.name)
            if layer.bias_node:
                walk.path.append(node.name)
                return layer.preact
            return outs[0]
        raise _Stop(f"grouped Conv {node.name!r} (groups={layer.conv.groups}) reads the units")
    raise _Stop(f"{op} {node.name!r} between layers is not a per-unit operation")


def _flatten(walk: _Walk, node, tensor, shapes, out):
    shape = shapes.get(tensor)
    if int(_attrs(node).get("axis", 1)) != 1 or shape is None or walk.axis_from_end != len(shape) - 1:
        raise _Stop("Flatten not over the channel and spatial axes (or of unknown shape)")
    spatial = shape[2:]
    if any(d is None for d in spatial):
        raise _Stop("Flatten of a tensor whose spatial size shape inference cannot tell")
    walk.block, walk.axis_from_end = int(np.prod(spatial)) if spatial else 1, 1
    return out


def _reshape(g: _Graph, walk: _Walk, node, tensor, shapes, out):
    """Reshape (N, C, *spatial) -> (N, C*prod(spatial)) (a Flatten written as a Reshape)."""
    shape, target = shapes.get(tensor), g.constant(node.input[1])
    if target is None or shape is None or walk.axis_from_end != len(shape) - 1 or target.ndim != 1 or len(target) != 2:
        raise _Stop("Reshape other than (N, C, ...) -> (N, C x positions) with a constant shape")
    if g.users(node.input[1]) > 1:
        raise _Stop(f"Reshape shape {node.input[1]!r} is shared with other nodes")
    spatial = shape[2:]
    if any(d is None for d in spatial):
        raise _Stop("Reshape of a tensor whose spatial size shape inference cannot tell")
    block = int(np.prod(spatial)) if spatial else 1
    if int(target[1]) not in (-1, walk.units * block):
        raise _Stop(f"Reshape to {target.tolist()} does not keep the channel blocks together")
    if int(target[1]) != -1:
        walk.reshapes.append((node.input[1], 1, block))
    walk.block, walk.axis_from_end = block, 1
    return out


def _reads_units(layer: Layer, tensor: str) -> bool:
    return layer.input == tensor


def match_group(g: _Graph, layers: dict[str, Layer], by_node: dict[str, Layer], producer: Layer, shapes) -> UnitGroup | Rejected:
    """The unit group of ``producer``'s output rows, or why it has none."""
    def reject(reason: str) -> Rejected:
        return Rejected(producer.name, producer.op, reason)

    if any(step.op == "DequantizeLinear" for step in producer.weight_path):
        return reject("quantized weights are not sliced")
    if producer.op == "Conv" and producer.conv.groups != 1:
        return reject(f"grouped Conv (groups={producer.conv.groups}): its channels follow its input's")
    walk = _Walk(producer, g.ranks.get(producer.input))
    walk.cuts.append(Cut(producer.weight, _stored_axis(producer, _out_axis(producer))))
    if producer.bias is not None:
        bias = g.constant(producer.bias)
        # a BatchNormalization holding the bias is sliced by its own step, its bias included
        if not (producer.bias_node and _is_batchnorm(g, producer.bias_node)) and bias is not None and bias.size > 1:
            walk.cuts.append(Cut(producer.bias, bias.ndim - (walk.axis_from_end if producer.bias_node else 1)))
    tensor = producer.preact
    consumers: list[Consumer] = []
    while True:
        if tensor in g.outputs:
            return reject(f"its units reach the graph output {tensor!r}")
        users = g.consumers[tensor]
        if not users:
            return reject(f"tensor {tensor!r} is not read by any node")
        readers = [by_node.get(n.name) for n in users]
        if all(layer is not None and _reads_units(layer, tensor) and not _depthwise(layer, walk) for layer in readers):
            for layer in readers:
                if layer.op == "Conv" and layer.conv.groups != 1:
                    return reject(f"grouped Conv {layer.name!r} (groups={layer.conv.groups}) reads the units")
                if any(step.op == "DequantizeLinear" for step in layer.weight_path):
                    return reject(f"consumer {layer.name!r} has quantized weights")
                if layer.op == "Conv" and walk.block != 1:
                    return reject("a Conv reads flattened units")
                block = int(np.prod(layer.weight_shape[2:])) if layer.op == "Conv" else walk.block
                if layer.in_features != walk.units * block:
                    return reject(f"consumer {layer.name!r} has {layer.in_features} inputs, not {walk.units} x {block}")
                consumers.append(Consumer(layer.name, block))
                axis = _stored_axis(layer, _in_axis(layer))
                walk.cuts.append(Cut(layer.weight, axis, walk.block if layer.op != "Conv" else 1))
            break
        if len(users) > 1:
            ops = sorted({n.op_type for n in users})
            return reject(f"tensor {tensor!r} is read by {len(users)} nodes ({', '.join(ops)}): "
                          "residual Add / Concat / shared branches are not coupled")
        node = users[0]
        if node.op_type in ("Add", "Concat", "Sum", "Mul") and all(g.constant(i) is None for i in node.input if i != tensor):
            return reject(f"{node.op_type} {node.name!r} joins it with another computed tensor "
                          "(residual / Concat / gating groups are not coupled)")
        if (layer := by_node.get(node.name)) is not None and node.op_type != "Conv":
            return reject(f"{layer.op} {layer.name!r} reads it in an unsupported position")
        walk.path.append(node.name)
        try:
            tensor = _step(g, layers, walk, node, tensor, shapes)
        except _Stop as stop:
            return reject(str(stop))
    return UnitGroup(name=producer.name, producer=producer.name, units=producer.out_features, tensor=tensor,
                     consumers=tuple(consumers), cuts=tuple(dict.fromkeys(walk.cuts)),
                     group_attributes=tuple(walk.groups), reshapes=tuple(walk.reshapes), path=tuple(walk.path))


def _depthwise(layer: Layer, walk: _Walk) -> bool:
    return layer.op == "Conv" and layer.conv.groups == walk.units and layer.out_features == walk.units and walk.units > 1


def _is_batchnorm(g: _Graph, node_name: str) -> bool:
    return any(n.name == node_name and n.op_type == "BatchNormalization" for n in g.model.graph.node)


def find_units(model: onnx.ModelProto, layers: list[Layer] | None = None) -> Units:
    """Every producer layer's unit group, or its rejection; ``model`` gets node names in place."""
    found = analyse_graph(model)
    layers = found.layers if layers is None else layers
    g = _Graph(model)
    shapes = _shapes(model)
    by_name = {layer.name: layer for layer in found.layers}
    by_node = {layer.node: layer for layer in found.layers}
    depthwise_followers = set()
    groups, rejected = [], []
    for producer in layers:
        result = match_group(g, by_name, by_node, producer, shapes)
        if isinstance(result, UnitGroup):
            groups.append(result)
            depthwise_followers.update(result.group_attributes)
        else:
            rejected.append(result)
    kept = [r for r in rejected if not (r.layer in depthwise_followers and r.reason.startswith("grouped Conv"))]
    return Units(groups, kept)
