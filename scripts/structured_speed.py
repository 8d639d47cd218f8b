"""Does the default structured prune make real models faster than dense on onnxruntime CPU? Runs
``onnxprune prune MODEL OUT --data CALIB --structured --sparsity R --test TEST --json R.json
--time-batches 1,32`` as a user would (default options otherwise), each run its own subprocess under a
time limit and an address-space cap, and records from its JSON report: units, parameters and MACs
before and after, the kept-count multiples the tool chose, the paired timing (pruned / dense time per
sample at batch 1 and 32, one thread and onnxruntime's default threads: median and quartiles of the
paired repeats), ``faster_than_dense``, and the accuracy drop (labelled data) and relative output error
on the test data. Writes docs/results/structured-speed.md and .json after every run (rows of other
runs are kept: re-measure some with --only).

    .venv/bin/python scripts/structured_speed.py --corpus CORPUS_DIR [--only NAME ...] [--ratios 0.3,0.5]
    .venv/bin/python scripts/structured_speed.py --render        # the markdown again from the JSON

The MNIST models of models/ use models/mnist_calib.npz and models/mnist_test.npz; the corpus models
(scripts/export_corpus.py) their manifest's calibration and test data, the first --samples of each
(the derivative graphs of a 224x224 network on 64 samples take longer than a run's limit here).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from corpus import run_measured  # noqa: E402  (the subprocess runner with its time and memory limits)

from studies.timer import ratio_rows  # noqa: E402

MNIST = ["mnist_cnn", "mnist_silu_cnn", "mnist_mobilenet", "mnist_vit", "mnist_resnet", "mnist_transformer"]
CORPUS = ["nudenet_yolov8n_320", "tv_legacy_mobilenet_v2", "tv_legacy_resnet50", "timm_legacy_vit_small_patch16_224",
          "tv_legacy_shufflenet_v2_x1_0"]
TIME_BATCHES = "1,32"


def first_samples(src: Path, dst: Path, count: int) -> Path:
    """The first ``count`` samples of every array of an .npz (all arrays share the batch axis 0)."""
    with np.load(src) as data:
        np.savez(dst, **{k: data[k][:count] for k in data.files})
    return dst


def datasets(name: str, args, work: Path) -> tuple[Path, Path, str]:
    """Calibration and test files of a model and how they were chosen."""
    if name.startswith("mnist_"):
        return ROOT / "models" / "mnist_calib.npz", ROOT / "models" / "mnist_test.npz", \
            "models/mnist_calib.npz (2,048), models/mnist_test.npz (10,000)"
    entry = json.loads((args.corpus / "MANIFEST.json").read_text())[name]["data"]
    calib = first_samples(args.corpus / entry["calib"], work / f"{name}.calib.npz", args.samples)
    test = first_samples(args.corpus / entry["test"], work / f"{name}.test.npz", args.samples)
    return calib, test, f"{entry['kind']}: first {args.samples} of the corpus calibration and test samples"


def model_path(name: str, args) -> Path:
    return ROOT / "models" / f"{name}.onnx" if name.startswith("mnist_") else args.corpus / f"{name}.onnx"


def run_one(name: str, ratio: float, args, work: Path) -> dict:
    calib, test, data_text = datasets(name, args, work)
    out, report = work / f"{name}.{ratio}.onnx", work / f"{name}.{ratio}.json"
    cmd = [str(Path(sys.executable).parent / "onnxprune"), "prune", model_path(name, args), out, "--data", calib,
           "--structured", "--sparsity", str(ratio), "--test", test, "--json", report, "--time-batches", TIME_BATCHES,
           "--force", "-q"]
    res = run_measured(cmd, args)
    row = {"model": name, "ratio": ratio, "data": data_text, "rc": res["rc"], "error": res["error"],
           "seconds": res["seconds"], "peak_rss_mb": res["peak_rss_mb"],
           "command": f"onnxprune prune {name}.onnx OUT --data CALIB --structured --sparsity {ratio} --test TEST "
                      f"--json R.json --time-batches {TIME_BATCHES}"}
    if report.exists():
        rep = json.loads(report.read_text())
        units = rep.get("units") or {}
        row.update({k: units.get(k) for k in ("units_before", "units_after", "params_before", "params_after",
                                             "macs_before", "macs_after", "multiples")})
        row["faster_than_dense"] = rep.get("faster_than_dense")
        row["warnings"] = rep.get("warnings")
        row["timing"] = ratio_rows(rep["timing"]) if rep.get("timing") else []
        test_rep = rep.get("test") or {}
        dense, pruned = test_rep.get("original") or {}, test_rep.get("pruned") or {}
        row["relative_error"] = pruned.get("relative_error")
        row["worst_part"] = pruned.get("worst_part")
        row["output_errors"] = [{"part": p["part"], "relative_error": p["relative_error"]}
                                for p in pruned.get("output_errors") or []]
        if dense.get("accuracy") is not None and pruned.get("accuracy") is not None:
            row["accuracy"] = [dense["accuracy"], pruned["accuracy"]]
    for f in (out, report):
        if args.keep and f.exists():
            args.keep.mkdir(parents=True, exist_ok=True)
            f.replace(args.keep / f.name)
        f.unlink(missing_ok=True)
    return row


def fraction(after, before) -> str:
    return "-" if not before or after is None else f"{100 * (before - after) / before:.1f}%"


def faster(row: dict) -> bool | None:
    """Faster than dense at every timed setting (the report's ``faster_than_dense``), from the timings."""
    return all(t["ratio_median"] < 1 for t in row["timing"]) if row.get("timing") else None


def markdown(rows: list[dict], meta: dict) -> str:
    out = ["# Structured pruning with default options: faster than dense?", "",
           f"Generated by `{meta['command']}` on {meta['date']} (onnxprune {meta['onnxprune']}, onnxruntime "
           f"{meta['onnxruntime']}, {meta['cpus']} CPUs shared with other jobs). Every run: `onnxprune prune MODEL OUT "
           f"--data CALIB --structured --sparsity R --test TEST --json R.json --time-batches {TIME_BATCHES}`, nothing "
           f"else set, a subprocess limited to {meta['timeout_s']:.0f} s and {meta['memory_limit_gb']} GB of address "
           "space. *Time pruned/dense*: the report's paired timer (both models in turns on the test samples, "
           "order swapped every repeat; median of the per-repeat ratios, quartiles in brackets; `noisy` where the "
           "quartiles lie more than 1.5x apart), at batch 1 and 32, with one thread and with onnxruntime's default "
           "threads. Below 1 is faster. *Removed*: the share of the prunable layers' parameters and MACs gone. "
           "*Quality*: test accuracy dense -> pruned where the data has labels, and the relative output error "
           "(the report's worst protected output part) on the test data.", "",
           "| model | R | exit | multiples chosen | params removed | MACs removed | b1 1 thread | b32 1 thread | "
           "b1 default threads | b32 default threads | faster at every setting | quality |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["rc"] != 0:
            out.append(f"| {r['model']} | {r['ratio']} | {r['rc']} | `{r['error']}` | | | | | | | | |")
            continue
        cells = {(t["batch"], str(t["threads"])): f"{t['ratio_median']:.2f}x ({t['ratio_q25']:.2f}-{t['ratio_q75']:.2f})"
                 + (" noisy" if t["noisy"] else "") for t in r["timing"]}
        multiples = sorted(set((r.get("multiples") or {}).values()))
        quality = []
        if r.get("accuracy"):
            a, b = r["accuracy"]
            quality.append(f"{100 * a:.2f}% -> {100 * b:.2f}% ({100 * (a - b):+.2f} points drop)")
        if r.get("relative_error") is not None:
            quality.append(f"rel. error {r['relative_error']:.3g} ({r['worst_part']})")
        out.append(f"| {r['model']} | {r['ratio']} | 0 | {', '.join(map(str, multiples)) or '-'} | "
                   f"{fraction(r['params_after'], r['params_before'])} | {fraction(r['macs_after'], r['macs_before'])} | "
                   + " | ".join(cells.get(k, "-") for k in ((1, "1"), (32, "1"), (1, "default"), (32, "default")))
                   + f" | {faster(r)} | {'; '.join(quality) or '-'} |")
    parts = [r for r in rows if len(r.get("output_errors") or []) > 1]
    if parts:
        out += ["", "## Relative output error per output part", ""]
        for r in parts:
            out.append(f"- {r['model']} R={r['ratio']}: " + ", ".join(
                f"{p['part']} {p['relative_error']:.3g}" for p in r["output_errors"]))
    ok = [r for r in rows if r["rc"] == 0 and r["timing"]]
    slower = [f"{r['model']} R={r['ratio']}" for r in ok
              if all(t["ratio_median"] >= 1 for t in r["timing"] if t["batch"] == 32)]
    out += ["", "## What these numbers show", "",
            f"- {len(ok)} of {len(rows)} runs wrote a model; faster than dense at every timed setting (batch and threads: "
            f"every median ratio below 1, the report's `faster_than_dense`) in {sum(bool(faster(r)) for r in ok)}.",
            "- Not faster than dense at batch 32 with either thread setting: " + (", ".join(slower) or "none") + "."]
    out += [f"- {note}" for note in meta.get("notes", [])]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / "out" / "corpus")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "structured-speed")
    ap.add_argument("--only", nargs="*", help="model names or patterns")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--samples", type=int, default=16, help="calibration and test samples of a corpus model")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--memory-limit-gb", type=int, default=8)
    ap.add_argument("--keep", type=Path, help="keep the pruned models and their JSON reports in this folder")
    ap.add_argument("--render", action="store_true", help="rewrite the markdown from the JSON, measuring nothing")
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="with --render: add the runs of these JSONs")
    ap.add_argument("--note", action="append", default=[], help="with --render: a line under the table")
    args = ap.parse_args()
    json_path = Path(f"{args.out}.json")
    if args.render:
        rec = json.loads(json_path.read_text())
        for other in args.merge:
            merged = json.loads(other.read_text())
            rec["runs"] += merged["runs"]
            rec["meta"]["command"] += "; " + merged["meta"]["command"]
        rec["meta"]["notes"] = rec["meta"].get("notes", []) + args.note
        json_path.write_text(json.dumps(rec, indent=1, default=str) + "\n")
        Path(f"{args.out}.md").write_text(markdown(rec["runs"], rec["meta"]))
        return 0
    import importlib.metadata as md
    import os

    names = [n for n in MNIST + CORPUS if not args.only or any(fnmatch.fnmatchcase(n, p) for p in args.only)]
    meta = {"command": "python scripts/structured_speed.py" + (f" --only {' '.join(args.only)}" if args.only else "")
            + (f" --samples {args.samples}" if any(not n.startswith("mnist_") for n in names) else ""),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "onnxprune": md.version("onnxprune"),
            "onnxruntime": md.version("onnxruntime"), "cpus": os.cpu_count(), "timeout_s": args.timeout,
            "memory_limit_gb": args.memory_limit_gb, "samples": args.samples}
    ratios = [float(r) for r in args.ratios.split(",")]
    previous = {}
    if json_path.exists():
        previous = {(r["model"], r["ratio"]): r for r in json.loads(json_path.read_text())["runs"]}
    order = {n: i for i, n in enumerate(MNIST + CORPUS)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for ratio in ratios:
                row = run_one(name, ratio, args, Path(tmp))
                print(f"{name} {ratio}: rc {row['rc']}, {row['seconds']:.0f} s, faster {row.get('faster_than_dense')}"
                      + (f": {row['error']}" if row["error"] else ""), flush=True)
                previous[(name, ratio)] = row
                rows = sorted(previous.values(), key=lambda r: (order.get(r["model"], 99), r["model"], r["ratio"]))
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1, default=str) + "\n")
                Path(f"{args.out}.md").write_text(markdown(rows, meta))
    print(f"wrote {args.out}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
