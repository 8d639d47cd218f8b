"""The documentation's promises: a short README with the two set-up commands CI and users rely on, no
path of one machine in any committed text, a help text for every option, links that resolve, the
strict site build, and commands that print their results (inspect's totals, the ensemble's summary,
timings in readable units with their noise marked)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.cli.tables import evaluation_table, timing_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
RUN_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -e '.[cpu]' && .venv/bin/onnxprune prune "
               "models/mnist_mlp.onnx mnist_mlp_pruned.onnx --data models/mnist_calib.npz --sparsity 0.5 "
               "--test models/mnist_test.npz --force")
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e '.[cpu,test]' && .venv/bin/python -m pytest"
# absolute paths of a machine: the folders of a home, a temporary file or a work tree, written so that
# this file does not match itself
MACHINE_PATH = re.compile(r"(?<![\w.…~-])/(?:" + "|".join(["work", "tmp", "root", "home", "Users", "var/folders"]) + r")/")
BINARY = {".onnx", ".npz", ".npy", ".png", ".data", ".pb", ".gz", ".pkl"}


def committed_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but the ignored folders
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if not {".venv", ".git", "site", "build", "__pycache__"} & set(p.relative_to(ROOT).parts)]
    return [ROOT / n for n in names if n and Path(n).suffix not in BINARY and (ROOT / n).is_file()]


def test_no_machine_or_temporary_paths_in_any_committed_text():
    files = committed_text_files()
    assert any(f.name == "README.md" for f in files) and any("docs/results" in str(f) for f in files)
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {text[m.start():m.start() + 40]}"
                  for m in MACHINE_PATH.finditer(text)]
    assert not found, "machine paths:\n" + "\n".join(found[:20])


def test_the_pattern_catches_what_it_should():
    for before, folder in (("see ", "work"), ("`", "tmp"), ("(", "root"), ("--mnist=", "home"), ('"', "Users")):
        assert MACHINE_PATH.search(f"{before}/{folder}/x"), folder
    for text in ("…/data/mnist", "docs/results/x.md", "https://example.org/work/x", "../shared/tmp", "$TMPDIR"):
        assert not MACHINE_PATH.search(text), text


def test_readme_is_short_and_keeps_the_two_set_up_commands():
    lines = README.splitlines()
    assert len(lines) <= 200
    assert RUN_COMMAND in lines and TEST_COMMAND in lines
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci and "mkdocs build --strict" in ci


def test_readme_first_screen_is_a_quick_start_on_your_own_model():
    first = "\n".join(README.splitlines()[:45])
    for needed in ("pip install", "np.savez", "representative", "--structured", "onnxprune evaluate", "inspect"):
        assert needed in first, needed
    for bookkeeping in ("goal", "the issue", "design card", "before this work", "measured again"):
        assert bookkeeping not in README, bookkeeping


def test_links_in_the_readme_and_the_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_mkdocs_nav_lists_every_page():
    config = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", config, flags=re.M))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages == listed, (pages - listed, listed - pages)


def commands(group: click.Group, path=("onnxprune",)):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def test_every_option_has_a_help_text_and_a_telling_metavar():
    missing, vague = [], []
    for name, command in commands(main):
        ctx = click.Context(command, info_name=name)
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                if not (param.help or "").strip():
                    missing.append(f"{name} {param.opts[0]}")
                if not param.is_flag and param.make_metavar(ctx) == "TEXT" and not param.type.name == "choice":
                    vague.append(f"{name} {param.opts[0]}")
    assert not missing, missing
    assert "onnxprune prune --memory-budget" not in vague


def test_pytest_says_why_tests_skip():
    assert re.search(r'addopts\s*=\s*"[^"]*-r[a-zA-Z]*s', (ROOT / "pyproject.toml").read_text())


@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import mkdocs, material, mkdocs_click, mkdocstrings"],
                                   capture_output=True).returncode != 0,
                    reason="the docs extra is not installed (pip install -e '.[docs]')")
def test_the_site_builds_with_warnings_as_errors(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    cli_page = (tmp_path / "reference" / "cli" / "index.html").read_text()
    for option in ("--memory-budget", "--structured", "--drop-below", "--temperature"):
        assert option in cli_page  # generated from the commands


# --- what the commands print ---------------------------------------------------------------------------

def one_gemm_model(path: Path) -> int:
    """x (N, 6) -> Gemm (4 outputs) -> y: prunable weights, but no unit group (its units are the output)."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 6)).astype(np.float32), np.zeros(4, np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return w.size + b.size


def test_inspect_ends_with_totals_and_says_none_for_no_unit_groups(tmp_path):
    parameters = one_gemm_model(tmp_path / "m.onnx")
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert "unit groups: none" in res.output
    assert res.output.strip().splitlines()[-1] == (f"prunable weights: 24 of {parameters} parameters "
                                                   f"({100 * 24 / parameters:.1f}%) in 1 layer(s); unit groups for "
                                                   "--structured: none")


