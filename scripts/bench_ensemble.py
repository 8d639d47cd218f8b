"""Throughput of the exported Gibbs ensemble: one batched graph against looping over members.

    .venv/bin/python scripts/bench_ensemble.py [--out docs/results] [--quick] [--force] [--verbose]

For MNIST-shaped members (784 inputs, 10 classes; random linear maps, and MLPs 784-32-10 tanh) and
N in {100, 1000}, on onnxruntime (CPU, no memory arena for every variant, see bench_session; one
intra-op thread for batches 1, 64, 1000, and two threads for batches 1 and 64; numpy's BLAS on one
thread) with the same double-precision arithmetic:
- batched: the exported graph (`onnxprune_gibbs.to_onnx`): one MatMul per layer for all members;
- loop: N one-member graphs (each exported the same way), run one after the other from Python, their
  one-hot outputs weighted and summed in numpy (what a user does without a batched export);
- branches: ONE graph holding N separate member subgraphs, weighted one-hot votes summed with a Sum
  node (the VotingClassifier pattern);
- numpy: GibbsEnsemble.predict, for reference.
Time per call: median of repeated calls (at least REPEAT_SECONDS
per case), after a warm-up; session creation is reported separately. All four agree on the labels
(checked). Writes OUT/gibbs-bench.json and the table between the bench markers of OUT/gibbs.md
(created with just the markers if missing; scripts/reproduce_gibbs.py keeps the section).
The inputs are random uniform [0, 1) vectors: the cost does not depend on the data.
"""
from __future__ import annotations

import os

# numpy's BLAS on one thread unless the caller says otherwise: on this shared 2-core machine,
# multi-threaded OpenBLAS was 2.5-7x slower than one thread when other jobs kept the cores busy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.io import files as fileio  # noqa: E402
from onnxprune.runtime import runtime_copy, session_options  # noqa: E402
from onnxprune_gibbs import GibbsEnsemble, to_onnx  # noqa: E402
from onnxprune_gibbs.report import md_table  # noqa: E402

BENCH_START, BENCH_END = "<!-- bench_ensemble:start -->", "<!-- bench_ensemble:end -->"
REPEAT_SECONDS = 1.0


def branch_graph(est: GibbsEnsemble) -> onnx.ModelProto:
    """ONE graph with a separate subgraph per member and a Sum of weighted one-hot votes."""
    bank = est.members_
    K = est.n_classes_
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    x = node("Cast", ["x"], "x64", to=TensorProto.DOUBLE)
    if est.x_mean_ is not None:
        x = node("Sub", [x, const("center", est.x_mean_)], "xc")
    classes = const("classes", np.arange(K, dtype=np.int64))
    terms = []
    for k in range(bank.n_members):
        cur = x
        for i, (w, b) in enumerate(zip(bank.weights, bank.biases, strict=True)):
            if i:
                cur = node("Tanh" if bank.activation == "tanh" else "Relu", [cur], f"m{k}_h{i}")
            const(f"m{k}_W{i}", w[k].astype(np.float32))
            weight = node("Cast", [f"m{k}_W{i}"], f"m{k}_W{i}_64", to=TensorProto.DOUBLE)
            cur = node("MatMul", [cur, weight], f"m{k}_z{i}")
            if b is not None:
                const(f"m{k}_b{i}", b[k].astype(np.float32))
                bias = node("Cast", [f"m{k}_b{i}"], f"m{k}_b{i}_64", to=TensorProto.DOUBLE)
                cur = node("Add", [cur, bias], f"m{k}_zb{i}")
        lab = node("ArgMax", [cur], f"m{k}_label", axis=1, keepdims=1)
        hit = node("Cast", [node("Equal", [lab, classes], f"m{k}_eq")], f"m{k}_onehot", to=TensorProto.DOUBLE)
        terms.append(node("Mul", [hit, const(f"m{k}_p", np.array(est.weights_[k]))], f"m{k}_vote"))
    votes = node("Sum", terms, "votes")
    node("ArgMax", [votes], "label", axis=1, keepdims=0)
    node("Cast", [votes], "probabilities", to=TensorProto.FLOAT)
    graph = helper.make_graph(nodes, "branches",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", bank.n_features])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", K]),
                               helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def bench_session(model: onnx.ModelProto, threads: int):
    """A session with ``threads`` intra-op threads, without memory arena and memory patterns, for
    every variant alike. With arenas (and per-session thread pools), 1000 one-member sessions run at
    batch 1000 held ~13 GB (measured: the first attempt ran the machine out of memory); on one thread
    and without arenas they hold ~1 MB each."""
    import onnxruntime as ort

    so = session_options(threads=threads)
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    return ort.InferenceSession(runtime_copy(model).SerializeToString(), sess_options=so,
                                providers=["CPUExecutionProvider"])


