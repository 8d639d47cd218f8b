"""``onnxprune prune --structured``: the options, and the run (prune, check, time, print, write)."""
from __future__ import annotations

import functools

import click

from onnxprune.errors import InputError
from onnxprune.score.units import METHODS

STRUCTURED_ONLY = tuple(m for m in METHODS if m != "ecp")


def structured_options(func):
    """The options of ``prune --structured``, applied as one block."""
    options = [
        click.option("--structured", is_flag=True,
                     help="Remove whole units (neurons, channels): smaller shapes, real speed. --sparsity is then "
                          "the fraction of prunable units removed."),
        click.option("--macs", type=float, default=None, metavar="FRACTION",
                     help="--structured: remove this fraction of the MACs instead (units ranked by error per MAC saved)."),
        click.option("--multiple", type=click.IntRange(min=1), default=1, show_default=True,
                     help="--structured: round every layer's kept units to a multiple of N (onnxruntime's fast Conv path: 8)."),
        click.option("--slice-inputs", is_flag=True,
                     help="--structured: input features of a first dense layer may go too, as long as one contiguous "
                          "range is kept (a Slice inside the model; its inputs do not change)."),
        click.option("--prune-inputs", is_flag=True,
                     help="--structured: any input features of a first dense layer may go; CHANGES THE MODEL'S INPUT to "
                          "the kept features (listed in the report and the model's metadata)."),
        click.option("--time-batches", default="1,256", show_default=True, metavar="B1,B2",
                     help="--structured: batch sizes at which both models are timed (paired, repeated)."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def refuse_outside(macs, multiple, method, slice_inputs=False, prune_inputs=False) -> None:
    """Options that only mean something with --structured."""
    if slice_inputs or prune_inputs:
        raise InputError(f"--{'slice' if slice_inputs else 'prune'}-inputs applies to --structured pruning; add --structured")
    if macs is not None:
        raise InputError("--macs applies to --structured pruning; add --structured (or use --sparsity)")
    if multiple != 1:
        raise InputError("--multiple applies to --structured pruning; add --structured")
    if method in STRUCTURED_ONLY:
        raise InputError(f"--method {method} is a structured method; add --structured")


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise InputError(f"--time-batches must be positive integers separated by commas, got {text!r}")
    return values


def run_structured(ui, *, model, out, data, sparsity, macs, method, scope, multiple, steps, refit, exclude, seed,
                   output, probes, batch_size, labels_key, provider, threads, test_data, json_path, force,
                   time_batches, slice_inputs, prune_inputs, refused: dict) -> None:
    from onnxprune import api
    from onnxprune.check.timing import select_inputs, time_models
    from onnxprune.cli.tables import structured_table, timing_table
    from onnxprune.cli.ui import finish, print_json, stage_json
    from onnxprune.io.data import Dataset
    from onnxprune.io.models import stage_model
    from onnxprune.modes.units import prune_structured

    given = [name for name, value in refused.items() if value]
    if given:
        raise InputError(f"{given[0]} does not apply to --structured pruning")
    if method not in METHODS:
        raise InputError(f"--method {method} is not a structured method; choose one of {', '.join(METHODS)}")
    batches = _batches(time_batches)
    if slice_inputs and prune_inputs:
        raise InputError("--slice-inputs and --prune-inputs exclude each other")
    inputs = "slice" if slice_inputs else "prune" if prune_inputs else "keep"
    if out is None:
        raise InputError("missing OUT, the path of the pruned model")
    with ui.outputs([model, data, test_data], force) as outputs:
        for path in (out, None if json_path == "-" else json_path):
            if path:
                outputs.claim(path)
        original = api.as_model(model)
        ui.info(f"structured pruning of {model} with {method} on {data}")
        result = prune_structured(original, data, sparsity=sparsity, macs=macs, method=method, scope=scope,
                                  multiple=multiple, steps=steps, refit=refit is not False, exclude=exclude,
                                  output=output, probes=probes, batch_size=batch_size, seed=seed, labels_key=labels_key,
                                  provider=provider, threads=threads, inputs=inputs)
        feeds = api.as_dataset(data, original, labels_key).subset(max(batches)).inputs()
        result.timing = time_models(original, result.model, feeds, batches, kept_inputs=result.kept_inputs,
                                    threads=threads or 1, provider=provider)
        report = result.to_dict()
        if test_data:
            test = api.as_dataset(test_data, original, labels_key)
            pruned_test = Dataset(select_inputs(test.feeds, result.kept_inputs), test.labels, test.fixed)
            report["test"] = {"original": api.evaluate(original, test, output=output, provider=provider,
                                                       threads=threads),
                              "pruned": api.evaluate(result.model, pruned_test, output=output, provider=provider,
                                                     threads=threads,
                                                     reference=None if result.kept_inputs else original)}
        stage_model(result.model, out, outputs)
        report["written"] = outputs.staged_size(out)
        stage_json(outputs, json_path, report)
    finish(ui, outputs)
    ui.out(structured_table(report))
    ui.out()
    ui.out(timing_table(report["timing"]))
    if test_data:
        from onnxprune.cli.tables import evaluation_table

        ui.out()
        ui.out(evaluation_table(report["test"]))
    for name, kept in result.kept_inputs.items():
        ui.out(f"\nThe model's input {name!r} changed: it takes {len(kept)} of its features; feed x[:, kept] with "
               "the kept indices of the JSON report (kept_inputs) or the model's metadata onnxprune.kept_input_features.")
    ui.info("seconds " + ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items()))
    if result.rejected:
        ui.info("not removable: " + "; ".join(f"{r.layer}: {r.reason}" for r in result.rejected))
    ui.out(f"wrote {out}: {report['written']['bytes']:,} bytes ({report['written']['zlib_bytes']:,} zlib-compressed)")
    print_json(json_path, report)
