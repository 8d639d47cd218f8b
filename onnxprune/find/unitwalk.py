"""The walk from a producer layer through per-channel nodes to the layers that read its units: one
small matcher per op kind, each letting the units through (saying what to slice) or stopping with
the reason (see ``units``)."""
from __future__ import annotations

import numpy as np
import onnx

from onnxprune.find.layers import Layer
from onnxprune.find.unitgroups import Consumer, Cut, Rejected, Stop, UnitGroup, in_axis, out_axis, stored_axis
from onnxprune.graph.index import GraphIndex, attributes

ELEMENTWISE = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Softplus", "Softsign",
               "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Identity", "Dropout", "Clip", "Erf", "Abs",
               "Neg", "Exp", "Sqrt", "Reciprocal"}
PER_CHANNEL_BINARY = {"Mul", "Add", "Sub", "Div", "PRelu"}
POOLING = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}


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
        self.lanes = 1
        self.offset, self.width = 0, self.units  # the units' channels in the tensor reached (a Concat widens it)

    @property
    def place(self) -> tuple[int, int, int, int]:
        return self.axis_from_end, self.block, self.offset, self.width

    @place.setter
    def place(self, value: tuple[int, int, int, int]) -> None:
        self.axis_from_end, self.block, self.offset, self.width = value

    @property
    def concatenated(self) -> bool:
        return self.offset != 0 or self.width != self.units

    def set_lanes(self, groups: int, name: str) -> None:
        """A grouped Conv reads or writes the units: every one of its groups must keep as many."""
        if self.lanes not in (1, groups) or self.units % groups:
            raise Stop(f"grouped Conv {name!r} (groups={groups}) does not divide the {self.units} units "
                        f"into the same blocks as the rest of the group")
        self.lanes = groups


def _per_channel_cut(g: GraphIndex, walk: _Walk, name: str, what: str) -> Cut | None:
    """A constant that acts per channel (or is a scalar): the cut it needs (None: nothing); else Stop."""
    value = g.constant(name)
    if value is None:
        raise Stop(f"{what} {name!r} is computed, not a constant (a residual or gated connection)")
    if g.users(name) > 1:
        raise Stop(f"{what} {name!r} is shared with other nodes")
    if value.size == 1:
        return None
    if walk.block != 1:
        raise Stop(f"{what} {name!r} acts per feature after a Flatten, not per unit")
    dims = tuple(value.shape)
    if walk.rank is not None and len(dims) > walk.rank:
        raise Stop(f"{what} {name!r} has shape {list(dims)}, more axes than the units' tensor")
    if len(dims) < walk.axis_from_end:  # the same value for every unit (per position at most)
        return None
    axis = len(dims) - walk.axis_from_end
    if dims[axis] not in (1, walk.width):
        raise Stop(f"{what} {name!r} has shape {list(dims)}, not one value per unit (and position)")
    return Cut(name, axis, offset=walk.offset, width=walk.width) if dims[axis] == walk.width else None


