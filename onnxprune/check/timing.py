"""The one paired timer: onnxruntime time per sample of one or two models on the same samples.

For every thread setting and batch size each model is warmed up, then the models run in turns (the
order swapped every repeat), each turn long enough to read the clock; the ratio of one repeat
(second model / first) is one paired measurement, so drift of a busy machine hits both alike.
Reported per model: median, quartiles, min and max microseconds per sample; per pair: the median
ratio with its quartiles. A timing is marked ``noisy`` when its quartiles (of the paired ratios; of
the model's own timings when it is timed alone) lie more than NOISY_SPREAD apart: on a busy machine
the same pair measured twice can differ several-fold, and the spread is what shows it.
"""
from __future__ import annotations

import math
import time
from typing import TypeVar

import numpy as np
import onnx

from onnxprune import runtime
from onnxprune.graph.passes import free_batch_copy
from onnxprune.io.data import Dataset
from onnxprune.io.npz import NpzColumn

REPEATS = 7            # timings per model, batch size and thread setting
MIN_TIMING = 0.005     # seconds: one timing runs the batch this long at least (clock resolution, noise)
MAX_RUNS = 1000
NOISY_SPREAD = 1.5     # upper over lower quartile above this: noisy


def is_noisy(q25: float, q75: float) -> bool:
    """Whether a timing's quartiles lie too far apart to trust its median."""
    return not q25 > 0 or q75 / q25 > NOISY_SPREAD


def measure_latency(models: dict[str, onnx.ModelProto], data: Dataset, batch_sizes, *, provider: str = "cpu",
                    threads=(None,), repeats: int = REPEATS, kept_inputs: dict[str, dict[str, list[int]]] | None = None,
                    min_seconds: float = MIN_TIMING) -> dict:
    """Per thread setting (None: onnxruntime's default) and batch size (the samples of ``data``
    repeated where there are fewer), the time of every model, paired when there are two.
    ``kept_inputs``: per model name, the input features it takes (a --prune-inputs model)."""
    names = list(models)
    entries: list[dict] = []
    for thread in threads:
        # the batch freed: an export that fixes it to its example's (1) times at any batch size
        sessions = {name: runtime.make_session(free_batch_copy(m), provider, thread) for name, m in models.items()}
        for batch in sorted(set(batch_sizes)):
            samples = data.subset(min(batch, len(data))).repeated(batch).inputs()
            feeds = {name: select_inputs(samples, (kept_inputs or {}).get(name)) for name in names}
            entries.append(_time(sessions, feeds, batch, repeats, min_seconds) | {"threads": thread})
    return {"repeats": repeats, "models": names, "batches": entries}


def _time(sessions: dict, feeds: dict[str, dict[str, np.ndarray]], batch: int, repeats: int, min_seconds: float) -> dict:
    names = list(sessions)
    runs = 1
    for name, session in sessions.items():
        session.run(None, feeds[name])  # warm-up: allocations and kernel selection are not latency
        start = time.perf_counter()
        session.run(None, feeds[name])
        runs = max(runs, min(MAX_RUNS, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            session, feed = sessions[name], feeds[name]
            start = time.perf_counter()
            for _ in range(runs):
                session.run(None, feed)
            times[name].append((time.perf_counter() - start) / (runs * batch))
    entry: dict = {"batch_size": batch, "runs_per_timing": runs}
    for name, values in times.items():
        us = 1e6 * np.asarray(values)
        q25, q75 = np.percentile(us, [25, 75])
        entry[name] = {"median_us": float(np.median(us)), "q25_us": float(q25), "q75_us": float(q75),
                       "min_us": float(us.min()), "max_us": float(us.max()), "noisy": is_noisy(q25, q75)}
    if len(names) == 2:
        ratios = np.asarray(times[names[1]]) / np.asarray(times[names[0]])
        median = float(np.median(ratios))
        q25, q75 = (float(q) for q in np.percentile(ratios, [25, 75]))
        entry["ratio"] = {"of": f"{names[1]}/{names[0]}", "median": median, "q25": q25, "q75": q75,
                          "min": float(ratios.min()), "max": float(ratios.max()),
                          "noisy": is_noisy(q25, q75)}
    return entry


Feed = TypeVar("Feed", np.ndarray, "np.ndarray | NpzColumn")


def select_inputs(feeds: dict[str, Feed], kept_inputs: dict[str, list[int]] | None) -> dict[str, Feed]:
    """The feeds a --prune-inputs model takes: only its kept features (C-contiguous, as a caller would
    pass them; a strided view would add onnxruntime's copy of it to the time); arrays, or a Dataset's
    feeds (a column with kept features is read whole, the others stay lazy)."""
    return {k: (np.ascontiguousarray(v[:, kept_inputs[k]]) if kept_inputs and k in kept_inputs else v)
            for k, v in feeds.items()}
