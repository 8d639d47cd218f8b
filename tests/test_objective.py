"""The relative objective: outputs and Concat parts on different scales each count, outputs with the
batch on any axis, damage reported, label-free budgets (issue 22). Every error is checked against
numpy on onnxruntime's outputs of the dense and the pruned model."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from outputnets import detector, sequence_first

from onnxprune import api
from onnxprune.check.relative import compare_outputs, relative_error
from onnxprune.cli import main
from onnxprune.io.data import as_dataset
from onnxprune.pipeline import Pruner

RNG = np.random.default_rng(3)
X = RNG.normal(size=(256, 8)).astype(np.float32)
X_TEST = RNG.normal(size=(128, 8)).astype(np.float32)


def run(model, x, name="y"):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {"x": x})[0].astype(np.float64)


def numpy_relative(y, y_ref):
    """The definition, written out: per-element means over the samples (axis 0), everything else averaged."""
    centred = y_ref - y_ref.mean(axis=0, keepdims=True)
    return np.mean((y - y_ref) ** 2) / np.mean(centred**2)


def test_the_relative_error_is_the_definition_and_streams_over_batches():
    y_ref = RNG.normal(size=(50, 3, 4)) * np.array([1e3, 1.0, 1e-4])[None, :, None] + 7.0
    y = y_ref + RNG.normal(size=y_ref.shape) * 0.1
    assert relative_error(y, y_ref) == pytest.approx(numpy_relative(y, y_ref), rel=1e-12)
    assert relative_error(y, np.ones_like(y)) is None  # a reference that does not vary has no scale
    dense, data = detector(), as_dataset({"x": X_TEST}, detector())
    pruned = api.prune(dense, {"x": X}, 0.5).model
    compared = compare_outputs(pruned, dense, data, batch_size=7)  # streamed in 19 batches
    y, y_ref = run(pruned, X_TEST), run(dense, X_TEST)
    rows = {row["part"]: row["relative_error"] for row in compared["parts"]}
    assert rows["y"] == pytest.approx(numpy_relative(y, y_ref), rel=1e-9)
    assert rows["y[0:4]"] == pytest.approx(numpy_relative(y[:, :4], y_ref[:, :4]), rel=1e-9)
    assert rows["y[4:10]"] == pytest.approx(numpy_relative(y[:, 4:], y_ref[:, 4:]), rel=1e-9)
    assert compared["relative_error"] == max(rows.values())


def two_outputs():
    """The detector with its heads as two graph outputs instead of one Concat."""
    model = detector()
    graph = model.graph
    del graph.node[-1]
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("box", onnx.TensorProto.FLOAT, ["N", 4]),
                         helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["N", 6])])
    return model


@pytest.mark.parametrize("make, outputs, small", [(detector, None, lambda m, x: run(m, x)[:, 4:]),
                                                  (two_outputs, ["box", "scores"], lambda m, x: run(m, x, "scores"))])
def test_the_small_head_survives_half_the_weights(make, outputs, small):
    """Box pixels (spread ~60) beside sigmoid scores (spread ~1e-3): in one squared error the class head
    costs nothing and goes whole; relative per part it keeps most of its variation."""
    dense = make()
    relative = Pruner("ecp", output=outputs).fit(dense, {"x": X}).prune(0.5)
    assert all(change.pruned < change.weights for change in relative.layers)
    assert not relative.warnings
    kept = numpy_relative(small(relative.model, X_TEST), small(dense, X_TEST))
    assert kept < 0.5
    absolute = Pruner("ecp", output=outputs, objective="absolute").fit(dense, {"x": X}).prune(0.5)
    lost = numpy_relative(small(absolute.model, X_TEST), small(dense, X_TEST))
    assert lost > 1 and kept < lost / 4  # what the plain squared error does to it
    assert any("class_head is pruned to 100%" in w for w in absolute.warnings)
    assert any("no longer vary" in w for w in absolute.warnings)


def test_the_part_weights_reach_the_statistics():
    """E[G] of each head's layer against numpy: G_i = sum_k (w_k dy_k/da_i)^2 with w the part's
    1 / sqrt(n_p spread_p), dy/da = 100 for the box head, sigmoid'(a) for the class head."""
    dense = detector()
    pruner = Pruner("ecp").fit(dense, {"x": X})
    stats = pruner.scorer_  # scored at fit: read the sums through a fresh context
    from onnxprune.score.context import ScoringContext

    ctx = ScoringContext(model=pruner.model_, layers=pruner.layers_, data=pruner.data_, output=pruner.output_,
                         settings=pruner.settings_)
    stats = ctx.statistics()
    y = run(dense, X)
    box, scores = y[:, :4], y[:, 4:]
    spread_box, spread_scores = np.mean((box - box.mean(0)) ** 2), np.mean((scores - scores.mean(0)) ** 2)
    box_g = 100.0**2 / (4 * spread_box)
    np.testing.assert_allclose(stats["box_head"].C, np.full(4, box_g), rtol=1e-5)
    slope = scores * (1 - scores)  # sigmoid'
    np.testing.assert_allclose(stats["class_head"].C, (slope**2).mean(0) / (6 * spread_scores), rtol=1e-4)


