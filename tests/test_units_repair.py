"""The units strategy's repair and selection: the refit of a shrunk layer against numpy least squares
on the dense rows it kept, a fixed point (a second refit changes nothing, a BatchNormalization-held
bias and a bias that carries folded constants alike), and units chosen by ECP beating random units
on the output error."""
from copy import deepcopy as copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import runtime
from onnxprune.edit.slicing import drop_border, remove_units
from onnxprune.find.layers import analyse_graph
from onnxprune.find.units import find_units
from onnxprune.graph.index import read_initializer
from onnxprune.io.data import Dataset
from onnxprune.repair.lstsq import HOLDOUT_EVERY
from onnxprune.repair.refit import Refit

from tinynets import mlp

RNG = np.random.default_rng(5)


def _tanh_mlp():
    model, params, _ = mlp((5, 6, 4, 3), activation="tanh", seed=2)
    return model, [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in params]


def _refit(dense, current, names, data, output, damping=None, rows=None):
    """One run of the refit (the units strategy's: every weight free) over layers ``names``, their
    padded borders' corrections dropped first as the strategy does (the fit is of the layer as it is)."""
    layers = analyse_graph(dense).by_name()
    run = Refit(damping=damping).start(dense, [layers[n] for n in names], data, output, batch_size=25, masked=False)
    current = copy(current)
    for name in names:
        drop_border(current, analyse_graph(current).by_name()[name])
    now = analyse_graph(current).by_name()
    return run(current, [now[n] for n in names], final=True, rows=rows)


def _rows_and_bias(model, name):
    layer = analyse_graph(model).by_name()[name]
    bias = read_initializer(model, layer.bias) if layer.bias else None
    return layer.to_rows(read_initializer(model, layer.weight)), bias


def test_the_refit_of_a_layer_reading_removed_units_is_numpy_least_squares():
    model, ((w0, b0), (w1, b1), _) = _tanh_mlp()
    x = RNG.normal(size=(60, 5)).astype(np.float32)
    shrunk = remove_units(model, {"fc0": np.array([0, 4])}, None)
    refit, (report,) = _refit(model, shrunk, ["fc1"], Dataset({"x": x}), "a2")
    z = np.tanh(x.astype(np.float64) @ w0.T + b0)
    fit = np.arange(len(x)) % HOLDOUT_EVERY != 0  # the held-out fifth chooses the damping only
    keep = [1, 2, 3, 5]
    xs, t = z[fit][:, keep], z[fit] @ w1.T + b1
    centred = xs - xs.mean(0)  # the bias is undamped: the damping scales the centred Gram's diagonal
    lam = report.damping * np.mean(np.diag(centred.T @ centred))
    design = np.vstack([np.hstack([xs, np.ones((len(xs), 1))]), np.hstack([np.sqrt(lam) * np.eye(4), np.zeros((4, 1))])])
    theta = np.linalg.lstsq(design, np.vstack([t, np.zeros((4, t.shape[1]))]), rcond=None)[0]
    rows, bias = _rows_and_bias(refit, "fc1")
    np.testing.assert_allclose(rows, theta[:4].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bias, theta[4], rtol=1e-4, atol=1e-5)
    assert report.heldout_error_after <= report.heldout_error_before


