"""The `onnxprune` command: parse options, call the API, print. Exit codes: 0 ok, 1 a check on
the result failed, 2 bad input (also for usage errors, as click does); 130 interrupted (Ctrl-C),
143 terminated (SIGTERM), 141 stdout closed by its reader."""
from __future__ import annotations

import os
import sys

import click

from . import api
from .errors import CheckFailed, InputError
from .data import load_dataset
from .masks import SCOPES
from .engines import ENGINES
from .modelio import stage_model
from .report import (evaluation_table, prune_table, sensitivity_table, skipped_table, storage_table, table,
                     unpruned_table, units_table)
from .runtime import PROVIDERS, build_name, check_installation
from .statistics import EXACT_LIMIT
from .storage import STORAGES, storage_report
from .structured import METHODS as STRUCTURED_METHODS
from .structured_cli import STRUCTURED_ONLY, refuse_outside, run_structured, structured_options
from .ui import Group, command_errors, common, finish, json_option, make_ui, print_json, stage_json

MAX_THREADS = 4 * (os.cpu_count() or 1)
MANY_OUTPUTS = 64  # above this output width the exact statistics' K backward passes make --probes worth a hint


class Fraction(click.ParamType):
    """A fraction written 0.5 or 50%."""

    name = "fraction"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            self.fail(f"{value!r} is not a fraction (0.5) or a percentage (50%)", param, ctx)
        if not 0 <= number <= 1:
            self.fail(f"{value!r} is not between 0 and 1 (0% and 100%)", param, ctx)
        return number


model_arg = click.argument("model", type=click.Path(dir_okay=False))
provider_opt = click.option("--provider", type=click.Choice(sorted(PROVIDERS)), default="cpu", show_default=True,
                            help="onnxruntime execution provider.")
output_opt = click.option("--output", "output", default=None, metavar="NAME",
                          help="Tensor to protect/evaluate (default: the first output; logits before a final Softmax).")
labels_opt = click.option("--labels-key", default=None, metavar="KEY", help="Labels array in the .npz (default: y or labels).")
threads_opt = click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
                           help=f"onnxruntime intra-op and BLAS threads (1..{MAX_THREADS}, 4 x the CPUs).")
seed_opt = click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GB', '1000000' -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 4G, 512M or 1000000")
    value = float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " ")
    if value < 1:
        raise click.BadParameter("the memory budget must be at least one byte")
    return int(value)


memory_opt = click.option("--memory-budget", type=str, default="1.5G", show_default=True, callback=lambda c, p, v: parse_size(v),
                          help="Bytes one batch of activations and derivatives may hold; batches are sized from it.")
def parse_batch_axes(ctx, param, values) -> dict[str, int]:
    """('state=1', ...) -> {'state': 1}."""
    axes = {}
    for text in values:
        name, sep, axis = str(text).rpartition("=")
        if not sep or not name or not axis.strip().isdigit():
            raise click.BadParameter(f"{text!r} is not NAME=AXIS (an input name and a non-negative axis, e.g. state=1)")
        if name in axes:
            raise click.BadParameter(f"{name!r} is given twice")
        axes[name] = int(axis)
    return axes


batch_axis_opt = click.option("--batch-axis", "batch_axes", multiple=True, metavar="NAME=AXIS", callback=parse_batch_axes,
                              help="The batch axis of input NAME in the .npz files, where the model's declared shapes do "
                                   "not tell it (repeatable; e.g. state=1 for a recurrent state (2, batch, 128)).")
engine_opt = click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True,
                          help="Gradient engine: adjoint (onnx-ad graphs, any onnxruntime), ort-training (the training "
                               "build's gradient builder), auto (ort-training on the training build, else adjoint; "
                               "either falls back to the other for an op it cannot differentiate).")


