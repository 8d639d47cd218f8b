"""The `onnxprune` command: parse options, call the API, print. Exit codes: 0 ok, 1 a check on
the result failed, 2 bad input (also for usage errors, as click does); 130 interrupted."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import api
from .errors import CheckFailed, InputError
from .fileio import check_output_path
from .masks import SCOPES
from .modelio import save_model
from .report import evaluation_table, prune_table, sensitivity_table, skipped_table, storage_table, table
from .runtime import PROVIDERS
from .storage import STORAGES, storage_report
from .ui import common, command_errors, emit_json, make_ui


model_arg = click.argument("model", type=click.Path(dir_okay=False))
provider_opt = click.option("--provider", type=click.Choice(sorted(PROVIDERS)), default="cpu", show_default=True,
                            help="onnxruntime execution provider.")
output_opt = click.option("--output", "output", default=None, metavar="NAME",
                          help="Tensor to protect/evaluate (default: the first output; logits before a final Softmax).")
labels_opt = click.option("--labels-key", default=None, metavar="KEY", help="Labels array in the .npz (default: y or labels).")
json_opt = click.option("--json", "json_path", default=None, metavar="PATH", help="Also write the report as JSON ('-' for stdout).")
threads_opt = click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxprune")
def main():
    """Prune ONNX models with elimination-compensation (ECP) and check them on onnxruntime."""


@main.command()
@model_arg
@click.argument("out", type=click.Path(dir_okay=False), required=False)
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Calibration data (.npz keyed by input name).")
@click.option("--sparsity", type=float, default=None, help="Fraction of the prunable weights to remove (0..1).")
@click.option("--dry-run", is_flag=True,
              help="Write no model: report the score sum (and with --evaluate the loss) for every --ratios value.")
@click.option("--ratios", default=None, metavar="R1,R2,...",
              help="Sparsities of the dry run [default: 0.1,0.2,...,0.9,0.95].")
@click.option("--evaluate", "evaluate_data", type=click.Path(dir_okay=False), default=None,
              help="Dry run: measure loss, accuracy and output error of every ratio on this .npz.")
@click.option("--max-loss-increase", default=None, metavar="1%|0.01",
              help="Dry run: the loss budget relative to the dense loss on --evaluate; report the largest ratio within it.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Dry run: draw the loss-vs-sparsity curve to this PNG (needs matplotlib).")
@click.option("--storage", type=click.Choice(STORAGES), default="dense", show_default=True,
              help="Write pruned initializers dense, or as sparse initializers where smaller (disk only: "
                   "onnxruntime expands them at load).")
@click.option("--method", type=click.Choice(api.METHOD_NAMES), default="ecp", show_default=True,
              help="Saliency; ecp-refit = ECP in steps with least-squares refits of the surviving weights.")
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
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--probes", type=click.IntRange(min=1), default=None,
              help="Random projections instead of the exact Jacobian (cheaper with many outputs).")
@click.option("--conv-statistics", type=click.Choice(["exact", "positions"]), default="exact", show_default=True,
              help="Layers sharing a weight across positions (Conv, MatMul on sequences): exact per-sample sums, or "
                   "every position as a sample of its own (cheaper, drops cross-position terms).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--test", "test_data", type=click.Path(dir_okay=False), default=None,
              help="Evaluate the original and the pruned model on this .npz and print both.")
@output_opt
@labels_opt
@provider_opt
@threads_opt
@json_opt
@click.option("--force", is_flag=True, help="Replace existing output files; run nonlinear above its size limit.")
@common
@command_errors
def prune(model, out, data, sparsity, dry_run, ratios, evaluate_data, max_loss_increase, plot_path, storage, method,
          steps, refit, chained, g_weighted, compensation, scope, exclude, seed,
          probes, conv_statistics, batch_size, test_data,
          output, labels_key, provider, threads, json_path, force, verbose, quiet):
    """Prune MODEL (one-shot, or in --steps) and write the result to OUT.

    With --dry-run, write no model: report how the error grows over --ratios and, with --evaluate
    and --max-loss-increase, the largest ratio whose loss stays within the budget (exit 1 if none).
    """
    ui = make_ui(verbose, quiet)
    params = dict(method=method, compensation=compensation, scope=scope, exclude=exclude, seed=seed, output=output,
                  probes=probes, batch_size=batch_size, labels_key=labels_key, provider=provider, threads=threads,
                  force=force, steps=steps, refit=refit, chained=chained, g_weighted=g_weighted,
                  conv_statistics=conv_statistics, progress=ui.progress)
    if dry_run:
        return _dry_run(ui, model, out, data, sparsity, ratios, evaluate_data, max_loss_increase, plot_path, storage,
                        test_data, json_path, force, params)
    dry_only = {"--ratios": ratios, "--evaluate": evaluate_data, "--max-loss-increase": max_loss_increase, "--plot": plot_path}
    given = [name for name, value in dry_only.items() if value is not None]
    if given:
        raise InputError(f"{given[0]} is an option of the dry run; add --dry-run (or use --test to evaluate a pruned model)")
    if out is None:
        raise InputError("missing OUT, the path of the pruned model (or add --dry-run to write no model)")
    if sparsity is None:
        raise InputError("missing --sparsity (or add --dry-run to try several --ratios)")
    check_output_path(out, force=force, inputs=[model, data])
    if json_path and json_path != "-":
        check_output_path(json_path, force=force, inputs=[model, data, out])
    ui.info(f"scoring {model} with {method} on {data}")
    original = api.as_model(model)
    result = api.prune(original, data, sparsity, method=method, compensation=compensation, scope=scope,
                       exclude=exclude, seed=seed, output=output, probes=probes, batch_size=batch_size,
                       labels_key=labels_key, provider=provider, threads=threads, force=force, steps=steps,
                       refit=refit, chained=chained, g_weighted=g_weighted, conv_statistics=conv_statistics,
                       progress=ui.progress)
    report = result.to_dict()
    if test_data:
        report["test"] = {name: api.evaluate(m, test_data, reference=original if name == "pruned" else None,
                                             output=output, provider=provider, labels_key=labels_key, threads=threads)
                          for name, m in (("original", original), ("pruned", result.model))}
    if storage == "sparse":
        report["storage"] = storage_report(result.model, storage)
    save_model(result.model, out, force=force, inputs=[model], storage=storage)
    ui.written.append(out)
    if storage == "sparse":
        report["storage"]["written_bytes"] = Path(out).stat().st_size
    ui.out(prune_table(result))
    if test_data:
        ui.out()
        ui.out(evaluation_table(report["test"]))
    if storage == "sparse":
        ui.out()
        ui.out(storage_table(report["storage"]))
    ui.info(f"method {method}{'' if result.compensation else ' without compensation'}, protected output "
            f"{result.protected_output!r}, seconds " + ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items()))
    if result.skipped:
        ui.info(skipped_table(report["skipped"]))
    ui.info(f"wrote {out}")
    emit_json(json_path, report, force, ui)


def _dry_run(ui, model, out, data, sparsity, ratios, evaluate_data, max_loss_increase, plot_path, storage, test_data,
             json_path, force, params) -> None:
    """``prune --dry-run``: the sensitivity report; nothing but the JSON report and the plot is written."""
    from .sensitivity import DEFAULT_RATIOS, check_plotting, parse_budget, parse_ratios, plot, sensitivity

    if out is not None:
        raise InputError(f"--dry-run writes no model; drop OUT ({out}) or drop --dry-run")
    refused = {"--sparsity": sparsity, "--test": test_data, "--storage": None if storage == "dense" else storage}
    given = [name for name, value in refused.items() if value is not None]
    if given:
        raise InputError(f"{given[0]} does not apply to --dry-run (use --ratios and --evaluate)")
    ratio_list = parse_ratios(ratios) if ratios is not None else list(DEFAULT_RATIOS)
    budget = parse_budget(max_loss_increase) if max_loss_increase is not None else None
    if budget is not None and evaluate_data is None:
        raise InputError("--max-loss-increase needs --evaluate TEST.npz (the loss it bounds is measured there)")
    inputs = [model, data, evaluate_data]
    for path in (json_path if json_path != "-" else None, plot_path):
        if path:
            check_output_path(path, force=force, inputs=inputs)
    if plot_path:
        check_plotting()
    ui.info(f"scoring {model} with {params['method']} on {data}")
    report = sensitivity(model, data, ratio_list, evaluate=evaluate_data, max_loss_increase=budget, **params)
    ui.out(sensitivity_table(report.to_dict()))
    if budget is not None:
        best = report.best_ratio
        ui.out()
        ui.out(f"largest ratio within +{100 * budget:g}% loss: " + ("none" if best is None else f"{best:g}"))
    ui.info("seconds " + ", ".join(f"{k} {v:.2f}" for k, v in report.seconds.items()))
    if plot_path:
        plot(report, plot_path)
        ui.info(f"plot written to {plot_path}")
    emit_json(json_path, report.to_dict(), force, ui)
    if budget is not None and report.best_ratio is None:
        raise CheckFailed(f"no ratio keeps the loss within +{100 * budget:g}% of the dense loss "
                          f"{report.dense['loss']:.4g} (smallest tried: {report.points[0].ratio:g})")


@main.command()
@model_arg
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Test data (.npz keyed by input name).")
@click.option("--reference", type=click.Path(dir_okay=False), default=None, help="Original model to compare outputs with.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True)
@output_opt
@labels_opt
@provider_opt
@threads_opt
@json_opt
@click.option("--force", is_flag=True, help="Replace an existing JSON report.")
@common
@command_errors
def evaluate(model, data, reference, batch_size, output, labels_key, provider, threads, json_path, force, verbose, quiet):
    """Loss, accuracy, discrepancy against --reference, and latency of MODEL on onnxruntime."""
    ui = make_ui(verbose, quiet)
    if json_path and json_path != "-":
        check_output_path(json_path, force=force)
    report = api.evaluate(model, data, reference=reference, output=output, provider=provider,
                          batch_size=batch_size, labels_key=labels_key, threads=threads)
    ui.out(evaluation_table({"value": report}))
    ui.info(f"{report['samples']} samples, output {report['output']!r} ({report['output_kind']}), provider {provider}")
    emit_json(json_path, report, force, ui)


@main.command()
@model_arg
@json_opt
@click.option("--force", is_flag=True, help="Replace an existing JSON report.")
@common
@command_errors
def inspect(model, json_path, force, verbose, quiet):
    """List MODEL's prunable layers (shape, current sparsity) and the nodes it cannot prune, with why."""
    ui = make_ui(verbose, quiet)
    report = api.inspect(model)
    ui.out(f"IR {report['ir_version']}, opsets {report['opsets']}, inputs {report['inputs']}, outputs {report['outputs']}, "
           f"protected output {report['protected_output']!r}")
    ui.out(table(["layer", "op", "weight", "shape", "weights", "sparsity"],
                 [[r["layer"], r["op"], r["weight"], "x".join(map(str, r["shape"])), r["weights"],
                   f"{100 * r['sparsity']:.1f}%"] for r in report["layers"]], right={4, 5}))
    if report["skipped"]:
        ui.out()
        ui.out(skipped_table(report["skipped"]))
    emit_json(json_path, report, force, ui)


