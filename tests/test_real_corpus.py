"""Every committed real export (tests/fixtures/real/, made by scripts/export_corpus.py with the frameworks'
own exporters, or shipped pretrained inside a pip wheel) is inspected and pruned to 50% with the defaults
from the command line; the written model must pass onnx.checker's full check and give finite outputs on
onnxruntime. Where today's code fails, the case is a strict xfail naming the failure (the issue's to-do)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxprune import runtime
from onnxprune.cli import main

REAL = Path(__file__).parent / "fixtures" / "real"
MANIFEST = json.loads((REAL / "MANIFEST.json").read_text())
_spec = importlib.util.spec_from_file_location("corpus_script", Path(__file__).parents[1] / "scripts" / "corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

# What today's code does not do yet, with the exact failure (issue 11); strict, so a fix shows up here.
XFAIL = {}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_every_fixture_is_small_and_has_its_provenance():
    assert set(MANIFEST) == {p.stem for p in REAL.glob("*.onnx")}
    assert len({e["family"] for e in MANIFEST.values()}) >= 5
    for name, entry in MANIFEST.items():
        assert (REAL / f"{name}.onnx").stat().st_size == entry["bytes"] < 2_000_000
        assert entry["exporter"] and entry["architecture"] and entry["weights"] and entry["inputs"]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_inspect_lists_prunable_layers(name, tmp_path):
    res = invoke("inspect", REAL / f"{name}.onnx", "--json", tmp_path / "inspect.json", "-q")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["layers"] or report["skipped"], report


def _prune_case(name):
    marks = [pytest.mark.xfail(strict=True, reason=XFAIL[name])] if name in XFAIL else []
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", [_prune_case(n) for n in sorted(MANIFEST)])
def test_prune_half_with_the_defaults(name, tmp_path):
    entry = MANIFEST[name]
    calib, labels = corpus.make_data(entry, 8, 0, "calib")
    np.savez(tmp_path / "calib.npz", **calib)
    out = tmp_path / "out.onnx"
    res = invoke("prune", REAL / f"{name}.onnx", out, "--data", tmp_path / "calib.npz", "--sparsity", 0.5,
                 "--json", tmp_path / "prune.json", "-q")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "prune.json").read_text())
    assert report["pruned"] == round(0.5 * report["weights"]) > 0
    onnx.checker.check_model(str(out), full_check=True)
    test, _ = corpus.make_data(entry, 3, 1, "test")
    outputs = runtime.make_session(onnx.load(out)).run(None, test)
    floats = [np.asarray(o) for o in outputs if np.asarray(o).dtype.kind == "f"]
    assert floats and all(np.isfinite(o).all() for o in floats)
