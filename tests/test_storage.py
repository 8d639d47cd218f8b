"""Sparse storage: written only where smaller, accepted by onnx.checker, loaded by onnxruntime with
the dense file's outputs, read back dense; byte counts reported for both forms."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import onnxprune
from onnxprune.cli import main
from onnxprune.io.storage import densify, sparsify, storage_report

from studies.zoo import build_mlp


@pytest.fixture(scope="module")
def pruned():
    model = build_mlp((32, 16), inputs=40, classes=5)
    x = np.random.default_rng(0).random((64, 40), dtype=np.float32)
    return onnxprune.prune(model, {"x": x}, 0.85).model, x


def run(model_bytes, x):
    return ort.InferenceSession(model_bytes).run(None, {"x": x})[0]


def test_sparse_only_where_smaller_and_outputs_equal(pruned):
    model, x = pruned
    sparse, names = sparsify(model)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, w in weights.items():
        smaller = np.count_nonzero(w) * (w.itemsize + 8) < w.nbytes and w.ndim > 0
        assert (name in names) == smaller, name
    assert names and len(sparse.graph.sparse_initializer) == len(names)
    for tensor in sparse.graph.sparse_initializer:
        assert tensor.indices.data_type == onnx.TensorProto.INT64
    onnx.checker.check_model(sparse)
    np.testing.assert_array_equal(run(sparse.SerializeToString(), x), run(model.SerializeToString(), x))
    dense_again = onnx.ModelProto()
    dense_again.CopyFrom(sparse)
    assert sorted(densify(dense_again)) == sorted(names)
    for t in dense_again.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), weights[t.name])


def test_save_and_load_round_trip(pruned, tmp_path):
    model, x = pruned
    onnxprune.save_model(model, tmp_path / "dense.onnx")
    onnxprune.save_model(model, tmp_path / "sparse.onnx", storage="sparse")
    assert (tmp_path / "sparse.onnx").stat().st_size < (tmp_path / "dense.onnx").stat().st_size
    onnx.checker.check_model(str(tmp_path / "sparse.onnx"))
    np.testing.assert_array_equal(run(str(tmp_path / "sparse.onnx"), x), run(str(tmp_path / "dense.onnx"), x))
    loaded = onnxprune.load_model(tmp_path / "sparse.onnx")  # read back dense: inspectable and prunable
    assert not len(loaded.graph.sparse_initializer)
    assert [layer["sparsity"] for layer in onnxprune.inspect(loaded)["layers"]] == \
           [layer["sparsity"] for layer in onnxprune.inspect(model)["layers"]]
    report = storage_report(model, "sparse")
    assert report["sparse_bytes"] < report["dense_bytes"] and report["dense_zlib_bytes"] < report["dense_bytes"]


def test_nothing_sparse_at_low_sparsity():
    model = build_mlp((8,), inputs=6, classes=3)
    sparse, names = sparsify(model)
    assert names == [] and not len(sparse.graph.sparse_initializer)


def test_cli_storage_sparse_reports_bytes(pruned, tmp_path):
    model, x = pruned
    onnx.save(build_mlp((32, 16), inputs=40, classes=5), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=x)
    res = CliRunner().invoke(main, ["prune", str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx"), "--data",
                                    str(tmp_path / "c.npz"), "--sparsity", "0.9", "--storage", "sparse",
                                    "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "zlib bytes" in res.output and "expands them to dense" in res.output
    storage = json.loads((tmp_path / "r.json").read_text())["storage"]
    assert storage["storage"] == "sparse" and storage["sparse_tensors"]
    assert storage["written_bytes"] == (tmp_path / "out.onnx").stat().st_size < storage["dense_bytes"]
    assert {"dense_zlib_bytes", "sparse_zlib_bytes"} <= set(storage)
    onnx.checker.check_model(str(tmp_path / "out.onnx"))
    assert len(onnx.load(str(tmp_path / "out.onnx")).graph.sparse_initializer) == len(storage["sparse_tensors"])
    ort.InferenceSession(str(tmp_path / "out.onnx"))
