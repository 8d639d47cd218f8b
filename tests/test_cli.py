"""The command line end to end: click's runner for breadth, the installed console script once."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from onnxprune.cli import main

from tinynets import data, mlp


@pytest.fixture
def files(tmp_path):
    model, _, _ = mlp((5, 4, 3), softmax=True)
    onnx.save(model, tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **data(40))
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_prune_evaluate_inspect(files):
    before = digest(files / "model.onnx")
    res = invoke("prune", files / "model.onnx", files / "out.onnx", "--data", files / "calib.npz", "--sparsity", 0.5,
                 "--json", files / "r.json", "--test", files / "calib.npz")
    assert res.exit_code == 0, res.output
    assert "largest bias shift" in res.output and "total" in res.output and "accuracy" in res.output
    assert digest(files / "model.onnx") == before
    onnx.checker.check_model(str(files / "out.onnx"))
    report = json.loads((files / "r.json").read_text())
    assert report["weights"]["pruned"] == 16 and report["test"]["pruned"]["mse"] > 0
    res = invoke("evaluate", files / "out.onnx", "--data", files / "calib.npz", "--reference", files / "model.onnx",
                 "--json", "-")
    assert res.exit_code == 0, res.output
    assert '"max_abs"' in res.output
    res = invoke("inspect", files / "out.onnx")
    assert res.exit_code == 0 and "50.0%" in res.output


def test_quiet_prints_nothing(files):
    res = invoke("prune", files / "model.onnx", files / "out.onnx", "--data", files / "calib.npz", "--sparsity", 0.3, "-q")
    assert res.exit_code == 0 and res.output == ""


def bad_cases(d: Path):
    """(name, files to create, CLI args); each must fail with exit 2 and a one-line error."""
    x = data(40)
    cases = []

    def npz(name, **arrays):
        return lambda: np.savez(d / name, **arrays)

    def raw(name, content):
        return lambda: (d / name).write_bytes(content)

    prune = ["prune", d / "model.onnx", d / "out.onnx", "--sparsity", 0.5, "--data"]
    cases += [
        ("missing model", None, ["prune", d / "nope.onnx", d / "out.onnx", "--data", d / "calib.npz", "--sparsity", 0.5]),
        ("random bytes", raw("junk.onnx", os.urandom(300)),
         ["prune", d / "junk.onnx", d / "out.onnx", "--data", d / "calib.npz", "--sparsity", 0.5]),
        ("empty file", raw("empty.onnx", b""), ["inspect", d / "empty.onnx"]),
        ("truncated", lambda: (d / "trunc.onnx").write_bytes((d / "model.onnx").read_bytes()[:150]),
         ["inspect", d / "trunc.onnx"]),
        ("wrong keys", npz("keys.npz", a=x["x"], b=x["x"]), prune + [d / "keys.npz"]),
        ("wrong shape", npz("shape.npz", x=x["x"][:, :3]), prune + [d / "shape.npz"]),
        ("wrong dtype", npz("dtype.npz", x=x["x"].astype(np.int32)), prune + [d / "dtype.npz"]),
        ("strings", npz("str.npz", x=np.array(["a", "b"])), prune + [d / "str.npz"]),
        ("nan", npz("nan.npz", x=np.where(x["x"] > 1, np.nan, x["x"]).astype(np.float32)), prune + [d / "nan.npz"]),
        ("zero samples", npz("zero.npz", x=x["x"][:0]), prune + [d / "zero.npz"]),
        ("corrupt npz", raw("bad.npz", b"PK\x03\x04garbage"), prune + [d / "bad.npz"]),
        ("missing npz", None, prune + [d / "none.npz"]),
        ("labels mismatch", npz("lab.npz", x=x["x"], y=x["y"][:5]), prune + [d / "lab.npz"]),
        ("sparsity > 1", None, ["prune", d / "model.onnx", d / "out.onnx", "--data", d / "calib.npz", "--sparsity", 1.5]),
        ("unknown method", None, prune + [d / "calib.npz", "--method", "magic"]),
        ("gradmag without labels", npz("nolab.npz", x=x["x"]), prune + [d / "nolab.npz", "--method", "gradmag"]),
        ("overwrite input", None,
         ["prune", d / "model.onnx", d / "model.onnx", "--data", d / "calib.npz", "--sparsity", 0.5, "--force"]),
        ("output folder missing", None,
         ["prune", d / "model.onnx", d / "no" / "out.onnx", "--data", d / "calib.npz", "--sparsity", 0.5]),
        ("unknown output", None, prune + [d / "calib.npz", "--output", "nope"]),
        ("unsupported ops", lambda: onnx.save(_conv_model(), d / "conv.onnx"),
         ["prune", d / "conv.onnx", d / "out.onnx", "--data", d / "calib.npz", "--sparsity", 0.5]),
        ("labels out of range", npz("big.npz", x=x["x"], y=x["y"] + 7), ["evaluate", d / "model.onnx", "--data", d / "big.npz"]),
        ("exclude matches nothing", None, prune + [d / "calib.npz", "--exclude", "zzz"]),
    ]
    return cases


def _conv_model():
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case", range(22))
def test_bad_input_gets_one_line_error_exit_2_and_no_output(files, case):
    name, make, args = bad_cases(files)[case]
    if make:
        make()
    before = digest(files / "model.onnx")
    res = invoke(*args)
    assert res.exit_code == 2, (name, res.output)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error:"), (name, res.output)
    assert "Traceback" not in res.output and len(lines) <= 3, (name, res.output)  # click usage errors add a usage line
    assert not (files / "out.onnx").exists() and not list(files.glob(".*tmp*")), name
    assert digest(files / "model.onnx") == before


def test_refuses_to_clobber_without_force(files):
    (files / "out.onnx").write_bytes(b"keep me")
    args = ["prune", files / "model.onnx", files / "out.onnx", "--data", files / "calib.npz", "--sparsity", 0.5]
    res = invoke(*args)
    assert res.exit_code == 2 and "--force" in res.output
    assert (files / "out.onnx").read_bytes() == b"keep me"
    assert invoke(*args, "--force").exit_code == 0
    onnx.checker.check_model(str(files / "out.onnx"))


def test_cuda_provider_fails_clearly_without_cuda(files):
    res = invoke("evaluate", files / "model.onnx", "--data", files / "calib.npz", "--provider", "cuda")
    assert res.exit_code == 1 and "not available" in res.output and "Traceback" not in res.output


def test_installed_console_script(files):
    exe = Path(sys.executable).with_name("onnxprune")
    assert exe.exists(), "the package must install the onnxprune console script"
    done = subprocess.run([str(exe), "prune", str(files / "model.onnx"), str(files / "out.onnx"), "--data",
                           str(files / "calib.npz"), "--sparsity", "0.5"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "total" in done.stdout and done.stderr == ""
    done = subprocess.run([str(exe), "inspect", str(files / "missing.onnx")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().startswith("Error:") and "Traceback" not in done.stderr
