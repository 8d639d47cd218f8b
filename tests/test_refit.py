"""The chained least-squares refit against numpy solutions of the same ridge problems."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune import runtime
from onnxprune.find.layers import analyse_graph
from onnxprune.io.data import Dataset
from onnxprune.repair.refit import refit

from test_statistics import fd_jacobians
from tinynets import data, mlp


def weights_of(model):
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    return inits


def ridge(x, cols, t, delta, w=None, per_sample=1):
    """min sum_s w_s (t_s - x_s[cols].theta - b)^2 + lambda |theta|^2 over the kept columns, with
    lambda = delta * mean diag(x' W x) over all of the layer's inputs x, on the refit's fit samples
    (every fifth sample is held out; ``per_sample`` rows of x per sample)."""
    fit = np.repeat(np.arange(len(x) // per_sample) % 5 != 0, per_sample)
    w = np.ones(len(x)) if w is None else w
    x, t, w = x[fit], t[fit], w[fit]
    xb = np.hstack([x[:, cols], np.ones((len(x), 1))])
    gram = (xb * w[:, None]).T @ xb
    reg = np.zeros(len(gram))
    reg[:-1] = delta * np.mean(w @ x**2)
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
            expected = ridge(z, cols, target[:, i], reports[l].damping)
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
        expected = ridge(x.astype(np.float64), cols, dense_trace[0][1][:, i], reports[0].damping, g[:, i])
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
        assert result.pruned == round(0.8 * (8 * 16 + 16 * 16 + 16 * 4))
        # the refit may zero a survivor whose input is constant (a fully pruned neuron upstream):
        # its signal is absorbed exactly by the bias
        assert zeros >= result.pruned
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


def patches_2d(x, k=3, pad=1):
    """Independent im2col for a stride-1 2-D convolution: (n * positions, channels * k * k)."""
    n, c, h, w = x.shape
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    oh, ow = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    rows = [xp[:, :, i:i + k, j:j + k].reshape(n, -1) for i in range(oh) for j in range(ow)]
    return np.stack(rows, axis=1).reshape(n * oh * ow, -1)


@pytest.mark.parametrize("variant", [dict(bias="input"), dict(bias="add"), dict(bias="none"),
                                     dict(bias="input", batchnorm=True), dict(bias="input", groups=2, channels=4)])
def test_conv_refit_fits_patches_and_writes_back_through_bias_add_and_batchnorm(variant):
    from tinyconv import cnn, images

    channels = variant.pop("channels", 2)
    dense = cnn(channels=channels, **variant)
    current = onnx.ModelProto()
    current.CopyFrom(dense)
    w = next(t for t in current.graph.initializer if t.name == "conv1.weight")
    a = numpy_helper.to_array(w).copy()
    a[np.random.default_rng(0).random(a.shape) < 0.5] = 0
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    x = images(40, channels=channels)["x"]
    layers = [l for l in analyse_graph(current).layers if l.name == "conv1"]
    new, reports = refit(dense, current, layers, Dataset({"x": x}), "logits", batch_size=16)
    layer = analyse_graph(new).by_name()["conv1"]
    target = runtime.run_tensors(dense, {"x": x}, [layer.preact])[0]          # (n, out, h, w)
    got = runtime.run_tensors(new, {"x": x}, [layer.preact])[0]
    groups = variant.get("groups", 1)
    per_in, per_out = channels // groups, layer.out_features // groups
    mask = a.reshape(layer.out_features, -1) != 0
    for i in range(layer.out_features):
        g = i // per_out
        p = patches_2d(x[:, g * per_in:(g + 1) * per_in])
        t = target[:, i].reshape(-1)
        cols = np.flatnonzero(mask[i])
        theta = ridge(p, cols, t, reports[0].damping, per_sample=36)
        np.testing.assert_allclose(got[:, i].reshape(-1), p[:, cols] @ theta[:-1] + theta[-1], rtol=1e-3, atol=1e-4)
    assert np.all(numpy_helper.to_array(next(t for t in new.graph.initializer if t.name == "conv1.weight"))[a == 0] == 0)


def test_sequence_matmul_refit_counts_positions_as_samples():
    from tinyconv import sequence_mlp

    dense = sequence_mlp()
    current = pruned_copy(dense)  # no "W*" names here: prune l1 by hand
    w = next(t for t in current.graph.initializer if t.name == "l1.weight")
    a = numpy_helper.to_array(w).copy()
    a[np.random.default_rng(1).random(a.shape) < 0.5] = 0
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    x = np.random.default_rng(2).normal(size=(30, 4, 5)).astype(np.float32)
    layers = [l for l in analyse_graph(current).layers if l.name == "l1"]
    new, reports = refit(dense, current, layers, Dataset({"x": x}), "logits", batch_size=7)
    target = runtime.run_tensors(dense, {"x": x}, ["a1"])[0].reshape(-1, 6)
    got = runtime.run_tensors(new, {"x": x}, ["a1"])[0].reshape(-1, 6)
    z = x.reshape(-1, 5).astype(np.float64)
    for i in range(6):
        cols = np.flatnonzero(a[:, i])
        theta = ridge(z, cols, target[:, i], reports[0].damping, per_sample=4)
        np.testing.assert_allclose(got[:, i], z[:, cols] @ theta[:-1] + theta[-1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["conv", "sequence"])
def test_ecp_refit_runs_on_shared_weight_layers_and_improves_on_ecp(kind):
    from tinyconv import cnn, images, sequence_mlp

    if kind == "conv":
        dense, arrays = cnn(batchnorm=True), images(60)
    else:
        rng = np.random.default_rng(3)
        dense, arrays = sequence_mlp(), {"x": rng.normal(size=(60, 4, 5)).astype(np.float32)}
    reference = runtime.make_session(dense).run(None, {"x": arrays["x"]})[0]
    errors = {}
    for method in ("ecp", "ecp-refit"):
        result = onnxprune.prune(dense, {"x": arrays["x"]}, 0.6, method=method, steps=2 if method != "ecp" else None)
        onnx.checker.check_model(result.model, full_check=True)
        assert all(r.skipped is None for r in result.refits if r.damping is not None)
        out = runtime.make_session(result.model).run(None, {"x": arrays["x"]})[0]
        errors[method] = float(np.mean((out - reference) ** 2))
    assert errors["ecp-refit"] < errors["ecp"]


def _conv_pruned(model, fraction=0.5, seed=0):
    """``model`` with the same random half of conv1's weights zeroed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    w = next(t for t in m.graph.initializer if t.name == "conv1.weight")
    a = numpy_helper.to_array(w).copy()
    a[np.random.default_rng(seed).random(a.shape) < fraction] = 0
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    return m


def _folded(model):
    """The same function with the BatchNormalization folded into conv1's weight and bias."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    factor = inits["bn.scale"] / np.sqrt(inits["bn.var"] + 1e-5)
    weight = inits["conv1.weight"] * factor[:, None, None, None]
    bias = inits["bn.bias"] - inits["bn.mean"] * factor
    keep = [t for t in m.graph.initializer if not t.name.startswith("bn.") and t.name != "conv1.weight"]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep + [numpy_helper.from_array(weight.astype(np.float32), "conv1.weight"),
                                       numpy_helper.from_array(bias.astype(np.float32), "conv1.bias")])
    nodes = [n for n in m.graph.node if n.op_type != "BatchNormalization"]
    conv = next(n for n in nodes if n.name == "conv1")
    conv.input.append("conv1.bias")
    conv.output[0] = "bn"
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def test_refit_of_a_refit_model_changes_nothing_when_a_batchnorm_holds_the_bias():
    from tinyconv import cnn, images

    dense = cnn(bias="none", batchnorm=True)
    x = images(40)["x"]
    data_ = Dataset({"x": x})
    once, _ = refit(dense, _conv_pruned(dense), analyse_graph(_conv_pruned(dense)).layers, data_, "logits", batch_size=16)
    twice, _ = refit(dense, once, analyse_graph(once).layers, data_, "logits", batch_size=16)
    y1, y2 = (runtime.make_session(m).run(None, {"x": x})[0] for m in (once, twice))
    np.testing.assert_allclose(y2, y1, atol=1e-5)
    for a, b in zip(once.graph.initializer, twice.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(b), numpy_helper.to_array(a), atol=1e-5, err_msg=a.name)


def test_conv_with_batchnorm_and_its_folded_form_refit_to_the_same_function():
    from tinyconv import cnn, images

    dense = cnn(bias="none", batchnorm=True)
    folded = _folded(dense)
    x = images(40)["x"]
    np.testing.assert_allclose(*(runtime.make_session(m).run(None, {"x": x})[0] for m in (dense, folded)), atol=1e-5)
    outputs = []
    for model in (dense, folded):
        current = _conv_pruned(model)
        for _ in range(2):  # a second refit must not count the bias again
            current, _ = refit(model, current, analyse_graph(current).layers, Dataset({"x": x}), "logits",
                               damping=1e-3, batch_size=16)
        outputs.append(runtime.make_session(current).run(None, {"x": x})[0])
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4)


def test_excluded_layers_stay_byte_identical_through_ecp_refit():
    dense, _, _ = mlp((8, 16, 16, 4), pattern="gemm_t", seed=5)
    result = onnxprune.prune(dense, data(200, d=8, classes=4), 0.7, method="ecp-refit", steps=3, exclude=["fc1"])
    before = {t.name: t.raw_data or numpy_helper.to_array(t).tobytes() for t in dense.graph.initializer}
    after = {t.name: t.raw_data or numpy_helper.to_array(t).tobytes() for t in result.model.graph.initializer}
    assert after["W1"] == before["W1"] and after["b1"] == before["b1"]
    assert after["W0"] != before["W0"] and after["W2"] != before["W2"]
    assert result.excluded == ["fc1"] and "fc1" not in [r.layer for r in result.refits]


def test_score_sum_is_the_single_weight_errors_and_misses_the_cross_terms_numpy_gives():
    """On a linear layer y = W x + b with ECP's bias shift, removing the set P changes row i by
    -sum_{j in P_i} W_ij (x_j - E x_j): E||dy||^2 = sum_i w_P' Cov(x) w_P. score_sum is its diagonal."""
    dense, params, _ = mlp((6, 4), pattern="gemm_t", seed=7)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))).astype(np.float32)  # correlated inputs
    result = onnxprune.prune(dense, {"x": x}, 0.5, method="ecp")
    w = params[0][0].astype(np.float64)
    pruned = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "W0")) == 0
    cov = np.cov(x.astype(np.float64).T, bias=True)
    removed = np.where(pruned, w, 0.0)
    singles = float((removed**2 @ np.diag(cov)).sum())
    joint = float(np.einsum("ij,jk,ik->", removed, cov, removed))
    assert result.score_sum == pytest.approx(singles, rel=1e-5)
    y0, y1 = (runtime.make_session(m).run(None, {"x": x})[0].astype(np.float64) for m in (dense, result.model))
    assert float(((y1 - y0) ** 2).sum(1).mean()) == pytest.approx(joint, rel=1e-4)
    assert abs(joint - singles) > 0.05 * singles  # the cross terms are not negligible here


