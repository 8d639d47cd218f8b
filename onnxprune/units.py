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

Several producers adding into one tensor (a residual stream) share its mask: the walk goes back
from every join to all of them and forward again from every tensor it reaches. Attention heads are
matched as a pattern of their own (``match_heads``); the input features of a first dense layer are
units when asked for (a Slice or a Gather in front of it, see ``slicing``). A grouped Conv reading or
writing the units splits them into ``lanes`` (its groups), each losing as many. A Concat along the
channel axis places the units at an ``offset`` among ``width`` channels: each producer keeps its
own group, and the consumers' columns and any per-channel constant after it are cut at that
offset. Not coupled (rejected with their reason): a residual join or a depthwise Conv after a
Concat, Concat along another axis, gating products of two computed tensors, graph outputs,
quantized weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import GraphIndex, attributes
from .layers import Layer, analyse_graph

ELEMENTWISE = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Softplus", "Softsign",
               "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Identity", "Dropout", "Clip", "Erf", "Abs",
               "Neg", "Exp", "Sqrt", "Reciprocal"}
PER_CHANNEL_BINARY = {"Mul", "Add", "Sub", "Div", "PRelu"}
POOLING = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}


@dataclass(frozen=True)
class Cut:
    """Slice initializer ``tensor`` along stored ``axis``: unit j owns entries [(offset + j)*block,
    (offset + j + 1)*block) of the axis's ``width`` units (after a Concat; 0: the group's own count)."""

    tensor: str
    axis: int
    block: int = 1
    groups: int = 1  # a grouped Conv's weight: rows in ``groups`` blocks, each keeps its own units (local indices)
    offset: int = 0
    width: int = 0


