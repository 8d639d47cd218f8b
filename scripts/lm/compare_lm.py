"""Prune the study's language models with onnxsim 0.8.1 and onnxprune; held-out perplexity, time, memory.

    .venv/bin/python scripts/lm/compare_lm.py [--out out/lm] [--models gpt2,llama] [--exporters legacy,dynamo,optimum]
        [--rows onnxsim-magnitude,...,onnxprune-defaults,... (ROWS)]
        [--targets 0.5,0.6,0.7,2:4] [--timeout 3600] [--redo] [--report-only]
    ONNXSIM_PYTHON=/path/to/onnxsim-venv/bin/python must name onnxsim 0.8.1's interpreter (or --onnxsim-python).

Reads --out/MANIFEST.json and the exports of scripts/lm/export_lm.py. For every export and target:
- onnxsim rows: scripts/lm/onnxsim_prune.py in onnxsim's venv (apply_magnitude_pruning, apply_wanda_pruning,
  apply_sparsegpt_pruning; sparsity=r or n=2, m=4; Wanda and SparseGPT calibrated on the same calibration
  windows in batches of 16), the LM head and every other non-block initializer restored to dense afterwards.
- sparsegpt-masks-refit: onnxsim SparseGPT's masks (the zeros of its output) on the dense weights, updated by
  onnxprune's chained least-squares refit instead of SparseGPT's own update (scripts/lm/refit_masks.py).
- onnxprune-defaults: the command line with DEFAULT options, ``onnxprune prune MODEL OUT --data CALIB --sparsity r``
  (or ``--pattern 2:4``) ``--exclude <LM head node> --json R``, one run per target: what a user gets.
- the other onnxprune rows: one scripts/lm/onnxprune_sweep.py process per configuration (onnxprune.Pruner(...).fit
  once, .prune(r) per ratio; the statistics do not depend on the ratio; 2:4 is a fit of its own), every option
  spelled out (ONNXPRUNE_FLAGS): the paper's ECP (global, no weight update), --scope layer, --scope layer --refit
  (exact statistics with automatic probes: random probes per token), then the refit with the statistics the
  defaults choose between (positions with 4 and 1 probes, the error at each layer's own output), and magnitude
  with the refit. When the defaults' 50% run pruned none of the blocks' linear layers, the sweeps are recorded as
  not run, with its reasons. The LM head is named by ``--exclude`` when ``onnxprune inspect`` lists it as prunable.
Every prune is a subprocess: wall time from this script's clock, peak RSS from GNU time's %M (/usr/bin/time).
Held-out perplexity: lmcommon.onnx_perplexity on data/heldout.npz (256 x 128).
Block sparsity is counted on the written model (zeros in the blocks' linear weights / their size).

Results go to --results (default docs/results/language-models.json, one row per run, kept between runs:
rows already there are skipped unless --redo) and the Markdown beside it is regenerated from that JSON.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pathlib
import platform
import re
import signal
import subprocess
import sys
import threading
import time

import lmcommon as L
import numpy as np
import onnx
from onnx import numpy_helper

ROWS = ["onnxsim-magnitude", "onnxsim-wanda", "onnxsim-sparsegpt", "sparsegpt-masks-refit", "onnxprune-defaults",
        "onnxprune-ecp", "onnxprune-ecp-layer", "onnxprune-ecp-layer-refit", "onnxprune-positions-p4",
        "onnxprune-positions-p1", "onnxprune-layer-error", "onnxprune-magnitude-refit"]
# every option spelled out, so that a row means the same whatever onnxprune's defaults for the model are
PAPER = ["--conv-statistics", "exact", "--error-at", "output"]
ONNXPRUNE_FLAGS = {"onnxprune-ecp": ["--scope", "global", "--no-refit", *PAPER],
                   "onnxprune-ecp-layer": ["--scope", "layer", "--no-refit", *PAPER],
                   "onnxprune-ecp-layer-refit": ["--scope", "layer", "--refit", *PAPER],
                   "onnxprune-positions-p4": ["--scope", "layer", "--refit", "--conv-statistics", "positions", "--probes",
                                              "4", "--error-at", "output"],
                   "onnxprune-positions-p1": ["--scope", "layer", "--refit", "--conv-statistics", "positions", "--probes",
                                              "1", "--error-at", "output"],
                   "onnxprune-layer-error": ["--scope", "layer", "--refit", "--error-at", "layer"],
                   "onnxprune-magnitude-refit": ["--method", "magnitude", "--scope", "layer", "--refit"]}
RESULTS = L.REPO / "docs" / "results" / "language-models.json"
TIME = "/usr/bin/time"   # GNU time (Debian package "time")


def run_measured(cmd: list[str], timeout: float, log: pathlib.Path, env=None) -> dict:
    """Run cmd under /usr/bin/time; wall seconds, peak RSS (MB, GNU time's %M), exit code, the last error line.

    GNU time, not this process's os.wait4: a child forked from this process (which holds onnxruntime sessions and
    the held-out logits, hundreds of MB) keeps the parent's resident size as its maximum across the exec, so
    ru_maxrss would report this process's size for any small command; time's own child is forked from time."""
    t0 = time.time()
    timing = log.with_suffix(".time")
    with open(log, "w") as f:
        proc = subprocess.Popen([TIME, "-o", str(timing), "-f", "%M %e", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        timer = threading.Timer(timeout, kill)
        timer.start()
        proc.wait()
        timer.cancel()
    text = log.read_text(errors="replace").strip().splitlines()
    errors = [line for line in text if line.startswith("Error:")]
    measured = timing.read_text().strip().splitlines()[-1].split() if timing.exists() else []
    peak = round(int(measured[0]) / 1024, 1) if len(measured) == 2 else None
    return {"exit": proc.returncode, "timed_out": timed_out.is_set(), "seconds": round(time.time() - t0, 1),
            "peak_rss_mb": peak,
            "message": (errors[-1] if errors else (text[-1] if text else ""))[:400]}


def block_stats(dense: onnx.ModelProto, pruned_path: pathlib.Path, vocab: int) -> dict:
    """Sparsity of the block linear weights in the written model (matched by node name), whether the LM head and
    the embeddings are unchanged, and every bias shift of a block linear relative to the dense bias."""
    pruned = onnx.load(str(pruned_path))
    dl = {r["node"]: r for r in L.linear_layers(dense, vocab)}
    pl = {r["node"]: r for r in L.linear_layers(pruned, vocab)}
    di = {t.name: t for t in dense.graph.initializer}
    pi = {t.name: t for t in pruned.graph.initializer}

    def arr(inits, name):
        return numpy_helper.to_array(inits[name]) if name in inits else None
    zeros = size = 0
    per_layer = {}
    head_same = True
    for node, r in dl.items():
        p = pl.get(node)
        if p is None:
            per_layer[node] = {"missing": True}
            continue
        w = arr(pi, p["weight"])
        if r["head"]:
            head_same = head_same and bool(np.array_equal(w, arr(di, r["weight"])))
            continue
        z = int((w == 0).sum())
        zeros += z
        size += w.size
        row = {"sparsity": z / w.size}
        if r["bias"] is not None and p["bias"] is not None:
            b0, b1 = arr(di, r["bias"]), arr(pi, p["bias"])
            row["max_abs_bias_shift"] = float(np.abs(b1 - b0).max())
            row["max_abs_dense_bias"] = float(np.abs(b0).max())
        elif p["bias"] is not None:
            row["max_abs_bias_shift"] = float(np.abs(arr(pi, p["bias"])).max())
            row["bias_inserted"] = True
        per_layer[node] = row
    gathers = [n.input[0] for n in dense.graph.node if n.op_type == "Gather" and n.input[0] in di
               and len(di[n.input[0]].dims) == 2]
    emb_same = all(np.array_equal(arr(di, g), arr(pi, g)) for g in gathers if g in pi)
    shifts = [(v.get("max_abs_bias_shift", 0.0), v.get("max_abs_dense_bias"), k) for k, v in per_layer.items()
              if "max_abs_bias_shift" in v]
    rel = [s / d for s, d, _ in shifts if d]
    return {"block_sparsity": zeros / size if size else None, "block_weights": size, "head_unchanged": head_same,
            "embeddings_unchanged": emb_same,
            "max_abs_bias_shift": max((s for s, _, _ in shifts), default=0.0),
            "max_rel_bias_shift": max(rel, default=None),
            "layers_with_zeros": sum(1 for v in per_layer.values() if v.get("sparsity", 0) > 0),
            "per_layer": per_layer}


def onnxprune_details(rep: dict, dense, vocab: int) -> dict:
    """What onnxprune's JSON report says (the mode's section holds the totals and the layers)."""
    dl = {r["node"]: r for r in L.linear_layers(dense, vocab)}
    di = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    section = rep.get(rep.get("mode", "weights"), {})
    layers = []
    for row in section.get("layers", []):
        r = dl.get(row["layer"])
        dense_bias = float(np.abs(di[r["bias"]]).max()) if r and r["bias"] in di else None
        layers.append({"layer": row["layer"], "weights": row["weights"], "pruned": row["pruned"], "sparsity": row["sparsity"],
                       "max_bias_shift": row.get("max_bias_shift"), "bias_inserted": row.get("bias_inserted"),
                       "max_abs_dense_bias": dense_bias,
                       "rel_bias_shift": (row["max_bias_shift"] / dense_bias) if dense_bias and row.get("max_bias_shift")
                       is not None else None})
    return {"weights": section.get("weights"), "pruned": section.get("pruned"), "sparsity": section.get("sparsity"),
            "pattern": section.get("pattern"), "scope": rep.get("scope"), "repair": rep.get("repair"),
            "defaults": rep.get("defaults"),
            "engine": rep.get("engine", {}).get("name"), "derivatives": rep.get("derivatives"), "seconds": rep.get("seconds"),
            "refit": rep.get("refit"), "fell_back": rep.get("fell_back"), "heldout_error": rep.get("heldout_error"),
            "layers": layers, "excluded": rep.get("excluded"), "skipped": rep.get("skipped")}


def inspect_prunable(model_path: pathlib.Path, work: pathlib.Path, onnxprune: str) -> dict:
    out = work / (model_path.stem + ".inspect.json")
    if not out.exists():
        subprocess.run([onnxprune, "inspect", str(model_path), "--json", str(out), "-q"], check=False)
    return json.loads(out.read_text()) if out.exists() else {}


def head_patterns(model_path, dense, vocab, work, onnxprune) -> list[str]:
    """--exclude patterns for the LM head: its node name when inspect lists a prunable layer by that name."""
    heads = [r for r in L.linear_layers(dense, vocab) if r["head"]]
    ins = inspect_prunable(model_path, work, onnxprune)
    names = json.dumps(ins.get("layers", ins))
    pats = [r["node"] for r in heads if r["node"] and f'"{r["node"]}"' in names]
    return [p.replace("[", "[[]") for p in pats]


def order(r):
    """Rows sorted by model, exporter, method and target, whatever order they were measured in."""
    names = ["dense", *ROWS]
    return (["gpt2", "llama"].index(r["model"]) if r["model"] in ("gpt2", "llama") else 9,
            ["legacy", "dynamo", "optimum"].index(r["exporter"]) if r["exporter"] in ("legacy", "dynamo", "optimum") else 9,
            names.index(r["row"]) if r["row"] in names else 99, ["-", "50%", "60%", "70%", "2:4"].index(r["target"])
            if r["target"] in ("-", "50%", "60%", "70%", "2:4") else 9)


def target_label(t) -> str:
    return t if isinstance(t, str) else f"{round(t * 100)}%"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=L.DEFAULT_OUT)
    ap.add_argument("--work", type=pathlib.Path, default=None, help="pruned models and logs (default OUT/compare)")
    ap.add_argument("--results", type=pathlib.Path, default=RESULTS)
    ap.add_argument("--models", default="gpt2,llama")
    ap.add_argument("--exporters", default="legacy,dynamo,optimum")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--targets", default="0.5,0.6,0.7,2:4")
    ap.add_argument("--calib-n", type=int, default=64, help="calibration sequences used by every tool (the first N)")
    ap.add_argument("--timeout", type=float, default=5400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnxsim-python", default=os.environ.get("ONNXSIM_PYTHON"))
    ap.add_argument("--onnxprune", default=str(pathlib.Path(sys.executable).parent / "onnxprune"))
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--keep-models", action="store_true", help="keep the pruned models (default: deleted after scoring)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    work = args.work or args.out / "compare"
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.results.read_text()) if args.results.exists() else {"rows": []}
    manifest = L.load_json(args.out / "MANIFEST.json")
    heldout = np.load(args.out / "data" / "heldout.npz")["input_ids"]
    vocab = manifest["data"]["vocab"]
    results["setup"] = setup_text(args, manifest)
    if args.report_only:
        write_report(args.results, results)
        return
    targets = [t if ":" in t else float(t) for t in args.targets.split(",")]
    rows_wanted = args.rows.split(",")

    def key(r):
        return (r["model"], r["exporter"], r["row"], r["target"])
    done = {key(r): i for i, r in enumerate(results["rows"])}

    def record(row):
        """Re-read the results under a lock and put the row in (several runs may share one results file)."""
        with open(args.results.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if args.results.exists():
                results["rows"] = json.loads(args.results.read_text())["rows"]
            done.clear()
            done.update({key(r): i for i, r in enumerate(results["rows"])})
            k = key(row)
            if k in done:
                results["rows"][done[k]] = row
            else:
                done[k] = len(results["rows"])
                results["rows"].append(row)
            results["rows"].sort(key=order)
            done.clear()
            done.update({key(r): i for i, r in enumerate(results["rows"])})
            write_report(args.results, results)

    def todo(base, rowname, tl):
        return args.redo or (base["model"], base["exporter"], rowname, tl) not in done

    def score(row, dense, out_model, rep_dict, keep=False):
        row["status"] = "ok"
        ppl = L.onnx_perplexity(out_model, heldout, threads=args.threads)
        row["perplexity"] = ppl["perplexity"]
        row["finite"] = ppl["finite"]
        row.update(block_stats(dense, out_model, vocab))
        if rep_dict is not None:
            row["report"] = rep_dict
        if not args.keep_models and not keep:
            out_model.unlink()

    def log(tag, row):
        print(f"    {tag}: {row['status']} ppl={fmt(row.get('perplexity'), '.3f')} {row.get('seconds')} s "
              f"{row.get('peak_rss_mb')} MB block sparsity={fmt(row.get('block_sparsity'), '.3f')} "
              f"{row.get('message', '')[:160] if row['status'] != 'ok' else ''}", flush=True)

    for kind in args.models.split(","):
        for exporter in args.exporters.split(","):
            name = f"{kind}_{exporter}.onnx"
            info = manifest["models"].get(name)
            if info is None or "error" in info:
                continue
            model_path = args.out / kind / name
            dense = onnx.load(str(model_path))
            lin = L.linear_layers(dense, vocab)
            blocks = {r["node"] for r in lin if not r["head"]}
            base = {"model": kind, "exporter": exporter}
            with np.load(args.out / "data" / info["calibration_file"]) as z:
                calib_arrays = {k: z[k][:args.calib_n] for k in z.files}
            calib = work / f"calib{args.calib_n}_{kind}_{exporter}.npz"
            np.savez(calib, **calib_arrays)
            if todo(base, "dense", "-"):
                ppl = L.onnx_perplexity(model_path, heldout, threads=args.threads)
                record({**base, "row": "dense", "target": "-", "status": "ok", "perplexity": ppl["perplexity"],
                        "block_linears": len(blocks),
                        "block_weights": int(sum(np.prod(r["shape"]) for r in lin if not r["head"])),
                        "head": [r["node"] for r in lin if r["head"]], "linear_layers": lin,
                        "calibration": f"first {args.calib_n} sequences of {info['calibration_file']}"})
            keep_path = work / f"{kind}_{exporter}.keep.json"
            keep_path.write_text(json.dumps(sorted({r["weight"] for r in lin if not r["head"]})))
            # ---- onnxsim
            for rowname in [r for r in rows_wanted if r.startswith("onnxsim")]:
                for t in targets:
                    tl = target_label(t)
                    if not todo(base, rowname, tl):
                        continue
                    if not args.onnxsim_python:
                        raise SystemExit("set ONNXSIM_PYTHON or --onnxsim-python")
                    row = {**base, "row": rowname, "target": tl}
                    tag = f"{kind}_{exporter}_{rowname}_{tl.replace(':', 'of').replace('%', '')}"
                    out_model, rep = work / f"{tag}.onnx", work / f"{tag}.json"
                    cmd = [args.onnxsim_python, str(L.HERE / "onnxsim_prune.py"), str(model_path), str(out_model),
                           "--method", rowname.split("-", 1)[1], "--keep", str(keep_path), "--data", str(calib),
                           "--json", str(rep)] + (["--nm", t] if isinstance(t, str) else ["--sparsity", str(t)])
                    row["command"] = " ".join(L.rel(pathlib.Path(c)) if "/" in c else c for c in cmd[1:])
                    print(f"[{time.strftime('%H:%M:%S')}] {tag}", flush=True)
                    res = run_measured(cmd, args.timeout, work / f"{tag}.log",
                                       env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
                    row.update(res)
                    masks_refit = rowname == "onnxsim-sparsegpt" and "sparsegpt-masks-refit" in rows_wanted and todo(
                        base, "sparsegpt-masks-refit", tl)
                    if res["exit"] == 0 and out_model.exists():
                        score(row, dense, out_model, json.loads(rep.read_text()) if rep.exists() else None,
                              keep=masks_refit)
                    else:
                        row["status"] = "timeout" if res["timed_out"] else f"exit {res['exit']}"
                    log(tag, row)
                    record(row)
                    if masks_refit and row["status"] == "ok":  # SparseGPT's masks, onnxprune's refit as the update
                        refit_row = {**base, "row": "sparsegpt-masks-refit", "target": tl}
                        refit_out, refit_rep = work / f"{tag}_refit.onnx", work / f"{tag}_refit.json"
                        cmd = [sys.executable, str(L.HERE / "refit_masks.py"), str(model_path), str(out_model), str(calib),
                               str(refit_out), "--keep", str(keep_path), "--threads", str(args.threads), "--json",
                               str(refit_rep)]
                        refit_row["command"] = " ".join(L.rel(pathlib.Path(c)) if "/" in c else c for c in cmd[1:])
                        res = run_measured(cmd, args.timeout, work / f"{tag}_refit.log")
                        refit_row.update(res)
                        if res["exit"] == 0 and refit_out.exists():
                            score(refit_row, dense, refit_out, json.loads(refit_rep.read_text()) if refit_rep.exists()
                                  else None)
                        else:
                            refit_row["status"] = "timeout" if res["timed_out"] else f"exit {res['exit']}"
                        log(f"{tag}_refit", refit_row)
                        record(refit_row)
                        if not args.keep_models:
                            out_model.unlink()
            # ---- onnxprune: the CLI at 50% (defaults), then one scoring per configuration for every ratio
            pr_rows = [r for r in rows_wanted if r.startswith("onnxprune")]
            if not pr_rows:
                continue
            pats = head_patterns(model_path, dense, vocab, work, args.onnxprune)
            excl = ["--exclude", *pats] if pats else []
            cli = next((results["rows"][done[k]] for k in [(kind, exporter, "onnxprune-defaults", "50%")] if k in done), None)
            for t in targets if "onnxprune-defaults" in pr_rows else []:  # the command line, only the target given
                tl = target_label(t)
                if not todo(base, "onnxprune-defaults", tl):
                    continue
                tag = f"{kind}_{exporter}_onnxprune-defaults_{tl.replace(':', 'of').replace('%', '')}"
                out_model, rep = work / f"{tag}.onnx", work / f"{tag}.json"
                cmd = [args.onnxprune, "prune", str(model_path), str(out_model), "--data", str(calib),
                       *(["--pattern", t] if isinstance(t, str) else ["--sparsity", str(t)]),
                       "--json", str(rep), "--force", "--threads", str(args.threads), "-v"] + excl
                row = {**base, "row": "onnxprune-defaults", "target": tl,
                       "command": "onnxprune " + " ".join(L.rel(pathlib.Path(c)) if "/" in c else c for c in cmd[1:])}
                print(f"[{time.strftime('%H:%M:%S')}] {tag}", flush=True)
                res = run_measured(cmd, args.timeout, work / f"{tag}.log")
                row.update(res)
                rep_dict = onnxprune_details(json.loads(rep.read_text()), dense, vocab) if rep.exists() else None
                if res["exit"] == 0 and out_model.exists():
                    score(row, dense, out_model, rep_dict)
                else:
                    row["status"] = "timeout" if res["timed_out"] else f"exit {res['exit']}"
                    row["report"] = rep_dict
                log(tag, row)
                record(row)
                if tl == "50%":
                    cli = row
            no_blocks = None
            if cli and cli.get("report"):
                if not any(x["pruned"] for x in cli["report"]["layers"] if x["layer"] in blocks):
                    reasons = sorted({x["reason"].split("(")[0].strip() for x in cli["report"]["skipped"] or []
                                      if x.get("node") in blocks})
                    no_blocks = ("the 50% CLI run pruned none of the blocks' linear layers (skipped: "
                                 + "; ".join(reasons) + ")")
            for rowname in [r for r in pr_rows if r in ONNXPRUNE_FLAGS]:
                ratios = [t for t in targets if todo(base, rowname, target_label(t))]
                if not ratios:
                    continue
                if no_blocks:
                    for t in ratios:
                        record({**base, "row": rowname, "target": target_label(t), "status": "not run", "message": no_blocks})
                    continue
                tag = f"{kind}_{exporter}_{rowname}"
                rep = work / f"{tag}.json"
                flags = ONNXPRUNE_FLAGS[rowname]
                cmd = [sys.executable, str(L.HERE / "onnxprune_sweep.py"), str(model_path), str(calib),
                       "--ratios", ",".join(str(t) for t in ratios), "--prefix", str(work / tag), "--json", str(rep),
                       "--threads", str(args.threads)] + flags + excl
                print(f"[{time.strftime('%H:%M:%S')}] {tag} (ratios {ratios})", flush=True)
                res = run_measured(cmd, args.timeout * len(ratios), work / f"{tag}.log")
                sweep = json.loads(rep.read_text()) if rep.exists() and res["exit"] == 0 else None
                for t in ratios:
                    row = {**base, "row": rowname, "target": target_label(t),
                           "command": "scripts/lm/onnxprune_sweep.py " + " ".join(
                               L.rel(pathlib.Path(c)) if "/" in c else c for c in cmd[2:]),
                           "equivalent_cli": "onnxprune prune MODEL OUT --data CALIB "
                                             + (f"--pattern {t} " if isinstance(t, str) else f"--sparsity {t} ")
                                             + " ".join(flags + excl), "sweep": {**res}}
                    if sweep is None:
                        row.update(status="timeout" if res["timed_out"] else f"exit {res['exit']}", message=res["message"],
                                   seconds=res["seconds"], peak_rss_mb=res["peak_rss_mb"])
                    else:
                        part = sweep["ratios"][str(t)]
                        fit = sweep["seconds"][part["fit"]]
                        row["seconds"] = round(sweep["seconds"]["import"] + fit + part["prune_seconds"]
                                               + part["save_seconds"], 1)
                        row["seconds_detail"] = {"import": sweep["seconds"]["import"],
                                                 "fit (shared by the ratios)" if part["fit"] == "fit" else "fit": fit,
                                                 "prune": part["prune_seconds"], "save": part["save_seconds"]}
                        row["peak_rss_mb"] = res["peak_rss_mb"]
                        score(row, dense, pathlib.Path(part["file"]), onnxprune_details(part["report"], dense, vocab))
                    log(f"{tag} {target_label(t)}", row)
                    record(row)
    with open(args.results.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if args.results.exists():
            results["rows"] = json.loads(args.results.read_text())["rows"]
        write_report(args.results, results)


def setup_text(args, manifest) -> dict:
    from importlib.metadata import version

    import onnxruntime
    return {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "onnxprune": version("onnxprune"), "onnxsim": "0.8.1 (its own venv)", "threads": args.threads,
            "timeout_s": args.timeout, "machine": f"{os.cpu_count()} CPUs, shared with other jobs",
            "data": manifest["data"], "models": {k: {x: v.get(x) for x in ("architecture", "exporter", "versions", "inputs",
                                                                            "nodes", "dense_perplexity", "torch_perplexity",
                                                                            "max_abs_logit_diff_vs_torch", "how", "error",
                                                                            "training")}
                                                 for k, v in manifest["models"].items()}}


# ------------------------------------------------------------------------------------------------ report
def fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def write_report(path: pathlib.Path, results: dict) -> None:
    """The JSON and its Markdown; paths inside the repository are written relative to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    strip = str(L.REPO) + "/"
    path.write_text(json.dumps(results, indent=1).replace(strip, "") + "\n")
    path.with_suffix(".md").write_text(render(results).replace(strip, ""))