def write(tmp_path, model, **arrays):
    onnx.save(model, tmp_path / "m.onnx")
    for name, value in arrays.items():
        np.savez(tmp_path / f"{name}.npz", x=value)
    return str(tmp_path / "m.onnx")


def test_an_output_with_the_batch_on_axis_1_prunes_end_to_end(tmp_path):
    """A sequence-first output (steps, N, classes), as CTC exports have it: the batch axis is found by
    running one and two samples; the pruned model passes the checker, runs, and its relative error
    (numpy, batch on axis 1) is below magnitude pruning's."""
    x, x_test = RNG.normal(size=(64, 30)).astype(np.float32), RNG.normal(size=(32, 30)).astype(np.float32)
    path = write(tmp_path, sequence_first(), calib=x, test=x_test)
    errors = {}
    for method in ("ecp", "magnitude"):
        out = tmp_path / f"{method}.onnx"
        res = CliRunner().invoke(main, ["prune", path, str(out), "--data", str(tmp_path / "calib.npz"), "--sparsity", "0.5",
                                        "--method", method, "--test", str(tmp_path / "test.npz"), "--json",
                                        str(tmp_path / f"{method}.json")])
        assert res.exit_code == 0, res.output
        onnx.checker.check_model(onnx.load(out))
        y = run(onnx.load(out), x_test)
        y_ref = run(sequence_first(), x_test)
        assert y.shape == (5, 32, 7)
        errors[method] = numpy_relative(np.moveaxis(y, 1, 0), np.moveaxis(y_ref, 1, 0))
        report = json.loads((tmp_path / f"{method}.json").read_text())
        assert report["test"]["pruned"]["relative_error"] == pytest.approx(errors[method], rel=1e-6)
    assert errors["ecp"] < errors["magnitude"]


def test_a_label_free_budget_chooses_the_largest_ratio_within_it(tmp_path):
    path = write(tmp_path, detector(), calib=X, test=X_TEST)
    common = ["--data", str(tmp_path / "calib.npz"), "--test", str(tmp_path / "test.npz"), "--ratios", "0.1,0.3,0.5,0.7,0.9"]
    dry = CliRunner().invoke(main, ["prune", path, "--dry-run", "--max-output-error", "5%", "--json", "-", *common])
    assert dry.exit_code == 0, dry.output
    report = json.loads(dry.stdout)
    errors = {p["ratio"]: p["output_error"] for p in report["points"]}
    within = [r for r in sorted(errors) if errors[r] <= 0.05]
    assert within and report["best_ratio"] == within[-1] and report["best_ratio"] < 0.9
    out = tmp_path / "budget.onnx"
    written = CliRunner().invoke(main, ["prune", path, str(out), "--max-output-error", "0.05", *common])
    assert written.exit_code == 0, written.output
    pruned = onnx.load(out)
    y, y_ref = run(pruned, X_TEST), run(detector(), X_TEST)
    assert max(numpy_relative(y[:, :4], y_ref[:, :4]), numpy_relative(y[:, 4:], y_ref[:, 4:])) <= 0.05
    zeros = sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in pruned.graph.initializer if t.name.startswith("W"))
    assert zeros == round(report["best_ratio"] * 288)
    impossible = CliRunner().invoke(main, ["prune", path, str(out), "--force", "--max-output-error", "1e-9", *common])
    assert impossible.exit_code == 1 and "relative output error within" in impossible.output


