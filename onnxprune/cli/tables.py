"""Human-readable tables for the CLI (JSON reports are the API's dicts as they are)."""
from __future__ import annotations

from onnxprune.check.timing import NOISY_SPREAD
from onnxprune.pipeline import PruneResult

NOISY_NOTE = (f"noisy: the quartiles of the paired ratios (unpaired: of the timings) lie more than {NOISY_SPREAD:g}x apart; "
              "the machine was busy and the median may be far off: rerun on a quiet machine before trusting it")
FLOAT16_MAX = 65504.0
UNSTRUCTURED_NOTE = ("The zeros keep the file's size and onnxruntime's speed (dense kernels); for a smaller and faster "
                     "model remove whole neurons and channels: prune --structured.")


def table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """A plain-text table; columns in ``right`` (default: all but the first) are right-aligned."""
    right = set(range(1, len(headers))) if right is None else right
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _fmt(value) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def three_digits(value: float) -> str:
    """A positive number in three significant digits, never in scientific notation."""
    return f"{value:.0f}" if value >= 99.95 else f"{value:.1f}" if value >= 9.995 else f"{value:.2f}"


def time_unit(seconds: list[float]) -> tuple[str, float]:
    """One unit for a row of durations, chosen by the largest: µs, ms or s, and its scale from seconds."""
    largest = max(seconds, default=0.0)
    if largest >= 0.9995:
        return "s", 1.0
    return ("ms", 1e3) if largest >= 0.9995e-3 else ("µs", 1e6)


def duration(seconds: float, unit: tuple[str, float]) -> str:
    return f"{three_digits(seconds * unit[1])} {unit[0]}"


def percent(fraction: float | None) -> str | None:
    """Accuracy and other shares: always a percentage, two decimals."""
    return None if fraction is None else f"{100 * fraction:.2f}%"


def prune_table(result: PruneResult) -> str:
    """Per layer the weights pruned and the largest bias shift, absolute and as a multiple of the dense
    bias's largest entry; a note for a written bias beyond float16's range."""
    rows = [[c.layer, c.weights, c.pruned, f"{100 * c.pruned / c.weights:.1f}%", c.max_bias_shift,
             _times(c.relative_bias_shift)] for c in result.layers]
    relative = [c.relative_bias_shift for c in result.layers if c.relative_bias_shift is not None]
    rows.append(["total", result.weights, result.pruned, f"{100 * result.sparsity:.1f}%",
                 max((c.max_bias_shift for c in result.layers), default=0.0), _times(max(relative, default=None))])
    text = table(["layer", "weights", "pruned", "sparsity", "largest bias shift", "x dense bias"], rows)
    pattern = result.summary.get("pattern")
    if pattern:
        n, m = pattern.split(":")
        text += f"\npattern {pattern}: at most {n} nonzero weights in every {m} consecutive inputs of each row"
    beyond = [c for c in result.layers if c.max_bias > FLOAT16_MAX]
    if beyond:
        worst = max(beyond, key=lambda c: c.max_bias)
        text += (f"\n{len(beyond)} layer(s) write a bias beyond float16's range ({FLOAT16_MAX:,.0f}; {worst.layer}: "
                 f"{worst.max_bias:,.0f}): a float16 copy of this model overflows")
    return text + "\n" + UNSTRUCTURED_NOTE


def _times(ratio: float | None) -> str | None:
    return None if ratio is None else f"{ratio:.3g}x"


def skipped_table(skipped: list[dict]) -> str:
    rows = [[s["node"], s["op"], s["reason"]] for s in skipped]
    return table(["node", "op", "why it is not pruned"], rows, right=set())


def unpruned_table(weights: list[dict]) -> str:
    return table(["weight", "read by", "why it is not pruned"], [[w["node"], w["op"], w["reason"]] for w in weights],
                 right=set())


