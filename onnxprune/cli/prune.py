"""``onnxprune prune``: one-shot, stepwise or structured pruning, the dry run and the budgeted sweep."""
from __future__ import annotations

import click

from onnxprune import api
from onnxprune.cli.options import (
    Fraction,
    ModelOutput,
    batch_axis_opt,
    engine_opt,
    exclude_opt,
    labels_opt,
    memory_opt,
    model_arg,
    output_opt,
    probes_opt,
    provider_opt,
    seed_opt,
    threads_opt,
)
from onnxprune.cli.structured import STRUCTURED_ONLY, refuse_outside, run_structured, structured_options
from onnxprune.cli.tables import evaluation_table, prune_table, sensitivity_table, skipped_table, storage_table, unpruned_table
from onnxprune.cli.ui import command_errors, common, finish, json_option, make_ui, print_json, stage_json
from onnxprune.derivatives.statistics import EXACT_LIMIT
from onnxprune.errors import CheckFailed, InputError
from onnxprune.io.data import load_dataset
from onnxprune.io.models import stage_model
from onnxprune.io.storage import STORAGES, storage_report
from onnxprune.runtime import build_name
from onnxprune.score.units import METHODS as STRUCTURED_METHODS
from onnxprune.select.masks import SCOPES

MANY_OUTPUTS = 64  # above this output width the exact statistics' K backward passes make --probes worth a hint


@click.command()
@model_arg
@click.argument("out", type=ModelOutput(), required=False)
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Calibration data (.npz keyed by input name).")
@click.option("--sparsity", type=Fraction(), default=None, help="Fraction of the prunable weights to remove (0.8 or 80%).")
@click.option("--dry-run", is_flag=True,
              help="Write no model: report the score sum (and with --test the loss) for every --ratios value.")
@click.option("--ratios", default=None, metavar="R1,R2,...",
              help="Sparsities of the dry run or of a budget [default: 0.1,0.2,...,0.9,0.95].")
@click.option("--test", "test_data", type=click.Path(dir_okay=False), default=None,
              help="Evaluate on this .npz: the original and the pruned model; in a dry run or with a budget, every ratio.")
@click.option("--evaluate", "evaluate_alias", type=click.Path(dir_okay=False), default=None, hidden=True)
@click.option("--max-loss-increase", default=None, metavar="1%|0.01",
              help="Loss budget relative to the dense loss on --test: the largest --ratios value within it is chosen "
                   "(and written, without --dry-run).")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 100), default=None, metavar="POINTS",
              help="Accuracy budget in percentage points on --test (0.5: at most 0.5 points below dense).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Dry run or budget: draw the loss-vs-sparsity curve to this PNG (needs matplotlib).")
@click.option("--storage", type=click.Choice(STORAGES), default="dense", show_default=True,
              help="Write pruned initializers dense, or as sparse initializers where smaller (disk only: "
                   "onnxruntime expands them at load).")
@click.option("--method", type=click.Choice([*api.METHOD_NAMES, *STRUCTURED_ONLY]), default="ecp", show_default=True,
              help="Saliency; ecp-refit = ECP in steps with least-squares refits of the surviving weights; "
                   f"with --structured one of {', '.join(STRUCTURED_METHODS)}.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Reach the sparsity in this many steps, re-scoring each time (default 1; ecp-refit 5).")
@click.option("--refit/--no-refit", default=None,
              help="Re-solve surviving weights and biases by chained least squares after the mask (on for ecp-refit).")
@click.option("--chain/--no-chain", "chained", default=True, show_default=True,
              help="Refit each layer on the pruned network's own inputs (else the dense network's).")
@click.option("--g-weighting/--no-g-weighting", "g_weighted", default=False, show_default=True,
              help="Weight the last refit's samples by the output sensitivity G.")
@click.option("--compensation/--no-compensation", default=True, show_default=True,
              help="Add the removed weights' compensation to the biases (methods that have one).")
@click.option("--scope", type=click.Choice(SCOPES), default="global", show_default=True,
              help="One threshold over all layers, or the same ratio in every layer.")