def skipped_summary(skipped) -> str:
    """Skipped nodes grouped by reason, names in the reason replaced by '…' (as docs/results/corpus.md does)."""
    groups: dict = {}
    for x in skipped or []:
        reason = re.sub(r"'[^']*'", "'…'", x.get("reason", ""))
        groups[(x.get("op"), reason)] = groups.get((x.get("op"), reason), 0) + 1
    return "; ".join(f"{n} x {op}: {reason}" for (op, reason), n in groups.items()) or "none"


STATISTICS_ROWS = {"onnxprune-ecp-layer-refit": "random probes per token (exact cross-position sums, automatic probes)",
                   "onnxprune-positions-p4": "positions (every token a sample), 4 probes",
                   "onnxprune-positions-p1": "positions, 1 probe",
                   "onnxprune-layer-error": "each layer's own output error (G = 1, no derivatives)",
                   "onnxprune-magnitude-refit": "magnitude (no statistics), for reference"}


def summary(groups: dict) -> list[str]:
    """The answers, computed from the rows: onnxprune's defaults against onnxsim SparseGPT (perplexity and wall
    time at each target), the statistics ranked by perplexity and time (all with --scope layer --refit), and
    SparseGPT's masks with either weight update."""
    lines = ["## onnxprune with default options against onnxsim SparseGPT", "",
             "| model / export | target | defaults ppl | SparseGPT ppl | ppl <= SparseGPT's | defaults s | SparseGPT s | "
             "time / SparseGPT's | defaults MB | SparseGPT MB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (kind, exporter), rs in groups.items():
        by = {(r["row"], r["target"]): r for r in rs if r["status"] == "ok"}
        for target in ("50%", "60%", "70%", "2:4"):
            ours, theirs = by.get(("onnxprune-defaults", target)), by.get(("onnxsim-sparsegpt", target))
            if not ours or not theirs:
                continue
            lines.append(f"| {kind} / {exporter} | {target} | {ours['perplexity']:.3f} | {theirs['perplexity']:.3f} | "
                         f"{'yes' if ours['perplexity'] <= theirs['perplexity'] else 'no'} | {fmt(ours.get('seconds'), '.0f')} | "
                         f"{fmt(theirs.get('seconds'), '.0f')} | {fmt(ours['seconds'] / theirs['seconds'], '.2f')}x | "
                         f"{fmt(ours.get('peak_rss_mb'), '.0f')} | {fmt(theirs.get('peak_rss_mb'), '.0f')} |")
    lines += ["", "## Which statistics rank best per unit of time", "",
              "All with one fraction per layer and the chained least-squares refit; seconds of the whole sweep process "
              "at that target (import, fit, prune, save).", "",
              "| model / export | statistics | " + " | ".join(f"ppl {t} | s {t}" for t in ("50%", "70%", "2:4")) + " |",
              "| --- | --- | " + " | ".join("--- | ---" for _ in range(3)) + " |"]
    for (kind, exporter), rs in groups.items():
        by = {(r["row"], r["target"]): r for r in rs if r["status"] == "ok"}
        for row, label in STATISTICS_ROWS.items():
            cells = [by.get((row, t)) for t in ("50%", "70%", "2:4")]
            if not any(cells):
                continue
            lines.append(f"| {kind} / {exporter} | {label} | " + " | ".join(
                f"{fmt(c and c['perplexity'], '.3f')} | {fmt(c and c.get('seconds'), '.0f')}" for c in cells) + " |")
        for t in ("50%", "70%", "2:4"):
            ranked = sorted((by[(row, t)]["perplexity"], by[(row, t)]["seconds"], label)
                            for row, label in STATISTICS_ROWS.items() if (row, t) in by)
            if ranked:
                lines.append(f"| {kind} / {exporter} | lowest perplexity at {t}: {ranked[0][2]} ({ranked[0][0]:.3f}, "
                             f"{ranked[0][1]:.0f} s); fastest: {min(ranked, key=lambda x: x[1])[2]} | | | | | | |")
    lines += ["", "## SparseGPT's masks with either weight update", "",
              "| model / export | target | SparseGPT (its masks, its update) | its masks, onnxprune's refit | refit s | "
              "onnxprune defaults (its own masks and refit) |", "| --- | --- | --- | --- | --- | --- |"]
    for (kind, exporter), rs in groups.items():
        by = {(r["row"], r["target"]): r for r in rs if r["status"] == "ok"}
        for target in ("50%", "60%", "70%", "2:4"):
            sgpt, refit = by.get(("onnxsim-sparsegpt", target)), by.get(("sparsegpt-masks-refit", target))
            if not sgpt or not refit:
                continue
            ours = by.get(("onnxprune-defaults", target))
            lines.append(f"| {kind} / {exporter} | {target} | {sgpt['perplexity']:.3f} | {refit['perplexity']:.3f} | "
                         f"{fmt(refit.get('seconds'), '.0f')} | {fmt(ours and ours['perplexity'], '.3f')} |")
    return lines + [""]


def kept(result: dict, what: str) -> str:
    before, after = result.get(f"{what}_before"), result.get(f"{what}_after")
    return f"{after:,} of {before:,}" if before else "-"


def speed(timing: list[dict] | None) -> str:
    """One thread, batch 1 and the larger batch: the median ratio (noisy where the quartiles lie far apart)."""
    one = [t for t in timing or [] if t["threads"] == 1]
    return ", ".join(f"b{t['batch']} {t['ratio_median']:.2f}x{' noisy' if t['noisy'] else ''}" for t in one) or "-"


def structured_section(rows: list[dict]) -> list[str]:
    """scripts/lm/structured_lm.py's rows: the unit groups inspect finds, and the --structured prune's outcome."""
    if not rows:
        return []
    lines = ["## Structured: `onnxprune inspect` and `onnxprune prune --structured` (scripts/lm/structured_lm.py)", "",
             "Default options, only `--structured --sparsity S` (and the options the sparsity column names); the study's "
             "exports on the same calibration windows as the rows above (held-out perplexity on data/heldout.npz); the "
             "`fixture` rows are the committed tiny byte-level models of tests/fixtures/lm with their own 16 x 32 "
             "calibration and held-out windows. *Heads kept*: attention heads over every block. *Time pruned/dense*: "
             "the prune's own paired timer on the calibration windows (per sequence, median; one thread, at batch 1 "
             "and at its larger batch), below 1 is faster.", "",
             "| model / export | unit groups (units each) | layers whose units cannot go (count x reason) | sparsity | "
             "status | perplexity | dense ppl | units kept | heads kept | parameters kept | MACs kept | "
             "time pruned/dense | seconds | peak RSS MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ins = r["inspect"]
        found = (f"{len(ins['groups'])}: " + ", ".join(f"{g['group']} ({g['units']})" for g in ins["groups"])
                 if ins["groups"] else "none")
        why = "; ".join(f"{n} x {reason}" for reason, n in ins["not_removable"].items()) or "-"
        res = r.get("result") or {}
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('message', '')[:240]}"
        heads = [g for name, g in (res.get("groups") or {}).items() if name.startswith("heads:")]
        head_text = (f"{sum(g['units_after'] for g in heads)} of {sum(g['units_before'] for g in heads)}" if heads
                     else "-")
        asked = f"{r['sparsity']:.0%}" + (f" `{r['options']}`" if r.get("options") else "")
        lines.append(f"| {r['model']} / {r['exporter']} | {found} | {why} | {asked} | {status} | "
                     f"{fmt(r.get('perplexity'), '.3f')} | {fmt(r.get('dense_perplexity'), '.3f')} | "
                     f"{kept(res, 'units')} | {head_text} | {kept(res, 'params')} | "
                     f"{kept(res, 'macs')} | {speed(res.get('timing'))} | {fmt(r.get('seconds'), '.0f')} | "
                     f"{fmt(r.get('peak_rss_mb'), '.0f')} |")
    return lines + ["", "Parameters and MACs as onnxprune's report gives them (its prunable layers; MACs per sample, a sequence "
                    "of the calibration length, every token counted, a Gemm on folded tokens included).", ""]


def memory_section(rows: list[dict]) -> list[str]:
    """scripts/lm/memory_lm.py's rows: peak resident size per phase of one default prune."""
    if not rows:
        return []
    lines = ["## Where onnxprune's memory goes (scripts/lm/memory_lm.py)", "",
             "One default prune through the API in one process, its resident size sampled every few milliseconds and "
             "charged to the phase running then (`fit: <stage>` where the pipeline reports its progress).", ""]
    for r in rows:
        lines += [f"- {r['model']} at {r['target']}, calibration {json.dumps(r['calibration_shape'])}, "
                  f"{r['seconds']:.0f} s; peak in phase `{r['peak_phase']}`: "
                  + ", ".join(f"{p} {mb:.0f} MB" for p, mb in r["peak_rss_mb"].items()) + "."]
    return lines + [""]


def render(results: dict) -> str:
    rows = results["rows"]
    s = results.get("setup", {})
    lines = ["# Language models: onnxsim 0.8.1 and onnxprune at 50-70% and 2:4", "",
             "Generated by `python scripts/lm/compare_lm.py` from language-models.json (every number below is from that "
             "file).", ""]
    if s:
        d = s["data"]
        c = d["corpus"]
        lines += [f"Setup: Python {s['python']}, onnxruntime {s['onnxruntime']}, onnx {s['onnx']}, onnxprune {s['onnxprune']}, "
                  f"onnxsim {s['onnxsim']}; {s['machine']}; {s['threads']} threads per prune; timeout {s['timeout_s']:.0f} s.",
                  "",
                  f"Data: {c['source']}, Python {c['python']}, {c['files']['train']} training / {c['files']['heldout']} held-out "
                  f"files ({c['split']}); byte-level BPE vocabulary {d['vocab']}. Calibration: {d['calib.npz']['recipe']}. "
                  f"Held-out: {d['heldout.npz']['recipe']}. Perplexity: exp(mean next-token cross-entropy) over the held-out "
                  "windows' 256 x 127 predictions, onnxruntime CPU.", "",
                  "Pruned: the transformer blocks' linear weights (MatMul/Gemm with a constant 2-D weight, LM head "
                  "excluded; embeddings are Gathers and stay dense). onnxsim's functions prune every such layer, the LM "
                  "head included; the head's and every other non-block initializer's dense values are written back after "
                  "(scripts/lm/onnxsim_prune.py). onnxprune: `--exclude` names the LM head node. Time: wall seconds of the "
                  "prune subprocess (start-up and writing included); memory: its peak RSS (GNU time's %M). "
                  "`onnxprune-defaults` is the command line itself with only `--sparsity` or `--pattern` (and `--exclude` "
                  "for the head), one run per target. The other `onnxprune-*` rows come from one "
                  "scripts/lm/onnxprune_sweep.py process per configuration (`onnxprune.Pruner(...).fit` once, then "
                  "`.prune(r)` per ratio; 2:4 fits on its own): their seconds are import + fit + that ratio's prune and "
                  "save, their memory the sweep's peak. `sparsegpt-masks-refit` is onnxsim SparseGPT's masks with "
                  "onnxprune's refit as the weight update (its seconds: the refit's process alone, SparseGPT's not "
                  "included).", "", "## Models", "",
                  "| export | architecture | training | exporter | inputs | nodes | dense ppl (onnxruntime) | ppl (torch) "
                  "| max abs logit diff vs torch |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, m in s["models"].items():
            if m.get("error"):
                lines.append(f"| {name} | {m['architecture']} | - | {m['exporter']} | - | - | failed: {m['error']} | | |")
                continue
            ins = ", ".join(i["name"] for i in m["inputs"])
            ver = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
            t = m.get("training")
            train = (f"{t['parameters']:,} parameters; {t['steps']} steps x {t['batch']} x {t['context']} tokens "
                     f"({t['tokens_seen']:,} tokens), {t['seconds']:.0f} s, seed {t['seed']}" if t else "-")
            lines.append(f"| {name} | {m['architecture']} | {train} | {m['exporter']} ({ver}) | {ins} | {m['nodes']} | "
                         f"{fmt(m['dense_perplexity'], '.3f')} | {fmt(m['torch_perplexity'], '.3f')} | "
                         f"{fmt(m['max_abs_logit_diff_vs_torch'], '.2e')} |")
        lines.append("")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["exporter"]), []).append(r)
    lines += summary(groups)
    lines += structured_section(results.get("structured", []))
    lines += memory_section(results.get("memory", []))
    lines += ["## Held-out perplexity, time, memory", ""]
    for (kind, exporter), rs in groups.items():
        dense = next((r for r in rs if r["row"] == "dense"), None)
        lines += [f"### {kind} / {exporter}", ""]
        if dense:
            lines += [f"Dense perplexity {dense['perplexity']:.3f}; {dense['block_linears']} block linear layers, "
                      f"{dense['block_weights']:,} weights; LM head node: {', '.join(dense['head']) or 'none found'}.", ""]
        lines += ["| method | target | status | perplexity | x dense | block sparsity | layers with zeros | LM head dense | "
                  "seconds | peak RSS MB | largest bias shift (abs / rel. to dense bias) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rs:
            if r["row"] == "dense":
                continue
            ok = r["status"] == "ok"
            ratio = r["perplexity"] / dense["perplexity"] if ok and dense else None
            nlin = dense["block_linears"] if dense else "?"
            bias = "-"
            if ok and r["row"].startswith("onnxprune"):
                bias = f"{fmt(r.get('max_abs_bias_shift'), '.3g')} / {fmt(r.get('max_rel_bias_shift'), '.3g', 'no dense bias')}"
            status = r["status"] if ok else f"{r['status']}: {r.get('message', '')}"
            lines.append(f"| {r['row']} | {r['target']} | {status} | {fmt(r.get('perplexity'), '.3f')} | {fmt(ratio, '.3f')} | "
                         f"{fmt(r.get('block_sparsity'), '.1%')} | "
                         f"{str(r['layers_with_zeros']) + ' of ' + str(nlin) if ok else '-'} | "
                         f"{('yes' if r.get('head_unchanged') else 'no') if ok else '-'} | {fmt(r.get('seconds'), '.0f')} | "
                         f"{fmt(r.get('peak_rss_mb'), '.0f')} | {bias} |")
        lines.append("")
    lines += ["## What onnxprune pruned and skipped", ""]
    for (kind, exporter), rs in groups.items():
        for r in rs:
            rep = r.get("report")
            if not r["row"].startswith("onnxprune") or not rep or "layers" not in rep:
                continue
            pruned = [x for x in rep["layers"] if x["pruned"]]
            lines.append(f"- {kind}/{exporter} {r['row']} {r['target']}: {len(rep['layers'])} layers scored, {len(pruned)} with "
                         f"pruned weights; engine {rep.get('engine')}, derivatives {json.dumps(rep.get('derivatives'))}; "
                         f"excluded {json.dumps(rep.get('excluded'))}; skipped: " + skipped_summary(rep.get("skipped")) + ".")
            worst = sorted((x for x in rep["layers"] if x.get("max_bias_shift") is not None),
                           key=lambda x: -(x["rel_bias_shift"] if x["rel_bias_shift"] is not None else x["max_bias_shift"]))[:3]
            if worst:
                lines.append("  Largest bias shifts: " + "; ".join(
                    f"{x['layer']} {x['max_bias_shift']:.3g} (dense max |b| {fmt(x['max_abs_dense_bias'], '.3g')}"
                    f"{', inserted' if x.get('bias_inserted') else ''})" for x in worst) + ".")
            if r["target"] == "50%":
                lines.append("  Per layer (pruned / weights): " + ", ".join(f"{x['layer']} {x['pruned']}/{x['weights']}"
                                                                           for x in rep["layers"]) + ".")
    lines += ["", "## onnxsim calls", ""]
    seen = set()
    for r in rows:
        rep = r.get("report")
        if r["row"].startswith("onnxsim") and rep and "function" in rep:
            k = (rep["function"], json.dumps(rep["kwargs"], sort_keys=True))
            if k in seen:
                continue
            seen.add(k)
            lines.append(f"- `{rep['function']}(model, {', '.join(f'{a}={b!r}' for a, b in rep['kwargs'].items())}"
                         f"{', calibration_data=...' if rep.get('calibration') else ''})`"
                         f"{': ' + rep['calibration'] if rep.get('calibration') else ''}")
    restored = {}
    for r in rows:
        rep = r.get("report")
        if r["row"].startswith("onnxsim") and rep and "restored" in rep:
            restored.setdefault((r["model"], r["exporter"]), set()).update(rep["restored"])
    repointed = {}
    for r in rows:
        rep = r.get("report")
        if r["row"].startswith("onnxsim") and rep and rep.get("nodes_repointed_by_onnxsim"):
            repointed.setdefault((r["model"], r["exporter"], rep["function"]), rep["nodes_repointed_by_onnxsim"])
    for (kind, exporter, fn), n in repointed.items():
        lines.append(f"- {kind}/{exporter}: {fn} wrote {n} pruned weights as new initializers and pointed the nodes at them, "
                     "leaving the originals unused; scripts/lm/onnxsim_prune.py puts the values back under the original names "
                     "and drops the unused copies before the LM head is restored")
    for (kind, exporter), names in restored.items():
        lines.append(f"- {kind}/{exporter}: initializers onnxsim changed outside the blocks, written back dense: "
                     f"{', '.join(sorted(names)) or 'none'}")
    for r in rows:
        rep = r.get("report")
        if r["row"] == "onnxsim-wanda" and rep and rep.get("same_mask_as_magnitude") is not None:
            n_keep = len(rep["changed"]) + len(rep["not_changed_of_keep"])
            lines.append(f"- {r['model']}/{r['exporter']} Wanda {r['target']}: mask identical to onnxsim magnitude's in "
                         f"{len(rep['same_mask_as_magnitude'])} of {n_keep} block layers")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
