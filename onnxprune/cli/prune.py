"""``onnxprune prune``: one command for both strategies (weights; units with --structured), one-shot or
in steps, the dry run and the budgeted sweep; every option either acts in a mode or is refused there."""
from __future__ import annotations

from dataclasses import replace

import click

from onnxprune import api
from onnxprune.check.relative import damage_warnings
from onnxprune.check.timing import measure_latency, select_inputs
from onnxprune.cli.options import (
    Fraction,
    ModelOutput,
    batch_axis_opt,
    engine_opt,
    exclude_opt,
    labels_opt,
    memory_opt,
    model_arg,
    outputs_opt,
    probes_opt,
    provider_opt,
    seed_opt,
    split_batch_axes,
    threads_opt,
    workers_options,
)
from onnxprune.cli.report import engine_line, hint_probes, print_result, print_sweep
from onnxprune.cli.structured import STRUCTURED_ONLY, mode_options, refused_options, structured_options
from onnxprune.cli.ui import command_errors, common, finish, json_option, make_ui, print_json, stage_json
from onnxprune.errors import CheckFailed, InputError
from onnxprune.io.data import Dataset, load_dataset
from onnxprune.io.models import stage_model
from onnxprune.io.storage import STORAGES, storage_report
from onnxprune.select.masks import SCOPES


@click.command()
@model_arg
@click.argument("out", type=ModelOutput(), required=False)
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Calibration data (.npz keyed by input name).")
@click.option("--sparsity", type=Fraction(), default=None,
              help="Fraction to remove (0.8 or 80%): of the prunable weights, or with --structured of the prunable units.")
@click.option("--dry-run", is_flag=True,
              help="Write no model: report the error (and with --test the loss) at every --ratios value.")
@click.option("--ratios", default=None, metavar="R1,R2,...",
              help="Fractions of the dry run or of a budget [default: 0.1,0.2,...,0.9,0.95; structured 0.1,...,0.9].")
@click.option("--test", "test_data", type=click.Path(dir_okay=False), default=None,
              help="Evaluate on this .npz: the original and the pruned model; in a dry run or with a budget, every ratio.")
@click.option("--evaluate", "evaluate_alias", type=click.Path(dir_okay=False), default=None, hidden=True)
@click.option("--max-loss-increase", default=None, metavar="1%|0.01",
              help="Loss budget relative to the dense loss on --test: the largest --ratios value within it is chosen "
                   "(and written, without --dry-run).")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 100), default=None, metavar="POINTS",
              help="Accuracy budget in percentage points on --test (0.5: at most 0.5 points below dense).")
@click.option("--max-output-error", default=None, metavar="5%|0.05",
              help="Label-free budget: the relative output error of every protected output and part, "
                   "mean((y - y_ref)^2) / mean((y_ref - mean y_ref)^2), on --test (else on the calibration data).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Dry run or budget: draw the curve to this PNG (loss against sparsity; with --structured accuracy "
                   "and time against MACs; needs matplotlib).")
@click.option("--storage", type=click.Choice(STORAGES), default="dense", show_default=True,
              help="Write pruned initializers dense, or as sparse initializers where smaller (disk only: "
                   "onnxruntime expands them at load).")
@click.option("--method", type=click.Choice([*api.METHOD_NAMES, *STRUCTURED_ONLY]), default="ecp", show_default=True,
              help="Saliency; ecp-refit = ECP in steps with least-squares refits of the surviving weights; "
                   f"with --structured one of {', '.join(api.UNIT_METHODS)}.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Reach the target in this many steps, re-scoring each time (default 1; ecp-refit and structured "
                   "ecp 5).")
@click.option("--refit/--no-refit", default=None,
              help="Re-solve the surviving weights and biases by chained least squares after every step (on for "
                   "ecp-refit, --structured and sequence models).")
@click.option("--chain/--no-chain", "chained", default=True, show_default=True,
              help="Refit each layer on the pruned network's own inputs (else the dense network's).")
@click.option("--g-weighting/--no-g-weighting", "g_weighted", default=False, show_default=True,
              help="Weight the last refit's samples by the output sensitivity G.")
