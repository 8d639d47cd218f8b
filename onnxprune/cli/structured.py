"""``prune --structured``: its options, and which options of either mode are refused in the other."""
from __future__ import annotations

import functools

import click

from onnxprune.errors import InputError
from onnxprune.pipeline import UNIT_METHODS

STRUCTURED_ONLY = tuple(m for m in UNIT_METHODS if m not in ("ecp", "random"))


def structured_options(func):
    """The options of ``prune --structured``, applied as one block."""
    options = [
        click.option("--structured", is_flag=True,
                     help="Remove whole units (neurons, channels, heads): smaller shapes, real speed. --sparsity is "
                          "then the fraction of prunable units removed."),
        click.option("--macs", type=float, default=None, metavar="FRACTION",
                     help="--structured: remove this fraction of the MACs instead (units ranked by error per MAC saved)."),
        click.option("--multiple", type=click.IntRange(min=1), default=None,
                     help="--structured: round every layer's kept units to a multiple of N [default: Conv channels to the "
                          "block the provider runs fast, measured (onnxruntime's CPU: 8 or 16), other units unrounded]."),
        click.option("--slice-inputs", is_flag=True,
                     help="--structured: input features of a first dense layer may go too, as long as one contiguous "
                          "range is kept (a Slice inside the model; its inputs do not change)."),
        click.option("--prune-inputs", is_flag=True,
                     help="--structured: any input features of a first dense layer may go; CHANGES THE MODEL'S INPUT to "
                          "the kept features (listed in the report and the model's metadata)."),
        click.option("--time-batches", default="1,256", show_default=True, metavar="B1,B2",
                     help="Batch sizes at which the original and the pruned model are timed (paired, repeated; with "
                          "--structured always, else with --test), at one thread and at --threads."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def refused_options(structured: bool, *, method, macs, multiple, slice_inputs, prune_inputs, storage, compensation,
                    chained, g_weighted, conv_statistics, error_at=None) -> None:
    """One line (exit 2) for an option that means nothing in the chosen mode."""
    if structured:
        weights_only = {"--storage sparse": storage != "dense", "--no-compensation": not compensation,
                        "--no-chain": not chained, "--g-weighting": g_weighted,
                        "--conv-statistics positions": conv_statistics == "positions",
                        "--error-at layer": error_at == "layer"}
        given = [name for name, value in weights_only.items() if value]
        if given:
            raise InputError(f"{given[0]} does not apply to --structured pruning")
        if method not in UNIT_METHODS:
            raise InputError(f"--method {method} is not a structured method; choose one of {', '.join(UNIT_METHODS)}")
        if slice_inputs and prune_inputs:
            raise InputError("--slice-inputs and --prune-inputs exclude each other")
        return
    if slice_inputs or prune_inputs:
        raise InputError(f"--{'slice' if slice_inputs else 'prune'}-inputs applies to --structured pruning; add --structured")
    if macs is not None:
        raise InputError("--macs applies to --structured pruning; add --structured (or use --sparsity)")
    if multiple is not None:
        raise InputError("--multiple applies to --structured pruning; add --structured")
    if method in STRUCTURED_ONLY:
        raise InputError(f"--method {method} is a structured method; add --structured")


def mode_options(structured: bool, macs, multiple: int, slice_inputs: bool, prune_inputs: bool) -> dict:
    """The Pruner's parameters of the chosen mode."""
    if not structured:
        return {}
    inputs = "slice" if slice_inputs else "prune" if prune_inputs else "keep"
    return {"structured": True, "macs": macs is not None, "multiple": multiple, "inputs": inputs}
