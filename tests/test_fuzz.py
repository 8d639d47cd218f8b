"""Fuzzing the command line with corrupt inputs (seeded, so every run tries the same cases).

Every case must end with exit code 1 or 2, one line on stderr starting with "Error:", no traceback
and no file left behind; or, where a corruption can be harmless (a flipped byte inside a float
weight), succeed with a model that passes onnx.checker.
"""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main

from tinynets import data, mlp

SEED = 20261123
INPUTS = {"model.onnx", "calib.npz", "case.onnx", "case.npz"}


def _good_model() -> onnx.ModelProto:
    return mlp((5, 4, 3), softmax=True)[0]


def _model_cases() -> list[tuple[str, bytes, bool]]:
    """(name, file content, may succeed)."""
    rng = np.random.default_rng(SEED)
    good = _good_model().SerializeToString()
    cases = []
    for offset in sorted(rng.choice(len(good), 10, replace=False)):
        cases.append((f"truncated at {offset}", good[:offset], False))
    for i in range(30):
        flipped = bytearray(good)
        for position in rng.choice(len(good), int(rng.integers(1, 3)), replace=False):
            flipped[position] = int(rng.integers(0, 256))
        cases.append((f"bytes flipped {i}", bytes(flipped), True))
    weights = [t.raw_data for t in _good_model().graph.initializer]
    for i in range(12):  # inside the float weights: NaN, Inf, huge or harmless values
        raw = weights[i % len(weights)]
        start = good.index(raw)
        flipped = bytearray(good)
        flipped[start + int(rng.integers(len(raw)))] = int(rng.choice([0x7F, 0xFF, 0x80, int(rng.integers(256))]))
        cases.append((f"weight byte flipped {i}", bytes(flipped), True))
    for i in range(4):
        cases.append((f"random bytes {i}", rng.bytes(int(rng.integers(1, 3000))), False))
    model = _good_model()
    others = {"tensor": numpy_helper.from_array(np.ones((3, 3), np.float32), "t"), "graph": model.graph,
              "node": model.graph.node[0], "function": onnx.FunctionProto(name="f", domain="d"),
              "training info": onnx.TrainingInfoProto(), "empty model": onnx.ModelProto()}
    cases += [(f"a {name} protobuf", message.SerializeToString(), False) for name, message in others.items()]
    return cases


def _unsupported(kind: str) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((5, 3), np.float32), "W")
    b = numpy_helper.from_array(np.ones(3, np.float32), "B")
    tail = {"custom op": helper.make_node("Frobnicate", ["a"], ["y"], domain="my.ops"),
            "no gradient": helper.make_node("Round", ["a"], ["y"]),
            "string output": helper.make_node("Cast", ["a"], ["y"], to=TensorProto.STRING),
            "nan weight": helper.make_node("Relu", ["a"], ["y"])}[kind]
    out_type = TensorProto.STRING if kind == "string output" else TensorProto.FLOAT
    if kind == "nan weight":
        w = numpy_helper.from_array(np.where(np.eye(5, 3) > 0, np.nan, 1.0).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "B"], ["a"]), tail],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                              [helper.make_tensor_value_info("y", out_type, ["N", 3])], [w, b])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("my.ops", 1)] if kind == "custom op" else [])
    return helper.make_model(graph, opset_imports=opsets)


UNSUPPORTED = ["custom op", "no gradient", "string output", "nan weight"]


def _data_cases() -> list[tuple[str, dict | bytes]]:
    """(name, arrays for np.savez or raw file content); every one is invalid for the tiny model."""
    rng = np.random.default_rng(SEED + 1)
    good = data(40)
    x = good["x"]
    refused = [np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint8, np.bool_, np.complex64, "U2", "S2"]
    cases = []
    for _ in range(6):
        dtype = refused[int(rng.integers(len(refused)))]
        value = np.full(x.shape, "a", dtype) if np.dtype(dtype).kind in "US" else (x * 10).astype(dtype)
        cases.append((f"dtype {np.dtype(dtype)}", {"x": value}))
    for _ in range(6):
        ndim = int(rng.integers(0, 4))
        shape = tuple(int(s) for s in rng.integers(1, 9, size=ndim))
        if len(shape) == 2 and shape[1] == 5:
            shape = (shape[0], 6)
        cases.append((f"shape {shape}", {"x": rng.normal(size=shape).astype(np.float32)}))
    for i in range(4):
        bad = x.copy()
        bad.flat[int(rng.integers(bad.size))] = [np.nan, np.inf, -np.inf][i % 3]
        cases.append((f"non-finite {i}", {"x": bad}))
    keys = ["X", "input", "images", "x0"]
    for _ in range(3):
        chosen = rng.choice(keys, size=2, replace=False)
        cases.append((f"keys {list(chosen)}", {str(k): x for k in chosen}))
    cases += [
        ("no arrays", {}),
        ("zero samples", {"x": x[:0]}),
        ("a 0-d array", {"x": np.float32(1.0)}),
        ("labels 2-D", {"x": x, "y": good["y"].reshape(-1, 1)}),
        ("labels float", {"x": x, "y": good["y"] + 0.5}),
        ("labels negative", {"x": x, "y": -good["y"] - 1}),
        ("labels count", {"x": x, "y": good["y"][:7]}),
        ("labels strings", {"x": x, "y": np.array(["a"] * 40)}),
        ("object array", b"object"),
        ("random bytes", rng.bytes(500)),
        ("zip header only", b"PK\x03\x04" + rng.bytes(60)),
    ]
    return cases


