"""The sharded statistics service against one process: ECP statistics throughput on 1 and 2 local
worker processes, the fixed cost per worker, and a model of the speedup on W machines from the
measured fixed and per-image costs. Writes OUT.md and OUT.json.

    .venv/bin/python scripts/bench_shards.py [--repeats 3] [--sizes 512,2048] [--out docs/results/shards]

The shipped MNIST CNN, exact Jacobians (10 outputs), one thread per process, shards of --shard-size
images. Every repeat runs each setting (this process; 1 worker; 2 workers) at each data size, in an
order that rotates between repeats. Per setting, time = fixed + images x per-image is fitted to the
medians at the smallest and largest size: the fixed part holds the plan, the workers' start (a fresh
interpreter, the imports, the job sent once, the derivative graph built) and the reduce.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.api import as_model  # noqa: E402
from onnxprune.derivatives.statistics import collect_statistics  # noqa: E402
from onnxprune.errors import run_script  # noqa: E402
from onnxprune.find.layers import analyse_graph  # noqa: E402
from onnxprune.find.outputs import protected_output  # noqa: E402
from onnxprune.io import files as fileio  # noqa: E402
from onnxprune.io.data import as_dataset  # noqa: E402

MODEL = ROOT / "models" / "mnist_cnn.onnx"
SETTINGS = {"one process": None, "1 worker": 1, "2 workers": 2}
MACHINES = (1, 2, 4, 8, 16, 64)
IMAGES = (512, 2048, 10_000, 100_000)


def timed(model, layers, data, output, workers: int | None, shard_size: int) -> tuple[float, float]:
    """(wall s, CPU s) of one collect_statistics: the CPU of this process and of the workers it
    started and waited for (on a machine shared with others, the CPU is what a dedicated one's wall
    time would be, each process having one thread)."""
    def cpu() -> float:
        mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime

    wall, used = time.perf_counter(), cpu()
    collect_statistics(model, layers, data, output, threads=1, batch_size=shard_size, workers=workers,
                       shard_size=shard_size if workers else None)
    return time.perf_counter() - wall, cpu() - used


def fit(sizes: list[int], medians: list[float]) -> tuple[float, float]:
    """(fixed s, per-image s) of the line through the smallest and the largest size's medians."""
    per_image = (medians[-1] - medians[0]) / (sizes[-1] - sizes[0])
    return medians[0] - sizes[0] * per_image, per_image


def measure(repeats: int, sizes: list[int], shard_size: int) -> dict:
    model = as_model(MODEL)
    full = as_dataset(ROOT / "models" / "mnist_calib.npz", model)
    layers, output = analyse_graph(model).layers, protected_output(model)
    timed(model, layers, full.subset(sizes[0]), output, None, shard_size)  # warm-up: imports, first-call costs
    runs: dict[str, dict[int, list]] = {label: {n: [] for n in sizes} for label in SETTINGS}
    labels = list(SETTINGS)
    for r in range(repeats):
        for k in range(len(labels)):
            label = labels[(k + r) % len(labels)]
            for n in sizes:
                runs[label][n].append(timed(model, layers, full.subset(n), output, SETTINGS[label], shard_size))
    rows = {}
    for label in labels:
        row: dict = {"runs": {str(n): runs[label][n] for n in sizes}}
        for kind, column in (("wall", 0), ("cpu", 1)):
            medians = [float(np.median([run[column] for run in runs[label][n]])) for n in sizes]
            fixed, per_image = fit(sizes, medians)
            row[kind] = {"median_s": medians, "fixed_s": fixed, "per_image_s": per_image}
        row["images_per_s"] = [n / t for n, t in zip(sizes, row["wall"]["median_s"])]
        rows[label] = row
    return rows


def speedup(base: dict, worker: dict, machines: int, images: int) -> float:
    """One process's time over W workers' (one per machine): fixed + images x per-image / W."""
    return (base["fixed_s"] + images * base["per_image_s"]) / (worker["fixed_s"] + images * worker["per_image_s"] / machines)


