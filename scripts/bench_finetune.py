"""Fine-tuning time per epoch of the two gradient engines (adjoint = onnx-ad graphs on any onnxruntime,
ort-training = onnxruntime-training's artifacts), paired and repeated. Writes OUT.md and OUT.json.

    .venv/bin/python scripts/bench_finetune.py [--python .venv/bin/python --python .venv-cpu/bin/python]
        [--model mlp --model cnn] [--epochs 6] [--repeats 5] [--sparsity 0.5] [--samples N]
        [--out docs/results/finetune-engines] [--force]

The models are models/mnist_mlp.onnx and models/mnist_cnn.onnx, each pruned to --sparsity by magnitude
(so the masks are held at every step, as `onnxprune finetune` does), trained on the shipped calibration
data (models/mnist_calib.npz)
with finetune's defaults (Adam, lr 1e-3, batch 128, seed 0, one thread). Every (interpreter, engine)
pair runs in a fresh subprocess, in an order that alternates between repeats; an epoch's time is the
CPU and wall time between the ends of two consecutive epochs (epoch 1 is left out: it carries the
first-call costs), and setup is the time before the first epoch ends minus one epoch (building the
gradient graph, the session and its optimizer). Each --python is an interpreter with onnxprune
installed; every engine it has is measured. Ratios compare runs of the same repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.errors import InputError, run_script  # noqa: E402
from onnxprune.io import files as fileio  # noqa: E402

MODELS = {"mlp": ROOT / "models" / "mnist_mlp.onnx", "cnn": ROOT / "models" / "mnist_cnn.onnx"}
DATA = ROOT / "models" / "mnist_calib.npz"


def environment() -> dict:
    """This interpreter's versions and the engines it can run."""
    import onnxruntime

    from onnxprune.derivatives.engines import ENGINES
    from onnxprune.errors import RuntimeUnavailable
    from onnxprune.repair.finetune import choose_engine

    engines = []
    for engine in ENGINES[1:]:
        try:
            engines.append(choose_engine(engine)["name"])
        except RuntimeUnavailable:
            pass
    return {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "engines": engines}


def measure(spec: dict) -> dict:
    """Fine-tune once on ``spec["engine"]``; stamps at the end of every epoch."""
    import onnxprune
    from onnxprune.api import as_model
    from onnxprune.io.data import as_dataset
    from onnxprune.repair.finetune import finetune, zero_masks

    model = as_model(str(MODELS[spec["model"]]))
    data = as_dataset(str(DATA), model, require_labels=True)
    x = next(iter(data.feeds.values()))
    if spec["samples"]:
        x, labels = x[:spec["samples"]], data.labels[:spec["samples"]]
    else:
        labels = data.labels
    pruned = onnxprune.prune(model, {"x": x}, spec["sparsity"], method="magnitude").model
    masks = zero_masks(pruned)
    stamps = []

    def progress(epoch, batch, n_batches, loss):
        if batch == n_batches:
            stamps.append((time.perf_counter(), time.process_time()))

    wall, cpu = time.perf_counter(), time.process_time()
    _, history = finetune(pruned, x, labels, epochs=spec["epochs"], masks=masks, engine=spec["engine"],
                          progress=progress)
    ends = np.array(stamps)
    epoch_wall, epoch_cpu = np.diff(ends[:, 0]), np.diff(ends[:, 1])
    return {**spec, **environment(), "held_zero": int(sum((~m).sum() for m in masks.values())),
            "losses": [h["loss"] for h in history], "epoch_seconds": epoch_wall.tolist(),
            "epoch_cpu_seconds": epoch_cpu.tolist(),
            "setup_seconds": float(ends[0, 0] - wall - np.median(epoch_wall)),
            "setup_cpu_seconds": float(ends[0, 1] - cpu - np.median(epoch_cpu)), "load": os.getloadavg()[0]}


