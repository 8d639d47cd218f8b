"""Structured ECP: unit saliency and constants against a float64 numpy reference, the joint selection,
MAC accounting, the refit against numpy least squares, the API and the command line."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from test_units import attention, cnn, concat_cnn, concat_mlp, grouped_cnn, mlp_gemm, residual_cnn, sequence_ffn

import onnxprune
from onnxprune import runtime
from onnxprune.cli import main
from onnxprune.derivatives.units import unit_statistics
from onnxprune.find.layers import analyse_graph
from onnxprune.find.units import find_units
from onnxprune.io.data import Dataset
from onnxprune.score.units import best_bands, ecp_constants, greedy_joint, score_group
from onnxprune.select.counts import choose_counts, layer_costs, round_kept, total_macs

from studies.zoo import build_resnet, build_transformer
from tinynets import mlp

RNG = np.random.default_rng(3)


def _tanh_mlp():
    model, params, forward = mlp((5, 6, 4, 3), activation="tanh", seed=2)
    return model, params


def _numpy_unit_reference(params, x):
    """For hidden layer 0's units z (after tanh): v = dy/dz rows (s, K, units), u = v * z, all in float64."""
    (w0, b0), (w1, b1), (w2, b2) = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in params]
    z = np.tanh(x @ w0.T + b0)
    a1 = z @ w1.T + b1
    d1 = 1 - np.tanh(a1) ** 2
    jac = np.einsum("ko,so,oj->skj", w2, d1, w1)  # dy_k/dz_j per sample
    return jac, jac * z[:, None, :], z


