"""Reproduce the ECP paper's MNIST study: one-shot pruning, then fine-tuning with the mask fixed.

    .venv/bin/python scripts/reproduce_ecp.py --mnist ../shared/data/mnist [--out docs/results/ecp-mnist]
        [--quick] [--jobs 2] [--work DIR] [--seeds 5] [--hidden 32,32 --hidden 64,64] [--methods ecp,...]
        [--calib-size 2048] [--redraw EARLIER.json]

For each architecture and seed: train the dense MLP (PReLU, cross-entropy, Adam, EPOCHS epochs, batch
128) with onnxprune's own training code; score every method once on CALIB seeded training images
(Pruner.fit); for every ratio r prune one-shot, evaluate on the test set, fine-tune EPOCHS epochs with
the mask fixed, evaluate again. The paper's fully-connected baseline is a dense MLP with uniformly
narrower hidden layers and (as near as whole neurons allow) the pruned model's number of non-zero
weights, trained 2 x EPOCHS epochs (the same budget as train + fine-tune). --quick: 1 seed, 3 ratios,
2 epochs. Writes OUT.json (every number), OUT-<architecture>.png (test loss vs r before and after
fine-tuning, mean and min-max over seeds) and the tables between the markers in OUT.md (created if
missing). --work DIR keeps each (architecture, seed) result so an interrupted run resumes; delete it
after changing code. --redraw only redraws the plots and tables of an earlier run. Results do not
depend on --jobs (everything runs on one intra-op thread).
MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

import onnxprune
from onnxprune.check.evaluate import predict
from onnxprune.io import files as fileio
from onnxprune.io.data import as_dataset
from onnxprune.repair.finetune import finetune, zero_masks

from studies.mnist import load_mnist
from studies.provenance import portable_command
from studies.zoo import build_mlp, widths_argument

INPUT_SCALE = np.float32(1 / 255)  # as scripts/train_models.py: seed 0 of 784-64-64-10 is the shipped model
LR, BATCH = 1e-3, 128
RATIOS = (0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
QUICK_RATIOS = (0.5, 0.8, 0.9)
# key: (label, method, compensation)
VARIANTS = {
    "ecp": ("ecp", "ecp", True),
    "ecp-nocomp": ("ecp, no compensation", "ecp", False),
    "nonlinear": ("nonlinear (brute force)", "nonlinear", True),
    "gradmag": ("gradmag", "gradmag", False),
    "magnitude": ("magnitude", "magnitude", False),
    "random": ("random", "random", False),
}
FC = "fully-connected (narrower, 2x epochs)"
BASELINES = ("magnitude", "gradmag", "random")
START, END = "<!-- reproduce_ecp:start -->", "<!-- reproduce_ecp:end -->"


@dataclass(frozen=True)
class Settings:
    """The grid (defaults: the paper's); everything but the seeds must match for --work to reuse a unit."""

    hidden: tuple[tuple[int, ...], ...] = ((32, 32), (64, 64))
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    ratios: tuple[float, ...] = RATIOS
    methods: tuple[str, ...] = tuple(VARIANTS)
    epochs: int = 15
    calib_size: int = 2048


@dataclass
class Data:
    """The study's arrays in memory, already scaled: the API takes dicts of arrays, no .npz needed."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @classmethod
    def mnist(cls, folder) -> Data:
        """Flattened float32 pixels in [0, 1] and int64 labels."""
        def split(name):
            x, y = load_mnist(folder, name)
            return x.reshape(len(x), -1).astype(np.float32) * INPUT_SCALE, y.astype(np.int64)

        return cls(*split("train"), *split("test"))

    @property
    def shape(self) -> tuple[int, int]:
        return self.train_x.shape[1], int(max(self.train_y.max(), self.test_y.max())) + 1


def weight_count(hidden, inputs: int, classes: int) -> int:
    sizes = [inputs, *hidden, classes]
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def narrower(hidden, target: float, inputs: int, classes: int) -> tuple[int, ...]:
    """Hidden widths scaled by one common factor whose weight count is closest to ``target``."""
    top = max(hidden)
    options = {tuple(max(1, round(h * k / top)) for h in hidden) for k in range(1, top + 1)}
    return min(options, key=lambda w: (abs(weight_count(w, inputs, classes) - target), w))


def architecture(hidden, inputs: int, classes: int) -> str:
    return "-".join(map(str, (inputs, *hidden, classes)))


def log(text: str) -> None:
    print(time.strftime("%H:%M:%S ") + text, file=sys.stderr, flush=True)


def scores(model, test) -> dict:
    report = onnxprune.evaluate(model, test, threads=1)
    return {"loss": report["loss"], "accuracy": report["accuracy"]}


def run_unit(hidden: tuple[int, ...], seed: int, settings: Settings, data: Data) -> dict:
    """Everything for one architecture and one seed (the unit of work and of resumption)."""
    inputs, classes = data.shape
    name, began = f"{architecture(hidden, inputs, classes)} seed {seed}", time.perf_counter()
    train = dict(x=data.train_x, y=data.train_y, epochs=settings.epochs, lr=LR, batch_size=BATCH, seed=seed)
    start = time.perf_counter()
    dense, history = finetune(build_mlp(hidden, seed=seed, inputs=inputs, classes=classes), **train)
    unit = {"hidden": list(hidden), "seed": seed, "dense": {"train_seconds": time.perf_counter() - start,
                                                           "train_loss": [h["loss"] for h in history]}}
    test = as_dataset({"x": data.test_x, "y": data.test_y}, dense)
    unit["dense"].update(scores(dense, test))
    start = time.perf_counter()
    longer, _ = finetune(dense, **train)  # r = 0 fine-tuned: what the extra epochs alone do to the test loss
    unit["dense_finetuned"] = {**scores(longer, test), "seconds": time.perf_counter() - start}
    rows = np.sort(np.random.default_rng(seed).choice(len(data.train_x), settings.calib_size, replace=False))
    calib = as_dataset({"x": data.train_x[rows], "y": data.train_y[rows]}, dense)
    # one forward pass over the calibration data, the unit of scoring cost (fastest of 5: the machine is shared)
    unit["forward_pass_seconds"] = min(predict(dense, calib, "logits", batch_size=256, threads=1)[1] for _ in range(5))
    log(f"{name}: dense test loss {unit['dense']['loss']:.4f} ({unit['dense']['train_seconds']:.1f} s), "
        f"{unit['dense_finetuned']['loss']:.4f} after {settings.epochs} more epochs")

    unit["methods"] = {}
    for key in settings.methods:
        _, method, compensation = VARIANTS[key]
        fits = []  # the fit is deterministic: refit the cheap ones and keep the fastest (the machine is shared)
        while len(fits) < 3 and sum(fits) < 5:
            start = time.perf_counter()
            pruner = onnxprune.Pruner(method, compensation=compensation, seed=seed, threads=1).fit(dense, calib)
            fits.append(time.perf_counter() - start)
        scoring = min(fits)
        row = {"scoring_seconds": scoring, "scoring_forward_passes": scoring / unit["forward_pass_seconds"],
               "ratios": {}}
        for r in settings.ratios:
            result = pruner.prune(r)
            start = time.perf_counter()
            tuned, history = finetune(result.model, **train, masks=zero_masks(result.model))
            row["ratios"][str(r)] = {"sparsity": result.sparsity, "before": scores(result.model, test),
                                     "after": scores(tuned, test), "finetune_seconds": time.perf_counter() - start,
                                     "finetune_train_loss": history[-1]["loss"]}
        unit["methods"][key] = row
        log(f"{name}: {key} scored in {scoring:.2f} s; loss before -> after: " + ", ".join(
            f"r={r} {v['before']['loss']:.3f}->{v['after']['loss']:.3f}" for r, v in row["ratios"].items()))

    unit["fully_connected"], trained = {}, {}
    total = weight_count(hidden, inputs, classes)
    for r in settings.ratios:
        widths = narrower(hidden, (1 - r) * total, inputs, classes)
        if widths not in trained:
            start = time.perf_counter()
            model, _ = finetune(build_mlp(widths, seed=seed, inputs=inputs, classes=classes),
                                **{**train, "epochs": 2 * settings.epochs})
            trained[widths] = {"hidden": list(widths), "weights": weight_count(widths, inputs, classes),
                               **scores(model, test), "train_seconds": time.perf_counter() - start}
        unit["fully_connected"][str(r)] = trained[widths]
    unit["seconds"] = time.perf_counter() - began
    log(f"{name}: done in {unit['seconds']:.0f} s")
    return unit


_DATA: Data | None = None


def _init_worker(mnist: str) -> None:
    global _DATA
    _DATA = Data.mnist(mnist)


def _worker(hidden, seed, settings) -> dict:
    return run_unit(hidden, seed, settings, _DATA)


def run_study(settings: Settings, data: Data, mnist: str, jobs: int = 1, work: Path | None = None) -> list[dict]:
    """All units, largest architectures first (better packing on ``jobs`` processes, which load
    MNIST from ``mnist`` themselves), reusing any finished unit stored in ``work`` under the same settings."""
    units = sorted(((h, s) for h in settings.hidden for s in settings.seeds), key=lambda u: (-sum(u[0]), u[1]))
    key = {k: v for k, v in asdict(settings).items() if k != "seeds"}
    done = {}

    def cache(hidden, seed) -> Path | None:
        return work / f"{'-'.join(map(str, hidden))}-seed{seed}.json" if work else None

    for hidden, seed in units:
        path = cache(hidden, seed)
        if path and path.exists():
            stored = json.loads(path.read_text())
            if stored["settings"] == json.loads(json.dumps(key)):
                done[hidden, seed] = stored["unit"]
                log(f"reusing {path}")

    def finish(hidden, seed, unit) -> None:
        done[hidden, seed] = unit
        if work:
            fileio.write_json(cache(hidden, seed), {"settings": key, "unit": unit})

    todo = [u for u in units if u not in done]
    if jobs > 1 and len(todo) > 1:
        context = multiprocessing.get_context("spawn")  # a fresh onnxruntime per process, no forked thread pools
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                                    initargs=(mnist,)) as pool:
            futures = {pool.submit(_worker, h, s, settings): (h, s) for h, s in todo}
            for future in concurrent.futures.as_completed(futures):
                finish(*futures[future], future.result())
    else:
        for hidden, seed in todo:
            finish(hidden, seed, run_unit(hidden, seed, settings, data))
    return [done[u] for u in sorted(done, key=lambda u: (sum(u[0]), u[1]))]


def stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "median": float(np.median(v)),
            "min": float(v.min()), "max": float(v.max()), "n": len(v)}


def summarise(units: list[dict], settings: Settings, inputs: int, classes: int) -> dict:
    """Per architecture: mean, std (ddof 1), median, min, max over seeds of every measured number."""
    out = {}
    for hidden in settings.hidden:
        runs = [u for u in units if tuple(u["hidden"]) == tuple(hidden)]
        arch = {"weights": weight_count(hidden, inputs, classes), "seeds": [u["seed"] for u in runs],
                "dense": {k: stats([u["dense"][k] for u in runs]) for k in ("loss", "accuracy", "train_seconds")},
                "dense_finetuned": {k: stats([u["dense_finetuned"][k] for u in runs]) for k in ("loss", "accuracy")},
                "forward_pass_seconds": stats([u["forward_pass_seconds"] for u in runs]), "methods": {}}
        for key in settings.methods:
            rows = [u["methods"][key] for u in runs]
            arch["methods"][key] = {
                "scoring_seconds": stats([m["scoring_seconds"] for m in rows]),
                "scoring_forward_passes": stats([m["scoring_forward_passes"] for m in rows]),
                "ratios": {str(r): {phase: {k: stats([m["ratios"][str(r)][phase][k] for m in rows])
                                            for k in ("loss", "accuracy")}
                                    for phase in ("before", "after")} for r in settings.ratios}}
        arch["fully_connected"] = {str(r): {"hidden": runs[0]["fully_connected"][str(r)]["hidden"],
                                            "weights": runs[0]["fully_connected"][str(r)]["weights"],
                                            **{k: stats([u["fully_connected"][str(r)][k] for u in runs])
                                               for k in ("loss", "accuracy")}}
                                   for r in settings.ratios}
        out[architecture(hidden, inputs, classes)] = arch
    return out


def wins(units: list[dict], hidden, key: str, baseline: str, r: float, phase: str) -> tuple[int, int]:
    """Seeds on which ``key`` has a lower test loss than ``baseline`` (paired: same dense model)."""
    runs = [u for u in units if tuple(u["hidden"]) == tuple(hidden)]
    better = sum(u["methods"][key]["ratios"][str(r)][phase]["loss"]
                 < u["methods"][baseline]["ratios"][str(r)][phase]["loss"] for u in runs)
    return better, len(runs)


def plot(summary: dict, settings: Settings, test_samples: int, out: Path) -> list[Path]:
    """One PNG per architecture: test loss vs r, before and after fine-tuning, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    colours = dict(zip(VARIANTS, plt.get_cmap("tab10").colors, strict=False))  # more colours than variants
    paths = []
    for arch, s in summary.items():
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))  # own y ranges: fine-tuning compresses the spread
        for ax, phase, title in ((axes[0], "before", "one-shot, before fine-tuning"),
                                 (axes[1], "after", f"after {settings.epochs} epochs of fine-tuning (mask fixed)")):
            curves = [(VARIANTS[k][0], colours[k], "-",
                       [s["methods"][k]["ratios"][str(r)][phase]["loss"] for r in settings.ratios])
                      for k in settings.methods]
            if phase == "after":
                curves.append((FC, "black", "--", [s["fully_connected"][str(r)]["loss"] for r in settings.ratios]))
            for label, colour, style, cells in curves:
                ax.plot(settings.ratios, [c["mean"] for c in cells], style, marker="o", ms=3.5, color=colour,
                        label=label)
                ax.fill_between(settings.ratios, [c["min"] for c in cells], [c["max"] for c in cells], color=colour,
                                alpha=0.15, lw=0)
            ax.axhline(s["dense"]["loss"]["mean"], color="grey", ls=":", label="dense (before pruning)")
            if phase == "after":
                ax.axhline(s["dense_finetuned"]["loss"]["mean"], color="grey", ls="--",
                           label=f"dense + {settings.epochs} more epochs (r = 0 fine-tuned)")
            ax.set(title=title, xlabel="pruning ratio r (fraction of weights removed)", yscale="log",
                   ylabel=f"test loss (mean cross-entropy, {test_samples:,} images)")
            ax.set_xticks(settings.ratios, [f"{r:g}" for r in settings.ratios], rotation=45, fontsize=8)
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
        axes[1].legend(fontsize=8, loc="upper left")
        n = len(s["seeds"])
        fig.suptitle(f"MNIST {arch} ({s['weights']:,} weights), PReLU: mean over {n} seed{'s' * (n > 1)}, band = "
                     "min..max")
        fig.tight_layout()
        path = out.with_name(f"{out.name}-{arch}.png")
        fileio.write_with(path, functools.partial(fig.savefig, dpi=110))
        plt.close(fig)
        paths.append(path)
    return paths


