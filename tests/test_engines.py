"""The gradient engines against central finite differences of float64 numpy forwards, against each
other, and their selection: per-sample output Jacobians at the pre-activations of an MLP, a
Conv + BatchNormalization + HardSwish + GlobalMaxPool net and a sequence model with
LayerNormalization and a Softmax inside, loss gradients, and the choice/fallback rules."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import api, runtime
from onnxprune.derivatives.engines import loss_gradients, output_jacobians
from onnxprune.derivatives.engines.base import candidates
from onnxprune.derivatives.statistics import collect_statistics
from onnxprune.errors import Limitation
from onnxprune.find.layers import analyse_graph
from onnxprune.find.outputs import protected_output
from onnxprune.prepare.shapes import output_shape

from engines import AVAILABLE, TRAINING, requires_training

RNG = np.random.default_rng(7)


def _model(nodes, inputs, inits, out=("N", 3), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out))],
                              [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k)
                               for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def mlp():
    p = {"W1": RNG.normal(size=(4, 5)), "b1": RNG.normal(size=4) * 0.1, "W2": RNG.normal(size=(3, 4)), "b2": RNG.normal(size=3)}
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["a1"], name="fc1", transB=1),
             helper.make_node("Tanh", ["a1"], ["h"]),
             helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], name="fc2", transB=1)]
    x = RNG.normal(size=(6, 5))

    def forward(x, off):
        h = np.tanh(x @ p["W1"].T + p["b1"] + off["a1"])
        return h @ p["W2"].T + p["b2"] + off["y"]

    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])], p), x, forward


def conv_bn():
    p = {"Wc": RNG.normal(size=(2, 1, 3, 3)), "bc": RNG.normal(size=2) * 0.1, "s": np.array([1.5, 0.7]),
         "sb": np.array([0.1, -0.2]), "m": np.array([0.05, -0.1]), "v": np.array([1.2, 0.8]),
         "Wf": RNG.normal(size=(3, 2)), "bf": RNG.normal(size=3) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "Wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "sb", "m", "v"], ["bn"]),
             helper.make_node("HardSwish", ["bn"], ["hs"]),
             helper.make_node("GlobalMaxPool", ["hs"], ["gp"]),
             helper.make_node("Flatten", ["gp"], ["f"]),
             helper.make_node("Gemm", ["f", "Wf", "bf"], ["y"], name="fc", transB=1)]
    x = RNG.normal(size=(5, 1, 5, 5))

    def forward(x, off):
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        c = np.zeros((len(x), 2, 5, 5))
        for o in range(2):
            for i in range(5):
                for j in range(5):
                    c[:, o, i, j] = (padded[:, :, i:i + 3, j:j + 3] * p["Wc"][o]).sum((1, 2, 3))
        c = c + p["bc"][None, :, None, None] + off["c"]
        bn = (c - p["m"][None, :, None, None]) / np.sqrt(p["v"][None, :, None, None] + 1e-5) * p["s"][None, :, None, None] \
            + p["sb"][None, :, None, None]
        hs = bn * np.clip(bn / 6 + 0.5, 0, 1)
        f = hs.max(axis=(2, 3))
        return f @ p["Wf"].T + p["bf"] + off["y"]

    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 5, 5])], p), x, forward


def sequence():
    p = {"W1": RNG.normal(size=(5, 4)), "b1": RNG.normal(size=4) * 0.1, "g": np.array([1.0, 0.5, 2.0, 1.5]),
         "be": np.array([0.0, 0.1, -0.1, 0.2]), "W2": RNG.normal(size=(4, 3)), "b2": RNG.normal(size=3) * 0.1}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("LayerNormalization", ["a1", "g", "be"], ["ln"], axis=-1),
             helper.make_node("Softmax", ["ln"], ["sm"], axis=-1),
             helper.make_node("MatMul", ["sm", "W2"], ["m2"], name="mm2"),
             helper.make_node("Add", ["m2", "b2"], ["y"], name="add2")]
    x = RNG.normal(size=(4, 3, 5))

    def forward(x, off):
        a1 = x @ p["W1"] + p["b1"] + off["a1"]
        mu, var = a1.mean(-1, keepdims=True), a1.var(-1, keepdims=True)
        ln = (a1 - mu) / np.sqrt(var + 1e-5) * p["g"] + p["be"]
        e = np.exp(ln - ln.max(-1, keepdims=True))
        sm = e / e.sum(-1, keepdims=True)
        return sm @ p["W2"] + p["b2"] + off["y"]

    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5])], p, ("N", 3, 3)), x, forward


MODELS = {"mlp": mlp, "conv-bn-hardswish-globalmaxpool": conv_bn, "sequence-layernorm-softmax": sequence}
# what onnxruntime-training 1.19.2 cannot differentiate (see ../shared/docs/onnxruntime-training.md): asked for
# it, these models fall back to the adjoint engine, and the reason says so
TRAINING_GAPS = {"conv-bn-hardswish-globalmaxpool": "onnxruntime-training cannot", "sequence-layernorm-softmax":
                 "onnxruntime-training cannot"}


def fd_rows(forward, x, preact_shapes, eps=1e-6):
    """Per layer (n, K, *preact) central differences of the flattened output w.r.t. the offset."""
    zeros = {name: np.zeros((len(x),) + shape) for name, shape in preact_shapes.items()}
    k = forward(x, zeros).reshape(len(x), -1).shape[1]
    out = {}
    for name, shape in preact_shapes.items():
        jac = np.zeros((len(x), k) + shape)
        for index in np.ndindex(*shape):
            plus, minus = dict(zeros), dict(zeros)
            plus[name], minus[name] = zeros[name].copy(), zeros[name].copy()
            plus[name][(slice(None),) + index] += eps
            minus[name][(slice(None),) + index] -= eps
            diff = (forward(x, plus) - forward(x, minus)).reshape(len(x), -1) / (2 * eps)
            jac[(slice(None), slice(None)) + index] = diff
        out[name] = jac
    return out


def as_rows(layer, jac):
    """(n, K, *preact) -> (n, K, out, positions), the engines' layout."""
    n, k = jac.shape[:2]
    if layer.kind == "sequence":
        return np.moveaxis(jac.reshape(n, k, -1, layer.out_features), 3, 2)
    return jac.reshape(n, k, layer.out_features, -1)


