"""Compare pruning methods one-shot on a model: test loss and accuracy per sparsity, scoring cost.

    .venv/bin/python scripts/compare_methods.py [--model models/mnist_mlp.onnx] [--calib models/mnist_calib.npz]
        [--test models/mnist_test.npz] [--out docs/results/ecp-default] [--readme docs/results/index.md]

Writes OUT.json and OUT.md; with --readme, replaces the block between the markers
<!-- compare_methods:start --> and <!-- compare_methods:end --> with the table.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import onnxprune
from onnxprune.api import as_model
from onnxprune.check.evaluate import predict
from onnxprune.io import files as fileio
from onnxprune.io.data import as_dataset

RATIOS = (0.5, 0.7, 0.8, 0.9, 0.95)
# (label, method, compensation)
VARIANTS = [
    ("ecp-refit (5 steps, chained least-squares refits, distillation)", "ecp-refit", True),
    ("ecp + one chained refit (--refit)", "ecp+refit", True),
    ("ecp", "ecp", True),
    ("ecp --no-compensation", "ecp", False),
    ("nonlinear (brute force)", "nonlinear", True),
    ("variance (mean compensation)", "variance", True),
    ("gradmag", "gradmag", True),
    ("magnitude", "magnitude", True),
    ("random", "random", True),
]
START, END = "<!-- compare_methods:start -->", "<!-- compare_methods:end -->"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/mnist_mlp.onnx")
    p.add_argument("--calib", default="models/mnist_calib.npz")
    p.add_argument("--test", default="models/mnist_test.npz")
    p.add_argument("--out", default="docs/results/ecp-default")
    p.add_argument("--readme", default=None)
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", action="store_true", help="measure nothing: rewrite OUT.md (and --readme) from OUT.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.render:
        results = json.loads(out.with_suffix(".json").read_text())
        available = next(row for row in results["methods"] if "unavailable" not in row)
        write_reports(results, [float(r) for r in available["ratios"]], out, args.readme)
        return 0
    ratios = [float(r) for r in args.ratios.split(",")]

    model, calib, test, results = load_study(args, argv)
    forward_seconds = results["forward_pass_seconds"]
    for label, method, comp in VARIANTS:
        name, refit = (method[:-len("+refit")], True) if method.endswith("+refit") else (method, None)
        row = {"label": label, "method": method, "compensation": comp, "ratios": {}}
        start = time.perf_counter()
        try:
            pruner = onnxprune.Pruner(name, compensation=comp, refit=refit, seed=args.seed).fit(model, calib)
        except onnxprune.InputError as exc:  # e.g. brute force on shared-weight (Conv) layers
            row["unavailable"] = str(exc)
            results["methods"].append(row)
            print(f"{label}: {exc}", file=sys.stderr)
            continue
        fit_seconds = time.perf_counter() - start
        for r in ratios:
            start = time.perf_counter()
            pruned = pruner.prune(r).model  # the stepwise methods do their work here
            seconds = fit_seconds + time.perf_counter() - start
            report = onnxprune.evaluate(pruned, test)
            row["ratios"][str(r)] = {"loss": report["loss"], "accuracy": report["accuracy"], "seconds": seconds,
                                     "forward_passes": seconds / forward_seconds}
        results["methods"].append(row)
        print(f"{label}: " + ", ".join(f"r={r}: {v['loss']:.4f} ({v['seconds']:.1f} s)"
                                       for r, v in row["ratios"].items()), file=sys.stderr)
    fileio.write_json(out.with_suffix(".json"), results)
    write_reports(results, ratios, out, args.readme)
    return 0


def write_reports(results: dict, ratios: list[float], out: Path, readme: str | None) -> None:
    """OUT.md, and the table between the markers of ``readme`` when one is given."""
    table = markdown(results, ratios)
    fileio.write_text(out.with_suffix(".md"), f"# Pruning methods compared on {results['model']}\n\n{table}\n")
    if readme:
        block = f"{START}\n{table}\n{END}"
        pattern = re.escape(START) + ".*?" + re.escape(END)
        new, n = re.subn(pattern, lambda _: block, Path(readme).read_text(), flags=re.S)
        if n != 1:
            raise SystemExit(f"{readme}: markers {START} / {END} not found")
        fileio.write_text(readme, new)


def load_study(args, argv) -> tuple:
    """Model, calibration and test data, and the results header: the command, the dense model's test
    loss and accuracy, and one forward pass over the calibration data (the unit of cost)."""
    model = as_model(args.model)
    calib = as_dataset(args.calib, model)
    test = as_dataset(args.test, model)
    _, forward_seconds = predict(model, calib, model.graph.output[0].name, batch_size=256)
    dense = onnxprune.evaluate(model, test)
    results = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
               "model": args.model, "calibration_samples": len(calib), "test_samples": len(test),
               "dense": {"loss": dense["loss"], "accuracy": dense["accuracy"]},
               "forward_pass_seconds": forward_seconds, "machine": platform.platform(), "methods": []}
    return model, calib, test, results


def markdown(results: dict, ratios: list[float]) -> str:
    d = results["dense"]
    timed = str(0.9 if 0.9 in ratios else ratios[-1])
    head = "| method | " + " | ".join(f"r = {r}" for r in ratios) + f" | seconds at r = {timed} |"
    rule = "| --- |" + " --- |" * (len(ratios) + 1)
    lines = [f"Test loss (mean cross-entropy) and accuracy on {results['test_samples']:,} test images after pruning "
             f"without fine-tuning; {results['calibration_samples']:,} calibration images; global threshold. "
             f"Dense: loss {d['loss']:.4f}, accuracy {100 * d['accuracy']:.2f}%. Seconds: scoring plus pruning to "
             f"r = {timed} (mask, rewrite, and for the refit methods their steps and refits), and that time in "
             f"forward passes over the calibration data ({results['forward_pass_seconds'] * 1e3:.1f} ms each).",
             "", f"Command: `{results['command']}`", "", head, rule]
    for row in results["methods"]:
        if "unavailable" in row:
            lines.append(f"| {row['label']} | " + " | ".join("n/a" for _ in ratios) + f" | {row['unavailable']} |")
            continue
        cells = [f"{v['loss']:.4f} ({100 * v['accuracy']:.1f}%)" for v in row["ratios"].values()]
        t = row["ratios"][timed]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {t['seconds']:.2f} "
                                                                  f"({t['forward_passes']:.0f}x) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
