"""Test the Gibbs-ensemble claims (arXiv 2505.10331) with onnxprune_gibbs; write docs/results/gibbs*.

    .venv/bin/python scripts/reproduce_gibbs.py --mnist ../shared/data/mnist [--quick] [--out DIR] [--force]
        [--verbose]

(1) Teacher perceptron. x ~ N(0, I_d), y = [w*.x > 0] for a random teacher w*; N random perceptrons
    (GibbsEnsemble kind="perceptron", 2 classes: w_k ~ N(0, I_d / d), no bias), energy = per-sample
    0-1 training error on N_TRAIN fresh samples, hard weighted votes. For every d in DIMS, TEACHERS
    teachers and N in {100, 1000, 10000}: REPS[N] repetitions (fresh training set and members), the
    test error on N_TEST samples per teacher over a log grid of T (GRID), averaged over repetitions;
    T_opt = the grid T of least mean test error; T_val = the temperature the estimator picks on its own
    25% validation split (temperature="auto", same grid, energies refitted on all N_TRAIN samples);
    T_std = std(E_k), the label-free estimate.
(2) MNIST: random multi-class linear members (kind="perceptron", 10 scores, argmax; inputs scaled by
    1/255 and centred on the training mean inside the model), energies on MNIST_TRAIN seeded training
    images, N in {100, 1000, 10000}, and random MLP members (784-32-10 tanh) at N = 1000 for contrast:
    test error vs T on the 10,000 test images, best member (T -> 0) vs Gibbs (T_val, T_std, oracle
    T_opt) vs uniform (T -> inf). The largest linear ensemble is exported as one ONNX graph, run on
    onnxruntime (labels compared with the estimator's) and evaluated with `onnxprune evaluate`; then
    members with weight < 1/N are dropped and the smaller graph checked the same way (the effect of
    other thresholds on the test predictions is tabulated).

Writes OUT/gibbs.json (every number), OUT/gibbs.md, OUT/gibbs-teacher.png, OUT/gibbs-topt.png,
OUT/gibbs-mnist.png. The throughput section of gibbs.md comes from scripts/bench_ensemble.py
(OUT/gibbs-bench.json, kept between markers). --quick: fewer teachers, repetitions and samples, writes
under out/gibbs-quick by default. Quiet unless --verbose or stderr is a terminal.
MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0.
"""
from __future__ import annotations

import os

# numpy's BLAS on one thread unless the caller says otherwise: on this shared 2-core machine,
# multi-threaded OpenBLAS was 2.5-7x slower than one thread when other jobs kept the cores busy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.errors import InputError  # noqa: E402
from onnxprune.io import files as fileio  # noqa: E402
from onnxprune_gibbs import GibbsEnsemble, run_onnx, to_onnx  # noqa: E402
from onnxprune_gibbs.export import input_scale_metadata  # noqa: E402
from onnxprune_gibbs.gibbs import choose_temperature  # noqa: E402
from onnxprune_gibbs.report import md_table, plot_curves  # noqa: E402

from studies.provenance import portable_command  # noqa: E402

DIMS = (2, 5, 20, 50, 200)
NS = (100, 1000, 10000)
GRID = np.logspace(-4, 1, 51)  # 10 points per decade
FULL = dict(teachers=5, reps={100: 20, 1000: 8, 10000: 3}, n_train=2000, n_test=10000,
            mnist_train=20000, mnist_test=10000, mnist_ns=(100, 1000, 10000), mnist_mlp=1000)
QUICK = dict(teachers=2, reps={100: 4, 1000: 2, 10000: 1}, n_train=1000, n_test=2000,
             mnist_train=3000, mnist_test=2000, mnist_ns=(100, 1000), mnist_mlp=200)
MNIST_GRID = np.logspace(-4, 0, 41)
MNIST_SCALE = 1 / 255
BENCH_START, BENCH_END = "<!-- bench_ensemble:start -->", "<!-- bench_ensemble:end -->"


def log(verbose: bool, text: str) -> None:
    if verbose:
        print(text, file=sys.stderr, flush=True)


def seed_of(*key) -> int:
    return int(np.random.SeedSequence([20250515, *key]).generate_state(1)[0])


def sigma_model(d: int, n: int) -> float:
    """Our model's spread of member energies: sqrt(1/(pi^2 d) + 1/(4n)) (docs/gibbs-ensembles.md)."""
    return math.sqrt(1 / (math.pi ** 2 * d) + 1 / (4 * n))


# -- (1) teacher perceptron --------------------------------------------------------------------------
def gaussian_teacher_data(rng, w, n):
    X = rng.standard_normal((n, len(w))).astype(np.float32)
    return X, (X.astype(np.float64) @ w > 0).astype(np.int64)