def return_freed_memory() -> None:
    """Blocks over 1 MB get their own mappings, given back to the system when freed (glibc only).

    glibc's default threshold rises to 32 MB with the first large frees, after which numpy's
    per-layer derivative arrays and im2col patches are carved from the heap and stay resident once
    freed: on ResNet-18 at 224x224 (4 calibration images) the peak was 2,056 MB as it is and
    1,982 MB with the threshold held at 1 MB (1,773 MB with onnxruntime's CPU arena also off).
    The command owns its process, so the command sets it, not the library."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator keeps its own policy
        pass


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxprune")
@command_errors
def main():
    """Prune ONNX models with elimination-compensation (ECP) and check them on onnxruntime."""
    return_freed_memory()
    if not {"-h", "--help"} & set(sys.argv):
        check_installation()  # a missing or clobbered onnxruntime: one line with the fix, before any work


@main.command()
@model_arg
@click.argument("out", type=click.Path(dir_okay=False), required=False)
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
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave layers matching this node/weight name pattern (repeatable).")
@seed_opt
@click.option("--probes", type=click.IntRange(min=1), default=None,
              help="Random projections instead of the exact Jacobian (cheaper with many outputs).")
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
          probes, conv_statistics, batch_size, batch_axes, output, labels_key, provider, threads, engine, memory_budget, json_path, force,
          structured, macs, multiple, slice_inputs, prune_inputs, time_batches, verbose, quiet):
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
    # --- structured pruning (issue 12): its own path, see structured_cli ---
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
                from .sensitivity import plot

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

    from .layers import protected_output

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
    from .sensitivity import DEFAULT_RATIOS, check_plotting, parse_budget, parse_ratios, sensitivity

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


@main.command()
@model_arg
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Test data (.npz keyed by input name).")
@click.option("--reference", type=click.Path(dir_okay=False), default=None, help="Original model to compare outputs with.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True)
@batch_axis_opt
@output_opt
@labels_opt
@provider_opt
@threads_opt
@json_option
@click.option("--force", is_flag=True, help="Replace an existing JSON report.")
@common
@command_errors
def evaluate(model, data, reference, batch_size, batch_axes, output, labels_key, provider, threads, json_path, force,
             verbose, quiet):
    """Loss, accuracy, discrepancy against --reference, latency and size of MODEL on onnxruntime."""
    ui = make_ui(verbose, quiet, json_path)
    with ui.outputs([model, data, reference], force) as outputs:
        if json_path and json_path != "-":
            outputs.claim(json_path)
        if batch_axes:
            model = api.as_model(model)
            data = load_dataset(data, model, labels_key, batch_axes=batch_axes)
        report = api.evaluate(model, data, reference=reference, output=output, provider=provider,
                              batch_size=batch_size, labels_key=labels_key, threads=threads)
        stage_json(outputs, json_path, report)
    finish(ui, outputs)
    ui.out(evaluation_table({"value": report}))
    ui.info(f"{report['samples']} samples, output {report['output']!r} ({report['output_kind']}), provider {provider}")
    print_json(json_path, report)


@main.command()
@model_arg
@json_option
@click.option("--force", is_flag=True, help="Replace an existing JSON report.")
@common
@command_errors
def inspect(model, json_path, force, verbose, quiet):
    """List MODEL's prunable layers (shape, current sparsity) and the nodes it cannot prune, with why."""
    ui = make_ui(verbose, quiet, json_path)
    with ui.outputs([model], force) as outputs:
        if json_path and json_path != "-":
            outputs.claim(json_path)
        report = api.inspect(model)
        stage_json(outputs, json_path, report)
    finish(ui, outputs)
    ui.out(f"IR {report['ir_version']}, opsets {report['opsets']}, inputs {report['inputs']}, outputs {report['outputs']}, "
           f"protected output {report['protected_output']!r}")
    ui.out(table(["layer", "op", "weight", "shape", "weights", "sparsity"],
                 [[r["layer"], r["op"], r["weight"], "x".join(map(str, r["shape"])), r["weights"],
                   f"{100 * r['sparsity']:.1f}%"] for r in report["layers"]], right={4, 5}))
    if report["skipped"]:
        ui.out()
        ui.out(skipped_table(report["skipped"]))
    if report["unpruned_weights"]:
        ui.out()
        ui.out(unpruned_table(report["unpruned_weights"]))
    if report["analysis_copy"]:
        ui.info("analysis copy: " + "; ".join(report["analysis_copy"]))
    ui.out()
    ui.out(units_table(report["units"]))  # structured pruning's unit groups
    print_json(json_path, report)