def test_unit_statistics_match_numpy_float64():
    model, params = _tanh_mlp()
    x = RNG.normal(size=(50, 5))
    data = Dataset({"x": x.astype(np.float32)})
    groups = find_units(model).groups
    layers = analyse_graph(model).by_name()
    stats = unit_statistics(model, groups, layers, data, "a2")["fc0"]
    v, u, z = _numpy_unit_reference(params, x)
    vv = np.einsum("skj,skl->jl", v, v) / len(x)
    vu = np.einsum("skj,skl->jl", v, u) / len(x)
    uu = np.einsum("skj,skl->jl", u, u) / len(x)
    np.testing.assert_allclose(stats.vv, vv, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(stats.vu, vu, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(stats.uu, uu, rtol=2e-4, atol=1e-6)
    c, m = ecp_constants(stats)
    big_g = (v ** 2).sum(1)  # G'_j per sample
    c_ref = (big_g * z).mean(0) / big_g.mean(0)
    np.testing.assert_allclose(c, c_ref, rtol=1e-3)
    err_ref = (big_g * (z - c_ref) ** 2).mean(0)  # E[G'_j (z_j - c_j)^2]
    np.testing.assert_allclose(np.diag(m), err_ref, rtol=1e-3, atol=1e-7)
    # the joint error of a set is the first-order E||sum_j J_j (c_j - z_j)||^2, cross terms included
    subset = [0, 2, 5]
    dy = np.einsum("skj,sj->sk", v[:, :, subset], c_ref[subset] - z[:, subset])
    np.testing.assert_allclose(m[np.ix_(subset, subset)].sum(), (dy ** 2).sum(1).mean(), rtol=1e-3)


def test_first_order_error_matches_finite_differences():
    """The unit error predicts the change of the output when z_j is moved a little towards c_j."""
    model, params = _tanh_mlp()
    x = RNG.normal(size=(40, 5))
    stats = unit_statistics(model, find_units(model).groups, analyse_graph(model).by_name(),
                            Dataset({"x": x.astype(np.float32)}), "a2")["fc0"]
    c, m = ecp_constants(stats)
    (w0, b0), (w1, b1), (w2, b2) = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in params]
    z = np.tanh(x @ w0.T + b0)

    def head(zz):
        return np.tanh(zz @ w1.T + b1) @ w2.T + b2

    eps, j = 1e-4, 3
    moved = z.copy()
    moved[:, j] += eps * (c[j] - z[:, j])
    measured = ((head(moved) - head(z)) ** 2).sum(1).mean() / eps ** 2
    np.testing.assert_allclose(m[j, j], measured, rtol=1e-3)


def test_greedy_joint_costs_add_up_to_the_joint_error():
    a = RNG.normal(size=(6, 6))
    m = a @ a.T
    order, costs = greedy_joint(m)
    assert order[0] == np.argmin(np.diag(m))
    for t in range(1, 7):
        chosen = order[:t]
        assert np.isclose(costs[:t].sum(), m[np.ix_(chosen, chosen)].sum())
    assert sorted(order) == list(range(6))


def test_conv_unit_statistics_match_finite_differences_through_onnxruntime():
    """For a Conv group (one constant per channel over its positions), u.v sums against a central
    difference of the protected output through onnxruntime."""
    model = cnn()
    x = np.random.default_rng(5).normal(size=(8, 162)).astype(np.float32)
    group = find_units(model).by_name()["conv0"]
    stats = unit_statistics(model, [group], analyse_graph(model).by_name(), Dataset({"x": x}), "y")["conv0"]
    # dy/dt for z_j(t) = z_j + t at every position of channel j: that is sum_p J_p, i.e. v
    session = runtime.tensor_session(model, [group.tensor], "cpu")
    (z,) = session.run([group.tensor], {"x": x})
    eps, j = 1e-3, 1
    outs = []
    for sign in (1, -1):
        shifted = onnx.ModelProto()
        shifted.CopyFrom(model)
        delta = np.zeros((1, group.units, 1, 1), np.float32)
        delta[0, j] = sign * eps
        for node in shifted.graph.node:
            node.input[:] = ["zshift" if i == group.tensor else i for i in node.input]
        shifted.graph.initializer.append(numpy_helper.from_array(delta, "delta"))
        shifted.graph.node.append(onnx.helper.make_node("Add", [group.tensor, "delta"], ["zshift"]))
        from test_units import _toposort

        ordered = _toposort(shifted.graph)
        del shifted.graph.node[:]
        shifted.graph.node.extend(ordered)
        outs.append(runtime.make_session(shifted).run(None, {"x": x})[0].astype(np.float64))
    v = (outs[0] - outs[1]) / (2 * eps)  # (s, K)
    np.testing.assert_allclose(stats.vv[j, j], (v ** 2).sum(1).mean(), rtol=2e-2)


def test_best_bands_against_brute_force():
    a = RNG.normal(size=(7, 7))
    m = a @ a.T
    offsets, errors = best_bands(m)
    for length in range(1, 8):
        best = min((m[np.ix_(out, out)].sum(), start) for start in range(8 - length)
                   for out in [np.setdiff1d(np.arange(7), np.arange(start, start + length))])
        assert np.isclose(errors[length], best[0]) and offsets[length] == best[1]


def test_mac_accounting_matches_the_shapes():
    model = cnn()
    groups = find_units(model).groups
    feeds = {"x": RNG.normal(size=(2, 162)).astype(np.float32)}
    costs = layer_costs(model, analyse_graph(model).layers, groups, feeds)
    dense = {g.name: g.units for g in groups}
    # conv0: 4 out x 2 in x 9 taps x 7x7; conv1: 5 x 4 x 9 x 4x4; fc: 3 x 80
    assert total_macs(costs, dense) == 4 * 2 * 9 * 49 + 5 * 4 * 9 * 16 + 3 * 80
    assert total_macs(costs, {"conv0": 2, "conv1": 3}) == 2 * 2 * 9 * 49 + 3 * 2 * 9 * 16 + 3 * 48
    # a Concat: fc2 reads fc0's 4, two input features and fc1's 3
    model = concat_mlp()
    costs = layer_costs(model, analyse_graph(model).layers, find_units(model).groups, {"x": np.zeros((1, 5), np.float32)})
    assert total_macs(costs, {"fc0": 4, "fc1": 3}) == 4 * 5 + 3 * 5 + 3 * 9
    assert total_macs(costs, {"fc0": 1, "fc1": 2}) == 1 * 5 + 2 * 5 + 3 * (1 + 2 + 2)


def test_counts_per_layer_global_multiple_and_bad_requests():
    scores = {"a": score_group("l2", None, np.arange(1, 17)[:, None] * 1.0, 16),
              "b": score_group("l2", None, np.arange(1, 9)[:, None] * 10.0, 8)}
    original = {"a": 16, "b": 8}
    kept = choose_counts(scores, original, original, [], sparsity=0.5, macs=None, scope="layer")
    assert kept == {"a": 8, "b": 4}
    kept = choose_counts(scores, original, original, [], sparsity=0.5, macs=None, scope="global")
    assert kept == {"a": 5, "b": 7}  # the 12 cheapest: a's 1..11 and b's 10 (tie with a's 10, graph order)
    kept = choose_counts(scores, original, original, [], sparsity=0.4, macs=None, scope="layer", multiple=4)
    assert all(k % 4 == 0 for k in kept.values())
    # a group of exactly --multiple units keeps them all (5 of 8 channels would leave onnxruntime's
    # 8-channel NCHWc blocks half empty); fewer units than the multiple cannot be rounded
    kept = choose_counts(scores, original, original, [], sparsity=0.4, macs=None, scope="layer", multiple=8)
    assert kept == {"a": 8, "b": 8}
    assert round_kept(3, 4, 8) == 3 and round_kept(5, 8, 8) == 8 and round_kept(11, 16, 8) == 8
    # in a schedule of steps every step keeps multiples (a step left at 14 of 16 could not reach 16 again)
    first = choose_counts(scores, original, original, [], sparsity=0.1, macs=None, scope="layer", multiple=8)
    last = choose_counts(scores, first, original, [], sparsity=0.2, macs=None, scope="layer", multiple=8)
    assert first["a"] == 16 and all(k % 8 == 0 for k in last.values())
    with pytest.raises(onnxprune.InputError, match="no unit"):
        choose_counts(scores, original, original, [], sparsity=0.97, macs=None, scope="layer")


@pytest.mark.parametrize("method", ["ecp", "ecp-unit", "flap", "wanda", "l2", "random"])
def test_prune_structured_every_method(method):
    model = cnn(depthwise=True)
    x = RNG.normal(size=(40, 162)).astype(np.float32)
    result = onnxprune.prune_structured(model, {"x": x}, sparsity=0.5, method=method, scope="layer", steps=2)
    onnx.checker.check_model(result.model, full_check=True)
    summary = result.summary
    assert summary["groups"]["conv0"]["units_after"] == 2 and summary["groups"]["conv1"]["units_after"] == 2
    assert summary["macs_after"] < summary["macs_before"] and summary["params_after"] < summary["params_before"]
    dense_out = runtime.make_session(model).run(None, {"x": x})[0]
    out = runtime.make_session(result.model).run(None, {"x": x})[0]
    assert out.shape == dense_out.shape and np.all(np.isfinite(out))
    # attention heads: a head is D rows of each of Q, K and V (wanda's and l2's row norms per head)
    heads = onnxprune.prune_structured(attention(), {"x": RNG.normal(size=(30, 4, 5)).astype(np.float32)},
                                       sparsity=0.5, method=method, scope="layer", steps=1, refit=False)
    assert heads.summary["groups"]["heads:o_proj"]["units_after"] == 1


@pytest.mark.parametrize("build, shape", [(attention, (4, 5)), (residual_cnn, (32,)), (grouped_cnn, (98,)),
                                          (concat_mlp, (5,)), (concat_cnn, (72,)),
                                          (lambda: build_resnet(widths=(4, 6), side=8, classes=3), (64,)),
                                          (lambda: build_transformer(width=8, heads=2, ffn=6, patch=4, side=8, classes=3),
                                           (64,))])
def test_prune_structured_heads_and_residual_streams(build, shape):
    model = build()
    x = RNG.normal(size=(30, *shape)).astype(np.float32)
    result = onnxprune.prune_structured(model, {"x": x}, sparsity=0.5, scope="layer", steps=2)
    onnx.checker.check_model(result.model, full_check=True)
    lanes = {g.name: g.lanes for g in find_units(model).groups}  # a grouped Conv's groups keep as many each
    for name, g in result.summary["groups"].items():
        assert g["units_after"] < g["units_before"] and g["units_after"] % lanes[name] == 0
        if lanes[name] == 1:
            assert g["units_after"] == round(0.5 * g["units_before"])
    assert result.summary["macs_after"] < result.summary["macs_before"]
    dense = runtime.make_session(model).run(None, {"x": x})[0]
    assert runtime.make_session(result.model).run(None, {"x": x})[0].shape == dense.shape


def test_refit_brings_the_output_back_on_a_sequence_ffn():
    model = sequence_ffn()
    x = RNG.normal(size=(80, 3, 4)).astype(np.float32)
    dense = runtime.make_session(model).run(None, {"x": x})[0]
    errors = {}
    for refit in (False, True):
        result = onnxprune.prune_structured(model, {"x": x}, sparsity=0.25, refit=refit, steps=1)
        errors[refit] = float(((runtime.make_session(result.model).run(None, {"x": x})[0] - dense) ** 2).mean())
    assert errors[True] < errors[False]


def test_macs_target_is_reached():
    model = mlp_gemm()
    x = RNG.normal(size=(40, 5)).astype(np.float32)
    result = onnxprune.prune_structured(model, {"x": x}, macs=0.4, steps=1)
    assert result.summary["macs_after"] <= 0.6 * result.summary["macs_before"]


@pytest.fixture
def files(tmp_path):
    model, _ = _tanh_mlp()
    onnx.save(model, tmp_path / "model.onnx")
    rng = np.random.default_rng(11)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(40, 5)).astype(np.float32), y=rng.integers(0, 3, 40))
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_structured_writes_a_smaller_model(files):
    res = invoke("prune", files / "model.onnx", files / "out.onnx", "--data", files / "calib.npz", "--structured",
                 "--sparsity", 0.5, "--multiple", 2, "--steps", 2, "--test", files / "calib.npz",
                 "--time-batches", "1,8", "--json", files / "r.json")
    assert res.exit_code == 0, res.output
    assert "time pruned/original" in res.output and "MACs after" in res.output and "accuracy" in res.output
    out = onnx.load(files / "out.onnx")
    onnx.checker.check_model(out, full_check=True)
    report = json.loads((files / "r.json").read_text())
    assert report["mode"] == "units" and report["steps"] == 2 and report["repair"] == "refit"
    after = [g["units_after"] for g in report["units"]["groups"].values()]
    assert all(k % 2 == 0 for k in after) and sum(after) < 10
    # one paired timer: batch 1 and 8, at one thread and at the default
    assert [(t["batch_size"], t["threads"]) for t in report["timing"]["batches"]] == [(1, 1), (8, 1), (1, None), (8, None)]
    assert all(t["ratio"]["of"] == "pruned/original" for t in report["timing"]["batches"])
    assert report["units"]["params_after"] < report["units"]["params_before"]