def teacher_cell(d: int, t: int, N: int, cfg: dict, X_test, y_test, w) -> dict:
    """All repetitions of one (d, teacher, N): mean test-error curve and the temperatures."""
    reps = cfg["reps"][N]
    temps = np.r_[GRID, np.nan]  # last column filled per repetition with T_std
    curves, rows = [], []
    for r in range(reps):
        rng = np.random.default_rng(seed_of(d, t, N, r, 1))
        X, y = gaussian_teacher_data(rng, w, cfg["n_train"])
        est = GibbsEnsemble(n_members=N, kind="perceptron", temperature="auto", temperature_grid=GRID,
                            n_classes=2, random_state=seed_of(d, t, N, r, 2), batch_size=1024)
        est.fit(X, y)
        temps[-1] = est.temperature_std_
        c = est.temperature_curve(X_test, y_test, temps)
        err = np.array(c["error"])
        curves.append(err[:-1])
        i_val = int(np.argmin(np.abs(GRID - est.temperature_)))
        rows.append(dict(T_val=est.temperature_, T_std=est.temperature_std_, err_val=float(err[i_val]),
                         err_std=float(err[-1]), err_best=c["best_member"]["error"], err_uniform=c["uniform"]["error"],
                         T_opt_rep=choose_temperature(GRID, err[:-1]), E_min=float(est.energies_.min()),
                         eff_size=c["effective_size"][:-1]))
    curves = np.array(curves)
    mean = curves.mean(axis=0)
    i_opt = int(np.flatnonzero(GRID == choose_temperature(GRID, mean))[0])
    e_opt = float(mean[i_opt])
    sd = float(curves[:, i_opt].std(ddof=1)) if reps > 1 else 0.0
    se = math.sqrt(sd ** 2 / reps + e_opt * (1 - e_opt) / len(y_test))
    tol = max(2 * se, 0.002)
    band = np.flatnonzero(mean <= e_opt + tol)
    agg = lambda k: float(np.mean([row[k] for row in rows]))  # noqa: E731
    gmean = lambda k: float(np.exp(np.mean([math.log(row[k]) for row in rows])))  # noqa: E731
    return dict(
        d=d, teacher=t, N=N, reps=reps, T_opt=float(GRID[i_opt]), err_opt=e_opt, se_opt=se,
        band=[float(GRID[band.min()]), float(GRID[band.max()])], band_tol=tol,
        T_opt_reps=[row["T_opt_rep"] for row in rows],
        err_best=agg("err_best"), err_uniform=agg("err_uniform"),
        T_val=gmean("T_val"), err_val=agg("err_val"), T_std=agg("T_std"), err_std=agg("err_std"),
        eff_size_opt=float(np.mean([row["eff_size"][i_opt] for row in rows])),
        E_min=agg("E_min"), mean_curve=mean.tolist(),
    )


def run_teacher(cfg: dict, verbose: bool) -> dict:
    cells = []
    for d in DIMS:
        for t in range(cfg["teachers"]):
            rng = np.random.default_rng(seed_of(d, t, 0))
            w = rng.standard_normal(d)
            X_test, y_test = gaussian_teacher_data(rng, w, cfg["n_test"])
            for N in NS:
                start = time.perf_counter()
                cell = teacher_cell(d, t, N, cfg, X_test, y_test, w)
                cells.append(cell)
                log(verbose, f"d={d:3d} teacher {t} N={N:5d}: T_opt {cell['T_opt']:.4g} err {cell['err_opt']:.4f} "
                             f"(best member {cell['err_best']:.4f}, uniform {cell['err_uniform']:.4f}); "
                             f"T_val {cell['T_val']:.4g} T_std {cell['T_std']:.4g} "
                             f"[{time.perf_counter() - start:.1f}s]")
    return {"cells": cells, "analysis": analyse_teacher(cells, cfg)}


def _snap(t: float) -> float:
    return float(GRID[int(np.argmin(np.abs(np.log(GRID) - math.log(t))))])


def analyse_teacher(cells: list[dict], cfg: dict) -> dict:
    """Per d: spread of T_opt over teachers and N, a common T and its cost, the verdict."""
    out = {}
    for d in DIMS:
        cs = [c for c in cells if c["d"] == d]
        topt = np.array([c["T_opt"] for c in cs])
        t_common = _snap(float(np.exp(np.mean(np.log(topt)))))
        i_common = int(np.flatnonzero(GRID == t_common)[0])
        regret = [c["mean_curve"][i_common] - c["err_opt"] for c in cs]
        lo, hi = max(c["band"][0] for c in cs), min(c["band"][1] for c in cs)
        per_n = {}
        for N in NS:
            cn = [c for c in cs if c["N"] == N]
            tn = np.array([c["T_opt"] for c in cn])
            per_n[N] = dict(T_opt_gmean=float(np.exp(np.mean(np.log(tn)))), T_opt_min=float(tn.min()),
                            T_opt_max=float(tn.max()), err_opt=float(np.mean([c["err_opt"] for c in cn])),
                            err_best=float(np.mean([c["err_best"] for c in cn])),
                            err_uniform=float(np.mean([c["err_uniform"] for c in cn])),
                            T_val_gmean=float(np.exp(np.mean(np.log([c["T_val"] for c in cn])))),
                            err_val=float(np.mean([c["err_val"] for c in cn])),
                            T_std=float(np.mean([c["T_std"] for c in cn])),
                            err_std=float(np.mean([c["err_std"] for c in cn])),
                            eff_size_opt=float(np.mean([c["eff_size_opt"] for c in cn])),
                            gain_vs_best=float(np.mean([c["err_best"] - c["err_opt"] for c in cn])))
        at_floor = all(c["T_opt"] <= GRID[0] * 1.01 or c["err_best"] - c["err_opt"] < 0.005 for c in cs)
        gmeans = [per_n[N]["T_opt_gmean"] for N in NS]
        teacher_ratio = max(per_n[N]["T_opt_max"] / per_n[N]["T_opt_min"] for N in NS)
        if at_floor:
            verdict = "no finite optimum: the best single member (T -> 0) is as good as any T"
        elif lo <= hi:
            verdict = (f"invariant within noise: one T in [{lo:.3g}, {hi:.3g}] is within the near-optimal band "
                       f"of every (teacher, N)")
        else:
            verdict = "not invariant: no single T is near-optimal for every (teacher, N)"
        out[d] = dict(T_opt_min=float(topt.min()), T_opt_max=float(topt.max()), ratio=float(topt.max() / topt.min()),
                      T_common=t_common, regret_max=float(max(regret)), regret_mean=float(np.mean(regret)),
                      common_band=[float(lo), float(hi)], band_overlap=bool(lo <= hi), at_floor=at_floor,
                      trend_N=float(gmeans[-1] / gmeans[0]), teacher_ratio_max=float(teacher_ratio),
                      sigma_model=sigma_model(d, cfg["n_train"]), per_N=per_n, verdict=verdict)
    return out


