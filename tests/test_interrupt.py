"""Interrupting prune or finetune (Ctrl-C or SIGTERM) leaves nothing behind; the same seed gives
the same bytes."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxprune.cli import main

from studies.zoo import build_mlp
from tinynets import data, mlp

EXE = Path(sys.executable).with_name("onnxprune")


SIGNALS = [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]


def _interrupt(args: list[str], started: str, folder: Path, signum=signal.SIGINT, again: float | None = None
               ) -> subprocess.CompletedProcess:
    """Run the installed command with -v (temporary files in ``folder``/tmp), send ``signum`` once it
    has printed ``started`` (its work has begun) and a moment has passed (and once more ``again``
    seconds later), and return how it ended."""
    (folder / "tmp").mkdir()
    proc = subprocess.Popen([str(EXE), *args, "-v"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(folder / "tmp")})
    first = ""
    while started not in first:  # -v also shows Python warnings, which may come first
        line = proc.stderr.readline()
        assert line, first + proc.stderr.read()
        first += line
    time.sleep(0.5)
    assert proc.poll() is None, "the command finished before it could be interrupted; give it more work"
    proc.send_signal(signum)
    if again is not None:
        time.sleep(again)
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, first + err)


def _left(folder: Path, inputs: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in inputs)


@pytest.mark.parametrize("signum, code, word", SIGNALS)
def test_interrupted_prune_leaves_no_output(tmp_path, signum, code, word):
    # brute force scores 68k weights with a forward pass of 512 samples each (~20 s on 2 cores): far
    # longer than the test waits before interrupting
    onnx.save(build_mlp((256,), inputs=256, classes=10), tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.random((512, 256), dtype=np.float32))
    done = _interrupt(["prune", str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--data",
                       str(tmp_path / "calib.npz"), "--sparsity", "0.5", "--method", "nonlinear", "--force",
                       "--json", str(tmp_path / "report.json")], "scoring", tmp_path, signum)
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"Error: {word}; no output was written"
    assert "Traceback" not in done.stderr
    assert _left(tmp_path, {"model.onnx", "calib.npz", "tmp"}) == [] and _left(tmp_path / "tmp", set()) == []


FINETUNE_STOPS = [*(s + (None,) for s in SIGNALS), (signal.SIGINT, 130, "interrupted", 0.05),
                  (signal.SIGHUP, 129, "hung up", None), (signal.SIGQUIT, 131, "quit", None)]


@pytest.mark.parametrize("signum, code, word, again", FINETUNE_STOPS)
def test_interrupted_finetune_leaves_no_output(tmp_path, signum, code, word, again):
    """Also two Ctrl-Cs 50 ms apart (the second cannot cut the clean-up short), a closed terminal
    (SIGHUP) and Ctrl-\\ (SIGQUIT)."""
    onnx.save(build_mlp((64,), inputs=64, classes=10), tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.random((4000, 64), dtype=np.float32), y=rng.integers(0, 10, 4000))
    done = _interrupt(["finetune", str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--data",
                       str(tmp_path / "train.npz"), "--epochs", "500", "--batch-size", "16", "--json",
                       str(tmp_path / "r.json")], "training", tmp_path, signum, again)
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"Error: {word}; no output was written"
    assert "Traceback" not in done.stderr
    assert _left(tmp_path, {"model.onnx", "train.npz", "tmp"}) == [] and _left(tmp_path / "tmp", set()) == []


@pytest.mark.parametrize("signum, code, word", SIGNALS)
def test_interrupt_while_the_libraries_load_is_one_line(tmp_path, signum, code, word):
    """Sent once numpy's extension is mapped (the package is importing numpy, onnx, onnxruntime)."""
    onnx.save(mlp((5, 4, 3))[0], tmp_path / "model.onnx")
    proc = subprocess.Popen([str(EXE), "inspect", str(tmp_path / "model.onnx")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 30
    while "_multiarray_umath" not in maps.read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == code and "Traceback" not in err, (proc.returncode, err)
    assert len(lines) == 1 and lines[0].startswith(f"Error: {word}") and "no output was written" in lines[0], err


@pytest.mark.parametrize("command", ["inspect", "evaluate"])
def test_sigterm_swept_over_a_whole_run_is_one_line_or_a_finished_run(tmp_path, command):
    """SIGTERM at moments spread from the package's first import to the end of the run (start-up,
    the work, the JSON, the interpreter's shut-down): each run ends with its result, or with exit 143,
    one line and nothing written."""
    onnx.save(mlp((5, 4, 3), softmax=True)[0], tmp_path / "model.onnx")
    np.savez(tmp_path / "test.npz", **data(40))
    args = [str(EXE), command, str(tmp_path / "model.onnx"), "--json", str(tmp_path / "r.json"), "--force",
            *(["--data", str(tmp_path / "test.npz")] if command == "evaluate" else [])]

    def started(proc) -> float:
        """When numpy's extension is mapped (the package is importing: our handlers are in place)."""
        maps = Path(f"/proc/{proc.pid}/maps")
        while "_multiarray_umath" not in maps.read_text():
            assert proc.poll() is None
            time.sleep(0.002)
        return time.monotonic()

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    begun = started(proc)
    proc.communicate(timeout=120)
    rest = time.monotonic() - begun
    assert proc.returncode == 0
    for k in range(6):
        (tmp_path / "r.json").unlink(missing_ok=True)
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(max(0.0, started(proc) + rest * (k + 0.5) / 6 - time.monotonic()))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        left = sorted(p.name for p in tmp_path.iterdir() if p.name not in {"model.onnx", "test.npz", "r.json"})
        assert left == [], (k, left)
        if proc.returncode == 0:
            assert json.loads((tmp_path / "r.json").read_text()) and "Error" not in err, (k, err)
            continue
        assert proc.returncode == 143 and len(lines) == 1 and lines[0].startswith("Error: terminated"), (k, err)
        assert "no output was written" in lines[0] or "had been written" in lines[0], (k, err)
        assert ("had been written" in lines[0]) == (tmp_path / "r.json").exists(), (k, err)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["prune", "--help"], ["ensemble", "fit", "--help"]])
