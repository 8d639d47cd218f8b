"""onnxprune's chained least-squares refit on another tool's masks: the repair compared on the same masks.

    .venv/bin/python scripts/lm/refit_masks.py DENSE.onnx MASKED.onnx CALIB.npz OUT.onnx --keep WEIGHTS.json
        [--threads 2] [--json REPORT.json]

The zeros of the weights listed in --keep (the transformer blocks' linear weights) are read from MASKED.onnx
(onnxsim SparseGPT's output: its masks and its own updated weights), put into the dense weights, and every
block layer is re-solved by ``onnxprune.repair.refit.refit`` (ridge least squares of each row's surviving
weights and bias towards the dense model's pre-activations, on the inputs the pruned network before it
produces, layer by layer): SparseGPT's masks with onnxprune's weight update instead of SparseGPT's.
"""

from __future__ import annotations

import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dense")
    ap.add_argument("masked")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--keep", required=True, help="JSON list of the initializer names whose zeros are the masks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    t0 = time.time()
    import onnx
    from onnx import numpy_helper

    import onnxprune
    from onnxprune.find.layers import analyse_graph
    from onnxprune.find.outputs import protected_output
    from onnxprune.io.data import as_dataset
    from onnxprune.repair.refit import refit

    dense = onnx.load(args.dense)
    masked = {t.name: numpy_helper.to_array(t) for t in onnx.load(args.masked).graph.initializer}
    keep = set(json.load(open(args.keep)))
    current = onnx.ModelProto()
    current.CopyFrom(dense)
    zeros = 0
    for t in current.graph.initializer:
        if t.name in keep:
            value = numpy_helper.to_array(t).copy()
            mask = masked[t.name] == 0
            value[mask] = 0
            zeros += int(mask.sum())
            t.CopyFrom(numpy_helper.from_array(value, t.name))
    layers = [layer for layer in analyse_graph(current).layers if layer.weight in keep]
    data = as_dataset(args.data, current)
    t1 = time.time()
    model, reports = refit(dense, current, layers, data, protected_output(current), threads=args.threads)
    t2 = time.time()
    onnxprune.save_model(model, args.out)
    report = {"call": "onnxprune.repair.refit.refit(dense, dense with the masks' zeros, block layers, calibration)",
              "layers": len(layers), "zeros": zeros, "seconds": {"load": round(t1 - t0, 2), "refit": round(t2 - t1, 2),
                                                               "total": round(time.time() - t0, 2)},
              "refits": [r.__dict__ for r in reports]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
    print(json.dumps({k: report[k] for k in ("layers", "zeros", "seconds")}))


if __name__ == "__main__":
    main()
