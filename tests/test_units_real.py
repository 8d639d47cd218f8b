"""Unit groups on every committed real export (tests/fixtures/real): ``find_units`` either finds a group
or rejects the layer with a reason naming the node, never an internal error; removing about half of
every group's units (with random constants) gives a model that passes onnx.checker's full check and
computes what the dense model computes with those units replaced by their constants (to 1e-5), on
onnxruntime. The models are analysed as ``inspect`` and ``prune`` analyse them (their analysis copy)
and as they are on disk."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from couplings import all_at_once
from unitref import removal, replaced

from onnxprune import runtime
from onnxprune.edit.slicing import remove_units
from onnxprune.find.units import find_units
from onnxprune.prepare.analysis import AnalysisCopy

REAL = Path(__file__).parent / "fixtures" / "real"
MANIFEST = json.loads((REAL / "MANIFEST.json").read_text())
_spec = importlib.util.spec_from_file_location("corpus_script", Path(__file__).parents[1] / "scripts" / "corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)
# what each fixture holds at least: its attention heads, its FFN and convolution channels
AT_LEAST = {"hf_bert_tiny_classifier": 5, "hf_vit_tiny_classifier": 4, "torch_legacy_mobilenetv3_mnist": 15,
            "torch_dynamo_mobilenetv3_mnist": 15, "torch_legacy_transformer_mnist": 3, "torch_dynamo_transformer_mnist": 3,
            "ppocr_cls_mobile_v2": 10, "silero_vad_16k_op15": 3, "hf_gpt2_tiny_lm": 2}


def _feeds(name, model):
    feeds, _ = corpus.make_data(MANIFEST[name], 3, 0, "test")
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(names) == len(feeds) == 1:  # a single input, by whatever name the export gave it
        return {names[0]: next(iter(feeds.values()))}
    return {k: v for k, v in feeds.items() if k in names}


def _check(model, name):
    units = find_units(model)
    nodes = {n.name for n in model.graph.node}
    for rejected in units.rejected:
        assert rejected.reason and rejected.node, rejected
    feeds = _feeds(name, model)
    rng = np.random.default_rng(0)
    for group in units.groups:
        removed = removal(group, rng)
        constants = rng.normal(size=group.units)
        shrunk = remove_units(model, {group.name: removed}, {group.name: constants})
        onnx.checker.check_model(shrunk, full_check=True)
        want = runtime.make_session(replaced(model, group, removed, constants)).run(None, feeds)
        got = runtime.make_session(shrunk).run(None, feeds)
        for a, b in zip(got, want):
            if not isinstance(a, np.ndarray):
                continue  # skl2onnx's ZipMap: a list of dicts, computed from the probabilities compared
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=f"{name}: {group.name}")
        assert all(p in nodes or any(p == n for n in nodes) for p in group.path)
    if units.groups:  # and every group at once (a Concat moves the others' offsets; a copy's declared shape changes)
        all_at_once(model, [feeds])
    return units


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_units_of_the_analysis_copy_shrink_to_the_masked_model(name):
    units = _check(AnalysisCopy.of(onnx.load(REAL / f"{name}.onnx")).model, name)
    assert len(units.groups) >= AT_LEAST.get(name, 0), [(r.node, r.reason) for r in units.rejected]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_units_of_the_model_as_exported_shrink_to_the_masked_model(name):
    _check(onnx.load(REAL / f"{name}.onnx"), name)
