"""Gibbs ensembles: weights, temperatures, limits, ONNX export equality, dropping, CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxprune.cli.ensemble import ensemble
from onnxprune.errors import InputError
from onnxprune_gibbs import GibbsEnsemble, gibbs, gibbs_weights, log_gibbs_weights, run_onnx, to_onnx
from onnxprune_gibbs.members import draw_members


def teacher_data(n=400, d=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    return X, (X @ w > 0).astype(int)


def multiclass_data(n=300, d=6, k=4, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    W = rng.normal(size=(d, k))
    return X, np.argmax(X @ W + 0.3 * rng.normal(size=(n, k)), axis=1)


# -- Gibbs weights -------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [0.01, 0.1, 1.0, 10.0])
def test_weights_match_direct_numpy(T):
    E = np.random.default_rng(0).uniform(0.2, 0.6, 50)
    direct = np.exp(-E / T) / np.exp(-E / T).sum()
    np.testing.assert_allclose(gibbs_weights(E, T), direct, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("T", [1e-6, 1e-12, 1e-300])
def test_extreme_small_temperature_no_underflow(T):
    E = np.array([0.3, 0.1, 0.2, 0.1 + 1e-3])
    with np.errstate(all="ignore"):
        naive = np.exp(-E / T) / np.exp(-E / T).sum()
    assert np.isnan(naive).any() or T > 1e-5  # the direct formula breaks down here
    p = gibbs_weights(E, T)
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0)
    assert p[1] == pytest.approx(1.0)
    lw = log_gibbs_weights(E, T)
    assert lw[1] == pytest.approx(0.0) and np.isfinite(lw[0]) or lw[0] == -np.inf


def test_extreme_large_temperature_and_limits():
    E = np.array([0.5, 0.1, 0.1, 0.9])
    np.testing.assert_allclose(gibbs_weights(E, 1e300), 0.25)
    np.testing.assert_allclose(gibbs_weights(E, math.inf), 0.25)
    np.testing.assert_allclose(gibbs_weights(E, 0.0), [0, 0.5, 0.5, 0])  # ties at the minimum share
    assert gibbs.effective_size(log_gibbs_weights(E, math.inf)) == pytest.approx(4.0)
    assert gibbs.effective_size(log_gibbs_weights(np.array([0.1, 0.5]), 1e-9)) == pytest.approx(1.0)


def test_quantised_weights_give_order_independent_sums():
    E = np.random.default_rng(2).uniform(0, 1, 777)
    for T in [1e-4, 0.05, 3.0, math.inf]:
        w = gibbs.vote_weights(E, T)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(w / gibbs.QUANTUM == np.round(w / gibbs.QUANTUM))
        perm = np.random.default_rng(3).permutation(w.size)
        assert np.cumsum(w[perm])[-1] == np.cumsum(w)[-1] == np.sum(w)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "hot"])
def test_bad_temperature_raises(bad):
    with pytest.raises(InputError):
        log_gibbs_weights(np.array([0.1, 0.2]), bad)


def test_std_temperature_equals_np_std():
    X, y = teacher_data()
    est = GibbsEnsemble(n_members=150, temperature="std", random_state=4).fit(X, y)
    assert est.temperature_ == pytest.approx(np.std(est.energies_), rel=0, abs=0)
    member_errors = (est.member_predictions(X) != y[None, :]).mean(axis=1)
    np.testing.assert_allclose(est.energies_, member_errors)


# -- estimator limits ------------------------------------------------------------------------------
def test_zero_temperature_is_best_member_and_infinite_is_uniform():
    X, y = multiclass_data()
    est = GibbsEnsemble(n_members=120, temperature=1e-9, random_state=5).fit(X, y)
    best = int(np.argmin(est.energies_))
    assert np.sum(est.energies_ == est.energies_.min()) == 1
    Xt = np.random.default_rng(9).normal(size=(200, X.shape[1]))
    members = est.member_predictions(Xt)
    np.testing.assert_array_equal(est.predict(Xt), members[best])
    assert est.effective_size_ == pytest.approx(1.0)

    uni = GibbsEnsemble(n_members=120, temperature=math.inf, random_state=5).fit(X, y)
    assert uni.effective_size_ == pytest.approx(120)
    counts = np.stack([(members == k).sum(axis=0) for k in range(4)], axis=1)
    np.testing.assert_array_equal(uni.predict(Xt), np.argmax(counts, axis=1))

    curve = est.temperature_curve(Xt, np.zeros(200, int), [1e-3, 1e-1])
    assert curve["best_member"]["accuracy"] == pytest.approx(np.mean(members[best] == 0))
    assert curve["uniform"]["accuracy"] == pytest.approx(np.mean(np.argmax(counts, axis=1) == 0))
    assert curve["uniform"]["effective_size"] == pytest.approx(120)


def test_curve_matches_predict_and_auto_selects_from_grid():
    X, y = teacher_data(n=500, d=10)
    grid = np.logspace(-3, 0, 7)
    est = GibbsEnsemble(n_members=200, temperature="auto", temperature_grid=grid, random_state=1).fit(X, y)
    assert est.temperature_ in grid
    assert len(est.validation_curve_["error"]) == 7
    Xt, yt = teacher_data(n=300, d=10, seed=0)
    curve = est.temperature_curve(Xt, yt, [est.temperature_])
    assert curve["accuracy"][0] == pytest.approx(est.score(Xt, yt))


def test_members_are_nested_and_deterministic():
    a = draw_members("mlp", 5, 4, 3, hidden=(6,), seed=7)
    b = draw_members("mlp", 9, 4, 3, hidden=(6,), seed=7)
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(wa, wb[:5])
    c = draw_members("mlp", 5, 4, 3, hidden=(6,), seed=8)
    assert not np.array_equal(a.weights[0], c.weights[0])


def test_cross_entropy_energy_and_soft_vote_run():
    X, y = multiclass_data()
    est = GibbsEnsemble(n_members=60, energy="cross-entropy", vote="soft", temperature="std").fit(X, y)
    proba = est.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert est.energies_.min() > 0


def test_estimator_bad_inputs():
    X, y = teacher_data(n=50)
    with pytest.raises(InputError):
        GibbsEnsemble(n_members=10).fit(X[:, :, None], y)
    Xn = X.copy()
    Xn[3, 2] = np.nan
    with pytest.raises(InputError):
        GibbsEnsemble(n_members=10).fit(Xn, y)
    with pytest.raises(InputError):
        GibbsEnsemble(n_members=10, n_classes=2).fit(X, y + 1)
    with pytest.raises(InputError):
        GibbsEnsemble(n_members=10, temperature=0).fit(X, y)
    with pytest.raises(InputError):
        GibbsEnsemble(n_members=10).fit(X[:0], y[:0])
    with pytest.raises(InputError):
        GibbsEnsemble(n_members=10).predict(X)


def test_params_are_the_constructor_arguments():
    """get_params/set_params follow __init__ (scikit-learn's protocol): a clone from get_params()
    predicts the same, a subclass's new argument is a parameter without being listed anywhere, and an
    unknown name is refused."""
    X, y = teacher_data(n=120)
    est = GibbsEnsemble(n_members=40, kind="mlp", hidden=(5,), center=True, temperature="std", random_state=3)
    clone = GibbsEnsemble(**est.get_params())
    np.testing.assert_array_equal(clone.fit(X, y).predict(X), est.fit(X, y).predict(X))
    assert est.set_params(n_members=7) is est and est.get_params()["n_members"] == 7
    assert repr(GibbsEnsemble(n_members=7)) == "GibbsEnsemble(n_members=7)"

    class Tempered(GibbsEnsemble):
        def __init__(self, n_members: int = 5, margin: float = 0.5):
            super().__init__(n_members=n_members)
            self.margin = margin

    assert Tempered(margin=2.0).get_params() == {"margin": 2.0, "n_members": 5}
    with pytest.raises(InputError, match="unknown parameter 'temprature'"):
        GibbsEnsemble().set_params(temprature=1.0)


# -- export --------------------------------------------------------------------------------------
CASES = [
    dict(kind="perceptron"),
    dict(kind="perceptron", center=True, bias_scale=0.5, temperature="std"),
    dict(kind="mlp", hidden=(7, 5), activation="relu", bias_scale=0.3, center=True),
    dict(kind="mlp", hidden=(6,), vote="soft", energy="cross-entropy"),
    dict(kind="perceptron", vote="soft", temperature=math.inf),
]


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("params", CASES)
def test_export_predictions_equal_estimator(params, classes):
    X, y = teacher_data(n=300, d=6) if classes == 2 else multiclass_data(n=300, d=6, k=classes)
    est = GibbsEnsemble(n_members=150, random_state=3, **params).fit(X, y)
    model = to_onnx(est)
    onnx.checker.check_model(model)
    assert model.ir_version <= 10
    assert all(o.version <= 21 for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert [o.name for o in model.graph.output] == ["probabilities", "label"]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == len(est.members_.weights) + 1  # one per layer + the weighted vote
    Xt = np.random.default_rng(11).normal(size=(700, 6)) * 1.5
    proba, labels = run_onnx(model, Xt, batch_size=128)
    np.testing.assert_array_equal(labels, est.predict(Xt))
    expected = est.predict_proba(Xt).astype(np.float32)
    if est.vote == "hard":
        np.testing.assert_array_equal(proba, expected)
    else:
        np.testing.assert_allclose(proba, expected, atol=1e-6)


def test_drop_members_reports_counts_and_export_matches():
    X, y = teacher_data(n=400, d=8)
    est = GibbsEnsemble(n_members=300, temperature=0.02, random_state=2).fit(X, y)
    p = np.exp(est.log_weights_)
    threshold = float(np.quantile(p, 0.7))
    small = est.drop_members(threshold)
    assert small.dropped_["members_total"] == 300
    assert small.dropped_["members_kept"] == int(np.sum(p >= threshold)) == small.members_.n_members
    assert small.dropped_["weight_dropped"] == pytest.approx(p[p < threshold].sum())
    assert small.weights_.sum() == pytest.approx(1.0)
    Xt = np.random.default_rng(1).normal(size=(300, 8))
    _, labels = run_onnx(to_onnx(small), Xt)
    np.testing.assert_array_equal(labels, small.predict(Xt))
    with pytest.raises(InputError):
        est.drop_members(1.01)


# -- CLI -----------------------------------------------------------------------------------------
@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(240, 5, 5)).astype(np.uint8)
    w = rng.normal(size=25)
    y = ((imgs.reshape(240, -1) / 255.0 - 0.5) @ w > 0).astype(np.int64)
    path = tmp_path / "train.npz"
    np.savez(path, x=imgs.reshape(240, -1), y=y)
    return path, imgs, y


def invoke(args):
    return CliRunner().invoke(ensemble, [str(a) for a in args])


def test_cli_fit_writes_model_with_scale(npz, tmp_path):
    path, imgs, y = npz
    out = tmp_path / "ens.onnx"
    res = invoke(["fit", "--data", path, "--members", 80, "--kind", "mlp", "--hidden", "6", "--temperature", "std",
                  "--scale", "1/255", "--drop-below", "1e-3", "--json", tmp_path / "fit.json", out])
    assert res.exit_code == 0, res.output
    assert "kept" in res.output and "of 80 members" in res.output
    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    assert float(props["onnxprune.input_scale"]) == pytest.approx(1 / 255)
    report = json.loads((tmp_path / "fit.json").read_text())
    assert report["onnx_check"]["mismatches"] == 0
    assert report["drop"]["members_kept"] <= 80
    X = imgs.reshape(240, -1).astype(np.float32) * np.float32(1 / 255)
    proba, labels = run_onnx(model, X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    # refuses to overwrite without --force
    res = invoke(["fit", "--data", path, "--members", 10, "--scale", "1/255", out])
    assert res.exit_code == 2 and "--force" in res.output


def test_cli_curve_writes_json_and_png(npz, tmp_path):
    path, _, _ = npz
    out = tmp_path / "curve.json"
    res = invoke(["curve", "--data", path, "--members", 60, "--scale", "0.00392156862745098",
                  "--temperatures", "1e-3:1:9", out])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert len(report["curve"]["error"]) == 9
    assert {"best_member", "uniform", "optimum"} <= set(report["curve"])
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case", ["missing_labels", "nan", "empty", "labels_range", "bad_temperature",
                                  "zero_temperature", "uint8_no_scale", "no_file", "one_dim", "bad_grid"])
def test_cli_bad_inputs_exit_2_one_line_no_output(case, tmp_path, npz):
    path, imgs, y = npz
    X = imgs.reshape(240, -1).astype(np.float32) / 255
    extra = ["--scale", "1/255"]
    data = tmp_path / "bad.npz"
    if case == "missing_labels":
        np.savez(data, x=X)
    elif case == "nan":
        X[0, 0] = np.nan
        np.savez(data, x=X, y=y)
    elif case == "empty":
        np.savez(data, x=X[:0], y=y[:0])
    elif case == "labels_range":
        np.savez(data, x=X, y=y + 5)
        extra = ["--classes", "2"]
    elif case == "one_dim":
        np.savez(data, x=X[:, 0], y=y)
    else:
        data = path
    if case in ("missing_labels", "nan", "empty", "one_dim"):
        extra = []
    if case == "bad_temperature":
        extra += ["--temperature", "hot"]
    if case == "zero_temperature":
        extra += ["--temperature", "0"]
    if case == "uint8_no_scale":
        extra = []
    if case == "no_file":
        data = tmp_path / "nothing.npz"
    if case == "bad_grid":
        extra += ["--temperature-grid", "1:0.1:5"]
    for command, out in (("fit", tmp_path / "m.onnx"), ("curve", tmp_path / "c.json")):
        res = invoke([command, "--data", data, "--members", 10, *extra, out])
        assert res.exit_code == 2, (case, command, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
        assert not out.exists()
    assert not (tmp_path / "c.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_options_share_the_main_cli_types(npz, tmp_path):
    """--validation-fraction, --holdout and --drop-below take fractions as the main CLI does (25%);
    counts and choices are checked by click before anything is read: one line, exit 2."""
    path, _, _ = npz
    out = tmp_path / "ens.onnx"
    res = invoke(["fit", "--data", path, "--members", 20, "--scale", "1/255", "--validation-fraction", "25%",
                  "--drop-below", "0.1%", "--json", tmp_path / "fit.json", out])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "fit.json").read_text())["drop"]["threshold"] == pytest.approx(0.001)
    for extra in (["--members", "0"], ["--kind", "tree"], ["--validation-fraction", "150%"], ["--classes", "1"],
                  ["--scale", "-1"], ["--energy", "hinge"]):
        res = invoke(["fit", "--data", path, "--scale", "1/255", *extra, tmp_path / "bad.onnx"])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), (extra, res.output)
        assert not (tmp_path / "bad.onnx").exists()


def test_votes_for_several_weightings_in_one_pass():
    X, y = multiclass_data()
    est = GibbsEnsemble(n_members=90, temperature="std", random_state=6).fit(X, y)
    W = gibbs.weight_matrix(est.energies_, [0.01, 0.1, math.inf])
    many = est.votes(X[:50], W)
    assert many.shape == (3, 50, 4)
    for j, t in enumerate([0.01, 0.1, math.inf]):
        one = GibbsEnsemble(n_members=90, temperature=t, random_state=6).fit(X, y)
        np.testing.assert_array_equal(many[j], one.votes(X[:50]))


def test_cli_fit_accepts_image_shaped_features(npz, tmp_path):
    _, imgs, y = npz
    data = tmp_path / "images.npz"
    np.savez(data, images=imgs, labels=y)
    out = tmp_path / "img.onnx"
    res = invoke(["fit", "--data", data, "--members", 30, "--scale", "1/255", "--temperature", "0.05", out])
    assert res.exit_code == 0, res.output
    assert "temperature T = 0.05 (given" in res.output and f"{out.stat().st_size:,} bytes" in res.output
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 25