@pytest.mark.parametrize("engine", AVAILABLE)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_jacobian_rows_match_float64_finite_differences(name, engine):
    model, x, forward = MODELS[name]()
    layers = analyse_graph(model).layers
    assert len(layers) == 2, [layer.name for layer in analyse_graph(model).skipped]
    out = protected_output(model)
    feeds = {"x": x.astype(np.float32)}
    shape = output_shape(model, out, feeds)
    jac = output_jacobians(model, layers, out, int(np.prod(shape)), engine=engine)
    rows, _ = jac.rows(feeds, shape)
    if engine == "ort-training" and name in TRAINING_GAPS:
        assert jac.choice.name == "adjoint" and jac.choice.reason.startswith("fallback: " + TRAINING_GAPS[name])
    else:
        assert jac.choice.name == engine
    preacts = {layer.preact: jac.shapes[layer.preact] for layer in layers}
    want = fd_rows(forward, x.astype(np.float32).astype(np.float64), preacts)
    for layer in layers:
        expected = as_rows(layer, want[layer.preact])
        scale = np.abs(expected).max()
        np.testing.assert_allclose(rows[layer.name], expected, atol=2e-5 * scale, rtol=1e-4, err_msg=layer.name)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_padded_last_batch_and_squares_match_the_rows(name):
    """The adjoint graph is built for the first batch's size: a smaller batch is padded and cut back,
    and the in-graph G equals the squared rows summed over the seeds."""
    model, x, _ = MODELS[name]()
    layers = analyse_graph(model).layers
    out = protected_output(model)
    feeds = {"x": x.astype(np.float32)}
    shape = output_shape(model, out, feeds)
    jac = output_jacobians(model, layers, out, int(np.prod(shape)), engine="adjoint")
    full, _ = jac.rows(feeds, shape)
    part, inputs = jac.squares({"x": feeds["x"][:3]}, shape)
    for layer in layers:
        g = full[layer.name][:3].astype(np.float64)
        if layer.shared:
            np.testing.assert_allclose(part[layer.name], g, rtol=1e-6)
        else:
            np.testing.assert_allclose(part[layer.name], np.einsum("sro,sro->so", g[..., 0], g[..., 0]), rtol=1e-5)
        assert len(inputs[layer.name]) == 3


def test_random_probes_are_unbiased_for_g():
    model, x, _ = mlp()
    layers = analyse_graph(model).layers
    feeds = {"x": x.astype(np.float32)}
    shape = output_shape(model, "y", feeds)
    exact, _ = output_jacobians(model, layers, "y", 3, engine="adjoint").squares(feeds, shape)
    probed = output_jacobians(model, layers, "y", 3, probes=4000, seed=1, engine="adjoint")
    estimate, _ = probed.squares(feeds, shape)
    for layer in layers:
        np.testing.assert_allclose(estimate[layer.name], exact[layer.name], rtol=0.1)