def test_the_budget_without_test_data_is_measured_on_the_calibration_data(tmp_path):
    path = write(tmp_path, detector(), calib=X)
    res = CliRunner().invoke(main, ["prune", path, "--dry-run", "--data", str(tmp_path / "calib.npz"), "--ratios",
                                    "0.2,0.6", "--max-output-error", "0.05", "--json", "-"])
    assert res.exit_code in (0, 1), res.output
    report = json.loads(res.stdout)
    assert report["error_data"] == "calibration"
    dense = detector()
    for point in report["points"]:
        pruned = api.prune(dense, {"x": X}, point["ratio"]).model
        y, y_ref = run(pruned, X), run(dense, X)
        worst = max(numpy_relative(y, y_ref), numpy_relative(y[:, :4], y_ref[:, :4]), numpy_relative(y[:, 4:], y_ref[:, 4:]))
        assert point["calibration_error"] == pytest.approx(worst, rel=1e-6)
        assert point["within_budget"] == (worst <= 0.05)


def test_damage_is_printed_and_in_the_json(tmp_path):
    path = write(tmp_path, detector(), calib=X)
    out, report = tmp_path / "p.onnx", tmp_path / "p.json"
    res = CliRunner().invoke(main, ["prune", path, str(out), "--data", str(tmp_path / "calib.npz"), "--sparsity", "0.95",
                                    "--json", str(report), "-q"])
    assert res.exit_code == 0, res.output
    warnings = json.loads(report.read_text())["warnings"]
    assert warnings and all(f"Warning: {w}" in res.stderr for w in warnings)


def test_a_failing_derivative_graph_names_the_model_node(monkeypatch):
    """A derivative graph onnxruntime cannot run (here: a reverse rule made to emit an impossible
    Reshape) is onnxprune's limitation (exit 1), and the message names the model's node behind it."""
    from onnx_ad.rules import REVERSE

    from onnxprune.errors import Limitation

    tanh = REVERSE["Tanh"]

    def broken(ctx, node, grads):
        (contribution,) = tanh(ctx, node, grads)
        shape = ctx.b.constant(np.array([7, -1, 13], np.int64), onnx.TensorProto.INT64)
        return [ctx.b.op("Reshape", [contribution, shape])]

    monkeypatch.setitem(REVERSE, "Tanh", broken)
    with pytest.raises(Limitation, match="in the derivative of Tanh node 'act'"):
        api.prune(detector(), {"x": X}, 0.5, engine="adjoint")


def test_the_label_free_budget_works_for_structured_pruning(tmp_path):
    """--structured: whole units of the trunk go; every point's calibration error is measured and the
    budget picks the largest ratio whose relative error (worst part) is within it."""
    path = write(tmp_path, detector(hidden=32), calib=X)
    res = CliRunner().invoke(main, ["prune", path, "--dry-run", "--structured", "--data", str(tmp_path / "calib.npz"),
                                    "--ratios", "0.1,0.3,0.6,0.9", "--max-output-error", "0.2", "--json", "-"])
    assert res.exit_code in (0, 1), res.output
    report = json.loads(res.stdout)
    assert report["mode"] == "units" and report["max_output_error"] == 0.2
    assert all(p["calibration_error"] is not None for p in report["points"])
    kept = None
    for point in report["points"]:  # the largest ratio with every smaller one within the budget
        if point["calibration_error"] > 0.2:
            break
        kept = point["ratio"]
    assert report["best_ratio"] == kept and (res.exit_code == 1) == (kept is None)


