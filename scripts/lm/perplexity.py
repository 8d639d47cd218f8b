"""Held-out perplexity of an ONNX language model with onnxruntime (lmcommon.onnx_perplexity).

    python scripts/lm/perplexity.py MODEL.onnx [MODEL2.onnx ...] [--data out/lm/data/heldout.npz] [--json -]

Perplexity = exp(mean next-token cross-entropy): logits[:, t] scored against input_ids[:, t + 1] at every
position of every sequence of --data (input_ids (N, T) int64). Inputs an export declares besides input_ids get
the values of a full unpadded sequence (attention_mask ones, position_ids 0..T-1). Needs numpy and onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import lmcommon as L
import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=pathlib.Path)
    ap.add_argument("--data", type=pathlib.Path, default=L.DEFAULT_OUT / "data" / "heldout.npz")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results as JSON to this path ('-': stdout)")
    args = ap.parse_args()
    ids = np.load(args.data)["input_ids"]
    out = {}
    for m in args.models:
        r = L.onnx_perplexity(m, ids, threads=args.threads)
        out[str(m)] = r
        if args.json != "-":
            print(f"{m}: perplexity {r['perplexity']:.4f} (mean NLL {r['nll']:.5f} over {r['tokens']} predictions; "
                  f"inputs {', '.join(r['inputs'])})")
    if args.json == "-":
        print(json.dumps(out, indent=1))
    elif args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
