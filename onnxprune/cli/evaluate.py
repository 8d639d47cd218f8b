"""``onnxprune evaluate``: loss, accuracy, discrepancy, latency and size on onnxruntime."""
from __future__ import annotations

import click

from onnxprune import api
from onnxprune.cli.options import (
    batch_axis_opt,
    labels_opt,
    model_arg,
    output_opt,
    provider_opt,
    split_batch_axes,
    threads_opt,
)
from onnxprune.cli.tables import evaluation_table
from onnxprune.cli.ui import command_errors, common, finish, json_option, make_ui, print_json, stage_json
from onnxprune.io.data import load_dataset


@click.command()
@model_arg
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Test data (.npz keyed by input name).")
@click.option("--reference", type=click.Path(dir_okay=False), default=None, help="Original model to compare outputs with.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Samples per run, and the larger batch the latency is timed at (besides 1; fewer where the "
                   "memory budget needs).")
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
        output_axes: dict[str, int] = {}
        if batch_axes:
            model = api.as_model(model)
            input_axes, output_axes = split_batch_axes(model, batch_axes)
            data = load_dataset(data, model, labels_key, batch_axes=input_axes)
        report = api.evaluate(model, data, reference=reference, output=output, provider=provider,
                              batch_size=batch_size, labels_key=labels_key, threads=threads, output_axes=output_axes)
        stage_json(outputs, json_path, report)
    finish(ui, outputs)
    ui.out(evaluation_table({"value": report}))
    ui.info(f"{report['samples']} samples, output {report['output']!r} ({report['output_kind']}), provider {provider}")
    print_json(json_path, report)
