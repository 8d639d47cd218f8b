"""Unit groups: the neurons, channels (or features) that must be removed together, found on the graph.

A unit j of a group is output row j of a producer layer (a Gemm/MatMul neuron, a Conv channel). It
travels through per-unit nodes (activations, per-channel constants, inference BatchNormalization,
pooling and reductions over other axes, depthwise Convs, and nodes that only move it: Flatten,
Reshape, Transpose, Squeeze, Concat, Split, Slice, Gather along other axes) to the consumer layers
that read it: one column of a dense layer, a block of columns after a Flatten, one input channel of
a Conv. Removing unit j slices every initializer on that path (``Cut``), shrinks depthwise Convs'
``group`` and makes every shape entry that counts the units follow them (``ShapeEdit``).

The couplings are recognised by walking the graph, not by names: where the units meet another
computed tensor of the same channels (a residual Add; SiLU's x * sigmoid(x), GELU or Mish written
out; a squeeze-excitation gate; SwiGLU's act(gate) * up), the walk goes back from it to every
producer writing those channels (they share the group: a residual stream's layers, the SE's last
layer, a gated FFN's up projection) and forward again. A Split or Slice that takes some of a
layer's channels one way and some another divides that layer into parts, each a group
(``layer[k]``); a Concat of the same units twice gives a consumer the units at two offsets. A
tensor broadcast over the channels may join the units when it does not depend on them (a mask); a
normalization over them (LayerNormalization, an RMS norm written out) cannot, and neither can a
graph output: those reasons are ``unavoidable`` and named before any other. Attention heads are
followed through any layout of their own (``heads``). Constants are read through Constant nodes
and small constant subgraphs (``constants``). The input features of a first dense layer are units
when asked for (a Slice or a Gather in front of it, see ``slicing``).

Where each part lives: the records in ``unitgroups``; constants and shapes in ``constants``; the
walk in ``unitwalk`` (its state and per-channel constants in ``unitplace``, one matcher per op kind
in ``unitsteps`` and ``unitlayout``); attention heads in ``heads`` and ``headlayout``; this module
finds every group of a model.
"""
from __future__ import annotations

from dataclasses import replace

import onnx

from onnxprune.find.constants import Constants, static_shapes
from onnxprune.find.heads import attention_groups
from onnxprune.find.layers import Layer, Skipped, analyse_graph
from onnxprune.find.unitgroups import Consumer, Cut, UnitGroup, Units, in_axis, stored_axis
from onnxprune.find.unitplace import BINARY, DATA_INPUTS, NORMALIZING, UNARY, Context
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
            rejected.append(Skipped(f"input:{vi.name}", "input", f"input {vi.name!r} is read by "
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


def find_units(model: onnx.ModelProto, layers: list[Layer] | None = None, inputs: str | None = None,
               kinds: dict[str, str] | None = None) -> Units:
    """Every producer layer's unit group, or its rejection, and with ``inputs`` ("slice" or
    "gather") the groups of input features; ``model`` gets node names in place. ``kinds`` (else those
    of ``layers``): the layers' kinds as the analysis copy's measured shapes told them, which an edited
    model's shape inference may no longer see (a Gemm on folded tokens after a shared shape was edited)."""
    found = analyse_graph(model)
    kinds = kinds if kinds is not None else {layer.name: layer.kind for layer in layers or []}
    every = [replace(layer, kind=kinds.get(layer.name, layer.kind)) for layer in found.layers]
    layers = every if layers is None else layers
    g = GraphIndex(model)
    ctx = Context(g, Constants(g), static_shapes(model), {layer.name: layer for layer in every},
                  {layer.node: layer for layer in every}, {layer.preact: layer for layer in every})
    depthwise_followers: set[str] = set()
    grouped: set[str] = set()
    groups, rejected = [], []
    for heads in attention_groups(ctx, every):
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
    why = {r.node: r for r in rejected}
    kept = [_followed(ctx, r, why) if r.reason.startswith(DEPTHWISE) else r for r in rejected
            if not (r.node in depthwise_followers and r.reason.startswith(DEPTHWISE))]
    input_groups, input_rejected = _input_groups(g, model, layers, inputs)
    return Units(input_groups + groups, input_rejected + kept)


DEPTHWISE = "depthwise Conv"
PASSING = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "BatchNormalization", "Identity"}


def _followed(ctx: Context, rejected: Skipped, why: dict[str, Skipped]) -> Skipped:
    """A depthwise Conv no group passes through: its channels are its input's, so the reason its input's
    writer keeps them is its reason too (ConvNeXt's read the residual stream of a LayerNormalization);
    the nearest rejected layer upstream, through per-channel nodes and joins, is named."""
    pending, seen = [ctx.layers[rejected.node].input], set()
    while pending:
        tensor = pending.pop(0)
        if tensor in seen:
            continue
        seen.add(tensor)
        writer = ctx.by_preact.get(tensor)
        if writer is not None and writer.name in why and writer.name != rejected.node:
            source = why[writer.name]
            return Skipped(rejected.node, rejected.op, f"{DEPTHWISE} {rejected.node!r}: its channels are those of its "
                           f"input, which cannot go ({writer.op} {writer.name!r}: {source.reason})", source.unavoidable)
        node = ctx.g.producers.get(tensor)
        if node is not None and (node.op_type in UNARY | BINARY | PASSING | NORMALIZING):
            pending.extend(i for i in node.input[:DATA_INPUTS.get(node.op_type, len(node.input))]
                           if i and ctx.constants.value(i) is None)
    return rejected
