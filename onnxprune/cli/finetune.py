"""``onnxprune finetune``: fixed-mask training of a pruned classifier."""
from __future__ import annotations

import sys

import click

from onnxprune import api
from onnxprune.check.validate import validate
from onnxprune.cli.options import labels_opt, model_arg, out_arg, output_opt
from onnxprune.cli.tables import table
from onnxprune.cli.ui import command_errors, common, finish, json_option, make_ui, print_json, stage_json
from onnxprune.derivatives.engines import ENGINES
from onnxprune.errors import CheckFailed, InputError
from onnxprune.io.data import load_dataset
from onnxprune.io.models import stage_model


@click.command()
@model_arg
@out_arg
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Training data (.npz with labels).")
@click.option("--epochs", required=True, type=click.IntRange(min=1), help="Passes over the training data.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Training samples per Adam step.")
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

    from onnxprune.graph.index import read_initializer
    from onnxprune.repair.finetune import choose_engine, zero_masks
    from onnxprune.repair.finetune import finetune as train

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
        validate(trained, dataset)
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
