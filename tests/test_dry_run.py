"""prune --dry-run: the sensitivity report end to end (API and CLI), the budget, the plot."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.sweep import parse_budget, parse_ratios, sensitivity

from tinynets import data, mlp


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dry")
    model, _, _ = mlp((5, 12, 8, 3), activation="relu", softmax=True)
    onnx.save(model, d / "model.onnx")
    np.savez(d / "calib.npz", **data(80))
    np.savez(d / "test.npz", **data(60, seed=7))
    return d


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_parsers():
    assert parse_budget("1%") == pytest.approx(0.01) and parse_budget("0.01") == 0.01 and parse_budget(" 2.5 % ") == 0.025
    assert parse_ratios("0.5, 0.1,0.5") == [0.1, 0.5]
    for bad in ("-1%", "one", "1%%", ""):
        with pytest.raises(InputError):
            parse_budget(bad)
    for bad in ("0.1,x", "1.5", ""):
        with pytest.raises(InputError):
            parse_ratios(bad)


def test_sensitivity_matches_pruning_each_ratio_and_finds_the_budget(files):
    model = onnx.load(str(files / "model.onnx"))
    ratios = [0.0, 0.2, 0.5, 0.9]
    report = sensitivity(model, files / "calib.npz", ratios, evaluate=files / "test.npz", max_loss_increase="5%")
    assert [p.ratio for p in report.points] == ratios
    dense = onnxprune.evaluate(model, files / "test.npz")["loss"]
    assert report.dense["loss"] == pytest.approx(dense)
    errors = [p.score_sum for p in report.points]
    assert errors == sorted(errors) and errors[0] == 0
    for point in report.points:
        alone = onnxprune.prune(model, files / "calib.npz", point.ratio)
        assert point.pruned == alone.pruned and point.score_sum == pytest.approx(alone.score_sum)
        assert point.loss == pytest.approx(onnxprune.evaluate(alone.model, files / "test.npz")["loss"])
        assert point.within_budget == (point.loss <= dense * 1.05)
    assert report.points[0].output_error == pytest.approx(0, abs=1e-9) and report.points[0].within_budget
    expected = None
    for point in report.points:
        if not point.within_budget:
            break
        expected = point.ratio
    assert report.best_ratio == expected


def test_cli_dry_run_writes_no_model_but_json_and_plot(files, tmp_path):
    res = invoke("prune", files / "model.onnx", "--data", files / "calib.npz", "--dry-run", "--ratios", "0.1,0.5,0.9",
                 "--evaluate", files / "test.npz", "--max-loss-increase", "1000%", "--json", tmp_path / "r.json",
                 "--plot", tmp_path / "curve.png")
    assert res.exit_code == 0, res.output
    assert "score sum" in res.output and "within budget" in res.output and "largest ratio within budget" in res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [p["ratio"] for p in report["points"]] == [0.1, 0.5, 0.9] and report["best_ratio"] is not None
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "r.json"]
    assert sorted(p.name for p in files.iterdir()) == ["calib.npz", "model.onnx", "test.npz"]


def test_cli_dry_run_without_evaluation_reports_score_sums(files):
    res = invoke("prune", files / "model.onnx", "--data", files / "calib.npz", "--dry-run", "--json", "-")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert len(report["points"]) == 10 and report["dense"] is None and report["best_ratio"] is None


def test_cli_budget_nobody_meets_exits_1_after_the_report(files, tmp_path):
    res = invoke("prune", files / "model.onnx", "--data", files / "calib.npz", "--dry-run", "--ratios", "0.95",
                 "--evaluate", files / "test.npz", "--max-loss-increase", "0", "--json", tmp_path / "r.json")
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines()[-1].startswith("Error: no ratio keeps the loss")
    assert json.loads((tmp_path / "r.json").read_text())["best_ratio"] is None


@pytest.mark.parametrize("args, message", [
    (["OUT"], "--dry-run writes no model"),
    (["--sparsity", "0.5"], "--sparsity does not apply"),
    (["--max-loss-increase", "1%"], "needs --test"),
    (["--max-loss-increase", "lots", "--evaluate", "TEST"], "--max-loss-increase must be"),
    (["--ratios", "0.2,2"], "ratios must lie between 0 and 1"),
    (["--storage", "sparse"], "--storage does not apply"),
])
def test_cli_dry_run_refuses_bad_combinations(files, tmp_path, args, message):
    args = [str(tmp_path / "out.onnx") if a == "OUT" else str(files / "test.npz") if a == "TEST" else a for a in args]
    res = invoke("prune", files / "model.onnx", "--data", files / "calib.npz", "--dry-run", *args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    ([], "missing OUT"),
    (["OUT"], "missing --sparsity"),
    (["OUT", "--sparsity", "0.5", "--ratios", "0.5"], "--ratios is an option of the dry run or of a budget"),
    (["OUT", "--max-loss-increase", "1%"], "--max-loss-increase needs --test"),
    (["OUT", "--sparsity", "0.5", "--max-loss-increase", "1%", "--test", "TEST"], "exclude each other"),
])
def test_cli_prune_without_dry_run_needs_out_and_sparsity(files, tmp_path, args, message):
    args = [str(tmp_path / "out.onnx") if a == "OUT" else str(files / "test.npz") if a == "TEST" else a for a in args]
    res = invoke("prune", files / "model.onnx", *args[:1], "--data", files / "calib.npz", *args[1:])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not list(tmp_path.iterdir())


def test_missing_matplotlib_is_a_clear_error(files, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    res = invoke("prune", files / "model.onnx", "--data", files / "calib.npz", "--dry-run", "--plot", tmp_path / "c.png")
    assert res.exit_code == 1 and "pip install 'onnxprune[plot]'" in res.output
    assert not list(tmp_path.iterdir())
