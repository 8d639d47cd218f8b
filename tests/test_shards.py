"""The sharded statistics service (derivatives.shards, derivatives.workers): the float64 reduce with
a common shift against numpy, sums on worker processes against one process, the same bytes for any
number of workers with the same seed and shards, one-line errors, no worker left behind; and, with
the ``ray`` extra, the same on a real local Ray cluster started for the session."""
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxprune.cli import main
from onnxprune.derivatives.shards import Tree
from onnxprune.derivatives.statistics import LayerStatistics, collect_loss_gradients, collect_statistics
from onnxprune.derivatives.units import unit_statistics
from onnxprune.find.layers import analyse_graph
from onnxprune.find.units import find_units
from onnxprune.io.data import Dataset

from studies.zoo import build_mlp
from tinyconv import cnn, images
from tinynets import data, mlp

EXE = Path(sys.executable).with_name("onnxprune")
FIELDS = ("n", "count_z", "sum_g", "sum_gz", "sum_gz2", "sum_z", "sum_z2", "sum_g_positions", "shift")


def _same_bytes(first: dict, second: dict) -> None:
    for name, a in first.items():
        for field in FIELDS:
            assert np.array_equal(getattr(a, field), getattr(second[name], field)), f"{name}.{field}"


def _close(got: dict, want: dict, rtol=1e-6) -> None:
    for name, w in want.items():
        for field in ("A", "B", "C", "C_positions", "mean_z", "var_z"):
            ref = np.asarray(getattr(w, field))
            np.testing.assert_allclose(getattr(got[name], field), ref, rtol=rtol, atol=rtol * np.abs(ref).max(),
                                       err_msg=f"{name}.{field}")


def _layer_sums(g: np.ndarray, z: np.ndarray) -> LayerStatistics:
    sums = LayerStatistics(0, np.zeros(g.shape[1]), np.zeros((g.shape[1], z.shape[1])),
                           np.zeros((g.shape[1], z.shape[1])), np.zeros(z.shape[1]), np.zeros(z.shape[1]),
                           sum_g_positions=np.zeros(g.shape[1]))
    sums.add(g, z)
    return sums