def test_cli_input_features(files):
    res = invoke("prune", files / "model.onnx", files / "sliced.onnx", "--data", files / "calib.npz", "--structured",
                 "--sparsity", 0.5, "--scope", "layer", "--slice-inputs", "--steps", 1, "--time-batches", "2")
    assert res.exit_code == 0, res.output
    assert onnx.load(files / "sliced.onnx").graph.input == onnx.load(files / "model.onnx").graph.input
    res = invoke("prune", files / "model.onnx", files / "pruned.onnx", "--data", files / "calib.npz", "--structured",
                 "--sparsity", 0.5, "--scope", "layer", "--prune-inputs", "--steps", 1, "--time-batches", "2",
                 "--test", files / "calib.npz")
    assert res.exit_code == 0, res.output
    assert "input 'x' changed" in res.output
    assert onnx.load(files / "pruned.onnx").graph.input[0].type.tensor_type.shape.dim[1].dim_value == 2
    res = invoke("prune", files / "model.onnx", files / "p2.onnx", "--data", files / "calib.npz", "--structured",
                 "--sparsity", 0.5, "--prune-inputs", "--slice-inputs")
    assert res.exit_code == 2 and "exclude each other" in res.output


@pytest.mark.parametrize("args, message", [
    (["--structured", "--sparsity", "1"], "below 1"),
    (["--structured", "--sparsity", "0.95", "--scope", "layer"], "no unit"),
    (["--structured", "--sparsity", "0.5", "--macs", "0.5"], "exactly one"),
    (["--macs", "0.5"], "add --structured"),
    (["--sparsity", "0.5", "--method", "flap"], "structured method"),
    (["--structured", "--sparsity", "0.5", "--method", "gradmag"], "not a structured method"),
    (["--structured", "--sparsity", "0.5", "--storage", "sparse"], "--storage sparse"),
    (["--structured", "--sparsity", "0.5", "--no-compensation"], "--no-compensation"),
    (["--structured", "--sparsity", "0.5", "--g-weighting"], "--g-weighting"),
    (["--structured", "--sparsity", "0.5", "--method", "ecp-refit"], "not a structured method"),
])
def test_cli_bad_structured_requests_fail_with_one_line(files, args, message):
    res = invoke("prune", files / "model.onnx", files / "out.onnx", "--data", files / "calib.npz", *args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], res.output
    assert not (files / "out.onnx").exists()


