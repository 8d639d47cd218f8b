"""One matcher per op kind for the unit walk (``unitwalk``): each lets the units through a node
(saying what to slice on the way and where the units are in the node's output) or stops with the
reason. Activations, per-channel constants, normalizations and depthwise Convs are here; the nodes
that only move the units (Reshape, Transpose, Concat, ...) in ``unitlayout``."""
from __future__ import annotations

import onnx

from onnxprune.find import unitlayout
from onnxprune.find.layers import BORDER
from onnxprune.find.unitgroups import Cut, Unavoidable, stored_axis
from onnxprune.find.unitplace import (
    BINARY,
    NORMALIZING,
    POOLING,
    REDUCE,
    UNARY,
    Context,
    Walk,
    channel_axis,
    per_channel_cut,
    stored_source,
)
from onnxprune.graph.index import Rejection, attributes


def step(ctx: Context, walk: Walk, node: onnx.NodeProto, tensor: str) -> list[str]:
    """Let the units in ``tensor`` through ``node`` (one input computed, the rest constants): the
    outputs that carry them, with ``walk`` moved to their place; Rejection with the reason otherwise."""
    op = node.op_type
    outs = [o for o in node.output if o]
    if node.name.endswith(BORDER) and ctx.constants.value(node.input[1]) is None:
        for suffix in ("kernel", "shift"):  # a border map computed at run time: its kernel and shift per channel
            walk.cuts.append(Cut(f"{node.name}__{suffix}", 0, **walk.span))
        return outs[:1]
    matcher = MATCHERS.get(op)
    if matcher is not None:
        return matcher(ctx, walk, node, tensor, outs)
    if op in ("Shape", "Size"):
        return []  # the shape follows the units; where it is read as a Reshape's entry, that Reshape checks it
    if op in UNARY:
        if op == "Clip" and any(i and ctx.constants.value(i) is None for i in node.input[1:]):
            raise Rejection(f"Clip {node.name!r} has bounds computed from the model's inputs")
        if len(outs) > 1 and op != "Dropout":
            raise Rejection(f"{op} {node.name!r} has several outputs")
        return outs[:1]
    if op in BINARY:
        rank = ctx.rank(outs[0])
        for other in node.input:
            if other and other != tensor:
                cut = per_channel_cut(ctx, walk, other, f"{op} operand", rank)
                walk.cuts.extend([cut] if cut else [])
        return outs[:1]
    if op in POOLING:
        if ctx.rank(tensor) == 2:
            raise Rejection(f"{op} {node.name!r} on a 2-D tensor")
        if len(outs) > 1:
            raise Rejection(f"{op} {node.name!r} has an indices output")
        return outs[:1]
    if op in NORMALIZING:
        return _normalizing(ctx, walk, node, tensor, outs)
    raise Rejection(f"{op} {node.name!r} between layers is not a per-unit operation")


def _normalizing(ctx, walk, node, tensor, outs):
    """LayerNormalization over the units' axis mixes the channels: no rewrite removes one of them."""
    rank = ctx.rank(tensor)
    axis = channel_axis(ctx, walk, tensor)
    first = int(attributes(node).get("axis", -1)) % rank if rank else None
    if node.op_type == "GroupNormalization":
        raise Rejection(f"GroupNormalization {node.name!r} normalizes over groups of channels")
    if first is not None and axis < first:
        raise Rejection(f"{node.op_type} {node.name!r} normalizes over axes after the units' channels")
    raise Unavoidable(f"the residual stream of {node.op_type} {node.name!r}: it normalizes over the channels, so "
                      "removing one changes all the others (its FFN units and attention heads are groups of their own)")


def _batchnorm(ctx, walk, node, tensor, outs):
    attrs = attributes(node)
    if attrs.get("training_mode", 0) or len(outs) > 1 or walk.block != 1:
        raise Rejection(f"BatchNormalization {node.name!r} in training mode (or after a Flatten)")
    for name in node.input[1:5]:
        if ctx.constants.value(name) is None:
            raise Rejection(f"BatchNormalization parameter {name!r} is not a constant")
        if ctx.g.users(name) > 1:
            raise Rejection(ctx.g.shared_reason(name, "BatchNormalization parameter"))
        walk.cuts.append(Cut(name, 0, **walk.span) if ctx.constants.stored(name)
                         else stored_source(ctx, walk, name, "BatchNormalization parameter"))
    return outs[:1]


def _instancenorm(ctx, walk, node, tensor, outs):
    """InstanceNormalization normalizes each channel over its positions: per unit, its scale and bias cut."""
    if walk.block != 1 or walk.axis_from_end != (ctx.rank(tensor) or 0) - 1:
        raise Rejection(f"InstanceNormalization {node.name!r} does not normalize the units' channel axis")
    for name in node.input[1:3]:
        cut = per_channel_cut(ctx, walk, name, "InstanceNormalization parameter", 1)
        walk.cuts.extend([cut] if cut else [])
    return outs[:1]


def _conv(ctx, walk, node, tensor, outs):
    """A depthwise Conv (one group per unit) lets the units through: its channels follow them."""
    layer = ctx.layers.get(node.name)
    if layer is None:
        raise Rejection(f"Conv {node.name!r} between layers is not a prunable layer")
    if layer.geometry.groups == walk.width and layer.out_features == walk.width and walk.block == 1:
        walk.cuts.append(Cut(layer.weight, stored_axis(layer, 0), **(walk.span if walk.concatenated else {})))
        if layer.bias is not None:
            bias_cut = (per_channel_cut(ctx, walk, layer.bias, "depthwise bias", None) if layer.bias_node
                        else Cut(layer.bias, 0, **(walk.span if walk.concatenated else {})))
            walk.cuts.extend([bias_cut] if bias_cut else [])
        walk.groups.append(node.name)
        if layer.bias_node:
            walk.path.append(node.name)
            return [layer.preact]
        return outs[:1]
    if walk.concatenated and layer.geometry.groups > 1:
        raise Rejection(f"grouped Conv {node.name!r} after a Concat (not coupled)")
    raise Rejection(f"grouped Conv {node.name!r} (groups={layer.geometry.groups}) reads the units")


MOVING = ("Gather", "Slice", "Split", "Softmax", "LogSoftmax", "Hardmax", "Pad", "Tile", "Resize", "Upsample")
MATCHERS = {"BatchNormalization": _batchnorm, "InstanceNormalization": _instancenorm, "Conv": _conv,
            "Flatten": unitlayout.flatten, "Reshape": unitlayout.reshape, "Transpose": unitlayout.transpose,
            "Unsqueeze": unitlayout.unsqueeze, "Squeeze": unitlayout.squeeze, "Concat": unitlayout.concat,
            **{op: unitlayout.reduce for op in REDUCE}, **{op: unitlayout.along_other_axes for op in MOVING}}
