"""Option values shared by the command lines (``onnxprune`` and ``onnxprune ensemble``): one
spelling and one error message for each kind of value, checked by click before a command runs."""
from __future__ import annotations

import os
import re

import click

from onnxprune.derivatives.engines import ENGINES
from onnxprune.derivatives.plan import MAX_PROBES
from onnxprune.errors import InputError
from onnxprune.io.files import DATA_SUFFIX
from onnxprune.io.models import allow_external_data_outside
from onnxprune.io.paths import check_output_name
from onnxprune.runtime import PROVIDERS


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


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 4G, 512M or 1000000")
    value = float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " ")
    if value < 1:
        raise click.BadParameter("the memory budget must be at least one byte")
    return int(value)


# The options several commands share.
MAX_THREADS = 4 * (os.cpu_count() or 1)


class ModelOutput(click.ParamType):
    """The path of a model to write: a file name with room for its external data file (OUT.data),
    checked as given (a trailing slash, a leading '-') before anything runs."""

    name = "path"

    def convert(self, value, param, ctx):
        try:
            check_output_name(value, room=len(DATA_SUFFIX))
        except InputError as exc:
            self.fail(str(exc), param, ctx)
        return value


class Pattern(click.ParamType):
    """A shell pattern for --exclude: not empty, its brackets closed."""

    name = "pattern"

    def convert(self, value, param, ctx):
        text = str(value)
        if not text.strip():
            self.fail("an empty pattern matches no layer; give a node or weight name, or a shell pattern like fc*",
                      param, ctx)
        if re.search(r"\[(?![^\]]*\])", text.replace("[]]", "").replace("[!]]", "")):
            self.fail(f"{text!r} opens a '[' it does not close (write [[] for a literal '[')", param, ctx)
        return text


def _allow_outside(ctx, param, value) -> None:
    """--allow-external-data-outside: models read by this command may follow their external data out
    of their folder (until the command ends)."""
    if value:
        ctx.with_resource(allow_external_data_outside(True))


def model_arg(func):
    """MODEL, and the option that lets its external data (and --reference's) lie outside its folder."""
    func = click.option("--allow-external-data-outside", is_flag=True, expose_value=False, callback=_allow_outside,
                        help="Read external data files that resolve outside the model's folder (a symlinked folder "
                             "or file); refused by default.")(func)
    return click.argument("model", type=click.Path(dir_okay=False))(func)


out_arg = click.argument("out", type=ModelOutput())
provider_opt = click.option("--provider", type=click.Choice(sorted(PROVIDERS)), default="cpu", show_default=True,
                            help="onnxruntime execution provider.")
output_opt = click.option("--output", "output", default=None, metavar="NAME",
                          help="Tensor to protect/evaluate (default: the first output; logits before a final Softmax).")
labels_opt = click.option("--labels-key", default=None, metavar="KEY", help="Labels array in the .npz (default: y or labels).")
threads_opt = click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
                           help=f"onnxruntime intra-op and BLAS threads (1..{MAX_THREADS}, 4 x the CPUs).")
seed_opt = click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                        help="Seed of every random draw (probes, held-out samples, the random method): the same seed "
                             "and libraries give the same model.")


memory_opt = click.option("--memory-budget", type=str, default="1.5G", show_default=True, metavar="SIZE",
                          callback=lambda c, p, v: parse_size(v),
                          help="Memory one batch of activations and derivatives may hold (4G, 512M, bytes); batches "
                               "are sized from it.")
def parse_batch_axes(ctx, param, values) -> dict[str, int]:
    """('state=1', ...) -> {'state': 1}."""
    axes = {}
    for text in values:
        name, sep, axis = str(text).rpartition("=")
        if not sep or not name or not re.fullmatch(r"\s*[0-9]+\s*", axis):
            raise click.BadParameter(f"{text!r} is not NAME=AXIS (an input name and a non-negative axis, e.g. state=1)")
        if name in axes:
            raise click.BadParameter(f"{name!r} is given twice")
        axes[name] = int(axis)
    return axes


batch_axis_opt = click.option("--batch-axis", "batch_axes", multiple=True, metavar="NAME=AXIS", callback=parse_batch_axes,
                              help="The batch axis of input NAME in the .npz files, or of output NAME, where the model's "
                                   "declared shapes and a run on two samples do not tell it (repeatable; e.g. state=1 for a "
                                   "recurrent state (2, batch, 128)).")
exclude_opt = click.option("--exclude", multiple=True, type=Pattern(), metavar="PATTERN",
                           help="Leave layers matching this node/weight name pattern (repeatable).")
probes_opt = click.option("--probes", type=click.IntRange(1, MAX_PROBES), default=None,
                          help=f"Random projections instead of the exact Jacobian (cheaper with many outputs; at most "
                               f"{MAX_PROBES}).")
outputs_opt = click.option("--output", "output", multiple=True, metavar="NAME",
                           help="Tensor to protect (repeatable: each output counts, its error relative to its own scale) "
                                "[default: every float output; logits before a final Softmax or Sigmoid].")


def split_batch_axes(model, axes: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """``--batch-axis`` values as (those of model inputs, those of outputs)."""
    from onnxprune.io.data import model_inputs

    inputs = {vi.name for vi in model_inputs(model)}
    return ({k: v for k, v in axes.items() if k in inputs}, {k: v for k, v in axes.items() if k not in inputs})


engine_opt = click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True,
                          help="Gradient engine: adjoint (onnx-ad graphs, any onnxruntime), ort-training (the training "
                               "build's gradient builder), auto (ort-training on the training build, else adjoint; "
                               "either falls back to the other for an op it cannot differentiate).")


MAX_WORKERS = 4096


def _ray_address(ctx, param, value):
    if value is not None and not str(value).strip():
        raise click.BadParameter("give the cluster's address (HOST:PORT, or ray://HOST:PORT) or auto")
    return None if value is None else str(value).strip()


def workers_options(func):
    """--workers and --ray: where the statistics are computed (derivatives.shards), one definition for
    every command that collects them."""
    func = click.option("--ray", "ray", default=None, metavar="ADDRESS|auto", callback=_ray_address,
                        help="Compute the statistics on the Ray cluster at ADDRESS (auto: the one `ray start` made on "
                             "this machine), one actor per CPU or per --workers; needs pip install 'onnxprune[ray]'.")(func)
    return click.option("--workers", type=click.IntRange(1, MAX_WORKERS), default=None, metavar="N",
                        help="Compute the statistics on N worker processes, shard by shard (with --ray: N Ray actors); "
                             "the same seed gives the same model with any N.")(func)


def parse_widths(text: str) -> tuple[int, ...]:
    """Hidden layer widths from text like "64,64" (an InputError, one line, for anything else)."""
    try:
        widths = tuple(int(w) for w in text.replace(" ", "").split(",") if w)
    except ValueError:
        raise InputError(f"expected comma-separated layer widths like 64,64, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise InputError(f"layer widths must be positive, got {text!r}")
    return widths