def test_inspect_finds_the_unit_groups_of_every_protected_output():
    """Two branches, one per output: inspect lists the groups structured pruning finds, of both."""
    rng = np.random.default_rng(0)

    def p(name, shape):
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)

    nodes = []
    for a, b, out in (("A", "B", "big"), ("C", "D", "small")):
        nodes += [helper.make_node("Gemm", ["x", f"W{a}", f"b{a}"], [f"z{a}"], name=f"fc{a}", transB=1),
                  helper.make_node("Relu", [f"z{a}"], [f"h{a}"]),
                  helper.make_node("Gemm", [f"h{a}", f"W{b}", f"b{b}"], [out], name=f"fc{b}", transB=1)]
    inits = [p(f"W{a}", (16, 8)) for a in "AC"] + [p(f"b{a}", (16,)) for a in "AC"]
    inits += [p(f"W{b}", (4, 16)) for b in "BD"] + [p(f"b{b}", (4,)) for b in "BD"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", 4]) for o in ("big", "small")],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = api.inspect(model)
    pruned = api.prune_structured(model, {"x": rng.normal(size=(64, 8)).astype(np.float32)}, sparsity=0.5)
    assert report["protected_outputs"] == pruned.protected_outputs == ["big", "small"]
    assert sorted(g["group"] for g in report["units"]["groups"]) == sorted(pruned.summary["groups"]) == ["fcA", "fcC"]


def _classifier(softmax: str) -> onnx.ModelProto:
    """x (8) -> fc1 (16) -> relu -> fc2 (5) = logits -> probabilities y, by a Softmax node or written
    out as jax2tf writes it: Exp(logits - Max(floor, ReduceMax)) / ReduceSum, broadcasts between."""
    rng = np.random.default_rng(7)
    inits = [onnx.numpy_helper.from_array(v if v.dtype == np.int64 else v.astype(np.float32), k) for k, v in {
        "W1": rng.normal(size=(8, 16)), "b1": rng.normal(size=16) * 0.1,
        "W2": rng.normal(size=(16, 5)) * 3, "b2": rng.normal(size=5) * 0.1,
        "floor": np.array(-np.inf), "axes": np.array([1], np.int64), "shape": np.array([-1, 1], np.int64)}.items()]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["logits"])]
    if softmax == "node":
        nodes.append(helper.make_node("Softmax", ["logits"], ["y"], axis=1))
    else:
        nodes += [helper.make_node("ReduceMax", ["logits"], ["peak"], axes=[1], keepdims=0),
                  helper.make_node("Max", ["floor", "peak"], ["clamped"]),
                  helper.make_node("Reshape", ["clamped", "shape"], ["peak_column"]),
                  helper.make_node("Sub", ["logits", "peak_column"], ["shifted"]),
                  helper.make_node("Exp", ["shifted"], ["e"]),
                  helper.make_node("ReduceSum", ["e", "axes"], ["total"], keepdims=0),
                  helper.make_node("Reshape", ["total", "shape"], ["total_column"]),
                  helper.make_node("Div", ["e", "total_column"], ["y"])]
    graph = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_written_out_softmax_protects_its_logits_as_a_softmax_node_does():
    """A saturated softmax hides its logits' error from first-order scores; written out in elementary
    ops (magika's jax2tf export) it is seen through like a Softmax node: the same protected tensor
    and the same pruned weights."""
    node, written = _classifier("node"), _classifier("written")
    np.testing.assert_allclose(run(written, X), run(node, X), rtol=1e-5, atol=1e-7)  # the same function
    pruned = {}
    for name, model in (("node", node), ("written", written)):
        result = Pruner(method="ecp", probes=None).fit(model, {"x": X}).prune(0.5)
        assert result.protected_outputs == ["logits"]
        pruned[name] = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name[0] in "Wb"}
    for key, value in pruned["node"].items():
        np.testing.assert_array_equal(pruned["written"][key], value)