def evaluation_table(reports: dict[str, dict]) -> str:
    """Metrics side by side, one column per evaluated model (e.g. original / pruned): quality, size
    on disk, and time per sample (median and quartiles of the repeated timings, in one unit per row);
    a timing whose quartiles spread widely is marked noisy, with a note under the table."""
    names = list(reports)
    rows = [["loss"] + [reports[n].get("loss") for n in names]] if any("loss" in reports[n] for n in names) else []
    if any("accuracy" in reports[n] for n in names):
        rows.append(["accuracy"] + [percent(reports[n].get("accuracy")) for n in names])
    if any("relative_error" in reports[n] for n in names):
        rows.append(["relative output error vs reference"] + [reports[n].get("relative_error") for n in names])
        rows += _part_rows(reports, names)
    for key, label in (("mse", "mse vs reference"), ("max_abs", "max abs vs reference")):
        if any(key in reports[n] for n in names):
            rows.append([label] + [reports[n].get(key) for n in names])
    rows.append(["bytes"] + [reports[n].get("size", {}).get("bytes") for n in names])
    rows.append(["bytes, zlib-compressed"] + [reports[n].get("size", {}).get("zlib_bytes") for n in names])
    noisy = False
    timed = [n for n in names if "latency" in reports[n]]
    for i, batch in enumerate(reports[timed[0]]["latency"]["batches"] if timed else []):
        entries = {n: reports[n]["latency"]["batches"][i] for n in timed}
        models = {n: e["model"] for n, e in entries.items() if e.get("model")}
        unit = time_unit([m["median_us"] / 1e6 for m in models.values()])
        rows.append([f"time per sample, batch {batch['batch_size']} (median, quartiles)"]
                    + [_time(models.get(n), unit) for n in names])
        ratios = [_ratio(entries[n].get("ratio")) if n in entries else None for n in names]
        if any(ratios):
            rows.append([f"time vs reference (paired), batch {batch['batch_size']}"] + ratios)
        noisy = noisy or any((e["ratio"] if "ratio" in e else e["model"])["noisy"] for e in entries.values())
    text = table(["metric"] + names, rows)
    return text + "\n" + NOISY_NOTE if noisy else text


def _part_rows(reports: dict[str, dict], names: list[str]) -> list[list]:
    """One row per output and part compared, where there are several (the worst is the row above)."""
    parts = {row["part"]: None for n in names for row in reports[n].get("output_errors") or []}
    if len(parts) < 2:
        return []
    errors = {n: {row["part"]: row["relative_error"] for row in reports[n].get("output_errors") or []} for n in names}
    return [[f"  {part}"] + [errors[n].get(part) for n in names] for part in parts]


def error_table(error: dict, where: str) -> str:
    """The relative output error per protected output and part (``check.relative``), and the values
    that stopped varying."""
    rows = [[row["part"], row["source"] or "", row["elements"], row["relative_error"], row["stopped_varying"]]
            for row in error["parts"]]
    return table([f"output (relative error on the {where} data)", "from", "values", "relative error", "no longer vary"],
                 rows, right={2, 3, 4})


def _time(timing: dict | None, unit: tuple[str, float]) -> str | None:
    """A model's median time per sample with its quartiles, in ``unit``."""
    if timing is None:
        return None
    q25, q75 = (three_digits(timing[k] / 1e6 * unit[1]) for k in ("q25_us", "q75_us"))
    return f"{duration(timing['median_us'] / 1e6, unit)} ({q25}-{q75})"


def _ratio(ratio: dict | None) -> str | None:
    """A paired time ratio: its median and quartiles, marked when noisy."""
    if ratio is None:
        return None
    return f"{ratio['median']:.2f}x ({ratio['q25']:.2f}-{ratio['q75']:.2f})" + (" noisy" if ratio["noisy"] else "")