@click.option("--compensation/--no-compensation", default=True, show_default=True,
              help="Add the removed weights' compensation to the biases (methods that have one).")
@click.option("--scope", type=click.Choice(SCOPES), default=None,
              help="One threshold over all layers, or the same fraction in every layer [default: global; layer for "
                   "sequence models (transformer blocks)].")
@click.option("--pattern", default=None, metavar="N:M",
              help="N:M sparsity (2:4: at most N nonzero weights in every M consecutive inputs of each row, the "
                   "pattern sparse kernels run); sets --sparsity to (M-N)/M.")
@exclude_opt
@seed_opt
@probes_opt
@click.option("--conv-statistics", type=click.Choice(["exact", "positions"]), default=None,
              help="Layers sharing a weight across positions (Conv, MatMul on sequences): exact per-sample sums, or "
                   "every position as a sample of its own (cheaper, drops cross-position terms) [default: exact].")
@click.option("--error-at", type=click.Choice(["output", "layer"]), default=None,
              help="Where ECP measures a removal's error: at the protected output (G from its derivatives, the "
                   "paper's) or at each layer's own output (G = 1: the per-layer reconstruction target, no "
                   "derivatives) [default: output; layer for sequence models].")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Calibration samples per batch of the statistics at most (fewer where --memory-budget needs).")
