"""Speed and memory of the statistics, in multiples of one onnxruntime forward pass, and what random
probes cost in accuracy. Writes docs/benchmarks.md (and a JSON copy).

    .venv/bin/python scripts/bench.py [--samples 10000] [--repeats 2] [--out docs/benchmarks.md]
        [--json docs/results/benchmarks.json] [--quick] [--inline]

Models: a 784-1024-1024-10 PReLU MLP (``zoo.build_mlp((1024, 1024))``, untrained: timing needs no
trained weights) and the MNIST CNN (models/mnist_cnn.onnx; an untrained one of the same shape if the
file is missing), scored on the first --samples MNIST test images. Every measurement runs in a
fresh subprocess, so its peak RSS (``resource.getrusage``) is its own, and times its own forward
passes (the fastest of five before and five after the measured step), so that each ratio compares
two timings taken under the same load on a shared machine. Ratios are given in CPU time (all
threads), which other processes disturb much less than wall-clock time, and in wall-clock time; each
measurement runs --repeats times and the least disturbed run (lowest CPU ratio) is kept.

The probes study uses the trained MNIST MLP (K = 10: models/mnist_calib.npz to score,
models/mnist_test.npz to evaluate) and an untrained 784-256-1000 MLP (K = 1000) for the many-output
case: ranking agreement (Spearman's rho over all scores, overlap of the pruned sets) and loss or
measured output error against the exact Jacobian.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402
from onnxprune import runtime  # noqa: E402
from onnxprune.api import as_model  # noqa: E402
from onnxprune.derivatives.engines import output_jacobians  # noqa: E402
from onnxprune.derivatives.engines.base import training_build  # noqa: E402
from onnxprune.derivatives.statistics import collect_loss_gradients, collect_statistics  # noqa: E402
from onnxprune.find.layers import analyse_graph  # noqa: E402
from onnxprune.find.outputs import protected_output  # noqa: E402
from onnxprune.graph.index import read_initializer  # noqa: E402
from onnxprune.io import files as fileio  # noqa: E402
from onnxprune.io.data import (  # noqa: E402
    Dataset,  # noqa: E402
    as_dataset,
)
from onnxprune.io.npz import read_npz  # noqa: E402
from onnxprune.pipeline import Pruner  # noqa: E402
from onnxprune.prepare.analysis import AnalysisCopy  # noqa: E402
from onnxprune.prepare.shapes import output_shape  # noqa: E402

from studies.peers import ONNXSIM_PRUNE, ONNXSIM_PYTHON  # noqa: E402
from studies.zoo import build_mlp  # noqa: E402

BATCH = 256


# ---------------------------------------------------------------- one measurement (in a subprocess)

def build_cnn(seed: int = 0):
    """The MNIST CNN's architecture (scripts/train_models.py), untrained: for timing when the trained
    file is not there."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = []

    def param(name, shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        inits.append(numpy_helper.from_array(rng.uniform(-bound, bound, size=shape).astype(np.float32), name))

    for name, shape, fan_in in [("conv1.weight", (8, 1, 5, 5), 25), ("conv1.bias", (8,), 25),
                                ("conv2.weight", (16, 8, 5, 5), 200), ("conv2.bias", (16,), 200),
                                ("fc1.weight", (64, 256), 256), ("fc1.bias", (64,), 256),
                                ("fc2.weight", (10, 64), 64), ("fc2.bias", (10,), 64)]:
        param(name, shape, fan_in)
    inits.append(numpy_helper.from_array(np.array([-1, 1, 28, 28], np.int64), "image_shape"))
    make = helper.make_node
    nodes = [make("Reshape", ["x", "image_shape"], ["image"]),
             make("Conv", ["image", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", kernel_shape=[5, 5]),
             make("Relu", ["c1"], ["r1"]), make("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             make("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", kernel_shape=[5, 5]),
             make("Relu", ["c2"], ["r2"]), make("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             make("Flatten", ["p2"], ["flat"]),
             make("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["f1"], name="fc1", transB=1),
             make("Relu", ["f1"], ["r3"]),
             make("Gemm", ["r3", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "mnist_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 784])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def images(samples: int, offset: int = 0) -> np.ndarray:
    x = read_npz(ROOT / "models" / "mnist_test.npz")["x"]
    if offset + samples > len(x):
        raise SystemExit(f"only {len(x)} test images; asked for {offset + samples}")
    return (x[offset:offset + samples].reshape(samples, -1).astype(np.float32) / np.float32(255))


def load(name: str, samples: int):
    if name.startswith("file:"):  # "file:MODEL.onnx|DATA.npz": a model of one's own and its first samples
        path, data = name[len("file:"):].split("|")
        model = as_model(path)
        with np.load(data) as arrays:
            return model, as_dataset({k: arrays[k][:samples] for k in arrays.files if k not in ("y", "labels")}, model)
    if name == "mlp":
        model = build_mlp((1024, 1024))
    elif name == "mlp1000":
        model = build_mlp((256,), classes=1000)
    elif name == "cnn":
        path = ROOT / "models" / "mnist_cnn.onnx"
        model = as_model(path) if path.exists() else build_cnn()
    else:
        raise SystemExit(f"unknown model {name}")
    return model, Dataset({"x": images(samples)})


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def forward_times(model, data: Dataset, threads, runs: int = 5) -> list[tuple[float, float]]:
    session = runtime.make_session(model, threads=threads)
    names = [o.name for o in session.get_outputs()]
    times = []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        for feeds, _ in data.batches(BATCH):
            session.run(names, feeds)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def measure(spec: dict) -> dict:
    """Time one step on one model; forward passes before and after it give the unit."""
    model, data = load(spec["model"], spec["samples"])
    threads = spec.get("threads")
    forward_times(model, data.subset(BATCH), threads)  # warm-up
    before_rss = rss_mb()
    fwd = forward_times(model, data, threads)
    wall, cpu = time.perf_counter(), time.process_time()
    extra = {}
    if spec["kind"] == "forward":
        pass
    elif spec["kind"] == "fwdbwd":  # one probe: one forward and one backward pass per sample
        model = AnalysisCopy.of(model).model  # as the pruner sees it: shared biases unshared, Constants read
        layers = analyse_graph(model).layers
        out = protected_output(model)
        shape = output_shape(model, out, data.subset(1).feeds)
        jac = output_jacobians(model, layers, out, int(np.prod(shape)), probes=1, threads=threads,
                               engine=spec["engine"])
        with runtime.blas_threads(threads):
            for feeds, _ in data.batches(BATCH):
                jac.rows(feeds, shape)
    elif spec["kind"] in ("ecp", "gradmag"):  # the statistics each scorer asks for, nothing else
        model = AnalysisCopy.of(model).model
        layers = analyse_graph(model).layers
        out = protected_output(model)
        extra["layers"] = len(layers)
        if spec["kind"] == "ecp":
            collect_statistics(model, layers, data, out, probes=spec.get("probes"), threads=threads,
                               shared=spec.get("shared", "exact"), engine=spec["engine"])
        else:
            labels = np.asarray(read_npz(ROOT / "models" / "mnist_test.npz")["y"][:len(data)], np.int64)
            collect_loss_gradients(model, layers, Dataset(data.feeds, labels), out, threads=threads,
                                   engine=spec["engine"])
    elif spec["kind"] == "prune":  # a whole prune as the command runs it: fit, select, edit, checks
        Pruner("ecp", threads=threads, engine=spec["engine"]).fit(model, data).prune(spec["sparsity"])
    elif spec["kind"] == "onnxsim":  # onnxsim 0.8.1's pruning of the same model on the same samples
        extra = onnxsim_prune(spec, model, data)
    else:  # a whole Pruner.fit: checks, statistics and scores
        labels = np.asarray(read_npz(ROOT / "models" / "mnist_test.npz")["y"][:len(data)], np.int64)
        pruner = Pruner(spec["method"], threads=threads, probes=spec.get("probes"), engine=spec["engine"])
        pruner.fit(model, Dataset(data.feeds, labels))
        extra = {"steps": {k: round(v, 3) for k, v in pruner.seconds_.items()}}
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    cpu += extra.pop("child_cpu_seconds", 0.0)
    if spec["kind"] in ("ecp", "prune"):
        extra["probes"] = spec.get("probes") or automatic_probes(model, data)
    fwd += forward_times(model, data, threads)
    # the least disturbed forward pass: other processes only ever add time (wall and CPU: caches, shared cores)
    return {**spec, "seconds": wall, "cpu_seconds": cpu, "forward_seconds": float(np.min([f[0] for f in fwd])),
            "forward_cpu_seconds": float(np.min([f[1] for f in fwd])), "rss_before_mb": before_rss,
            "peak_rss_mb": peak_mb(), "load": os.getloadavg()[0], **extra}


def onnxsim_prune(spec: dict, model, data: Dataset) -> dict:
    """onnxsim's SparseGPT or Wanda on ``data`` in its own python (spec["python"]); its CPU time."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, calib, out = Path(tmp) / "m.onnx", Path(tmp) / "calib.npz", Path(tmp) / "out.onnx"
        import onnx as _onnx

        _onnx.save(model, onnx_path)
        np.savez(calib, **data.arrays())
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run([spec["python"], "-c", ONNXSIM_PRUNE, str(onnx_path), str(calib), str(out), spec["method"],
                               str(spec["sparsity"])], capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"onnxsim failed: {done.stderr[-2000:]}")
    return {"child_cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def automatic_probes(model, data: Dataset) -> int:
    """The seeds the default statistics choose for ``model``: P random probes, or K exact rows."""
    from onnxprune.derivatives.plan import DerivativeSettings, plan
    from onnxprune.find.layers import analyse_graph as layers_of

    model = AnalysisCopy.of(model).model
    found = plan(model, layers_of(model).layers, data, protected_output(model), DerivativeSettings())
    return found.probes or found.width


def run_measure(spec: dict, inline: bool, repeats: int = 1) -> dict:
    """The measurement with the lowest CPU-time ratio of ``repeats`` (each in a fresh subprocess
    unless ``inline``): the one other processes disturbed least."""
    rows = []
    for _ in range(repeats):
        if inline:
            rows.append(measure(spec))
            continue
        done = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"measurement {spec} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = min(rows, key=lambda row: row["cpu_seconds"] / row["forward_cpu_seconds"])
    return {**best, "repeats": repeats}


# ---------------------------------------------------------------- the probes study (in process)

def average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end - 1) / 2
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(average_ranks(a), average_ranks(b))[0, 1])


def flat_scores(pruner: Pruner) -> np.ndarray:
    return np.concatenate([pruner.scores_[layer.name].scores.ravel() for layer in pruner.layers_])


def pruned_set(pruner: Pruner, ratio: float):
    """The indices (over all layers' (out, in) weights) that ``pruner`` removes at ``ratio``, and the result."""
    result = pruner.prune(ratio)
    zeros = [layer.to_rows(read_initializer(result.model, layer.weight)).ravel() == 0 for layer in pruner.layers_]
    return set(np.flatnonzero(np.concatenate(zeros)).tolist()), result


def probes_study(kind: str, quick: bool) -> list[dict]:
    """Exact Jacobian against random probes: time, ranking agreement, pruned-set overlap, and the
    loss (trained K = 10 model) or the measured output error (untrained K = 1000 model)."""
    rows = []
    if kind == "mnist":
        model = as_model(ROOT / "models" / "mnist_mlp.onnx")
        calib = as_dataset(ROOT / "models" / "mnist_calib.npz", model)
        test = as_dataset(ROOT / "models" / "mnist_test.npz", model)
        variants = [(None, 0)] + [(p, s) for p in (1, 2, 5) for s in range(3)]
        if quick:
            calib, test, variants = calib.subset(128), test.subset(256), variants[:2]
        ratios = (0.5, 0.8)
    else:
        model = build_mlp((256,), classes=1000)
        n = 32 if quick else 1000
        calib, test = Dataset({"x": images(n)}), Dataset({"x": images(n, offset=n)})
        variants = [(None, 0)] + [(p, 0) for p in ((10,) if quick else (10, 50, 200))]
        ratios = (0.5, 0.8)
    exact = None
    for probes, seed in variants:
        start = time.perf_counter()
        pruner = Pruner("ecp", probes=probes, seed=seed, engine="adjoint").fit(model, calib)
        seconds = time.perf_counter() - start
        scores = flat_scores(pruner)
        row = {"model": kind, "probes": probes, "seed": seed, "seconds": seconds, "calibration_samples": len(calib),
               "test_samples": len(test),
               "statistics_seconds": pruner.seconds_.get("statistics", seconds)}
        sets = {}
        for ratio in ratios:
            pruned, result = pruned_set(pruner, ratio)
            sets[ratio] = pruned
            if kind == "mnist":
                row[f"loss@{ratio}"] = onnxprune.evaluate(result.model, test)["loss"]
            else:
                row[f"output_error@{ratio}"] = onnxprune.evaluate(result.model, test, reference=model)["mse"] * 1000
        if exact is None:
            exact = (scores, sets)
            row.update({"spearman": 1.0, **{f"overlap@{r}": 1.0 for r in ratios}})
        else:
            row["spearman"] = spearman(scores, exact[0])
            for r in ratios:
                row[f"overlap@{r}"] = len(sets[r] & exact[1][r]) / max(1, len(exact[1][r]))
        rows.append(row)
        print(f"  probes {kind} P={probes} seed={seed}: {seconds:.1f} s, rho {row['spearman']:.3f}", file=sys.stderr)
    return rows


# ---------------------------------------------------------------- the report

def ratio(row: dict, key: str = "seconds", unit: str = "forward_seconds") -> float:
    return row[key] / row[unit]


def cpu_ratio(row: dict) -> float:
    return row["cpu_seconds"] / row["forward_cpu_seconds"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {runtime.build_name()}, "
            f"numpy {np.__version__}")


def report(results: dict, command: str) -> str:
    lines = ["# Benchmarks: statistics time and memory, probes", "",
             f"Command: `{command}`", "",
             f"Machine: {results['machine']}; load average {results['load_start']:.1f} at the start and "
             f"{results['load_end']:.1f} at the end (a shared machine: other processes ran meanwhile). "
             f"Date: {results['date']}.", "",
             "Every row ran in its own subprocess (its peak RSS is its own) and timed its own forward passes: "
             f"one forward pass = onnxruntime over the same {results['samples']:,} samples in batches of {BATCH}, "
             "the fastest of five runs before and five after the measured step (other processes only ever add "
             f"time). Each measurement ran {results['repeats']} times (`--repeats`), each in a new process, and "
             "the run with the lowest CPU ratio is shown. "
             "`x forward (CPU)` divides the CPU time of all threads by the forward pass's; `x forward (wall)` "
             "does the same with wall-clock time. " + spread(results) + " "
             "The floor is K x (one forward + one backward pass), measured as the 1-probe gradient pass "
             "(`x floor` in CPU time). Peak RSS includes the interpreter, onnxruntime and the data; `+ RSS` is "
             "the growth over the RSS once model and data were loaded.", ""]
    for name, title in (("mlp", "784-1024-1024-10 PReLU MLP (untrained), K = 10"),
                        ("cnn", "MNIST CNN (Conv-ReLU-MaxPool x2, Gemm 256-64-10), K = 10")):
        rows = results["models"][name]
        fwdbwd, floor_cpu = floor(rows)
        lines += [f"## {title}", "",
                  f"One forward pass over {results['samples']:,} samples: {fwdbwd['forward_cpu_seconds']:.3f} s of CPU "
                  f"({fwdbwd['forward_seconds']:.3f} s wall); the floor K x (forward + backward) = "
                  f"{floor_cpu:.1f} x forward (10 x the cheaper engine's 1-probe pass, {fwdbwd['engine']}'s).", "",
                  "| step | seconds (wall) | x forward (CPU) | x floor | x forward (wall) | peak RSS MB | + RSS MB |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in rows:
            lines.append(f"| {row['label']} | {row['seconds']:.2f} | {cpu_ratio(row):.1f} | "
                         f"{cpu_ratio(row) / floor_cpu:.2f} | "
                         f"{ratio(row):.1f} | {row['peak_rss_mb']:.0f} | "
                         f"{row['peak_rss_mb'] - row['rss_before_mb']:.0f} |")
        lines.append("")
    lines += ["## Threads (784-1024-1024-10 MLP, ECP statistics)", "",
              "`--threads N` sets onnxruntime's intra-op threads and numpy's BLAS threads (threadpoolctl); "
              "the default leaves both at theirs (onnxruntime: one per physical core; OpenBLAS: one per core). "
              "onnxruntime's threads never spin (`session.intra_op.allow_spinning = 0`): they do not busy-wait "
              "between batches.", "",
              "Here wall-clock time is the measure; each row's forward pass ran with the same thread setting.", "",
              "| threads | seconds (wall) | x forward (wall) | CPU seconds | load average |",
              "| --- | --- | --- | --- | --- |"]
    for row in results["threads"]:
        lines.append(f"| {row['threads'] or 'default'} | {row['seconds']:.2f} | {ratio(row):.1f} | "
                     f"{row['cpu_seconds']:.2f} | {row['load']:.1f} |")
    lines += ["", "## Random probes against the exact Jacobian", "",
              "`--probes P` replaces the K exact Jacobian rows by P Rademacher projections: "
              "E[(v^T J)^2] = sum_k J_k^2, so G (and A, B, C) are unbiased, and the cost is P backward passes "
              "instead of K. rho is Spearman's rank correlation of all the weights' scores with the exact ones; "
              "overlap the fraction of the exact method's pruned weights that the probed one also prunes.", ""]
    mnist = [r for r in results["probes"] if r["model"] == "mnist"]
    if mnist:
        seeds = max(sum(r["probes"] == p for r in mnist) for p in {r["probes"] for r in mnist})
        calib, test = mnist[0].get("calibration_samples"), mnist[0].get("test_samples")
        sizes = (f"the {calib:,} calibration images, loss on the {test:,} test images" if test else
                 "the calibration images, loss on the test images")
        lines += [f"Trained MNIST MLP 784-64-64-10 (K = 10), scored on {sizes} (one-shot); rows of several seeds give "
                  f"the mean (min-max) over up to {seeds} seeds.", "",
                  "| probes | statistics s | rho | overlap r=0.5 | overlap r=0.8 | loss r=0.5 | loss r=0.8 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        def cell(group, key, fmt="{:.3f}"):
            values = [r[key] for r in group]
            text = fmt.format(np.mean(values))
            return text if len(values) == 1 else f"{text} ({fmt.format(min(values))}-{fmt.format(max(values))})"

        for probes in dict.fromkeys(r["probes"] for r in mnist):
            group = [r for r in mnist if r["probes"] == probes]
            lines.append(f"| {'exact (K = 10)' if probes is None else probes} | "
                         f"{cell(group, 'statistics_seconds', '{:.2f}')} | {cell(group, 'spearman', '{:.4f}')} | "
                         f"{cell(group, 'overlap@0.5')} | {cell(group, 'overlap@0.8')} | "
                         f"{cell(group, 'loss@0.5', '{:.4f}')} | {cell(group, 'loss@0.8', '{:.4f}')} |")
        lines.append("")
    many = [r for r in results["probes"] if r["model"] == "many"]
    if many:
        exact = many[0]
        lines += [f"Untrained 784-256-1000 MLP (K = 1000), scored on {results['many_samples']:,} MNIST images; "
                  "output error = measured E||y_pruned - y_dense||^2 on as many other images (the quantity ECP "
                  "minimises; there is no trained 1000-class model here for a loss).", "",
                  "| probes | statistics s | x exact time | rho | overlap r=0.5 | overlap r=0.8 | output error r=0.5 "
                  "| r=0.8 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in many:
            lines.append(f"| {'exact (K = 1000)' if r['probes'] is None else r['probes']} | "
                         f"{r['statistics_seconds']:.2f} | "
                         f"{r['statistics_seconds'] / exact['statistics_seconds']:.3f} | {r['spearman']:.4f} | "
                         f"{r['overlap@0.5']:.3f} | {r['overlap@0.8']:.3f} | {r['output_error@0.5']:.4g} | "
                         f"{r['output_error@0.8']:.4g} |")
        lines.append("")
    lines += ["## What the numbers say", "", summary(results), "", NOTES, ""]
    return "\n".join(lines)


def spread(results: dict) -> str:
    """How far the forward pass (the unit) moved between the rows of one model, in wall and CPU time,
    and so which ratios are the steadier to read."""
    parts, wall_spread, cpu_spread = [], [], []
    for name, rows in results["models"].items():
        full = [r for r in rows if r["samples"] == results["samples"]]
        wall = max(r["forward_seconds"] for r in full) / min(r["forward_seconds"] for r in full)
        cpu = max(r["forward_cpu_seconds"] for r in full) / min(r["forward_cpu_seconds"] for r in full)
        wall_spread.append(wall)
        cpu_spread.append(cpu)
        parts.append(f"{name} {wall:.2f}x wall, {cpu:.2f}x CPU")
    steadier = "CPU" if max(cpu_spread) < max(wall_spread) else "wall-clock"
    return (f"The forward pass, measured anew for every row, moved between the rows of one model by (largest / "
            f"smallest) {'; '.join(parts)}: the {steadier} ratios are the steadier ones to read.")


def floor(rows: list[dict]) -> tuple[dict, float]:
    """The cheaper engine's 1-probe gradient pass, and K x it (K = 10) in forward passes of CPU time."""
    fwdbwd = min((r for r in rows if r["kind"] == "fwdbwd"), key=cpu_ratio)
    return fwdbwd, 10 * cpu_ratio(fwdbwd)


def summary(results: dict) -> str:
    parts = []
    for name, label in (("mlp", "MLP"), ("cnn", "CNN")):
        rows = {r["label"]: r for r in results["models"][name]}
        _, bound = floor(results["models"][name])
        stats = {engine: rows.get(f"{engine}: ecp statistics (exact)") for engine in ("adjoint", "ort-training")}
        for engine, ecp in stats.items():
            if ecp:
                parts.append(f"{label}, {engine}: ECP statistics {cpu_ratio(ecp):.1f} x forward (CPU time) = "
                             f"{cpu_ratio(ecp) / bound:.2f} x the floor K x (forward + backward) = {bound:.1f} x; "
                             "peak RSS "
                             f"{ecp['peak_rss_mb']:.0f} MB (+{ecp['peak_rss_mb'] - ecp['rss_before_mb']:.0f} MB over "
                             "model and data).")
        if all(stats.values()):
            a, t = cpu_ratio(stats["adjoint"]), cpu_ratio(stats["ort-training"])
            parts.append(f"{label}: adjoint / ort-training CPU time = {a / t:.2f} (the adjoint engine is "
                         f"{'cheaper' if a < t else 'dearer' if a > t else 'as dear'} here, in one measurement).")
    for name, label in (("mlp", "MLP"), ("cnn", "CNN")):
        rows = results["models"][name]
        small = next((r for r in rows if r["label"].startswith("adjoint: ecp statistics (exact, ")), None)
        big = next(r for r in rows if r["label"] == "adjoint: ecp statistics (exact)")
        if small:
            grow_small = small["peak_rss_mb"] - small["rss_before_mb"]
            grow_big = big["peak_rss_mb"] - big["rss_before_mb"]
            verdict = (f"grows {grow_big / max(grow_small, 1):.1f}x" if grow_big > 1.2 * grow_small + 10 else
                       "does not grow (within 20% + 10 MB)")
            parts.append(f"{label}: the memory of the statistics with {big['samples'] // small['samples']}x the "
                         f"samples {verdict}: + RSS {grow_small:.0f} MB with {small['samples']:,} samples, "
                         f"{grow_big:.0f} MB with {big['samples']:,} (the data themselves are loaded before).")
    if results["threads"]:
        fastest = min(results["threads"], key=lambda row: row["seconds"])
        parts.append(f"Threads: --threads {fastest['threads'] or 'default'} was the fastest in wall-clock time "
                     f"({fastest['seconds']:.2f} s; load average {fastest['load']:.1f}).")
    mnist = [r for r in results["probes"] if r["model"] == "mnist"]
    if len(mnist) > 1:
        exact, one = mnist[0], [r for r in mnist if r["probes"] == min(r["probes"] or 99 for r in mnist[1:])]
        worst = max(abs(r["loss@0.8"] - exact["loss@0.8"]) / exact["loss@0.8"] for r in one)
        parts.append(f"Probes, K = 10: with P = {one[0]['probes']} the scores' rank correlation with the exact "
                     f"ones is rho >= {min(r['spearman'] for r in one):.4f} and the test loss at r = 0.8 moves by at "
                     "most "
                     f"{100 * worst:.1f}%.")
    many = [r for r in results["probes"] if r["model"] == "many"]
    if len(many) > 1:
        exact, few = many[0], many[1]
        parts.append(f"K = 1000: P = {few['probes']} takes "
                     f"{100 * few['statistics_seconds'] / exact['statistics_seconds']:.1f}% "
                     f"of the exact time with rho {few['spearman']:.4f} and output error at r = 0.5 "
                     f"{few['output_error@0.5']:.4g} against {exact['output_error@0.5']:.4g}.")
    return " ".join(parts)


NOTES = """How the engines compute (a description of the code, not a measurement): `adjoint` runs onnx-ad's
reverse-mode graph, whose seed axis carries the K one-hot seeds, so the forward pass runs once per sample and
the backward pass once for all K; for single-use layers the graph itself reduces G = sum_k (dy_k/da)^2, so only
(batch, out) leaves the session. `ort-training` runs onnxruntime-training's gradient graph cut at its forward
products: a forward session once per sample, a backward session on the products' outputs repeated K times.
Both then take the products A and B of a batch in float32 on inputs shifted by a per-feature constant, summed
in float64 across batches; shared-weight (Conv) layers use the exact sums of `onnxprune/conv.py` on the rows."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement; the least disturbed is kept")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--json", default=str(ROOT / "docs" / "results" / "benchmarks.json"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    parser.add_argument("--inline", action="store_true", help="measure in this process (no separate peak RSS)")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    parser.add_argument("--render", metavar="JSON", help="measure nothing: rewrite --out from this run's JSON")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--floor", metavar="MODEL", help="measure only the statistics of MODEL against the floor "
                        "P x n x (forward + backward), and the whole prune against onnxsim's; writes --floor-out")
    parser.add_argument("--floor-data", metavar="NPZ", help="the calibration samples of --floor")
    parser.add_argument("--floor-images", type=int, default=16)
    parser.add_argument("--onnxsim-python", default=str(ONNXSIM_PYTHON))
    parser.add_argument("--floor-out", default=str(ROOT / "docs" / "results" / "floor.md"))
    parser.add_argument("--floor-json", default=str(ROOT / "docs" / "results" / "floor.json"))
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return 0
    if args.floor:
        return floor_study(args, argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        fileio.write_text(args.out, report(results, results["command"]))
        return 0
    for path in (args.out, args.json):
        fileio.check_output_path(path, force=args.force)
    samples = 200 if args.quick else args.samples
    results = {"samples": samples, "repeats": args.repeats, "load_start": os.getloadavg()[0],
               "date": time.strftime("%Y-%m-%d"), "machine": machine(),
               "models": {}, "threads": [], "probes": [], "many_samples": 32 if args.quick else 1000}
    engines = ["adjoint", "ort-training"] if training_build() else ["adjoint"]
    plan = {}
    for name in ("mlp", "cnn"):
        steps = []
        for engine in engines:  # side by side, one after the other in the same run
            steps += [(f"{engine}: forward + backward (1 probe)", {"kind": "fwdbwd", "engine": engine}),
                      (f"{engine}: ecp statistics (exact)", {"kind": "ecp", "engine": engine}),
                      (f"{engine}: gradmag (loss gradients)", {"kind": "gradmag", "engine": engine})]
        steps += [(f"adjoint: ecp statistics (exact, {samples // 4:,} samples)",
                   {"kind": "ecp", "samples": samples // 4, "engine": "adjoint"}),
                  ("adjoint: ecp statistics, --probes 2", {"kind": "ecp", "probes": 2, "engine": "adjoint"}),
                  ("adjoint: ecp whole fit (checks, statistics, scores)",
                   {"kind": "fit", "method": "ecp", "engine": "adjoint"}),
                  ("magnitude (whole fit)", {"kind": "fit", "method": "magnitude", "engine": "adjoint"})]
        if name == "cnn":
            steps.insert(-2, ("adjoint: ecp statistics, Conv --conv-statistics positions",
                              {"kind": "ecp", "shared": "positions", "engine": "adjoint"}))
        plan[name] = steps
    for name, steps in plan.items():
        rows = []
        for label, spec in steps:
            row = run_measure({"model": name, "samples": samples, **spec}, args.inline, args.repeats)
            rows.append({"label": label, **row})
            print(f"{name} {label}: {row['seconds']:.2f} s = {ratio(row):.1f} x forward, peak "
                  f"{row['peak_rss_mb']:.0f} MB",
                  file=sys.stderr)
        results["models"][name] = rows
    for threads in ((1,) if args.quick else (1, 2, None)):
        row = run_measure({"model": "mlp", "samples": samples, "kind": "ecp", "threads": threads, "engine": "adjoint"},
                          args.inline, args.repeats)
        results["threads"].append(row)
        print(f"threads {threads}: {row['seconds']:.2f} s = {ratio(row):.1f} x forward", file=sys.stderr)
    results["probes"] = probes_study("mnist", args.quick) + probes_study("many", args.quick)
    results["load_end"] = os.getloadavg()[0]
    arguments = argv if argv is not None else sys.argv[1:]
    command = "python scripts/bench.py" + (" " + shlex.join(arguments) if arguments else "")
    results["command"] = command
    fileio.write_text(args.out, report(results, command))
    fileio.write_json(args.json, results)
    print(f"wrote {args.out} and {args.json}", file=sys.stderr)
    return 0


FLOOR_STEPS = [
    ("forward", {"kind": "forward"}),
    ("forward + backward, 1 probe (the floor's unit)", {"kind": "fwdbwd"}),
    ("ECP statistics, default settings", {"kind": "ecp"}),
    ("onnxprune prune --sparsity 0.5 (ECP, whole)", {"kind": "prune", "sparsity": 0.5}),
    ("onnxsim 0.8.1 SparseGPT at 0.5 (whole)", {"kind": "onnxsim", "method": "sparsegpt", "sparsity": 0.5}),
    ("onnxsim 0.8.1 Wanda at 0.5 (whole)", {"kind": "onnxsim", "method": "wanda", "sparsity": 0.5}),
]


def floor_study(args, argv) -> int:
    """The statistics of one model against the floor P x n x (forward + backward), side by side in one
    run (each step in its own subprocess, --repeats times, the least disturbed kept), and the whole
    prune against onnxsim's SparseGPT and Wanda on the same samples."""
    from studies.provenance import portable_command, portable_path

    for path in (args.floor_out, args.floor_json):
        fileio.check_output_path(path, force=args.force)
    name = f"file:{args.floor}|{args.floor_data}"
    rows = []
    for label, spec in FLOOR_STEPS:
        spec = {"model": name, "samples": args.floor_images, "engine": "adjoint", "python": args.onnxsim_python, **spec}
        row = run_measure(spec, args.inline, args.repeats)
        rows.append({"label": label, **row})
        print(f"{label}: {row['seconds']:.1f} s wall, {cpu_ratio(row):.1f} x forward (CPU)", file=sys.stderr)
    for row in rows:  # the files as the command names them, without this machine's folders
        row["model"] = f"file:{portable_path(args.floor)}|{portable_path(args.floor_data)}"
        row["python"] = portable_path(row["python"]) if row.get("python") else row.get("python")
    command = "python scripts/bench.py " + portable_command(argv if argv is not None else sys.argv[1:])
    results = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "rows": rows,
               "images": args.floor_images, "load_end": os.getloadavg()[0]}
    fileio.write_json(args.floor_json, results)
    fileio.write_text(args.floor_out, floor_report(results, Path(args.floor).name))
    return 0


def floor_report(results: dict, model: str) -> str:
    rows = {row["kind"]: row for row in results["rows"] if row["kind"] not in ("onnxsim",)}
    unit, stats = rows["fwdbwd"], rows["ecp"]
    probes = stats["probes"]
    floor_cpu = probes * cpu_ratio(unit) if probes else None
    lines = ["# Statistics against the floor", "",
             f"Recorded by `{results['command']}` on {results['date']}; machine: {results['machine']}, load average "
             f"{results['load_end']:.1f} at the end (a shared machine). Model {model}, {results['images']} images; every "
             "step in its own subprocess, side by side in this one run; `x forward` divides its CPU time (all threads) by "
             "one forward pass's over the same images (the fastest of five before and five after it). The floor is "
             f"P x (forward + backward) with the default statistics' P = {probes} seeds (random probes, or the exact "
             "Jacobian's rows), the backward being onnxruntime's 1-probe derivative pass.", "",
             "| step | seconds (wall) | x forward (CPU) | x floor (CPU) | peak RSS MB |", "| --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        over = f"{cpu_ratio(row) / floor_cpu:.2f}" if floor_cpu and row["kind"] == "ecp" else "-"
        lines.append(f"| {row['label']} | {row['seconds']:.1f} | {cpu_ratio(row):.1f} | {over} | {row['peak_rss_mb']:.0f} |")
    if floor_cpu:
        lines += ["", f"The default statistics took {cpu_ratio(stats) / floor_cpu:.2f} x the floor in CPU time "
                      f"({cpu_ratio(stats):.1f} x forward against {floor_cpu:.1f} x)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
