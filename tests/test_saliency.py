"""Each scorer against an independent numpy computation of what it claims to measure."""
import numpy as np
import pytest

import onnxprune
from onnxprune import Pruner

from test_statistics import fd_jacobians
from tinynets import data, mlp


def score(model, data, method="ecp", **params):
    fitted = Pruner(method, **params).fit(model, data)
    return fitted.model_, fitted, fitted.scores_, None


def test_ecp_is_the_minimum_over_the_bias_shift_of_the_linearised_output_error():
    model, params, forward = mlp((5, 4, 4, 3), pattern="gemm_t")
    arrays = data(40)
    _, found, sal, _ = score(model, {"x": arrays["x"]}, method="ecp")
    for l, (layer, (z, jac)) in enumerate(zip(found.layers_, fd_jacobians(forward, params, arrays["x"]))):
        w = params[l][0].astype(np.float64)
        for i in range(layer.out_features):
            for j in range(layer.in_features):
                # dy_k(s) = J_ki(s) (W_ij z_j(s) - db): a least-squares problem in db over all (s, k)
                design = jac[:, :, i].reshape(-1, 1)
                target = (jac[:, :, i] * (w[i, j] * z[:, j])[:, None]).reshape(-1)
                db, *_ = np.linalg.lstsq(design, target, rcond=None)
                err = np.mean(((design[:, 0] * db[0] - target) ** 2).reshape(len(z), -1).sum(1))
                assert sal[layer.name].scores[i, j] == pytest.approx(err, rel=2e-4, abs=1e-9)
                assert sal[layer.name].shifts[i, j] == pytest.approx(db[0], rel=2e-4, abs=1e-7)


def test_ecp_prediction_is_exact_for_one_weight_of_the_last_layer():
    """The output is linear in the last layer, so the measured error equals I_ij after compensation."""
    model, params, forward = mlp((5, 4, 3), pattern="matmul")
    x = data(50)["x"]
    work, found, sal, _ = score(model, {"x": x}, method="ecp")
    last = found.layers_[-1]
    i, j = 1, 2
    w = [(wt.astype(np.float64).copy(), b.astype(np.float64).copy()) for wt, b in params]
    w[-1][1][i] += sal[last.name].shifts[i, j]
    w[-1][0][i, j] = 0
    dense, _ = forward(x)
    pruned, _ = forward(x, w)
    measured = np.mean(((pruned - dense) ** 2).sum(1))
    assert sal[last.name].scores[i, j] == pytest.approx(measured, rel=1e-4)
    # and without compensation the error is larger (unless E[z_j] = 0)
    w[-1][1][i] -= sal[last.name].shifts[i, j]
    uncompensated = np.mean(((forward(x, w)[0] - dense) ** 2).sum(1))
    assert uncompensated > measured


def test_nonlinear_matches_a_numpy_brute_force():
    model, params, forward = mlp((4, 3, 2), pattern="gemm")
    x = data(30, d=4)["x"]
    _, found, sal, _ = score(model, {"x": x}, method="nonlinear")
    dense, trace = forward(x)
    for l, layer in enumerate(found.layers_):
        z = trace[l][0]
        for i in range(layer.out_features):
            for j in range(layer.in_features):
                w = [(wt.astype(np.float64).copy(), b.astype(np.float64).copy()) for wt, b in params]
                w[l][1][i] += w[l][0][i, j] * z[:, j].mean()
                w[l][0][i, j] = 0
                expected = np.mean(((forward(x, w)[0] - dense) ** 2).sum(1))
                assert sal[layer.name].scores[i, j] == pytest.approx(expected, rel=1e-3, abs=1e-9)


def test_variance_is_ecp_with_unit_sensitivity_on_the_last_layer():
    model, _, _ = mlp((5, 4, 3))
    x = {"x": data(40)["x"]}
    _, found, ecp, _ = score(model, x, method="ecp")
    _, _, var, _ = score(model, x, method="variance")
    last = found.layers_[-1].name
    np.testing.assert_allclose(ecp[last].scores, var[last].scores, rtol=1e-4)
    np.testing.assert_allclose(ecp[last].shifts, var[last].shifts, rtol=1e-4)


def test_magnitude_random_and_gradmag():
    model, params, _ = mlp((5, 4, 3), pattern="gemm", alpha=2.0, beta=0.5)
    arrays = data(40)
    _, found, mag, _ = score(model, {"x": arrays["x"]}, method="magnitude")
    np.testing.assert_allclose(mag["fc0"].scores, np.abs(params[0][0]), rtol=1e-6)  # effective weight
    _, _, r1, _ = score(model, {"x": arrays["x"]}, method="random", seed=4)
    _, _, r2, _ = score(model, {"x": arrays["x"]}, method="random", seed=4)
    np.testing.assert_array_equal(r1["fc0"].scores, r2["fc0"].scores)
    with pytest.raises(onnxprune.InputError, match="labels"):
        score(model, {"x": arrays["x"]}, method="gradmag")
    _, _, gm, _ = score(model, arrays, method="gradmag")
    assert gm["fc0"].scores.shape == (4, 5) and np.all(gm["fc0"].scores >= 0)


def test_nonlinear_refuses_big_models_unless_forced(monkeypatch):
    from onnxprune.score.weights import Nonlinear

    monkeypatch.setattr(Nonlinear, "max_weights", 10)
    model, _, _ = mlp((5, 4, 3))
    with pytest.raises(onnxprune.InputError, match="--force"):
        score(model, {"x": data(10)["x"]}, method="nonlinear")
    score(model, {"x": data(10)["x"]}, method="nonlinear", force=True)