@batch_axis_opt
@outputs_opt
@labels_opt
@provider_opt
@threads_opt
@engine_opt
@memory_opt
@workers_options
@json_option
@click.option("--force", is_flag=True, help="Replace existing output files; run nonlinear above its size limit.")
@structured_options
@common
@command_errors
def prune(model, out, data, sparsity, dry_run, ratios, test_data, evaluate_alias, max_loss_increase, max_accuracy_drop,
          max_output_error, plot_path, storage, method, steps, refit, chained, g_weighted, compensation, scope, pattern,
          exclude, seed, probes, conv_statistics, error_at, batch_size, batch_axes, output, labels_key, provider, threads,
          engine, memory_budget, workers, ray,
          json_path, force, structured, macs, multiple, slice_inputs, prune_inputs, time_batches, verbose, quiet):
    """Prune MODEL (one-shot, or in --steps) and write the result to OUT.

    Without --structured, single weights become zeros (the file compresses; the model is as fast).
    With --structured, whole neurons, channels and heads go: the model is smaller and faster.
    With --max-loss-increase or --max-accuracy-drop (and --test), or --max-output-error (no labels
    needed), the largest of --ratios within the budget is chosen, scoring once, and written (exit 1
    if none fits). With --dry-run, write no model: report how the error grows over --ratios.
    """
    ui = make_ui(verbose, quiet, json_path)
    if evaluate_alias is not None:
        if test_data is not None and test_data != evaluate_alias:
            raise InputError("--evaluate is another name of --test; give one of them")
        test_data = evaluate_alias
    refused_options(structured, method=method, macs=macs, multiple=multiple, slice_inputs=slice_inputs,
                    prune_inputs=prune_inputs, storage=storage, compensation=compensation, chained=chained,
                    g_weighted=g_weighted, conv_statistics=conv_statistics, error_at=error_at)
    mode = mode_options(structured, macs, multiple, slice_inputs, prune_inputs)
    if pattern is not None:
        sparsity = _pattern_sparsity(pattern, sparsity, structured, dry_run or max_loss_increase is not None
                                     or max_accuracy_drop is not None or max_output_error is not None)
        mode["pattern"] = pattern
    target = (sparsity, macs) if sparsity is not None and macs is not None else macs if macs is not None else sparsity
    output = list(output) or None
    params = dict(method=method, compensation=compensation, scope=scope, exclude=exclude, seed=seed, output=output,
                  probes=probes, batch_size=batch_size, labels_key=labels_key, provider=provider, threads=threads,
                  force=force, steps=steps, refit=refit, chained=chained, g_weighted=g_weighted,
                  conv_statistics=conv_statistics, error_at=error_at, engine=engine, memory_budget=memory_budget,
                  workers=workers, ray=ray, progress=ui.progress, **mode)
    batches = _batches(time_batches)
    budgeted = max_loss_increase is not None or max_accuracy_drop is not None or max_output_error is not None
    _check_request(out, dry_run, budgeted, target, ratios, plot_path, storage, structured)
    ui.steps = api.Pruner(**params).planned_steps(target if isinstance(target, float) else 0.5)
    with ui.outputs([model, data, test_data], force) as outputs:
        for path in (out, None if json_path == "-" else json_path, plot_path):
            if path:
                outputs.claim(path)
        ui.info(f"scoring {model} with {method}{' (structured)' if structured else ''} on {data}")
        original = api.as_model(model)
        input_axes, params["output_axes"] = split_batch_axes(original, batch_axes)
        calib, test = (None if path is None else load_dataset(path, original, labels_key, batch_axes=input_axes)
                       for path in (data, test_data))
        hint_probes(ui, original, output[0] if output else None, probes, method)
        sweep = None
        if dry_run or budgeted:
            sweep = _sweep(original, calib, ratios, test, max_loss_increase, max_accuracy_drop, max_output_error, plot_path,
                           params, keep_best=not dry_run, structured=structured)
            if plot_path:
                from onnxprune.sweep import plot

                outputs.stage(plot_path, lambda tmp: plot(sweep, tmp))
        if sweep is not None and (dry_run or sweep.best_result is None):
            stage_json(outputs, json_path, sweep.to_dict())
        else:
            result = sweep.best_result if sweep is not None else api.prune(original, calib, target, **params)
            report = result.to_dict()
            if sweep is not None:
                report["sensitivity"] = sweep.to_dict()
            if structured or test is not None:  # speed is what structured pruning is for: always measured
                timed = test if test is not None else calib
                report["timing"] = measure_latency({"original": original, "pruned": result.model}, timed, batches,
                                                   provider=provider, threads=(1, threads),
                                                   kept_inputs={"pruned": result.kept_inputs})
                report["faster_than_dense"] = all(b["ratio"]["median"] < 1 for b in report["timing"]["batches"])
            if test is not None:
                report["test"] = _compare(original, result, test, output, provider, threads, params["output_axes"])
                parts = report["test"]["pruned"].get("output_errors")  # held-out damage the calibration data can hide
                result.warnings += damage_warnings({"parts": parts}, "the test data") if parts else []
                report["warnings"] = result.warnings
            if storage == "sparse":
                report["storage"] = storage_report(result.model, storage)
            stage_model(result.model, out, outputs, storage=storage)
            report["written"] = outputs.staged_size(out)
            if storage == "sparse":
                report["storage"]["written_bytes"] = report["written"]["bytes"]
            stage_json(outputs, json_path, report)
    finish(ui, outputs)
    if sweep is not None:
        print_sweep(ui, sweep)
    if dry_run or sweep is not None and sweep.best_result is None:
        print_json(json_path, sweep.to_dict())
        _check_budget(sweep)
        return
    if sweep is not None:
        ui.out()
    print_result(ui, result, report, out, original)
    ui.info(engine_line(result.engine, result.derivatives))
    print_json(json_path, report)


def _pattern_sparsity(pattern: str, sparsity, structured: bool, sweeping: bool) -> float:
    """The sparsity an N:M pattern sets (a --sparsity given with it must agree)."""
    from onnxprune.select.masks import parse_pattern, pattern_sparsity

    if structured:
        raise InputError("--pattern N:M masks single weights; it does not apply to --structured pruning")
    if sweeping:
        raise InputError("--pattern fixes the sparsity; it does not apply to --dry-run or a budget")
    implied = pattern_sparsity(parse_pattern(pattern))
    if sparsity is not None and abs(sparsity - implied) > 1e-9:
        raise InputError(f"--pattern {pattern} prunes {implied:.0%} of the weights; drop --sparsity {sparsity:g}")
    return implied


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise InputError(f"--time-batches must be positive integers separated by commas, got {text!r}")
    return values


