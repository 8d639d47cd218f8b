"""N:M patterns over a layer's inputs: which consecutive inputs form a group, whether a layer's inputs
split into groups of M, and which pattern a layer's weights follow (``inspect`` on a pruned model).

In the (out, in) view a Gemm or MatMul's groups are M consecutive inputs of a row; a Conv's run along
the input channels at each kernel position (the layout sparse Conv kernels read).
"""
from __future__ import annotations

import numpy as np

from onnxprune.find.layers import Layer

Pattern = tuple[int, int]  # (N, M): at most N nonzero weights in every M consecutive inputs
SIZES = (2, 4, 8, 16)      # the group sizes ``detect_pattern`` tries


def group_order(layer: Layer) -> np.ndarray:
    """The (out, in) view's columns in the order whose consecutive runs are the pattern's groups: the
    inputs as they are for Gemm/MatMul; for a Conv, channel-major at each kernel position."""
    if layer.op != "Conv":
        return np.arange(layer.in_features)
    channels = layer.weight_shape[1]
    return np.arange(layer.in_features).reshape(channels, -1).T.ravel()


def pattern_problem(layer: Layer, pattern: Pattern) -> str | None:
    """Why ``layer``'s inputs do not split into the pattern's groups, or None."""
    m = pattern[1]
    width = layer.weight_shape[1] if layer.op == "Conv" else layer.in_features
    if width % m:
        what = "input channels" if layer.op == "Conv" else "inputs"
        return f"layer {layer.name} has {width} {what}, not a multiple of {m}"
    return None


def detect_pattern(layer: Layer, rows: np.ndarray, sizes=SIZES) -> str | None:
    """The N:M pattern a layer's (out, in) weights follow ('2:4': at most 2 nonzero in every group of
    4), for the smallest M of ``sizes`` where every group holds fewer than M nonzeros; None if none."""
    for m in sizes:
        if pattern_problem(layer, (1, m)) is not None:
            continue
        nonzero = (rows[:, group_order(layer)] != 0).reshape(layer.out_features, -1, m).sum(-1)
        n = int(nonzero.max(initial=0))
        if 0 < n < m:
            return f"{n}:{m}"
    return None
