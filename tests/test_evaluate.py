"""evaluate's latency batch: the paired sessions' activations stay within the memory budget."""
import importlib

import numpy as np

from onnxprune.derivatives.plan import sample_bytes
from onnxprune.io.data import as_dataset

from tinynets import data, mlp

ev = importlib.import_module("onnxprune.check.evaluate")


def test_the_latency_batch_shrinks_to_keep_two_sessions_within_the_budget(monkeypatch):
    model, _, _ = mlp((5, 4, 3))
    dataset = as_dataset(data(64), model)
    per_sample = sample_bytes(model, dataset.subset(1).arrays())
    assert per_sample == 4 * (4 + 4 + 3)  # a0, h0 (tanh), a1: every float tensor of one sample
    assert ev.latency_batch([model, model], dataset, 32) == 32  # a tiny model: the asked batch
    monkeypatch.setattr(ev, "MEMORY_BUDGET", 2 * 5 * per_sample)
    assert ev.latency_batch([model, model], dataset, 32) == 5
    report = ev.evaluate_dataset(model, dataset, reference=model, batch_size=32)
    assert [b["batch_size"] for b in report["latency"]["batches"]] == [1, 5]
    assert np.isfinite(report["loss"])
