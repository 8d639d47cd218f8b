"""What ``prune`` prints: the result's tables (per layer, speed, quality, storage), the sweep, and
with -v how the derivatives were computed and what was left out."""
from __future__ import annotations

import click

from onnxprune import api
from onnxprune.cli.tables import (
    error_table,
    evaluation_table,
    prune_table,
    sensitivity_table,
    skipped_table,
    storage_table,
    structured_table,
    timing_table,
    unpruned_table,
)
from onnxprune.derivatives.plan import EXACT_LIMIT
from onnxprune.runtime import build_name

MANY_OUTPUTS = 64  # above this output width the exact statistics' K backward passes make --probes worth a hint


def print_result(ui, result, report: dict, out: str, original) -> None:
    """The pruned model's tables, in the order a reader asks: what changed, how fast, how good, the file."""
    if result.mode == "units":
        ui.out(structured_table(report["units"]))
    else:
        ui.out(prune_table(result))
    if "timing" in report:
        ui.out()
        ui.out(timing_table(report["timing"]))
        if result.mode == "units" and not report["faster_than_dense"]:
            slower = ", ".join(f"batch {b['batch_size']} with {b['threads'] or 'default'} thread(s) "
                               f"({b['ratio']['median']:.2f}x{', noisy' if b['ratio']['noisy'] else ''})"
                               for b in report["timing"]["batches"] if b["ratio"]["median"] >= 1)
            ui.out(f"The pruned model is not faster than dense at {slower}: remove more (--macs), round the kept "
                   "counts (--multiple 8 or 16), or keep the dense model.")
    if "test" in report:
        ui.out()
        ui.out(evaluation_table(report["test"]))
    if "storage" in report:
        ui.out()
        ui.out(storage_table(report["storage"]))
    if result.defaults and result.defaults.get("applied"):
        ui.out(defaults_line(result.defaults))
    for name, kept in result.kept_inputs.items():
        ui.out(f"\nThe model's input {name!r} changed: it takes {len(kept)} of its features; feed x[:, kept] with "
               "the kept indices of the JSON report (kept_inputs) or the model's metadata onnxprune.kept_input_features.")
    if result.output_error is not None:
        ui.out()
        ui.out(error_table(result.output_error, "calibration"))
    ui.out(f"wrote {out}: {report['written']['bytes']:,} bytes ({report['written']['zlib_bytes']:,} zlib-compressed)")
    warn(result.warnings)
    compensation = "" if result.summary.get("compensation", True) else " without compensation"
    ui.info(f"method {result.method}{compensation}, repair {result.repair}, protected output "
            f"{result.protected_output!r}, seconds " + ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items()))
    if result.skipped:
        ui.info(skipped_table(report["skipped"]))
    if ui.verbose and result.mode == "weights":
        others = api.inspect(original)["unpruned_weights"]
        if others:
            ui.info(unpruned_table(others))


def warn(warnings: list[str]) -> None:
    """Damage the pruning did, on stderr whatever -q says: a model must not be damaged silently."""
    for text in dict.fromkeys(warnings):
        click.echo(f"Warning: {text}", err=True)


OPTION_TEXT = {"scope": lambda v: f"--scope {v}", "refit": lambda v: "--refit" if v else "--no-refit",
               "conv_statistics": lambda v: f"--conv-statistics {v}", "probes": lambda v: f"--probes {v}",
               "error_at": lambda v: f"--error-at {v}"}


def defaults_line(defaults: dict) -> str:
    """Which defaults the model chose, and why (modes.weights.model_defaults)."""
    chosen = ", ".join(OPTION_TEXT[k](v) for k, v in defaults["applied"].items())
    return (f"defaults for a sequence model (token-wise layers hold {100 * defaults['token_share']:.0f}% of the prunable "
            f"weights): {chosen}; an option given overrides its default")


def print_sweep(ui, sweep) -> None:
    ui.out(sensitivity_table(sweep.to_dict()))
    if sweep.best_result is not None:
        warn(sweep.best_result.warnings)
    else:
        for point in sweep.points:
            warn([f"at ratio {point.ratio:g}: {text}" for text in point.warnings])
    if sweep.budget_text:
        best = sweep.best_ratio
        ui.out()
        ui.out(f"largest ratio within budget ({sweep.budget_text} of dense): " + ("none" if best is None else f"{best:g}"))
    ui.info(engine_line(sweep.engine, sweep.derivatives))
    ui.info("seconds " + ", ".join(f"{k} {v:.2f}" for k, v in sweep.seconds.items()))


def engine_line(engine: dict | None, derivatives: dict | None = None) -> str:
    """What computed the derivatives, for -v: the engine and why, exact or random probes, the batch."""
    if not engine or engine["name"] is None:
        return "gradient engine: none needed" + (f" ({engine['reason']})" if engine else "")
    line = f"gradient engine: {engine['name']} ({engine['reason']}; {build_name()})"
    d = derivatives or {}
    if d.get("automatic_probes"):
        line += (f"; {d['probes']} random probes instead of the exact Jacobian's {d['outputs']:,} rows (automatic above "
                 f"{EXACT_LIMIT} output elements; --probes N to choose)")
    elif d.get("probes"):
        line += f"; {d['probes']} random probes"
    elif "outputs" in d:
        line += f"; exact Jacobian ({d['outputs']} outputs)"
    if "batch" in d:
        line += f"; batches of {d['batch']}"
    if "workers" in d:
        line += f"; {d['shards']} shards of {d['shard_size']} samples on {d['workers']} workers ({d['cluster']})"
    return line


def hint_probes(ui, model, output, probes, method) -> None:
    """With -v: exact statistics cost one backward pass per output; say when --probes would be much cheaper."""
    if probes is not None or method not in ("ecp", "ecp-unit", *api.PRESETS) or not ui.verbose:
        return
    import numpy as np
    import onnx

    from onnxprune.find.outputs import protected_output

    try:
        name = protected_output(model, output)
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # advisory only: no hint when shape inference cannot tell
        return
    shapes = [vi.type.tensor_type.shape for vi in [*graph.value_info, *graph.output] if vi.name == name]
    dims = [d.dim_value for d in shapes[0].dim[1:]] if shapes else [0]
    width = int(np.prod(dims)) if all(dims) else None
    if width is not None and MANY_OUTPUTS < width <= EXACT_LIMIT:  # above, random probes are chosen automatically
        ui.info(f"the protected output has {width} values per sample: exact statistics take {width} backward passes "
                f"per sample; --probes 10 estimates them with 10")
