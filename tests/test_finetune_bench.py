"""scripts/bench_finetune.py runs (tiny sizes) and writes a report whose sentences come from its numbers."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_finetune.py"


def test_quick_run_writes_the_report(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_finetune", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "ft"
    assert bench.main(["--model", "cnn", "--epochs", "3", "--repeats", "1", "--samples", "256", "--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    engines = bench.environment()["engines"]
    study = results["models"]["cnn"]
    assert list(results["models"]) == ["cnn"] and "adjoint" in engines
    assert [r["engine"] for r in study["summary"]] == sorted(engines, key=lambda e: e != "ort-training")
    assert len(study["runs"]) == len(engines) and all(len(r["epoch_cpu_seconds"]) == 2 for r in study["runs"])
    assert study["summary"][0]["ratio_median"] == 1.0 and study["loss_agreement"] < 1e-4
    text = out.with_suffix(".md").read_text()
    assert f"Command: `python scripts/bench_finetune.py --model cnn --epochs 3 --repeats 1 --samples 256 --out {out}`" in text
    assert "## models/mnist_cnn.onnx (" in text and "What the numbers say:" in text
    for row in study["summary"]:
        assert f"| {row['config']} | {row['epoch_cpu_ms']:.1f} |" in text
