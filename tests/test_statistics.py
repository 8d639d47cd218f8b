"""ECP statistics from onnxruntime-training against central finite differences in numpy."""
import numpy as np
import pytest

from onnxprune.check.validate import per_sample
from onnxprune.derivatives.statistics import collect_loss_gradients, collect_statistics
from onnxprune.find.layers import analyse_graph
from onnxprune.find.outputs import protected_output
from onnxprune.io.data import Dataset

from engines import AVAILABLE
from tinynets import data, mlp


def fd_jacobians(forward, params, x, eps=1e-5):
    """Per-sample d logits / d a_l by central differences on the pre-activation, in float64."""
    n_layers = len(params)
    out = []
    for l in range(n_layers):
        _, trace = forward(x)
        a = trace[l][1]

        def tail(a_l, l=l):
            z = np.tanh(a_l) if l < n_layers - 1 else a_l
            for w, b in params[l + 1:]:
                a_next = z @ np.asarray(w, np.float64).T + b
                z = np.tanh(a_next) if (w is not params[-1][0]) else a_next
            return z

        jac = np.zeros((len(x), params[-1][0].shape[0], a.shape[1]))
        for i in range(a.shape[1]):
            up, down = a.copy(), a.copy()
            up[:, i] += eps
            down[:, i] -= eps
            jac[:, :, i] = (tail(up) - tail(down)) / (2 * eps)
        out.append((trace[l][0], jac))
    return out