@main.command()
@model_arg
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Training data (.npz with labels).")
@click.option("--epochs", required=True, type=click.IntRange(min=1), help="Passes over the training data.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Shuffling seed.")
@click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True,
              help="Gradient engine: onnx-ad's adjoint graphs (any onnxruntime) or onnxruntime-training; "
                   "auto takes the training build when it is installed.")
@output_opt
@labels_opt
@json_option
@click.option("--force", is_flag=True, help="Replace existing output files.")
@common
@command_errors
def finetune(model, out, data, epochs, lr, batch_size, seed, engine, output, labels_key, json_path, force, verbose, quiet):
    """Train a pruned MODEL (cross-entropy, Adam) with its zero weights held at zero; write OUT.

    The mask is the model's own zeros in its prunable layers. OUT is written only once training
    has finished, so an interrupted run leaves nothing behind.
    """
    import numpy as np

    from .finetune import choose_engine, finetune as train, zero_masks
    from .layers import read_initializer

    ui = make_ui(verbose, quiet, json_path)
    with ui.outputs([model, data], force) as outputs:
        for path in (out, None if json_path == "-" else json_path):
            if path:
                outputs.claim(path)
        original = api.as_model(model)
        dataset = load_dataset(data, original, labels_key, require_labels=True)
        if len(dataset.feeds) != 1:
            raise InputError(f"fine-tuning needs a model with one data input, this one has {len(dataset.feeds)}")
        masks = zero_masks(original)
        chosen = choose_engine(engine)
        ui.info(f"training {model} for {epochs} epochs on {len(dataset)} samples of {data}")
        ui.info(f"engine: {chosen['name']} ({chosen['reason']})")
        bar = None

        def progress(epoch, batch, n_batches, loss):
            """One bar per epoch showing the running mean loss, on a terminal only."""
            nonlocal bar
            if quiet or not sys.stderr.isatty():
                return
            if batch == 1:
                bar = click.progressbar(length=n_batches, label=f"epoch {epoch}/{epochs}", file=sys.stderr,
                                        item_show_func=lambda item: item)
                bar.__enter__()
            bar.update(1, f"loss {loss:.4f}")
            if batch == n_batches:
                bar.__exit__(None, None, None)
                bar = None

        try:
            features = np.asarray(next(iter(dataset.feeds.values())))
            trained, history = train(original, features, dataset.labels, epochs=epochs, lr=lr,
                                     batch_size=batch_size, seed=seed, masks=masks, output=output, progress=progress,
                                     engine=chosen["name"])
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
        api.validate(trained, dataset)
        if any(read_initializer(trained, name)[~mask].any() for name, mask in masks.items()):
            raise CheckFailed("a pruned weight became non-zero during fine-tuning")
        held = sum(int((~mask).sum()) for mask in masks.values())
        report = {"model": model, "out": out, "samples": len(dataset), "epochs": epochs, "lr": lr,
                  "batch_size": batch_size, "seed": seed, "engine": chosen, "masked_layers": sorted(masks), "held_zero": held,
                  "history": history}
        stage_model(trained, out, outputs)
        stage_json(outputs, json_path, report)
    finish(ui, outputs)
    ui.out(table(["epoch", "loss", "seconds"], [[h["epoch"], f"{h['loss']:.4f}", f"{h['seconds']:.2f}"] for h in history]))
    ui.info(f"{len(dataset)} samples, {held} pruned weights held at zero in {len(masks)} layers")
    print_json(json_path, report)


from .ensemble.cli import ensemble  # noqa: E402  (the ensemble commands share this CLI's conventions)

main.add_command(ensemble)


if __name__ == "__main__":  # pragma: no cover
    main()
