"""Score a model once with onnxprune's ECP and write the pruned model at several ratios (top-level API only).

    .venv/bin/python scripts/lm/onnxprune_sweep.py MODEL.onnx CALIB.npz --ratios 0.5,0.6,0.7 --prefix OUT
        [--scope global|layer] [--refit] [--exclude PATTERN ...] [--threads 2] --json REPORT.json

``onnxprune.Pruner("ecp", scope=..., refit=..., exclude=..., threads=...).fit(MODEL, CALIB)`` then
``pruner.prune(r)`` and ``onnxprune.save_model(result.model, f"{OUT}_{r}.onnx")`` for every ratio: the same
as ``onnxprune prune MODEL OUT --data CALIB --sparsity r [--scope layer] [--refit] --exclude ...`` run once per
ratio, except that the statistics are computed once. The report has the fit's seconds, every ratio's prune and
save seconds and ``PruneResult.to_dict()`` (the CLI's --json report).
"""

from __future__ import annotations

import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--ratios", default="0.5,0.6,0.7")
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--scope", default="global")
    ap.add_argument("--refit", action="store_true")
    ap.add_argument("--exclude", nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    t0 = time.time()
    import onnxprune
    t1 = time.time()
    pruner = onnxprune.Pruner("ecp", scope=args.scope, refit=True if args.refit else None, exclude=tuple(args.exclude),
                              threads=args.threads)
    pruner.fit(args.model, args.data)
    t2 = time.time()
    report = {"call": f"onnxprune.Pruner('ecp', scope={args.scope!r}, refit={True if args.refit else None}, "
                      f"exclude={tuple(args.exclude)!r}, threads={args.threads}).fit(model, data)",
              "seconds": {"import": round(t1 - t0, 2), "fit": round(t2 - t1, 2)}, "ratios": {}}
    for r in (float(x) for x in args.ratios.split(",")):
        t = time.time()
        result = pruner.prune(r)
        t_prune = time.time() - t
        path = f"{args.prefix}_{round(r * 100)}.onnx"
        onnxprune.save_model(result.model, path)
        report["ratios"][str(r)] = {"file": path, "prune_seconds": round(t_prune, 2),
                                    "save_seconds": round(time.time() - t - t_prune, 2),
                                    "report": result.to_dict()}
        print(f"ratio {r}: {t_prune:.1f} s, sparsity {result.sparsity:.4f}", flush=True)
    report["seconds"]["total"] = round(time.time() - t0, 2)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
