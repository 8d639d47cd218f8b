"""scripts/compare_structured.py: its sentences follow from the numbers it is given, and the MACs it
counts match the shapes."""
import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_structured.py"


def _script():
    spec = importlib.util.spec_from_file_location("compare_structured", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(label, accuracy, macs, ratio, peer=False, **extra):
    time = {"ratio": ratio, "ratio_q25": ratio, "ratio_q75": ratio, "ratio_of_fastest": ratio}
    return {"label": label, "accuracy": accuracy, "macs": macs, "params": 10, "peer": peer,
            "time": {"1": time, "256": time}, "inputs_unchanged": True, **extra}


def _study(ours, peer, sweep):
    return {"model": "m.onnx", "dense": {"accuracy": 0.97, "loss": 0.1, "params": 20, "macs": 100},
            "fractions": {"0.5": [_row("ours", ours, 50, 0.5), _row("onnxsim x", peer, 50, 0.6, peer=True)]},
            "macs_sweep": [dict(_row("s", a, 50, r), macs_target=0.5, multiple=1, inputs="keep") for a, r in sweep]}


def test_findings_say_met_only_when_the_numbers_do():
    script = _script()
    met = script.findings("mlp", _study(0.90, 0.80, [(0.965, 0.55), (0.95, 0.40)]), 0.60)
    assert "+10.0 points" in met[0] and "goal >= +5: met" in met[0]
    assert "time ratio 0.55" in met[1] and "goal time ratio <= 0.6 (speedup >= 1.67x): met" in met[1]
    missed = script.findings("mlp", _study(0.83, 0.80, [(0.955, 0.55)]), 0.60)
    assert "+3.0 points" in missed[0] and "not met" in missed[0]
    assert "not met" in missed[1]
    close = script.findings("mlp", _study(0.96, 0.94, [(0.965, 0.55)]), 0.60)
    assert any("only 3.0 points above" in line for line in close)


def test_markdown_renders_every_row():
    script = _script()
    results = {"command": "c", "onnxruntime": "x", "machine": "m", "repeats": 3, "goals": {"mlp": 0.6},
               "studies": {"mlp": _study(0.9, 0.8, [(0.96, 0.5)])}}
    text = script.markdown(results)
    assert "| ours | 90.00 |" in text and "| onnxsim x | 80.00 |" in text and "fastest/fastest" in text


def test_model_macs_counts_the_layers():
    import onnx

    script = _script()
    model = onnx.load(Path(__file__).resolve().parents[1] / "models" / "mnist_cnn.onnx")
    feeds = {"x": np.zeros((1, 784), np.float32)}
    assert script.model_macs(model, feeds) == 8 * 25 * 24 * 24 + 16 * 200 * 8 * 8 + 64 * 256 + 10 * 64
