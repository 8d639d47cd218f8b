"""``onnxprune ensemble fit|curve``: a thin click skin over GibbsEnsemble and the ONNX export.

The main CLI registers this group with ``main.add_command(ensemble)``. Errors are one line
(``Error: ...``) with exit code 2 for bad input and 1 for failed checks; outputs are written
atomically (all of a command's outputs or none) and never over an existing file without --force;
-v/-q, --plot and ``--json -`` behave as in the other commands.
"""
from __future__ import annotations

import fractions
import math
import sys
from pathlib import Path

import click
import numpy as np

from onnxprune.cli.options import Fraction, parse_widths
from onnxprune.cli.tables import percent
from onnxprune.cli.ui import Group, command_errors, common, finish, make_ui, print_json, stage_json
from onnxprune.errors import CheckFailed, InputError
from onnxprune.io.files import STDOUT
from onnxprune.io.npz import open_npz
from onnxprune_gibbs.checks import check_features, check_labels, compare_predictions
from onnxprune_gibbs.estimator import ENERGIES, VOTES, GibbsEnsemble
from onnxprune_gibbs.export import input_scale_metadata, run_onnx, to_onnx
from onnxprune_gibbs.gibbs import MAX_GRID
from onnxprune_gibbs.members import ACTIVATIONS, KINDS, MAX_MEMBERS

FEATURE_KEYS = ("x", "X")
LABEL_KEYS = ("y", "labels")
CHECK_SAMPLES = 2000  # training samples the exported graph is checked on (onnxruntime vs numpy)