@main.command()
@model_arg
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Training data (.npz with labels).")
@click.option("--epochs", required=True, type=click.IntRange(min=1), help="Passes over the training data.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffling seed.")
@output_opt
@labels_opt
@json_opt
@click.option("--force", is_flag=True, help="Replace existing output files.")
@common
@command_errors
def finetune(model, out, data, epochs, lr, batch_size, seed, output, labels_key, json_path, force, verbose, quiet):
    """Train a pruned MODEL (cross-entropy, Adam) with its zero weights held at zero; write OUT.

    The mask is the model's own zeros in its prunable layers. OUT is written only once training
    has finished, so an interrupted run leaves nothing behind.
    """
    from .data import load_dataset
    from .errors import CheckFailed
    from .finetune import finetune as train, zero_masks
    from .layers import read_initializer

    ui = make_ui(verbose, quiet)
    check_output_path(out, force=force, inputs=[model, data])
    if json_path and json_path != "-":
        check_output_path(json_path, force=force, inputs=[model, data, out])
    original = api.as_model(model)
    dataset = load_dataset(data, original, labels_key, require_labels=True)
    if len(dataset.feeds) != 1:
        raise InputError(f"fine-tuning needs a model with one data input, this one has {len(dataset.feeds)}")
    masks = zero_masks(original)
    ui.info(f"training {model} for {epochs} epochs on {len(dataset)} samples of {data}")
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
        trained, history = train(original, next(iter(dataset.feeds.values())), dataset.labels, epochs=epochs, lr=lr,
                                 batch_size=batch_size, seed=seed, masks=masks, output=output, progress=progress)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    api.validate(trained, dataset)
    if any(read_initializer(trained, name)[~mask].any() for name, mask in masks.items()):
        raise CheckFailed("a pruned weight became non-zero during fine-tuning")
    save_model(trained, out, force=force, inputs=[model])
    ui.written.append(out)
    ui.out(table(["epoch", "loss", "seconds"], [[h["epoch"], f"{h['loss']:.4f}", f"{h['seconds']:.2f}"] for h in history]))
    held = sum(int((~mask).sum()) for mask in masks.values())
    ui.info(f"{len(dataset)} samples, {held} pruned weights held at zero in {len(masks)} layers; wrote {out}")
    emit_json(json_path, {"model": model, "out": out, "samples": len(dataset), "epochs": epochs, "lr": lr,
                           "batch_size": batch_size, "seed": seed, "masked_layers": sorted(masks),
                           "held_zero": held, "history": history}, force, ui)


from .ensemble.cli import ensemble  # noqa: E402  (the ensemble commands share this CLI's conventions)

main.add_command(ensemble)


if __name__ == "__main__":  # pragma: no cover
    main()
