"""`onnxprune finetune` end to end: zeros held, a checked model written, nothing written on failure."""
import importlib
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.repair.finetune import zero_masks

from engines import requires_training
from studies.zoo import build_mlp


def blobs(n=120, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(classes, features))
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(size=(n, features))).astype(np.float32), y.astype(np.int64)


@pytest.fixture
def files(tmp_path):
    x, y = blobs()
    dense = build_mlp((8, 8), inputs=6, classes=3)
    pruned = onnxprune.prune(dense, {"x": x}, 0.6, method="magnitude").model
    onnx.save(pruned, tmp_path / "pruned.onnx")
    np.savez(tmp_path / "train.npz", x=x, y=y)
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


@pytest.mark.parametrize("engine", ["adjoint", pytest.param("ort-training", marks=requires_training)])
def test_finetune_holds_the_zeros_and_writes_a_checked_model(files, engine):
    res = invoke("finetune", files / "pruned.onnx", files / "out.onnx", "--data", files / "train.npz", "--epochs", 3,
                 "--lr", 0.01, "--batch-size", 32, "--engine", engine, "--json", files / "r.json")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].split() == ["epoch", "loss", "seconds"] and len(res.output.splitlines()) == 5
    onnx.checker.check_model(str(files / "out.onnx"), full_check=True)
    before, after = weights(files / "pruned.onnx"), weights(files / "out.onnx")
    masks = zero_masks(onnx.load(files / "pruned.onnx"))
    assert sorted(masks) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    for name, keep in masks.items():
        assert np.all(after[name][~keep] == 0) and not np.array_equal(after[name][keep], before[name][keep])
    report = json.loads((files / "r.json").read_text())
    assert report["held_zero"] == sum(int((~m).sum()) for m in masks.values())
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
    assert report["engine"] == {"name": engine, "reason": f"requested (--engine {engine})"}


def test_auto_engine_is_reported_in_verbose_output_and_json(files):
    from onnxprune.repair.finetune import choose_engine

    res = invoke("finetune", files / "pruned.onnx", files / "out.onnx", "--data", files / "train.npz", "--epochs", 1,
                 "-v", "--json", files / "r.json")
    assert res.exit_code == 0, res.output
    expected = choose_engine("auto")
    assert expected["reason"].startswith("auto: ")
    assert f"engine: {expected['name']} ({expected['reason']})" in res.output
    assert json.loads((files / "r.json").read_text())["engine"] == expected


def test_unknown_engine_is_a_usage_error(files):
    res = invoke("finetune", files / "pruned.onnx", files / "out.onnx", "--data", files / "train.npz", "--epochs", 1,
                 "--engine", "torch")
    assert res.exit_code == 2 and "'torch' is not one of" in res.output
    assert not (files / "out.onnx").exists()


def test_existing_output_is_refused_without_force(files):
    (files / "out.onnx").write_bytes(b"keep me")
    args = ["finetune", files / "pruned.onnx", files / "out.onnx", "--data", files / "train.npz", "--epochs", 1]
    res = invoke(*args)
    assert res.exit_code == 2 and "--force" in res.output
    assert (files / "out.onnx").read_bytes() == b"keep me"
    assert invoke(*args, "--force", "-q").exit_code == 0
    onnx.checker.check_model(str(files / "out.onnx"))


@pytest.mark.parametrize("arrays", [
    {"x": np.zeros((10, 6), np.float32)},                                       # no labels
    {"x": np.zeros((10, 4), np.float32), "y": np.zeros(10, np.int64)},          # wrong width
    {"x": np.zeros((10, 6), np.float32), "y": np.full(10, 7)},                  # label beyond the classes
    {"x": np.full((10, 6), np.nan, np.float32), "y": np.zeros(10, np.int64)},   # NaN
])
def test_bad_data_is_a_one_line_error_exit_2_and_no_output(files, arrays):
    np.savez(files / "bad.npz", **arrays)
    res = invoke("finetune", files / "pruned.onnx", files / "out.onnx", "--data", files / "bad.npz", "--epochs", 1)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in res.output
    assert not (files / "out.onnx").exists() and not list(files.glob(".*tmp*"))


def test_interrupted_training_writes_nothing(files, monkeypatch):
    module = importlib.import_module("onnxprune.repair.finetune")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "finetune", interrupted)
    res = invoke("finetune", files / "pruned.onnx", files / "out.onnx", "--data", files / "train.npz", "--epochs", 1)
    assert res.exit_code == 130 and "no output was written" in res.output
    assert not (files / "out.onnx").exists() and not list(files.glob(".*tmp*"))


def test_ort_training_without_the_training_build_is_a_one_line_error(files, monkeypatch):
    monkeypatch.setattr(importlib.import_module("onnxprune.derivatives.engines.base"), "training_build", lambda: False)
    res = invoke("finetune", files / "pruned.onnx", files / "out.onnx", "--data", files / "train.npz", "--epochs", 1,
                 "--engine", "ort-training")
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith(
        "Error: engine 'ort-training' needs the onnxruntime training build")
    assert not (files / "out.onnx").exists()