def cell(s: dict) -> str:
    spread = f" ±{s['loss']['std']:.3f}" if s["loss"]["n"] > 1 else ""
    return f"{s['loss']['mean']:.3f}{spread} ({100 * s['accuracy']['mean']:.1f}%)"


def duration(seconds: float) -> str:
    return f"{1e3 * seconds:.2g} ms" if seconds < 0.01 else f"{seconds:.3g} s"


def multiple(x: float) -> str:
    return f"{x:,.0f}x" if x >= 100 else f"{x:.2g}x"


def markdown(results: dict, units: list[dict], settings: Settings) -> str:
    """The tables of the report: loss per method and ratio, ECP's paired wins, the loss change
    against the dense model, scoring times."""
    n = len(settings.seeds)
    head = "| method | " + " | ".join(f"r = {r}" for r in settings.ratios) + " |"
    rule = "| --- |" + " --- |" * len(settings.ratios)
    redrawn = f"; tables and plots redrawn by `{results['redrawn_by']}`" if "redrawn_by" in results else ""
    lines = [f"Generated by `{results['command']}` ({results['wall_seconds'] / 60:.0f} min wall time, "
             f"{results['jobs']} "
             f"process(es), {results['machine']}{redrawn}). Cells: mean test loss (cross-entropy on the "
             f"{results['test_samples']:,} "
             f"test images) ± standard deviation over {n} seed(s), and mean accuracy. Plots: "
             + ", ".join(f"[{Path(p).name}]({Path(p).name})" for p in results["plots"]) + "."]
    for (arch, s), hidden in zip(results["summary"].items(), settings.hidden, strict=True):
        d = s["dense"]
        lines += ["", f"### {arch} ({s['weights']:,} weights; dense: loss {cell(d)}, trained in "
                      f"{d['train_seconds']['mean']:.1f} s; dense + {settings.epochs} more epochs: "
                      f"{cell(s['dense_finetuned'])})"]
        for phase, title in (("before", "one-shot, before fine-tuning"), ("after", f"after {settings.epochs} epochs "
                                                                                   "of fine-tuning")):
            lines += ["", f"Test loss {title}:", "", head, rule]
            lines += [f"| {VARIANTS[k][0]} | "
                      + " | ".join(cell(s["methods"][k]["ratios"][str(r)][phase]) for r in settings.ratios) + " |"
                      for k in settings.methods]
            if phase == "after":
                fc = s["fully_connected"]
                lines.append(f"| {FC} | " + " | ".join(
                    f"{cell(fc[str(r)])} [{'-'.join(map(str, fc[str(r)]['hidden']))}, {fc[str(r)]['weights']:,} w]"
                    for r in settings.ratios) + " |")
        if "ecp" in settings.methods:
            runs = [u for u in units if tuple(u["hidden"]) == tuple(hidden)]
            lines += ["", "ECP's test-loss change from its own dense model (paired per seed; mean ± std):", "",
                      "| | " + " | ".join(f"r = {r}" for r in settings.ratios) + " |", rule]
            for phase, reference, label in (("before", "dense", "before fine-tuning"),
                                            ("after", "dense", "after fine-tuning"),
                                            ("after", "dense_finetuned", "after, vs dense + as many epochs")):
                changes = [stats([u["methods"]["ecp"]["ratios"][str(r)][phase]["loss"] - u[reference]["loss"]
                                  for u in runs]) for r in settings.ratios]
                lines.append(f"| {label} | " + " | ".join(f"{c['mean']:+.4f} ±{c['std']:.4f}" for c in changes) + " |")
            high = [r for r in settings.ratios if r >= 0.5]
            others = [b for b in (*BASELINES, "nonlinear", "ecp-nocomp") if b in settings.methods]
            lines += ["", "Seeds on which ECP's test loss is below the other method's (same dense model), before · "
                          "after "
                      "fine-tuning:", "", "| ECP vs | " + " | ".join(f"r = {r}" for r in high) + " |",
                      "| --- |" + " --- |" * len(high)]
            for b in others:
                lines.append(f"| {VARIANTS[b][0]} | " + " | ".join(
                    "{}/{} · {}/{}".format(*wins(units, hidden, "ecp", b, r, "before"),
                                           *wins(units, hidden, "ecp", b, r, "after"))
                    for r in high) + " |")
    lines += ["", "Scoring time (Pruner.fit on the calibration data, one intra-op thread, fastest of up to 3 fits; "
                  "median "
                  "over seeds) in seconds and in forward passes over the calibration data (fastest of 5):", "",
              "| method | " + " | ".join(results["summary"]) + " |", "| --- |" + " --- |" * len(results["summary"])]
    lines.append(f"| one forward pass ({settings.calib_size:,} images) | " + " | ".join(
        f"{1e3 * s['forward_pass_seconds']['median']:.2f} ms" for s in results["summary"].values()) + " |")
    for k in settings.methods:
        lines.append(f"| {VARIANTS[k][0]} | " + " | ".join(
            f"{duration(s['methods'][k]['scoring_seconds']['median'])} "
            f"({multiple(s['methods'][k]['scoring_forward_passes']['median'])})"
            for s in results["summary"].values()) + " |")
    lines += findings(results, units, settings)
    return "\n".join(lines)