def timed(fn, *args, min_seconds: float = REPEAT_SECONDS, min_calls: int = 3) -> float:
    """Median seconds per call of fn(*args) (after one warm-up call)."""
    fn(*args)
    times: list[float] = []
    total = 0.0
    while total < min_seconds or len(times) < min_calls:
        start = time.perf_counter()
        fn(*args)
        dt = time.perf_counter() - start
        times.append(dt)
        total += dt
    return statistics.median(times)


def bench_case(kind: str, hidden: tuple, N: int, batches: list[int], threads: int, verbose: bool) -> dict:
    rng = np.random.default_rng(0)
    d, K = 784, 10
    Xfit = rng.random((600, d)).astype(np.float32)
    yfit = rng.integers(0, K, 600)
    est = GibbsEnsemble(n_members=N, kind=kind, hidden=hidden, center=True, temperature=0.02, random_state=1,
                        n_classes=K).fit(Xfit, yfit)
    t0 = time.perf_counter()
    batched = bench_session(to_onnx(est), threads)
    setup_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    singles = [bench_session(to_onnx(est.select_members([k])), threads) for k in range(N)]
    setup_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    branches = bench_session(branch_graph(est), threads)
    setup_branches = time.perf_counter() - t0
    weights = est.weights_

    def loop(x):
        votes = np.zeros((len(x), K))
        for w, s in zip(weights, singles, strict=True):
            votes += w * s.run(["probabilities"], {"x": x})[0]
        return votes.argmax(axis=1)

    rows = []
    for bs in batches:
        x = rng.random((bs, d)).astype(np.float32)
        ref = est.predict(x)
        lab_b = batched.run(["label"], {"x": x})[0]
        lab_br = branches.run(["label"], {"x": x})[0]
        agree = dict(batched=int(np.sum(lab_b == ref)), branches=int(np.sum(lab_br == ref)),
                     loop=int(np.sum(loop(x) == ref)))
        t_b = timed(batched.run, ["label"], {"x": x})
        t_l = timed(loop, x)
        t_br = timed(branches.run, ["label"], {"x": x})
        t_np = timed(est.predict, x)
        row = dict(kind=kind, hidden=list(hidden), N=N, batch=bs, threads=threads, batched_s=t_b, loop_s=t_l,
                   branches_s=t_br, numpy_s=t_np,
                   loop_over_batched=t_l / t_b, branches_over_batched=t_br / t_b, numpy_over_batched=t_np / t_b,
                   agree_with_estimator=agree)
        rows.append(row)
        if verbose:
            print(f"{kind}{hidden} N={N} batch {bs} threads {threads}: batched {1e3 * t_b:.2f} ms, loop "
                  f"{1e3 * t_l:.2f} ms "
                  f"(x{t_l / t_b:.1f}), branches {1e3 * t_br:.2f} ms (x{t_br / t_b:.1f}), numpy {1e3 * t_np:.2f} ms",
                  file=sys.stderr, flush=True)
    setup = dict(batched=setup_batched, loop=setup_loop, branches=setup_branches)
    return dict(kind=kind, hidden=list(hidden), N=N, threads=threads, setup_seconds=setup, rows=rows)


def _name(case: dict) -> str:
    return "linear" if case["kind"] == "perceptron" else "MLP 784-" + "-".join(map(str, case["hidden"])) + "-10 tanh"


