"""End-to-end pruning through the Python API: invariants a user relies on."""
import hashlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune import runtime

from tinynets import data, mlp

PATTERNS = ["gemm_t", "gemm", "matmul", "matmul_left"]


def run(model, x):
    return runtime.make_session(model).run(None, {"x": x})[0]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparsity_zero_leaves_outputs_unchanged(pattern):
    model, _, _ = mlp((5, 4, 3), pattern=pattern, softmax=True)
    arrays = data(30)
    result = onnxprune.prune(model, arrays, 0.0)
    assert result.pruned == 0
    np.testing.assert_array_equal(run(result.model, arrays["x"]), run(model, arrays["x"]))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", ["ecp", "magnitude", "random", "variance"])
def test_pruned_model_is_valid_and_has_the_exact_count(pattern, method):
    model, _, _ = mlp((5, 4, 4, 3), pattern=pattern)
    result = onnxprune.prune(model, data(30), 0.4, method=method)
    onnx.checker.check_model(result.model, full_check=True)
    total = 5 * 4 + 4 * 4 + 4 * 3
    zeros = sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in result.model.graph.initializer
                if t.name.startswith("W"))
    assert result.pruned == round(0.4 * total) == zeros
    assert [t.name for t in result.model.graph.initializer] == [t.name for t in model.graph.initializer]
    assert all(a.data_type == b.data_type and a.dims == b.dims
               for a, b in zip(result.model.graph.initializer, model.graph.initializer))


def test_compensation_lowers_the_output_error():
    model, _, _ = mlp((5, 8, 8, 3), pattern="gemm_t")
    arrays = data(200)
    dense = run(model, arrays["x"])
    errors = {}
    for comp in (True, False):
        pruned = onnxprune.prune(model, arrays, 0.5, compensation=comp).model
        errors[comp] = np.mean((run(pruned, arrays["x"]) - dense) ** 2)
    assert errors[True] < errors[False]


@pytest.mark.parametrize("pattern", ["gemm_t", "matmul"])
def test_a_layer_without_bias_gets_one_and_it_is_used(pattern):
    model, _, _ = mlp((5, 4, 3), pattern=pattern, bias=False, activation="relu")
    arrays = data(60)
    arrays["x"] = arrays["x"] + 2.0  # non-zero means, so compensation is non-zero
    result = onnxprune.prune(model, arrays, 0.5)
    assert any(c.bias_inserted for c in result.layers)
    onnx.checker.check_model(result.model, full_check=True)
    assert len(result.model.graph.initializer) > len(model.graph.initializer)
    nocomp = onnxprune.prune(model, arrays, 0.5, compensation=False).model
    dense = run(model, arrays["x"])
    assert np.mean((run(result.model, arrays["x"]) - dense) ** 2) < np.mean((run(nocomp, arrays["x"]) - dense) ** 2)


def test_gemm_alpha_beta_compensation_is_written_in_stored_units():
    """With alpha/beta != 1 the pruned model must equal the same pruning of the alpha=beta=1 model."""
    plain, _, _ = mlp((5, 4, 3), pattern="gemm")
    scaled, _, _ = mlp((5, 4, 3), pattern="gemm", alpha=2.0, beta=0.25)
    arrays = data(40)
    np.testing.assert_allclose(run(plain, arrays["x"]), run(scaled, arrays["x"]), rtol=1e-5, atol=1e-6)
    a = onnxprune.prune(plain, arrays, 0.5).model
    b = onnxprune.prune(scaled, arrays, 0.5).model
    np.testing.assert_allclose(run(a, arrays["x"]), run(b, arrays["x"]), rtol=1e-4, atol=1e-5)


def test_new_ir_and_opset_are_handled_on_a_copy_and_kept_on_output():
    model, _, _ = mlp((5, 4, 3), opset=23, ir=11)
    result = onnxprune.prune(model, data(20), 0.5)
    assert result.model.ir_version == 11
    assert result.model.opset_import[0].version == 23


def test_a_shared_weight_is_pruned_per_reader_and_stays_shared_where_equal():
    """Exporters deduplicate equal tensors: a weight read by two Gemms gets a copy per reader on the
    analysis copy, each layer is pruned on its own, and the written model shares what stayed equal."""
    model, _, _ = mlp((4, 4, 4, 4))
    fc2 = next(n for n in model.graph.node if n.name == "fc2")
    fc2.input[1] = "W0"  # the last Gemm reuses the first one's weight
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "W2"))
    x = data(20, d=4)
    result = onnxprune.prune(model, x, 0.5)
    assert [c.layer for c in result.layers] == ["fc0", "fc1", "fc2"] and not result.skipped
    written = {t.name for t in result.model.graph.initializer}
    readers = [n.input[1] for n in result.model.graph.node if n.name in ("fc0", "fc2")]
    assert readers[0] == "W0" and readers[1] in written and readers[1] != "W0"  # pruned apart: two tensors
    onnx.checker.check_model(result.model)
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    untouched = onnxprune.prune(model, x, 0.0)  # nothing pruned: the copies equal the original and merge back
    assert [n.input[1] for n in untouched.model.graph.node if n.name in ("fc0", "fc2")] == ["W0", "W0"]
    assert sorted(t.name for t in untouched.model.graph.initializer) == sorted(t.name for t in model.graph.initializer)
    np.testing.assert_array_equal(run(untouched.model, x["x"]), run(model, x["x"]))