def test_the_tree_reduce_of_shards_is_numpys_sum_over_all_samples_and_does_not_depend_on_arrival():
    """Shards with their own shifts (|E z| >> std z, where an unshifted float sum loses the variance)
    merged in float64: E[G], E[G z], E[G z^2] and the ECP residual A - B^2/C equal numpy's float64
    sums over all samples; the leaves arriving in any order give the same bytes."""
    rng = np.random.default_rng(3)
    n, out, inp = 230, 4, 6
    z = 1000.0 + rng.normal(size=(n, inp)) * np.linspace(0.01, 2, inp)
    g = rng.random((n, out)) + 0.1
    cuts = [0, 17, 80, 81, 150, n]
    leaves = [_layer_sums(g[a:b], z[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    assert len({float(leaf.shift[0]) for leaf in leaves}) == len(leaves)  # every shard its own shift
    results = []
    for order in list(itertools.permutations(range(len(leaves))))[::23]:
        tree = Tree(len(leaves), LayerStatistics.merge)
        for index in order:
            tree.add(index, _layer_sums(g[cuts[index]:cuts[index + 1]], z[cuts[index]:cuts[index + 1]]))
        results.append(tree.root)
    merged = results[0]
    for other in results[1:]:
        _same_bytes({"l": merged}, {"l": other})
    a_ref, b_ref, c_ref = (g[:, :, None] * z[:, None] ** 2).mean(0), (g[:, :, None] * z[:, None]).mean(0), g.mean(0)
    assert merged.n == n
    np.testing.assert_allclose(merged.C, c_ref, rtol=1e-12)
    np.testing.assert_allclose(merged.B, b_ref, rtol=1e-12)
    np.testing.assert_allclose(merged.A, a_ref, rtol=1e-12)
    residual_ref = (g[:, :, None] * (z[:, None] - b_ref / c_ref[:, None]) ** 2).mean(0)
    shifted = (merged.sum_gz2 - merged.sum_gz ** 2 / merged.sum_g[:, None]) / n  # on the common shift: no cancellation
    np.testing.assert_allclose(shifted, residual_ref, rtol=1e-9)
    np.testing.assert_allclose(merged.mean_z, z.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.var_z, z.var(0), rtol=1e-6)


def _mlp_case():
    model = mlp((5, 6, 3))[0]
    return model, analyse_graph(model).layers, Dataset({"x": data(96)["x"]}, data(96)["y"]), "a1"


def _cnn_case():
    model, x = cnn(), images(40)
    return model, analyse_graph(model).layers, Dataset({"x": x["x"]}, x["y"]), "logits"


@pytest.mark.parametrize("case", [_mlp_case, _cnn_case])
def test_sums_on_worker_processes_equal_one_process_and_do_not_depend_on_the_worker_count(case):
    """Exact Jacobians: 2 worker processes give one process's statistics to float rounding. Random
    probes: seeded per shard, so 1 and 2 workers give the same bytes (the shards are the same)."""
    model, layers, dataset, output = case()
    one = collect_statistics(model, layers, dataset, output, batch_size=8)
    two = collect_statistics(model, layers, dataset, output, batch_size=8, workers=2, shard_size=16)
    _close(two, one)
    probed = [collect_statistics(model, layers, dataset, output, batch_size=8, probes=2, seed=5, workers=w,
                                 shard_size=16) for w in (1, 2)]
    _same_bytes(*probed)
    again = collect_statistics(model, layers, dataset, output, batch_size=8, probes=2, seed=6, workers=2, shard_size=16)
    assert not np.array_equal(again[layers[0].name].sum_g, probed[0][layers[0].name].sum_g)  # the seed is used


@pytest.mark.parametrize("name", ["mnist_mlp", "mnist_cnn", "mnist_resnet"])
def test_the_shipped_models_sums_on_workers_equal_one_process(name):
    """The MNIST MLP, CNN and ResNet export, 64 images in 4 shards on 2 workers: one process's exact sums."""
    from onnxprune.api import as_dataset, as_model
    from onnxprune.find.outputs import protected_output

    root = Path(__file__).resolve().parents[1] / "models"
    model = as_model(root / f"{name}.onnx")
    dataset = as_dataset(root / "mnist_calib.npz", model).subset(64)
    layers, output = analyse_graph(model).layers, protected_output(model)
    one = collect_statistics(model, layers, dataset, output, batch_size=16)
    _close(collect_statistics(model, layers, dataset, output, batch_size=16, workers=2, shard_size=16), one, rtol=1e-5)


def test_unit_sums_and_loss_gradients_on_workers_equal_one_process():
    model, layers, dataset, output = _mlp_case()
    by_name, groups = analyse_graph(model).by_name(), find_units(model).groups
    one = unit_statistics(model, groups, by_name, dataset, output, batch_size=8)
    two = unit_statistics(model, groups, by_name, dataset, output, batch_size=8, workers=2, shard_size=16)
    for name, want in one.items():
        for field in ("vv", "vu", "uu", "sum_z", "sum_z2", "fluctuation", "column_norm2"):
            np.testing.assert_allclose(getattr(two[name], field), getattr(want, field), rtol=1e-6, atol=1e-12)
    probed = [unit_statistics(model, groups, by_name, dataset, output, batch_size=8, probes=2, workers=w, shard_size=16)
              for w in (1, 2)]
    for name in probed[0]:
        assert np.array_equal(probed[0][name].vv, probed[1][name].vv)
    want = collect_loss_gradients(model, layers, dataset, output, batch_size=8)
    got = collect_loss_gradients(model, layers, dataset, output, batch_size=8, workers=2, shard_size=16)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-12)


def _files(tmp_path: Path, samples: int = 96, hidden=(6,), inputs: int = 5) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    onnx.save(build_mlp(hidden, inputs=inputs, classes=3), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.random((samples, inputs), dtype=np.float32), y=rng.integers(0, 3, samples))
    return str(tmp_path / "model.onnx"), str(tmp_path / "calib.npz")


def _prune(model: str, calib: str, out: Path, *extra: str):
    return CliRunner().invoke(main, ["prune", model, str(out), "--data", calib, "--sparsity", "0.5", "--seed", "3",
                                     "--batch-size", "16", *extra])


@pytest.mark.parametrize("extra", [(), ("--probes", "2"), ("--structured", "--steps", "2"), ("--method", "gradmag")])
def test_the_pruned_model_is_the_same_with_1_and_2_workers(tmp_path, extra):
    model, calib = _files(tmp_path)
    done = [_prune(model, calib, tmp_path / f"w{w}.onnx", "--workers", str(w), *extra) for w in (1, 2)]
    assert [d.exit_code for d in done] == [0, 0], [d.output for d in done]
    assert (tmp_path / "w1.onnx").read_bytes() == (tmp_path / "w2.onnx").read_bytes()
    single = _prune(model, calib, tmp_path / "single.onnx", *extra)
    assert single.exit_code == 0, single.output
    pruned = [onnx.load(tmp_path / f) for f in ("w2.onnx", "single.onnx")]
    for a, b in zip(*(sorted(m.graph.initializer, key=lambda t: t.name) for m in pruned)):
        x, y = onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)
        if "--probes" not in extra:  # exact sums: one process's model, to rounding, with the same zeros
            assert x.shape == y.shape and np.array_equal(x == 0, y == 0), a.name
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_workers_for_a_method_without_derivative_statistics_are_refused_in_one_line(tmp_path):
    model, calib = _files(tmp_path)
    done = _prune(model, calib, tmp_path / "out.onnx", "--method", "magnitude", "--workers", "2")
    assert done.exit_code == 2, done.output
    assert done.output.strip().splitlines() == ["Error: --workers and --ray spread the derivative statistics over "
                                                "workers, and method 'magnitude' takes none; drop them"]
    assert not (tmp_path / "out.onnx").exists()


def test_a_dry_run_on_workers_says_where_the_sums_were_computed(tmp_path):
    model, calib = _files(tmp_path)
    done = CliRunner().invoke(main, ["prune", model, "--data", calib, "--dry-run", "--workers", "2", "-v",
                                     "--batch-size", "16"])
    assert done.exit_code == 0, done.output
    assert "on 2 workers (local)" in done.output


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _gone(pid: int, wait: float = 10.0) -> bool:
    end = time.monotonic() + wait
    while time.monotonic() < end:
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "\nState:\tZ" in status.read_text():
            return True
        time.sleep(0.05)
    return False


def _run_until_workers(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    model, calib = _files(tmp_path, samples=4096, hidden=(256,), inputs=256)
    proc = subprocess.Popen([str(EXE), "prune", model, str(tmp_path / "out.onnx"), "--data", calib, "--sparsity",
                             "0.5", "--workers", "2", "--batch-size", "64"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    end, workers = time.monotonic() + 120, []
    while len(workers) < 2 and proc.poll() is None and time.monotonic() < end:
        workers = [c for c in _children(proc.pid) if "derivatives.workers" in Path(f"/proc/{c}/cmdline").read_text()]
        time.sleep(0.02)
    assert len(workers) == 2, proc.communicate()
    return proc, workers


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from Linux's /proc")
def test_a_worker_killed_mid_run_gives_one_line_and_no_output(tmp_path):
    proc, workers = _run_until_workers(tmp_path)
    os.kill(workers[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith("Error: statistics worker 1 of 2"), err
    assert "SIGKILL" in err and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()
    assert _gone(workers[1])


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from Linux's /proc")
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_command_leaves_no_worker_behind(tmp_path, signum, code):
    proc, workers = _run_until_workers(tmp_path)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1].startswith("Error: "), err
    assert all(_gone(pid) for pid in workers)
    assert not (tmp_path / "out.onnx").exists()


def test_ray_without_the_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as where it is not installed
    model, calib = _files(tmp_path)
    done = _prune(model, calib, tmp_path / "out.onnx", "--ray", "auto")
    assert done.exit_code == 2, done.output
    assert done.output.strip().splitlines()[-1] == ("Error: --ray needs Ray, which is not installed: "
                                                    "pip install 'onnxprune[ray]'")
    assert not (tmp_path / "out.onnx").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray head on 127.0.0.1 with 2 CPUs, in a temporary directory of its own, started for the
    session and stopped after (its whole process group: no `ray stop`, which would end every cluster of
    the machine); the address to join."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'onnxprune[ray]')")
    command = Path(sys.executable).with_name("ray")
    if not command.exists():
        pytest.skip("the ray command is not installed beside this Python")
    root = tempfile.mkdtemp(prefix="ray", dir="/tmp" if Path("/tmp").is_dir() else None)  # short socket paths
    port = _free_port()
    head = subprocess.Popen([str(command), "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address",
                             "127.0.0.1", "--port", str(port), "--include-dashboard", "false",
                             "--disable-usage-stats", "--temp-dir", root], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            assert head.poll() is None, head.stderr.read().decode()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # what the head started and left in its group
        head.wait()
        shutil.rmtree(root, ignore_errors=True)


def test_sums_on_a_ray_cluster_equal_those_on_local_workers(ray_cluster):
    """Exact: one process's sums to rounding; probes: the bytes of local workers (any worker count)."""
    model, layers, dataset, output = _cnn_case()
    one = collect_statistics(model, layers, dataset, output, batch_size=8)
    _close(collect_statistics(model, layers, dataset, output, batch_size=8, ray=ray_cluster, shard_size=16), one)
    local = collect_statistics(model, layers, dataset, output, batch_size=8, probes=2, workers=1, shard_size=16)
    on_ray = collect_statistics(model, layers, dataset, output, batch_size=8, probes=2, ray=ray_cluster,
                                workers=2, shard_size=16)
    _same_bytes(local, on_ray)


def test_a_model_pruned_on_a_ray_cluster_is_the_one_pruned_on_local_workers(tmp_path, ray_cluster):
    model, calib = _files(tmp_path)
    local = _prune(model, calib, tmp_path / "local.onnx", "--workers", "1")
    on_ray = _prune(model, calib, tmp_path / "ray.onnx", "--ray", ray_cluster, "--workers", "2", "-v")
    assert (local.exit_code, on_ray.exit_code) == (0, 0), local.output + on_ray.output
    assert "on 2 workers (ray " in on_ray.output
    assert (tmp_path / "local.onnx").read_bytes() == (tmp_path / "ray.onnx").read_bytes()


def test_an_unreachable_ray_cluster_is_one_line_and_exit_1(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'onnxprune[ray]')")
    model, calib = _files(tmp_path)
    done = _prune(model, calib, tmp_path / "out.onnx", "--ray", f"127.0.0.1:{_free_port()}")
    assert done.exit_code == 1, done.output
    last = done.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "Ray cluster" in last and "Traceback" not in done.output, done.output
    assert not (tmp_path / "out.onnx").exists()
