"""The analysis copy (onnxprune.prepare.analysis): what it declares about an export must be true of the data.

The pattern is PP-OCRv4's recognizer (paddle2onnx): a Reshape whose target shape is computed leaves
shape inference without ranks, and attention moves the batch off axis 0 (q, k, v stacked first,
(3, batch, heads, tokens, dim)). Shapes measured on one sample and declared as (batch, *rest) then
claimed a leading batch that tensor does not have, and onnxruntime, which trusts declared shapes,
failed on the pruned model at 8 samples.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import api
from onnxprune.prepare import analysis as prepare

N = 5  # samples: neither 1 nor the stacked 3, so a batch on the wrong axis shows


def stacked_attention_model(seed=0):
    """x (N, 6) -> MatMul W1 (6, 12) -> Reshape to (N, 3, 4) by a computed shape (rank unknown to
    shape inference) -> Transpose (3, N, 4) -> three Slices (1, N, 4) -> Mul q*k + v -> Transpose back
    -> Reshape (N, 4) -> MatMul W2 (4, 2)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((6, 12)).astype(np.float32)
    w2 = rng.standard_normal((4, 2)).astype(np.float32)
    i64 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), i64("rest", [3, 4]),
             i64("zero", [0]), i64("one", [1]), i64("two", [2]), i64("three", [3]), i64("big", [9]), i64("m1", [-1, 4])]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Shape", ["h"], ["hs"]),
        helper.make_node("Slice", ["hs", "zero", "one"], ["n"]),
        helper.make_node("Shape", ["rest"], ["rl"]),
        helper.make_node("Slice", ["rest", "zero", "rl"], ["rest_computed"]),  # end not constant: length unknown
        helper.make_node("Concat", ["n", "rest_computed"], ["target"], axis=0),
        helper.make_node("Reshape", ["h", "target"], ["t"]),
        helper.make_node("Transpose", ["t"], ["u"], perm=[1, 0, 2]),
        helper.make_node("Slice", ["u", "zero", "one"], ["q"]),
        helper.make_node("Slice", ["u", "one", "two"], ["k"]),
        helper.make_node("Slice", ["u", "two", "three"], ["v"]),
        helper.make_node("Mul", ["q", "k"], ["qk"]),
        helper.make_node("Add", ["qk", "v"], ["a"]),
        helper.make_node("Transpose", ["a"], ["b"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["b", "m1"], ["c"]),
        helper.make_node("MatMul", ["c", "W2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(nodes, "stacked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, x, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names
                          if n not in [o.name for o in m.graph.output])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, {"x": x})))


def test_batch_shape_keeps_only_what_both_runs_show():
    assert prepare.batch_shape((1, 8, 4), (2, 8, 4)) == [prepare.BATCH, 8, 4]
    assert prepare.batch_shape((3, 1, 4), (3, 2, 4)) == [3, prepare.BATCH, 4]
    assert prepare.batch_shape((40, 4), (80, 4)) == [None, 4]          # batch merged into a dim
    assert prepare.batch_shape((1, 4), (2, 2, 4)) is None


def test_declared_shapes_hold_at_any_batch():
    model = stacked_attention_model()
    assert {"t", "u", "q"} <= set(prepare.unknown_rank_tensors(model))
    x = np.random.default_rng(1).standard_normal((N, 6)).astype(np.float32)
    declared = prepare.declared_shapes_for(model, {"x": x})
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    declared(copy)
    assert {"t", "u", "q"} <= set(declared.declared)
    actual = run(model, x, declared.declared)
    for vi in copy.graph.value_info:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in vi.type.tensor_type.shape.dim]
        want = [N if d == prepare.BATCH else d for d in dims]
        got = list(actual[vi.name].shape)
        assert [g if w is not None else None for g, w in zip(got, want)] == want, vi.name
    u = next(vi for vi in copy.graph.value_info if vi.name == "u").type.tensor_type.shape.dim
    assert [u[0].dim_value, u[1].dim_param, u[2].dim_value] == [3, prepare.BATCH, 4]  # the batch on axis 1
    np.testing.assert_allclose(run(copy, x, ["y"])["y"], run(model, x, ["y"])["y"], rtol=1e-6)


@pytest.mark.parametrize("method", ["magnitude", "ecp"])
def test_a_model_with_the_batch_off_axis_0_prunes_and_runs(method, tmp_path):
    model = stacked_attention_model()
    x = np.random.default_rng(2).standard_normal((16, 6)).astype(np.float32)
    result = api.prune(model, {"x": x}, sparsity=0.5, method=method)
    pruned = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert np.count_nonzero(pruned["W1"] == 0) + np.count_nonzero(pruned["W2"] == 0) == 40  # both layers found
    assert not [vi for vi in result.model.graph.value_info if vi.name in ("t", "u", "q")]  # declarations undone
    onnx.checker.check_model(result.model, full_check=True)
    assert np.isfinite(run(result.model, x[:8], ["y"])["y"]).all()


def same_padded_pool(mode="SAME_UPPER", pool="MaxPool"):
    """x (N, 2, 7, 6) -> Conv 3x3 (pads 1) -> Relu -> 3x3 pool, strides 2, auto_pad ``mode`` (keras2onnx's
    MaxPool) -> Flatten -> Gemm (3 classes)."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "Wc"),
             numpy_helper.from_array(np.zeros(4, np.float32), "bc"),
             numpy_helper.from_array(rng.standard_normal((3, 4 * 4 * 3)).astype(np.float32) / 7, "Wf"),
             numpy_helper.from_array(np.zeros(3, np.float32), "bf")]
    nodes = [helper.make_node("Conv", ["x", "Wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node(pool, ["r"], ["p"], name="pool", kernel_shape=[3, 3], strides=[2, 2], auto_pad=mode),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "Wf", "bf"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 7, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("mode, pool", [("SAME_UPPER", "MaxPool"), ("SAME_LOWER", "MaxPool"), ("SAME_UPPER", "AveragePool")])
def test_same_padded_pooling_is_differentiated_with_its_pads_written_out(mode, pool):
    """onnx-ad refuses auto_pad SAME; the analysis copy writes the pads out for the data's size (the
    same outputs as onnxruntime's SAME), ECP scores every layer, and the written model keeps auto_pad."""
    from onnxprune.prepare.pads import explicit_pads_for

    model = same_padded_pool(mode, pool)
    x = np.random.default_rng(2).standard_normal((16, 2, 7, 6)).astype(np.float32)
    explicit = onnx.ModelProto()
    explicit.CopyFrom(model)
    step = explicit_pads_for(explicit, {"x": x})
    assert step is not None and step(explicit).changed
    assert not any(a.name == "auto_pad" for n in explicit.graph.node for a in n.attribute if n.op_type == pool)
    np.testing.assert_allclose(run(explicit, x, ["y"])["y"], run(model, x, ["y"])["y"], rtol=1e-6, atol=1e-6)
    result = api.prune(model, {"x": x}, 0.5)
    assert [c.layer for c in result.layers] == ["conv", "fc"] and result.pruned == round(0.5 * result.weights)
    written = next(n for n in result.model.graph.node if n.op_type == pool)
    attrs = {a.name: helper.get_attribute_value(a) for a in written.attribute}
    assert attrs["auto_pad"] == mode.encode() and "pads" not in attrs
    assert run(result.model, x[:3], ["y"])["y"].shape == (3, 3)
