"""How much repeated work one prune does: model copies, shape inferences, serializations and onnxruntime
sessions, counted while the API prunes the shipped MNIST MLP (models/) with its defaults.

    python scripts/count_work.py [--out docs/results/pipeline-work]

Counts are exact (the calls are wrapped), so one run suffices; the same seed gives the same counts.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402

MODEL, CALIB = ROOT / "models" / "mnist_mlp.onnx", ROOT / "models" / "mnist_calib.npz"
RUNS = {
    "one-shot ECP, sparsity 0.5": lambda: onnxprune.prune(str(MODEL), str(CALIB), 0.5),
    "ecp-refit, sparsity 0.9": lambda: onnxprune.prune(str(MODEL), str(CALIB), 0.9, method="ecp-refit"),
    "structured, sparsity 0.5 (defaults)": lambda: onnxprune.prune_structured(str(MODEL), str(CALIB), sparsity=0.5),
}


@contextmanager
def counting():
    """Wrap the calls that copy, infer, serialize or open a session; yield the counter."""
    import onnxruntime

    counts: Counter = Counter()
    originals = {
        "copy": (onnx.ModelProto, "CopyFrom"),
        "serialize": (onnx.ModelProto, "SerializeToString"),
        "shape inference": (onnx.shape_inference, "infer_shapes"),
        "session": (onnxruntime.InferenceSession, "__init__"),
    }
    saved = {}
    for what, (owner, name) in originals.items():
        real = getattr(owner, name)
        saved[what] = real

        def wrapped(*args, _real=real, _what=what, **kwargs):
            counts[_what] += 1
            return _real(*args, **kwargs)

        setattr(owner, name, wrapped)
    try:
        yield counts
    finally:
        for what, (owner, name) in originals.items():
            setattr(owner, name, saved[what])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "pipeline-work")
    args = parser.parse_args()
    rows = {}
    for name, run in RUNS.items():
        with counting() as counts:
            run()
        rows[name] = dict(counts)
        print(name, dict(counts), flush=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    columns = ["copy", "shape inference", "serialize", "session"]
    lines = ["# Repeated work per prune", "",
             "Calls counted while `onnxprune.prune` / `onnxprune.prune_structured` prune `models/mnist_mlp.onnx` on "
             "`models/mnist_calib.npz` (`python scripts/count_work.py`): model copies (`ModelProto.CopyFrom`), shape "
             "inferences, model serializations and onnxruntime sessions.", "",
             "| run | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    lines += [f"| {name} | " + " | ".join(str(row.get(c, 0)) for c in columns) + " |" for name, row in rows.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
