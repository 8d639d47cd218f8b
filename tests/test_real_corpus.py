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

# What today's code does not do yet (issue 11): the start of the exact one-line error each gives. Strict, and
# only this error counts as the expected failure, so a fix (or a different failure) shows up here.
XFAIL: dict[str, str] = {}
# Models whose layers inspect does not find today.
NOT_FOUND: set[str] = set()
# Models none of whose ops is a prunable layer: a clear exit 2 is the right answer.
UNSUPPORTED = {"skl2onnx_logistic_regression": "Error: the model has no prunable layers (no Gemm, MatMul or Conv nodes)"}


class KnownFailure(Exception):
    """The failure XFAIL names for this model."""


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
    assert report["inputs"] and report["outputs"]
    assert bool(report["layers"]) == (name not in UNSUPPORTED and name not in NOT_FOUND), report["skipped"]


def _prune_case(name):
    marks = [pytest.mark.xfail(strict=True, raises=KnownFailure, reason=XFAIL[name])] if name in XFAIL else []
    return pytest.param(name, marks=marks)


def floats_of(outputs):
    """Float arrays among the outputs, ZipMap's list of {label: probability} included."""
    found = []
    for out in outputs:
        if isinstance(out, list) and out and isinstance(out[0], dict):
            found.append(np.array([list(d.values()) for d in out], dtype=np.float64))
        elif np.asarray(out).dtype.kind == "f":
            found.append(np.asarray(out))
    return found


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_a_model_without_prunable_layers_is_refused_in_one_line(name, tmp_path):
    np.savez(tmp_path / "calib.npz", **corpus.make_data(MANIFEST[name], 8, 0, "calib")[0])
    res = invoke("prune", REAL / f"{name}.onnx", tmp_path / "out.onnx", "--data", tmp_path / "calib.npz",
                 "--sparsity", 0.5)
    assert res.exit_code == 2 and res.output.strip() == UNSUPPORTED[name], res.output
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("name", [_prune_case(n) for n in sorted(MANIFEST) if n not in UNSUPPORTED])
def test_prune_half_with_the_defaults(name, tmp_path):
    entry = MANIFEST[name]
    calib, labels = corpus.make_data(entry, 8, 0, "calib")
    np.savez(tmp_path / "calib.npz", **calib)
    out = tmp_path / "out.onnx"
    res = invoke("prune", REAL / f"{name}.onnx", out, "--data", tmp_path / "calib.npz", "--sparsity", 0.5,
                 "--json", tmp_path / "prune.json", "-q")
    if res.exit_code != 0 and name in XFAIL and XFAIL[name] in res.output:
        raise KnownFailure(res.output.strip())
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "prune.json").read_text())
    assert report["weights"]["pruned"] == round(0.5 * report["weights"]["weights"]) > 0
    onnx.checker.check_model(str(out), full_check=True)
    test, _ = corpus.make_data(entry, 3, 1, "test")
    session = runtime.make_session(onnx.load(out))
    names = [i.name for i in session.get_inputs()]
    if len(names) == len(test) == 1:  # a single-input model takes its array under any name, as prune does
        test = {names[0]: next(iter(test.values()))}
    floats = floats_of(session.run(None, test))
    assert floats and all(np.isfinite(o).all() for o in floats)


STRUCTURED_FRACTION = 0.3


def _masked_dense(pruner, result):
    """The dense analysis copy with every group's removed units replaced by their constants (zero for a
    method without): the independent reference of the one-shot structured model without a refit."""
    from unitref import replaced_all

    removed, constants = {}, {}
    for group in pruner.dense_.groups:
        gone = np.asarray(result.summary["groups"][group.name]["removed"], int)
        if len(gone):
            values = pruner.scores_[group.name].constants
            removed[group.name], constants[group.name] = gone, np.zeros(group.units) if values is None else values
    return replaced_all(pruner.model_, pruner.dense_.groups, removed, constants)


@pytest.mark.parametrize("name", [n for n in sorted(MANIFEST) if n not in UNSUPPORTED])
def test_structured_on_every_fixture_writes_the_masked_model_or_says_why_not(name, tmp_path):
    """--structured goes through the same pipeline: each export is written (checker's full check, runs,
    and one shot without a refit it equals the dense model with the removed units replaced by their
    constants) or refused in one line naming a node and what stops it; never an internal error."""
    import onnxprune

    entry, source = MANIFEST[name], REAL / f"{name}.onnx"
    calib, _ = corpus.make_data(entry, 8, 0, "calib")
    np.savez(tmp_path / "calib.npz", **calib)
    out = tmp_path / "out.onnx"
    res = invoke("prune", source, out, "--data", tmp_path / "calib.npz", "--structured", "--sparsity",
                 STRUCTURED_FRACTION, "--steps", 1, "--no-refit", "--time-batches", 2, "-q")
    if res.exit_code == 2:
        line = res.output.strip()
        nodes = {node.name for node in onnx.load(source).graph.node if node.name}
        assert "\n" not in line and line.startswith("Error:") and any(n in line for n in nodes), line
        assert not out.exists()
        return
    assert res.exit_code == 0, res.output
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    pruner = onnxprune.Pruner("ecp", structured=True, steps=1, refit=False).fit(source, tmp_path / "calib.npz")
    result = pruner.prune(STRUCTURED_FRACTION)
    assert result.model.SerializeToString() == written.SerializeToString()  # the API and the command agree
    test, _ = corpus.make_data(entry, 3, 1, "test")
    session = runtime.make_session(written)
    names = [i.name for i in session.get_inputs()]
    if len(names) == len(test) == 1:
        test = {names[0]: next(iter(test.values()))}
    got = floats_of(session.run(None, test))
    assert got and all(np.isfinite(o).all() for o in got)
    reference = runtime.make_session(_masked_dense(pruner, result))
    want = floats_of(reference.run([o.name for o in written.graph.output], test))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(w).max())))


@pytest.mark.parametrize("name", [n for n in sorted(MANIFEST) if n not in UNSUPPORTED])
def test_inspect_and_structured_pruning_see_the_same_unit_groups(name, tmp_path):
    import onnxprune
    from onnxprune.errors import InputError

    source = REAL / f"{name}.onnx"
    calib, _ = corpus.make_data(MANIFEST[name], 8, 0, "calib")
    seen = sorted(g["group"] for g in onnxprune.inspect(source)["units"]["groups"])
    try:
        pruner = onnxprune.Pruner("l2", structured=True, steps=1, refit=False).fit(source, calib)
    except InputError as exc:
        assert "no unit group" in str(exc) and seen == [], (seen, str(exc))
        return
    assert sorted(g.name for g in pruner.mode_.groups) == seen
