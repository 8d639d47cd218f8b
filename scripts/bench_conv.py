"""ECP on the MNIST CNN: exact vs 'positions' Conv statistics, against magnitude and random (one-shot).

    .venv/bin/python scripts/bench_conv.py [--model models/mnist_cnn.onnx] [--calib models/mnist_calib.npz]
        [--test models/mnist_test.npz] [--out docs/results/cnn] [--repeats 3]

Writes OUT.json and OUT.md: test loss and accuracy after pruning to each ratio (global threshold over
the two Convs and the two Gemms, no fine-tuning), the scoring time of every method (best of
--repeats fits), and how far the 'positions' statistics are from the exact ones.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

import onnxprune
from onnxprune.derivatives import statistics
from onnxprune.edit.rewrite import rewrite
from onnxprune.io import files as fileio
from onnxprune.select.masks import choose_masks

from compare_methods import load_study  # scripts/ is on sys.path when a script runs

RATIOS = (0.5, 0.7, 0.8, 0.9)
# (label, method, compensation, conv statistics)
VARIANTS = [
    ("ecp (exact Conv statistics)", "ecp", True, "exact"),
    ("ecp (positions approximation)", "ecp", True, "positions"),
    ("ecp exact, no compensation", "ecp", False, "exact"),
    ("variance (mean compensation)", "variance", True, "exact"),
    ("magnitude", "magnitude", True, "exact"),
    ("random", "random", True, "exact"),
]
DIAGNOSTIC = "ecp exact, compensation in the Conv layers only (diagnostic)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/mnist_cnn.onnx")
    p.add_argument("--calib", default="models/mnist_calib.npz")
    p.add_argument("--test", default="models/mnist_test.npz")
    p.add_argument("--out", default="docs/results/cnn")
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    p.add_argument("--repeats", type=int, default=3, help="fits per method; the fastest time is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = p.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    out = Path(args.out)
    if args.render:
        results = json.loads(out.with_suffix(".json").read_text())
        ratios = [float(r) for r in results["methods"][0]["ratios"]]
        fileio.write_text(out.with_suffix(".md"), markdown(results, ratios))
        return 0

    model, calib, test, results = load_study(args, argv)
    results["load_start"], results["cpus"] = os.getloadavg()[0], os.cpu_count()
    forward_seconds = results["forward_pass_seconds"]
    fitted = {}
    for label, method, comp, stats in VARIANTS:
        fits = []
        for _ in range(max(1, args.repeats if method not in ("magnitude", "random") else 1)):
            jacobian_seconds = [0.0]
            start = time.perf_counter()
            with timed_jacobian_passes(jacobian_seconds):
                pruner = onnxprune.Pruner(method, compensation=comp, seed=args.seed, conv_statistics=stats)
                pruner.fit(model, calib)
            fits.append((time.perf_counter() - start, pruner.seconds_.get("statistics"), jacobian_seconds[0]))
        fitted[label] = pruner
        best, best_statistics, best_jacobians = min(fits, key=lambda t: t[0])
        row = {"label": label, "method": method, "compensation": comp, "conv_statistics": stats,
               "scoring_seconds": best, "statistics_seconds": best_statistics,
               "jacobian_seconds": best_jacobians if best_statistics is not None else None,
               "scoring_forward_passes": best / forward_seconds, "ratios": {}}
        for r in ratios:
            report = onnxprune.evaluate(pruner.prune(r).model, test)
            row["ratios"][str(r)] = {"loss": report["loss"], "accuracy": report["accuracy"]}
        results["methods"].append(row)
        print(f"{label}: scored in {best:.2f} s; " + ", ".join(
            f"r={r}: {row['ratios'][str(r)]['loss']:.4f}" for r in ratios), file=sys.stderr)
    exact = fitted["ecp (exact Conv statistics)"]
    first = results["methods"][0]
    row = {"label": DIAGNOSTIC, "method": "ecp", "compensation": "conv", "conv_statistics": "exact",
           **{key: first[key] for key in ("scoring_seconds", "statistics_seconds", "jacobian_seconds",
                                          "scoring_forward_passes")}, "ratios": {}}
    for r in ratios:
        report = onnxprune.evaluate(conv_only_compensation(exact, r), test)
        row["ratios"][str(r)] = {"loss": report["loss"], "accuracy": report["accuracy"]}
    results["methods"].append(row)
    results["exact_vs_positions"] = compare(exact, fitted["ecp (positions approximation)"], ratios)
    results["load_end"] = os.getloadavg()[0]
    fileio.write_json(out.with_suffix(".json"), results)
    fileio.write_text(out.with_suffix(".md"), markdown(results, ratios))
    return 0


def conv_only_compensation(pruner, r):
    """ECP's mask at ratio r with the bias compensation applied to the Conv layers only."""
    scores = {name: s.scores for name, s in pruner.scores_.items()}
    masks = choose_masks(pruner.layers_, scores, r)
    shifts = {layer.name: pruner.scores_[layer.name].shifts if layer.op == "Conv"
              else np.zeros_like(pruner.scores_[layer.name].shifts) for layer in pruner.layers_}
    return rewrite(pruner.model_, pruner.layers_, masks, shifts)[0]


