"""The paired timer's result (``onnxprune.check.timing.measure_latency``, a prune report's ``timing``) as
the rows the results pages record."""
from __future__ import annotations


def ratio_rows(timing: dict) -> list[dict]:
    """Per batch size and thread setting: the paired ratio of the second model's time to the first's
    (median, quartiles, noisy) and both models' medians."""
    dense, pruned = timing["models"]
    return [{"batch": b["batch_size"], "threads": b["threads"] or "default",
             "ratio_median": b["ratio"]["median"], "ratio_q25": b["ratio"]["q25"], "ratio_q75": b["ratio"]["q75"],
             "noisy": b["ratio"]["noisy"], "dense_us": b[dense]["median_us"], "pruned_us": b[pruned]["median_us"],
             "repeats": timing["repeats"], "runs_per_timing": b["runs_per_timing"]}
            for b in timing["batches"]]