def at_ratios(ratios) -> str:
    """'at r = 0.5, 0.6' or 'at no ratio'."""
    return f"at r = {', '.join(str(r) for r in ratios)}" if ratios else "at no ratio"


def against(named: dict[str, list]) -> str:
    """'against A at r = ...; against B at r = ...' over the methods with any ratio, else 'against none of them'."""
    parts = [f"against {name} {at_ratios(ratios)}" for name, ratios in named.items() if ratios]
    return "; ".join(parts) if parts else "against none of them"


def findings(results: dict, units: list[dict], settings: Settings) -> list[str]:
    """What the tables show, per architecture, each sentence computed from them: ECP against its own
    dense model, against every other method seed by seed, and the narrower dense network."""
    if "ecp" not in settings.methods:
        return []
    lines = ["", "### What the tables show", ""]
    high = [r for r in settings.ratios if r >= 0.5]
    others = [b for b in (*BASELINES, "nonlinear", "ecp-nocomp") if b in settings.methods]
    for (arch, s), hidden in zip(results["summary"].items(), settings.hidden, strict=True):
        runs = [u for u in units if tuple(u["hidden"]) == tuple(hidden)]
        spread = s["dense"]["loss"]["std"]
        change = {r: stats([u["methods"]["ecp"]["ratios"][str(r)]["before"]["loss"] - u["dense"]["loss"]
                            for u in runs]) for r in settings.ratios}
        within = [r for r in settings.ratios if abs(change[r]["mean"]) <= spread]
        last = settings.ratios[-1]
        lines.append(f"- {arch}, one-shot: ECP's mean test-loss change from its own dense model is within the dense "
                     f"loss's seed-to-seed spread (± {spread:.4f}) {at_ratios(within)}; at r = {last} it is "
                     f"{change[last]['mean']:+.4f}.")
        after = {r: s["methods"]["ecp"]["ratios"][str(r)]["after"]["loss"]["mean"] for r in settings.ratios}
        below_dense = [r for r in settings.ratios if after[r] < s["dense"]["loss"]["mean"]]
        below_longer = [r for r in settings.ratios if after[r] < s["dense_finetuned"]["loss"]["mean"]]
        lines.append(f"- {arch}, fine-tuned: ECP's mean test loss is below the dense model's {at_ratios(below_dense)}, "
                     f"and below that of the dense model trained as many more epochs {at_ratios(below_longer)}.")
        for phase, title in (("before", "one-shot"), ("after", "fine-tuned")):
            every = {b: [r for r in high if wins(units, hidden, "ecp", b, r, phase)[0] == len(runs)] for b in others}
            never = {b: [r for r in high if wins(units, hidden, "ecp", b, r, phase)[0] == 0] for b in others}
            lines.append(f"- {arch}, {title}, r >= 0.5: ECP's test loss is below the other method's on every seed "
                         + against({VARIANTS[b][0]: every[b] for b in others})
                         + ". On no seed: " + against({VARIANTS[b][0]: never[b] for b in others}) + ".")
        fc = s["fully_connected"]
        narrow_worst = [r for r in settings.ratios
                        if all(fc[str(r)]["loss"]["mean"] > s["methods"][k]["ratios"][str(r)]["after"]["loss"]["mean"]
                               for k in settings.methods)]
        lines.append(f"- {arch}: the narrower dense network ({FC}) has a higher mean test loss than every fine-tuned "
                     f"pruned network {at_ratios(narrow_worst)}.")
    return lines


