"""The sharded statistics service: sums over the calibration data computed shard by shard on
long-lived workers (``workers``: local processes or Ray actors), reduced in one fixed tree.

Map: a worker is sent a job once (the model with it) and builds what it needs once (its derivative
graph, on the first batch); it then takes shard after shard and returns each shard's sums. Reduce: a
binary tree over the shard indices (``Tree``), merged in float64 by the statistics types' own
``merge`` (shifted sums re-centred on a common shift). A shard's random probes come from a generator
seeded by (seed, shard index) (``shard_seed``). The shards are cut from the data and the batch alone
(``shard_size``): so the same data, seed and shards give the same sums, to the byte, whatever the
number of workers and whichever worker took which shard.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from onnxprune.derivatives.plan import Progress
from onnxprune.derivatives.workers import Job, pool
from onnxprune.errors import InputError
from onnxprune.io.data import Dataset, NpzColumn

MAX_SHARDS = 64  # shards of whole batches, at most this many unless one batch is the whole shard


def shard_seed(seed: int, index: int) -> list[int]:
    """The seed of shard ``index``'s probes: its own stream, the same whichever worker draws it."""
    return [int(seed), int(index)]


def shard_size(samples: int, step: int, requested: int | None = None) -> int:
    """Samples per shard: ``requested``, else whole batches of ``step``, as few per shard as keep the
    shards at most MAX_SHARDS. Never the worker count: the shards must not depend on it."""
    if requested is not None:
        if requested < 1:
            raise InputError(f"a shard holds at least one sample, got {requested}")
        return int(requested)
    batches = math.ceil(samples / max(step, 1))
    return max(step, 1) * max(1, math.ceil(batches / MAX_SHARDS))


def split(data: Dataset, size: int) -> Iterator[tuple[int, Dataset]]:
    """The shards of ``data`` in order, each a Dataset of its rows (read when reached: streamed)."""
    for index, (feeds, labels) in enumerate(data.batches(size)):
        rows: dict[str, np.ndarray | NpzColumn] = {name: np.asarray(feeds[name]) for name in data.feeds}
        yield index, Dataset(rows, labels, data.fixed, data.axes)


class Tree:
    """A binary tree over ``count`` leaves, merged as the leaves arrive in any order: node (level, i)
    is merge(node (level - 1, 2i), node (level - 1, 2i + 1)), a node without a right sibling moves up
    alone. The merges, and so the rounding, are those of the indices, not of the order of arrival;
    a merged pair is let go at once, so at most about one partial sum per level is held."""

    def __init__(self, count: int, merge: Callable[[Any, Any], Any]):
        self.count, self.merge = count, merge
        self.nodes: dict[tuple[int, int], Any] = {}
        self.root: Any = None

    def add(self, index: int, value: Any) -> None:
        level, position = 0, index
        while True:
            width = math.ceil(self.count / 2**level)
            if width == 1:
                self.root = value
                return
            sibling = position ^ 1
            if sibling < width:
                if (level, sibling) not in self.nodes:
                    self.nodes[(level, position)] = value
                    return
                other = self.nodes.pop((level, sibling))
                value = self.merge(value, other) if position < sibling else self.merge(other, value)
            level, position = level + 1, position // 2


def run(job: Job, data: Dataset, step: int, progress: Progress | None = None) -> tuple[Any, dict]:
    """The sums of ``job`` over ``data`` by the workers its settings name: (the merged sums, what ran:
    the first shard's report with the workers, the shards and the cluster)."""
    settings = job.settings
    size = shard_size(len(data), step, settings.shard_size)
    count = math.ceil(len(data) / size)
    tree, first, done, sizes = Tree(count, job.merge), None, 0, {}

    def shards():
        for index, shard in split(data, size):
            sizes[index] = len(shard)
            yield index, shard

    with pool(job, settings, count) as workers:
        for index, sums, info in workers.map(shards()):
            done += sizes.pop(index)
            if index == 0:
                first = info
            tree.add(index, sums)
            if progress:
                progress(done, len(data))
        report = {**(first or {}), "workers": workers.size, "shards": count, "shard_size": size,
                  "cluster": workers.where}
    return tree.root, report
