"""How much repeated work one prune does: model copies, shape inferences, serializations and onnxruntime
sessions, counted while the API prunes the shipped MNIST MLP (models/) with its defaults, split into the
calls onnxprune makes and those inside onnx-ad's reverse-mode builder (a library: its own copies and
shape inferences, once per derivative graph).

    python scripts/count_work.py [--code DIR ...] [--out docs/results/pipeline-work]

``--code`` counts another checkout's package (an older commit, for comparison) on the same model and
data; the report names each checkout's commit. Counts are exact (the calls are wrapped), so one run
of each suffices.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL, CALIB = ROOT / "models" / "mnist_mlp.onnx", ROOT / "models" / "mnist_calib.npz"
RUNS = ("one-shot ECP, sparsity 0.5", "ecp-refit, sparsity 0.9", "structured, sparsity 0.5 (defaults)")
WHAT = {"copy": "model copies (ModelProto.CopyFrom)", "shape inference": "shape inferences",
        "serialize": "model serializations", "session": "onnxruntime sessions"}

CHILD = r"""
import json, sys, traceback
from collections import Counter
sys.path.insert(0, sys.argv[1])
import onnx, onnxruntime
import onnxprune
model, calib, run = sys.argv[2], sys.argv[3], sys.argv[4]
counts = Counter()
def wrap(owner, name, what):
    real = getattr(owner, name)
    def wrapped(*args, **kwargs):
        inside = any("onnx_ad" in frame.filename for frame in traceback.extract_stack()[:-1])
        counts[what + (" (onnx-ad)" if inside else "")] += 1
        return real(*args, **kwargs)
    setattr(owner, name, wrapped)
wrap(onnx.ModelProto, "CopyFrom", "copy")
wrap(onnx.ModelProto, "SerializeToString", "serialize")
wrap(onnx.shape_inference, "infer_shapes", "shape inference")
wrap(onnxruntime.InferenceSession, "__init__", "session")
if run.startswith("one-shot"):
    onnxprune.prune(model, calib, 0.5)
elif run.startswith("ecp-refit"):
    onnxprune.prune(model, calib, 0.9, method="ecp-refit")
else:
    onnxprune.prune_structured(model, calib, sparsity=0.5)
print(json.dumps(counts))
"""


def count(code: Path, run: str) -> dict:
    """The calls one run makes with the package in ``code``, in a fresh process (nothing cached)."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(code), str(MODEL), str(CALIB), run],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def commit(code: Path) -> str:
    done = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=Path, action="append", default=None,
                        help="a checkout whose onnxprune package is counted (repeatable; default this one)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "pipeline-work")
    args = parser.parse_args()
    codes = args.code or [ROOT]
    rows = {}
    for code in codes:
        label = commit(code)
        for run in RUNS:
            rows[f"{run} @ {label}"] = count(code, run)
            print(run, label, rows[f"{run} @ {label}"], flush=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Repeated work per prune", "",
             "Calls counted while `onnxprune.prune` / `onnxprune.prune_structured` prune `models/mnist_mlp.onnx` on "
             "`models/mnist_calib.npz` with their defaults (`python scripts/count_work.py"
             + (" --code OLD --code ." if len(codes) > 1 else "") + "`" + (", OLD a checkout of the commit of the "
             "first rows" if len(codes) > 1 else "") + "), each run in a fresh process. "
             "A cell reads `all (in onnx-ad)`: the calls made inside onnx-ad's reverse-mode builder, once per "
             "derivative graph, are a library's own and are shown apart.", "",
             "| run @ commit | " + " | ".join(WHAT.values()) + " |", "| --- |" + " ---: |" * len(WHAT)]
    for name, row in rows.items():
        cells = [f"{row.get(k, 0) + row.get(k + ' (onnx-ad)', 0)} ({row.get(k + ' (onnx-ad)', 0)})" for k in WHAT]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