def _check_request(out, dry_run, budgeted, target, ratios, plot_path, storage, structured) -> None:
    """What the command was asked to do, and whether the options agree."""
    if structured and isinstance(target, tuple):
        raise InputError("give exactly one of --sparsity (fraction of units) and --macs (fraction of MACs) with --structured")
    if dry_run:
        if out is not None:
            raise InputError(f"--dry-run writes no model; drop OUT ({out}) or drop --dry-run")
        refused = {"--sparsity" if not structured else "--sparsity/--macs": target,
                   "--storage": None if storage == "dense" else storage}
        given = [name for name, value in refused.items() if value is not None]
        if given:
            raise InputError(f"{given[0]} does not apply to --dry-run (use --ratios and --test)")
        return
    given = [name for name, value in {"--ratios": ratios, "--plot": plot_path}.items() if value is not None]
    if given and not budgeted:
        raise InputError(f"{given[0]} is an option of the dry run or of a budget; add --dry-run "
                         "or --max-loss-increase / --max-accuracy-drop / --max-output-error")
    if out is None:
        raise InputError("missing OUT, the path of the pruned model (or add --dry-run to write no model)")
    if budgeted and target is not None:
        raise InputError("--sparsity and a budget exclude each other: the budget chooses the sparsity")
    if target is None and not budgeted:
        raise InputError("missing --sparsity (or --macs with --structured; or give a budget, or add --dry-run to try "
                         "several --ratios)")


def _compare(original, result, test: Dataset, output, provider, threads, output_axes) -> dict:
    """The original and the pruned model on the test data: quality and size (their speed is the
    report's paired ``timing``), the relative error of every protected output and part; a model
    whose inputs changed is fed only its kept features."""
    from onnxprune.check.relative import compare_outputs

    pruned_test = replace(test, feeds=select_inputs(test.feeds, result.kept_inputs))
    report = {"original": api.evaluate(original, test, output=output, provider=provider, threads=threads, latency=False),
              "pruned": api.evaluate(result.model, pruned_test, output=output, provider=provider, threads=threads,
                                     reference=None if result.kept_inputs else original, latency=False,
                                     output_axes=output_axes)}
    if result.kept_inputs:  # the reference takes every feature: compared here with the kept ones fed to the model
        compared = compare_outputs(result.model, original, test, result.protected_outputs, provider=provider,
                                   threads=threads, kept_inputs=result.kept_inputs, given_axes=output_axes)
        report["pruned"].update(relative_error=compared["relative_error"], worst_part=compared["worst"],
                                output_errors=compared["parts"])
    return report


def _sweep(model, data, ratios, test, max_loss_increase, max_accuracy_drop, max_output_error, plot_path, params, keep_best,
           structured):
    """The dry run's sensitivity report (scored once); with ``keep_best`` it keeps the model of the
    largest ratio within the budget."""
    from onnxprune.sweep import DEFAULT_RATIOS, STRUCTURED_RATIOS, check_plotting, parse_budget, parse_ratios, sensitivity

    ratio_list = parse_ratios(ratios) if ratios is not None else list(STRUCTURED_RATIOS if structured else DEFAULT_RATIOS)
    budget = parse_budget(max_loss_increase) if max_loss_increase is not None else None
    if (budget is not None or max_accuracy_drop is not None) and test is None:
        option = "--max-loss-increase" if budget is not None else "--max-accuracy-drop"
        raise InputError(f"{option} needs --test TEST.npz (what it bounds is measured there)")
    if plot_path:
        check_plotting()
    return sensitivity(model, data, ratio_list, evaluate=test, max_loss_increase=budget,
                       max_accuracy_drop=max_accuracy_drop, max_output_error=max_output_error, keep_best=keep_best,
                       **params)


def _check_budget(sweep) -> None:
    if sweep.budget_text and sweep.best_ratio is None:
        dense = sweep.dense or {}
        known = ([f"dense loss {dense['loss']:.4g}"] if dense.get("loss") is not None else []) + (
            [f"accuracy {100 * dense['accuracy']:.2f}%"] if dense.get("accuracy") is not None else [])
        raise CheckFailed(f"no ratio keeps {sweep.budget_text} of dense ({', '.join(known + [''])}smallest tried: "
                          f"{sweep.points[0].ratio:g})")
