"""The runtime and derivative copies' passes: each keeps the model's function (onnxruntime against a
numpy reference), does what it declares, and the pipelines never change the caller's model."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.graph.passes import (
    AffineBatchNormalization,
    Float32,
    KeepNeeded,
    StampForRuntime,
    StripFakeQuantization,
    UpgradeOpset,
    derivative_copy,
    runtime_copy,
)
from onnxprune.runtime import make_session

RNG = np.random.default_rng(0)


def _model(nodes, inits, inputs, outputs, opset=17, elem=TensorProto.FLOAT):
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, elem, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, elem, s) for n, s in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, feeds):
    return make_session(model).run(None, feeds)


def test_affine_batchnormalization_computes_the_inference_batchnorm():
    c = 3
    g, b, m, v = (RNG.normal(size=c).astype(np.float32), RNG.normal(size=c).astype(np.float32),
                  RNG.normal(size=c).astype(np.float32), RNG.uniform(0.5, 2, size=c).astype(np.float32))
    model = _model([helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], name="bn", epsilon=1e-3)],
                   {"g": g, "b": b, "m": m, "v": v}, [("x", ["N", c, 4, 4])], [("y", ["N", c, 4, 4])])
    x = RNG.normal(size=(2, c, 4, 4)).astype(np.float32)
    result = AffineBatchNormalization()(model)
    assert result.changed and [n.op_type for n in model.graph.node] == ["Mul", "Add"]
    assert model.graph.node[1].name == "bn" and model.graph.node[1].output[0] == "y"
    shape = (1, c, 1, 1)
    expected = (x - m.reshape(shape)) / np.sqrt(v.reshape(shape).astype(np.float64) + 1e-3) * g.reshape(shape) + b.reshape(shape)
    np.testing.assert_allclose(_run(model, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(model, full_check=True)


def test_float32_makes_a_half_model_compute_in_float32_with_the_same_values():
    w = RNG.normal(size=(4, 3)).astype(np.float16)
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], {"W": w}, [("x", ["N", 4])],
                   [("y", ["N", 3])], elem=TensorProto.FLOAT16)
    assert Float32()(model).changed
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), w.astype(np.float32))
    assert not Float32()(model).changed


def test_strip_fake_quantization_keeps_weight_dequantization():
    q = RNG.integers(-3, 3, size=(4, 3)).astype(np.int8)
    model = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
                    helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
                    helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"], name="wdq"),
                    helper.make_node("MatMul", ["xd", "W"], ["y"], name="fc")],
                   {"s": np.array(0.1, np.float32), "z": np.array(0, np.int8), "Wq": q}, [("x", ["N", 4])], [("y", ["N", 3])])
    assert StripFakeQuantization()(model).note == "1 fake quantizations read as identities"
    assert [n.op_type for n in model.graph.node] == ["QuantizeLinear", "Identity", "DequantizeLinear", "MatMul"]
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(model, {"x": x})[0], x @ (q.astype(np.float32) * np.float32(0.1)), rtol=1e-5)


def test_upgrade_opset_converts_an_opset_6_gemm_that_onnxruntime_cannot_run():
    w = RNG.normal(size=(3, 4)).astype(np.float32)
    model = _model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1, broadcast=1)],
                   {"W": w, "b": np.zeros(3, np.float32)}, [("x", ["N", 4])], [("y", ["N", 3])], opset=6)
    model.ir_version = 3  # initializers are also graph inputs before IR 4
    model.graph.input.extend([helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 4]),
                              helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])])
    result = UpgradeOpset(7)(model)
    assert result.changed and model.opset_import[0].version == 7 and model.graph.node[0].name == "fc"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # symbolic batch kept
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(model, {"x": x})[0], x @ w.T, rtol=1e-5)
    assert not UpgradeOpset(7)(model).changed


def test_pipelines_copy_once_and_leave_the_callers_model_alone():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], {}, [("x", ["N", 4])], [("y", ["N", 4])], opset=22)
    model.ir_version = 11
    before = model.SerializeToString()
    stamped = runtime_copy(model)
    assert (stamped.ir_version, stamped.opset_import[0].version) == (10, 21)
    assert not StampForRuntime()(stamped).changed
    derivative_copy(model, 16)
    assert model.SerializeToString() == before


def test_keep_needed_keeps_what_subgraphs_read_and_drops_the_rest():
    then = helper.make_graph([helper.make_node("Identity", ["h"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    model = _model([helper.make_node("Relu", ["x"], ["h"], name="relu"),
                    helper.make_node("Neg", ["x"], ["dead"], name="neg"),
                    helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then, else_branch=then)],
                   {"c": np.array(True), "unused": np.zeros(2, np.float32)}, [("x", ["N", 4])], [("y", None)])
    assert KeepNeeded({"y"}, initializers=True)(model).changed
    assert [n.name for n in model.graph.node] == ["relu", "branch"]
    assert [t.name for t in model.graph.initializer] == ["c"]