@dataclass(frozen=True)
class Consumer:
    """A layer reading the units (from ``tensor``): unit j is columns [(offset + j)*block, (offset + j + 1)*block)
    of its (out, in) view."""

    layer: str
    block: int
    tensor: str = ""
    offset: int = 0   # after a Concat: the units are channels [offset, offset + units) of ``width``
    width: int = 0


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
    reshapes: tuple[tuple[str, int, int], ...] = ()  # (shape initializer, index, entries per unit)
    path: tuple[str, ...] = ()                 # nodes walked between producer and consumers
    selection: str | None = None               # input features: "Slice" (contiguous) or "Gather" (--prune-inputs)
    lanes: int = 1                             # grouped Convs: units in this many equal blocks, each losing as many

    @property
    def producer(self) -> str | None:
        return self.producers[0] if self.producers else None

    def to_dict(self) -> dict:
        return {"group": self.name, "producers": list(self.producers), "units": self.units, "tensor": self.tensor,
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
            raise _Stop(f"grouped Conv {name!r} (groups={groups}) does not divide the {self.units} units "
                        f"into the same blocks as the rest of the group")
        self.lanes = groups


def _per_channel_cut(g: GraphIndex, walk: _Walk, name: str, what: str) -> Cut | None:
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
    if walk.rank is not None and len(dims) > walk.rank:
        raise _Stop(f"{what} {name!r} has shape {list(dims)}, more axes than the units' tensor")
    if len(dims) < walk.axis_from_end:  # the same value for every unit (per position at most)
        return None
    axis = len(dims) - walk.axis_from_end
    if dims[axis] not in (1, walk.width):
        raise _Stop(f"{what} {name!r} has shape {list(dims)}, not one value per unit (and position)")
    return Cut(name, axis, offset=walk.offset, width=walk.width) if dims[axis] == walk.width else None


def _step(g: GraphIndex, layers: dict[str, Layer], walk: _Walk, node: onnx.NodeProto, tensor: str, shapes):
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
        attrs = attributes(node)
        if attrs.get("training_mode", 0) or len(outs) > 1 or walk.block != 1:
            raise _Stop("BatchNormalization in training mode (or after a Flatten)")
        for name in node.input[1:5]:
            if g.constant(name) is None or g.users(name) > 1:
                raise _Stop(f"BatchNormalization parameter {name!r} is not a constant of its own")
            walk.cuts.append(Cut(name, 0, offset=walk.offset, width=walk.width))
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
    if op == "Concat":
        return _concat(g, walk, node, tensor, shapes, outs[0])
    if op == "Conv" and node.name in layers:
        layer = layers[node.name]
        if walk.concatenated and layer.conv.groups > 1:
            raise _Stop(f"grouped Conv {node.name!r} after a Concat (not coupled)")
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
    if op in ("LayerNormalization", "GroupNormalization", "InstanceNormalization"):
        raise _Stop(f"{op} {node.name!r} normalizes over the channels, so removing one changes the others "
                    "(a transformer's residual stream is skipped; its FFN units and attention heads are groups)")
    raise _Stop(f"{op} {node.name!r} between layers is not a per-unit operation")


def _concat(g: GraphIndex, walk: _Walk, node, tensor, shapes, out):
    """Concat along the channel axis: the units move to an offset among the joined channels."""
    shape = shapes.get(tensor)
    if shape is None or walk.block != 1 or list(node.input).count(tensor) != 1:
        raise _Stop(f"Concat {node.name!r} of a tensor of unknown rank, flattened units or itself twice")
    axis = int(attributes(node).get("axis", 0))
    if axis % len(shape) != len(shape) - walk.axis_from_end:
        raise _Stop(f"Concat {node.name!r} joins along axis {axis}, not the units' channel axis")
    widths = []
    for name in node.input:
        constant = g.constant(name)
        other = tuple(constant.shape) if constant is not None else shapes.get(name)
        if other is None or len(other) != len(shape) or other[axis] is None:
            raise _Stop(f"Concat {node.name!r} input {name!r} has a channel count shape inference cannot tell")
        widths.append(int(other[axis]))
    index = list(node.input).index(tensor)
    walk.offset += sum(widths[:index])
    walk.width = sum(widths)
    return out


def _flatten(walk: _Walk, node, tensor, shapes, out):
    shape = shapes.get(tensor)
    if int(attributes(node).get("axis", 1)) != 1 or shape is None or walk.axis_from_end != len(shape) - 1:
        raise _Stop("Flatten not over the channel and spatial axes (or of unknown shape)")
    spatial = shape[2:]
    if any(d is None for d in spatial):
        raise _Stop("Flatten of a tensor whose spatial size shape inference cannot tell")
    walk.block, walk.axis_from_end = int(np.prod(spatial)) if spatial else 1, 1
    return out


def _reshape(g: GraphIndex, walk: _Walk, node, tensor, shapes, out):
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
    if int(target[1]) not in (-1, walk.width * block):
        raise _Stop(f"Reshape to {target.tolist()} does not keep the channel blocks together")
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
    seen_tensors, seen_nodes = set(), set()
    forward, backward = [(start.preact, walk.place)], []
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
                    raise _Stop(f"the units' channels come from the graph input {tensor!r}")
                computed = _visit(g, walk, seen_nodes, node)
                if computed is None:
                    continue
                if node.op_type in JOINS and len(computed) > 1:
                    backward.extend((i, place) for i in computed)
                else:
                    walk.place = place
                    if _step(g, layers, walk, node, computed[0], shapes) != tensor or walk.place != place:
                        raise _Stop(f"{node.op_type} {node.name!r} cannot be walked back to the producers")
                    backward.append((computed[0], place))
                forward.append((tensor, place))
                continue
            tensor, place = forward.pop()
            walk.place = place
            if tensor in seen_tensors:
                continue
            seen_tensors.add(tensor)
            if tensor in g.outputs:
                raise _Stop(f"its units reach the graph output {tensor!r}")
            if not g.consumers[tensor]:
                raise _Stop(f"tensor {tensor!r} is not read by any node")
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
                        raise _Stop(f"{node.op_type} {node.name!r} joins flattened or concatenated units")
                    backward.extend((i, place) for i in computed if i != tensor)
                    forward.append((node.output[0], place))
                    continue
                if layer is not None and node.op_type != "Conv":
                    raise _Stop(f"{layer.op} {layer.name!r} reads the units in an unsupported position")
                walk.place = place
                out = _step(g, layers, walk, node, tensor, shapes)
                forward.append((out, walk.place))
    except _Stop as stop:
        return reject(str(stop))
    position = {node.name: i for i, node in enumerate(g.model.graph.node)}
    readers = sorted(consumers.values(), key=lambda c: position[layers[c.layer].node])
    writers = sorted(producers, key=lambda p: position[p.node])
    return UnitGroup(name=start.name, producers=tuple(p.name for p in writers), units=start.out_features,
                     tensor=readers[0].tensor, consumers=tuple(readers), cuts=tuple(dict.fromkeys(walk.cuts)),
                     group_attributes=tuple(dict.fromkeys(walk.groups)), reshapes=tuple(walk.reshapes),
                     path=tuple(walk.path), lanes=walk.lanes)


JOINS = ("Add", "Sum")


def _visit(g: GraphIndex, walk: _Walk, seen: set, node: onnx.NodeProto) -> list[str] | None:
    """Mark ``node`` walked; its computed (non-constant) inputs, or None if it was walked before."""
    if node.name in seen:
        return None
    seen.add(node.name)
    walk.path.append(node.name)
    return [i for i in node.input if i and g.constant(i) is None]


def _add_producer(g: GraphIndex, walk: _Walk, producers: list, layer: Layer) -> None:
    """A layer writing the units: its rows (and bias) are cut."""
    if any(step.op == "DequantizeLinear" for step in layer.weight_path):
        raise _Stop(f"{layer.name!r} has quantized weights, which are not sliced")
    if layer.op == "Conv" and layer.conv.groups != 1:
        if layer.conv.groups == layer.out_features:
            raise _Stop(f"depthwise Conv {layer.name!r}: its channels follow its input's")
        walk.set_lanes(layer.conv.groups, layer.name)
    if layer.out_features != walk.units:
        raise _Stop(f"{layer.name!r} writes {layer.out_features} channels into a group of {walk.units}")
    producers.append(layer)
    walk.cuts.append(Cut(layer.weight, _stored_axis(layer, _out_axis(layer))))
    bias = g.constant(layer.bias) if layer.bias is not None else None
    # a BatchNormalization holding the bias is sliced by its own step, its bias included
    if bias is not None and bias.size > 1 and not (layer.bias_node and _is_batchnorm(g, layer.bias_node)):
        from_end = (len(layer.weight_shape) - 1 if layer.op == "Conv" else 1) if layer.bias_node else 1
        walk.cuts.append(Cut(layer.bias, bias.ndim - from_end))


def _add_consumer(walk: _Walk, layer: Layer, tensor: str, block: int) -> Consumer:
    """A layer reading the units: its columns are cut."""
    groups = layer.conv.groups if layer.op == "Conv" else 1
    if groups != 1:
        walk.set_lanes(groups, layer.name)
    if any(step.op == "DequantizeLinear" for step in layer.weight_path):
        raise _Stop(f"consumer {layer.name!r} has quantized weights")
    if layer.op == "Conv" and block != 1:
        raise _Stop("a Conv reads flattened units")
    per = int(np.prod(layer.weight_shape[2:])) if layer.op == "Conv" else block
    if layer.in_features * groups != walk.width * per:
        raise _Stop(f"consumer {layer.name!r} has {layer.in_features * groups} inputs, not {walk.width} x {per}")
    if groups != 1 and (walk.concatenated or any(step.op == "Transpose" for step in layer.weight_path)):
        raise _Stop(f"grouped Conv {layer.name!r} with a transposed weight or after a Concat")
    walk.cuts.append(Cut(layer.weight, _stored_axis(layer, _in_axis(layer)), block if layer.op != "Conv" else 1, groups,
                         walk.offset, walk.width))
    return Consumer(layer.name, per, tensor, walk.offset, walk.width)


def _depthwise(layer: Layer, walk: _Walk) -> bool:
    return layer.op == "Conv" and layer.conv.groups == walk.units and layer.out_features == walk.units and walk.units > 1


def _is_batchnorm(g: GraphIndex, node_name: str) -> bool:
    return any(n.name == node_name and n.op_type == "BatchNormalization" for n in g.model.graph.node)


INPUT_SELECTIONS = {"slice": "Slice", "gather": "Gather"}


def selection_node(name: str) -> str:
    """Name of the node that selects the kept features of graph input ``name``."""
    return f"onnxprune__inputs__{name}"


def _input_groups(g: GraphIndex, model: onnx.ModelProto, layers: list[Layer], mode: str | None) -> tuple[list, list]:
    """Groups of input features (no producer): a graph input read only by dense layers, directly or
    through the selection node (a contiguous Slice, or a Gather for --prune-inputs) an earlier step
    inserted. Found when ``mode`` asks for them or a selection node is already there."""
    groups, rejected = [], []
    inits = set(g.inits)
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        node = next((n for n in g.consumers[vi.name] if n.name == selection_node(vi.name)), None)
        if node is None and mode is None:
            continue
        tensor = node.output[0] if node is not None else vi.name
        readers = [layer for layer in layers if layer.input == tensor]
        others = [n.op_type for n in g.consumers[tensor] if n.name not in {r.node for r in readers}]
        if others or not readers or any(r.kind != "dense" or r.weight_path for r in readers) or g.ranks.get(vi.name) != 2:
            rejected.append(Rejected(f"input:{vi.name}", "input", f"input {vi.name!r} is read by "
                                     f"{', '.join(sorted(set(others))) or 'no dense layer'}, not only by 2-D dense layers"))
            continue
        units = readers[0].in_features
        groups.append(UnitGroup(name=f"input:{vi.name}", producers=(), units=units, tensor=tensor,
                                consumers=tuple(Consumer(r.name, 1, tensor) for r in readers),
                                cuts=tuple(Cut(r.weight, _stored_axis(r, _in_axis(r))) for r in readers),
                                selection=node.op_type if node is not None else INPUT_SELECTIONS[mode]))
    return groups, rejected


def _only(g: GraphIndex, tensor: str, op: str, perm: tuple | None = None) -> onnx.NodeProto:
    """The node producing ``tensor`` when it is an ``op`` (with ``perm``) read by nothing else; else _Stop."""
    node = g.producers.get(tensor)
    if node is None or node.op_type != op or g.users(tensor) != 1:
        raise _Stop(f"no {op} produces {tensor!r} for this node alone")
    if perm is not None and tuple(attributes(node).get("perm", ())) != perm:
        raise _Stop(f"{op} {node.name!r} has perm {list(attributes(node).get('perm', []))}, not {list(perm)}")
    return node


def _head_split(g: GraphIndex, by_preact: dict[str, Layer], tensor: str, perm: tuple):
    """tensor <- Transpose(perm) <- Reshape (N, S, H, D) <- a sequence layer's pre-activation."""
    transpose = _only(g, tensor, "Transpose", perm)
    reshape = _only(g, transpose.input[0], "Reshape")
    shape = g.constant(reshape.input[1])
    layer = by_preact.get(reshape.input[0])
    if shape is None or shape.shape != (4,) or layer is None or layer.kind != "sequence" or g.users(reshape.input[0]) != 1:
        raise _Stop(f"Reshape {reshape.name!r} does not split a projection into (N, S, heads, head size)")
    if g.users(reshape.input[1]) > 1:
        raise _Stop(f"Reshape shape {reshape.input[1]!r} is shared")
    return layer, reshape, shape, (transpose.name, reshape.name)


def match_heads(g: GraphIndex, by_preact: dict[str, Layer], out: Layer) -> UnitGroup:
    """Attention heads read by the output projection ``out``: head h is columns [hD, (h+1)D) of the
    Q, K and V projections (and their biases) and the same rows of ``out``'s input, removed together.

    The pattern (a batch-first export): ctx = Reshape(Transpose(Softmax(scale(Q K^T)) V)) -> out,
    Q, K, V = Transpose(Reshape(projection, (N, S, H, D))) with K transposed to (N, H, D, S)."""
    back = _only(g, out.input, "Reshape")
    merged = g.constant(back.input[1])
    transpose = _only(g, back.input[0], "Transpose", (0, 2, 1, 3))
    context = _only(g, transpose.input[0], "MatMul")
    probabilities, v_heads = context.input
    path = [back.name, transpose.name, context.name]
    node = _only(g, probabilities, "Softmax")
    path.append(node.name)
    while True:  # a scale, a mask: constants only
        node = g.producers.get(node.input[0])
        if node is None or g.users(node.output[0]) != 1:
            raise _Stop("the attention scores have other users")
        path.append(node.name)
        if node.op_type == "MatMul":
            break
        if node.op_type not in ("Mul", "Div", "Add") or g.constant(node.input[1]) is None:
            raise _Stop(f"{node.op_type} {node.name!r} between Q K^T and the Softmax is not a constant scale or mask")
    q, q_reshape, q_shape, q_path = _head_split(g, by_preact, node.input[0], (0, 2, 1, 3))
    k, k_reshape, k_shape, k_path = _head_split(g, by_preact, node.input[1], (0, 2, 3, 1))
    v, v_reshape, v_shape, v_path = _head_split(g, by_preact, v_heads, (0, 2, 1, 3))
    heads, size = int(q_shape[2]), int(q_shape[3])
    if heads <= 0 or size <= 0 or any(int(s[2]) not in (heads, -1) or int(s[3]) != size for s in (k_shape, v_shape)):
        raise _Stop("the heads' Reshapes do not name the head count and size alike")
    if merged is None or merged.shape != (3,) or int(merged[2]) not in (heads * size, -1) or g.users(back.input[1]) > 1:
        raise _Stop(f"Reshape {back.name!r} does not merge the heads into (N, S, heads x head size)")
    if out.in_features != heads * size or any(p.out_features != heads * size for p in (q, k, v)):
        raise _Stop("projections of another width than heads x head size")
    cuts = []
    for layer in (q, k, v):
        cuts.append(Cut(layer.weight, _stored_axis(layer, _out_axis(layer)), size))
        bias = g.constant(layer.bias) if layer.bias is not None else None
        if bias is not None and bias.size > 1:
            cuts.append(Cut(layer.bias, bias.ndim - 1, size))
    cuts.append(Cut(out.weight, _stored_axis(out, _in_axis(out)), size))
    reshapes = [(r.input[1], 2, 1) for r, s in ((q_reshape, q_shape), (k_reshape, k_shape), (v_reshape, v_shape)) if s[2] > 0]
    if merged[2] > 0:
        reshapes.append((back.input[1], 2, size))
    return UnitGroup(name=f"heads:{out.name}", producers=(q.name, k.name, v.name), units=heads, tensor=out.input,
                     consumers=(Consumer(out.name, size, out.input),), cuts=tuple(cuts),
                     reshapes=tuple(reshapes), path=tuple(path + list(q_path + k_path + v_path)))


def _attention_groups(g: GraphIndex, layers: list[Layer]) -> list[UnitGroup]:
    """Head groups of every sequence layer that reads merged attention heads."""
    by_preact = {layer.preact: layer for layer in layers}
    found = []
    for layer in layers:
        if layer.kind == "sequence" and getattr(g.producers.get(layer.input), "op_type", None) == "Reshape":
            try:
                found.append(match_heads(g, by_preact, layer))
            except _Stop:
                continue  # not attention: the ordinary walk names the reason
    return found


def find_units(model: onnx.ModelProto, layers: list[Layer] | None = None, inputs: str | None = None) -> Units:
    """Every producer layer's unit group, or its rejection, and with ``inputs`` ("slice" or
    "gather") the groups of input features; ``model`` gets node names in place."""
    found = analyse_graph(model)
    layers = found.layers if layers is None else layers
    g = GraphIndex(model)
    shapes = _shapes(model)
    by_name = {layer.name: layer for layer in found.layers}
    by_node = {layer.node: layer for layer in found.layers}
    depthwise_followers, grouped = set(), set()
    groups, rejected = [], []
    for heads in _attention_groups(g, found.layers):
        if all(p in {layer.name for layer in layers} for p in heads.producers):
            groups.append(heads)
            grouped.update(heads.producers)
    for producer in layers:
        if producer.name in grouped:
            continue  # already in a residual group
        result = match_group(g, by_name, by_node, producer, shapes)
        if isinstance(result, UnitGroup):
            groups.append(result)
            depthwise_followers.update(result.group_attributes)
            grouped.update(result.producers)
        else:
            rejected.append(result)
    kept = [r for r in rejected if not (r.layer in depthwise_followers and r.reason.startswith("depthwise Conv"))]
    input_groups, input_rejected = _input_groups(g, model, found.layers if layers is None else layers, inputs)
    return Units(input_groups + groups, input_rejected + kept)
