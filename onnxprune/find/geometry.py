"""Conv geometry and im2col: what each weight of a Conv multiplies, at every position."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


@dataclass(frozen=True)
class ConvGeometry:
    """A Conv node's attributes, with the kernel taken from the weight when the node omits it."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]       # begin..., end... (used when auto_pad is NOTSET)
    auto_pad: str
    groups: int
    in_channels: int

    @property
    def rank(self) -> int:
        return len(self.kernel)

    def resolved_pads(self, spatial: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """(begin, end) padding of every spatial axis for an input of size ``spatial``."""
        n = self.rank
        if self.auto_pad in ("NOTSET", ""):
            return list(self.pads[:n]), list(self.pads[n:])
        if self.auto_pad == "VALID":
            return [0] * n, [0] * n
        begin, end = [], []
        for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(small if self.auto_pad == "SAME_UPPER" else large)
            end.append(large if self.auto_pad == "SAME_UPPER" else small)
        return begin, end

    def output_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        begin, end = self.resolved_pads(spatial)
        return tuple((size + b + e - d * (k - 1) - 1) // s + 1
                     for size, b, e, k, s, d in zip(spatial, begin, end, self.kernel, self.strides, self.dilations))


def conv_geometry(attrs: dict, weight_shape: tuple[int, ...]) -> ConvGeometry | str:
    """The geometry of a Conv with attributes ``attrs`` and a weight of ``weight_shape``, or why not."""
    if len(weight_shape) < 3:
        return f"Conv weight has shape {list(weight_shape)}; expected (out, in/groups, kernel...)"
    n = len(weight_shape) - 2
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", weight_shape[2:]))
    if kernel != tuple(weight_shape[2:]):
        return f"Conv kernel_shape {list(kernel)} differs from the weight's {list(weight_shape[2:])}"
    strides = tuple(int(s) for s in attrs.get("strides", [1] * n))
    dilations = tuple(int(d) for d in attrs.get("dilations", [1] * n))
    pads = tuple(int(p) for p in attrs.get("pads", [0] * (2 * n)))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    groups = int(attrs.get("group", 1))
    if auto_pad not in AUTO_PADS:
        return f"Conv auto_pad {auto_pad!r} is not one of {AUTO_PADS}"
    if len(strides) != n or len(dilations) != n or len(pads) != 2 * n:
        return "Conv strides/dilations/pads do not match the kernel's rank"
    if groups < 1 or weight_shape[0] % groups:
        return f"Conv group={groups} does not divide its {weight_shape[0]} output channels"
    return ConvGeometry(kernel, strides, dilations, pads, auto_pad, groups, int(weight_shape[1]) * groups)


def im2col(x: np.ndarray, geo: ConvGeometry, dtype=np.float64) -> np.ndarray:
    """Patches (n, groups, C/groups * prod(kernel), positions) of a Conv input x (n, C, *spatial).

    Column j of group g lines up with ``W[i].reshape(-1)`` for the rows i of that group, so
    ``W_rows[i] @ patches[:, g]`` is the pre-activation (without bias) at every position.
    """
    x = np.asarray(x)
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    if c != geo.in_channels or len(spatial) != geo.rank:
        raise ValueError(f"Conv input has shape {list(x.shape)}, the weight expects {geo.in_channels} channels "
                         f"and {geo.rank} spatial axes")
    begin, end = geo.resolved_pads(spatial)
    out = geo.output_spatial(spatial)
    padded = np.pad(x.astype(dtype, copy=False), [(0, 0), (0, 0)] + list(zip(begin, end)))
    cols = np.empty((n, c) + geo.kernel + out, dtype)
    for offset in np.ndindex(*geo.kernel):
        window = tuple(slice(k * d, k * d + s * (o - 1) + 1, s)
                       for k, d, s, o in zip(offset, geo.dilations, geo.strides, out))
        cols[(slice(None), slice(None)) + offset] = padded[(slice(None), slice(None)) + window]
    positions = int(np.prod(out)) if out else 1
    return cols.reshape(n, geo.groups, -1, positions)