def _bn_cnn(seed=0, pads=1):
    """conv0 -> Relu -> conv1 (3x3, padded, no bias) -> BatchNormalization (it holds conv1's bias) -> Relu
    -> GlobalAveragePool -> Flatten -> fc: removing conv0's channels folds their constants into conv1's
    bias, which is BN's, and into conv1's border map; conv1 is refit, its bias read where it lives."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (6, 2, 3, 3)).astype(np.float32), "W0"),
             numpy_helper.from_array(rng.normal(0, 0.3, 6).astype(np.float32), "B0"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 6, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "bn_scale"),
             numpy_helper.from_array(rng.normal(0, 0.5, 4).astype(np.float32), "bn_bias"),
             numpy_helper.from_array(rng.normal(0, 0.2, 4).astype(np.float32), "bn_mean"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "bn_var"),
             numpy_helper.from_array(rng.normal(0, 0.5, (3, 4)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.normal(0, 0.5, 3).astype(np.float32), "B2")]
    nodes = [helper.make_node("Conv", ["x", "W0", "B0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "W1"], ["c1"], name="conv1", pads=[pads] * 4),
             helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W2", "B2"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "bn_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("build, removed, refit_layers, output, shape", [
    (lambda: _tanh_mlp()[0], {"fc0": np.array([0, 4])}, ["fc1"], "a2", (5,)),
    (_bn_cnn, {"conv0": np.array([1, 3])}, ["conv1"], "y", (2, 6, 6)),
    (lambda: _bn_cnn(pads=0), {"conv0": np.array([1, 3])}, ["conv1"], "y", (2, 6, 6))])
def test_a_second_refit_changes_nothing(build, removed, refit_layers, output, shape):
    """The refit is a fixed point: refitting its own result again (same damping) gives the same
    weights and bias, wherever the bias is held (a BatchNormalization after the conv, or the bias a fold
    of removed units' constants moved)."""
    dense = build()
    data = Dataset({"x": RNG.normal(size=(40, *shape)).astype(np.float32)})
    groups = {g.name: g for g in find_units(dense).groups}
    constants = {name: np.full(groups[name].units, 0.3) for name in removed}  # a fold moves the consumers' biases
    shrunk = remove_units(dense, removed, constants)
    once, reports = _refit(dense, shrunk, refit_layers, data, output)
    damping = reports[0].damping
    twice, _ = _refit(dense, once, refit_layers, data, output, damping=damping)
    thrice, _ = _refit(dense, twice, refit_layers, data, output, damping=damping)
    for name in refit_layers:
        for a, b in zip(_rows_and_bias(twice, name), _rows_and_bias(thrice, name)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    x = data.subset(40).arrays()
    y0, y1, y2, y3 = (runtime.make_session(m).run([output], x)[0] for m in (dense, shrunk, twice, thrice))
    np.testing.assert_allclose(y2, y3, rtol=1e-5, atol=1e-5)
    assert ((y2 - y0) ** 2).mean() < ((y1 - y0) ** 2).mean()  # and the refit brought the output back


def test_ecp_chooses_units_that_cost_less_than_random_units():
    """At the same number of units removed (one shot, no refit, per layer), the ECP model's output is
    closer to the dense model's than the models of random unit choices (five seeds), on held-out data."""
    model, _ = _tanh_mlp()
    rng = np.random.default_rng(0)
    calib, held = rng.normal(size=(200, 5)).astype(np.float32), rng.normal(size=(200, 5)).astype(np.float32)
    dense = runtime.make_session(model).run(["a2"], {"x": held})[0]

    def error(method, seed=0):
        result = onnxprune.prune_structured(model, {"x": calib}, sparsity=0.5, method=method, steps=1, refit=False,
                                            scope="layer", seed=seed)
        y = runtime.make_session(result.model).run(["a2"], {"x": held})[0]
        return float(((y - dense) ** 2).mean())

    ecp = error("ecp")
    randoms = [error("random", seed) for seed in range(5)]
    assert ecp < min(randoms), (ecp, randoms)


def test_the_default_keeps_conv_channels_on_the_providers_fast_path():
    """A CNN of 32 channels pruned by 30% would keep 22 (off onnxruntime's blocked Conv path, 1.4x slower
    per channel on this project's machines): by default every Conv group of more than one block keeps a
    multiple of the block the provider runs fast (measured: 8 or 16), and --multiple 1 asks for the
    plain count."""
    from onnxprune.select.fastpath import conv_channel_block

    model = _bn_cnn()
    for t in model.graph.initializer:  # 32 channels
        if t.name in ("W0", "B0"):
            t.CopyFrom(numpy_helper.from_array(np.resize(numpy_helper.to_array(t), (32, *t.dims[1:])), t.name))
        if t.name == "W1":
            t.CopyFrom(numpy_helper.from_array(np.resize(numpy_helper.to_array(t), (4, 32, 3, 3)), t.name))
    x = RNG.normal(size=(24, 2, 6, 6)).astype(np.float32)
    block = conv_channel_block("cpu")
    result = onnxprune.prune_structured(model, {"x": x}, sparsity=0.3, steps=1, scope="layer")
    assert result.summary["multiples"]["conv0"] == block
    assert result.summary["groups"]["conv0"]["units_after"] % block == 0
    plain = onnxprune.prune_structured(model, {"x": x}, sparsity=0.3, steps=1, scope="layer", multiple=1)
    assert plain.summary["groups"]["conv0"]["units_after"] == 22