def test_a_division_by_another_sum_is_not_a_softmax():
    """Exp(x) / ReduceSum(Exp(z)) of another tensor z is not x's softmax: the output stays protected."""
    model = _classifier("written")
    for node in model.graph.node:
        if node.op_type == "ReduceSum":
            node.input[0] = "shifted"
    assert Pruner(method="ecp").fit(model, {"x": X}).prune(0.5).protected_outputs == ["y"]


@pytest.mark.parametrize("sparsity", [0.3, 0.97])
def test_an_output_part_that_lost_most_of_its_variation_is_warned_of(sparsity):
    """A warning names every output part whose relative error on the calibration data reaches one half
    (whatever its scale), and only those."""
    result = api.prune(detector(), {"x": X}, sparsity)
    lost = {row["part"] for row in result.output_error["parts"] if row["relative_error"] is not None
            and row["relative_error"] >= 0.5 and row["whole"] != any(not r["whole"] for r in result.output_error["parts"]
                                                                   if r["output"] == row["output"])}
    warned = {w.split()[1] for w in result.warnings if "relative error of" in w}
    assert warned == lost
    assert lost if sparsity > 0.9 else not lost


def test_damage_only_the_test_data_show_is_warned_of_with_test(tmp_path):
    """x0 is 0 on every calibration sample, so its weights score 0 and go first; output column 0 reads
    mostly x0. On the calibration data nothing changes (no warning there), on --test data where x0
    varies column 0 has lost its signal: the warning names the test data, in the JSON as on stderr."""
    w = np.array([[1.0, 0.05], [0.01, 0.05], [0.01, 0.05], [0.01, 0.05]], np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="lin")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    calib, test = rng.normal(size=(64, 4)).astype(np.float32), rng.normal(size=(64, 4)).astype(np.float32)
    calib[:, 0] = 0
    np.savez(tmp_path / "calib.npz", x=calib)
    np.savez(tmp_path / "test.npz", x=test)
    res = CliRunner().invoke(main, ["prune", str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx"), "--data",
                                    str(tmp_path / "calib.npz"), "--test", str(tmp_path / "test.npz"), "--sparsity", "0.25",
                                    "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    pruned = numpy_helper.to_array(onnx.load(tmp_path / "out.onnx").graph.initializer[0])
    assert (pruned[0] == 0).all()  # x0's weights went
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output_error"]["relative_error"] < 1e-6
    want = test @ w
    lost = ((test @ pruned - want) ** 2).mean() / want.var(0).mean()  # independent of onnxprune's comparison
    assert lost >= 0.5
    assert [w for w in report["warnings"] if "on the test data" in w] and not [w for w in report["warnings"] if
                                                                              "calibration data" in w]
    assert "relative error" in res.output and "on the test data" in res.output


def test_streamed_output_sums_over_chunks_of_samples_equal_numpys(monkeypatch):
    """The output sums take a batch a few samples at a time (float64 copies stay small for a language
    model's logits): the variances, mean squares and squared differences equal numpy's on the whole."""
    import onnxprune.find.objective as objective
    from onnxprune.check.relative import _OutputSums

    monkeypatch.setattr(objective, "CHUNK_ELEMENTS", 50)  # 2 samples of (5, 5) per chunk
    rng = np.random.default_rng(7)
    y_ref = (3 + rng.normal(size=(23, 5, 5))).astype(np.float32)
    y = (y_ref + 0.1 * rng.normal(size=y_ref.shape)).astype(np.float32)
    sums = _OutputSums()
    sums.add(y[:11], y_ref[:11])
    sums.add(y[11:], y_ref[11:])
    y64, ref64 = y.astype(np.float64), y_ref.astype(np.float64)
    np.testing.assert_allclose(sums.squared, ((y64 - ref64) ** 2).sum(0), rtol=1e-12)
    np.testing.assert_allclose(sums.reference.variance(), ref64.var(0), rtol=1e-9)
    np.testing.assert_allclose(sums.model.mean_square(), (y64 ** 2).mean(0), rtol=1e-9)
    assert sums.reference.n == 23