# -- (2) MNIST -------------------------------------------------------------------------------------
def run_mnist(directory: str, cfg: dict, verbose: bool, workdir: Path) -> dict:
    from studies.mnist import load_mnist

    tr_x, tr_y = load_mnist(directory, "train")
    te_x, te_y = load_mnist(directory, "test")
    idx = np.sort(np.random.default_rng(seed_of(7)).permutation(len(tr_x))[:cfg["mnist_train"]])
    scale = np.float32(MNIST_SCALE)
    X = tr_x[idx].reshape(len(idx), -1).astype(np.float32) * scale  # the arithmetic of `onnxprune evaluate`
    y = tr_y[idx].astype(np.int64)
    te_raw = te_x[:cfg["mnist_test"]].reshape(-1, 784)
    Xt = te_raw.astype(np.float32) * scale
    yt = te_y[:cfg["mnist_test"]].astype(np.int64)
    runs, curves, largest = [], [], None
    settings = [("perceptron", N, ()) for N in cfg["mnist_ns"]] + [("mlp", cfg["mnist_mlp"], (32,))]
    for kind, N, hidden in settings:
        start = time.perf_counter()
        est = GibbsEnsemble(n_members=N, kind=kind, hidden=hidden, activation="tanh", center=True,
                            temperature="auto", temperature_grid=MNIST_GRID, random_state=seed_of(8), batch_size=1000)
        est.fit(X, y)
        c = est.temperature_curve(Xt, yt, np.r_[MNIST_GRID, est.temperature_std_])
        err = c["error"]
        i_val = int(np.argmin(np.abs(MNIST_GRID - est.temperature_)))
        i_opt = int(np.argmin(err[:-1]))
        label = f"{'linear' if kind == 'perceptron' else 'MLP 784-32-10 tanh'}, N={N}"
        run = dict(kind=kind, hidden=list(hidden), N=N, label=label, T_val=est.temperature_, acc_val=1 - err[i_val],
                   T_std=est.temperature_std_, acc_std=1 - err[-1], T_opt=float(MNIST_GRID[i_opt]),
                   acc_opt=1 - err[i_opt], acc_best=c["best_member"]["accuracy"], acc_uniform=c["uniform"]["accuracy"],
                   eff_size_val=est.effective_size_, E_min=float(est.energies_.min()),
                   E_mean=float(est.energies_.mean()), E_std=float(est.energies_.std()),
                   loss_val=c["loss"][i_val], seconds=time.perf_counter() - start)
        runs.append(run)
        curves.append((label, {**c, "temperatures": c["temperatures"][:-1], "error": err[:-1]}))
        log(verbose, f"MNIST {label}: best member {run['acc_best']:.4f}, Gibbs T_val={run['T_val']:.3g} "
                     f"{run['acc_val']:.4f}, "
                     f"T_std={run['T_std']:.3g} {run['acc_std']:.4f}, oracle {run['acc_opt']:.4f}, uniform "
                     f"{run['acc_uniform']:.4f} [{run['seconds']:.0f}s]")
        if kind == "perceptron":
            largest = est
    export = export_checks(largest, Xt, yt, te_raw, workdir, verbose)
    return dict(n_train=len(X), n_test=len(Xt), train_subset_seed=seed_of(7), grid=MNIST_GRID.tolist(), runs=runs,
                curves={label: {k: c[k] for k in ("temperatures", "error", "best_member", "uniform")}
                        for label, c in curves}, export=export, _curves=curves)


DROP_FACTORS = (0.1, 0.5, 1.0, 2.0)  # drop members whose weight is below factor / N
EXPORT_DROP = 1.0


def export_checks(est: GibbsEnsemble, Xt, yt, te_raw, workdir: Path, verbose: bool) -> dict:
    """Export the ensemble, compare onnxruntime's labels with the estimator's, run `onnxprune evaluate`;
    the effect of dropping members below factor/N for several factors (one pass over the test set),
    and the same export checks for the ensemble without the members below 1/N."""
    test_npz = workdir / "mnist-test.npz"
    np.savez(test_npz, x=te_raw, y=yt)
    M = est.members_.n_members
    p = np.exp(est.log_weights_)
    columns, drops = [est.weights_], []
    for factor in DROP_FACTORS:
        small = est.drop_members(factor / M)
        w = np.zeros(M)
        w[p >= factor / M] = small.weights_  # the dropped ensemble's own (renormalised) weights
        columns.append(w)
        drops.append((factor, small))
    start = time.perf_counter()
    votes = est.votes(Xt, np.stack(columns, axis=1))
    t_numpy = time.perf_counter() - start
    preds = votes.argmax(axis=2)
    table = []
    for (factor, small), pred in zip(drops, preds[1:], strict=True):
        table.append(dict(factor=factor, **small.dropped_, effective_size=small.effective_size_,
                          test_predictions_changed=int(np.sum(pred != preds[0])),
                          accuracy=float(np.mean(pred == yt))))
    out = {"drop_table": table, "seconds_numpy_votes_all_weightings": t_numpy}
    exported = {"full": (est, preds[0], votes[0])}
    i = DROP_FACTORS.index(EXPORT_DROP)
    exported["dropped"] = (drops[i][1], None, None)
    for name, (e, predicted, v) in exported.items():
        start = time.perf_counter()
        model = to_onnx(e, metadata=input_scale_metadata(MNIST_SCALE))
        path = workdir / f"mnist-gibbs-{name}.onnx"
        fileio.write_bytes(path, model.SerializeToString())
        t_export = time.perf_counter() - start
        if predicted is None:
            v = e.votes(Xt)
            predicted = v.argmax(axis=1)
        start = time.perf_counter()
        proba, labels = run_onnx(model, Xt, batch_size=250)
        t_ort = time.perf_counter() - start
        res = dict(members=e.members_.n_members, bytes=path.stat().st_size, mismatches=int(np.sum(labels != predicted)),
                   proba_max_abs_diff=float(np.max(np.abs(proba - v.astype(np.float32)))),
                   accuracy_estimator=float(np.mean(predicted == yt)),
                   accuracy_onnxruntime=float(np.mean(labels == yt)),
                   seconds_export=t_export, seconds_onnxruntime=t_ort, ir_version=model.ir_version,
                   opset=[o.version for o in model.opset_import if o.domain in ("", "ai.onnx")][0],
                   nodes=len(model.graph.node), matmuls=sum(n.op_type == "MatMul" for n in model.graph.node))
        if name == "dropped":
            res.update(e.dropped_)
            res["test_predictions_changed"] = int(np.sum(predicted != preds[0]))
        res["evaluate"] = run_evaluate(path, test_npz, workdir / f"eval-{name}.json")
        out[name] = res
        log(verbose, f"export {name}: {res['members']} members, {res['bytes'] / 1e6:.0f} MB, mismatches "
                     f"{res['mismatches']}, "
                     f"evaluate {res['evaluate']} [{t_export:.0f}s export, {t_ort:.0f}s onnxruntime]")
    return out