def write_report(path: Path, tables: str) -> None:
    """Replace the block between the markers in ``path`` (a report with prose around it), or start one."""
    block = f"{START}\n{tables}\n{END}"
    if not path.exists():
        fileio.write_text(path, f"# ECP on MNIST: the paper's study reproduced\n\n{block}\n")
        return
    text, n = re.subn(re.escape(START) + ".*?" + re.escape(END), lambda _: block, path.read_text(), flags=re.S)
    if n != 1:
        raise SystemExit(f"{path}: markers {START} / {END} not found")
    fileio.write_text(path, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist", required=True, help="folder with the four original MNIST .gz files")
    p.add_argument("--out", type=Path, default=None,
                   help="output prefix (default docs/results/ecp-mnist, with --quick docs/results/ecp-mnist-quick)")
    p.add_argument("--quick", action="store_true", help="1 seed, ratios 0.5/0.8/0.9, 2 epochs")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default 5, quick 1)")
    p.add_argument("--hidden", type=widths_argument, action="append", help="hidden sizes, repeatable (default 32,32 "
                                                                           "and 64,64)")
    p.add_argument("--methods", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--calib-size", type=int, default=2048)
    p.add_argument("--jobs", type=int, default=1, help="parallel processes, one (architecture, seed) each")
    p.add_argument("--work", type=Path, default=None,
                   help="folder keeping finished units, to resume an interrupted run")
    p.add_argument("--redraw", type=Path, default=None, metavar="JSON",
                   help="no training: redraw the plots and tables from an earlier run's JSON (its settings apply)")
    args = p.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    if not methods or set(methods) - set(VARIANTS):
        p.error(f"--methods: choose from {', '.join(VARIANTS)}")
    settings = Settings(methods=methods, calib_size=args.calib_size)
    if args.quick:
        settings = replace(settings, seeds=(0,), ratios=QUICK_RATIOS, epochs=2)
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(range(args.seeds)))
    if args.hidden:
        settings = replace(settings, hidden=tuple(args.hidden))
    out = args.out or Path("docs/results/ecp-mnist-quick" if args.quick else "docs/results/ecp-mnist")
    fileio.check_output_path(out.with_suffix(".json"), force=True)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)

    command = portable_command(["python", "scripts/reproduce_ecp.py", *(sys.argv[1:] if argv is None else argv)])
    began = time.perf_counter()
    data = Data.mnist(args.mnist)
    inputs, classes = data.shape
    if args.redraw:
        earlier = json.loads(args.redraw.read_text())
        settings = Settings(**{k: tuple(map(tuple, v)) if k == "hidden" else tuple(v) if isinstance(v, list) else v
                               for k, v in earlier["settings"].items()})
        units = earlier.pop("units")
        results = {k: v for k, v in earlier.items() if k not in ("summary", "plots")} | {"redrawn_by": command}
    else:
        units = run_study(settings, data, args.mnist, args.jobs, args.work)
        import onnxruntime

        results = {"command": command, "settings": asdict(settings), "lr": LR, "batch_size": BATCH, "jobs": args.jobs,
                   "train_samples": len(data.train_x), "test_samples": len(data.test_x),
                   "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores, onnxruntime "
                              f"{onnxruntime.__version__}",
                   "wall_seconds": time.perf_counter() - began}
    results["summary"] = summarise(units, settings, inputs, classes)
    results["plots"] = [str(path) for path in plot(results["summary"], settings, results["test_samples"], out)]
    results["units"] = units
    fileio.write_json(out.with_suffix(".json"), results)
    write_report(out.with_suffix(".md"), markdown(results, units, settings))
    log(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')} and {len(results['plots'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