@pytest.mark.parametrize("pattern", ["gemm_t", "gemm", "matmul", "matmul_left"])
def test_statistics_match_finite_differences(pattern):
    model, params, forward = mlp((5, 4, 4, 3), pattern=pattern)
    arrays = data(37)
    layers = analyse_graph(model).layers
    assert len(layers) == 3
    stats = collect_statistics(model, layers, Dataset({"x": arrays["x"]}), protected_output(model), batch_size=8)
    for layer, (z, jac) in zip(layers, fd_jacobians(forward, params, arrays["x"])):
        g = (jac**2).sum(1)                        # G_i per sample: sum over outputs k
        s = stats[layer.name]
        assert s.n == 37
        np.testing.assert_allclose(s.C, g.mean(0), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(s.B, g.T @ z / 37, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(s.A, g.T @ z**2 / 37, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(s.mean_z, z.mean(0), rtol=1e-5, atol=1e-6)


def test_random_probes_estimate_g_and_are_exact_where_the_jacobian_is_the_identity():
    model, params, forward = mlp((5, 4, 3))
    arrays = data(200)
    layers = analyse_graph(model).layers
    exact = collect_statistics(model, layers, Dataset({"x": arrays["x"]}), "a1")
    probed = collect_statistics(model, layers, Dataset({"x": arrays["x"]}), "a1", probes=64, seed=3)
    # Rademacher probes: E[(v.J)^2] = sum_k J_k^2; 64 probes x 200 samples give a close estimate
    np.testing.assert_allclose(probed["fc0"].C, exact["fc0"].C, rtol=0.1)
    # the last layer's Jacobian is the identity, so G_i = 1; a Rademacher probe gives v_i^2 = 1 exactly
    np.testing.assert_allclose(exact["fc1"].C, 1.0, rtol=1e-6)
    np.testing.assert_allclose(probed["fc1"].C, 1.0, rtol=1e-6)


def test_softmax_model_protects_logits_and_statistics_ignore_the_softmax():
    plain, _, _ = mlp((5, 4, 3))
    soft, _, _ = mlp((5, 4, 3), softmax=True)
    assert protected_output(soft) == "a1"
    x = Dataset({"x": data(20)["x"]})
    a = collect_statistics(plain, analyse_graph(plain).layers, x, protected_output(plain))
    b = collect_statistics(soft, analyse_graph(soft).layers, x, protected_output(soft))
    np.testing.assert_allclose(a["fc0"].A, b["fc0"].A)


def test_loss_gradients_match_finite_differences_of_the_cross_entropy():
    model, params, forward = mlp((5, 4, 3), pattern="gemm")
    arrays = data(30)
    layers = analyse_graph(model).layers
    got = collect_loss_gradients(model, layers, Dataset({"x": arrays["x"]}, arrays["y"]), "a1", batch_size=7)

    def loss(weights):
        logits, _ = forward(arrays["x"], weights)
        logits = logits - logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -logp[np.arange(30), arrays["y"]].mean()

    w0 = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in params]
    eps = 1e-6
    for l, layer in enumerate(layers):
        num = np.zeros_like(w0[l][0])
        for idx in np.ndindex(num.shape):
            up = [(w.copy(), b) for w, b in w0]
            down = [(w.copy(), b) for w, b in w0]
            up[l][0][idx] += eps
            down[l][0][idx] -= eps
            num[idx] = (loss(up) - loss(down)) / (2 * eps)
        np.testing.assert_allclose(got[layer.name], num, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("engine", AVAILABLE)
@pytest.mark.parametrize("shared", ["exact", "positions"])
def test_a_folded_gemms_statistics_equal_those_of_the_same_weights_as_a_rank3_matmul(engine, shared):
    """GPT-2's Conv1D exports fold (batch, sequence) into a Gemm's rows: once the rows are grouped by
    sample, its sums are those of the rank-3 MatMul + Add of the same weights (checked against finite
    differences in test_conv), with the cross-position terms (``exact``) or without (``positions``)."""
    from tinylm import tokens, two_layers

    x = Dataset({"x": tokens(23)})
    sums = {}
    for folded in (True, False):
        model = two_layers(folded=folded)
        layers = analyse_graph(model).layers
        assert [layer.kind for layer in layers] == (["folded"] * 2 if folded else ["sequence"] * 2)
        kept, skipped = per_sample(model, layers, x)
        assert kept == layers and not skipped
        sums[folded] = collect_statistics(model, layers, x, "logits", shared=shared, batch_size=5, engine=engine)
    for name in ("l1", "l2"):
        got, want = sums[True][name], sums[False][name]
        assert got.n == want.n == 23
        for field in ("A", "B", "C", "mean_z", "var_z"):
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-5,
                                       atol=1e-6 * np.abs(getattr(want, field)).max(), err_msg=f"{name}.{field}")


def test_the_moments_alone_are_numpys_over_samples_and_positions():
    """The mean-compensation scorer's moments from forward passes only: E[z_j], Var z_j over every
    sample and position (im2col patches for a Conv, token rows for a folded or rank-3 layer)."""
    from onnxprune import runtime
    from onnxprune.derivatives.statistics import collect_moments, layer_patches

    from tinyconv import cnn, images
    from tinylm import tokens, two_layers

    for model, x in ((two_layers(folded=True), tokens(11)), (two_layers(folded=False), tokens(11)), (cnn(), images(9)["x"]),
                     (mlp((5, 4, 3))[0], data(13)["x"])):
        layers = analyse_graph(model).layers
        got = collect_moments(model, layers, Dataset({"x": x}), batch_size=4)
        for layer in layers:
            (z,) = runtime.run_tensors(model, {"x": x}, [layer.input]) if layer.input != "x" else (x,)
            z = np.asarray(z, np.float64)
            if layer.op == "Conv":
                rows = layer_patches(layer, z)[:, 0].transpose(0, 2, 1).reshape(-1, layer.in_features)
            else:
                rows = z.reshape(-1, layer.in_features)
            np.testing.assert_allclose(got[layer.name].mean_z, rows.mean(0), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(got[layer.name].var_z, rows.var(0), rtol=1e-6, atol=1e-9)


def test_a_convs_sum_over_positions_is_kept_and_equals_sum_g_without_cross_terms():
    """sum_g_positions (the scale ECP tells reached rows by) of a Conv: without the cross-position
    terms it is sum_g itself, with them it is the same sum of squares G_t over positions."""
    from tinyconv import cnn, images

    model, x = cnn(), images(9)["x"]
    layers = analyse_graph(model).layers
    positions = collect_statistics(model, layers, Dataset({"x": x}), "logits", shared="positions", batch_size=4)
    exact = collect_statistics(model, layers, Dataset({"x": x}), "logits", shared="exact", batch_size=4)
    for layer in layers:
        if layer.op != "Conv":
            continue
        assert positions[layer.name].sum_g_positions.min() > 0
        np.testing.assert_allclose(positions[layer.name].sum_g_positions, positions[layer.name].sum_g, rtol=1e-6)
        np.testing.assert_allclose(exact[layer.name].sum_g_positions, positions[layer.name].sum_g, rtol=1e-6)
