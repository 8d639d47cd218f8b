"""One onnxsim 0.8.1 prune of a language model, restricted to the given weights (run in onnxsim's own venv).

    /path/to/onnxsim-venv/bin/python scripts/lm/onnxsim_prune.py MODEL.onnx OUT.onnx --method magnitude|wanda|sparsegpt
        (--sparsity 0.5 | --nm 2:4) --keep WEIGHTS.json [--data CALIB.npz] [--batch 16] [--json REPORT.json]

onnxsim's pruning functions have no way to leave a layer out: they prune every MatMul/Gemm with a constant 2-D
weight. So the whole model is passed to onnxsim.apply_magnitude_pruning / apply_wanda_pruning /
apply_sparsegpt_pruning (sparsity=r, or n=2, m=4; per-row sparsity, onnxsim's default, not global_sparsity)
and afterwards every initializer not listed in --keep (the transformer blocks' linear weights) gets its dense
value back: the LM head, the embeddings and everything else stay dense. For magnitude and Wanda this is exactly
"prune only the listed weights" (each layer's mask depends on that layer alone); for SparseGPT too, since each
layer's Hessian comes from the dense model's activations (onnxsim calibrates once, on the unpruned model) and
each layer is solved independently. The report lists which initializers onnxsim changed and which were restored.
Calibration batches: the .npz's arrays (every model input) cut into batches of --batch sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def normalize(pruned, dense, keep: set) -> dict:
    """Put onnxsim's result back into the dense model's form, in place, and say what it changed.

    onnxsim's magnitude pruning (the C++ pass behind apply_magnitude_pruning) writes each pruned weight as a new
    initializer (``_v_913``...), points the node at it and leaves the original initializer unused; Wanda and
    SparseGPT overwrite the original initializer. Either way: a weight listed in ``keep`` takes the pruned values
    under its original name; every other weight onnxsim changed (the LM head) gets its dense values back; the
    initializers no node reads any more are dropped."""
    from onnx import numpy_helper
    renamed = sum(1 for pn, dn in zip(pruned.graph.node, dense.graph.node) if list(pn.input) != list(dn.input))
    dense_inits = {t.name: t for t in dense.graph.initializer}
    inits = {t.name: t for t in pruned.graph.initializer}
    changed, restored, other = set(), set(), []
    if [n.op_type for n in pruned.graph.node] != [n.op_type for n in dense.graph.node]:
        raise SystemExit("onnxsim changed the graph's nodes; not handled")
    for pn, dn in zip(pruned.graph.node, dense.graph.node):
        for j, (b, a) in enumerate(zip(pn.input, dn.input)):
            if a == b:
                continue
            if a in dense_inits and b in inits:
                if a in keep:
                    inits[a].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[b]), a))
                    changed.add(a)
                else:
                    restored.add(a)
                    if a not in inits:
                        pruned.graph.initializer.append(dense_inits[a])
                        inits[a] = pruned.graph.initializer[-1]
                pn.input[j] = a
            else:
                other.append(f"{pn.name}: input {j} {a} -> {b}")
    for t in pruned.graph.initializer:
        if t.name in dense_inits and not np.array_equal(numpy_helper.to_array(t),
                                                        numpy_helper.to_array(dense_inits[t.name])):
            if t.name in keep:
                changed.add(t.name)
            else:
                t.CopyFrom(dense_inits[t.name])
                restored.add(t.name)
    used = {i for n in pruned.graph.node for i in n.input} | {i.name for i in pruned.graph.input}
    dropped = [t.name for t in pruned.graph.initializer if t.name not in used]
    kept = [t for t in pruned.graph.initializer if t.name in used]
    del pruned.graph.initializer[:]
    pruned.graph.initializer.extend(kept)
    return {"changed": sorted(changed), "restored": sorted(restored), "not_changed_of_keep": sorted(keep - changed),
            "nodes_repointed_by_onnxsim": renamed,
            "dropped_unused": dropped, "other_graph_changes": other}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], required=True)
    ap.add_argument("--sparsity", type=float)
    ap.add_argument("--nm")
    ap.add_argument("--keep", required=True, help="JSON list of the initializer names that may be pruned")
    ap.add_argument("--data")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args()
    t_import = time.time()
    import onnx
    import onnxsim
    from onnx import numpy_helper
    t0 = time.time()
    dense = onnx.load(args.model)
    model = onnx.load(args.model)
    kw = {}
    if args.nm:
        n, m = (int(v) for v in args.nm.split(":"))
        kw.update(n=n, m=m)
    else:
        kw["sparsity"] = args.sparsity
    if args.method != "magnitude":
        with np.load(args.data) as z:
            arrays = {k: z[k] for k in z.files}
        names = [i.name for i in model.graph.input]
        count = len(next(iter(arrays.values())))
        kw["calibration_data"] = [{k: arrays[k][s:s + args.batch] for k in names} for s in range(0, count, args.batch)]
    fn = {"magnitude": onnxsim.apply_magnitude_pruning, "wanda": onnxsim.apply_wanda_pruning,
          "sparsegpt": onnxsim.apply_sparsegpt_pruning}[args.method]
    t1 = time.time()
    pruned = fn(model, **kw)
    t2 = time.time()
    keep = set(json.load(open(args.keep)))
    fix = normalize(pruned, dense, keep)
    if args.method == "wanda":   # is onnxsim's Wanda different from |W| alone here? compare the masks
        plain = {k: v for k, v in kw.items() if k != "calibration_data"}
        magnitude = onnxsim.apply_magnitude_pruning(onnx.load(args.model), **plain)
        normalize(magnitude, dense, keep)
        mag = {t.name: numpy_helper.to_array(t) == 0 for t in magnitude.graph.initializer if t.name in keep}
        wan = {t.name: numpy_helper.to_array(t) == 0 for t in pruned.graph.initializer if t.name in keep}
        same_as_magnitude = sorted(n for n in keep if n in mag and n in wan and np.array_equal(mag[n], wan[n]))
    else:
        same_as_magnitude = None
    same_graph = ([(n.op_type, list(n.input), list(n.output)) for n in pruned.graph.node]
                  == [(n.op_type, list(n.input), list(n.output)) for n in dense.graph.node])
    onnx.save(pruned, args.out)
    report = {"function": f"onnxsim.{fn.__name__}", "kwargs": {k: v for k, v in kw.items() if k != "calibration_data"},
              "calibration": (f"{len(kw['calibration_data'])} batches of {args.batch} sequences from "
                              f"{os.path.basename(args.data)}"
                              if "calibration_data" in kw else None),
              "onnxsim": onnxsim.__version__ if hasattr(onnxsim, "__version__") else None,
              **fix, "same_graph_after_normalizing": same_graph, "same_mask_as_magnitude": same_as_magnitude,
              "seconds": {"import": round(t0 - t_import, 2), "prune_call": round(t2 - t1, 2),
                          "total": round(time.time() - t_import, 2)}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("function", "kwargs", "seconds")}))


if __name__ == "__main__":
    main()