# -- option values ---------------------------------------------------------------------------------
class Scale(click.ParamType):
    """A positive number, or a fraction like 1/255."""

    name = "scale"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            number = float(fractions.Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            self.fail(f"{value!r} is not a number or a fraction like 1/255", param, ctx)
        with np.errstate(over="ignore", under="ignore"):
            single = np.float32(number)
        if not (math.isfinite(number) and number > 0 and 0 < single < np.inf):
            self.fail(f"{value!r} is not a positive number that float32 holds", param, ctx)
        return number


class Temperature(click.ParamType):
    """auto, std, or a positive number (inf: the uniform average)."""

    name = "temperature"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        text = value.strip().lower()
        if text in ("auto", "std"):
            return text
        try:
            number = float(text)
        except ValueError:
            self.fail(f"{value!r} is not auto, std or a positive number", param, ctx)
        if math.isnan(number) or number <= 0:
            self.fail(f"{value!r} is not positive", param, ctx)
        return number


class LogGrid(click.ParamType):
    """'TMIN:TMAX:NUM' -> a log grid of NUM temperatures from TMIN to TMAX."""

    name = "TMIN:TMAX:NUM"

    def convert(self, value, param, ctx):
        if isinstance(value, np.ndarray):
            return value
        parts = str(value).split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            lo, hi, num = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError:
            self.fail(f"{value!r} does not look like TMIN:TMAX:NUM (e.g. 1e-3:1:31)", param, ctx)
        if not (0 < lo <= hi < math.inf) or not 1 <= num <= MAX_GRID:
            self.fail(f"{value!r} needs 0 < TMIN <= TMAX and 1 <= NUM <= {MAX_GRID:,}", param, ctx)
        return np.logspace(math.log10(lo), math.log10(hi), num)


def array_key(arrays, path: str, given: str | None, defaults: tuple[str, ...], what: str, option: str,
              fallback: str | None = None) -> str:
    """The array named by ``option`` (``given``), else the first of ``defaults`` in the file, else
    ``fallback``."""
    if given:
        if given not in arrays:
            raise InputError(f"{path}: no {what} array {given!r}; found {sorted(arrays)}")
        return given
    found = [k for k in defaults if k in arrays] or ([fallback] if fallback else [])
    if not found:
        names = " or ".join(repr(k) for k in defaults)
        raise InputError(f"{path}: no {what} array {names} (found {sorted(arrays)}); use {option}")
    return found[0]


def load_xy(path: str, features_key: str | None, labels_key: str | None, scale: float | None,
            n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32, flattened to (N, d), uint8 times --scale) and int64 labels from an .npz
    (only those two members are decompressed)."""
    arrays = open_npz(path)
    lkey = array_key(arrays, path, labels_key, LABEL_KEYS, "labels", "--labels-key")
    others = [k for k in arrays if k not in LABEL_KEYS]
    fkey = array_key(arrays, path, features_key, FEATURE_KEYS, "features", "--features-key",
                     fallback=others[0] if len(others) == 1 else None)
    raw = arrays[fkey].get().read()
    if raw.dtype == object or raw.dtype.kind not in "biuf":
        raise InputError(f"{path}: features {fkey!r} have dtype {raw.dtype}, not numeric")
    if raw.ndim < 2:
        raise InputError(f"{path}: features {fkey!r} must have a sample axis and feature axes, got shape "
                         f"{list(raw.shape)}")
    if raw.shape[0] == 0:
        raise InputError(f"{path}: features {fkey!r} have no samples")
    raw = raw.reshape(len(raw), -1)
    if raw.dtype == np.uint8:
        if scale is None:
            raise InputError(f"{path}: features {fkey!r} are uint8; pass --scale (e.g. 1/255), which the model records "
                             "for onnxprune evaluate")
        X = raw.astype(np.float32) * np.float32(scale)  # the same arithmetic as onnxprune evaluate
    else:
        if scale is not None:
            raise InputError(f"{path}: --scale applies to uint8 features only, {fkey!r} is {raw.dtype}")
        X = raw
    try:
        X = check_features(X, name=f"{path}: features {fkey!r}")
        y = check_labels(arrays[lkey].get().read(), len(X), n_classes, name=f"{path}: labels {lkey!r}")
    except InputError as exc:
        raise InputError(str(exc)) from None
    return X, y


# -- options shared by fit and curve -----------------------------------------------------------------
def member_options(func):
    options = [
        click.option("--data", required=True, type=click.Path(dir_okay=False),
                     help="Training data (.npz: x/X and y/labels)."),
        click.option("--members", "n_members", type=click.IntRange(1, MAX_MEMBERS), default=1000, show_default=True,
                     help=f"Number of random members N (at most {MAX_MEMBERS:,})."),
        click.option("--kind", type=click.Choice(KINDS), default="perceptron", show_default=True,
                     help="perceptron (random linear) or mlp."),
        click.option("--hidden", default="64", metavar="W1,W2", show_default=True,
                     help="Hidden widths of mlp members, e.g. 64 or 64,32."),
        click.option("--activation", type=click.Choice(ACTIVATIONS), default="tanh", show_default=True,
                     help="Hidden activation of mlp members."),
        click.option("--weight-scale", type=float, metavar="X", default=1.0, show_default=True,
                     help="Multiplier of the N(0, gain^2/fan_in) weight std."),
        click.option("--bias-scale", type=float, metavar="STD", default=0.0, show_default=True,
                     help="Std of the biases (0: none)."),
        click.option("--center/--no-center", default=False, show_default=True,
                     help="Subtract the training mean inside the model (hyperplanes through the data centre)."),
        click.option("--energy", type=click.Choice(ENERGIES), default="zero-one", show_default=True,
                     help="Per-sample mean training loss of a member."),
        click.option("--vote", type=click.Choice(VOTES), default="hard", show_default=True,
                     help="hard (weighted votes) or soft (weighted probabilities)."),
        click.option("--temperature", type=Temperature(), default="auto", show_default=True,
                     help="auto (validation split, log grid), std (T = std of the energies) or a positive value."),
        click.option("--temperature-grid", type=LogGrid(), default=None, help="Validation grid TMIN:TMAX:NUM "
                                                                              "(default: +-2 decades around std(E))."),
        click.option("--validation-fraction", type=Fraction(), default=0.25, show_default=True,
                     help="Share of the training data held out to choose T (0.25 or 25%)."),
        click.option("--classes", "n_classes", type=click.IntRange(min=2), default=None, help="Number of classes "
                                                                                              "(default: max label + "
                                                                                              "1)."),
        click.option("--scale", type=Scale(), default=None, help="Multiply uint8 features by this (e.g. 1/255); "
                                                                 "recorded in the model."),
        click.option("--features-key", default=None, metavar="KEY", help="Array name of the features (default x or X)."),
        click.option("--labels-key", default=None, metavar="KEY", help="Array name of the labels (default y or labels)."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the member "
                                                                                              "generator."),
        click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True, help="Samples per "
                                                                                                       "chunk."),
        click.option("--force", is_flag=True, help="Replace existing output files."),
    ]
    for option in reversed(options):
        func = option(func)
    return common(func)


def _make_estimator(kw: dict) -> GibbsEnsemble:
    return GibbsEnsemble(
        n_members=kw["n_members"], kind=kw["kind"], hidden=parse_widths(kw["hidden"]), activation=kw["activation"],
        weight_scale=kw["weight_scale"], bias_scale=kw["bias_scale"], center=kw["center"], energy=kw["energy"],
        vote=kw["vote"], temperature=kw["temperature"], temperature_grid=kw["temperature_grid"],
        validation_fraction=kw["validation_fraction"], n_classes=kw["n_classes"], batch_size=kw["batch_size"],
        random_state=kw["seed"], progress=sys.stderr.isatty())


def _describe(est: GibbsEnsemble) -> str:
    s = est.summary()
    return (f"{s['members']} {s['kind']} members, {s['classes']} classes, {s['features']} features; "
            f"T = {s['temperature']:.4g} ({s['temperature_rule']}), std(E) = {s['temperature_std']:.4g}, "
            f"effective size {s['effective_size']:.1f}, min energy {s['energy_min']:.4f}")


@click.group("ensemble", cls=Group)
def ensemble():
    """Gibbs-weighted ensembles of random classifiers, exported as one ONNX graph."""


@ensemble.command("fit")
@member_options
@click.option("--drop-below", type=Fraction(), default=None,
              help="Drop members whose Gibbs weight is below this; prints how many remain and how many "
                   "training predictions change.")
@click.option("--json", "json_path", default=None, metavar="PATH",
              help="Also write a JSON summary (temperature, effective size, validation curve, drop report; '-' for "
                   "stdout).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Draw the validation curve of --temperature auto to this PNG (needs matplotlib).")
@click.argument("out", type=click.Path(dir_okay=False))
@command_errors
def fit(out, drop_below, json_path, plot_path, verbose, quiet, **kw):
    """Fit a Gibbs ensemble on --data and write it as one ONNX graph to OUT (.onnx)."""
    ui = make_ui(verbose, quiet, json_path)
    if plot_path and kw["temperature"] != "auto":
        raise InputError("--plot draws the validation curve, which only --temperature auto computes")
    with ui.outputs([kw["data"]], kw["force"]) as outputs:
        for path in (out, None if json_path == STDOUT else json_path, plot_path):
            if path:
                outputs.claim(path)
        scale = kw["scale"]
        est = _make_estimator(kw)
        X, y = load_xy(kw["data"], kw["features_key"], kw["labels_key"], scale, kw["n_classes"])
        est.fit(X, y)
        ui.info(_describe(est))
        report = {"data": str(kw["data"]), "model": str(out), "summary": est.summary(),
                  "validation_curve": est.validation_curve_}
        final = est
        if drop_below is not None:
            final = est.drop_members(drop_below)
            change = compare_predictions(est, final, X)
            report["drop"] = {**final.dropped_, **change}
        model = to_onnx(final, metadata=input_scale_metadata(scale))
        n = min(len(X), CHECK_SAMPLES)
        _, labels = run_onnx(model, X[:n], batch_size=min(256, est.batch_size))
        mismatch = int(np.sum(labels != final.predict(X[:n])))
        if mismatch:
            raise CheckFailed(f"the exported graph disagrees with the estimator on {mismatch} of {n} training samples")
        ui.info(f"onnxruntime check: predictions equal the estimator's on {n} training samples")
        report["onnx_check"] = {"samples": n, "mismatches": mismatch}
        data = model.SerializeToString()
        outputs.stage(out, lambda tmp: tmp.write_bytes(data))
        if plot_path:
            from onnxprune_gibbs.report import plot_curves

            outputs.stage(plot_path, lambda tmp: plot_curves(tmp, [("validation split", est.validation_curve_)],
                                                             f"{est.members_.n_members} random {est.kind} members: "
                                                             "validation error", {f"fitted T = {est.temperature_:.3g}":
                                                                                   est.temperature_},
                                                             ylabel="validation error"))
        stage_json(outputs, json_path, report)
    finish(ui, outputs)
    ui.out(fit_summary(est, report, len(data), out))
    if drop_below is not None:
        d = report["drop"]
        ui.out(f"kept {d['members_kept']} of {d['members_total']} members (weight >= {drop_below:g}; "
               f"weight dropped {d['weight_dropped']:.3g}); predictions changed on {d['predictions_changed']} "
               f"of {d['samples']} training samples ({100 * d['fraction_changed']:.2f}%)")
    print_json(json_path, report)


def fit_summary(est: GibbsEnsemble, report: dict, model_bytes: int, out: str) -> str:
    """What ``ensemble fit`` did, in three lines: the temperature and how it was chosen, how many
    members count, the validation error at that temperature, and the model written."""
    s = est.summary()
    rule = {"auto": "chosen on a validation split", "std": "the std of the members' energies"}.get(
        s["temperature_rule"], "given")
    std = "" if s["temperature_rule"] == "std" else f"; std of the energies {s['temperature_std']:.4g}"
    lines = [f"temperature T = {s['temperature']:.4g} ({rule}{std})",
             f"effective members: {s['effective_size']:.1f} of {s['members']} ({s['kind']}, {s['classes']} classes, "
             f"{s['features']} features)"]
    curve = est.validation_curve_
    if curve is not None:
        at = curve["temperatures"].index(s["temperature"]) if s["temperature"] in curve["temperatures"] else None
        error = "-" if at is None else percent(curve["error"][at])
        lines.append(f"validation error at T: {error} on {curve['n_validation']:,} held-out training samples")
    else:
        lines.append("validation error: none measured (only --temperature auto holds out a validation split)")
    lines.append(f"wrote {out}: {model_bytes:,} bytes")
    return "\n".join(lines)


@ensemble.command("curve")
@member_options
@click.option("--eval", "eval_path", default=None, type=click.Path(dir_okay=False),
              help="Data the curve is measured on (default: a held-out --holdout fraction of --data).")
@click.option("--holdout", type=Fraction(), default=0.25, show_default=True,
              help="Without --eval: the fraction of --data held out for the curve (energies use the rest).")
@click.option("--temperatures", "grid", type=LogGrid(), default=None, help="Curve grid TMIN:TMAX:NUM (default: +-2 "
                                                                           "decades around std(E)).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="The plot (default: OUT with the suffix .png; none when OUT is '-').")
@click.option("--png", "png_alias", default=None, type=click.Path(dir_okay=False), hidden=True)
@click.argument("out")
@command_errors
def curve(out, eval_path, holdout, grid, plot_path, png_alias, verbose, quiet, **kw):
    """Error, loss and effective size against T (JSON to OUT, '-' for stdout; plot to --plot), with T->0 and T->inf."""
    ui = make_ui(verbose, quiet, out)
    plot_path = plot_path or png_alias or (None if out == STDOUT else str(Path(out).with_suffix(".png")))
    with ui.outputs([kw["data"], eval_path], kw["force"]) as outputs:
        for path in (None if out == STDOUT else out, plot_path):
            if path:
                outputs.claim(path)
        scale = kw["scale"]
        est = _make_estimator(kw)
        X, y = load_xy(kw["data"], kw["features_key"], kw["labels_key"], scale, kw["n_classes"])
        if eval_path:
            Xe, ye = load_xy(eval_path, kw["features_key"], kw["labels_key"], scale)
            source = str(eval_path)
        else:
            if not (0 < holdout < 1):
                raise InputError(f"--holdout must be between 0 and 1, got {holdout}")
            n_hold = int(round(holdout * len(X)))
            if n_hold < 1 or n_hold >= len(X):
                raise InputError(f"--holdout {holdout} of {len(X)} samples leaves an empty part; pass --eval")
            order = np.random.default_rng(np.random.SeedSequence([kw["seed"], 2])).permutation(len(X))
            Xe, ye = X[order[:n_hold]], y[order[:n_hold]]
            X, y = X[order[n_hold:]], y[order[n_hold:]]
            source = f"{kw['data']} (held-out {n_hold} samples)"
        est.fit(X, y)
        if Xe.shape[1] != X.shape[1]:
            raise InputError(f"{eval_path}: {Xe.shape[1]} features, the training data have {X.shape[1]}")
        if ye.max() >= est.n_classes_:
            raise InputError(f"{eval_path}: label {ye.max()} is beyond the {est.n_classes_} training classes")
        ui.info(_describe(est))
        result = est.temperature_curve(Xe, ye, grid)
        report = {"data": str(kw["data"]), "eval": source, "summary": est.summary(), "curve": result,
                  "validation_curve": est.validation_curve_}
        if plot_path:
            from onnxprune_gibbs.report import plot_curves

            title = (f"{est.members_.n_members} random {est.kind} members, {est.energy} energy, {est.vote} votes\n"
                     f"error on {source}")
            markers = {f"T = std(E) = {est.temperature_std_:.3g}": est.temperature_std_,
                       f"fitted T ({est.temperature}) = {est.temperature_:.3g}": est.temperature_}
            outputs.stage(plot_path, lambda tmp: plot_curves(tmp, [("Gibbs ensemble", result)], title, markers=markers))
        stage_json(outputs, out, report)
    finish(ui, outputs)
    ui.out(curve_summary(result, source, out, plot_path))
    print_json(out, report)


def curve_summary(result: dict, source: str, out: str, plot_path: str | None) -> str:
    """What ``ensemble curve`` found: the optimum temperature and its error against the two limits."""
    best, uniform, opt = result["best_member"], result["uniform"], result.get("optimum")
    lines = [(f"optimum: T = {opt['temperature']:.4g}, error {percent(opt['error'])}, effective members "
              f"{opt['effective_size']:.1f}" if opt else "optimum: none (no finite temperature on the grid)")
             + f" (on {source})",
             f"limits: best single member (T -> 0) error {percent(best['error'])}; uniform average (T -> inf) "
             f"error {percent(uniform['error'])}"]
    written = [p for p in (None if out == STDOUT else out, plot_path) if p]
    if written:
        lines.append("wrote " + ", ".join(written))
    return "\n".join(lines)