def sensitivity_table(report: dict) -> str:
    """One row per ratio of a dry run: the fraction reached, what it cost, and what was measured."""
    measured = report.get("dense") is not None
    units = report.get("mode") == "units"
    budgeted = any(report.get(k) is not None for k in ("max_loss_increase", "max_accuracy_drop", "max_output_error"))
    headers = ["ratio", "units removed" if units else "sparsity", "pruned"]
    headers += ["MACs removed", "time / dense"] if units else ["score sum"]
    headers.append("relative error, calibration")
    if measured:
        headers += ["relative error, test", "loss", "accuracy", "loss change"]
    if budgeted:
        headers.append("within budget")
    rows = []
    if measured:
        dense = report["dense"]
        rows.append(["dense", "0.0%", 0] + (["0.00%", "1.00x"] if units else [0.0]) + [0.0, 0.0, dense.get("loss"),
                    percent(dense.get("accuracy")), "-"] + (["-"] if budgeted else []))
    for p in report["points"]:
        row = [f"{p['ratio']:g}", f"{100 * p['sparsity']:.1f}%", p["pruned"]]
        row += [percent(p["macs_removed"]), f"{p['time_ratio']:.2f}x"] if units else [p["score_sum"]]
        row.append(p.get("calibration_error"))
        if measured:
            change = p.get("loss_increase")
            row += [p["output_error"], p["loss"], percent(p["accuracy"]),
                    None if change is None else f"{100 * change:+.2f}%"]
        if budgeted:
            row.append("yes" if p["within_budget"] else "no")
        rows.append(row)
    return table(headers, rows)


def storage_table(storage: dict) -> str:
    """Bytes of the pruned model stored dense and sparse, raw and zlib-compressed."""
    dense, sparse = storage["dense_bytes"], storage["sparse_bytes"]
    rows = [["dense", dense, storage["dense_zlib_bytes"], "1.00x"],
            ["sparse (COO, int64 indices)", sparse, storage["sparse_zlib_bytes"], f"{sparse / dense:.2f}x"]]
    text = table(["storage", "bytes", "zlib bytes", "raw vs dense"], rows)
    return text + f"\nwritten: {storage['storage']}, {storage['written_bytes']:,} bytes " \
                  f"({len(storage['sparse_tensors'])} tensor(s) stored sparse; onnxruntime expands them to dense at load)"


# --- structured pruning (prune --structured, inspect's unit groups) -------------------------------

def structured_table(report: dict) -> str:
    """Per layer: units out/in before -> after, parameters and MACs; then the totals (the file's size
    is the written model's, printed once)."""
    rows = [[r["layer"], f"{r['out_before']} -> {r['out_after']}", f"{r['in_before']} -> {r['in_after']}",
             r["params_before"], r["params_after"], r["macs_before"], r["macs_after"]] for r in report["layers"]]
    rows.append(["total", f"{report['units_before']} -> {report['units_after']} units", "",
                 report["params_before"], report["params_after"], report["macs_before"], report["macs_after"]])
    return table(["layer", "outputs", "inputs", "params", "params after", "MACs", "MACs after"], rows)


def timing_table(latency: dict) -> str:
    """The paired timer's report: per batch size and thread setting, each model's median time per
    sample (quartiles) and the median of the paired ratios second/first with their quartiles (wide
    quartiles: the machine was busy, and the row is marked noisy)."""
    first, second = latency["models"]
    rows, noisy = [], False
    for t in latency["batches"]:
        unit = time_unit([t[first]["median_us"] / 1e6, t[second]["median_us"] / 1e6])
        noisy = noisy or t["ratio"]["noisy"]
        rows.append([t["batch_size"], t["threads"] or "default", _time(t[first], unit), _time(t[second], unit),
                     _ratio(t["ratio"]), f"{latency['repeats']} x {t['runs_per_timing']}"])
    text = table(["batch", "threads", f"{first} per sample", f"{second} per sample", f"time {second}/{first} (paired)",
                  "paired repeats x runs"], rows)
    return text + "\n" + NOISY_NOTE if noisy else text


def units_table(units: dict) -> str:
    """inspect: the unit groups found ("none" when there are none) and the layers whose units cannot be
    removed, with why."""
    if units["groups"]:
        rows = [[g["group"], g["units"], ", ".join(g["consumers"]), " -> ".join(g["path"]) or "-"]
                for g in units["groups"]]
        text = table(["unit group (producer)", "units", "consumers", "through"], rows, right={1})
    else:
        text = "unit groups: none (prune --structured finds no neuron or channel it can remove)"
    if units["rejected"]:
        text += "\n\n" + table(["layer", "op", "why its units are not removable"],
                               [[r["node"], r["op"], r["reason"]] for r in units["rejected"]], right=set())
    return text