def test_loss_gradients_are_softmax_minus_one_hot_on_a_linear_model():
    """For logits a = W x + b, dL/da of the cross-entropy is softmax(a) - onehot(label), exactly."""
    w, b = RNG.normal(size=(4, 5)), RNG.normal(size=4)
    model = _model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])], {"W": w, "b": b}, ("N", 4))
    x = RNG.normal(size=(7, 5)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 0, 1, 2])
    layers = analyse_graph(model).layers
    for engine in AVAILABLE:
        grads, _ = loss_gradients(model, layers, "y", engine=engine)({"x": x}, labels)
        a = x.astype(np.float64) @ w.astype(np.float32).astype(np.float64).T + b.astype(np.float32)
        p = np.exp(a - a.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        np.testing.assert_allclose(grads["fc"], p - np.eye(4)[labels], atol=1e-6, err_msg=engine)


@requires_training
@pytest.mark.parametrize("path", ["models/mnist_mlp.onnx", "models/mnist_cnn.onnx"])
def test_both_engines_give_the_same_statistics_and_the_same_pruned_loss(path):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    model = onnx.load(root / path)
    data = api.as_dataset(root / "models" / "mnist_calib.npz", model).subset(256)
    layers = analyse_graph(model).layers
    out = protected_output(model)
    stats = {engine: collect_statistics(model, layers, data, out, engine=engine) for engine in AVAILABLE}
    for layer in layers:
        for field in ("A", "B", "C"):
            want = getattr(stats["ort-training"][layer.name], field)
            got = getattr(stats["adjoint"][layer.name], field)
            np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-4, err_msg=f"{layer.name} {field}")
    test = api.as_dataset(root / "models" / "mnist_test.npz", model).subset(2000)
    losses = {engine: api.evaluate(api.prune(model, data, 0.7, engine=engine).model, test)["loss"] for engine in AVAILABLE}
    assert abs(losses["adjoint"] - losses["ort-training"]) <= 0.005 * losses["ort-training"], losses