@contextlib.contextmanager
def timed_jacobian_passes(seconds: list[float]):
    """Add to ``seconds[0]`` the time ``collect_statistics`` spends in the gradient engine's passes
    (``squares``, the first one building the gradient graph) while ``Pruner.fit`` runs: the shipped
    path timed in place; the rest of the statistics time is the A, B, C sums and the setup."""
    build = statistics.output_jacobians

    def timed_build(*args, **kwargs):
        jac = build(*args, **kwargs)
        squares = jac.squares

        def timed_squares(feeds, shape):
            start = time.perf_counter()
            try:
                return squares(feeds, shape)
            finally:
                seconds[0] += time.perf_counter() - start

        jac.squares = timed_squares
        return jac

    with mock.patch.object(statistics, "output_jacobians", timed_build):
        yield


def compare(exact, approx, ratios) -> dict:
    """Per Conv layer: relative difference of the scores and compensations; per ratio: how many
    weights of each layer either prunes."""
    layers = {}
    for layer in exact.layers_:
        if not layer.shared:
            continue
        e, a = exact.scores_[layer.name], approx.scores_[layer.name]
        layers[layer.name] = {
            "score_relative_difference": float(np.abs(e.scores - a.scores).sum() / np.abs(e.scores).sum()),
            "shift_relative_difference": float(np.abs(e.shifts - a.shifts).sum() / max(np.abs(e.shifts).sum(), 1e-30)),
        }
    pruned = {}
    for r in ratios:
        pruned[str(r)] = {"exact": {c.layer: c.pruned for c in exact.prune(r).layers},
                          "positions": {c.layer: c.pruned for c in approx.prune(r).layers}}
    return {"layers": layers, "pruned_per_layer": pruned}


def ratio_list(ratios: list) -> str:
    return ", ".join(str(r) for r in ratios) if ratios else "none"


def lower_at(rows: dict, a: str, b: str, ratios: list[float]) -> list[float]:
    """The ratios at which row ``a``'s test loss is below row ``b``'s."""
    return [r for r in ratios if rows[a][str(r)]["loss"] < rows[b][str(r)]["loss"]]


def layer_names(results: dict) -> tuple[list[str], list[str]]:
    """The pruned layers with shared weights (the Convs) and the others, as the study recorded them."""
    every = list(next(iter(results["exact_vs_positions"]["pruned_per_layer"].values()))["exact"])
    convs = list(results["exact_vs_positions"]["layers"])
    return convs, [name for name in every if name not in convs]


