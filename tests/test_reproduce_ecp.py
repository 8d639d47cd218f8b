"""scripts/reproduce_ecp.py --quick on a tiny fake MNIST: every method, the baseline, the outputs."""
import gzip
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "reproduce_ecp.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("reproduce_ecp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_idx(path: Path, array: np.ndarray) -> None:
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist(tmp_path):
    """A learnable stand-in in MNIST's own file format: each class lights its own band of rows."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "mnist"
    folder.mkdir()
    for (images, labels), n in zip((("train-images.idx3-ubyte.gz", "train-labels.idx1-ubyte.gz"),
                                    ("t10k-images.idx3-ubyte.gz", "t10k-labels.idx1-ubyte.gz")), (320, 80)):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28))
        for i, label in enumerate(y):
            x[i, 2 * label:2 * label + 3] += 180
        write_idx(folder / images, x)
        write_idx(folder / labels, y)
    return folder


def test_narrower_matches_the_weight_budget(study):
    assert study.weight_count((64, 64), 784, 10) == 54_912 and study.weight_count((32, 32), 784, 10) == 26_432
    widths = study.narrower((64, 64), 0.5 * 54_912, 784, 10)
    assert widths[0] == widths[1] and abs(study.weight_count(widths, 784, 10) - 27_456) < 800
    assert study.narrower((32, 32), 10, 784, 10) == (1, 1)


def test_quick_mode_end_to_end(study, mnist, tmp_path):
    out = tmp_path / "res" / "ecp"
    out.parent.mkdir()
    args = ["--mnist", str(mnist), "--quick", "--hidden", "4,4", "--calib-size", "64", "--out", str(out),
            "--work", str(tmp_path / "work")]
    assert study.main(args) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["settings"]["ratios"] == [0.5, 0.8, 0.9] and results["settings"]["epochs"] == 2
    (unit,) = results["units"]
    assert set(unit["methods"]) == set(study.VARIANTS) and np.isfinite(unit["dense_finetuned"]["loss"])
    for row in unit["methods"].values():
        for r, cell in row["ratios"].items():
            assert cell["sparsity"] == pytest.approx(float(r), abs=1e-3)
            assert all(np.isfinite(cell[phase]["loss"]) for phase in ("before", "after"))
    fc = unit["fully_connected"]
    assert fc["0.5"]["hidden"] == [2, 2] and fc["0.9"]["hidden"] == [1, 1]
    arch = results["summary"]["784-4-4-10"]
    assert arch["methods"]["ecp"]["ratios"]["0.8"]["after"]["loss"]["n"] == 1
    png = Path(results["plots"][0])
    assert png.name == "ecp-784-4-4-10.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = out.with_suffix(".md").read_text()
    assert study.START in report and "| ecp vs" not in report and "fully-connected" in report and "r = 0.9" in report

    # the prose around the tables survives a rerun, and the finished unit is reused, not recomputed
    out.with_suffix(".md").write_text("# mine\n\nprose\n\n" + report[report.index(study.START):])
    assert study.main(args) == 0
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["units"] == results["units"]
    assert out.with_suffix(".md").read_text().startswith("# mine\n\nprose\n\n" + study.START)

    # --redraw rebuilds the same summary from the stored units alone
    redrawn = tmp_path / "res" / "redrawn"
    assert study.main(["--mnist", str(mnist), "--redraw", str(out.with_suffix(".json")), "--out", str(redrawn)]) == 0
    replay = json.loads(redrawn.with_suffix(".json").read_text())
    assert replay["summary"] == again["summary"] and replay["command"] == again["command"] and "redrawn_by" in replay
    assert "redrawn by" in redrawn.with_suffix(".md").read_text()
