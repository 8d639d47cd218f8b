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

Where each part lives: the records (``Cut``, ``Consumer``, ``UnitGroup``, ``Rejected``) in
``unitgroups``, the walk (one matcher per op kind) in ``unitwalk``, attention heads in ``heads``;
this module finds every group of a model.
"""
from __future__ import annotations

import onnx

from onnxprune.find.constants import Constants, static_shapes
from onnxprune.find.heads import attention_groups
from onnxprune.find.layers import Layer, analyse_graph
from onnxprune.find.unitgroups import Consumer, Cut, Rejected, UnitGroup, Units, in_axis, stored_axis
from onnxprune.find.unitplace import Context
from onnxprune.find.unitwalk import match_group
from onnxprune.graph.index import GraphIndex

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
                                cuts=tuple(Cut(r.weight, stored_axis(r, in_axis(r))) for r in readers),
                                selection=_selection(node, mode)))
    return groups, rejected


def _selection(node: onnx.NodeProto | None, mode: str | None) -> str:
    """The op that selects an input group's kept features: its selection node's, or the one ``mode`` names."""
    if node is not None:
        return node.op_type
    if mode is None:
        raise ValueError("an input group needs a selection node or a mode")
    return INPUT_SELECTIONS[mode]


def find_units(model: onnx.ModelProto, layers: list[Layer] | None = None, inputs: str | None = None) -> Units:
    """Every producer layer's unit group, or its rejection, and with ``inputs`` ("slice" or
    "gather") the groups of input features; ``model`` gets node names in place."""
    found = analyse_graph(model)
    layers = found.layers if layers is None else layers
    g = GraphIndex(model)
    ctx = Context(g, Constants(g), static_shapes(model), {layer.name: layer for layer in found.layers},
                  {layer.node: layer for layer in found.layers}, {layer.preact: layer for layer in found.layers})
    depthwise_followers: set[str] = set()
    grouped: set[str] = set()
    groups, rejected = [], []
    for heads in attention_groups(ctx, found.layers):
        if all(p in {layer.name for layer in layers} for p in heads.producers):
            groups.append(heads)
            grouped.update(heads.producers)
    for producer in layers:
        if producer.name in grouped:
            continue  # already in a residual group
        for result in match_group(ctx, producer):
            if isinstance(result, UnitGroup):
                groups.append(result)
                depthwise_followers.update(result.group_attributes)
                grouped.update(p for p in result.producers if p != producer.name)
            else:
                rejected.append(result)
    kept = [r for r in rejected if not (r.layer in depthwise_followers and r.reason.startswith("depthwise Conv"))]
    input_groups, input_rejected = _input_groups(g, model, found.layers if layers is None else layers, inputs)
    return Units(input_groups + groups, input_rejected + kept)