def markdown(results: dict) -> str:
    rows = []
    for case in results["cases"]:
        for r in case["rows"]:
            ok = all(v == r["batch"] for v in r["agree_with_estimator"].values())
            rows.append([_name(case), r["N"], r["batch"], r["threads"], f"{1e3 * r['batched_s']:.2f}",
                         f"{1e3 * r['loop_s']:.2f}", f"**x{r['loop_over_batched']:.1f}**",
                         f"{1e3 * r['branches_s']:.2f}", f"x{r['branches_over_batched']:.1f}",
                         f"{1e3 * r['numpy_s']:.2f}", "yes" if ok else "NO"])
    setup = "; ".join(f"{_name(c)} N={c['N']} ({c['threads']} thread{'s' if c['threads'] > 1 else ''}): batched "
                      f"{c['setup_seconds']['batched']:.2f} s, loop {c['setup_seconds']['loop']:.2f} s, branches "
                      f"{c['setup_seconds']['branches']:.2f} s" for c in results["cases"])
    all_loop = [r["loop_over_batched"] for c in results["cases"] for r in c["rows"]]
    lines = []
    for threads in sorted({c["threads"] for c in results["cases"]}):
        sel = [r for c in results["cases"] if c["threads"] == threads for r in c["rows"]]
        for kind, label in (("perceptron", "linear"), ("mlp", "MLP")):
            part = [r for r in sel if r["kind"] == kind]
            if not part:
                continue
            loop = [r["loop_over_batched"] for r in part]
            br = [r["branches_over_batched"] for r in part]
            lines.append(f"- {threads} thread{'s' if threads > 1 else ''}, {label} members: the loop over members "
                         f"takes **x{min(loop):.1f} to x{max(loop):.1f}** the batched graph's time (median "
                         f"x{statistics.median(loop):.1f}); one graph with N branches x{min(br):.1f} to x{max(br):.1f} "
                         "(below 1: faster than the batched graph).")
    cases = [(r, c) for c in results["cases"] for r in c["rows"]]
    most = max(cases, key=lambda rc: rc[0]["loop_over_batched"])
    least = min(cases, key=lambda rc: rc[0]["loop_over_batched"])
    slower = sum(x <= 1 for x in all_loop)
    agree = sum(all(v == r["batch"] for v in r["agree_with_estimator"].values()) for r, _ in cases)
    return "\n".join([
        "### Throughput: one batched graph vs looping over members\n",
        "\n".join(lines) + "\n",
        f"The batched graph gains most over the loop with {_name(most[1])} members, N = {most[0]['N']}, batch "
        f"{most[0]['batch']}, {most[0]['threads']} thread(s) (x{most[0]['loop_over_batched']:.1f}), and least with "
        f"{_name(least[1])} members, N = {least[0]['N']}, batch {least[0]['batch']}, {least[0]['threads']} thread(s) "
        f"(x{least[0]['loop_over_batched']:.1f}). "
        + ("It is faster than the loop in every case measured.\n" if not slower else
           f"In {slower} of {len(all_loop)} cases it is not faster than the loop.\n"),
        f"Measured by `{results['command']}` in one run on {results['machine']}, onnxruntime "
        f"{results['onnxruntime']} (CPU, every session without memory arena). Milliseconds per call (median); ratios "
        "are loop (or branches) time / batched time. *loop*: N one-member graphs run from Python, votes summed in "
        "numpy; *branches*: one graph with N separate member subgraphs and a Sum; *numpy*: `GibbsEnsemble.predict` "
        f"(OpenBLAS on one thread). All four give the estimator's labels in {agree} of {len(cases)} cases (last "
        "column). Numbers are in `gibbs-bench.json`.\n",
        md_table(["members", "N", "batch", "onnxruntime threads", "batched ms", "loop ms", "loop / batched",
                  "branches ms", "branches / batched", "numpy ms", "same labels"], rows),
        f"\nSession creation: {setup}. Load average (1, 5, 15 min) of the machine: {results['load_before']} "
        f"before, {results['load_after']} after (ratios come from one run).",
    ])


def update_markdown(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else f"# Gibbs ensembles\n\n{BENCH_START}\n{BENCH_END}\n"
    if BENCH_START not in text or BENCH_END not in text:
        text = text.rstrip("\n") + f"\n\n{BENCH_START}\n{BENCH_END}\n"
    head, rest = text.split(BENCH_START, 1)
    _, tail = rest.split(BENCH_END, 1)
    fileio.write_text(path, f"{head}{BENCH_START}\n{section}\n{BENCH_END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default docs/results; out/gibbs-quick with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--render", action="store_true", help="measure nothing: rewrite the section from "
                                                          "OUT/gibbs-bench.json")
    args = ap.parse_args(argv)
    verbose = args.verbose or sys.stderr.isatty()
    out = Path(args.out or (ROOT / "out" / "gibbs-quick" if args.quick else ROOT / "docs" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "gibbs-bench.json"
    if args.render:
        update_markdown(out / "gibbs.md", markdown(json.loads(json_path.read_text())))
        return 0
    fileio.check_output_path(json_path, force=args.force)
    import onnxruntime

    # one thread: batches up to 1000; two threads (onnxruntime's default here): batches 1 and 64 only,
    # because one-member sessions with their own thread pools keep ~13 MB each at batch 1000.
    kinds = [("perceptron", (), 100), ("perceptron", (), 1000), ("mlp", (32,), 100), ("mlp", (32,), 1000)]
    plan = [(k, h, n, [1, 64, 1000], 1) for k, h, n in kinds] + [(k, h, n, [1, 64], 2) for k, h, n in kinds]
    if args.quick:
        plan = [("perceptron", (), 50, [1, 64], 1), ("mlp", (16,), 50, [1, 64], 1), ("perceptron", (), 50, [1, 64], 2)]
    start = time.perf_counter()
    load_before = [round(v, 2) for v in os.getloadavg()]
    results = dict(
        load_before=load_before,
        command="python scripts/bench_ensemble.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=f"{platform.machine()} {platform.system()}, Python {platform.python_version()}, "
                f"{__import__('os').cpu_count()} cores, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}",
        onnxruntime=onnxruntime.__version__,
        cases=[bench_case(k, h, n, b, t, verbose) for k, h, n, b, t in plan])
    results["seconds"] = time.perf_counter() - start
    results["load_after"] = [round(v, 2) for v in os.getloadavg()]
    fileio.write_json(json_path, results)
    update_markdown(out / "gibbs.md", markdown(results))
    if verbose:
        print(f"wrote {json_path} and the bench section of {out / 'gibbs.md'} ({results['seconds']:.0f} s)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    from onnxprune.errors import run_script

    run_script(main)
