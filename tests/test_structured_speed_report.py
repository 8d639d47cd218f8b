"""The structured speed report says which runs are not faster than dense (synthetic rows, no measurement)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import structured_speed  # noqa: E402

META = {"command": "python scripts/structured_speed.py", "date": "today", "onnxprune": "0", "onnxruntime": "0",
        "cpus": 2, "timeout_s": 60.0, "memory_limit_gb": 8}


def _run(model: str, ratio: float, b32: float, accuracy=None) -> dict:
    timing = [{"batch": batch, "threads": threads, "ratio_median": ratio_median, "ratio_q25": 0.9 * ratio_median,
               "ratio_q75": 1.1 * ratio_median, "noisy": False}
              for batch, ratio_median in ((1, 0.8), (32, b32)) for threads in (1, "default")]
    return {"model": model, "ratio": ratio, "rc": 0, "error": None, "multiples": {"a": 8, "b": 1},
            "params_before": 1000, "params_after": 600, "macs_before": 2000, "macs_after": 1500, "timing": timing,
            "faster_than_dense": True, "relative_error": 0.01, "worst_part": "logits", "output_errors": [],
            "accuracy": accuracy}


def test_a_run_slower_than_dense_at_batch_32_is_named_and_failures_are_shown():
    rows = [_run("fast", 0.3, 0.7, accuracy=[0.99, 0.98]), _run("slow", 0.5, 1.2),
            {"model": "broken", "ratio": 0.3, "rc": 2, "error": "Error: no unit group"}]
    text = structured_speed.markdown(rows, META)
    assert "Not faster than dense at batch 32 with either thread setting: slow R=0.5." in text
    assert "| fast | 0.3 | 0 | 1, 8 | 40.0% | 25.0% | 0.80x (0.72-0.88) | 0.70x (0.63-0.77) |" in text
    assert "99.00% -> 98.00% (+1.00 points drop)" in text
    assert "| broken | 0.3 | 2 | `Error: no unit group` |" in text
    assert "2 of 3 runs wrote a model" in text
