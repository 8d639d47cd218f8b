"""Measured onnxruntime time of two models on the same inputs: paired, alternating, repeated.

Each repeat times model A then model B (the order swapped every repeat) over enough runs to last
``min_seconds``; the ratio B/A of one repeat is one paired measurement, so drifts of a busy machine
hit both models alike. The report gives the median time of each and the median and the spread
(quartiles, min, max) of the paired ratios.
"""
from __future__ import annotations

import time

import numpy as np
import onnx

from . import runtime

BATCHES = (1, 256)


def _time(session, feeds: dict[str, np.ndarray], runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feeds)
    return (time.perf_counter() - start) / runs


def paired_times(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray], *, repeats: int = 15,
                 min_seconds: float = 0.02, threads: int | None = 1, provider: str = "cpu") -> dict:
    """Seconds per run of ``a`` and ``b`` on ``feeds`` and their paired ratios b/a."""
    sa, sb = runtime.make_session(a, provider, threads), runtime.make_session(b, provider, threads)
    for s in (sa, sb):  # warm-up
        s.run(None, feeds)
    one = max(_time(sa, feeds, 1), 1e-6)
    runs = max(1, int(min_seconds / one))
    ta, tb = [], []
    for r in range(repeats):
        first, second = (sa, sb) if r % 2 == 0 else (sb, sa)
        t1, t2 = _time(first, feeds, runs), _time(second, feeds, runs)
        ta.append(t1 if r % 2 == 0 else t2)
        tb.append(t2 if r % 2 == 0 else t1)
    ratios = np.array(tb) / np.array(ta)
    q25, q75 = np.percentile(ratios, [25, 75])
    return {"batch": len(next(iter(feeds.values()))), "repeats": repeats, "runs_per_repeat": runs,
            "threads": threads, "dense_seconds": float(np.median(ta)), "pruned_seconds": float(np.median(tb)),
            "ratio": float(np.median(ratios)), "ratio_q25": float(q25), "ratio_q75": float(q75),
            "ratio_min": float(ratios.min()), "ratio_max": float(ratios.max())}


def time_models(dense: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict[str, np.ndarray],
                batches=BATCHES, **kwargs) -> list[dict]:
    """``paired_times`` at every batch size of ``batches`` (the samples of ``feeds`` tiled as needed)."""
    n = len(next(iter(feeds.values())))
    results = []
    for batch in batches:
        index = np.arange(batch) % n
        results.append(paired_times(dense, pruned, {k: v[index] for k, v in feeds.items()}, **kwargs))
    return results