def test_refit_rows_solves_each_rows_ridge_problem_over_its_kept_inputs():
    from onnxprune.repair.lstsq import DAMPING_GRID, refit_rows, solve_rows

    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 40)) @ rng.normal(size=(40, 40)) + 2.0
    t = x @ rng.normal(size=(40, 6)) + rng.normal(size=(200, 6))
    keep = rng.random((6, 40)) < 0.9   # most inputs kept: together, from the one inverse
    keep[4, 1:] = False                 # one input: solved directly
    keep[5] = rng.random(40) < 0.5
    weights, bias, delta = refit_rows(x, t, keep, damping=1e-3)
    lam = 1e-3 * np.mean((x**2).sum(0))
    for i in range(6):
        cols = np.flatnonzero(keep[i])
        xb = np.hstack([x[:, cols], np.ones((200, 1))])
        reg = np.diag(np.append(np.full(len(cols), lam), 0.0))
        expected = np.linalg.solve(xb.T @ xb + reg, xb.T @ t[:, i])
        np.testing.assert_allclose(weights[i, cols], expected[:-1], rtol=1e-7, atol=1e-9)
        assert bias[i] == pytest.approx(expected[-1], rel=1e-7) and np.all(weights[i, ~keep[i]] == 0)
    _, _, chosen = refit_rows(x, t, keep)
    assert chosen in DAMPING_GRID
    # one row alone is solved directly; together, the rows keeping most inputs go through the inverse
    xb = np.hstack([x, np.ones((200, 1))])
    gram, cross = xb.T @ xb, xb.T @ t
    by_row = np.vstack([solve_rows(gram, cross[:, [i]], keep[[i]], 1e-3) for i in range(6)])
    np.testing.assert_allclose(solve_rows(gram, cross, keep, 1e-3), by_row, rtol=1e-7, atol=1e-9)


def test_ecp_refit_reads_its_calibration_data_from_an_npz_file(tmp_path):
    """An .npz's columns are read lazily (NpzColumn); the distillation feeds them as arrays, and the
    result is the one the same data given as arrays gives."""
    dense, _, _ = mlp((6, 8, 3), pattern="gemm_t", seed=2)
    arrays = data(120, d=6, classes=3)
    np.savez(tmp_path / "calib.npz", **arrays)
    onnx.save(dense, tmp_path / "dense.onnx")
    from_file = onnxprune.prune(str(tmp_path / "dense.onnx"), str(tmp_path / "calib.npz"), 0.6, method="ecp-refit", steps=2)
    from_arrays = onnxprune.prune(dense, arrays, 0.6, method="ecp-refit", steps=2)
    for a, b in zip(from_file.model.graph.initializer, from_arrays.model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
