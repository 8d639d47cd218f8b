"""``onnxprune inspect``: what onnxprune can and cannot prune in a model, and why."""
from __future__ import annotations

import click

from onnxprune import api
from onnxprune.cli.options import model_arg
from onnxprune.cli.tables import skipped_table, table, units_table, unpruned_table
from onnxprune.cli.ui import command_errors, common, finish, json_option, make_ui, print_json, stage_json


@click.command()
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
    if report["layers"]:
        patterned = any(r["pattern"] for r in report["layers"])  # N:M sparsity (prune --pattern)
        ui.out(table(["layer", "op", "weight", "shape", "weights", "sparsity"] + ["pattern"] * patterned,
                     [[r["layer"], r["op"], r["weight"], "x".join(map(str, r["shape"])), r["weights"],
                       f"{100 * r['sparsity']:.1f}%"] + [r["pattern"]] * patterned for r in report["layers"]],
                     right={4, 5}))
    else:
        ui.out("prunable layers: none")
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
    ui.out()
    ui.out(totals_line(report))
    print_json(json_path, report)


def totals_line(report: dict) -> str:
    """The answer in one line: how much of the model prune can zero, and what --structured can remove."""
    prunable = sum(r["weights"] for r in report["layers"])
    share = f" ({100 * prunable / report['parameters']:.1f}%)" if report["parameters"] else ""
    groups = report["units"]["groups"]
    units = sum(g["units"] for g in groups)
    return (f"prunable weights: {prunable:,} of {report['parameters']:,} parameters{share} in "
            f"{len(report['layers'])} layer(s); unit groups for --structured: "
            + (f"{len(groups)} ({units:,} units)" if groups else "none"))
