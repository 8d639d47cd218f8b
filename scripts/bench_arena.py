"""The adjoint engine's derivative-graph sessions with and without onnxruntime's CPU memory arena:
ECP statistics time (collect_statistics), paired and repeated. Writes OUT.md and OUT.json.

    .venv/bin/python scripts/bench_arena.py [--repeats 6] [--samples 512] [--out docs/results/arena]

The engine runs its derivative graphs without the arena (their peak memory goes back after each run;
on 224x224 CNNs that peak is most of a prune's memory, see docs/results/corpus.md). This measures what
that costs in time: each repeat runs both settings back to back, in an order that alternates between
repeats, on the shipped MNIST MLP and CNN, one thread. The arena is switched by wrapping
``runtime.proto_session`` (the engine's only way to make its sessions) for the run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune import runtime  # noqa: E402
from onnxprune.api import as_model  # noqa: E402
from onnxprune.derivatives.statistics import collect_statistics  # noqa: E402
from onnxprune.errors import run_script  # noqa: E402
from onnxprune.find.layers import analyse_graph  # noqa: E402
from onnxprune.find.outputs import protected_output  # noqa: E402
from onnxprune.io import files as fileio  # noqa: E402
from onnxprune.io.data import as_dataset  # noqa: E402

MODELS = {"mlp": ROOT / "models" / "mnist_mlp.onnx", "cnn": ROOT / "models" / "mnist_cnn.onnx"}


def timed(model, layers, data, output, arena: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one collect_statistics with the derivative sessions' arena on or off."""
    original = runtime.proto_session

    def session(m, provider="cpu", threads=None, **_):  # the engine's own arena=False is overridden
        return original(m, provider, threads, arena=arena)

    runtime.proto_session = session
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        collect_statistics(model, layers, data, output, engine="adjoint", threads=1)
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        runtime.proto_session = original


def measure(name: str, repeats: int, samples: int) -> dict:
    model = as_model(MODELS[name])
    data = as_dataset(ROOT / "models" / "mnist_calib.npz", model).subset(samples)
    layers, output = analyse_graph(model).layers, protected_output(model)
    timed(model, layers, data, output, True)  # warm-up: imports, first-call costs
    runs: dict[str, list] = {"on": [], "off": []}
    for r in range(repeats):
        for label in (("on", "off") if r % 2 == 0 else ("off", "on")):
            runs[label].append(timed(model, layers, data, output, label == "on"))
    ratio = [off[0] / on[0] for on, off in zip(runs["on"], runs["off"], strict=True)]
    cpu_ratio = [off[1] / on[1] for on, off in zip(runs["on"], runs["off"], strict=True)]
    return {"model": name, "samples": samples, "runs": runs, "wall_ratio_off_on": float(np.median(ratio)),
            "wall_ratio_range": [float(min(ratio)), float(max(ratio))], "cpu_ratio_off_on": float(np.median(cpu_ratio))}


def render(results: dict) -> str:
    lines = ["# Derivative-graph sessions with and without onnxruntime's CPU arena", "",
             f"Command: `{results['command']}` ({results['machine']}, onnxruntime {results['onnxruntime']}). "
             f"ECP statistics (collect_statistics, adjoint engine, one thread) on the shipped models, "
             f"{results['repeats']} paired repeats, the order alternating; ratio = arena off / arena on per repeat.", "",
             "| model | samples | median wall s, arena on | median wall s, arena off | off / on (wall, median; range) "
             "| off / on (CPU, median) |", "| --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        on = np.median([w for w, _ in row["runs"]["on"]])
        off = np.median([w for w, _ in row["runs"]["off"]])
        low, high = row["wall_ratio_range"]
        lines.append(f"| {row['model']} | {row['samples']:,} | {on:.3f} | {off:.3f} | {row['wall_ratio_off_on']:.2f} "
                     f"({low:.2f}-{high:.2f}) | {row['cpu_ratio_off_on']:.2f} |")
    worst = max(row["wall_ratio_off_on"] for row in results["rows"])
    lines += ["", f"Without the arena the statistics took at most {worst:.2f}x the time with it (median wall-time ratio "
                  f"over the models), {'no slower' if worst <= 1.0 else 'slower'} in this run.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "arena"))
    p.add_argument("--render", default=None, metavar="JSON", help="rewrite the markdown from a recorded JSON")
    args = p.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
    else:
        import onnxruntime

        results = {"command": "python scripts/bench_arena.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "machine": f"{platform.machine()} {platform.system()}", "onnxruntime": onnxruntime.__version__,
                   "repeats": args.repeats, "rows": [measure(name, args.repeats, args.samples) for name in MODELS]}
        fileio.write_text(Path(f"{args.out}.json"), json.dumps(results, indent=1) + "\n")
    fileio.write_text(Path(f"{args.out}.md"), render(results))
    print(f"wrote {args.out}.md and .json")
    return 0


if __name__ == "__main__":
    run_script(main)
