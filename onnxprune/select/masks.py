"""Turn scores into prune masks: an exact count, one global threshold, the same ratio per layer, or an
N:M pattern (in every row, at most N nonzero weights in each group of M consecutive inputs: NVIDIA's
2:4 semi-structured sparsity; for a Conv the groups run along the input channels at each kernel
position, as its sparse kernels read them).

Ties are broken deterministically: equal scores are pruned in graph order, then row-major order.
"""
from __future__ import annotations

import fnmatch

import numpy as np

from onnxprune.errors import CheckFailed, InputError
from onnxprune.find.layers import Layer
from onnxprune.find.patterns import Pattern, group_order, pattern_problem

SCOPES = ("global", "layer")


def parse_pattern(text: str) -> Pattern:
    """'2:4' -> (2, 4); an InputError for anything but 0 < N < M."""
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise InputError(f"--pattern must be N:M (e.g. 2:4: at most N nonzero weights in every M consecutive inputs), "
                         f"got {text!r}") from None
    if not 0 < n < m:
        raise InputError(f"--pattern N:M needs 0 < N < M, got {text!r}")
    return n, m


def pattern_name(pattern: Pattern | None) -> str | None:
    return None if pattern is None else f"{pattern[0]}:{pattern[1]}"


def pattern_sparsity(pattern: Pattern) -> float:
    """The fraction an N:M pattern prunes: (M - N) / M."""
    return (pattern[1] - pattern[0]) / pattern[1]


def pattern_masks(layer: Layer, scores: np.ndarray, fraction: float, m: int) -> np.ndarray:
    """Per row, the round(fraction * M) lowest scores of every group of M consecutive inputs (in
    ``group_order``) pruned; ties go to the lower index."""
    order = group_order(layer)
    k = round(fraction * m)
    grouped = scores[:, order].reshape(layer.out_features, -1, m)
    lowest = np.argsort(grouped, axis=-1, kind="stable")[..., :k]
    chosen = np.zeros(grouped.shape, bool)
    np.put_along_axis(chosen, lowest, True, axis=-1)
    mask = np.zeros(scores.shape, bool)
    mask[:, order] = chosen.reshape(layer.out_features, -1)
    return mask


def excluded(layer: Layer, patterns) -> bool:
    """A layer matches an --exclude pattern by its node name or its weight's name (shell wildcards)."""
    return any(fnmatch.fnmatchcase(layer.name, p) or fnmatch.fnmatchcase(layer.weight, p) for p in patterns)


def check_patterns(layers: list[Layer], patterns) -> None:
    """Every --exclude pattern matches some prunable layer (one that matches none is a typo)."""
    unused = [p for p in patterns if not any(excluded(layer, [p]) for layer in layers)]
    if unused:
        raise InputError(f"--exclude pattern(s) {unused} match no prunable layer")


def choose_masks(layers: list[Layer], scores: dict[str, np.ndarray], sparsity: float, scope: str = "global",
                 exclude=(), pattern: Pattern | None = None) -> dict[str, np.ndarray]:
    """Boolean (out, in) masks, True = pruned, with exactly round(sparsity * n) weights pruned among
    the candidate (non-excluded) layers: globally, or per layer; with an N:M ``pattern``,
    round(sparsity * M) in every group of M (M - N at the pattern's own sparsity)."""
    if not 0.0 <= sparsity <= 1.0:
        raise InputError(f"sparsity must be between 0 and 1, got {sparsity}")
    if scope not in SCOPES:
        raise InputError(f"scope must be one of {SCOPES}, got {scope!r}")
    candidates = [layer for layer in layers if not excluded(layer, exclude)]
    check_patterns(layers, exclude)
    masks = {layer.name: np.zeros((layer.out_features, layer.in_features), bool) for layer in layers}
    for layer in candidates:
        if not np.all(np.isfinite(scores[layer.name])):
            raise CheckFailed(f"scores of layer {layer.name} contain NaN or Inf")
    if pattern is not None:
        if sparsity > pattern_sparsity(pattern) + 1e-12:
            raise InputError(f"the pattern {pattern_name(pattern)} prunes {pattern_sparsity(pattern):.0%} of the weights; "
                             f"{sparsity:g} is more")
        for layer in candidates:
            problem = pattern_problem(layer, pattern)
            if problem:
                raise InputError(f"{problem}: the pattern {pattern_name(pattern)} needs groups of {pattern[1]}; "
                                 f"leave it out with --exclude {layer.name}")
            masks[layer.name] = pattern_masks(layer, scores[layer.name], sparsity, pattern[1])
        return masks
    if scope == "layer":
        for layer in candidates:
            flat = scores[layer.name].ravel()
            masks[layer.name].ravel()[_lowest(flat, round(sparsity * flat.size))] = True
        return masks
    flat = np.concatenate([scores[layer.name].ravel() for layer in candidates]) if candidates else np.zeros(0)
    chosen = np.zeros(flat.size, bool)
    chosen[_lowest(flat, round(sparsity * flat.size))] = True
    start = 0
    for layer in candidates:
        masks[layer.name] = chosen[start:start + layer.size].reshape(layer.out_features, layer.in_features)
        start += layer.size
    return masks


def _lowest(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest values; ties go to the lower index. A partition finds the k-th value
    (linear time; a full sort of 11.7M scores takes 15x longer), then every value below it and the
    first of those equal to it are taken."""
    if k <= 0:
        return np.zeros(0, np.int64)
    if k >= values.size:
        return np.arange(values.size)
    kth = np.partition(values, k - 1)[k - 1]
    below = np.flatnonzero(values < kth)
    return np.concatenate([below, np.flatnonzero(values == kth)[:k - below.size]])
