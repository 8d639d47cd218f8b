"""Score a model once with onnxprune and write the pruned model at several ratios (top-level API only).

    .venv/bin/python scripts/lm/onnxprune_sweep.py MODEL.onnx CALIB.npz --ratios 0.5,0.6,0.7,2:4 --prefix OUT
        [--method ecp] [--scope global|layer] [--refit | --no-refit] [--conv-statistics exact|positions]
        [--probes P] [--error-at output|layer] [--exclude PATTERN ...] [--threads 2] --json REPORT.json

``onnxprune.Pruner(method, scope=..., refit=..., ...).fit(MODEL, CALIB)`` then ``pruner.prune(r)`` and
``onnxprune.save_model(result.model, f"{OUT}_{r}.onnx")`` for every ratio: the same as ``onnxprune prune MODEL OUT
--data CALIB --sparsity r [options] --exclude ...`` run once per ratio, except that the statistics are computed
once. An N:M ratio (2:4) is ``Pruner(..., pattern="2:4")``, fit on its own (the pattern is the Pruner's). An
option not given is left to onnxprune (its defaults for the model); the report has what each run chose, the
fit's seconds, every ratio's prune and save seconds and ``PruneResult.to_dict()`` (the CLI's --json report).
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
    ap.add_argument("--method", default="ecp")
    ap.add_argument("--scope", default=None)
    ap.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--conv-statistics", default=None)
    ap.add_argument("--probes", type=int, default=None)
    ap.add_argument("--error-at", default=None)
    ap.add_argument("--exclude", nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    t0 = time.time()
    import onnxprune
    t1 = time.time()
    options = {k: v for k, v in dict(scope=args.scope, refit=args.refit, conv_statistics=args.conv_statistics,
                                     probes=args.probes, error_at=args.error_at).items() if v is not None}
    ratios = args.ratios.split(",")
    report = {"call": f"onnxprune.Pruner({args.method!r}, **{options!r}, exclude={tuple(args.exclude)!r}, "
                      f"threads={args.threads}).fit(model, data)", "seconds": {"import": round(t1 - t0, 2)}, "ratios": {}}
    fits = {}
    for ratio in ratios:
        pattern = ratio if ":" in ratio else None
        if pattern not in fits:
            t = time.time()
            pruner = onnxprune.Pruner(args.method, exclude=tuple(args.exclude), threads=args.threads, pattern=pattern,
                                      **options)
            fits[pattern] = pruner.fit(args.model, args.data)
            report["seconds"]["fit" if pattern is None else f"fit {pattern}"] = round(time.time() - t, 2)
        t = time.time()
        result = fits[pattern].prune(0.5 if pattern else float(ratio))
        t_prune = time.time() - t
        path = f"{args.prefix}_{ratio.replace(':', 'of') if pattern else round(float(ratio) * 100)}.onnx"
        onnxprune.save_model(result.model, path)
        report["ratios"][ratio] = {"file": path, "prune_seconds": round(t_prune, 2),
                                   "save_seconds": round(time.time() - t - t_prune, 2),
                                   "fit": "fit" if pattern is None else f"fit {pattern}", "report": result.to_dict()}
        print(f"ratio {ratio}: {t_prune:.1f} s, sparsity {result.sparsity:.4f}", flush=True)
    report["seconds"]["total"] = round(time.time() - t0, 2)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
