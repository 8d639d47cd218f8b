"""The chained least-squares refit against numpy solutions of the same ridge problems."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune import runtime
from onnxprune.data import Dataset
from onnxprune.layers import analyse_graph
from onnxprune.refit import refit
from tinynets import data, mlp
from test_statistics import fd_jacobians


def weights_of(model):
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    return inits


def ridge(x, t, delta, w=None):
    """min sum_s w_s (t_s - x_s.theta - b)^2 + lambda |theta|^2, lambda = delta * mean diag(x' W x)."""
    w = np.ones(len(x)) if w is None else w
    xb = np.hstack([x, np.ones((len(x), 1))])
    gram = (xb * w[:, None]).T @ xb
    reg = np.zeros(len(gram))
    reg[:-1] = delta * np.mean(np.diag(gram)[:-1])
    return np.linalg.solve(gram + np.diag(reg), (xb * w[:, None]).T @ t)


def pruned_copy(model, fraction=0.5, seed=0):
    """The model with a random half of every weight matrix zeroed (the refit's mask)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for t in m.graph.initializer:
        if t.name.startswith("W"):
            a = numpy_helper.to_array(t).copy()
            a[rng.random(a.shape) < fraction] = 0
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    return m


@pytest.mark.parametrize("pattern", ["gemm_t", "gemm", "matmul"])
def test_refit_solves_each_rows_ridge_problem_on_the_chained_inputs(pattern):
    dense, _, forward = mlp((6, 5, 3), pattern=pattern, seed=2)
    current = pruned_copy(dense)
    layers = analyse_graph(current).layers
    x = data(120, d=6)["x"]
    new, reports = refit(dense, current, layers, Dataset({"x": x}), "a1", batch_size=50)
    w = weights_of(new)
    _, dense_trace = forward(x)
    masks = [weights_of(current)[f"W{l}"] != 0 for l in range(2)]
    for l, layer in enumerate(analyse_graph(new).layers):
        stored = w[f"W{l}"]
        rows = stored.T if pattern != "gemm_t" else stored
        mask = masks[l].T if pattern != "gemm_t" else masks[l]
        assert np.all(rows[~mask] == 0), "pruned weights must stay exactly zero"
        # chained: layer l's inputs come from the refit network itself
        z = x.astype(np.float64) if l == 0 else np.tanh(runtime.run_tensors(new, {"x": x}, ["a0"])[0].astype(np.float64))
        target = dense_trace[l][1]
        bias = w[f"b{l}"]
        for i in range(layer.out_features):
            cols = np.flatnonzero(mask[i])
            expected = ridge(z[:, cols], target[:, i], reports[l].damping)
            np.testing.assert_allclose(rows[i, cols], expected[:-1], rtol=2e-4, atol=2e-5)
            assert bias[i] == pytest.approx(expected[-1], rel=2e-4, abs=2e-5)


def test_g_weighted_refit_weights_samples_by_output_sensitivity():
    dense, _, _ = mlp((6, 5, 3), pattern="gemm_t", seed=3)
    current = pruned_copy(dense, seed=1)
    layers = analyse_graph(current).layers
    x = data(100, d=6)["x"]
    new, reports = refit(dense, current, layers[:1], Dataset({"x": x}), "a1", g_weighted=True, batch_size=40)
    params = [(weights_of(current)[f"W{l}"], weights_of(current)[f"b{l}"]) for l in range(2)]
    _, dense_trace = mlp((6, 5, 3), pattern="gemm_t", seed=3)[2](x)

    def forward(xx, weights=None):
        z, trace = np.asarray(xx, np.float64), []
        for li, (wt, b) in enumerate(weights or params):
            a = z @ wt.T + b
            trace.append((z, a))
            z = np.tanh(a) if li == 0 else a
        return z, trace

    (_, jac), _ = fd_jacobians(forward, params, x)
    g = (jac**2).sum(1)  # G of the current (pruned) network at layer 0
    w0 = weights_of(new)["W0"]
    mask = params[0][0] != 0
    for i in range(5):
        cols = np.flatnonzero(mask[i])
        expected = ridge(x[:, cols].astype(np.float64), dense_trace[0][1][:, i], reports[0].damping, g[:, i])
        np.testing.assert_allclose(w0[i, cols], expected[:-1], rtol=1e-3, atol=1e-4)
    assert reports[0].weighted


def test_ecp_refit_keeps_exact_sparsity_and_beats_one_shot_ecp():
    dense, _, _ = mlp((8, 16, 16, 4), pattern="gemm_t", seed=5)
    arrays = data(400, d=8, classes=4)
    test = data(300, d=8, seed=9, classes=4)
    reference = runtime.make_session(dense).run(None, {"x": test["x"]})[0]
    errors = {}
    for method in ("ecp", "ecp-refit"):
        result = onnxprune.prune(dense, arrays, 0.8, method=method, steps=4 if method == "ecp-refit" else None)
        onnx.checker.check_model(result.model, full_check=True)
        zeros = sum(int((numpy_helper.to_array(t) == 0).sum()) for t in result.model.graph.initializer if t.name.startswith("W"))
        assert result.pruned == zeros == round(0.8 * (8 * 16 + 16 * 16 + 16 * 4))
        out = runtime.make_session(result.model).run(None, {"x": test["x"]})[0]
        errors[method] = float(np.mean((out - reference) ** 2))
    assert errors["ecp-refit"] < 0.5 * errors["ecp"]


def test_refit_inserts_a_bias_once_for_bias_less_layers():
    dense, _, _ = mlp((6, 5, 3), pattern="matmul", bias=False, activation="relu", seed=4)
    arrays = data(100, d=6)
    arrays["x"] += 1.0
    result = onnxprune.prune(dense, arrays, 0.6, method="ecp-refit", steps=3)
    added = len(result.model.graph.initializer) - len(dense.graph.initializer)
    assert added == 2  # one bias per layer, not one per step
    onnx.checker.check_model(result.model, full_check=True)
