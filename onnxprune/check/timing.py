"""Measured onnxruntime time of two models on the same inputs: paired, alternating, repeated.

Each repeat times model A then model B (the order swapped every repeat) over enough runs to last
``min_seconds``; the ratio B/A of one repeat is one paired measurement, so drifts of a busy machine
hit both models alike. The report gives the median time of each and the median and the spread
(quartiles, min, max) of the paired ratios, and the ratio of the fastest repeats (the least disturbed
on a busy machine).
"""
from __future__ import annotations

import time
from typing import TypeVar

import numpy as np
import onnx

from onnxprune import runtime
from onnxprune.io.npz import NpzColumn

BATCHES = (1, 256)


def _time(session, feeds: dict[str, np.ndarray], runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feeds)
    return (time.perf_counter() - start) / runs


def paired_times(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray], *, repeats: int = 15,
                 min_seconds: float = 0.02, threads: int | None = 1, provider: str = "cpu",
                 feeds_b: dict[str, np.ndarray] | None = None) -> dict:
    """Seconds per run of ``a`` on ``feeds`` and ``b`` on ``feeds_b`` (default the same), and their
    paired ratios b/a."""
    sa, sb = runtime.make_session(a, provider, threads), runtime.make_session(b, provider, threads)
    feeds_b = feeds if feeds_b is None else feeds_b
    sa.run(None, feeds)  # warm-up
    sb.run(None, feeds_b)
    one = max(_time(sa, feeds, 1), 1e-6)
    runs = max(1, int(min_seconds / one))
    ta, tb = [], []
    for r in range(repeats):
        (first, f1), (second, f2) = ((sa, feeds), (sb, feeds_b)) if r % 2 == 0 else ((sb, feeds_b), (sa, feeds))
        t1, t2 = _time(first, f1, runs), _time(second, f2, runs)
        ta.append(t1 if r % 2 == 0 else t2)
        tb.append(t2 if r % 2 == 0 else t1)
    ratios = np.array(tb) / np.array(ta)
    q25, q75 = np.percentile(ratios, [25, 75])
    return {"batch": len(next(iter(feeds.values()))), "repeats": repeats, "runs_per_repeat": runs,
            "threads": threads, "dense_seconds": float(np.median(ta)), "pruned_seconds": float(np.median(tb)),
            "ratio": float(np.median(ratios)), "ratio_q25": float(q25), "ratio_q75": float(q75),
            "ratio_min": float(ratios.min()), "ratio_max": float(ratios.max()),
            "ratio_of_fastest": float(min(tb) / min(ta))}


def time_models(dense: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict[str, np.ndarray],
                batches=BATCHES, kept_inputs: dict[str, list[int]] | None = None, **kwargs) -> list[dict]:
    """``paired_times`` at every batch size of ``batches`` (the samples of ``feeds`` tiled as needed);
    ``kept_inputs``: the pruned model takes only these features of its inputs (--prune-inputs)."""
    n = len(next(iter(feeds.values())))
    results = []
    for batch in batches:
        index = np.arange(batch) % n
        tiled = {k: v[index] for k, v in feeds.items()}
        results.append(paired_times(dense, pruned, tiled, feeds_b=select_inputs(tiled, kept_inputs), **kwargs))
    return results


Feed = TypeVar("Feed", np.ndarray, "np.ndarray | NpzColumn")


def select_inputs(feeds: dict[str, Feed], kept_inputs: dict[str, list[int]] | None) -> dict[str, Feed]:
    """The feeds a --prune-inputs model takes: only its kept features (C-contiguous, as a caller would
    pass them; a strided view would add onnxruntime's copy of it to the time); arrays, or a Dataset's
    feeds (a column with kept features is read whole, the others stay lazy)."""
    return {k: (np.ascontiguousarray(v[:, kept_inputs[k]]) if kept_inputs and k in kept_inputs else v)
            for k, v in feeds.items()}
