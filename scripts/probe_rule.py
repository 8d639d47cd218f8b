"""How many random probes the ECP statistics need: the ranking's stability against the probes times the samples.

    .venv/bin/python scripts/probe_rule.py --model MODEL.onnx --calib CALIB.npz --test TEST.npz
        [--samples 16,64] [--probes 1,2,4,8,16,32] [--seeds 2] [--reference 128]
        [--json docs/results/probe-rule.json] [--out docs/results/probe-rule.md]

For every number of calibration samples n and probes P (each with --seeds seeds), ECP scores the model
with P Rademacher probes on the first n calibration samples, against --reference probes on the same
samples: Spearman's rank correlation of all scores, the overlap of the weights pruned at 50%, and the
relative output error (check.relative) of the 50% model on the test data. The estimate of G_i per
sample has a relative variance of at most 2/P and the sums average n samples, so the ranking's noise
should follow P x n; the recorded rows say where it stops mattering for the pruned model.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import spearman  # noqa: E402

from onnxprune.check.relative import compare_outputs  # noqa: E402
from onnxprune.graph.index import read_initializer  # noqa: E402
from onnxprune.io import files as fileio  # noqa: E402
from onnxprune.io.data import as_dataset  # noqa: E402
from onnxprune.pipeline import Pruner  # noqa: E402

from studies.provenance import portable_command  # noqa: E402


def pruned(pruner: Pruner, ratio: float):
    result = pruner.prune(ratio)
    zeros = [layer.to_rows(read_initializer(result.model, layer.weight)).ravel() == 0 for layer in pruner.layers_]
    return set(np.flatnonzero(np.concatenate(zeros)).tolist()), result


def fit(model, arrays, probes, seed):
    start = time.perf_counter()
    pruner = Pruner("ecp", probes=probes, seed=seed).fit(model, arrays)
    scores = np.concatenate([pruner.scores_[layer.name].scores.ravel() for layer in pruner.layers_])
    return pruner, scores, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--calib", required=True, type=Path)
    parser.add_argument("--test", required=True, type=Path)
    parser.add_argument("--samples", default="16,64")
    parser.add_argument("--probes", default="1,2,4,8,16,32")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--reference", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "probe-rule.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "probe-rule.md")
    args = parser.parse_args(argv)
    model = onnx.load(args.model)
    with np.load(args.calib) as data:
        calib = {k: data[k] for k in data.files if k not in ("y", "labels")}
    with np.load(args.test) as data:
        test = as_dataset({k: data[k] for k in data.files if k not in ("y", "labels")}, model)
    rows = []
    for n in (int(v) for v in args.samples.split(",")):
        arrays = {k: v[:n] for k, v in calib.items()}
        reference, ref_scores, ref_seconds = fit(model, arrays, args.reference, 0)
        ref_set, ref_result = pruned(reference, args.ratio)
        objective = reference.objective_
        ref_error = compare_outputs(ref_result.model, model, test, list(objective.outputs), axes=objective.axes,
                                    parts=list(objective.parts))["relative_error"]
        rows.append({"samples": n, "probes": args.reference, "seed": 0, "seconds": ref_seconds, "spearman": 1.0,
                     "overlap": 1.0, "error": ref_error, "reference": True})
        print(f"n={n} reference P={args.reference}: error {ref_error:.4g}, {ref_seconds:.0f} s", file=sys.stderr)
        for probes in (int(v) for v in args.probes.split(",")):
            for seed in range(1, args.seeds + 1):
                pruner, scores, seconds = fit(model, arrays, probes, seed)
                chosen, result = pruned(pruner, args.ratio)
                error = compare_outputs(result.model, model, test, list(objective.outputs), axes=objective.axes,
                                        parts=list(objective.parts))["relative_error"]
                row = {"samples": n, "probes": probes, "seed": seed, "seconds": seconds, "error": error,
                       "spearman": spearman(scores, ref_scores), "overlap": len(chosen & ref_set) / max(1, len(ref_set))}
                rows.append(row)
                print(f"n={n} P={probes} seed={seed}: rho {row['spearman']:.4f}, overlap {row['overlap']:.4f}, "
                      f"error {error:.4g}", file=sys.stderr)
    command = portable_command(["python", "scripts/probe_rule.py", *(argv if argv is not None else sys.argv[1:])])
    fileio.write_json(args.json, {"command": command, "date": time.strftime("%Y-%m-%d"), "rows": rows})
    fileio.write_text(args.out, render(rows, command, args))
    return 0


def render(rows: list[dict], command: str, args) -> str:
    lines = ["# How many probes: the ranking's stability against probes x samples", "",
             f"Recorded by `{command}` on {time.strftime('%Y-%m-%d')}. Model {args.model.name}; ECP scored with P "
             f"random probes (seeds 1..{args.seeds}) on the first n calibration samples, against P = {args.reference} "
             f"on the same samples; overlap of the weights pruned at {args.ratio:g}; relative output error of that "
             "model on the test data (the worst output part).", "",
             "| n | P | P x n | Spearman rho (mean, min) | overlap (mean, min) | relative error (mean) | seconds (mean) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["samples"], r["probes"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for n, p in keys:
        group = [r for r in rows if (r["samples"], r["probes"]) == (n, p)]
        rho, overlap = [r["spearman"] for r in group], [r["overlap"] for r in group]
        mark = " (reference)" if group[0].get("reference") else ""
        lines.append(f"| {n} | {p}{mark} | {n * p} | {np.mean(rho):.4f}, {min(rho):.4f} | {np.mean(overlap):.4f}, "
                     f"{min(overlap):.4f} | {np.mean([r['error'] for r in group]):.4g} | "
                     f"{np.mean([r['seconds'] for r in group]):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