def test_a_closed_stdout_ends_quietly_also_for_help(args):
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([str(EXE), *args], stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", (done.returncode, done.stderr)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method, extra", [("ecp", []), ("random", ["--seed", "7"]), ("ecp", ["--storage", "sparse"]),
                                           ("ecp", ["--probes", "3", "--seed", "5"])])
def test_same_seed_same_bytes(tmp_path, method, extra):
    model, _, _ = mlp((5, 16, 8, 3), activation="relu", softmax=True)
    onnx.save(model, tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **data(120))
    digests = []
    for name in ("a.onnx", "b.onnx"):
        res = CliRunner().invoke(main, ["prune", str(tmp_path / "model.onnx"), str(tmp_path / name), "--data",
                                        str(tmp_path / "calib.npz"), "--sparsity", "0.9", "--method", method, *extra])
        assert res.exit_code == 0, res.output
        digests.append(_digest(tmp_path / name))
    assert digests[0] == digests[1]


@pytest.mark.parametrize("threads", ["1", "2"])
def test_same_seed_same_threads_same_bytes(tmp_path, threads):
    onnx.save(build_mlp((64,), inputs=256, classes=10), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).random((600, 256), dtype=np.float32))
    digests = []
    for name in ("a.onnx", "b.onnx"):
        res = CliRunner().invoke(main, ["prune", str(tmp_path / "model.onnx"), str(tmp_path / name), "--data",
                                        str(tmp_path / "calib.npz"), "--sparsity", "0.7", "--threads", threads])
        assert res.exit_code == 0, res.output
        digests.append(_digest(tmp_path / name))
    assert digests[0] == digests[1]


def test_same_seed_across_threads_same_bytes(tmp_path):
    onnx.save(build_mlp((64,), inputs=256, classes=10), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).random((600, 256), dtype=np.float32))
    digests = []
    for threads in ("1", "2"):
        res = CliRunner().invoke(main, ["prune", str(tmp_path / "model.onnx"), str(tmp_path / f"t{threads}.onnx"),
                                        "--data", str(tmp_path / "calib.npz"), "--sparsity", "0.7", "--threads", threads])
        assert res.exit_code == 0, res.output
        digests.append(_digest(tmp_path / f"t{threads}.onnx"))
    assert digests[0] == digests[1]