def _step(g: GraphIndex, layers: dict[str, Layer], walk: _Walk, node: onnx.NodeProto, tensor: str, shapes):
    """Let the units through ``node``: its output tensor, or a reason why they cannot pass."""
    op = node.op_type
    outs = [o for o in node.output if o]
    if op in ELEMENTWISE:
        if op == "Clip" and any(i and g.constant(i) is None for i in node.input[1:]):
            raise Stop("Clip with computed bounds")
        if len(outs) > 1 and op != "Dropout":
            raise Stop(f"{op} with several outputs")
        return outs[0]
    if op in PER_CHANNEL_BINARY:
        if op in ("Sub", "Div") and node.input[0] != tensor:
            raise Stop(f"{op} {node.name!r} has the units as its second operand")
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        cut = _per_channel_cut(g, walk, other, f"{op} operand")
        walk.cuts.extend([cut] if cut else [])
        return outs[0]
    if op == "BatchNormalization":
        attrs = attributes(node)
        if attrs.get("training_mode", 0) or len(outs) > 1 or walk.block != 1:
            raise Stop("BatchNormalization in training mode (or after a Flatten)")
        for name in node.input[1:5]:
            if g.constant(name) is None or g.users(name) > 1:
                raise Stop(f"BatchNormalization parameter {name!r} is not a constant of its own")
            walk.cuts.append(Cut(name, 0, offset=walk.offset, width=walk.width))
        return outs[0]
    if op in POOLING:
        if walk.axis_from_end == 1 and walk.rank == 2:
            raise Stop(f"{op} on a 2-D tensor")
        if len(outs) > 1:
            raise Stop(f"{op} with an indices output")
        return outs[0]
    if op == "Flatten":
        return _flatten(walk, node, tensor, shapes, outs[0])
    if op == "Reshape":
        return _reshape(g, walk, node, tensor, shapes, outs[0])
    if op == "Concat":
        return _concat(g, walk, node, tensor, shapes, outs[0])
    if op == "Conv" and node.name in layers:
        layer = layers[node.name]
        if walk.concatenated and layer.geometry.groups > 1:
            raise Stop(f"grouped Conv {node.name!r} after a Concat (not coupled)")
        if layer.geometry.groups == walk.units and layer.out_features == walk.units:  # depthwise: channels follow
            walk.cuts.append(Cut(layer.weight, stored_axis(layer, 0)))
            if layer.bias is not None:
                bias_cut = _per_channel_cut(g, walk, layer.bias, "depthwise bias") if layer.bias_node else Cut(layer.bias, 0)
                walk.cuts.extend([bias_cut] if bias_cut else [])
            walk.groups.append(node.name)
            if layer.bias_node:
                walk.path.append(node.name)
                return layer.preact
            return outs[0]
        raise Stop(f"grouped Conv {node.name!r} (groups={layer.geometry.groups}) reads the units")
    if op in ("LayerNormalization", "GroupNormalization", "InstanceNormalization"):
        raise Stop(f"{op} {node.name!r} normalizes over the channels, so removing one changes the others "
                    "(a transformer's residual stream is skipped; its FFN units and attention heads are groups)")
    raise Stop(f"{op} {node.name!r} between layers is not a per-unit operation")


def _concat(g: GraphIndex, walk: _Walk, node, tensor, shapes, out):
    """Concat along the channel axis: the units move to an offset among the joined channels."""
    shape = shapes.get(tensor)
    if shape is None or walk.block != 1 or list(node.input).count(tensor) != 1:
        raise Stop(f"Concat {node.name!r} of a tensor of unknown rank, flattened units or itself twice")
    axis = int(attributes(node).get("axis", 0))
    if axis % len(shape) != len(shape) - walk.axis_from_end:
        raise Stop(f"Concat {node.name!r} joins along axis {axis}, not the units' channel axis")
    widths = []
    for name in node.input:
        constant = g.constant(name)
        other = tuple(constant.shape) if constant is not None else shapes.get(name)
        if other is None or len(other) != len(shape) or other[axis] is None:
            raise Stop(f"Concat {node.name!r} input {name!r} has a channel count shape inference cannot tell")
        widths.append(int(other[axis]))
    index = list(node.input).index(tensor)
    walk.offset += sum(widths[:index])
    walk.width = sum(widths)
    return out


def _flatten(walk: _Walk, node, tensor, shapes, out):
    shape = shapes.get(tensor)
    if int(attributes(node).get("axis", 1)) != 1 or shape is None or walk.axis_from_end != len(shape) - 1:
        raise Stop("Flatten not over the channel and spatial axes (or of unknown shape)")
    spatial = shape[2:]
    if any(d is None for d in spatial):
        raise Stop("Flatten of a tensor whose spatial size shape inference cannot tell")
    walk.block, walk.axis_from_end = int(np.prod(spatial)) if spatial else 1, 1
    return out


