"""Schedules, the dry run's single schedule run, and the distillation repair's gradients."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune import runtime
from onnxprune.errors import InputError
from onnxprune.find.layers import analyse_graph
from onnxprune.io.data import Dataset
from onnxprune.repair.distill import Distill
from onnxprune.repair.refit import Refit
from onnxprune.select.schedule import geometric, one_shot, path
from onnxprune.sweep import sensitivity

from tinynets import data, mlp


def test_geometric_keeps_the_same_fraction_of_survivors_each_step():
    steps = geometric(4)(0.9)
    assert steps[-1] == 0.9 and len(steps) == 4
    density = 1 - np.array([0.0, *steps])
    np.testing.assert_allclose(density[1:] / density[:-1], 0.1 ** 0.25)
    assert geometric(1) is one_shot and one_shot(0.3) == [0.3]
    with pytest.raises(InputError):
        geometric(0)
    assert path(geometric(2), [0.3, 0.6]) == sorted({0.3, 1 - 0.4**0.5, 0.6})


def test_dry_run_with_steps_is_one_schedule_run_through_every_ratio():
    dense, _, _ = mlp((8, 12, 4), pattern="gemm_t", seed=2)
    arrays, test = data(150, d=8, classes=4), data(100, d=8, seed=4, classes=4)
    repair = Refit(damping=1e-3)
    report = sensitivity(dense, arrays, [0.3, 0.6], evaluate=test, schedule=geometric(2), repair=repair)
    steps = path(geometric(2), [0.3, 0.6])
    for point in report.points:
        through = [s for s in steps if s <= point.ratio]
        alone = onnxprune.Pruner(schedule=lambda r, through=through: through, repair=repair).fit(dense, arrays).prune(point.ratio)
        measured = onnxprune.evaluate(alone.model, test)
        assert point.pruned == alone.pruned and point.loss == pytest.approx(measured["loss"], rel=1e-6)


def test_distillation_gradients_match_numpy_backpropagation():
    dense, params, forward = mlp((5, 4, 3), pattern="gemm_t", seed=1)
    x = data(40, d=5)["x"]
    target = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    layers = analyse_graph(dense).layers
    run = Distill().start(dense, layers, Dataset({"x": x}), "a1")
    names = ["W0", "b0", "W1", "b1"]
    session = run._session(dense, names, (3,))
    feeds = {"x": x, "onnxprune__distill_target": target, "adj_onnxprune__distill_loss": np.ones(1, np.float32)}
    feeds.update({n: numpy_helper.to_array(t) for t in dense.graph.initializer for n in [t.name] if n in names})
    got = session.run([f"adj_{n}" for n in names], feeds)
    (w0, b0), (w1, b1) = [(w.astype(np.float64), b.astype(np.float64)) for w, b in params]
    h = np.tanh(x @ w0.T + b0)
    dy = 2 * (h @ w1.T + b1 - target)
    da = (dy @ w1) * (1 - h**2)
    expected = [da.T @ x, da.sum(0), dy.T @ h, dy.sum(0)]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g[..., 0], e, rtol=1e-4, atol=1e-4)


def test_distillation_keeps_the_mask_and_never_raises_the_held_out_error():
    dense, _, _ = mlp((8, 16, 4), pattern="gemm_t", seed=3)
    arrays = data(300, d=8, classes=4)
    refit_only = onnxprune.prune(dense, arrays, 0.7, method="ecp-refit", repair=Refit())
    result = onnxprune.prune(dense, arrays, 0.7, method="ecp-refit")
    report = [r for r in result.refits if r.damping is None][0]
    assert report.heldout_error_after <= report.heldout_error_before
    for a, b in zip(refit_only.model.graph.initializer, result.model.graph.initializer):
        if a.name.startswith("W"):
            assert np.array_equal(numpy_helper.to_array(a) == 0, numpy_helper.to_array(b) == 0)
    onnx.checker.check_model(result.model, full_check=True)
    x = arrays["x"]
    held = np.arange(len(x)) % 5 == 0
    y0 = runtime.make_session(dense).run(None, {"x": x[held]})[0]
    errors = [float(((runtime.make_session(m).run(None, {"x": x[held]})[0] - y0) ** 2).sum(1).mean())
              for m in (refit_only.model, result.model)]
    assert errors[1] <= errors[0]


def test_ecp_refit_falls_back_to_one_shot_when_its_held_out_error_is_lower():
    dense, _, _ = mlp((8, 12, 4), pattern="gemm_t", seed=2)
    arrays = data(150, d=8, classes=4)
    kept = onnxprune.prune(dense, arrays, 0.0, method="ecp-refit", steps=2)  # one-shot at r = 0 is the dense model
    assert kept.fell_back and kept.heldout_error == 0.0
    for a, b in zip(dense.graph.initializer, kept.model.graph.initializer):
        assert np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    refit = onnxprune.prune(dense, arrays, 0.8, method="ecp-refit", steps=2)
    one_shot_ = onnxprune.prune(dense, arrays, 0.8, method="ecp")
    x = arrays["x"][np.arange(150) % 5 == 0]
    y0, y1, y2 = (runtime.make_session(m).run(None, {"x": x})[0] for m in (dense, refit.model, one_shot_.model))
    assert not refit.fell_back and refit.heldout_error == pytest.approx(float(((y1 - y0) ** 2).sum(1).mean()), rel=1e-5)
    assert refit.heldout_error < float(((y2 - y0) ** 2).sum(1).mean())


def test_shape_memo_reuses_shapes_across_new_layer_weights_only(monkeypatch):
    """A schedule's steps share one graph's shapes; any other change (here the graph's input size)
    measures them again."""
    from onnxprune.prepare import shapes
    from onnxprune.prepare.shapes import ShapeMemo

    calls = []
    real = shapes.tensor_shapes
    monkeypatch.setattr(shapes, "tensor_shapes", lambda *a: calls.append(a[1]) or real(*a))
    memo = ShapeMemo()
    dense, _, _ = mlp((5, 4, 3), seed=1)
    layers = analyse_graph(dense).layers
    feeds = {"x": data(4, d=5)["x"]}
    assert memo(dense, layers, feeds, "cpu")(dense, ["a0", "a1"], feeds) == {"a0": (4,), "a1": (3,)}
    pruned = onnx.ModelProto()
    pruned.CopyFrom(dense)
    for t in pruned.graph.initializer:
        if t.name == "W0":
            t.CopyFrom(numpy_helper.from_array(np.zeros((4, 5), np.float32), "W0"))
    assert memo(pruned, analyse_graph(pruned).layers, feeds, "cpu")(pruned, ["a0", "a1"], feeds) == {"a0": (4,), "a1": (3,)}
    assert len(calls) == 1
    wider, _, _ = mlp((6, 4, 3), seed=1)
    wide = {"x": data(4, d=6)["x"]}
    assert memo(wider, analyse_graph(wider).layers, wide, "cpu")(wider, ["x", "a0"], wide) == {"x": (6,), "a0": (4,)}
    assert len(calls) == 2