@pytest.mark.parametrize("name", ["torch_legacy_cnn_fp16.onnx", "torch_dynamo_cnn.onnx", "skl2onnx_mlp_zipmap.onnx",
                                  "torch_legacy_seq.onnx"])
def test_exported_models_shrink_and_keep_their_stamping(name):
    from pathlib import Path

    from onnxprune.io.data import model_inputs

    model = onnx.load(Path(__file__).parent / "fixtures" / name)
    feeds = {}
    for vi in model_inputs(model):
        shape = [d.dim_value or 24 for d in vi.type.tensor_type.shape.dim]
        shape[0] = 24
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = np.random.default_rng(0).normal(size=shape).astype(dtype)
    result = onnxprune.prune_structured(model, feeds, sparsity=0.5, steps=1)
    out = result.model
    onnx.checker.check_model(out)
    assert result.summary["params_after"] < result.summary["params_before"]
    assert out.opset_import == model.opset_import and out.ir_version == model.ir_version
    before = {t.name: t.data_type for t in model.graph.initializer}
    assert all(before[t.name] == t.data_type for t in out.graph.initializer if t.name in before)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    runtime.make_session(out).run(None, {k: v[:2] for k, v in feeds.items()})


def test_global_counts_remove_whole_multiples_at_their_least_cost():
    """With a channel multiple, global counts remove whole multiples of each group, the cheapest by
    their summed costs: the least total cost among every split of the target into multiples (brute
    force), and a group of one multiple stays whole instead of blocking the others."""
    from itertools import product

    from onnxprune.score.units import UnitScores

    rng = np.random.default_rng(3)
    units = {"a": 16, "b": 24, "c": 8}
    costs = {name: np.sort(rng.gamma(2.0, 1.0, n)) for name, n in units.items()}  # each group's removals, cheapest first
    costs["c"] *= 1e-3  # the cheapest units are in the group that cannot lose a multiple
    scores = {name: UnitScores(np.arange(n), costs[name], None) for name, n in units.items()}
    kept = choose_counts(scores, dict(units), dict(units), [], sparsity=16 / 48, macs=None, scope="global",
                         multiple={"a": 8, "b": 8, "c": 8})
    assert all(k % 8 == 0 for k in kept.values()) and kept["c"] == 8
    assert sum(units[n] - kept[n] for n in units) == 16
    splits = [(a, b) for a, b in product(range(0, 9, 8), range(0, 17, 8)) if a + b == 16]
    best = min(costs["a"][:a].sum() + costs["b"][:b].sum() for a, b in splits)
    assert costs["a"][:16 - kept["a"]].sum() + costs["b"][:24 - kept["b"]].sum() == pytest.approx(best)


def test_a_group_no_longer_found_keeps_its_units_and_the_others_reach_the_target():
    """A later step may not find a group again (its walk stops on the edited graph): it has no scores, so
    it keeps what it has, and the cheapest units of the others make up the target (brute force over them)."""
    from onnxprune.score.units import UnitScores

    rng = np.random.default_rng(4)
    units = {"a": 10, "b": 12, "heads": 4}
    counts = {"a": 10, "b": 12, "heads": 2}
    costs = {name: np.sort(rng.gamma(2.0, 1.0, units[name])) for name in ("a", "b")}
    scores = {name: UnitScores(np.arange(units[name]), costs[name], None) for name in ("a", "b")}
    kept = choose_counts(scores, counts, units, [], sparsity=0.5, macs=None, scope="global")
    assert kept["heads"] == 2
    removed = 13 - 2  # half of the 26 original units, 2 heads already gone
    assert sum(counts[n] - kept[n] for n in ("a", "b")) == removed
    best = min(costs["a"][:k].sum() + costs["b"][:removed - k].sum() for k in range(removed + 1) if removed - k <= 12)
    assert costs["a"][:10 - kept["a"]].sum() + costs["b"][:12 - kept["b"]].sum() == pytest.approx(best)
