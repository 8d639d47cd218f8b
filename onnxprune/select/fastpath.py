"""What the runtime runs fast, measured: the channel multiple of a provider's blocked convolution path.

onnxruntime's CPU provider runs a Conv in a blocked layout (NCHWc) when its channel counts are
multiples of the block its kernels use (8 with AVX2, 16 with AVX-512) and falls back to a slower
path otherwise: on this project's machines a 3x3 Conv pair with 15 or 17 channels took 1.4x and
1.6x the time of one with 16. So kept channel counts are rounded to that block by default. The block
is not read off CPU flags but measured once per process and provider on a small Conv pair: a count
that is a multiple of 8 and not of 16 (24) against one below it, then 32 against 31.
"""
from __future__ import annotations

import functools
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxprune import runtime

MARGIN = 0.9      # a count is on the fast path when it takes under this fraction of the time of one channel fewer
REPEATS = 9       # timings per count; the fastest counts (the least disturbed on a busy machine)


def _conv_pair(channels: int, inputs: int = 16, side: int = 28):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(channels, inputs, 3, 3)).astype(np.float32), "W0"),
             numpy_helper.from_array(rng.normal(size=(channels, channels, 3, 3)).astype(np.float32), "W1")]
    nodes = [helper.make_node("Conv", ["x", "W0"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "W1"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "fastpath", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, inputs, side, side])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, channels, side, side])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _seconds(provider: str, channels: list[int]) -> dict[int, float]:
    """The fastest of REPEATS timings of the Conv pair at every channel count, timed in turns."""
    sessions = {c: runtime.make_session(_conv_pair(c), provider, 1) for c in channels}
    x = np.random.default_rng(1).normal(size=(8, 16, 28, 28)).astype(np.float32)
    best = dict.fromkeys(channels, float("inf"))
    for session in sessions.values():
        session.run(None, {"x": x})
    for _ in range(REPEATS):
        for c, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"x": x})
            best[c] = min(best[c], time.perf_counter() - start)
    return best


@functools.cache
def conv_channel_block(provider: str = "cpu") -> int:
    """The channel multiple ``provider`` runs Convs fast at: 8, 16, or 1 when no count stands out."""
    t = _seconds(provider, [15, 16, 23, 24, 31, 32])
    if t[24] < MARGIN * t[23] and t[16] < MARGIN * t[15]:
        return 8
    if t[32] < MARGIN * t[31] and t[16] < MARGIN * t[15]:
        return 16
    return 1