def run_evaluate(model: Path, data: Path, json_path: Path) -> dict:
    """`onnxprune evaluate MODEL --data DATA` (the project's evaluation command), its JSON report."""
    cmd = [sys.executable, "-m", "onnxprune.cli", "evaluate", str(model), "--data", str(data), "--batch-size", "250",
           "--json", str(json_path), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    report = json.loads(json_path.read_text())
    return {k: report[k] for k in ("samples", "loss", "accuracy", "output", "output_kind", "latency_us_per_sample")
            if k in report}


# -- figures -------------------------------------------------------------------------------------
def plot_teacher(path: Path, cells: list[dict], analysis: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DIMS), figsize=(3.2 * len(DIMS), 3.4), dpi=100, sharex=True)
    for ax, d in zip(axes, DIMS, strict=True):
        for j, N in enumerate(NS):
            cs = [c for c in cells if c["d"] == d and c["N"] == N]
            for c in cs:
                ax.semilogx(GRID, c["mean_curve"], color=f"C{j}", lw=0.6, alpha=0.45)
            mean = np.mean([c["mean_curve"] for c in cs], axis=0)
            ax.semilogx(GRID, mean, color=f"C{j}", lw=1.8, label=f"N={N}")
            ax.axhline(np.mean([c["err_best"] for c in cs]), color=f"C{j}", ls=":", lw=0.9)
        a = analysis[d]
        ax.axvline(a["sigma_model"], color="k", ls="--", lw=0.9, label="model sigma_E")
        ax.axvline(np.mean([c["T_std"] for c in cells if c["d"] == d]), color="0.5", ls="-.", lw=0.9, label="std(E)")
        ax.set_title(f"d = {d}", fontsize=10)
        ax.set_xlabel("T")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_ylim(0, 0.55)
    axes[0].set_ylabel("test error (thin: one teacher)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Teacher perceptron: test error vs T, mean over repetitions (thick: mean over teachers; dotted: best "
                 "single member)", fontsize=10)
    fig.tight_layout()
    try:
        fileio.write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def plot_topt(path: Path, cells: list[dict], analysis: dict, n_train: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 4.2), dpi=110)
    offsets = {100: 0.92, 1000: 1.0, 10000: 1.08}
    for j, N in enumerate(NS):
        cs = [c for c in cells if c["N"] == N]
        ax.loglog([c["d"] * offsets[N] for c in cs], [c["T_opt"] for c in cs], "o", color=f"C{j}", ms=4, alpha=0.7,
                  label=f"T_opt, N={N} (one dot per teacher)")
    ds = np.array(DIMS, float)
    ax.loglog(ds, [sigma_model(int(d), n_train) for d in ds], "k--", lw=1, label="model sigma_E")
    ax.loglog(ds, [np.mean([c["T_std"] for c in cells if c["d"] == d]) for d in DIMS], "-.", color="0.4", lw=1,
              label="std(E) (label-free)")
    ax.axhline(GRID[0], color="0.8", lw=0.8)
    ax.set_xlabel("dimension d")
    ax.set_ylabel("optimal temperature (grid)")
    ax.set_title("Teacher perceptron: T_opt per (teacher, N, d)", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        fileio.write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


# -- markdown ---------------------------------------------------------------------------------------
def per_decade(grid) -> int:
    return round((len(grid) - 1) / math.log10(grid[-1] / grid[0]))


def f3(x: float) -> str:
    return f"{x:.3f}"


def g3(x: float) -> str:
    return f"{x:.3g}"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def teacher_markdown(res: dict, cfg: dict) -> str:
    cells, an = res["cells"], res["analysis"]
    lines = []
    rows = []
    for d in DIMS:
        for N in NS:
            p = an[d]["per_N"][N]
            rows.append([d, N, f"{g3(p['T_opt_gmean'])} ({g3(p['T_opt_min'])}-{g3(p['T_opt_max'])})", f3(p["err_opt"]),
                         f3(p["err_best"]), f3(p["err_uniform"]), f"{p['eff_size_opt']:.0f}", g3(an[d]["sigma_model"]),
                         f"{g3(p['T_std'])} / {f3(p['err_std'])}", f"{g3(p['T_val_gmean'])} / {f3(p['err_val'])}"])
    lines.append("### Optimal temperature and errors, averaged over teachers\n")
    lines.append(md_table(["d", "N", "T_opt: geo. mean (min-max over teachers)", "test error at T_opt",
                           "best member (T->0)", "uniform (T->inf)", "eff. size at T_opt", "model sigma_E",
                           "T = std(E): T / error", "validation: T / error"], rows))
    lines.append("")
    lines.append("### T_opt for every (teacher, N, d)\n")
    rows = []
    for d in DIMS:
        for N in NS:
            cs = sorted((c for c in cells if c["d"] == d and c["N"] == N), key=lambda c: c["teacher"])
            rows.append([d, N, *[f"{g3(c['T_opt'])} [{g3(c['band'][0])}, {g3(c['band'][1])}]" for c in cs]])
    lines.append(md_table(["d", "N", *[f"teacher {t + 1}" for t in range(cfg["teachers"])]], rows))
    lines.append("\nIn brackets: the near-optimal band, the grid temperatures whose mean test error is within "
                 "max(2 SE, 0.2 points) of the minimum (SE from the spread over repetitions and the test-set size).\n")
    lines.append("### Is T_opt independent of the teacher and of N?\n")
    rows = []
    for d in DIMS:
        a = an[d]
        band = f"[{g3(a['common_band'][0])}, {g3(a['common_band'][1])}]" if a["band_overlap"] else "empty"
        rows.append([d, f"{g3(a['T_opt_min'])}-{g3(a['T_opt_max'])} (x{a['ratio']:.1f})",
                     f"x{a['teacher_ratio_max']:.1f}", f"x{a['trend_N']:.2f}", band, g3(a["T_common"]),
                     f"{100 * a['regret_mean']:.2f} / {100 * a['regret_max']:.2f}", a["verdict"]])
    lines.append(md_table(["d", "T_opt range over teachers and N", "largest spread over teachers (one N)",
                           "T_opt(N=10000) / T_opt(N=100)", "T inside every near-optimal band",
                           "common T (geo. mean)", "extra error at the common T: mean / max (points)", "verdict"],
                          rows))
    return "\n".join(lines)


def teacher_findings(res: dict, cfg: dict) -> str:
    an = res["analysis"]
    out = []
    inv = [d for d in DIMS if an[d]["band_overlap"] and not an[d]["at_floor"]]
    notinv = [d for d in DIMS if not an[d]["band_overlap"] and not an[d]["at_floor"]]
    floor = [d for d in DIMS if an[d]["at_floor"]]
    if inv:
        out.append(f"- The claim holds (within noise) at d = {', '.join(map(str, inv))}: a single temperature is "
                   "near-optimal for every teacher and every N; using the common T costs at most "
                   + ", ".join(f"{100 * an[d]['regret_max']:.2f} (d={d})" for d in inv) + " points of test error.")
    if notinv:
        for d in notinv:
            a = an[d]
            p = a["per_N"]
            out.append(f"- It fails at d = {d}: T_opt goes from {g3(p[100]['T_opt_gmean'])} (N=100) to "
                       f"{g3(p[1000]['T_opt_gmean'])} (N=1000) and {g3(p[10000]['T_opt_gmean'])} (N=10000) "
                       f"(geometric means over teachers; ratio x{a['trend_N']:.2f}), and no single grid T is "
                       f"near-optimal for all (teacher, N); the common T costs up to {100 * a['regret_max']:.2f} "
                       "points.")
    if floor:
        for d in floor:
            p = an[d]["per_N"]
            out.append(f"- At d = {d} there is no finite optimum to speak of: the Gibbs ensemble gains at most "
                       + ", ".join(f"{100 * p[N]['gain_vs_best']:.2f}" for N in NS)
                       + " points (N = 100 / 1000 / 10000) over the best single member, so T -> 0 is as good as any T.")
    finite = [d for d in DIMS if not an[d]["at_floor"]] or list(DIMS)
    out.append("- Teachers: the members and inputs are isotropic, so by construction every teacher poses the same "
               "problem and the spread of T_opt across teachers at fixed (d, N) is the noise of the measurement "
               "(third column of the last table: "
               + ", ".join(f"x{an[d]['teacher_ratio_max']:.1f} at d={d}" for d in finite) + f"; grid step "
               f"x{GRID[1] / GRID[0]:.2f}).")
    if len(finite) > 1:
        lo, hi = finite[0], finite[-1]
        t_lo, t_hi = an[lo]["per_N"][1000]["T_opt_gmean"], an[hi]["per_N"][1000]["T_opt_gmean"]
        topt = [an[d]["per_N"][1000]["T_opt_gmean"] for d in finite]
        spread = [an[d]["per_N"][1000]["T_std"] for d in finite]
        same_order = bool(np.all(np.sign(np.diff(topt)) == np.sign(np.diff(spread))))
        out.append(f"- Across dimensions T_opt {'falls' if t_hi < t_lo else 'rises'} from {g3(t_lo)} at d = {lo} to "
                   f"{g3(t_hi)} at d = {hi} (N = 1000); the spread of the member energies std(E) "
                   + ("moves the same way between every pair of neighbouring d (next bullets)." if same_order else
                      "does not move the same way between every pair of neighbouring d (next bullets)."))
    ratios = []
    for d in DIMS:
        p = an[d]["per_N"]
        ratios.append(f"d={d}: " + " / ".join(g3(p[N]["T_std"] / p[N]["T_opt_gmean"]) for N in NS))
    out.append("- T = std(E) against the oracle T_opt (ratio for N = 100 / 1000 / 10000): " + "; ".join(ratios) + ".")
    gaps_std = {d: [an[d]["per_N"][N]["err_std"] - an[d]["per_N"][N]["err_opt"] for N in NS] for d in DIMS}
    gaps_val = {d: [an[d]["per_N"][N]["err_val"] - an[d]["per_N"][N]["err_opt"] for N in NS] for d in DIMS}
    out.append("- Extra test error over the oracle T_opt, in points (N = 100 / 1000 / 10000): "
               + "; ".join(f"d={d}: std(E) " + "/".join(f"{100 * g:.1f}" for g in gaps_std[d])
                           + ", validation " + "/".join(f"{100 * g:.1f}" for g in gaps_val[d]) for d in DIMS) + ".")
    model = "; ".join(f"d={d}: model {g3(an[d]['sigma_model'])}, std(E) {g3(an[d]['per_N'][1000]['T_std'])}, "
                      f"T_opt(N=1000) {g3(an[d]['per_N'][1000]['T_opt_gmean'])}" for d in DIMS)
    out.append(f"- Our model's prediction T* ~ sigma_E = sqrt(1/(pi^2 d) + 1/(4n)) with n = {cfg['n_train']}: {model}.")
    return "\n".join(out)


def mnist_markdown(res: dict) -> str:
    rows = [[r["label"], pct(r["acc_best"]),
             f"{pct(r['acc_val'])} (T={g3(r['T_val'])}, eff. size {r['eff_size_val']:.0f})",
             f"{pct(r['acc_std'])} (T={g3(r['T_std'])})", f"{pct(r['acc_opt'])} (T={g3(r['T_opt'])})",
             pct(r["acc_uniform"]),
             f"{f3(r['E_min'])} / {f3(r['E_mean'])} / {f3(r['E_std'])}"] for r in res["runs"]]
    lines = [md_table(["members", "best single member (T->0)", "Gibbs, T by validation (the estimator's default)",
                       "Gibbs, T = std(E)", "Gibbs, oracle T on the test set", "uniform (T->inf)",
                       "energy min / mean / std"], rows)]
    ex = res["export"]
    full, drop = ex["full"], ex["dropped"]
    lines.append("")
    lines.append(f"Exported graphs (one graph each, IR {full['ir_version']}, opset {full['opset']}; "
                 f"{full['matmuls']} MatMul nodes whatever N):\n")
    rows = []
    for name, e in (("all members", full), (f"weight >= {g3(drop['threshold'])} (1/N)", drop)):
        ev = e["evaluate"]
        ev_text = (f"{pct(ev['accuracy'])}, loss {ev['loss']:.3f} ({ev['output']}: {ev['output_kind']})"
                   if "accuracy" in ev else f"failed: {ev.get('error')}")
        rows.append([name, e["members"], f"{e['bytes'] / 1e6:.1f}", f"{e['mismatches']} of {res['n_test']}",
                     f"{e['proba_max_abs_diff']:.1e}", pct(e["accuracy_onnxruntime"]), ev_text])
    lines.append(md_table(["ensemble", "members", "MB", "labels differing from the estimator (onnxruntime)",
                           "max abs diff of probabilities", "accuracy on onnxruntime", "`onnxprune evaluate`"], rows))
    lines.append(f"\nDropping members by weight (N = {drop['members_total']}; predictions compared with the full "
                 "ensemble's on the test set):\n")
    rows = [[f"{g3(r['factor'])}/N = {g3(r['threshold'])}", f"{r['members_kept']} of {r['members_total']}",
             g3(r["weight_dropped"]), f"{r['effective_size']:.0f}", f"{r['test_predictions_changed']} of "
                                                                    f"{res['n_test']}",
             pct(r["accuracy"])] for r in ex["drop_table"]]
    lines.append(md_table(["drop weights below", "members kept", "weight dropped", "effective size",
                           "test predictions changed", "test accuracy"], rows))
    return "\n".join(lines)


def summary_markdown(results: dict, bench: dict | None = None) -> str:
    out = []
    if "teacher" in results:
        an = results["teacher"]["analysis"]
        verdicts = "; ".join(f"d = {d}: {an[d]['verdict'].split(':')[0]}" for d in DIMS)
        out.append(f"- Teacher perceptron, is T_opt independent of the teacher and of N? {verdicts}. Details in "
                   "section 1.")
        groups = [[d for d in DIMS if d <= 2], [d for d in DIMS if 2 < d < 20], [d for d in DIMS if d >= 20]]
        for ds in groups:
            if not ds:
                continue
            label = f"d = {ds[0]}" if len(ds) == 1 else f"d = {', '.join(map(str, ds))}"
            gaps = [(an[d]["per_N"][N]["err_std"] - an[d]["per_N"][N]["err_opt"],
                     an[d]["per_N"][N]["err_val"] - an[d]["per_N"][N]["err_opt"],
                     an[d]["per_N"][N]["T_std"] / an[d]["per_N"][N]["T_opt_gmean"]) for d in ds for N in NS]
            out.append(f"- {label}: the label-free T = std(E) is "
                       f"{g3(min(g[2] for g in gaps))}-{g3(max(g[2] for g in gaps))} "
                       f"times T_opt and costs on average {100 * np.mean([g[0] for g in gaps]):.2f} points of test "
                       "error "
                       f"over the oracle T_opt (worst {100 * max(g[0] for g in gaps):.2f}); the validation choice "
                       "costs "
                       f"{100 * np.mean([g[1] for g in gaps]):.2f} (worst {100 * max(g[1] for g in gaps):.2f}).")
    if "mnist" in results:
        m = results["mnist"]
        r = max((r for r in m["runs"] if r["kind"] == "perceptron"), key=lambda r: r["N"])
        full = m["export"]["full"]
        out.append(f"- MNIST, {r['N']} random linear members: Gibbs ensemble {pct(r['acc_val'])} test accuracy (T by "
                   f"validation; {pct(r['acc_std'])} with T = std(E)) vs best single member {pct(r['acc_best'])} and "
                   f"uniform average {pct(r['acc_uniform'])}.")
        out.append(f"- The exported ONNX graph ({full['members']} members, one graph) gives labels that differ from "
                   f"the estimator's on {full['mismatches']} of {m['n_test']} test images on onnxruntime; "
                   f"`onnxprune evaluate` reports {pct(full['evaluate'].get('accuracy', float('nan')))}.")
    if bench:
        rows = [r for c in bench["cases"] for r in c["rows"]]
        lin = [r["loop_over_batched"] for r in rows if r["kind"] == "perceptron"]
        mlp = [r["loop_over_batched"] for r in rows if r["kind"] != "perceptron"]
        cases = sorted({(r["N"], r["batch"], r["threads"]) for r in rows})
        out.append(f"- Throughput (`scripts/bench_ensemble.py`, one run): looping over one-member graphs takes "
                   f"x{min(lin):.1f}-x{max(lin):.1f} the batched graph's time for linear members and "
                   f"x{min(mlp):.1f}-x{max(mlp):.1f} for MLP members (N = "
                   f"{' / '.join(str(n) for n in sorted({c[0] for c in cases}))}, batches "
                   f"{' / '.join(str(b) for b in sorted({c[1] for c in cases}))}, "
                   f"{' or '.join(str(t) for t in sorted({c[2] for c in cases}))} threads). Section 3.")
    else:
        out.append("- Throughput of the batched graph against a loop over members: section 3.")
    if "mnist" in results:
        ex = results["mnist"]["export"]
        checks = [ex["full"], ex["dropped"]]
        mismatches = sum(e["mismatches"] for e in checks)
        out.append("- Exactness: hard votes are exact sums (quantised weights), so labels can only differ if a "
                   "member's float64 scores differ between numpy and onnxruntime at a near-tie; in the "
                   f"{len(checks)} export checks of section 2, {mismatches} of "
                   f"{len(checks) * results['mnist']['n_test']}"
                   " labels differed.")
    return "\n".join(out)


def write_markdown(path: Path, results: dict, cfg: dict, command: str, old_bench: str | None) -> None:
    parts = ["# Gibbs-weighted ensembles of random classifiers: does the optimal temperature stay put?", ""]
    parts.append("Generated by `scripts/reproduce_gibbs.py` (do not edit by hand; rerun it). Command: "
                 f"`{command}`; {results['seconds'] / 60:.1f} minutes on {results['machine']}. Every number "
                 "is in `gibbs.json`. Method and hypothesis: `docs/gibbs-ensembles.md` of the shared docs "
                 "(Muscarnera et al., arXiv 2505.10331; only its abstract was available).")
    parts.append("")
    parts.append("## Summary\n")
    bench_path = path.parent / "gibbs-bench.json"
    parts.append(summary_markdown(results, json.loads(bench_path.read_text()) if bench_path.exists() else None))
    parts.append("")
    if "teacher" in results:
        tc, grid = results["teacher"], results["grid"]
        parts.append("## 1. Teacher perceptron in d dimensions\n")
        parts.append(f"Gaussian inputs, labels from a random teacher perceptron, {cfg['teachers']} teachers per d, "
                     f"N random perceptrons (w ~ N(0, I/d), no bias), energy = 0-1 error on n = {cfg['n_train']} "
                     f"fresh training samples, hard weighted votes; test error on {cfg['n_test']} samples per "
                     f"teacher; repetitions (new training set and members) per N: "
                     + ", ".join(f"{N}: {r}" for N, r in cfg["reps"].items())
                     + f"; temperature grid {grid[0]:g}..{grid[-1]:g}, {per_decade(grid)} points per decade. T_opt = "
                     "grid T with the least test error of the curve averaged over repetitions. The validation T is "
                     f"what `GibbsEnsemble` picks by itself ({pct(GibbsEnsemble().validation_fraction)} of the "
                     "training samples held out, energies then refitted on all).\n")
        parts.append("### Findings\n")
        parts.append(teacher_findings(tc, cfg))
        parts.append("")
        parts.append(teacher_markdown(tc, cfg))
        parts.append("\n![error vs T](gibbs-teacher.png)\n\n![T_opt vs d](gibbs-topt.png)\n")
    if "mnist" in results:
        m = results["mnist"]
        parts.append("## 2. MNIST\n")
        parts.append(f"Members: random multi-class linear classifiers (`kind=\"perceptron\"`: 10 random scores "
                     f"w_c.(x - mean) with w_c ~ N(0, I/784), argmax), and random MLPs 784-32-10 (tanh) for "
                     f"contrast; pixels scaled by 1/255 and centred on the training mean inside the model. "
                     f"Energies: 0-1 error on {m['n_train']} training images (a seeded subset), "
                     f"{pct(GibbsEnsemble().validation_fraction)} of them held out to choose T on a grid "
                     f"{m['grid'][0]:g}..{m['grid'][-1]:g}, then refitted on all; hard weighted votes. Accuracy on "
                     f"the {m['n_test']} test images. MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0.\n")
        parts.append(mnist_markdown(m))
        best = max((r for r in m["runs"] if r["kind"] == "perceptron"), key=lambda r: r["N"])
        parts.append(f"\nWith N = {best['N']} random linear members the Gibbs ensemble reaches {pct(best['acc_val'])} "
                     f"test accuracy (T from validation), against {pct(best['acc_best'])} for the best single member "
                     f"and {pct(best['acc_uniform'])} for the uniform average: "
                     + ("the optimum is at a finite temperature, as the paper says.\n"
                        if best["acc_val"] > max(best["acc_best"], best["acc_uniform"]) else
                        "the validation temperature does not beat both limits here.\n"))
        parts.append("![MNIST error vs T](gibbs-mnist.png)\n")
    parts.append("## 3. Exactness and throughput of the exported graph\n")
    parts.append("The exported graph computes in double after casting the float32 input; the Gibbs weights are "
                 "rounded to multiples of 2^-50 so that every weighted hard vote is an exact float64 sum in any "
                 "order (the test suite compares numpy's and onnxruntime's labels on random inputs for every member "
                 "kind and vote); the graph does not rescale the votes (the weights sum to 1 within N 2^-51).\n")
    parts.append(BENCH_START)
    parts.append(old_bench if old_bench is not None else
                 "(run `scripts/bench_ensemble.py` to measure the batched graph against a loop over members)")
    parts.append(BENCH_END)
    parts.append("")
    parts.append("## Limits\n")
    parts.append("- Only the paper's abstract was available: its energies, member distributions and experiment sizes "
                 "may differ from ours; the teacher model here is ours (see the shared docs).\n"
                 "- Test errors are averages over a few repetitions; T_opt is quantised to the grid (x1.26 steps). "
                 "The near-optimal bands make the comparison statistical rather than point-by-point.\n"
                 f"- MNIST energies use a {cfg['mnist_train']}-image subset of the training set (the whole run took "
                 f"{results['seconds'] / 60:.1f} minutes).\n"
                 f"- Wall times depend on the machine's load: the load average (1, 5, 15 min) "
                 f"was {results['load_before']} at the start of the reproduction run and {results['load_after']} at "
                 "its end.")
    fileio.write_text(path, "\n".join(parts) + "\n")


def current_bench(path: Path) -> str | None:
    if not path.exists():
        return None
    text = path.read_text()
    if BENCH_START in text and BENCH_END in text:
        return text.split(BENCH_START, 1)[1].split(BENCH_END, 1)[0].strip("\n")
    return None


def load_results(path: Path) -> tuple[dict, dict]:
    """gibbs.json with its integer keys restored, and the run's configuration."""
    results = json.loads(path.read_text())
    cfg = dict(results["config"])
    cfg["reps"] = {int(k): v for k, v in cfg["reps"].items()}
    if "teacher" in results:
        results["teacher"]["analysis"] = {int(d): {**a, "per_N": {int(N): v for N, v in a["per_N"].items()}}
                                          for d, a in results["teacher"]["analysis"].items()}
    return results, cfg


def plot_mnist(path: Path, curves: list, runs: list[dict]) -> None:
    best_val = [r["T_val"] for r in runs if r["kind"] == "perceptron"]
    plot_curves(path, curves, "MNIST, random members: test error vs T",
                markers={f"validation T (largest linear N) = {best_val[-1]:.3g}": best_val[-1]})


def rewrite_from_json(paths: dict, verbose: bool) -> int:
    if not paths[".json"].exists():
        raise InputError(f"{paths['.json']} does not exist; run the experiments first")
    results, cfg = load_results(paths[".json"])
    if "teacher" in results:
        plot_teacher(paths["-teacher.png"], results["teacher"]["cells"], results["teacher"]["analysis"])
        plot_topt(paths["-topt.png"], results["teacher"]["cells"], results["teacher"]["analysis"], cfg["n_train"])
    if "mnist" in results:
        plot_mnist(paths["-mnist.png"], list(results["mnist"]["curves"].items()), results["mnist"]["runs"])
    write_markdown(paths[".md"], results, cfg, results["command"], current_bench(paths[".md"]))
    log(verbose, f"rewrote {paths['.md']} and the figures from {paths['.json']}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist", default=None, help="MNIST folder (gzipped IDX files); without it part 2 is skipped")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run (writes under out/gibbs-quick)")
    ap.add_argument("--out", default=None, help="output folder (default docs/results, or out/gibbs-quick with --quick)")
    ap.add_argument("--skip-teacher", action="store_true")
    ap.add_argument("--force", action="store_true", help="replace existing outputs")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--markdown-only", action="store_true",
                    help="no experiments: redraw the figures and rewrite gibbs.md from the existing OUT/gibbs.json")
    args = ap.parse_args(argv)
    verbose = args.verbose or sys.stderr.isatty()
    cfg = QUICK if args.quick else FULL
    out = Path(args.out or (ROOT / "out" / "gibbs-quick" if args.quick else ROOT / "docs" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"gibbs{k}" for k in (".json", ".md", "-teacher.png", "-topt.png", "-mnist.png")}
    if args.markdown_only:
        return rewrite_from_json(paths, verbose)
    for key, p in paths.items():
        if key.endswith(".png") and ((key in ("-teacher.png", "-topt.png") and args.skip_teacher)
                                     or (key == "-mnist.png" and not args.mnist)):
            continue
        if key == ".md":
            continue  # regenerated around the bench section, which is kept
        fileio.check_output_path(p, force=args.force)
    old_bench = current_bench(paths[".md"])
    if paths[".md"].exists() and not args.force:
        fileio.check_output_path(paths[".md"], force=False)

    start = time.perf_counter()
    load_before = [round(v, 2) for v in __import__("os").getloadavg()]
    config = {k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()}) for k, v in cfg.items()}
    results = {"load_before": load_before, "config": config,
               "grid": GRID.tolist(), "dims": DIMS, "Ns": NS,
               "machine": f"{platform.machine()} {platform.system()}, Python {platform.python_version()}, "
                          f"{__import__('os').cpu_count()} cores, "
                          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}"}
    if not args.skip_teacher:
        results["teacher"] = run_teacher(cfg, verbose)
        plot_teacher(paths["-teacher.png"], results["teacher"]["cells"], results["teacher"]["analysis"])
        plot_topt(paths["-topt.png"], results["teacher"]["cells"], results["teacher"]["analysis"], cfg["n_train"])
    if args.mnist:
        with tempfile.TemporaryDirectory(prefix="gibbs-") as tmp:
            results["mnist"] = run_mnist(args.mnist, cfg, verbose, Path(tmp))
        plot_mnist(paths["-mnist.png"], results["mnist"].pop("_curves"), results["mnist"]["runs"])
    results["seconds"] = time.perf_counter() - start
    results["load_after"] = [round(v, 2) for v in __import__("os").getloadavg()]
    results["command"] = portable_command(["python", "scripts/reproduce_gibbs.py", *(argv or sys.argv[1:])])
    fileio.write_json(paths[".json"], results)
    write_markdown(paths[".md"], results, cfg, results["command"], old_bench)
    log(verbose, f"done in {results['seconds'] / 60:.1f} min; wrote {out}/gibbs.*")
    return 0


if __name__ == "__main__":
    from onnxprune.errors import run_script

    run_script(main)