def run(python: str, argument: str, flag: str) -> dict:
    done = subprocess.run([python, __file__, flag, argument], capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(f"{python} {flag} failed: "
                         f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def label(row: dict) -> str:
    return f"{row['engine']} (Python {row['python']}, onnxruntime {row['onnxruntime']})"


def summarise(runs: list[dict]) -> list[dict]:
    """Per configuration: the median epoch over all its repeats, and its paired ratio to the first
    configuration measured (the reference) repeat by repeat."""
    configs = list(dict.fromkeys(label(r) for r in runs))
    by = {c: [r for r in runs if label(r) == c] for c in configs}
    median = {c: [float(np.median(r["epoch_cpu_seconds"])) for r in rows] for c, rows in by.items()}
    rows = []
    for c in configs:
        ratios = [a / b for a, b in zip(median[c], median[configs[0]], strict=True)]
        rows.append({"config": c, "engine": by[c][0]["engine"], "python": by[c][0]["python"],
                     "onnxruntime": by[c][0]["onnxruntime"],
                     "epoch_cpu_ms": 1e3 * float(np.median(median[c])),
                     "epoch_wall_ms": 1e3 * float(np.median([np.median(r["epoch_seconds"]) for r in by[c]])),
                     "setup_cpu_s": float(np.median([r["setup_cpu_seconds"] for r in by[c]])),
                     "ratio_median": float(np.median(ratios)), "ratio_min": float(min(ratios)),
                     "ratio_max": float(max(ratios)),
                     "final_loss": by[c][0]["losses"][-1]})
    return rows


def loss_agreement(runs: list[dict]) -> float:
    """The largest relative difference between any two configurations' loss histories (same seed)."""
    histories = np.array([r["losses"] for r in runs])
    return float(np.max(np.abs(histories - histories[0]) / np.abs(histories[0])))


def markdown(results: dict) -> str:
    lines = [
        "# Fine-tuning: time per epoch of the gradient engines",
        "",
        f"Command: `{results['command']}` ({results['date']}, {results['machine']}; load average "
        f"{results['load_start']:.1f} at the start, {results['load_end']:.1f} at the end).",
        "",
        f"Each model pruned by magnitude to {results['sparsity']:.0%}, fine-tuned on {results['samples']:,} samples of "
        f"models/mnist_calib.npz, batch 128, Adam lr 1e-3, seed 0, one thread; {results['epochs']} epochs per run, "
        f"{results['repeats']} repeats of every configuration in alternating order. An epoch is the time between two "
        "consecutive epoch ends (epoch 1 left out); the ratio compares, repeat by repeat, the median epoch CPU time "
        "with "
        "the same repeat's first row.",
    ]
    for name, study in results["models"].items():
        held = study["runs"][0]["held_zero"]
        lines += ["", f"## {MODELS[name].relative_to(ROOT)} ({held:,} weights held at zero)", ""]
        lines += model_section(study, results["repeats"])
    return "\n".join(lines) + "\n"


def model_section(study: dict, repeats: int) -> list[str]:
    rows, reference = study["summary"], study["summary"][0]
    lines = [
        "| engine | epoch CPU ms | epoch wall ms | CPU ratio (median, min-max) | setup CPU s | final loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(f"| {row['config']} | {row['epoch_cpu_ms']:.1f} | {row['epoch_wall_ms']:.1f} | "
                     f"{row['ratio_median']:.2f} "
                     f"({row['ratio_min']:.3f}-{row['ratio_max']:.3f}) | {row['setup_cpu_s']:.2f} | "
                     f"{row['final_loss']:.6f} |")
    lines += ["", "What the numbers say:", ""]
    for row in rows[1:]:
        verdict = ("faster in every repeat" if row["ratio_max"] < 1 else
                   "slower in every repeat" if row["ratio_min"] > 1 else
                   "faster in some repeats and slower in others")
        lines.append(f"- {row['config']} took {row['epoch_cpu_ms']:.1f} ms CPU per epoch, {row['ratio_median']:.2f}x "
                     f"{reference['config']}'s {reference['epoch_cpu_ms']:.1f} ms (paired ratio {row['ratio_min']:.3f}-"
                     f"{row['ratio_max']:.3f} over {repeats} repeats): {verdict}.")
    setups = ", ".join(f"{r['setup_cpu_s']:.2f} s" for r in rows)
    quickest = min(rows, key=lambda r: r["setup_cpu_s"])
    lines.append(f"- Setup (checks, gradient graph, session, optimizer) took {setups} CPU in the order of the table; "
                 f"{quickest['config']} was the quickest to set up.")
    rounding = " (within 100 float32 epsilons)" if study["loss_agreement"] < 100 * np.finfo(np.float32).eps else ""
    lines.append(f"- With the same seed the loss histories of all runs differ by at most {study['loss_agreement']:.1e} "
                 f"relative{rounding}.")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", default=None, help="interpreter to measure (repeatable; default: "
                                                                        "this one)")
    parser.add_argument("--model", action="append", choices=sorted(MODELS), default=None, help="repeatable; default: "
                                                                                               "both")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=0, help="first N calibration samples (0: all)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "finetune-engines"))
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    parser.add_argument("--render", action="store_true", help="measure nothing: rewrite OUT.md from OUT.json")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--environment", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        out = Path(args.out)
        fileio.write_text(out.with_suffix(".md"), markdown(json.loads(out.with_suffix(".json").read_text())))
        return 0
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return 0
    if args.environment:
        print(json.dumps(environment()))
        return 0
    if args.epochs < 3 or args.repeats < 1:
        raise InputError("need --epochs >= 3 (epoch 1 is left out) and --repeats >= 1")
    out = Path(args.out)
    for path in (out.with_suffix(".md"), out.with_suffix(".json")):
        fileio.check_output_path(path, force=args.force)
    pythons = args.python or [sys.executable]
    configs = [(python, engine) for python in pythons for engine in run(python, "1", "--environment")["engines"]]
    configs.sort(key=lambda config: config[1] != "ort-training")  # today's engine first: the ratios' reference
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "load_start": os.getloadavg()[0], "repeats": args.repeats, "epochs": args.epochs,
               "sparsity": args.sparsity,
               "samples": args.samples or int(np.load(DATA)["y"].shape[0]), "models": {}}
    for name in args.model or list(MODELS):
        runs = []
        for repeat in range(args.repeats):
            for python, engine in (configs if repeat % 2 == 0 else configs[::-1]):
                row = run(python, json.dumps({"model": name, "engine": engine, "epochs": args.epochs,
                                              "sparsity": args.sparsity, "samples": args.samples}), "--measure")
                runs.append({**row, "repeat": repeat})
                print(f"{name} repeat {repeat} {label(row)}: {1e3 * np.median(row['epoch_cpu_seconds']):.1f} ms CPU "
                      "per epoch",
                      file=sys.stderr)
        results["models"][name] = {"runs": runs, "summary": summarise(runs), "loss_agreement": loss_agreement(runs)}
    results["load_end"] = os.getloadavg()[0]
    arguments = argv if argv is not None else sys.argv[1:]
    results["command"] = "python scripts/bench_finetune.py" + (" " + shlex.join(arguments) if arguments else "")
    fileio.write_json(out.with_suffix(".json"), results)
    fileio.write_text(out.with_suffix(".md"), markdown(results))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_script(main)
