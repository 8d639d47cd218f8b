"""What ``onnxprune inspect`` and ``onnxprune prune --structured`` do on the study's language-model exports.

    .venv/bin/python scripts/lm/structured_lm.py [--out out/lm] [--models gpt2,llama] [--exporters legacy,dynamo,optimum]
        [--sparsity 0.3] [--calib-n 64] [--timeout 1800] [--threads 2]

For every export in --out/MANIFEST.json: ``onnxprune inspect MODEL --json`` (the unit groups it finds for
--structured, with their sizes, and the layers whose units it cannot remove, counted by reason), then the command
line a user would type, ``onnxprune prune MODEL OUT --data CALIB --structured --sparsity S --json R`` with default
options on the same calibration windows as scripts/lm/compare_lm.py (the first --calib-n sequences), timed and
measured like compare_lm's rows (wall seconds, GNU time's peak RSS). A written model gets its held-out perplexity
(lmcommon.onnx_perplexity); a refusal is recorded with its error line and exit code. Results go into the
"structured" section of docs/results/language-models.json and the Markdown beside it is regenerated (the rows of
compare_lm.py are left as they are).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import pathlib
import re
import shlex
import sys
import time

import compare_lm as C
import lmcommon as L
import numpy as np

sys.path.insert(0, str(L.REPO / "scripts"))
from studies.timer import ratio_rows  # noqa: E402


def reasons(entries: list[dict]) -> dict[str, int]:
    """Refusal reasons counted, node names replaced by '…' (as compare_lm's skipped summary does)."""
    counts: dict[str, int] = {}
    for x in entries:
        reason = re.sub(r"'[^']*'", "'…'", x.get("reason", ""))
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def run_one(args, kind: str, exporter: str, model_path: pathlib.Path, calib_file: pathlib.Path, heldout: np.ndarray,
            work: pathlib.Path) -> dict:
    row: dict = {"model": kind, "exporter": exporter, "sparsity": args.sparsity, "options": args.options,
                 "model_file": L.rel(model_path),
                 "heldout": f"{heldout.shape[0]} x {heldout.shape[1]} tokens",
                 "dense_perplexity": L.onnx_perplexity(model_path, heldout, threads=args.threads)["perplexity"]}
    ins_json = work / f"{kind}_{exporter}.structured-inspect.json"
    ins_cmd = [args.onnxprune, "inspect", str(model_path), "--json", str(ins_json), "--force", "-q"]
    res = C.run_measured(ins_cmd, args.timeout, work / f"{kind}_{exporter}.structured-inspect.log")
    ins = json.loads(ins_json.read_text()) if res["exit"] == 0 and ins_json.exists() else {}
    units = ins.get("units", {})
    groups = units.get("groups", [])
    row["inspect"] = {"exit": res["exit"], "seconds": res["seconds"], "message": res["message"] if res["exit"] else "",
                      "groups": [{"group": g["group"], "units": g["units"], "producers": g["producers"],
                                  "consumers": g["consumers"]} for g in groups],
                      "units": int(sum(g["units"] for g in groups)),
                      "not_removable": reasons(units.get("rejected", [])),
                      "prunable_layers": len(ins.get("layers", []))}
    with np.load(calib_file) as z:
        calib_arrays = {k: z[k][:args.calib_n] for k in z.files}
    calib = work / f"calib{args.calib_n}_{kind}_{exporter}.npz"
    np.savez(calib, **calib_arrays)
    tag = f"{kind}_{exporter}_structured_{round(args.sparsity * 100)}" + re.sub(r"[^a-z0-9]+", "_", args.options)
    out_model, rep = work / f"{tag}.onnx", work / f"{tag}.json"
    cmd = [args.onnxprune, "prune", str(model_path), str(out_model), "--data", str(calib), "--structured", "--sparsity",
           str(args.sparsity), *shlex.split(args.options), "--json", str(rep), "--force", "--threads", str(args.threads),
           "-v"]
    row["command"] = "onnxprune " + " ".join(L.rel(pathlib.Path(c)) if "/" in c else c for c in cmd[1:])
    print(f"[{time.strftime('%H:%M:%S')}] {tag}", flush=True)
    res = C.run_measured(cmd, args.timeout, work / f"{tag}.log")
    row.update({k: res[k] for k in ("exit", "timed_out", "seconds", "peak_rss_mb")})
    row["message"] = res["message"]
    if res["exit"] == 0 and out_model.exists():
        report = json.loads(rep.read_text())
        section = report.get("units", {})
        row["status"] = "ok"
        row["perplexity"] = L.onnx_perplexity(out_model, heldout, threads=args.threads)["perplexity"]
        row["result"] = {k: section.get(k) for k in ("units_before", "units_after", "sparsity", "params_before",
                                                      "params_after", "macs_before", "macs_after")}
        row["result"]["groups"] = {name: {k: g[k] for k in ("units_before", "units_after")}
                                   for name, g in (section.get("groups") or {}).items()}
        row["result"]["model_bytes"] = {"dense": model_path.stat().st_size, "pruned": out_model.stat().st_size}
        row["result"]["warnings"] = report.get("warnings")
        row["result"]["timing"] = ratio_rows(report["timing"]) if report.get("timing") else []
        row["result"]["method"], row["result"]["steps"], row["result"]["repair"] = (
            report.get("method"), report.get("steps"), report.get("repair"))
        out_model.unlink()
    else:
        row["status"] = "timeout" if res["timed_out"] else f"exit {res['exit']}"
    print(f"    {tag}: {row['status']} {row.get('perplexity')} {row['seconds']} s {row['message'][:200]}", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=L.DEFAULT_OUT)
    ap.add_argument("--work", type=pathlib.Path, default=None, help="models and logs (default OUT/compare)")
    ap.add_argument("--results", type=pathlib.Path, default=C.RESULTS)
    ap.add_argument("--models", default="gpt2,llama")
    ap.add_argument("--exporters", default="legacy,dynamo,optimum")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--options", default="", help="more prune options, e.g. '--scope layer' (default: none, the defaults)")
    ap.add_argument("--calib-n", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fixtures", action="store_true",
                    help="also the committed tiny fixtures of tests/fixtures/lm (GPT-2 legacy, LLaMA dynamo; their own "
                         "calibration and held-out windows)")
    ap.add_argument("--onnxprune", default=str(pathlib.Path(C.sys.executable).parent / "onnxprune"))
    args = ap.parse_args()
    work = args.work or args.out / "compare"
    work.mkdir(parents=True, exist_ok=True)
    manifest = L.load_json(args.out / "MANIFEST.json")
    heldout = np.load(args.out / "data" / "heldout.npz")["input_ids"]
    runs = []
    for kind in args.models.split(","):
        for exporter in args.exporters.split(","):
            info = manifest["models"].get(f"{kind}_{exporter}.onnx")
            if info is not None and "error" not in info:
                runs.append((kind, exporter, args.out / kind / f"{kind}_{exporter}.onnx",
                             args.out / "data" / info["calibration_file"], heldout))
    if args.fixtures:
        fixtures = L.REPO / "tests" / "fixtures" / "lm"
        tiny_heldout = np.load(fixtures / "heldout.npz")["input_ids"]
        runs += [(f"{kind} fixture", exporter, fixtures / f"{kind}_tiny_{exporter}.onnx", fixtures / "calib.npz", tiny_heldout)
                 for kind, exporter in (("gpt2", "legacy"), ("llama", "dynamo"))]
    for kind, exporter, model_path, calib_file, held in runs:
        row = run_one(args, kind, exporter, model_path, calib_file, held, work)
        with open(args.results.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            results = json.loads(args.results.read_text()) if args.results.exists() else {"rows": []}
            rows = [r for r in results.get("structured", []) if (r["model"], r["exporter"], r["sparsity"], r.get("options", ""))
                    != (kind, exporter, args.sparsity, args.options)]
            results["structured"] = sorted(rows + [row], key=lambda r: C.order({**r, "row": "dense", "target": "-"}))
            C.write_report(args.results, results)


if __name__ == "__main__":
    main()