@exclude_opt
@seed_opt
@probes_opt
@click.option("--conv-statistics", type=click.Choice(["exact", "positions"]), default="exact", show_default=True,
              help="Layers sharing a weight across positions (Conv, MatMul on sequences): exact per-sample sums, or "
                   "every position as a sample of its own (cheaper, drops cross-position terms).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@batch_axis_opt
@output_opt
@labels_opt
@provider_opt
@threads_opt
@engine_opt
@memory_opt
@json_option
@click.option("--force", is_flag=True, help="Replace existing output files; run nonlinear above its size limit.")
@structured_options
@common
@command_errors
def prune(model, out, data, sparsity, dry_run, ratios, test_data, evaluate_alias, max_loss_increase, max_accuracy_drop,
          plot_path, storage, method, steps, refit, chained, g_weighted, compensation, scope, exclude, seed,
          probes, conv_statistics, batch_size, batch_axes, output, labels_key, provider, threads, engine, memory_budget,
          json_path, force, structured, macs, multiple, slice_inputs, prune_inputs, time_batches, verbose, quiet):
    """Prune MODEL (one-shot, or in --steps) and write the result to OUT.

    With --max-loss-increase or --max-accuracy-drop (and --test), the largest of --ratios within
    the budget is chosen, scoring once, and written (exit 1 if none fits). With --dry-run, write
    no model: report how the error grows over --ratios.
    """
    ui = make_ui(verbose, quiet, json_path)
    ui.steps = steps or (len(api.PRESETS[method].schedule(0.5)) if method in api.PRESETS else 1)
    if evaluate_alias is not None:
        if test_data is not None and test_data != evaluate_alias:
            raise InputError("--evaluate is another name of --test; give one of them")
        test_data = evaluate_alias
    # --- structured pruning (issue 12): its own path, see cli/structured.py ---
    if structured:
        return run_structured(
            ui, model=model, out=out, data=data, sparsity=sparsity, macs=macs, method=method, scope=scope,
            multiple=multiple, steps=steps, refit=refit, exclude=exclude, seed=seed, output=output, probes=probes,
            batch_size=batch_size, labels_key=labels_key, provider=provider, threads=threads, test_data=test_data,
            json_path=json_path, force=force, time_batches=time_batches, slice_inputs=slice_inputs,
            prune_inputs=prune_inputs,
            refused={"--dry-run": dry_run, "--storage sparse": storage != "dense", "--no-compensation": not compensation,
                     "--no-chain": not chained, "--conv-statistics positions": conv_statistics != "exact",
                     "--batch-axis": bool(batch_axes)})
    refuse_outside(macs, multiple, method, slice_inputs, prune_inputs)
    # --- end of structured pruning ---
    params = dict(method=method, compensation=compensation, scope=scope, exclude=exclude, seed=seed, output=output,
                  probes=probes, batch_size=batch_size, labels_key=labels_key, provider=provider, threads=threads,
                  force=force, steps=steps, refit=refit, chained=chained, g_weighted=g_weighted,
                  conv_statistics=conv_statistics, engine=engine, memory_budget=memory_budget, progress=ui.progress)
    budgeted = max_loss_increase is not None or max_accuracy_drop is not None
    if dry_run:
        if out is not None:
            raise InputError(f"--dry-run writes no model; drop OUT ({out}) or drop --dry-run")
        refused = {"--sparsity": sparsity, "--storage": None if storage == "dense" else storage}
        given = [name for name, value in refused.items() if value is not None]
        if given:
            raise InputError(f"{given[0]} does not apply to --dry-run (use --ratios and --test)")
    else:
        sweep_only = {"--ratios": ratios, "--plot": plot_path}
        given = [name for name, value in sweep_only.items() if value is not None]
        if given and not budgeted:
            raise InputError(f"{given[0]} is an option of the dry run or of a budget; add --dry-run "
                             "or --max-loss-increase / --max-accuracy-drop")
        if out is None:
            raise InputError("missing OUT, the path of the pruned model (or add --dry-run to write no model)")
        if budgeted and sparsity is not None:
            raise InputError("--sparsity and a budget exclude each other: the budget chooses the sparsity")
        if sparsity is None and not budgeted:
            raise InputError("missing --sparsity (or give a budget, or add --dry-run to try several --ratios)")
    with ui.outputs([model, data, test_data], force) as outputs:
        for path in (out, None if json_path == "-" else json_path, plot_path):
            if path:
                outputs.claim(path)
        ui.info(f"scoring {model} with {method} on {data}")
        original = api.as_model(model)
        if batch_axes:  # read the files here, with the axes named, and hand the datasets on
            data, test_data = (None if path is None else load_dataset(path, original, labels_key, batch_axes=batch_axes)
                               for path in (data, test_data))
        _hint_probes(ui, original, output, probes, method)
        sweep = None
        if dry_run or budgeted:
            sweep = _sweep(original, data, ratios, test_data, max_loss_increase, max_accuracy_drop, plot_path,
                           params, keep_best=not dry_run)
            if plot_path:
                from onnxprune.sweep import plot

                outputs.stage(plot_path, lambda tmp: plot(sweep, tmp))
        if sweep is not None and (dry_run or sweep.best_result is None):
            stage_json(outputs, json_path, sweep.to_dict())
        else:
            result = sweep.best_result if sweep is not None else api.prune(original, data, sparsity, **params)
            report = result.to_dict()
            if sweep is not None:
                report["sensitivity"] = sweep.to_dict()
            if test_data:
                report["test"] = _compare(original, result.model, test_data, output, provider, labels_key, threads)
            if storage == "sparse":
                report["storage"] = storage_report(result.model, storage)
            stage_model(result.model, out, outputs, storage=storage)
            report["written"] = outputs.staged_size(out)
            if storage == "sparse":
                report["storage"]["written_bytes"] = report["written"]["bytes"]
            stage_json(outputs, json_path, report)
    finish(ui, outputs)
    if sweep is not None:
        _print_sweep(ui, sweep)
    if dry_run or sweep is not None and sweep.best_result is None:
        print_json(json_path, sweep.to_dict())
        _check_budget(sweep)
        return
    if sweep is not None:
        ui.out()
    ui.out(prune_table(result))
    ui.out(f"wrote {out}: {report['written']['bytes']:,} bytes ({report['written']['zlib_bytes']:,} zlib-compressed)")
    if test_data:
        ui.out()
        ui.out(evaluation_table(report["test"]))
    if storage == "sparse":
        ui.out()
        ui.out(storage_table(report["storage"]))
    ui.info(engine_line(result.engine, result.derivatives))
    ui.info(f"method {method}{'' if result.compensation else ' without compensation'}, protected output "
            f"{result.protected_output!r}, seconds " + ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items()))
    if result.skipped:
        ui.info(skipped_table(report["skipped"]))
    if ui.verbose:
        others = api.inspect(original)["unpruned_weights"]
        if others:
            ui.info(unpruned_table(others))
    print_json(json_path, report)


