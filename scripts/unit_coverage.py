"""How much of each real model structured pruning can reach: per model, the prunable layers (what
``inspect`` lists), those whose output units belong to a unit group (as a producer, or a depthwise
Conv whose channels follow its group), those rejected for a reason no rewrite can avoid (the units
reach a graph output, or the residual stream of a LayerNormalization), and the other rejections
with their reasons (names left out). With ``--check``, a quarter of every group's units are removed
at once (random constants in their place) and the shrunk model is compared on onnxruntime, on two
calibration samples, with the dense model whose consumers read those units as the constants (the
masked reference of tests/unitref.py). Writes docs/results/unit-coverage.md and .json.

    .venv/bin/python scripts/unit_coverage.py --corpus CORPUS_DIR [--only PATTERN ...] [--check]

CORPUS_DIR holds the exports and their MANIFEST.json (scripts/export_corpus.py). Each model is
analysed as ``inspect`` analyses it (its analysis copy), in this process.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from onnxprune import runtime
from onnxprune.edit.slicing import remove_units
from onnxprune.find.layers import analyse_graph
from onnxprune.find.units import find_units
from onnxprune.prepare.analysis import AnalysisCopy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the masked reference (unitref) the tests use
QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
DEFAULT_MODELS = ["tv_*_resnet50", "tv_*_mobilenet_v2", "tv_*_efficientnet_v2_s", "tv_*_regnet_y_400mf",
                  "tv_*_shufflenet_v2_x1_0", "tv_*_densenet121", "tv_*_swin_t", "timm_*_vit_*", "nudenet_yolov8n*",
                  "hf_*_bert_*", "hf_*_distilbert_*", "hf_*_whisper_tiny_encoder", "hf_*_t5_small_encoder"]


def check(work: onnx.ModelProto, groups: list, feeds: dict, seed: int = 0) -> dict:
    """Every group shrunk at once against the masked dense model: the largest difference, relative to
    the outputs' largest magnitude, and whether the shrunk model passes onnx.checker's full check."""
    from unitref import replaced_all

    rng = np.random.default_rng(seed)
    removed = {g.name: np.sort(rng.choice(g.units, max(1, g.units // 4), replace=False)) for g in groups
               if g.lanes == 1 and g.units > 1}
    constants = {g.name: rng.normal(size=g.units) for g in groups}
    shrunk = remove_units(work, removed, constants)
    onnx.checker.check_model(shrunk, full_check=True)
    size = sum(int(np.prod(t.dims)) for t in work.graph.initializer)
    smaller = sum(int(np.prod(t.dims)) for t in shrunk.graph.initializer)
    got = runtime.make_session(shrunk).run(None, feeds)
    del shrunk
    want = runtime.make_session(replaced_all(work, groups, removed, constants)).run(None, feeds)
    scale = max(float(np.abs(w).max()) for w in want if isinstance(w, np.ndarray) and w.size) or 1.0
    worst = max(float(np.abs(a - b).max()) for a, b in zip(got, want) if isinstance(a, np.ndarray) and a.size)
    return {"groups_shrunk": len(removed), "relative_difference": worst / scale, "parameters": [size, smaller]}


def coverage(model: onnx.ModelProto, feeds: dict | None = None) -> dict:
    """Counts of one model: prunable layers, grouped, unavoidable, and the other reasons (and the
    joint check of every group on ``feeds``)."""
    work = AnalysisCopy.of(model).model
    layers = analyse_graph(work).layers
    start = time.perf_counter()
    units = find_units(work)
    seconds = time.perf_counter() - start
    grouped = {p for g in units.groups for p in g.producers}
    followers = {n for g in units.groups for n in g.group_attributes}
    grouped |= {layer.name for layer in layers if layer.node in followers}
    rejected = {r.node: r for r in units.rejected}
    unavoidable = {name for name, r in rejected.items() if name not in grouped and r.unavoidable}
    other = [r for name, r in rejected.items() if name not in grouped and name not in unavoidable]
    names = {layer.name for layer in layers}
    unaccounted = names - grouped - set(rejected)
    checked = check(work, units.groups, feeds) if feeds is not None and units.groups else {}
    return {**checked, "prunable": len(layers), "grouped": len(grouped & names), "unavoidable": len(unavoidable & names),
            "groups": len(units.groups), "units": sum(g.units for g in units.groups),
            "covered": (len(grouped & names) + len(unavoidable & names)) / max(1, len(layers)),
            "unavoidable_reasons": Counter(QUOTED.sub("…", rejected[n].reason) for n in unavoidable).most_common(),
            "other_reasons": Counter(f"{r.op}: {QUOTED.sub('…', r.reason)}" for r in other).most_common(),
            "other_examples": [f"{r.node}: {r.reason}" for r in other[:5]],
            "unaccounted": sorted(unaccounted)[:5], "find_seconds": round(seconds, 2)}


def markdown(rows: list[dict], meta: dict) -> str:
    out = ["# Unit-group coverage of real models", "",
           f"Generated by `{meta['command']}` ({meta['date']}, onnx {meta['onnx']}). *Prunable*: the layers `inspect` "
           "lists; *in a group*: their output units belong to a unit group (a producer, or a depthwise Conv whose "
           "channels follow the group); *unavoidable*: rejected because the units reach a graph output or the residual "
           "stream of a LayerNormalization; *covered* = (in a group + unavoidable) / prunable. *Shrunk together*: "
           "a quarter of the units of every group (without grouped Convs) removed at once, random constants in their "
           "place, against the dense model reading those constants, on two calibration samples: the largest "
           "difference relative to the outputs' largest magnitude.", "",
           "| model | prunable | in a group | unavoidable | covered | groups (units) | shrunk together | "
           "other rejections (layers) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | error: `{r['error']}` | | | | | | |")
            continue
        reasons = "; ".join(f"{why} ({k})" for why, k in r["other_reasons"][:4]) or "-"
        checked = (f"{r['groups_shrunk']} groups, {r['relative_difference']:.1e}" if "relative_difference" in r
                   else "-")
        out.append(f"| {r['model']} | {r['prunable']} | {r['grouped']} | {r['unavoidable']} | {100 * r['covered']:.0f}% "
                   f"| {r['groups']} ({r['units']:,}) | {checked} | {reasons} |")
    ok = [r for r in rows if "error" not in r]
    if ok:
        low = [r["model"] for r in ok if r["covered"] < 0.9]
        out += ["", f"{len(ok)} models measured; at or above 90% covered: {len(ok) - len(low)}"
                + (f"; below: {', '.join(low)}." if low else ".")]
    return "\n".join(out) + "\n"


def _feeds(corpus: Path, entry: dict) -> dict:
    """Two calibration samples of a corpus model (its manifest's data)."""
    data = np.load(corpus / entry["data"]["calib"])
    return {name: data[name][:2] for name in data.files}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--only", nargs="*", default=DEFAULT_MODELS, help="model name patterns")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "unit-coverage")
    ap.add_argument("--check", action="store_true", help="shrink every group at once against the masked model")
    args = ap.parse_args()
    manifest = json.loads((args.corpus / "MANIFEST.json").read_text())
    names = sorted(n for n in manifest if (args.corpus / f"{n}.onnx").exists()
                   and any(fnmatch.fnmatchcase(n, p) for p in args.only))
    rows = []
    for name in names:
        entry = manifest[name]
        row = {"model": name, "exporter": entry.get("exporter"), "architecture": entry.get("architecture")}
        feeds = _feeds(args.corpus, entry) if args.check else None
        try:
            row.update(coverage(onnx.load(str(args.corpus / f"{name}.onnx")), feeds))
        except Exception as error:  # noqa: BLE001 - recorded in the table: a crash is a finding
            row["error"] = f"{type(error).__name__}: {error}"[:200]
        rows.append(row)
        print(name, {k: row.get(k) for k in ("prunable", "grouped", "unavoidable", "covered", "relative_difference", "error")},
              flush=True)
    meta = {"command": "python scripts/unit_coverage.py --corpus CORPUS" + (" --only ..." if args.only != DEFAULT_MODELS else "")
            + (" --check" if args.check else ""),
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "onnx": onnx.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "models": rows}, indent=1) + "\n")
    Path(f"{args.out}.md").write_text(markdown(rows, meta))
    print(f"wrote {args.out}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
