"""Prune every model of the real-export corpus (scripts/export_corpus.py) as a user would, from the command
line, and record what happened: docs/results/corpus.md and corpus.json.

Per model: exporter, ops, the prunable fraction of its conv/dense weights (`onnxprune inspect --json`), the
gradient engine the prune report names, and for `prune --sparsity 0.5 --method ecp` (the defaults) and
`--method magnitude`: exit code and one-line error, seconds, peak RSS, whether the written model passes
onnx.checker's full check and runs on onnxruntime with finite outputs, and its relative output error
(mean squared difference from the dense model on the protected output, over the dense output's mean square)
on the test data. Each prune runs as its own subprocess under a time and address-space limit.

Data: the files scripts/corpus_data.py made for the model where its manifest entry has them (natural images,
rendered text, synthesized audio, real files; first --calib/--large-calib and --test samples), real MNIST
(models/mnist_calib.npz, models/mnist_test.npz) for MNIST-shaped models, otherwise seeded random data of each
input's shape and dtype from the manifest (token ids below the vocabulary size).

    .venv/bin/python scripts/corpus.py [--corpus out/corpus] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

ROOT = Path(__file__).resolve().parents[1]
DENSE_OPS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1), "LSTM": (1, 2), "GRU": (1, 2),
             "RNN": (1, 2), "Einsum": None}
METHODS = ("ecp", "magnitude")
QUOTED, NAME = re.compile(r"'[^']*'"), "'…'"          # skip reasons grouped with the names left out

# Runs one command, prints its exit code and peak RSS (its own children only) as JSON on the last line.
MEASURE = r"""
import json, resource, subprocess, sys, time
limit = int(sys.argv[1])
def cap():
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
start = time.perf_counter()
try:
    proc = subprocess.run(sys.argv[3:], preexec_fn=cap, capture_output=True, text=True, timeout=float(sys.argv[2]))
    rc, err = proc.returncode, proc.stderr