def engine_line(engine: dict | None, derivatives: dict | None = None) -> str:
    """What computed the derivatives, for -v: the engine and why, exact or random probes, the batch."""
    if not engine or engine["name"] is None:
        return "gradient engine: none needed" + (f" ({engine['reason']})" if engine else "")
    line = f"gradient engine: {engine['name']} ({engine['reason']}; {build_name()})"
    d = derivatives or {}
    if d.get("automatic_probes"):
        line += (f"; {d['probes']} random probes instead of the exact Jacobian's {d['outputs']:,} rows (automatic above "
                 "100 output elements; --probes N to choose)")
    elif d.get("probes"):
        line += f"; {d['probes']} random probes"
    elif "outputs" in d:
        line += f"; exact Jacobian ({d['outputs']} outputs)"
    if "batch" in d:
        line += f"; batches of {d['batch']}"
    return line


def _compare(original, pruned, test_data, output, provider, labels_key, threads) -> dict:
    """The original and the pruned model on the test data. Latency is the pruned evaluation's paired
    measurement (both models in turns), so the original's column shows its half of that pairing."""
    reports = {"original": api.evaluate(original, test_data, output=output, provider=provider, labels_key=labels_key,
                                        threads=threads),
               "pruned": api.evaluate(pruned, test_data, reference=original, output=output, provider=provider,
                                      labels_key=labels_key, threads=threads)}
    paired = reports["pruned"]["latency"]
    reports["original"]["latency"] = {"repeats": paired["repeats"], "batches": [
        {"batch_size": b["batch_size"], "runs_per_timing": b["runs_per_timing"], "model": b["reference"]}
        for b in paired["batches"]]}
    return reports


def _hint_probes(ui, model, output, probes, method) -> None:
    """With -v: exact statistics cost one backward pass per output; say when --probes would be much cheaper."""
    if probes is not None or method not in ("ecp", *api.PRESETS) or not ui.verbose:
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
                f"per sample; --probes 10 estimates them with 10 (see README, Speed and memory)")


def _sweep(model, data, ratios, test_data, max_loss_increase, max_accuracy_drop, plot_path, params, keep_best):
    """The dry run's sensitivity report (scored once); with ``keep_best`` it keeps the model of the
    largest ratio within the budget."""
    from onnxprune.sweep import DEFAULT_RATIOS, check_plotting, parse_budget, parse_ratios, sensitivity

    ratio_list = parse_ratios(ratios) if ratios is not None else list(DEFAULT_RATIOS)
    budget = parse_budget(max_loss_increase) if max_loss_increase is not None else None
    if (budget is not None or max_accuracy_drop is not None) and test_data is None:
        option = "--max-loss-increase" if budget is not None else "--max-accuracy-drop"
        raise InputError(f"{option} needs --test TEST.npz (what it bounds is measured there)")
    if plot_path:
        check_plotting()
    return sensitivity(model, data, ratio_list, evaluate=test_data, max_loss_increase=budget,
                       max_accuracy_drop=max_accuracy_drop, keep_best=keep_best, **params)


def _print_sweep(ui, sweep) -> None:
    ui.out(sensitivity_table(sweep.to_dict()))
    if sweep.budget_text:
        best = sweep.best_ratio
        ui.out()
        ui.out(f"largest ratio within budget ({sweep.budget_text} of dense): " + ("none" if best is None else f"{best:g}"))
    ui.info(engine_line(sweep.engine, sweep.derivatives))
    ui.info("seconds " + ", ".join(f"{k} {v:.2f}" for k, v in sweep.seconds.items()))


def _check_budget(sweep) -> None:
    if sweep.budget_text and sweep.best_ratio is None:
        dense = sweep.dense
        raise CheckFailed(f"no ratio keeps {sweep.budget_text} of dense (dense loss {dense['loss']:.4g}, accuracy "
                          f"{100 * dense['accuracy']:.2f}%; smallest tried: {sweep.points[0].ratio:g})")