def _reshape(g: GraphIndex, walk: _Walk, node, tensor, shapes, out):
    """Reshape (N, C, *spatial) -> (N, C*prod(spatial)) (a Flatten written as a Reshape)."""
    shape, target = shapes.get(tensor), g.constant(node.input[1])
    if target is None or shape is None or walk.axis_from_end != len(shape) - 1 or target.ndim != 1 or len(target) != 2:
        raise Stop("Reshape other than (N, C, ...) -> (N, C x positions) with a constant shape")
    if g.users(node.input[1]) > 1:
        raise Stop(f"Reshape shape {node.input[1]!r} is shared with other nodes")
    spatial = shape[2:]
    if any(d is None for d in spatial):
        raise Stop("Reshape of a tensor whose spatial size shape inference cannot tell")
    block = int(np.prod(spatial)) if spatial else 1
    if int(target[1]) not in (-1, walk.width * block):
        raise Stop(f"Reshape to {target.tolist()} does not keep the channel blocks together")
    if int(target[1]) != -1:
        walk.reshapes.append((node.input[1], 1, block))
    walk.block, walk.axis_from_end = block, 1
    return out


def match_group(g: GraphIndex, layers: dict[str, Layer], by_node: dict[str, Layer], start: Layer, shapes) -> UnitGroup | Rejected:
    """The unit group of ``start``'s output rows, or why it has none.

    The group is the connected set of tensors that carry the same units: walked forward through
    per-unit nodes to the consumer layers, and, at an Add (or Sum) of computed tensors, backward
    from its other inputs to every producer writing into the same channels (a residual stream:
    all of them share one mask), then forward again from every tensor reached (skip connections).
    """
    def reject(reason: str) -> Rejected:
        return Rejected(start.name, start.op, reason)

    by_preact = {layer.preact: layer for layer in layers.values()}
    walk = _Walk(start, g.ranks.get(start.input))
    producers: list[Layer] = []
    consumers: dict[str, Consumer] = {}
    seen_tensors: set[str] = set()
    seen_nodes: set[str] = set()
    forward = [(start.preact, walk.place)]
    backward: list[tuple[str, tuple[int, int, int, int]]] = []
    try:
        _add_producer(g, walk, producers, start)
        while forward or backward:
            if backward:
                tensor, place = backward.pop()
                layer = by_preact.get(tensor)
                if layer is not None and not _depthwise(layer, walk):
                    if layer not in producers:
                        _add_producer(g, walk, producers, layer)
                    forward.append((tensor, place))
                    continue
                node = g.producers.get(tensor)
                if node is None:
                    raise Stop(f"the units' channels come from the graph input {tensor!r}")
                computed = _visit(g, walk, seen_nodes, node)
                if computed is None:
                    continue
                if node.op_type in JOINS and len(computed) > 1:
                    backward.extend((i, place) for i in computed)
                else:
                    walk.place = place
                    if _step(g, layers, walk, node, computed[0], shapes) != tensor or walk.place != place:
                        raise Stop(f"{node.op_type} {node.name!r} cannot be walked back to the producers")
                    backward.append((computed[0], place))
                forward.append((tensor, place))
                continue
            tensor, place = forward.pop()
            walk.place = place
            if tensor in seen_tensors:
                continue
            seen_tensors.add(tensor)
            if tensor in g.outputs:
                raise Stop(f"its units reach the graph output {tensor!r}")
            if not g.consumers[tensor]:
                raise Stop(f"tensor {tensor!r} is not read by any node")
            for node in g.consumers[tensor]:
                walk.place = place  # as the tensor has the units (a sibling's step may have moved them)
                layer = by_node.get(node.name)
                if layer is not None and layer.input == tensor and not _depthwise(layer, walk):
                    if layer.name not in consumers:
                        consumers[layer.name] = _add_consumer(walk, layer, tensor, walk.block)
                    continue
                computed = _visit(g, walk, seen_nodes, node)
                if computed is None:
                    continue
                if node.op_type in JOINS and len(computed) > 1:
                    if walk.block != 1 or walk.concatenated:
                        raise Stop(f"{node.op_type} {node.name!r} joins flattened or concatenated units")
                    backward.extend((i, place) for i in computed if i != tensor)
                    forward.append((node.output[0], place))
                    continue
                if layer is not None and node.op_type != "Conv":
                    raise Stop(f"{layer.op} {layer.name!r} reads the units in an unsupported position")
                walk.place = place
                out = _step(g, layers, walk, node, tensor, shapes)
                forward.append((out, walk.place))
    except Stop as stop:
        return reject(str(stop))
    position = {node.name: i for i, node in enumerate(g.model.graph.node)}
    readers = sorted(consumers.values(), key=lambda c: position[layers[c.layer].node])
    writers = sorted(producers, key=lambda p: position[p.node])
    return UnitGroup(name=start.name, producers=tuple(p.name for p in writers), units=start.out_features,
                     tensor=readers[0].tensor, consumers=tuple(readers), cuts=tuple(dict.fromkeys(walk.cuts)),
                     group_attributes=tuple(dict.fromkeys(walk.groups)), reshapes=tuple(walk.reshapes),
                     path=tuple(walk.path), lanes=walk.lanes)