def reading(results: dict, ratios: list[float]) -> str:
    """What the tables show, each sentence computed from them."""
    rows = {row["label"]: row["ratios"] for row in results["methods"]}
    by_label = {row["label"]: row for row in results["methods"]}
    ecp, nocomp, positions = ("ecp (exact Conv statistics)", "ecp exact, no compensation",
                              "ecp (positions approximation)")
    variance = "variance (mean compensation)"
    convs, others = layer_names(results)
    lines = ["## Reading", "",
             "- The ECP rows use the statistics this project computes for a weight shared across positions (see "
             "`onnxprune/conv.py`); the last row is a diagnostic, not a method: ECP's mask with the bias "
             f"compensation written only to the Conv layers ({', '.join(convs)})."]
    conv_helps = lower_at(rows, DIAGNOSTIC, nocomp, ratios)
    all_helps = lower_at(rows, ecp, nocomp, ratios)
    gemm_hurts = lower_at(rows, DIAGNOSTIC, ecp, ratios)
    lines.append(f"- Against the same mask without compensation, compensating only the Conv layers gives a lower test "
                 f"loss at r = {ratio_list(conv_helps)} (of {ratio_list(ratios)}); compensating every layer at "
                 f"r = {ratio_list(all_helps)}.")
    if gemm_hurts:
        lines.append(f"- At r = {ratio_list(gemm_hurts)} the Conv-only compensation beats the compensation of every "
                     f"layer, so there the compensation of the other layers ({', '.join(others)}) adds loss: "
                     + "; ".join(f"r = {r}: {rows[DIAGNOSTIC][str(r)]['loss']:.4f} against "
                                 f"{rows[ecp][str(r)]['loss']:.4f}" for r in gemm_hurts) + ".")
    worse = [r for r in ratios if rows[variance][str(r)]["loss"] > rows[ecp][str(r)]["loss"]]
    lines.append(f"- Mean compensation (variance, ECP with G = 1) has a higher test loss than ECP (exact) at "
                 f"r = {ratio_list(worse)}; its loss at r = {ratios[-1]}: "
                 f"{rows[variance][str(ratios[-1])]['loss']:.4f} against {rows[ecp][str(ratios[-1])]['loss']:.4f}.")
    cmp = results["exact_vs_positions"]
    score = [100 * v["score_relative_difference"] for v in cmp["layers"].values()]
    moved, layer = max((abs(v["exact"][k] - v["positions"][k]) / max(v["exact"][k], 1), k)
                       for v in cmp["pruned_per_layer"].values() for k in v["exact"])
    below = lower_at(rows, positions, ecp, ratios)
    lines.append(f"- The \"positions\" approximation drops the cross-position terms: its scores differ from the exact "
                 f"ones by {min(score):.0f}-{max(score):.0f}% (relative L1) in the Convs, the weights it prunes per "
                 f"layer by at most {100 * moved:.0f}% of the exact count ({layer}), and its test loss is below the "
                 f"exact statistics' at r = {ratio_list(below)} (one model, one calibration set).")
    e, p = by_label[ecp], by_label[positions]
    share = e["jacobian_seconds"] / e["statistics_seconds"]
    lines.append(f"- Statistics time (best fit): exact {e['statistics_seconds']:.2f} s, positions "
                 f"{p['statistics_seconds']:.2f} s ({p['statistics_seconds'] / e['statistics_seconds']:.2f}x); the "
                 f"Jacobian passes, the same for both, took {100 * share:.0f}% of the exact statistics time "
                 f"({'the larger' if share > 0.5 else 'the smaller'} part).")
    lines.append(f"- Load average {results['load_start']:.1f} at the start and {results['load_end']:.1f} at the end on "
                 f"{results['cpus']} cores: other processes shared the machine, so compare times within this table, "
                 "not across runs.")
    return "\n".join(lines) + "\n"