def test_inspect_counts_the_shipped_model():
    res = CliRunner().invoke(main, ["inspect", str(ROOT / "models" / "mnist_mlp.onnx")])
    model = onnx.load(str(ROOT / "models" / "mnist_mlp.onnx"))
    parameters = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name.endswith(".weight") and len(t.dims) == 2)
    assert f"prunable weights: {weights:,} of {parameters:,} parameters" in res.output
    assert "unit groups for --structured: 2 (128 units)" in res.output  # fc1's and fc2's 64 neurons each


@pytest.fixture
def labelled(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(240, 12)).astype(np.float32)
    y = (x[:, :4].sum(1) > 0).astype(np.int64) + 2 * (x[:, 4] > 0)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    return tmp_path


def test_ensemble_fit_prints_temperature_members_validation_error_and_bytes(labelled):
    out, report = labelled / "e.onnx", labelled / "e.json"
    res = CliRunner().invoke(main, ["ensemble", "fit", "--data", str(labelled / "train.npz"), "--members", "40",
                                    "--json", str(report), str(out)])
    assert res.exit_code == 0, res.output
    summary, curve = (data := json.loads(report.read_text()))["summary"], data["validation_curve"]
    error = curve["error"][curve["temperatures"].index(summary["temperature"])]
    assert f"temperature T = {summary['temperature']:.4g} (chosen on a validation split" in res.output
    assert f"effective members: {summary['effective_size']:.1f} of 40" in res.output
    assert f"validation error at T: {100 * error:.2f}% on {curve['n_validation']} held-out" in res.output
    assert f"wrote {out}: {out.stat().st_size:,} bytes" in res.output


def test_ensemble_curve_prints_its_optimum(labelled):
    out = labelled / "c.json"
    res = CliRunner().invoke(main, ["ensemble", "curve", "--data", str(labelled / "train.npz"), "--members", "40",
                                    str(out)])
    assert res.exit_code == 0, res.output
    curve = json.loads(out.read_text())["curve"]
    errors = np.asarray(curve["error"])
    best = int(np.flatnonzero(errors == errors.min())[0])  # the first of the fewest errors
    assert f"optimum: T = {curve['temperatures'][best]:.4g}, error {100 * errors[best]:.2f}%" in res.output
    assert f"uniform average (T -> inf) error {100 * curve['uniform']['error']:.2f}%" in res.output


def latency(median_us: float, q25: float, q75: float) -> dict:
    return {"median_us": median_us, "q25_us": q25, "q75_us": q75, "min_us": q25, "max_us": q75,
            "noisy": q75 / q25 > 1.5}


def ratio(median: float, q25: float, q75: float, of: str = "model/reference") -> dict:
    return {"of": of, "median": median, "q25": q25, "q75": q75, "min": q25, "max": q75, "noisy": q75 / q25 > 1.5}


def test_evaluation_table_uses_one_readable_unit_percentages_and_marks_noise():
    batches = [{"batch_size": 1, "threads": None, "runs_per_timing": 10, "model": latency(75_000.0, 70_000.0, 80_000.0),
                "reference": latency(1.0, 1, 1), "ratio": ratio(0.9, 0.5, 2.0)},
               {"batch_size": 256, "threads": None, "runs_per_timing": 10, "model": latency(2.5, 2.4, 2.6),
                "reference": latency(3.0, 2.9, 3.1), "ratio": ratio(0.83, 0.8, 0.86)}]
    report = {"loss": 0.1, "accuracy": 0.9739, "size": {"bytes": 221257, "zlib_bytes": 114013},
              "latency": {"repeats": 7, "models": ["reference", "model"], "batches": batches}}
    text = evaluation_table({"pruned": report})
    assert "e+" not in text and "75.0 ms (70.0-80.0)" in text and "2.50 µs (2.40-2.60)" in text
    assert "97.39%" in text and "221,257" in text
    assert "0.90x (0.50-2.00) noisy" in text and "0.83x (0.80-0.86)" in text and "0.83x (0.80-0.86) noisy" not in text
    assert text.splitlines()[-1].startswith("noisy:")
    quiet = {**report, "latency": {"repeats": 7, "batches": batches[1:]}}
    assert "noisy" not in evaluation_table({"pruned": quiet})


def test_timing_table_marks_a_wide_spread_and_keeps_one_unit_per_row():
    rows = [{"batch_size": 1, "threads": 1, "runs_per_timing": 300, "original": latency(40.5, 40.0, 41.0),
             "pruned": latency(39.9, 39.0, 40.5), "ratio": ratio(0.886, 0.6, 1.3, "pruned/original")},
            {"batch_size": 256, "threads": None, "runs_per_timing": 20, "original": latency(1200.0, 1190.0, 1210.0),
             "pruned": latency(990.0, 985.0, 995.0), "ratio": ratio(0.8, 0.78, 0.84, "pruned/original")}]
    lines = timing_table({"repeats": 15, "models": ["original", "pruned"], "batches": rows}).splitlines()
    assert "40.5 µs" in lines[2] and "39.9 µs" in lines[2] and "0.89x (0.60-1.30) noisy" in lines[2]
    assert "1.20 ms" in lines[3] and "0.990 ms" not in lines[3] and "990 µs" not in lines[3] and "0.99 ms" in lines[3]
    assert "noisy" not in lines[3] and "default" in lines[3] and lines[-1].startswith("noisy:")