JOINS = ("Add", "Sum")


def _visit(g: GraphIndex, walk: _Walk, seen: set[str], node: onnx.NodeProto) -> list[str] | None:
    """Mark ``node`` walked; its computed (non-constant) inputs, or None if it was walked before."""
    if node.name in seen:
        return None
    seen.add(node.name)
    walk.path.append(node.name)
    return [i for i in node.input if i and g.constant(i) is None]


def _add_producer(g: GraphIndex, walk: _Walk, producers: list, layer: Layer) -> None:
    """A layer writing the units: its rows (and bias) are cut."""
    if any(step.op == "DequantizeLinear" for step in layer.weight_path):
        raise Stop(f"{layer.name!r} has quantized weights, which are not sliced")
    if layer.op == "Conv" and layer.geometry.groups != 1:
        if layer.geometry.groups == layer.out_features:
            raise Stop(f"depthwise Conv {layer.name!r}: its channels follow its input's")
        walk.set_lanes(layer.geometry.groups, layer.name)
    if layer.out_features != walk.units:
        raise Stop(f"{layer.name!r} writes {layer.out_features} channels into a group of {walk.units}")
    producers.append(layer)
    walk.cuts.append(Cut(layer.weight, stored_axis(layer, out_axis(layer))))
    bias = g.constant(layer.bias) if layer.bias is not None else None
    # a BatchNormalization holding the bias is sliced by its own step, its bias included
    if (layer.bias is not None and bias is not None and bias.size > 1
            and not (layer.bias_node and _is_batchnorm(g, layer.bias_node))):
        from_end = (len(layer.weight_shape) - 1 if layer.op == "Conv" else 1) if layer.bias_node else 1
        walk.cuts.append(Cut(layer.bias, bias.ndim - from_end))


def _add_consumer(walk: _Walk, layer: Layer, tensor: str, block: int) -> Consumer:
    """A layer reading the units: its columns are cut."""
    groups = layer.geometry.groups if layer.op == "Conv" else 1
    if groups != 1:
        walk.set_lanes(groups, layer.name)
    if any(step.op == "DequantizeLinear" for step in layer.weight_path):
        raise Stop(f"consumer {layer.name!r} has quantized weights")
    if layer.op == "Conv" and block != 1:
        raise Stop("a Conv reads flattened units")
    per = int(np.prod(layer.weight_shape[2:])) if layer.op == "Conv" else block
    if layer.in_features * groups != walk.width * per:
        raise Stop(f"consumer {layer.name!r} has {layer.in_features * groups} inputs, not {walk.width} x {per}")
    if groups != 1 and (walk.concatenated or any(step.op == "Transpose" for step in layer.weight_path)):
        raise Stop(f"grouped Conv {layer.name!r} with a transposed weight or after a Concat")
    walk.cuts.append(Cut(layer.weight, stored_axis(layer, in_axis(layer)), block if layer.op != "Conv" else 1, groups,
                         walk.offset, walk.width))
    return Consumer(layer.name, per, tensor, walk.offset, walk.width)


def _depthwise(layer: Layer, walk: _Walk) -> bool:
    return layer.op == "Conv" and layer.geometry.groups == walk.units and layer.out_features == walk.units and walk.units > 1


def _is_batchnorm(g: GraphIndex, node_name: str) -> bool:
    return any(n.name == node_name and n.op_type == "BatchNormalization" for n in g.model.graph.node)
