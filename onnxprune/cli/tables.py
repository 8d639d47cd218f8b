"""Human-readable tables for the CLI (JSON reports are the API's dicts as they are)."""
from __future__ import annotations

from onnxprune.pipeline import PruneResult


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


def prune_table(result: PruneResult) -> str:
    rows = [[c.layer, c.weights, c.pruned, f"{100 * c.pruned / c.weights:.1f}%", c.max_bias_shift]
            for c in result.layers]
    rows.append(["total", result.weights, result.pruned, f"{100 * result.sparsity:.1f}%",
                 max((c.max_bias_shift for c in result.layers), default=0.0)])
    return table(["layer", "weights", "pruned", "sparsity", "largest bias shift"], rows)


def skipped_table(skipped: list[dict]) -> str:
    rows = [[s.get("node", s.get("layer")), s["op"], s["reason"]] for s in skipped]
    return table(["node", "op", "why it is not pruned"], rows, right=set())


def unpruned_table(weights: list[dict]) -> str:
    return table(["weight", "read by", "why it is not pruned"], [[w["node"], w["op"], w["reason"]] for w in weights],
                 right=set())


def evaluation_table(reports: dict[str, dict]) -> str:
    """Metrics side by side, one column per evaluated model (e.g. original / pruned): quality,
    size on disk, and latency per sample (median and min-max of the repeated timings)."""
    names = list(reports)
    metrics = [("loss", "loss"), ("accuracy", "accuracy"), ("mse", "mse vs reference"),
               ("max_abs", "max abs vs reference")]
    rows = [[label] + [reports[n].get(key) for n in names] for key, label in metrics
            if any(key in reports[n] for n in names)]
    rows.append(["bytes"] + [reports[n].get("size", {}).get("bytes") for n in names])
    rows.append(["zlib bytes"] + [reports[n].get("size", {}).get("zlib_bytes") for n in names])
    for i, batch in enumerate(next((r["latency"]["batches"] for r in reports.values() if "latency" in r), [])):
        label = f"µs/sample, batch {batch['batch_size']}"
        cells = [_latency(reports[n]["latency"]["batches"][i].get("model")) if "latency" in reports[n] else None
                 for n in names]
        rows.append([label + " (median, min-max)"] + cells)
        ratios = [_ratio(reports[n]["latency"]["batches"][i].get("ratio")) if "latency" in reports[n] else None
                  for n in names]
        if any(ratios):
            rows.append([f"time vs reference (paired), batch {batch['batch_size']}"] + ratios)
    return table(["metric"] + names, rows)


def _ratio(ratio: dict | None) -> str | None:
    """A paired time ratio: its median, and its quartiles when they spread (noisy)."""
    if ratio is None:
        return None
    text = f"{ratio['median']:.2f}x"
    return text + f" (noisy: {ratio['q25']:.2f}-{ratio['q75']:.2f})" if ratio.get("noisy") else text


def _latency(entry: dict | None) -> str | None:
    if entry is None:
        return None
    return f"{entry['median_us']:.3g} ({entry['min_us']:.3g}-{entry['max_us']:.3g})"


def sensitivity_table(report: dict) -> str:
    """One row per ratio of a dry run: the fraction reached, what it cost, and what was measured."""
    measured = report.get("dense") is not None
    units = report.get("mode") == "units"
    headers = ["ratio", "units removed" if units else "sparsity", "pruned"]
    headers += ["MACs removed", "time / dense"] if units else ["score sum"]
    if measured:
        headers += ["output error", "loss", "accuracy", "loss change"]
    if report.get("max_loss_increase") is not None:
        headers.append("within budget")
    rows = []
    if measured:
        dense = report["dense"]
        rows.append(["dense", "0.0%", 0] + (["0.0%", "1.00x"] if units else [0.0]) + [0.0, dense.get("loss"),
                    _percent(dense.get("accuracy")), "-"] + (["-"] if report.get("max_loss_increase") is not None else []))
    for p in report["points"]:
        row = [f"{p['ratio']:g}", f"{100 * p['sparsity']:.1f}%", p["pruned"]]
        row += [_percent(p["macs_removed"]), f"{p['time_ratio']:.2f}x"] if units else [p["score_sum"]]
        if measured:
            change = p.get("loss_increase")
            row += [p["output_error"], p["loss"], _percent(p["accuracy"]),
                    None if change is None else f"{100 * change:+.2f}%"]
        if report.get("max_loss_increase") is not None:
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


def _percent(value) -> str | None:
    return None if value is None else f"{100 * value:.2f}%"


# --- structured pruning (prune --structured, inspect's unit groups) -------------------------------

def structured_table(report: dict) -> str:
    """Per layer: units out/in before -> after, parameters, MACs and bytes; then the totals."""
    rows = [[r["layer"], f"{r['out_before']} -> {r['out_after']}", f"{r['in_before']} -> {r['in_after']}",
             r["params_before"], r["params_after"], r["macs_before"], r["macs_after"], r["bytes_before"], r["bytes_after"]]
            for r in report["layers"]]
    rows.append(["total", f"{report['units_before']} -> {report['units_after']} units", "",
                 report["params_before"], report["params_after"], report["macs_before"], report["macs_after"],
                 sum(r["bytes_before"] for r in report["layers"]), sum(r["bytes_after"] for r in report["layers"])])
    return table(["layer", "outputs", "inputs", "params", "params after", "MACs", "MACs after", "bytes",
                  "bytes after"], rows)


def timing_table(latency: dict) -> str:
    """The paired timer's report: per batch and thread setting, each model's median time per sample
    and the ratio of the second to the first (quartiles when noisy)."""
    first, second = latency["models"]
    rows = [[t["batch_size"], t["threads"] or "default", _latency(t[first]), _latency(t[second]), _ratio(t["ratio"]),
             f"{latency['repeats']} x {t['runs_per_timing']}"] for t in latency["batches"]]
    return table(["batch", "threads", f"{first} µs/sample", f"{second} µs/sample", f"time {second}/{first}",
                  "paired repeats x runs"], rows)


def units_table(units: dict) -> str:
    """inspect: the unit groups found and the layers whose units cannot be removed, with why."""
    rows = [[g["group"], g["units"], ", ".join(g["consumers"]), " -> ".join(g["path"]) or "-"] for g in units["groups"]]
    text = table(["unit group (producer)", "units", "consumers", "through"], rows, right={1})
    if units["rejected"]:
        text += "\n\n" + table(["layer", "op", "why its units are not removable"],
                               [[r["layer"], r["op"], r["reason"]] for r in units["rejected"]], right=set())
    return text
