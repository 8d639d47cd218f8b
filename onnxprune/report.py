"""Human-readable tables for the CLI (JSON reports are the API's dicts as they are)."""
from __future__ import annotations

from .api import PruneResult


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
            for c in result.changes]
    rows.append(["total", result.weights, result.pruned, f"{100 * result.sparsity:.1f}%",
                 max((c.max_bias_shift for c in result.changes), default=0.0)])
    return table(["layer", "weights", "pruned", "sparsity", "largest bias shift"], rows)


def skipped_table(skipped: list[dict]) -> str:
    return table(["node", "op", "why it is not pruned"], [[s["node"], s["op"], s["reason"]] for s in skipped], right=set())


def evaluation_table(reports: dict[str, dict]) -> str:
    """Metrics side by side, one column per evaluated model (e.g. original / pruned)."""
    names = list(reports)
    metrics = [("loss", "loss"), ("accuracy", "accuracy"), ("mse", "mse vs reference"),
               ("max_abs", "max abs vs reference"), ("latency_us_per_sample", "latency µs/sample")]
    rows = [[label] + [reports[n].get(key) for n in names] for key, label in metrics
            if any(key in reports[n] for n in names)]
    return table(["metric"] + names, rows)


def sensitivity_table(report: dict) -> str:
    """One row per ratio of a dry run: sparsity reached, score sum, and what was measured."""
    measured = report.get("dense") is not None
    headers = ["ratio", "sparsity", "pruned", "score sum"]
    if measured:
        headers += ["output error", "loss", "accuracy", "loss change"]
    if report.get("max_loss_increase") is not None:
        headers.append("within budget")
    rows = []
    if measured:
        dense = report["dense"]
        rows.append(["dense", "0.0%", 0, 0.0, 0.0, dense.get("loss"), _percent(dense.get("accuracy")), "-"]
                    + (["-"] if report.get("max_loss_increase") is not None else []))
    for p in report["points"]:
        row = [f"{p['ratio']:g}", f"{100 * p['sparsity']:.1f}%", p["pruned"], p["score_sum"]]
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
