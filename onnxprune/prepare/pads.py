"""Pooling windows declared with ``auto_pad`` SAME_UPPER/SAME_LOWER (keras2onnx's MaxPool) given explicit pads.

onnx-ad differentiates pooling with explicit pads only. For the input size of the calibration data
the SAME pads are fixed numbers (ONNX's rule: total = max((ceil(in / stride) - 1) * stride +
(kernel - 1) * dilation + 1 - in, 0), the odd one at the end for SAME_UPPER, at the start for
SAME_LOWER), so writing them out is a lossless rewrite of the analysis copy; ``restore`` gives the
pruned model its ``auto_pad`` back, so it still accepts any input size it accepted before.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxprune.graph.index import attributes
from onnxprune.graph.passes import PassResult, ReversiblePass
from onnxprune.prepare.shapes import tensor_shapes

POOLS = ("MaxPool", "AveragePool", "LpPool")
SAME = ("SAME_UPPER", "SAME_LOWER")


def same_pads(size: list[int], kernel: list[int], strides: list[int], dilations: list[int], mode: str) -> list[int]:
    """ONNX's SAME padding of one input size: begins..., ends..."""
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max((int(np.ceil(n / s)) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return begin + end


class ExplicitPads(ReversiblePass):
    """ensures: the pooling nodes named in ``pads`` (by their output) have those pads and no auto_pad;
    ``restore`` puts each one's auto_pad back in place of the pads."""

    def __init__(self, pads: dict[str, tuple[str, list[int]]]):
        self.pads = pads  # output of the pooling node -> (its auto_pad, the explicit pads)

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        changed = 0
        for node in model.graph.node:
            if node.op_type in POOLS and node.output[0] in self.pads:
                _set(node, "pads", self.pads[node.output[0]][1])
                changed += 1
        note = f"{changed} pooling nodes with auto_pad SAME given explicit pads" if changed else ""
        return PassResult(bool(changed), note)

    def restore(self, model: onnx.ModelProto) -> None:
        for node in model.graph.node:
            if node.op_type in POOLS and node.output[0] in self.pads:
                _set(node, "auto_pad", self.pads[node.output[0]][0])


def _set(node: onnx.NodeProto, name: str, value) -> None:
    """``node`` with attribute ``name`` = value and neither pads nor auto_pad otherwise."""
    kept = [a for a in node.attribute if a.name not in ("pads", "auto_pad")]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(helper.make_attribute(name, value))


def explicit_pads_for(model: onnx.ModelProto, feeds: dict[str, np.ndarray], provider: str = "cpu") -> ExplicitPads | None:
    """An ExplicitPads pass for the SAME-padded pooling nodes of ``model`` at the input size of
    ``feeds`` (one sample measured); None when there are none."""
    pools = [node for node in model.graph.node if node.op_type in POOLS and attributes(node).get("auto_pad", b"") in
             (*SAME, *(mode.encode() for mode in SAME))]
    if not pools:
        return None
    shapes = tensor_shapes(model, [node.input[0] for node in pools], feeds, provider)
    pads = {}
    for node in pools:
        attrs = attributes(node)
        mode = attrs["auto_pad"].decode() if isinstance(attrs["auto_pad"], bytes) else attrs["auto_pad"]
        kernel = list(attrs["kernel_shape"])
        size = list(shapes[node.input[0]][1:])  # per sample: channels, then the spatial sizes
        pads[node.output[0]] = (mode, same_pads(size, kernel, list(attrs.get("strides", [1] * len(kernel))),
                                                list(attrs.get("dilations", [1] * len(kernel))), mode))
    return ExplicitPads(pads)