except subprocess.TimeoutExpired as exc:
    rc, err = "timeout", (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
sys.stderr.write(err)
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


# ------------------------------------------------------------------------------------------------ the model
def all_nodes(graph):
    """Every node, subgraphs (If/Loop/Scan bodies) included, with the depth it sits at."""
    for node in graph.node:
        yield node, graph
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from all_nodes(g)


def op_counts(model):
    top = Counter(n.op_type for n in model.graph.node)
    inner = Counter(n.op_type for n, g in all_nodes(model.graph) if g is not model.graph)
    return top, inner


def dense_weights(model):
    """Constant tensors of rank >= 2 feeding a conv/dense/recurrent op (initializers, Constant nodes, and
    tensors computed from constants only, e.g. weight normalisation), by name: {name: (size, consumer op)}."""
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    found = {}
    for graph_nodes, graph in _graphs(model.graph):
        consts = {t.name: list(t.dims) for t in graph.initializer}
        for node in graph_nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                consts[node.output[0]] = list(node.attribute[0].t.dims)
        const_names = set(consts)
        for node in graph_nodes:           # nodes are topologically sorted: constant folding closure
            if node.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike") \
                    and node.input and all(i in const_names for i in node.input if i):
                const_names.update(node.output)
        for node in graph_nodes:
            if node.op_type not in DENSE_OPS:
                continue
            slots = DENSE_OPS[node.op_type] or range(len(node.input))
            for i in slots:
                if i >= len(node.input) or node.input[i] not in const_names:
                    continue
                name = node.input[i]
                shape = consts.get(name, shapes.get(name))
                if shape is not None and len(shape) >= 2:
                    found.setdefault(name, (int(np.prod(shape)), node.op_type))
    return found


def _graphs(graph):
    yield list(graph.node), graph
    for node in graph.node:
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(g)


def category(top, inner):
    ops = set(top) | set(inner)
    if ops & {"LSTM", "GRU", "RNN", "Scan", "Loop"}:
        return "recurrent"
    if "Softmax" in ops and "MatMul" in ops and ops & {"LayerNormalization", "ReduceMean"}:   # attention blocks
        return "transformer"
    if ops & {"Conv", "ConvTranspose"}:
        return "cnn"
    return "dense"


# ------------------------------------------------------------------------------------------------------ data
def make_data(entry, n, seed, split):
    """Feeds (and labels for MNIST) from the manifest's input specs."""
    rng = np.random.default_rng(seed)
    feeds, labels = {}, None
    for inp in entry["inputs"]:
        shape = [n if d == "N" else d for d in inp["shape"]]
        dtype = np.dtype(inp["dtype"])
        if inp.get("data") == "mnist":
            raw = np.load(ROOT / "models" / ("mnist_calib.npz" if split == "calib" else "mnist_test.npz"))
            x = raw["x"][:n].astype(np.float32) / 255.0
            feeds[inp["name"]] = x.reshape([len(x)] + [d for d in inp["shape"][1:]]).astype(dtype)
            labels = raw["y"][:n].astype(np.int64)
        elif "fill" in inp:
            feeds[inp["name"]] = np.full(shape, inp["fill"], dtype)
        elif dtype.kind in "iu":
            feeds[inp["name"]] = rng.integers(inp.get("low", 0), inp.get("high", 2), size=shape).astype(dtype)
        else:
            feeds[inp["name"]] = rng.standard_normal(shape).astype(dtype)
    return feeds, labels


def load_data(corpus, entry, split, n):
    """The data scripts/corpus_data.py made for the model (entry["data"]): its first n samples along each input's
    batch axis (scalars as they are), and its labels y if it has them."""
    data = entry["data"]
    with np.load(corpus / data[split]) as z:
        arrays = {k: z[k] for k in z.files}
    labels = arrays.pop("y", None)
    feeds = {}
    for name, x in arrays.items():
        axis = data["batch_axes"].get(name, 0)
        feeds[name] = x if axis is None or x.ndim == 0 else np.take(x, np.arange(min(n, x.shape[axis])), axis=axis)
    return feeds, (None if labels is None else labels[:n])


def batch_axis_flags(entry):
    """--batch-axis NAME=AXIS for inputs whose samples are not on axis 0 (Silero's state)."""
    axes = (entry.get("data") or {}).get("batch_axes", {})
    return [f for name, axis in axes.items() if axis not in (0, None) for f in ("--batch-axis", f"{name}={axis}")]


def calibration_size(entry, args):
    if any(inp.get("data") == "mnist" for inp in entry["inputs"]):
        return args.mnist_calib
    big = any(isinstance(d, int) and d >= 200 for inp in entry["inputs"] for d in inp["shape"])
    return args.large_calib if big else args.calib


# ------------------------------------------------------------------------------------------------ measuring
def run_measured(cmd, args):
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(args.memory_limit_gb * 2**30), str(args.timeout)]
                          + [str(c) for c in cmd], capture_output=True, text=True)
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    stats["error"] = (errors or lines or [""])[-1][:400] if stats["rc"] != 0 else None
    if stats["rc"] == "timeout":
        stats["error"] = f"killed after the {args.timeout:.0f} s limit"
    return stats


def with_output(model, name):
    """The model with tensor ``name`` exposed as a graph output (the protected tensor may be internal)."""
    if name in [o.name for o in model.graph.output]:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def run_outputs(path_or_model, feeds, name):
    import onnxruntime as ort
    model = onnx.load(path_or_model) if isinstance(path_or_model, (str, Path)) else path_or_model
    model = with_output(model, name)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in sess.get_inputs()]
    if len(inputs) == len(feeds) == 1:  # a single-input model takes its array under any name, as prune does
        feeds = {inputs[0]: next(iter(feeds.values()))}
    outs = sess.run(None, feeds)
    names = [o.name for o in sess.get_outputs()]
    return {k: np.asarray(v) for k, v in zip(names, outs)}


