"""Statistics and evaluation on CUDA against the CPU, on the shipped models: agreement and time.

    python scripts/gpu_compare.py [--out docs/results/gpu.md] [--json docs/results/gpu.json] [--repeats 3] [--force]

Needs an onnxruntime build with CUDAExecutionProvider (`pip install -e '.[gpu]'`, see docs/install-gpu.md);
run by scripts/gpu_check.sh. For each shipped model: the adjoint engine's ECP statistics (A, B, C) on the
calibration data with provider cuda and cpu (largest difference relative to the largest value), and the
evaluation (loss, accuracy) on the test data; times are the median of --repeats runs, the two providers
alternating, after one warm-up run each.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune import api, fileio, runtime  # noqa: E402
from onnxprune.errors import run_script  # noqa: E402
from onnxprune.layers import analyse_graph  # noqa: E402
from onnxprune.outputs import protected_output  # noqa: E402
from onnxprune.statistics import collect_statistics  # noqa: E402

MODELS = ("mnist_mlp.onnx", "mnist_cnn.onnx")
PROVIDERS = ("cpu", "cuda")


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def compare(name: str, repeats: int) -> dict:
    model = api.as_model(ROOT / "models" / name)
    calib = api.as_dataset(ROOT / "models" / "mnist_calib.npz", model)
    test = api.as_dataset(ROOT / "models" / "mnist_test.npz", model)
    layers, out = analyse_graph(model).layers, protected_output(model)
    stats, evals, times = {}, {}, {p: {"statistics": [], "evaluate": []} for p in PROVIDERS}
    for round_ in range(repeats + 1):  # round 0 warms up (CUDA context, kernels)
        for provider in PROVIDERS:
            stats[provider], t_stats = timed(lambda: collect_statistics(model, layers, calib, out, engine="adjoint",
                                                                        provider=provider))
            evals[provider], t_eval = timed(lambda: api.evaluate(model, test, provider=provider))
            if round_:
                times[provider]["statistics"].append(t_stats)
                times[provider]["evaluate"].append(t_eval)
    difference = max(float(np.abs(getattr(stats["cuda"][layer.name], f) - getattr(stats["cpu"][layer.name], f)).max()
                           / max(float(np.abs(getattr(stats["cpu"][layer.name], f)).max()), 1e-30))
                     for layer in layers for f in ("A", "B", "C"))
    return {"model": name, "statistics_relative_difference": difference,
            "loss": {p: evals[p]["loss"] for p in PROVIDERS}, "accuracy": {p: evals[p]["accuracy"] for p in PROVIDERS},
            "seconds": {p: {k: float(np.median(v)) for k, v in times[p].items()} for p in PROVIDERS},
            "calibration_samples": len(calib), "test_samples": len(test)}


def report(rows: list[dict], command: str) -> str:
    import onnxruntime

    lines = ["# Statistics and evaluation on CUDA vs CPU", "", f"Command: `{command}`", "",
             f"Machine: {platform.node()}, Python {platform.python_version()}, {runtime.build_name()}, providers "
             f"{', '.join(onnxruntime.get_available_providers())}. Date: {time.strftime('%Y-%m-%d')}.", "",
             "| model | A, B, C: max relative difference | loss cpu / cuda | accuracy cpu / cuda | statistics s cpu / cuda "
             "| evaluate s cpu / cuda |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['model']} | {r['statistics_relative_difference']:.2e} | {r['loss']['cpu']:.5f} / "
                     f"{r['loss']['cuda']:.5f} | {100 * r['accuracy']['cpu']:.2f}% / {100 * r['accuracy']['cuda']:.2f}% | "
                     f"{s['cpu']['statistics']:.3f} / {s['cuda']['statistics']:.3f} | {s['cpu']['evaluate']:.3f} / "
                     f"{s['cuda']['evaluate']:.3f} |")
    lines += ["", "## What the numbers say", ""]
    for r in rows:
        s = r["seconds"]
        lines.append(f"- {r['model']}: CUDA statistics agree with the CPU's to {r['statistics_relative_difference']:.1e} "
                     f"(relative); statistics time cuda/cpu = {s['cuda']['statistics'] / s['cpu']['statistics']:.2f}, "
                     f"evaluation time cuda/cpu = {s['cuda']['evaluate'] / s['cpu']['evaluate']:.2f} "
                     f"({r['calibration_samples']:,} calibration and {r['test_samples']:,} test samples).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "gpu.md"))
    parser.add_argument("--json", default=str(ROOT / "docs" / "results" / "gpu.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    for path in (args.out, args.json):
        fileio.check_output_path(path, force=args.force)
    runtime.provider_list("cuda")  # a clear one-line error without a CUDA build
    rows = [compare(name, args.repeats) for name in MODELS]
    command = "python scripts/gpu_compare.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    fileio.write_text(args.out, report(rows, command.strip()))
    fileio.write_json(args.json, {"rows": rows, "command": command.strip()})
    print(f"wrote {args.out} and {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_script(main)