def _write_npz(path: Path, content) -> None:
    if content == b"object":  # a pickled object array: refused without allow_pickle
        np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **content)


@pytest.fixture
def folder(tmp_path):
    onnx.save(_good_model(), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **data(40))
    return tmp_path


def _check(res, folder: Path, name: str, may_succeed: bool = False, capfd=None) -> None:
    """``capfd`` (pytest's file-descriptor capture) sees what native code (onnxruntime's logger)
    writes to stderr, which the click runner cannot."""
    if capfd is not None:
        native = capfd.readouterr().err
        assert native == "", (name, native)
    left = sorted(p.name for p in folder.iterdir() if p.name not in INPUTS)
    if res.exit_code == 0 and may_succeed:
        assert left == ["out.onnx"], (name, left)
        onnx.checker.check_model(str(folder / "out.onnx"))
        (folder / "out.onnx").unlink()
        return
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code in (1, 2), (name, res.exit_code, res.output, res.exception)
    assert len(lines) == 1 and lines[0].startswith("Error:"), (name, res.stderr)
    assert "Traceback" not in res.output, (name, res.output)
    assert left == [], (name, left)


def _prune(folder: Path, model: str = "case.onnx", calib: str = "calib.npz"):
    return CliRunner().invoke(main, ["prune", str(folder / model), str(folder / "out.onnx"), "--data",
                                     str(folder / calib), "--sparsity", "0.5"])


MODEL_CASES = _model_cases()
DATA_CASES = _data_cases()


def test_corrupt_model_files(folder, capfd):
    outcomes = {}
    for name, content, may_succeed in MODEL_CASES:
        (folder / "case.onnx").write_bytes(content)
        res = _prune(folder)
        _check(res, folder, name, may_succeed, capfd)
        outcomes[res.exit_code] = outcomes.get(res.exit_code, 0) + 1
    assert outcomes.get(2, 0) >= len(MODEL_CASES) // 2, outcomes  # most corruptions are caught as bad input


def test_corrupt_models_through_inspect_and_evaluate(folder, capfd):
    for name, content, may_succeed in MODEL_CASES[::4]:
        (folder / "case.onnx").write_bytes(content)
        for args in (["inspect", str(folder / "case.onnx")],
                     ["evaluate", str(folder / "case.onnx"), "--data", str(folder / "calib.npz")]):
            res = CliRunner().invoke(main, args)
            if res.exit_code != 0 or not may_succeed:
                _check(res, folder, f"{args[0]}: {name}", capfd=capfd)


@pytest.mark.parametrize("kind", UNSUPPORTED)
def test_models_with_unsupported_constructs(folder, kind, capfd):
    onnx.save(_unsupported(kind), folder / "case.onnx")
    res = _prune(folder)
    _check(res, folder, kind, capfd=capfd)
    assert res.exit_code == 2, res.stderr


def test_corrupt_calibration_files(folder, capfd):
    for name, content in DATA_CASES:
        _write_npz(folder / "case.npz", content)
        res = _prune(folder, "model.onnx", "case.npz")
        _check(res, folder, name, capfd=capfd)
        assert res.exit_code == 2, (name, res.stderr)


def test_corrupt_data_through_evaluate_and_dry_run(folder, capfd):
    for name, content in DATA_CASES[::3]:
        _write_npz(folder / "case.npz", content)
        for args in (["evaluate", str(folder / "model.onnx"), "--data", str(folder / "case.npz")],
                     ["prune", str(folder / "model.onnx"), "--data", str(folder / "calib.npz"), "--dry-run",
                      "--ratios", "0.5", "--evaluate", str(folder / "case.npz")]):
            res = CliRunner().invoke(main, args)
            _check(res, folder, f"{args[0]}: {name}", capfd=capfd)
            assert res.exit_code == 2, (name, res.stderr)


