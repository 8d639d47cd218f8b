"""Plots of error against temperature (PNG, written atomically) and small markdown helpers."""
from __future__ import annotations

from pathlib import Path

from onnxprune.errors import InputError
from onnxprune.io.files import write_with


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plots need matplotlib: pip install 'onnxprune[plot]'") from None
    return plt


def plot_curves(path: str | Path, curves: list[tuple[str, dict]], title: str = "",
                markers: dict[str, float] | None = None, ylabel: str = "test error") -> None:
    """Error vs T (log axis) for one or more curves from ``temperature_curve``; dotted lines for the
    best single member (T -> 0) and dashed for the uniform average (T -> inf) of each curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for i, (label, curve) in enumerate(curves):
        color = f"C{i % 10}"
        ax.semilogx(curve["temperatures"], curve["error"], "-", color=color, lw=1.6, label=label)
        if "best_member" in curve:
            ax.axhline(curve["best_member"]["error"], color=color, ls=":", lw=1)
        if "uniform" in curve:
            ax.axhline(curve["uniform"]["error"], color=color, ls="--", lw=1)
        if "optimum" in curve:
            ax.plot([curve["optimum"]["temperature"]], [curve["optimum"]["error"]], "o", color=color, ms=4)
    for j, (name, t) in enumerate((markers or {}).items()):
        if t and t > 0:
            ax.axvline(t, color="0.3", ls=["-.", ":", "--"][j % 3], lw=1, label=name)
    ax.set_xlabel("temperature T")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Gibbs ensemble: error vs temperature", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    handles, labels = ax.get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], color="0.4", ls=":", lw=1), Line2D([], [], color="0.4", ls="--", lw=1)]
    labels += ["best member (T->0)", "uniform (T->inf)"]
    ax.legend(handles, labels, fontsize=7, loc="best")
    fig.tight_layout()
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
