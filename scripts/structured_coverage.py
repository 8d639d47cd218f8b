"""Structured-pruning coverage of the real-model corpus, from the command line as a user would run it: for every
model of the corpus (scripts/export_corpus.py, data from scripts/corpus_data.py), what `onnxprune inspect --json`
finds (prunable layers, layers whose output units form a unit group, the layers it rejects for unit removal and
why, reasons grouped with node and tensor names left out), and what `onnxprune prune MODEL OUT --data CALIB
--structured --sparsity 0.3` does today (exit code, one-line error, seconds, peak RSS; on success the units,
parameters and MACs before and after and the timing the report gives). Each command is its own subprocess under
a time limit and an address-space cap. Writes docs/results/structured-coverage.md and .json.

    .venv/bin/python scripts/structured_coverage.py --corpus out/corpus [--only NAME ...] [--no-prune]
    .venv/bin/python scripts/structured_coverage.py --render        # the markdown again from the JSON

With ``--before EARLIER.json`` (this script's JSON of an earlier onnxprune), every row and the reasons
table show the earlier counts beside the new ones.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from corpus import run_measured  # noqa: E402  (the subprocess runner with its time and memory limits)

from studies.timer import ratio_rows  # noqa: E402

QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def reason_key(op, reason):
    """A rejection reason with node and tensor names (quoted) left out, numbers kept."""
    return f"{op}: {QUOTED.sub('…', reason)}"


def first_line(text):
    return (text or "").strip().splitlines()[0][:300] if (text or "").strip() else None


def inspect_row(name, path, onnxprune, args, work):
    out = work / f"{name}.inspect.json"
    res = run_measured([onnxprune, "inspect", path, "--json", out, "-q", "--force"], args)
    row = {"inspect_rc": res["rc"], "inspect_error": res["error"], "inspect_seconds": res["seconds"]}
    if res["rc"] != 0 or not out.exists():
        return row
    rep = json.loads(out.read_text())
    layers = [lay["layer"] for lay in rep["layers"]]
    units = rep.get("units") or {}
    groups = units.get("groups", [])
    producers = {p for g in groups for p in g["producers"]}
    consumers = {c for g in groups for c in g.get("consumers", [])}
    rejected = units.get("rejected", [])
    row.update({
        "prunable_layers": len(layers),
        "prunable_weights": sum(lay["weights"] for lay in rep["layers"]),
        "group_layers": len(producers & set(layers)),
        "groups": len(groups),
        "group_units": sum(g["units"] for g in groups),
        "group_consumer_layers": len(consumers & set(layers)),
        "rejected_layers": len({r["node"] for r in rejected}),
        "rejection_reasons": Counter(reason_key(r["op"], r["reason"]) for r in rejected).most_common(),
        "skipped": Counter(reason_key(s["op"], s["reason"]) for s in rep.get("skipped", [])).most_common(),
        "protected_output": rep.get("protected_output"),
    })
    return row


def prune_row(name, path, entry, onnxprune, args, work):
    data = entry["data"]
    out, report = work / f"{name}.structured.onnx", work / f"{name}.structured.json"
    cmd = [onnxprune, "prune", path, out, "--data", args.corpus / data["calib"], "--structured", "--sparsity",
           str(args.sparsity), "--json", report, "--force", "-q"]
    # no --batch-axis for Silero's state (2, N, 128): prune answers "--batch-axis does not apply to --structured
    # pruning" (exit 2), so the command is the plain one and the row shows what prune makes of the data alone
    res = run_measured(cmd, args)
    shown = ["onnxprune"] + [str(c).replace(str(work), "OUT").replace(str(args.corpus), "CORPUS") for c in cmd[1:]]
    row = {"prune_command": " ".join(shown),
           "prune_rc": res["rc"], "prune_error": res["error"], "prune_seconds": res["seconds"],
           "prune_peak_rss_mb": res["peak_rss_mb"]}
    if res["rc"] == 0 and report.exists():
        rep = json.loads(report.read_text())
        row.update({k: (rep.get("units") or {}).get(k) for k in ("units_before", "units_after", "params_before",
                                                                 "params_after", "macs_before", "macs_after")})
        row["timing"] = ratio_rows(rep["timing"]) if rep.get("timing") else []
        row["pruned_bytes"] = (rep.get("written") or {}).get("bytes")
    for f in (out, report):
        f.unlink(missing_ok=True)
    return row


# --------------------------------------------------------------------------------------------------- report
def pct(a, b):
    return "-" if not b or a is None else f"{100 * a / b:.0f}%"


def summary(rows):
    n = len(rows)
    ok = [r for r in rows if r.get("inspect_rc") == 0]
    lines = [f"{n} models; `inspect` exited 0 on {len(ok)}."]
    with_groups = [r for r in ok if r["group_layers"]]
    lines.append(f"Models with at least one layer in a unit group: {len(with_groups)} of {len(ok)}; "
                 f"layers in a unit group over all models: {sum(r['group_layers'] for r in ok):,} of "
                 f"{sum(r['prunable_layers'] for r in ok):,} prunable layers.")
    totals = Counter()
    models = Counter()
    for r in ok:
        for why, k in r["rejection_reasons"]:
            totals[why] += k
            models[why] += 1
    if totals:
        top = totals.most_common(3)
        lines.append("Most frequent rejection reasons (layers, models): " + "; ".join(
            f"`{why}` ({k}, {models[why]})" for why, k in top) + ".")
    pruned = [r for r in rows if "prune_rc" in r]
    if pruned:
        codes = Counter(str(r["prune_rc"]) for r in pruned)
        lines.append(f"`prune --structured --sparsity 0.3` on {len(pruned)} models: exit codes "
                     + ", ".join(f"{c}: {k}" for c, k in sorted(codes.items())) + ".")
        smaller = [r for r in pruned if r["prune_rc"] == 0 and r.get("params_after") is not None
                   and r["params_after"] < r["params_before"]]
        lines.append(f"Models whose written model has fewer parameters than the original: {len(smaller)}.")
    return lines


def markdown(rows, meta):
    out = ["# Structured pruning coverage of the real-model corpus", "",
           f"Generated by `{meta['command']}` on {meta['date']}: onnxprune {meta['onnxprune']}, {meta['models']} models "
           f"of `{meta['corpus_name']}` (exports and wheels: scripts/export_corpus.py; data: scripts/corpus_data.py). "
           f"Each command a subprocess limited to {meta['timeout_s']:.0f} s and {meta['memory_limit_gb']} GB of address "
           "space. *Prunable layers*: the layers `inspect --json` lists; *in a unit group*: those of them that produce "
           "a unit group (`units.groups[].producers`: their output neurons/channels can go); *rejected*: the layers "
           "listed in `units.rejected`, with their reasons counted (names left out).", ""]
    out += ["## Summary", ""] + [f"- {s}" for s in summary(rows)] + [""]
    out += ["## Coverage (inspect)", "",
            "| model | source | prunable layers | in a unit group | groups (units) | rejected | top rejection reasons (layers) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("inspect_rc") != 0:
            out.append(f"| {r['model']} | {r['source']} | inspect exit {r.get('inspect_rc')}: `{r.get('inspect_error')}` "
                       "| | | | |")
            continue
        reasons = "; ".join(f"{why} ({k})" for why, k in r["rejection_reasons"][:3]) or "-"
        out.append(f"| {r['model']} | {r['source']} | {r['prunable_layers']} | {r['group_layers']} "
                   f"({pct(r['group_layers'], r['prunable_layers'])}) | {r['groups']} ({r['group_units']:,}) | "
                   f"{r['rejected_layers']} | {reasons} |")
    before = [r["before"] for r in rows if r.get("before")]
    if before:
        out += ["", f"## Before and after ({meta.get('before')})", "",
                "| model | prunable layers | in a unit group before -> after | rejected before -> after |",
                "| --- | --- | --- | --- |"]
        for r in rows:
            b = r.get("before")
            if b and r.get("inspect_rc") == 0:
                out.append(f"| {r['model']} | {r['prunable_layers']} | {b['group_layers']} -> {r['group_layers']} | "
                           f"{b['rejected_layers']} -> {r['rejected_layers']} |")
    out += ["", "## Rejection reasons over the corpus", "",
            "| reason | layers | models |" + (" layers before |" if before else ""),
            "| --- | --- | --- |" + (" --- |" if before else "")]
    totals, models, earlier = Counter(), Counter(), Counter()
    for r in rows:
        for why, k in r.get("rejection_reasons", []):
            totals[why] += k
            models[why] += 1
    for b in before:
        for why, k in b["rejection_reasons"]:
            earlier[why] += k
    for why, k in totals.most_common():
        out.append(f"| {why} | {k} | {models[why]} |" + (f" {earlier[why]} |" if before else ""))
    for why, k in earlier.most_common() if before else []:
        if why not in totals:
            out.append(f"| {why} | 0 | 0 | {k} |")
    pruned = [r for r in rows if "prune_rc" in r]
    if pruned:
        out += ["", f"## `prune --structured --sparsity {meta['sparsity']}` today", "",
                "| model | exit | seconds | peak RSS MB | units | parameters | MACs | time pruned / dense (batch, threads: "
                "median [quartiles]) | error |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in pruned:
            units = f"{r['units_before']:,} -> {r['units_after']:,}" if r.get("units_before") is not None else "-"
            params = f"{r['params_before']:,} -> {r['params_after']:,}" if r.get("params_before") is not None else "-"
            macs = f"{r['macs_before']:,} -> {r['macs_after']:,}" if r.get("macs_before") is not None else "-"
            timing = ", ".join(f"{t['batch']}, {t['threads']}: {t['ratio_median']:.2f}x [{t['ratio_q25']:.2f}-"
                               f"{t['ratio_q75']:.2f}]{' noisy' if t['noisy'] else ''}"
                               for t in r.get("timing") or [] if "ratio_median" in t) or "-"
            err = f"`{r['prune_error']}`" if r.get("prune_error") else "-"
            out.append(f"| {r['model']} | {r['prune_rc']} | {r['prune_seconds']:.0f} | {r['prune_peak_rss_mb']:.0f} | "
                       f"{units} | {params} | {macs} | {timing} | {err} |")
    out += ["", "## What inspect skips (not prunable at all)", ""]
    for r in rows:
        if r.get("skipped"):
            out.append(f"- {r['model']}: " + "; ".join(f"{k} x {why}" for why, k in r["skipped"]))
    out += ["", "## Models", ""]
    for r in rows:
        out.append(f"- {r['model']}: {r['architecture']}; {r['exporter']}; data `{r.get('data_kind')}` "
                   f"({r.get('calib_samples')} calibration samples)")
    return "\n".join(out) + "\n"


def add_before(rec, earlier):
    """The earlier counts of every model of ``earlier`` (a JSON of this script) into ``rec``."""
    old = {r["model"]: r for r in earlier["models"] if r.get("inspect_rc") == 0}
    for r in rec["models"]:
        if r["model"] in old:
            r["before"] = {k: old[r["model"]][k] for k in ("prunable_layers", "group_layers", "rejected_layers",
                                                            "rejection_reasons")}
    rec["meta"]["before"] = f"before: measured {earlier['meta']['date']}, on the code before the unit-group couplings"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / "out" / "corpus")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "structured-coverage")
    ap.add_argument("--only", nargs="*", help="model names or patterns")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--no-prune", action="store_true", help="inspect only")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per command")
    ap.add_argument("--memory-limit-gb", type=int, default=8)
    ap.add_argument("--render", action="store_true", help="rewrite the markdown from the JSON, measuring nothing")
    ap.add_argument("--before", type=Path, help="this script's JSON of an earlier onnxprune, shown beside the counts")
    args = ap.parse_args()
    if args.render:
        rec = json.loads(Path(f"{args.out}.json").read_text())
        if args.before:
            add_before(rec, json.loads(args.before.read_text()))
        manifest_path = args.corpus / "MANIFEST.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        for r in rec["models"]:
            if "prune_command" in r:        # rows of an earlier version of this script named the executable's path
                r["prune_command"] = re.sub(r"^\S*/onnxprune ", "onnxprune ", r["prune_command"])
            if r["source"] == "wheel" and "wheel" in manifest.get(r["model"], {}):
                r["source"] = Path(manifest[r["model"]]["wheel"]).name.split("-py")[0].removesuffix(".tar.gz")
        Path(f"{args.out}.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")
        Path(f"{args.out}.md").write_text(markdown(rec["models"], rec["meta"]))
        return 0
    onnxprune = str(Path(sys.executable).parent / "onnxprune")
    manifest = json.loads((args.corpus / "MANIFEST.json").read_text())
    names = [n for n in sorted(manifest) if "export_error" not in manifest[n] and (args.corpus / f"{n}.onnx").exists()
             and (not args.only or any(fnmatch.fnmatchcase(n, p) for p in args.only))]
    names.sort(key=lambda n: manifest[n].get("bytes", 0))       # small first: the quick answers come early
    previous = {}
    if Path(f"{args.out}.json").exists():                     # rows of other models are kept (re-measure with --only)
        previous = {r["model"]: r for r in json.loads(Path(f"{args.out}.json").read_text())["models"]}
    import importlib.metadata as md
    meta = {"command": "python scripts/structured_coverage.py" + (" --only ..." if args.only else ""),
            "onnxprune": md.version("onnxprune"), "timeout_s": args.timeout, "memory_limit_gb": args.memory_limit_gb,
            "sparsity": args.sparsity, "corpus_name": args.corpus.name,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in names:
            entry = manifest[name]
            path = args.corpus / f"{name}.onnx"
            row = {"model": name, "family": entry["family"], "exporter": entry["exporter"],
                   "architecture": entry["architecture"], "bytes": entry.get("bytes"),
                   "source": Path(entry["wheel"]).name.split("-py")[0].removesuffix(".tar.gz") if entry["family"] == "wheel"
                   else entry["family"],
                   "data_kind": (entry.get("data") or {}).get("kind"),
                   "calib_samples": (entry.get("data") or {}).get("calib_samples")}
            row.update(inspect_row(name, path, onnxprune, args, work))
            print(f"{name}: inspect rc {row['inspect_rc']}, {row.get('prunable_layers')} layers, "
                  f"{row.get('group_layers')} in a unit group, {row.get('rejected_layers')} rejected", flush=True)
            if not args.no_prune and entry.get("data"):
                row.update(prune_row(name, path, entry, onnxprune, args, work))
                print(f"{name}: prune rc {row['prune_rc']}, {row['prune_seconds']:.0f} s, "
                      f"{row['prune_peak_rss_mb']:.0f} MB" + (f": {row['prune_error']}" if row.get("prune_error") else ""),
                      flush=True)
            elif args.no_prune and name in previous:
                row.update({k: v for k, v in previous[name].items() if k.startswith("prune") or k in (
                    "units_before", "units_after", "params_before", "params_after", "macs_before", "macs_after",
                    "timing", "pruned_bytes")})
            row["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            previous[name] = row
            rows = sorted(previous.values(), key=lambda r: r["model"])
            meta["models"] = len(rows)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "models": rows}, indent=1, default=str) + "\n")
            Path(f"{args.out}.md").write_text(markdown(rows, meta))
    print(f"wrote {args.out}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
