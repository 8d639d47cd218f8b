"""Real exported models: the checked-in fixtures (torch legacy and dynamo, skl2onnx, tf2onnx-style,
float16, old opsets, constructs that cannot be pruned), models made at test time (onnxruntime's QDQ
quantizer, external data), and the model tests that ship with the onnx package."""
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import onnxprune
from onnxprune import runtime
from onnxprune.cli import main
from onnxprune.find.layers import analyse_graph
from onnxprune.find.outputs import protected_output
from onnxprune.io.data import model_inputs

from tinyconv import cnn, images

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = sorted(p.name for p in FIXTURES.glob("*.onnx"))
ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def random_feeds(model, n=6, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model_inputs(model):
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value else None for d in t.shape.dim]
        shape = [n if i == 0 or d is None else d for i, d in enumerate(dims)]
        feeds[vi.name] = rng.normal(size=shape).astype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    return feeds


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_corpus_is_small_and_described():
    manifest = json.loads((FIXTURES / "MANIFEST.json").read_text())
    assert set(manifest) == set(CORPUS)
    assert all((FIXTURES / name).stat().st_size < 200_000 for name in CORPUS)


@pytest.mark.parametrize("name", CORPUS)
def test_inspect_and_prune_every_fixture_from_the_command_line(name, tmp_path):
    path = FIXTURES / name
    model = onnx.load(path)
    res = invoke("inspect", path, "--json", tmp_path / "inspect.json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["layers"], report
    np.savez(tmp_path / "calib.npz", **random_feeds(model))
    res = invoke("prune", path, tmp_path / "out.onnx", "--data", tmp_path / "calib.npz", "--sparsity", 0.5,
                 "--json", tmp_path / "prune.json", "-v")
    assert res.exit_code == 0, res.output
    pruned = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(pruned, full_check=True)
    result = json.loads((tmp_path / "prune.json").read_text())
    assert result["weights"]["pruned"] == round(0.5 * result["weights"]["weights"])
    assert pruned.ir_version == model.ir_version and list(pruned.opset_import) == list(model.opset_import)
    before = {t.name: t.data_type for t in model.graph.initializer}
    assert all(before.get(t.name, t.data_type) == t.data_type for t in pruned.graph.initializer)
    runtime.make_session(pruned).run(None, random_feeds(model, 3, seed=5))


@pytest.mark.parametrize("name", [n for n in CORPUS if n != "handmade_unsupported.onnx"])
def test_sparsity_zero_reproduces_every_fixture(name):
    model = onnx.load(FIXTURES / name)
    feeds = random_feeds(model)
    result = onnxprune.prune(model, feeds, 0.0)
    for a, b in zip(runtime.make_session(model).run(None, feeds), runtime.make_session(result.model).run(None, feeds)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_what_each_fixture_is_for():
    layers = {name: analyse_graph(onnx.load(FIXTURES / name)) for name in CORPUS}
    by = {name: {lay.op: lay for lay in found.layers} for name, found in layers.items()}
    # torch, TrainingMode.PRESERVE: bias-less Conv then BatchNormalization -> the BN bias carries the shift
    preserve = [lay for lay in layers["torch_legacy_cnn_preserve.onnx"].layers if lay.bias_node and "Batch" in lay.bias_node]
    assert {lay.op for lay in preserve} == {"Conv", "MatMul"}
    # Linear on a 3-D input is a sequence MatMul; the depthwise Conv has one group per channel
    assert by["torch_legacy_seq.onnx"]["MatMul"].kind == "sequence"
    assert by["torch_dynamo_seq.onnx"]["MatMul"].kind == "sequence"
    assert any(lay.conv.groups == 8 for lay in layers["torch_dynamo_cnn.onnx"].layers if lay.op == "Conv")
    # tf2onnx style: weight through Identity, bias as a (1, C, 1, 1) Add, MatMul bias on the left
    tf = layers["handmade_tf2onnx_style.onnx"].layers
    assert tf[0].weight_path[0].op == "Identity" and tf[0].bias == "conv/bias" and tf[1].bias == "dense/bias"
    # the protected tensor: logits before Softmax/LogSoftmax, before ZipMap, skipping label outputs
    expect = {"torch_legacy_cnn.onnx": "/fc2/Gemm_output_0", "skl2onnx_mlp_zipmap.onnx": "add_result1",
              "skl2onnx_mlp_nozipmap.onnx": "add_result1", "torch_legacy_two_outputs.onnx": "embedding"}
    for name, tensor in expect.items():
        assert protected_output(onnx.load(FIXTURES / name)) == tensor
    reasons = {s.node: s.reason for s in layers["handmade_unsupported.onnx"].skipped}
    assert "shared by 2 nodes" in reasons["uses_shared_1"]
    assert "produced by ConstantOfShape" in reasons["produced_weight"]
    assert "ConvTranspose" in reasons["deconv"]


def test_several_outputs_are_all_protected_and_a_chosen_one_names_the_layers_that_do_not_reach_it(tmp_path):
    model = onnx.load(FIXTURES / "torch_legacy_two_outputs.onnx")
    feeds = random_feeds(model)
    result = onnxprune.prune(model, feeds, 0.5)
    assert result.protected_outputs == ["embedding", "logits"] and not result.skipped
    assert [c.layer for c in result.layers] == ["/body/Gemm", "/emb/Gemm", "/cls/Gemm"]
    chosen = onnxprune.prune(model, feeds, 0.5, output="logits")
    assert [c.layer for c in chosen.layers] == ["/body/Gemm", "/cls/Gemm"]
    assert any(s.node == "/emb/Gemm" and "does not reach" in s.reason for s in chosen.skipped)


def test_float16_model_keeps_float16_weights_and_its_statistics_match_a_float32_copy():
    model = onnx.load(FIXTURES / "torch_legacy_cnn_fp16.onnx")
    feeds = random_feeds(model, 8)
    result = onnxprune.prune(model, feeds, 0.5)
    halves = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    assert halves and halves <= {t.name for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    from onnxprune.graph.passes import Float32, copied

    single = onnxprune.Pruner().fit(copied(model, [Float32()]), {k: v.astype(np.float32) for k, v in feeds.items()})
    half = onnxprune.Pruner().fit(model, feeds)
    for name, s in half.scores_.items():
        np.testing.assert_allclose(s.scores, single.scores_[name].scores, rtol=1e-5, atol=1e-12)


def test_qdq_model_from_onnxruntimes_quantizer(tmp_path):
    """Weights behind DequantizeLinear (int8, per channel): pruned weights become the zero point,
    compensation is rounded into the int32 bias, activation fake quantization is seen through."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = cnn(channels=2, size=6, bias="input")
    arrays = images(16)
    onnx.save(model, tmp_path / "float.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter([{"x": arrays["x"][i:i + 4]} for i in range(0, 16, 4)])

        def get_next(self):
            return next(self.rows, None)

    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    qdq = onnx.load(tmp_path / "qdq.onnx")
    found = analyse_graph(qdq)
    assert {lay.weight_path[0].op for lay in found.layers} == {"DequantizeLinear"}, found
    result = onnxprune.prune(qdq, arrays, 0.5)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.pruned == round(0.5 * result.weights)
    pruned = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for layer in found.layers:
        rows = layer.to_rows(pruned[layer.weight])
        assert np.count_nonzero(rows == 0) >= next(c.pruned for c in result.layers if c.layer == layer.name)
        assert pruned[layer.weight].dtype == np.int8
    runtime.make_session(result.model).run(None, {"x": arrays["x"]})


def test_external_data_is_read_and_written_outside_again(tmp_path):
    model = cnn(width=16)
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.weights", size_threshold=64)
    assert (tmp_path / "ext.weights").exists()
    np.savez(tmp_path / "calib.npz", x=images(8)["x"])
    res = invoke("prune", tmp_path / "ext.onnx", tmp_path / "out.onnx", "--data", tmp_path / "calib.npz", "--sparsity", 0.5)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.onnx.data").exists()
    stored = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in stored.graph.initializer)
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_models_over_the_protobuf_limit_are_saved_with_external_data(tmp_path, monkeypatch):
    from onnxprune.io import models as modelio

    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT", 1000)  # stands in for 2 GB
    model = cnn(width=16)
    modelio.save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    loaded = modelio.load_model(tmp_path / "big.onnx")
    assert [t.name for t in loaded.graph.initializer] == [t.name for t in model.graph.initializer]


# -- the model tests shipped with the onnx package ------------------------------------------------

def _node_cases():
    from onnx.backend.test.case import node
    from onnx.backend.test.case.node import conv, gemm, matmul  # noqa: F401  (importing registers the cases)

    prefixes = ("test_gemm", "test_matmul_", "test_conv_", "test_basic_conv_")
    return {c.name: c for c in node._NodeTestCases if c.name.startswith(prefixes)}


NODE_CASES = _node_cases()


def _bind_weights(model, inputs):
    """The test model with every input but the first turned into an initializer (its test value)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [vi.name for vi in m.graph.input]
    for name, value in zip(names[1:], inputs[1:]):
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    keep = [vi for vi in m.graph.input if vi.name == names[0]]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    return m, {names[0]: np.asarray(inputs[0])}


@pytest.mark.parametrize("name", sorted(NODE_CASES))
def test_onnx_backend_node_tests(name):
    case = NODE_CASES[name]
    inputs, outputs = case.data_sets[0]
    model, feeds = _bind_weights(case.model, inputs)
    found = analyse_graph(model)
    if not found.layers:  # transA, a bias per batch row, batched or 1-D weights: named, never a crash
        assert found.skipped and all(s.reason for s in found.skipped)
        with pytest.raises(onnxprune.InputError, match="no prunable layers"):
            onnxprune.prune(model, feeds, 0.5)
        return
    zero = onnxprune.prune(model, feeds, 0.0)
    got = runtime.make_session(zero.model).run(None, feeds)[0]
    np.testing.assert_allclose(got, outputs[0], rtol=1e-5, atol=1e-6)
    half = onnxprune.prune(model, feeds, 0.5)
    onnx.checker.check_model(half.model, full_check=True)
    assert runtime.make_session(half.model).run(None, feeds)[0].shape == outputs[0].shape


CONVERTED = sorted(p.name for p in (ONNX_DATA / "pytorch-converted").glob("test_*")
                   if p.name.startswith(("test_Conv", "test_Linear")))


def _converted(name):
    folder = ONNX_DATA / "pytorch-converted" / name
    model = onnx.load(folder / "model.onnx")
    data = folder / "test_data_set_0"
    inputs = [numpy_helper.to_array(onnx.load_tensor(data / f)) for f in sorted(os.listdir(data)) if f.startswith("input")]
    outputs = [numpy_helper.to_array(onnx.load_tensor(data / f)) for f in sorted(os.listdir(data)) if f.startswith("output")]
    return model, {model_inputs(model)[0].name: inputs[0]}, outputs[0]


@pytest.mark.parametrize("name", CONVERTED)
def test_onnx_pytorch_converted_models(name):
    """Old PyTorch exports (IR 3, opset 6) that ship with onnx: Conv 1-3-D with groups, depthwise,
    dilation, strides, padding; Linear as Gemm and as Transpose + MatMul; ConvTranspose is named."""
    model, feeds, expected = _converted(name)
    if name.startswith("test_ConvTranspose"):
        res = onnxprune.inspect(model)
        assert not res["layers"] and "ConvTranspose" in res["skipped"][0]["reason"]
        return
    zero = onnxprune.prune(model, feeds, 0.0)
    np.testing.assert_allclose(runtime.make_session(zero.model).run(None, feeds)[0], expected, rtol=1e-4, atol=1e-5)
    half = onnxprune.prune(model, feeds, 0.5)
    onnx.checker.check_model(half.model, full_check=True)
    assert half.model.ir_version == model.ir_version == 3
    runtime.make_session(half.model).run(None, feeds)


@pytest.mark.parametrize("name", ["light_bvlc_alexnet.onnx", "light_inception_v1.onnx", "light_shufflenet.onnx"])
def test_inspect_names_what_it_cannot_prune_in_onnx_light_models(name):
    """The 'light' zoo models in onnx make their weights with ConstantOfShape: nothing to prune,
    every layer named with why."""
    res = invoke("inspect", ONNX_DATA / "light" / name, "--json", "-")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{\n"):])
    assert report["skipped"] and all("ConstantOfShape" in s["reason"] or "not" in s["reason"] for s in report["skipped"])


def test_a_conv_model_stamped_with_the_newest_ir_and_opset_onnx_knows():
    model = cnn(bias="none", batchnorm=True, pool=True)
    model.ir_version = onnx.IR_VERSION
    model.opset_import[0].version = onnx.defs.onnx_opset_version()
    result = onnxprune.prune(model, images(10), 0.5)
    assert result.model.ir_version == onnx.IR_VERSION
    assert result.model.opset_import[0].version == onnx.defs.onnx_opset_version()
    onnx.checker.check_model(result.model, full_check=True)