def test_weights_in_constant_nodes_are_pruned_and_stay_constants():
    model, _, _ = mlp((5, 4, 3))
    for t in list(model.graph.initializer):
        model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [t.name], value=t))
    del model.graph.initializer[:]
    x = data(20)
    result = onnxprune.prune(model, x, 0.5)
    assert result.sparsity == pytest.approx(0.5, abs=0.05) and not list(result.model.graph.initializer)
    constants = [n for n in result.model.graph.node if n.op_type == "Constant"]
    assert len(constants) == len([n for n in model.graph.node if n.op_type == "Constant"])
    zeros = sum(int((numpy_helper.to_array(n.attribute[0].t) == 0).sum()) for n in constants)
    assert zeros >= result.pruned
    onnx.checker.check_model(result.model)
    assert np.isfinite(run(result.model, x["x"])).all()


def test_same_seed_gives_byte_identical_models(tmp_path):
    model, _, _ = mlp((5, 4, 3))
    paths = []
    for i in range(2):
        result = onnxprune.prune(model, data(30), 0.5, method="random", seed=7)
        paths.append(onnxprune.save_model(result.model, tmp_path / f"m{i}.onnx"))
    assert hashlib.sha256(paths[0].read_bytes()).digest() == hashlib.sha256(paths[1].read_bytes()).digest()


def test_evaluate_against_numpy():
    model, _, forward = mlp((5, 4, 3), softmax=True)
    arrays = data(50)
    report = onnxprune.evaluate(model, arrays, reference=model)
    logits, _ = forward(arrays["x"])
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert report["loss"] == pytest.approx(-logp[np.arange(50), arrays["y"]].mean(), rel=1e-5)
    assert report["accuracy"] == pytest.approx((logits.argmax(1) == arrays["y"]).mean())
    assert report["mse"] == 0 and report["max_abs"] == 0


def test_inspect_accounts_for_every_weight_it_does_not_prune():
    """Recurrent matrices, a Gather's embedding and a subgraph's initializer are listed with why."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    init = lambda name, shape: numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)  # noqa: E731
    branch = helper.make_graph([helper.make_node("MatMul", ["h", "Wb"], ["o"])], "branch", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)], [init("Wb", (4, 4))])
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
             helper.make_node("LSTM", ["emb", "Wi", "Ri"], ["seq", "h"], name="lstm", hidden_size=4),
             helper.make_node("If", ["flag"], ["y"], name="choose", then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3, 1]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [init("E", (10, 4)), init("Wi", (1, 16, 4)), init("Ri", (1, 16, 4))])
    report = onnxprune.inspect(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    reasons = {w["node"]: w["reason"] for w in report["unpruned_weights"]}
    assert set(reasons) == {"E", "Wi", "Ri", "Wb"}
    assert "Gather 'embed'" in reasons["E"] and "recurrent" in reasons["Wi"] and "recurrent" in reasons["Ri"]
    assert "subgraph of If 'choose'" in reasons["Wb"]


def test_a_scalar_input_is_fed_as_given_with_every_batch(tmp_path):
    """A model input declared as a scalar (a sample rate) has no batch axis: one value is stored and fed
    with every batch; the written model keeps it as an input."""
    from onnx import TensorProto, helper

    model, _, _ = mlp((5, 4, 3))
    graph = model.graph
    last = graph.node[-1]
    scaled = last.output[0]
    last.output[0] = "unscaled"
    graph.node.append(helper.make_node("Mul", ["unscaled", "rate"], [scaled], name="by_rate"))
    graph.input.append(helper.make_tensor_value_info("rate", TensorProto.FLOAT, []))
    onnx.checker.check_model(model)
    x = data(30)
    result = onnxprune.prune(model, {**x, "rate": np.float32(2.0)}, 0.5)
    assert [i.name for i in result.model.graph.input] == [i.name for i in graph.input]
    assert "rate" not in {t.name for t in result.model.graph.initializer}
    out = runtime.make_session(result.model).run(None, {"x": x["x"], "rate": np.array(2.0, np.float32)})[0]
    assert np.isfinite(out).all()
    np.savez(tmp_path / "calib.npz", x=x["x"], rate=np.float32(2.0))
    evaluated = onnxprune.evaluate(result.model, str(tmp_path / "calib.npz"), reference=model)
    assert evaluated["mse"] >= 0
    with pytest.raises(onnxprune.InputError, match="scalar input"):
        onnxprune.prune(model, {**x, "rate": np.ones(30, np.float32)}, 0.5)


def test_an_input_with_the_batch_on_its_second_axis(tmp_path):
    """A state shaped (2, batch, 4) (the batch symbol is the one another input has first): its samples
    are read along axis 1, the analysis sees it batch-first, the written model keeps its layout."""
    from onnx import TensorProto, helper

    model, _, _ = mlp((5, 4, 3))
    graph = model.graph
    first = graph.node[0]
    hidden = first.output[0]
    first.output[0] = "pre"
    graph.node.insert(1, helper.make_node("ReduceSum", ["state", "axis0"], ["summed"], keepdims=0))
    graph.node.insert(2, helper.make_node("Add", ["pre", "summed"], [hidden]))
    graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    graph.input.append(helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, batch, 4]))
    onnx.checker.check_model(model)
    x = data(30)
    state = np.random.default_rng(3).normal(size=(2, 30, 4)).astype(np.float32)
    result = onnxprune.prune(model, {**x, "state": state}, 0.5)
    assert result.sparsity == pytest.approx(0.5, abs=0.05)
    written = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in result.model.graph.input}
    assert written["state"] == [2, batch, 4] and [n.op_type for n in result.model.graph.node].count("Transpose") == 0
    want = runtime.make_session(model).run(None, {"x": x["x"][:7], "state": state[:, :7]})[0]
    assert want.shape[0] == 7
    np.savez(tmp_path / "d.npz", x=x["x"], state=state)
    assert onnxprune.evaluate(model, str(tmp_path / "d.npz"))["samples"] == 30
