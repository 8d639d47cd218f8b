"""scripts/bench.py still runs (tiny sizes, in one process) and writes its report."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_the_report(tmp_path):
    bench = _bench()
    assert bench.main(["--quick", "--inline", "--out", str(tmp_path / "b.md"), "--json", str(tmp_path / "b.json")]) == 0
    text = (tmp_path / "b.md").read_text()
    for needle in ("Command: `python scripts/bench.py --quick --inline", "x floor", "peak RSS MB", "## Threads",
                   "exact (K = 10)", "exact (K = 1000)", "What the numbers say"):
        assert needle in text, needle
    assert bench.main(["--render", str(tmp_path / "b.json"), "--out", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == text  # the report is a function of the JSON alone
    results = json.loads((tmp_path / "b.json").read_text())
    assert {row["label"] for row in results["models"]["mlp"]} >= {"adjoint: forward + backward (1 probe)",
                                                                   "adjoint: ecp statistics (exact)"}


def test_a_measurement_in_its_own_process():
    bench = _bench()
    row = bench.run_measure({"model": "cnn", "samples": 64, "kind": "forward"}, inline=False)
    assert row["forward_seconds"] > 0 and row["peak_rss_mb"] >= row["rss_before_mb"] > 0