def test_a_large_derivative_graph_goes_to_onnxruntime_as_a_file(monkeypatch):
    """Past INLINE_BYTES of weights (2 GB models) the graph is written with external data and loaded
    from its path; the results are the same."""
    model, x, _ = conv_bn()
    layers = analyse_graph(model).layers
    feeds = {"x": x.astype(np.float32)}
    shape = output_shape(model, "y", feeds)
    want, _ = output_jacobians(model, layers, "y", 3, engine="adjoint").rows(feeds, shape)
    monkeypatch.setattr(runtime, "INLINE_BYTES", 0)
    got, _ = output_jacobians(model, layers, "y", 3, engine="adjoint").rows(feeds, shape)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_an_op_no_engine_differentiates_is_named_with_its_node():
    model = _model([helper.make_node("Gemm", ["x", "W", "b"], ["a"], name="fc", transB=1),
                    helper.make_node("Dropout", ["a", "ratio", "train"], ["y"], name="the_dropout")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                   {"W": RNG.normal(size=(4, 5)), "b": np.zeros(4), "ratio": np.array(0.5), "train": np.array(True)},
                   ("N", 4))
    with pytest.raises(Limitation, match="no gradient engine can differentiate the model: .*Dropout node 'the_dropout'"):
        api.prune(model, {"x": RNG.normal(size=(8, 5)).astype(np.float32)}, 0.5)


def test_the_choice_follows_the_installed_build():
    first = candidates("auto")[0]
    assert first.name == ("ort-training" if TRAINING else "adjoint")
    assert [c.name for c in candidates("adjoint")] == (["adjoint", "ort-training"] if TRAINING else ["adjoint"])
    if not TRAINING:
        with pytest.raises(runtime.RuntimeUnavailable, match="training build"):
            candidates("ort-training")


def test_the_report_says_which_engine_ran_and_why():
    model, x, _ = mlp()
    result = api.prune(model, {"x": x.astype(np.float32)}, 0.5, engine="adjoint")
    assert result.to_dict()["engine"] == {"name": "adjoint", "reason": "requested (--engine adjoint)"}
    assert api.prune(model, {"x": x.astype(np.float32)}, 0.5, method="magnitude").engine["name"] is None


def test_a_missing_or_clobbered_runtime_is_explained_with_the_fix():
    assert "pip install 'onnxprune[cpu]'" in runtime.installation_problem([], False)
    two = runtime.installation_problem(["onnxruntime", "onnxruntime-training-cpu"], True)
    assert "several onnxruntime builds" in two and "pip uninstall -y onnxruntime onnxruntime-training-cpu" in two
    assert runtime.installation_problem(["onnxruntime"], True) is None


def test_the_command_refuses_to_start_on_a_clobbered_runtime(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from onnxprune.cli import main

    monkeypatch.setattr(runtime, "installed_builds", lambda: ["onnxruntime", "onnxruntime-gpu"])
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: several onnxruntime builds"), res.output


def test_many_outputs_switch_to_random_probes_and_say_so():
    from onnxprune.derivatives.plan import AUTO_PROBES, EXACT_LIMIT, PROBE_SAMPLES

    from studies.zoo import build_mlp

    model = build_mlp((8,), inputs=6, classes=EXACT_LIMIT + 20)
    x = {"x": RNG.normal(size=(16, 6)).astype(np.float32)}
    auto = api.prune(model, x, 0.5).to_dict()["derivatives"]
    assert auto["probes"] == PROBE_SAMPLES // 16 and auto["exact"] is False and auto["automatic_probes"] is True
    few = api.prune(model, {"x": x["x"][:4]}, 0.5).to_dict()["derivatives"]  # P x n >= PROBE_SAMPLES, up to the cap
    many = api.prune(model, {"x": RNG.normal(size=(600, 6)).astype(np.float32)}, 0.5).to_dict()["derivatives"]
    assert few["probes"] == AUTO_PROBES and many["probes"] == 1
    chosen = api.prune(model, x, 0.5, probes=3).to_dict()["derivatives"]
    assert chosen["probes"] == 3 and chosen["automatic_probes"] is False


def test_a_small_memory_budget_gives_smaller_batches_and_the_same_statistics():
    model, x, _ = conv_bn()
    layers = analyse_graph(model).layers
    data = api.as_dataset({"x": np.concatenate([x] * 8).astype(np.float32)}, model)
    roomy, tight = {}, {}
    big = collect_statistics(model, layers, data, "y", engine="adjoint", info=roomy)
    small = collect_statistics(model, layers, data, "y", engine="adjoint", memory_budget=20_000, info=tight)
    assert tight["batch"] < roomy["batch"] and tight["batch"] >= 1
    for layer in layers:
        for field in ("A", "B", "C"):
            np.testing.assert_allclose(getattr(small[layer.name], field), getattr(big[layer.name], field), rtol=1e-5)


def test_a_front_end_no_offset_reaches_runs_apart():
    """An LSTM before the first layer runs in a forward session of its own (onnx-ad's LSTM-as-Scan
    graph does not load in onnxruntime; it need not be differentiated); the rows are y = tanh(a)'s
    exact derivative and the layer input is the LSTM's output as onnxruntime computes it."""
    hidden = 5
    p = {"Wi": RNG.normal(size=(1, 4 * hidden, 4)) * 0.5, "Ri": RNG.normal(size=(1, 4 * hidden, hidden)) * 0.5,
         "W": RNG.normal(size=(3, hidden)), "b": RNG.normal(size=3)}
    nodes = [helper.make_node("Transpose", ["x"], ["seq"], perm=[1, 0, 2]),  # (N, T, F) -> (T, N, F)
             helper.make_node("LSTM", ["seq", "Wi", "Ri"], ["", "h"], name="lstm", hidden_size=hidden),
             helper.make_node("Transpose", ["h"], ["hb"], perm=[1, 0, 2]),
             helper.make_node("Flatten", ["hb"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "b"], ["a"], name="fc", transB=1),
             helper.make_node("Tanh", ["a"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])], p, opset=17)
    layers = analyse_graph(model).layers
    feeds = {"x": RNG.normal(size=(6, 3, 4)).astype(np.float32)}
    split = output_jacobians(model, layers, "y", 3, engine="adjoint")
    rows, inputs = split.rows(feeds, (3,))
    assert split.impl.prefix is not None
    f, y = runtime.run_tensors(model, feeds, ["f", "y"])
    np.testing.assert_allclose(inputs["fc"], f, rtol=1e-6)
    want = np.einsum("nk,ki->nki", 1 - y.astype(np.float64) ** 2, np.eye(3))[..., None]
    np.testing.assert_allclose(rows["fc"], want, rtol=1e-5, atol=1e-6)


def test_automatic_probes_shrink_when_one_sample_would_not_fit_the_budget():
    """Fewer random probes (down to 1) when one sample's activations and derivatives exceed the
    budget; still random probes, still reported."""
    from onnxprune.derivatives.plan import AUTO_PROBES, EXACT_LIMIT, sample_bytes

    from studies.zoo import build_mlp

    model = build_mlp((8,), inputs=6, classes=EXACT_LIMIT + 20)
    x = {"x": RNG.normal(size=(4, 6)).astype(np.float32)}  # few samples: the rule alone would ask for AUTO_PROBES
    per_sample = sample_bytes(model, x)
    layers = analyse_graph(model).layers
    info = {}
    collect_statistics(model, layers, api.as_dataset(x, model), protected_output(model), engine="adjoint",
                       memory_budget=per_sample * 9, info=info)
    assert info["automatic_probes"] and info["probes"] == 4 < AUTO_PROBES
    collect_statistics(model, layers, api.as_dataset(x, model), protected_output(model), engine="adjoint",
                       memory_budget=1, info=info)
    assert info["probes"] == 1