@pytest.mark.parametrize("which", ["model", "data", "unsupported"])
def test_the_installed_command_prints_exactly_one_line(folder, which):
    """Through a real process: nothing else (onnxruntime's native logging, warnings) reaches stderr."""
    exe = Path(sys.executable).with_name("onnxprune")
    model, calib = folder / "model.onnx", folder / "calib.npz"
    if which == "model":
        (folder / "case.onnx").write_bytes(_good_model().SerializeToString()[:100])
        model = folder / "case.onnx"
    elif which == "data":
        _write_npz(folder / "case.npz", DATA_CASES[0][1])
        calib = folder / "case.npz"
    else:
        onnx.save(_unsupported("custom op"), folder / "case.onnx")
        model = folder / "case.onnx"
    done = subprocess.run([str(exe), "prune", str(model), str(folder / "out.onnx"), "--data", str(calib),
                           "--sparsity", "0.5"], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), done.stderr
    assert sorted(p.name for p in folder.iterdir() if p.name not in INPUTS) == []


# -- corrupt archives: a CRC mismatch, a broken deflate stream, methods and flags zipfile cannot read --
def _patch_headers(content: bytes, member: bytes, offset_local: int, offset_central: int, change) -> bytes:
    """Apply ``change(value) -> value`` to a 2-byte field of ``member``'s local and central headers."""
    out = bytearray(content)
    for signature, offset in ((b"PK\x03\x04", offset_local), (b"PK\x01\x02", offset_central)):
        start = 0
        while (at := out.find(signature, start)) >= 0:
            name_at = at + (30 if signature == b"PK\x03\x04" else 46)
            if out[name_at:name_at + len(member)] == member:
                value = int.from_bytes(out[at + offset:at + offset + 2], "little")
                out[at + offset:at + offset + 2] = change(value).to_bytes(2, "little")
            start = at + 4
    return bytes(out)


def _zip_cases() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(SEED + 2)
    good = data(400)
    images = {"x": rng.integers(0, 256, (400, 5)).astype(np.uint8), "y": good["y"]}
    cases = []
    for name, arrays, member, compressed in (("float x", good, b"x.npy", False), ("uint8 x", images, b"x.npy", False),
                                             ("labels", good, b"y.npy", False), ("deflated x", good, b"x.npy", True)):
        buffer = io.BytesIO()
        (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
        content = bytearray(buffer.getvalue())
        start = content.index(member) + len(member) + 128 + 40  # inside the data, past the .npy header
        if compressed:  # the stream's last block, which the header does not depend on
            end = content.index(b"PK\x03\x04", start)
            content[end - 40:end - 24] = rng.bytes(16)
        else:
            content[start + int(rng.integers(200))] ^= 0x5A
        cases.append((f"corrupt {name}", bytes(content)))
    buffer = io.BytesIO()
    np.savez(buffer, **good)
    cases.append(("compression method 99", _patch_headers(buffer.getvalue(), b"x.npy", 8, 10, lambda v: 99)))
    cases.append(("encrypted flag", _patch_headers(buffer.getvalue(), b"x.npy", 6, 8, lambda v: v | 1)))
    return cases


def _scaled_model() -> onnx.ModelProto:
    model = _good_model()
    model.metadata_props.add(key="onnxprune.input_scale", value=repr(1 / 255))
    return model


@pytest.mark.parametrize("name, content", _zip_cases(), ids=[name for name, _ in _zip_cases()])
def test_corrupt_archive_members_are_one_line_bad_input(folder, capfd, name, content):
    onnx.save(_scaled_model(), folder / "case.onnx")
    (folder / "case.npz").write_bytes(content)
    model, case = str(folder / "case.onnx"), str(folder / "case.npz")
    for args in (["evaluate", model, "--data", case],
                 ["prune", model, str(folder / "out.onnx"), "--data", case, "--sparsity", "0.5"],
                 ["prune", model, "--data", str(folder / "calib.npz"), "--dry-run", "--ratios", "0.5", "--test", case],
                 ["finetune", model, str(folder / "out.onnx"), "--data", case, "--epochs", "1"],
                 ["ensemble", "fit", "--data", case, "--members", "5", *(["--scale", "1/255"] if "uint8" in name else []),
                  str(folder / "out.onnx")]):
        res = CliRunner().invoke(main, args)
        _check(res, folder, f"{args[0]}: {name}", capfd=capfd)
        assert res.exit_code == 2, (args[0], name, res.stderr)
        assert any(word in res.stderr for word in ("is corrupt", "encrypted", "method 99")), (args[0], name, res.stderr)
