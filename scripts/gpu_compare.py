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
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune import api, runtime  # noqa: E402
from onnxprune.derivatives.statistics import collect_statistics  # noqa: E402
from onnxprune.errors import run_script  # noqa: E402
from onnxprune.find.layers import analyse_graph  # noqa: E402
from onnxprune.find.outputs import protected_output  # noqa: E402
from onnxprune.io import files as fileio  # noqa: E402

MODELS = ("mnist_mlp.onnx", "mnist_cnn.onnx")
PROVIDERS = ("cpu", "cuda")


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def compare(name: str, repeats: int) -> dict:
    model = api.as_model(ROOT / "models" / name)
    calib = api.as_dataset(ROOT / "models" / "mnist_calib.npz", model)
    test = api.as_dataset(ROOT / "models" / "mnist_test.npz", model)
    layers, out = analyse_graph(model).layers, protected_output(model)
    steps = {"statistics": lambda provider: collect_statistics(model, layers, calib, out, engine="adjoint",
                                                               provider=provider),
             "evaluate": lambda provider: api.evaluate(model, test, provider=provider)}
    values: dict[str, dict] = {p: {} for p in PROVIDERS}
    times: dict[str, dict[str, list[float]]] = {p: {step: [] for step in steps} for p in PROVIDERS}
    for round_ in range(repeats + 1):  # round 0 warms up (CUDA context, kernels)
        for provider in PROVIDERS:  # alternating, so that both see the same load
            for step, run in steps.items():
                values[provider][step], seconds = timed(run, provider)
                if round_:
                    times[provider][step].append(seconds)
    stats = {p: values[p]["statistics"] for p in PROVIDERS}
    difference = max(float(np.abs(getattr(stats["cuda"][layer.name], f) - getattr(stats["cpu"][layer.name], f)).max()
                           / max(float(np.abs(getattr(stats["cpu"][layer.name], f)).max()), 1e-30))
                     for layer in layers for f in ("A", "B", "C"))
    return {"model": name, "statistics_relative_difference": difference,
            "loss": {p: values[p]["evaluate"]["loss"] for p in PROVIDERS},
            "accuracy": {p: values[p]["evaluate"]["accuracy"] for p in PROVIDERS},
            "seconds": {p: {k: float(np.median(v)) for k, v in times[p].items()} for p in PROVIDERS},
            "calibration_samples": len(calib), "test_samples": len(test)}


def environment() -> dict:
    """Where the comparison ran, kept in the JSON so that --render writes the same header."""
    import onnxruntime

    return {"machine": f"{platform.node()}, Python {platform.python_version()}, {runtime.build_name()}",
            "providers": onnxruntime.get_available_providers(), "date": time.strftime("%Y-%m-%d")}


def report(results: dict) -> str:
    """The table and, per model, what its numbers say: one pass over the rows for both."""
    table, findings = [], []
    for r in results["rows"]:
        s, difference = r["seconds"], r["statistics_relative_difference"]
        table.append(f"| {r['model']} | {difference:.2e} | {r['loss']['cpu']:.5f} / {r['loss']['cuda']:.5f} | "
                     f"{100 * r['accuracy']['cpu']:.2f}% / {100 * r['accuracy']['cuda']:.2f}% | "
                     f"{s['cpu']['statistics']:.3f} / {s['cuda']['statistics']:.3f} | "
                     f"{s['cpu']['evaluate']:.3f} / {s['cuda']['evaluate']:.3f} |")
        findings.append(f"- {r['model']}: CUDA's statistics differ from the CPU's by at most {difference:.1e} "
                        "(relative); "
                        f"statistics time cuda/cpu = {s['cuda']['statistics'] / s['cpu']['statistics']:.2f}, "
                        f"evaluation time cuda/cpu = {s['cuda']['evaluate'] / s['cpu']['evaluate']:.2f} "
                        f"({r['calibration_samples']:,} calibration and {r['test_samples']:,} test samples).")
    env = results["environment"]
    return "\n".join([
        "# Statistics and evaluation on CUDA vs CPU", "", f"Command: `{results['command']}`", "",
        f"Machine: {env['machine']}, providers {', '.join(env['providers'])}. Date: {env['date']}.", "",
        "| model | A, B, C: max relative difference | loss cpu / cuda | accuracy cpu / cuda | statistics s cpu / cuda "
        "| evaluate s cpu / cuda |", "| --- | --- | --- | --- | --- | --- |",
        *table, "", "## What the numbers say", "", *findings]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "gpu.md"))
    parser.add_argument("--json", default=str(ROOT / "docs" / "results" / "gpu.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--render", action="store_true", help="measure nothing: rewrite --out from --json")
    args = parser.parse_args(argv)
    if args.render:
        fileio.write_text(args.out, report(json.loads(Path(args.json).read_text())))
        return 0
    for path in (args.out, args.json):
        fileio.check_output_path(path, force=args.force)
    runtime.provider_list("cuda")  # a clear one-line error without a CUDA build
    command = "python scripts/gpu_compare.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    results = {"rows": [compare(name, args.repeats) for name in MODELS], "command": command.strip(),
               "environment": environment()}
    fileio.write_json(args.json, results)
    fileio.write_text(args.out, report(results))
    print(f"wrote {args.out} and {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_script(main)