def check_written(path, test_feeds, dense, tensor):
    """onnx.checker full check, onnxruntime run, finiteness and relative output error of a written model."""
    out = {"checker": None, "runs": None, "finite": None, "rel_error": None}
    try:
        onnx.checker.check_model(str(path), full_check=True)
        out["checker"] = "ok"
    except Exception as exc:
        out["checker"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    try:
        pruned = run_outputs(path, test_feeds, tensor)
        out["runs"] = "ok"
    except Exception as exc:
        out["runs"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return out
    out["finite"] = bool(all(np.isfinite(v).all() for v in pruned.values() if v.dtype.kind == "f"))
    a, b = dense[tensor].astype(np.float64), pruned[tensor].astype(np.float64)
    out["rel_error"] = float(np.mean((b - a) ** 2) / max(np.mean(a ** 2), 1e-30))
    return out


def study(name, entry, corpus, work, args):
    path = corpus / f"{name}.onnx"
    model = onnx.load(str(path))
    top, inner = op_counts(model)
    row = {"model": name, "family": entry["family"], "exporter": entry["exporter"], "architecture": entry["architecture"],
           "weights": entry["weights"], "trained": entry["trained"], "bytes": path.stat().st_size,
           "ops": dict(top.most_common()), "subgraph_ops": dict(inner.most_common()),
           "category": category(top, inner), "inputs": entry["inputs"]}
    dense = dense_weights(model)
    row["dense_weights"] = sum(size for size, _ in dense.values())
    inspect_json = work / f"{name}.inspect.json"
    stats = run_measured([args.onnxprune, "inspect", path, "--json", inspect_json, "-q"], args)
    row["inspect"] = {"rc": stats["rc"], "error": stats["error"]}
    protected = None
    if stats["rc"] == 0:
        report = json.loads(inspect_json.read_text())
        row["prunable_weights"] = sum(lay["weights"] for lay in report["layers"])
        row["prunable_layers"] = len(report["layers"])
        row["skipped"] = Counter(f"{s['op']}: {re.sub(QUOTED, NAME, s['reason'])}" for s in report["skipped"]).most_common()
        protected = report["protected_output"]
    row["prunable_fraction"] = (row.get("prunable_weights", 0) / row["dense_weights"]) if row["dense_weights"] else None

    n_calib = calibration_size(entry, args)
    if entry.get("data"):              # made by scripts/corpus_data.py: real images, text, audio, files
        calib, _ = load_data(corpus, entry, "calib", n_calib)
        test, labels = load_data(corpus, entry, "test", args.test)
        row["data"] = entry["data"]["kind"]
    else:
        calib, _ = make_data(entry, n_calib, args.seed, "calib")
        test, labels = make_data(entry, args.mnist_test if labels_wanted(entry) else args.test, args.seed + 1, "test")
        row["data"] = "mnist" if labels_wanted(entry) else "random"
    np.savez(work / f"{name}.calib.npz", **calib, **({} if _ is None else {"y": _}))
    np.savez(work / f"{name}.test.npz", **test, **({} if labels is None else {"y": labels}))
    row["calibration_samples"] = len(next(v for v in calib.values() if v.ndim)) if calib else 0
    row["test_samples"] = len(next(v for v in test.values() if v.ndim)) if test else 0
    tensor = protected or first_float_output(model)
    row["compared_tensor"] = tensor
    try:
        dense_out = run_outputs(path, test, tensor)
        row["dense_runs"] = "ok"
    except Exception as exc:
        dense_out = None
        row["dense_runs"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    for method in METHODS:
        out = work / f"{name}.{method}.onnx"
        out.unlink(missing_ok=True)
        report_path = work / f"{name}.{method}.json"
        report_path.unlink(missing_ok=True)
        cmd = [args.onnxprune, "prune", path, out, "--data", work / f"{name}.calib.npz", "--sparsity", "0.5",
               "--method", method, "--test", work / f"{name}.test.npz", "--json", report_path, "-q"] + batch_axis_flags(entry)
        res = run_measured(cmd, args)
        if res["rc"] == 0 and report_path.exists():
            report = json.loads(report_path.read_text())
            res["engine"] = (report.get("engine") or {}).get("name")
            res["engine_reason"] = (report.get("engine") or {}).get("reason")
            section = report.get("weights") or {}
            res["sparsity"] = section.get("sparsity")
            res["layer_weights"] = sum(layer["weights"] for layer in section.get("layers", []))
            res["accuracy"] = (report.get("test") or {}).get("pruned", {}).get("accuracy")
            row["dense_accuracy"] = (report.get("test") or {}).get("original", {}).get("accuracy")
            if dense_out is not None and out.exists():
                res.update(check_written(out, test, dense_out, tensor))
        row[method] = res
        if method == "ecp" and res.get("layer_weights"):  # what prune found, with the data's shapes (inspect has none)
            row["prunable_weights"] = res["layer_weights"]
            row["prunable_fraction"] = res["layer_weights"] / row["dense_weights"] if row["dense_weights"] else None
        print(f"{name} {method}: rc {res['rc']}, {res['seconds']:.1f} s, {res['peak_rss_mb']:.0f} MB"
              + (f", rel error {res['rel_error']:.4g}" if res.get("rel_error") is not None else "")
              + (f": {res['error']}" if res.get("error") else ""), flush=True)
    return row


def labels_wanted(entry):
    return any(inp.get("data") == "mnist" for inp in entry["inputs"])


def first_float_output(model):
    for o in model.graph.output:
        if o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            return o.name
    return model.graph.output[0].name


# --------------------------------------------------------------------------------------------------- report
def fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def passed(res):
    return res.get("rc") == 0 and res.get("checker") == "ok" and res.get("runs") == "ok" and res.get("finite")


def summary(rows):
    """Sentences computed from the rows: the issue's done-means figures, measured."""
    n = len(rows)
    lines = []
    ecp_ok = [r["model"] for r in rows if passed(r["ecp"])]
    lines.append(f"`prune --sparsity 0.5` (defaults, ECP) exited 0 and wrote a model that passes onnx.checker's "
                 f"full check and runs on onnxruntime with finite outputs on {len(ecp_ok)} of {n} models.")
    codes = Counter(str(r["ecp"]["rc"]) for r in rows)
    lines.append("ECP exit codes: " + ", ".join(f"{c}: {k} model(s)" for c, k in sorted(codes.items())) + ".")
    ones = [r["model"] for r in rows if r["ecp"]["rc"] == 1 or r["magnitude"]["rc"] == 1]
    lines.append(f"Models with an exit code 1 (ECP or magnitude): {len(ones)}" + (f" ({', '.join(ones)})." if ones else "."))
    trained = [r for r in rows if r["trained"] and r["ecp"].get("rel_error") is not None
               and r["magnitude"].get("rel_error") is not None]
    good = [r for r in trained if r["ecp"]["rel_error"] <= 0.5 * r["magnitude"]["rel_error"]]
    lines.append(f"On the {len(trained)} trained or pretrained models where both methods ran, ECP's relative output error "
                 f"was <= 0.5x magnitude's on {len(good)}"
                 + (f"; not on {', '.join(r['model'] for r in trained if r not in good)}." if len(good) < len(trained) else "."))
    wanted = [r for r in rows if r["category"] in ("cnn", "transformer") and r.get("prunable_fraction") is not None]
    high = [r for r in wanted if r["prunable_fraction"] >= 0.95]
    low = ", ".join(f"{r['model']} ({100 * r['prunable_fraction']:.0f}%)" for r in wanted if r not in high)
    lines.append(f"Prunable fraction >= 95% of the conv/dense weights on {len(high)} of {len(wanted)} CNN and transformer "
                 f"exports" + (f"; below on {low}." if low else "."))
    big = [r for r in rows if r["category"] == "cnn" and any(224 in inp["shape"] for inp in r["inputs"])]
    for r in big:
        res = r["ecp"]
        lines.append(f"{r['model']} (224x224, {r['calibration_samples']} calibration images): ECP peak RSS "
                     f"{res['peak_rss_mb']:.0f} MB, exit {res['rc']}" + (f" ({res['error']})" if res.get("error") else "") + ".")
    return lines


def markdown(rows, meta):
    out = ["# Real exports: does `prune --sparsity 0.5` work on them?", "",
           f"Command: `{meta['command']}`. onnxprune {meta['onnxprune']}, onnx {meta['onnx']}, onnxruntime "
           f"{meta['onnxruntime']}; each prune a subprocess limited to {meta['timeout_s']:.0f} s and "
           f"{meta['memory_limit_gb']} GB of address space. Relative error = mean squared difference of the compared "
           f"tensor (the protected output) from the dense model's / its mean square, on the test data. Prunable = "
           f"the weights of the layers the ECP prune scored where the row records them (`layer_weights` in the JSON; "
           f"prune measures on the data the shapes inference leaves unknown), else those `inspect` lists. "
           f"{meta['models']} models from {len(meta['exporters'])} exporters ({', '.join(meta['exporters'])}).", ""]
    out += ["## Summary", ""] + [f"- {s}" for s in summary(rows)] + [""]
    out += ["## Per model", "",
            "| model | exporter | kind | weights | prunable (of conv/dense) | engine | ECP rel. error | magnitude rel. error | "
            "ECP / magnitude | ECP exit | written model (checker, ORT) | ECP s | ECP peak RSS MB | magnitude exit |",
            "| " + " | ".join(["---"] * 14) + " |"]
    for r in rows:
        e, m = r["ecp"], r["magnitude"]
        frac = r.get("prunable_fraction")
        ratio = (e["rel_error"] / m["rel_error"]) if e.get("rel_error") is not None and m.get("rel_error") else None
        checks = f"checker {e.get('checker')}, ORT {e.get('runs')}, finite {e.get('finite')}"
        written = "ok" if passed(e) else ("-" if e["rc"] != 0 else checks)
        share = "-" if frac is None else f"{100 * frac:.1f}% ({r.get('prunable_weights', 0):,} of {r['dense_weights']:,})"
        out.append(f"| {r['model']} | {r['exporter']} | {r['category']} | {'trained' if r['trained'] else 'random'} | "
                   f"{share} | "
                   f"{e.get('engine') or '-'} | {fmt(e.get('rel_error'))} | {fmt(m.get('rel_error'))} | {fmt(ratio, '.2f')} | "
                   f"{e['rc']} | {written} | {e['seconds']:.1f} | {e['peak_rss_mb']:.0f} | {m['rc']} |")
    out += ["", "## Failures (exact one-line errors)", ""]
    for r in rows:
        for what in ("inspect", "ecp", "magnitude"):
            res = r[what]
            if res.get("rc") != 0:
                out.append(f"- {r['model']}, {what}: exit {res['rc']}: `{res.get('error')}`")
            elif what != "inspect" and not passed(res):
                out.append(f"- {r['model']}, {what}: exit 0 but checker {res.get('checker')}, onnxruntime {res.get('runs')}, "
                           f"finite {res.get('finite')}")
    out += ["", "## What inspect skips", ""]
    for r in rows:
        if r.get("skipped"):
            out.append(f"- {r['model']}: " + "; ".join(f"{k} x {why}" for why, k in r["skipped"]))
    out += ["", "## Ops", ""]
    for r in rows:
        ops = ", ".join(f"{k} {v}" for k, v in r["ops"].items())
        inner = ", ".join(f"{k} {v}" for k, v in r["subgraph_ops"].items())
        out.append(f"- {r['model']} ({r['architecture']}; {r['weights']}): {ops}" + (f"; in subgraphs: {inner}" if inner else ""))
    return "\n".join(out) + "\n"


def render(rows, meta):
    text = markdown(rows, meta)
    if meta["failed_exports"]:
        text += "\n## Exports that failed (not in the tables)\n\n" + "".join(
            f"- {n}: `{e.splitlines()[0][:300]}`\n" for n, e in sorted(meta["failed_exports"].items()))
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / "out" / "corpus")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "corpus")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--calib", type=int, default=64, help="calibration samples of random-data models")
    ap.add_argument("--large-calib", type=int, default=16, help="calibration samples of 224x224-sized inputs")
    ap.add_argument("--mnist-calib", type=int, default=256)
    ap.add_argument("--test", type=int, default=32)
    ap.add_argument("--mnist-test", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--memory-limit-gb", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render", action="store_true", help="rewrite the markdown from the JSON, measuring nothing")
    args = ap.parse_args()
    if args.render:
        recorded = json.loads(Path(f"{args.out}.json").read_text())
        for r in recorded["models"]:
            r["category"] = category(Counter(r["ops"]), Counter(r["subgraph_ops"]))
        Path(f"{args.out}.json").write_text(json.dumps(recorded, indent=1, default=str) + "\n")
        Path(f"{args.out}.md").write_text(render(recorded["models"], recorded["meta"]))
        return 0
    args.onnxprune = str(Path(sys.executable).parent / "onnxprune")
    manifest = json.loads((args.corpus / "MANIFEST.json").read_text())
    names = [n for n in sorted(manifest) if "export_error" not in manifest[n] and (not args.only or n in args.only)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append({**study(name, manifest[name], args.corpus, Path(tmp), args),
                         "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    previous = Path(f"{args.out}.json")
    if args.only and previous.exists():         # --only re-measures those models and keeps the other rows
        kept = [r for r in json.loads(previous.read_text())["models"] if r["model"] not in args.only
                and r["model"] in manifest and "export_error" not in manifest[r["model"]]]
        rows = sorted(kept + rows, key=lambda r: r["model"])
    failed_exports = {n: e["export_error"] for n, e in manifest.items() if "export_error" in e}
    import importlib.metadata as md

    import onnxruntime
    meta = {"command": "python scripts/corpus.py" + (" (rows re-measured with --only kept beside earlier rows; each "
                                                      "row's time is under 'measured' in the JSON)" if args.only else ""),
            "onnxprune": md.version("onnxprune"), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "timeout_s": args.timeout, "memory_limit_gb": args.memory_limit_gb, "models": len(rows),
            "exporters": sorted({r["exporter"].split(" (")[0].split(" ")[0] if r["family"] == "wheel" else r["family"]
                                 for r in rows}), "failed_exports": failed_exports,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "models": rows}, indent=1, default=str) + "\n")
    Path(f"{args.out}.md").write_text(render(rows, meta))
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    sys.exit(main())