def verdict(results: dict, ratios: list[float]) -> str:
    """One line per ratio: does ECP (exact) beat magnitude and random, by loss and by accuracy?"""
    rows = {row["label"]: row["ratios"] for row in results["methods"]}
    ecp = rows["ecp (exact Conv statistics)"]
    lines = ["| r | ECP (exact) vs magnitude: loss / accuracy | ECP (exact) vs random: loss / accuracy |",
             "| --- | --- | --- |"]
    for r in ratios:
        cells = []
        for other in ("magnitude", "random"):
            e, o = ecp[str(r)], rows[other][str(r)]
            loss = "lower" if e["loss"] < o["loss"] else "higher" if e["loss"] > o["loss"] else "equal"
            acc = "higher" if e["accuracy"] > o["accuracy"] else "lower" if e["accuracy"] < o["accuracy"] else "equal"
            cells.append(f"{loss} ({e['loss']:.4f} vs {o['loss']:.4f}) / {acc} ({100 * e['accuracy']:.1f}% vs "
                         f"{100 * o['accuracy']:.1f}%)")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + reading(results, ratios)


def markdown(results: dict, ratios: list[float]) -> str:
    d = results["dense"]
    lines = [
        f"# ECP on the MNIST CNN ({results['model']})", "",
        f"Test loss (mean cross-entropy) and accuracy on {results['test_samples']:,} test images after one-shot "
        f"pruning (global threshold over {', '.join(sum(layer_names(results), []))}; biases not counted; no "
        "fine-tuning), scored on "
        f"{results['calibration_samples']:,} calibration images. Dense: loss {d['loss']:.4f}, accuracy "
        f"{100 * d['accuracy']:.2f}%. Scoring time: fastest of the fits, in seconds and in forward passes over the "
        f"calibration data ({results['forward_pass_seconds'] * 1e3:.1f} ms each); 'statistics' is the part spent "
        "on the Jacobians and the A, B, C sums.", "",
        f"Command: `{results['command']}` ({results['machine']})", "",
        "| method | " + " | ".join(f"r = {r}" for r in ratios) + " | scoring time | of which statistics |",
        "| --- |" + " --- |" * (len(ratios) + 2),
    ]
    for row in results["methods"]:
        cells = [f"{v['loss']:.4f} ({100 * v['accuracy']:.1f}%)" for v in row["ratios"].values()]
        stats = f"{row['statistics_seconds']:.2f} s" if row["statistics_seconds"] is not None else "-"
        lines.append(f"| {row['label']} | " + " | ".join(cells) +
                     f" | {row['scoring_seconds']:.2f} s ({row['scoring_forward_passes']:.0f}x) | {stats} |")
    lines += ["", verdict(results, ratios)]
    cmp = results["exact_vs_positions"]
    split = results["methods"][:2]  # the exact and the positions ECP rows
    lines += ["", "## Exact vs positions statistics", "",
              "Where the statistics time of the best fit goes (timed inside `Pruner.fit`, the path users run): "
              + "; ".join(f"{row['conv_statistics']}: Jacobian passes {row['jacobian_seconds']:.2f} s, A/B/C sums "
                          f"and setup {row['statistics_seconds'] - row['jacobian_seconds']:.2f} s" for row in split)
              + ".", "",
              "Relative L1 difference of the positions approximation's scores and compensations from the exact ones, "
              "per Conv layer (the Gemm layers are identical by construction):", "",
              "| layer | scores | compensations |", "| --- | --- | --- |"]
    for name, v in cmp["layers"].items():
        lines.append(f"| {name} | {100 * v['score_relative_difference']:.1f}% | "
                     f"{100 * v['shift_relative_difference']:.1f}% |")
    lines += ["", "Weights pruned per layer (exact / positions):", "",
              "| r | " + " | ".join(next(iter(cmp["pruned_per_layer"].values()))["exact"]) + " |",
              "| --- |" + " --- |" * len(next(iter(cmp["pruned_per_layer"].values()))["exact"])]
    for r, v in cmp["pruned_per_layer"].items():
        lines.append(f"| {r} | " + " | ".join(f"{v['exact'][k]:,} / {v['positions'][k]:,}" for k in v["exact"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
