"""Block-wise Gauss-Newton refit: derivatives against float64 finite differences, Levenberg-Marquardt
steps that lower the block loss with masks kept exactly, and the repair on real ONNX models."""
import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune import runtime
from onnxprune.find.layers import analyse_graph
from onnxprune.graph.index import read_initializer
from onnxprune.repair import blockrefit
from onnxprune.repair.base import Compose
from onnxprune.repair.blockrefit import Activation, BlockProblem, BlockRefit, find_blocks, gauss_newton
from onnxprune.repair.refit import Refit
from onnxprune.select.schedule import one_shot

from studies.zoo import build_mlp
from tinynets import mlp

ACTS = [Activation("PRelu", np.array([0.1, 0.3, -0.2, 0.5])), Activation("Tanh"), Activation("Sigmoid"),
        Activation("LeakyRelu", 0.01), Activation("Relu")]


def _problem(act, gathered=True, monkeypatch=None, seed=0):
    rng = np.random.default_rng(seed)
    x, t = rng.normal(size=(30, 6)), rng.normal(size=(30, 3))
    keep1, keep2 = rng.random((4, 6)) < 0.6, rng.random((3, 4)) < 0.7
    w1, w2 = rng.normal(size=(4, 6)) * keep1, rng.normal(size=(3, 4)) * keep2
    b1, b2 = rng.normal(size=4), rng.normal(size=3)
    if not gathered:
        monkeypatch.setattr(blockrefit, "GATHER_BYTES", 0)
    problem = BlockProblem(x, t, keep1, keep2, act)
    return problem, problem.pack(w1, b1, w2, b2), (x, t, keep1, keep2)


def _numpy_loss(theta, problem, x, t, act):
    w1, b1, w2, b2 = problem.unpack(theta)
    return float(((act(x @ w1.T + b1) @ w2.T + b2 - t) ** 2).sum())


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.op)
@pytest.mark.parametrize("gathered", [True, False])
def test_block_derivatives_match_float64_finite_differences(act, gathered, monkeypatch):
    problem, theta, (x, t, _, _) = _problem(act, gathered, monkeypatch)
    r = problem.linearise(theta)
    grad = 2 * problem.vjp(r)                       # d/dtheta of sum r^2
    eps, fd = 1e-6, np.zeros_like(theta)
    for i in range(len(theta)):
        e = np.zeros_like(theta)
        e[i] = eps
        fd[i] = (_numpy_loss(theta + e, problem, x, t, act) - _numpy_loss(theta - e, problem, x, t, act)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-5)
    # J column by column from jvp: against finite differences of the residuals, and its diag J'J
    columns = np.stack([problem.jvp(np.eye(len(theta))[i]).ravel() for i in range(len(theta))], axis=1)
    for i in range(0, len(theta), 3):
        e = np.zeros_like(theta)
        e[i] = eps
        np.testing.assert_allclose(columns[:, i], ((problem.residuals(theta + e) - problem.residuals(theta - e)) /
                                                   (2 * eps)).ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(problem.diagonal(), (columns ** 2).sum(0), rtol=1e-10)
    np.testing.assert_allclose(problem.vjp(r), columns.T @ r.ravel(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", ACTS[:2], ids=lambda a: a.op)
def test_gauss_newton_lowers_the_block_loss_and_keeps_the_masks(act):
    problem, theta, (x, t, keep1, keep2) = _problem(act, seed=3)
    start = problem.loss(theta)
    new, losses = gauss_newton(problem, theta, steps=5, cg_iterations=40)
    assert losses[0] < start and all(b <= a for a, b in zip(losses, losses[1:]))
    assert problem.loss(new) == pytest.approx(losses[-1])
    w1, b1, w2, b2 = problem.unpack(new)
    assert not w1[~keep1].any() and not w2[~keep2].any()
    # targets the block reaches with these masks (a teacher with the same masks): GN finds a zero loss
    rng = np.random.default_rng(4)
    w1_, b1_, w2_, b2_ = problem.unpack(theta + 0.3 * rng.normal(size=theta.shape))
    teacher = act(x @ w1_.T + b1_) @ w2_.T + b2_
    reachable = BlockProblem(x, teacher, keep1, keep2, act)
    _, losses = gauss_newton(reachable, theta, steps=12, cg_iterations=200)
    assert losses[-1] < 1e-6 * reachable.loss(theta)


def test_repair_on_an_mlp_lowers_the_held_out_block_error_and_keeps_the_mask():
    dense = build_mlp((12, 10), seed=0, inputs=20, classes=4)
    rng = np.random.default_rng(0)
    calib = {"x": rng.normal(size=(300, 20)).astype(np.float32)}
    base = onnxprune.Pruner("ecp", schedule=one_shot, repair=Refit()).fit(dense, calib).prune(0.7)
    block = onnxprune.Pruner("ecp", schedule=one_shot, repair=Compose((Refit(), BlockRefit()))).fit(dense, calib).prune(0.7)
    layers = analyse_graph(block.model).layers
    for before, after in zip(analyse_graph(base.model).layers, layers):
        zero_before = before.to_rows(read_initializer(base.model, before.weight)) == 0
        zero_after = after.to_rows(read_initializer(block.model, after.weight)) == 0
        np.testing.assert_array_equal(zero_before, zero_after)   # the mask, exactly
    reports = [r for r in block.refits if "+" in r.layer]
    assert [r.layer for r in reports] == ["fc1+fc2", "fc2+fc3"]
    assert all(r.skipped is None and r.heldout_error_after < r.heldout_error_before for r in reports)
    onnx.checker.check_model(block.model)
    # the written model computes what the numpy block computed: its logits error against the dense
    # model on the held-out fifth is the one reported
    held = calib["x"][np.arange(300) % 5 == 0]
    (dense_y,) = runtime.run_tensors(dense, {"x": held}, ["logits"])
    (got,) = runtime.run_tensors(block.model, {"x": held}, ["logits"])
    error = float(((got.astype(np.float64) - dense_y) ** 2).sum(1).mean())
    assert error == pytest.approx(reports[-1].heldout_error_after, rel=1e-3)


def test_blocks_refuse_an_activation_without_a_numpy_form():
    dense, _, _ = mlp((5, 4, 3), seed=1)
    for node in dense.graph.node:
        if node.op_type == "Tanh":
            node.op_type = "Softplus"
    blocks, skipped = find_blocks(dense, analyse_graph(dense).layers)
    assert not blocks and all("Softplus" in s.skipped for s in skipped)
    tanh, _, _ = mlp((5, 4, 3), seed=1)
    assert [(b.first.name, b.second.name, b.activation.op) for b in find_blocks(tanh, analyse_graph(tanh).layers)[0]] \
        == [("fc0", "fc1", "Tanh")]