def render(results: dict) -> str:
    rows, sizes = results["rows"], results["sizes"]
    base, one, two = (rows[k]["cpu"] for k in ("one process", "1 worker", "2 workers"))
    lines = ["# Statistics sharded over workers: throughput, fixed cost, speedup model", "",
             f"Command: `{results['command']}` ({results['machine']}, {results['cpus']} CPUs shared with other "
             f"users, load average {results['load']:.1f} at the start; onnxruntime {results['onnxruntime']}). "
             f"ECP statistics (`collect_statistics`, exact Jacobians) of the shipped MNIST CNN, one thread per "
             f"process, shards of {results['shard_size']} images, {results['repeats']} repeats in rotating order; "
             "medians. CPU: this process's and its workers' (user + system).", "",
             "| setting | " + " | ".join(f"{n:,} images: wall s (images/s) | CPU s" for n in sizes)
             + " | fixed CPU s | CPU ms per image |", ("| --- | " + "--- | --- | " * len(sizes) + "--- | --- |")]
    for label, row in rows.items():
        cells = " | ".join(f"{t:.2f} ({v:,.0f}) | {c:.2f}" for t, v, c in
                           zip(row["wall"]["median_s"], row["images_per_s"], row["cpu"]["median_s"]))
        lines.append(f"| {label} | {cells} | {row['cpu']['fixed_s']:.2f} | {1000 * row['cpu']['per_image_s']:.3f} |")
    walls = [rows[k]["wall"]["median_s"] for k in ("one process", "2 workers")]
    lines += ["", f"Fixed cost of a worker: {one['fixed_s'] - base['fixed_s']:.2f} CPU s (1 worker's fixed part less "
                  f"this process's: a fresh interpreter, the imports, the job received, the derivative graph built); "
                  f"2 workers' fixed part is {two['fixed_s'] - base['fixed_s']:.2f} CPU s above this process's. The "
                  f"per-image CPU on a worker is {one['per_image_s'] / base['per_image_s']:.2f}x this process's.",
              "",
              "Measured wall-time speedup of 2 workers over one process on this machine: "
              + ", ".join(f"{b / w:.2f}x at {n:,} images" for b, w, n in zip(*walls, sizes))
              + f" (the model below, from CPU costs, says {speedup(base, one, 2, sizes[0]):.2f}x and "
                f"{speedup(base, one, 2, sizes[-1]):.2f}x for two dedicated machines; here the workers share "
                f"{results['cpus']} cores with the other users' processes).", "",
              "## Speedup model for W machines", "",
              "One worker per machine with the 1-worker costs above: time = fixed + images x per-image / W, against "
              "one process's fixed + images x per-image (CPU seconds, one thread, as on a dedicated core). The "
              "driver's scoring, masks and writing are outside both; W machines help only while there are at "
              "least W shards.", "",
              "| images | " + " | ".join(f"W = {w}" for w in MACHINES) + " |", ("| --- | " + "--- | " * len(MACHINES)).rstrip()]
    for n in IMAGES:
        lines.append(f"| {n:,} | " + " | ".join(f"{speedup(base, one, w, n):.2f}x" for w in MACHINES) + " |")
    lines += ["", "As W grows the speedup tends to one process's time over a worker's fixed cost: "
              + ", ".join(f"{(base['fixed_s'] + n * base['per_image_s']) / one['fixed_s']:.1f}x at {n:,} images"
                          for n in IMAGES)
              + f". These are the MNIST CNN's costs ({1000 * base['per_image_s']:.2f} ms of CPU per image); for "
                "another model the same formula takes that model's measured fixed and per-image costs.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", default="512,2048", help="calibration images, comma-separated (at most 2048)")
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "shards"))
    p.add_argument("--render", default=None, metavar="JSON", help="rewrite the markdown from a recorded JSON")
    args = p.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
    else:
        import onnxruntime

        sizes = sorted(int(n) for n in args.sizes.split(","))
        results = {"command": " ".join(["python scripts/bench_shards.py", *(sys.argv[1:] if argv is None else argv)]),
                   "machine": f"{platform.machine()} {platform.system()}", "cpus": os.cpu_count(),
                   "load": os.getloadavg()[0], "onnxruntime": onnxruntime.__version__, "repeats": args.repeats,
                   "sizes": sizes, "shard_size": args.shard_size,
                   "rows": measure(args.repeats, sizes, args.shard_size)}
        fileio.write_text(Path(f"{args.out}.json"), json.dumps(results, indent=1) + "\n")
    fileio.write_text(Path(f"{args.out}.md"), render(results))
    print(f"wrote {args.out}.md and .json")
    return 0


if __name__ == "__main__":
    run_script(main)
