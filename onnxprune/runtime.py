"""onnxruntime sessions, providers, which build is installed, and the training build's entry points.

Exactly one onnxruntime build serves as the runtime: onnxruntime (extra ``cpu``), onnxruntime-gpu
(``gpu``) or onnxruntime-training-cpu 1.19.2 (``training``, which also has the gradient builder).
They all install the same ``onnxruntime/`` folder, so a second install silently replaces the first
and pip does not notice: ``check_installation`` names that case, and a missing runtime, in one line
with the fix. The training build's ``onnxruntime.training`` package imports torch through ``optim``;
``training_modules`` registers an empty module for that name before importing it, so that torch
is never needed. onnxruntime itself is imported on first use (``_ort``). It only
accepts IR <= 10 and default-domain opset <= 21: ``runtime_copy`` down-stamps a copy for it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import RuntimeUnavailable
from onnxprune.graph.passes import needs_runtime_copy, runtime_copy


def _shim_training_optim() -> None:
    sys.modules.setdefault("onnxruntime.training.optim", types.ModuleType("onnxruntime.training.optim"))


BUILDS = {"onnxruntime": "cpu", "onnxruntime-gpu": "gpu", "onnxruntime-training-cpu": "training",
          "onnxruntime-training": "training"}


def installed_builds() -> list[str]:
    """The onnxruntime distributions pip has installed in this environment (normally exactly one)."""
    return list(_distributions())


@functools.cache
def _distributions() -> tuple[str, ...]:
    """Read once per process: every session checks the installation, and the metadata scan (about
    1 ms of CPU here, more on a loaded machine) added up over the hundreds of sessions of a run."""
    found = []
    for name in BUILDS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return tuple(found)


def installation_problem(builds: list[str], importable: bool) -> str | None:
    """Why the onnxruntime installation cannot be trusted, with the fix, or None."""
    if not builds or not importable:
        return ("no onnxruntime is installed (the base install has none); install exactly one build: "
                "pip install 'onnxprune[cpu]' (or [gpu], or [training] for onnxruntime-training)")
    if len(builds) > 1:
        keep = builds[-1]
        return (f"several onnxruntime builds are installed over each other ({', '.join(builds)}); they share one "
                f"onnxruntime/ folder and replace each other's files. Fix: pip uninstall -y {' '.join(builds)} && "
                f"pip install --force-reinstall {keep} (or a fresh environment with one of the extras cpu, gpu, training)")
    return None


@functools.cache
def _ort():
    """The installed onnxruntime module, imported on first use (None when no build imports).

    Importing onnxprune changes nothing global; the first session does: onnxruntime >= 1.2x writes a
    session-id file (.ses) into $TMPDIR for its telemetry unless ORT_DISABLE_TELEMETRY is set (a
    pruning run must leave nothing behind; a user's own setting wins), and its default logger goes to
    fatal only (errors reach the caller as exceptions, not as log lines that break one-line errors)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    _shim_training_optim()  # the training build may import onnxruntime.training (and its torch-based optim) here
    try:
        import onnxruntime
    except ImportError:  # no build installed, or one uninstalled from under another
        return None
    if hasattr(onnxruntime, "set_default_logger_severity"):
        onnxruntime.set_default_logger_severity(4)
    return onnxruntime


def check_installation() -> None:
    """Raise RuntimeUnavailable with the fix when onnxruntime is missing or clobbered."""
    problem = installation_problem(installed_builds(), hasattr(_ort(), "InferenceSession"))
    if problem:
        raise RuntimeUnavailable(problem)


def build_name() -> str:
    """The installed build as the user knows it, e.g. 'onnxruntime 1.32.0'."""
    builds = installed_builds()
    name = builds[0] if builds else "onnxruntime"
    return f"{name} {getattr(_ort(), '__version__', '?')}"


def ort_message(exc: BaseException) -> str:
    """The useful part of an onnxruntime error (without the C++ source location), one line."""
    text = " ".join(str(exc).split())
    parts = [p for p in re.split(r"\] : \d+ : \w+ : |was false\. |\)> ", text) if p.strip()]
    last = parts[-1] if parts else text
    return re.sub(r"/\S+:\d+ ", "", last)[:400]  # C++ source locations say nothing to a user

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def training_modules():
    """Import (artifacts, api, onnxblock) from the training build without importing torch."""
    _shim_training_optim()
    try:
        from onnxruntime.training import api, artifacts, onnxblock
    except ImportError as exc:  # plain onnxruntime installed over the training build
        raise RuntimeUnavailable(
            "this onnxruntime build has no training support; install onnxruntime-training-cpu==1.19.2 "
            "(and uninstall onnxruntime / onnxruntime-gpu, which replace it)"
        ) from exc
    return artifacts, api, onnxblock


def gradient_builder():
    """The native GradientGraphBuilder and get_optimized_model of the training build."""
    from onnxruntime.capi import _pybind_state as C

    if not hasattr(C, "GradientGraphBuilder"):
        raise RuntimeUnavailable(
            "this onnxruntime build has no GradientGraphBuilder; install onnxruntime-training-cpu==1.19.2 "
            "(and uninstall onnxruntime / onnxruntime-gpu, which replace it)"
        )
    return C.GradientGraphBuilder, C.get_optimized_model, C.SessionOptions


def differentiable_nodes(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """``node``, or the same function in ops that have a gradient in onnxruntime-training.

    ORT 1.19 registers no gradient for PRelu; PRelu(x, s) = Relu(x) - s * Relu(-x) has one (they
    differ only in the derivative at x == 0 exactly), and the slope keeps its initializer name.
    """
    if node.op_type != "PRelu":
        return [node]
    (x, slope), (y,) = node.input, node.output
    tag = f"{y}.prelu_as_relu"
    make = onnx.helper.make_node
    return [
        make("Relu", [x], [f"{tag}.pos"], name=f"{tag}.relu_pos"),
        make("Neg", [x], [f"{tag}.neg_x"], name=f"{tag}.neg"),
        make("Relu", [f"{tag}.neg_x"], [f"{tag}.neg"], name=f"{tag}.relu_neg"),
        make("Mul", [slope, f"{tag}.neg"], [f"{tag}.scaled"], name=f"{tag}.mul"),
        make("Sub", [f"{tag}.pos", f"{tag}.scaled"], [y], name=f"{tag}.sub"),
    ]


def provider_list(provider: str = "cpu") -> list[str]:
    """The execution providers for ``provider`` ('cpu' or 'cuda'), or a clear error when absent."""
    check_installation()
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)}")
    name = PROVIDERS[provider]
    if name not in _ort().get_available_providers():
        raise RuntimeUnavailable(
            f"provider {provider!r} is not available in this onnxruntime build "
            f"(available: {', '.join(_ort().get_available_providers())}); for CUDA install the "
            "gpu extra (pip install 'onnxprune[gpu]' in an environment without another onnxruntime build), "
            "see docs/install-gpu.md"
        )
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]


def session_options(threads: int | None = None, arena: bool = True) -> Any:
    """Session options that do not leave spinning threads behind to slow numpy down; without
    ``arena`` the CPU memory of a run goes back when it ends (derivative graphs: their peak is
    the largest part of a run's memory, and an arena would keep it for the rest of the run)."""
    check_installation()
    so = _ort().SessionOptions()
    so.enable_cpu_mem_arena = arena
    so.log_severity_level = 4  # errors come back as exceptions; their log lines would break one-line CLI errors
    if threads:
        so.intra_op_num_threads = int(threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


@contextlib.contextmanager
def blas_threads(threads: int | None = None):
    """Inside: numpy's BLAS uses at most ``threads`` threads (None: as it is).

    With ``--threads N`` onnxruntime and numpy each get N threads; they alternate (a batch through
    onnxruntime, then its products in numpy), so neither oversubscribes the other as long as neither
    spins: onnxruntime's spinning is off (``session_options``), and OpenBLAS's idle workers only yield.
    """
    if not threads:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(threads), user_api="blas"):
        yield


_CONTROLLER = None


def one_blas_thread():
    """A context in which numpy's BLAS uses one thread: its float32 products then round the same way
    whatever --threads says (a multi-threaded GEMM splits the sums differently), and on a busy 2-core
    machine one thread was also the cheaper (scripts/bench.py, Threads)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


def make_session(model: onnx.ModelProto | bytes | str, provider: str = "cpu", threads: int | None = None,
                 arena: bool = True):
    """An InferenceSession on a runtime-compatible copy of ``model`` (bytes and paths as they are)."""
    check_installation()
    if isinstance(model, onnx.ModelProto):
        model = (runtime_copy(model) if needs_runtime_copy(model) else model).SerializeToString()
    return _ort().InferenceSession(model, sess_options=session_options(threads, arena), providers=provider_list(provider))


INLINE_BYTES = 1 << 30  # a model above this many initializer bytes goes to onnxruntime as a file with external data


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (len(t.int64_data) + len(t.double_data))
               for t in model.graph.initializer)


def proto_session(model: onnx.ModelProto, provider: str = "cpu", threads: int | None = None, arena: bool = True):
    """A session on ``model`` as built (no re-stamping). Under INLINE_BYTES of weights it goes to
    onnxruntime serialized; above (a derivative graph of a model near protobuf's 2 GB limit) it is
    written to a temporary folder with its weights as external data and loaded from that path."""
    if initializer_bytes(model) <= INLINE_BYTES:
        return make_session(model.SerializeToString(), provider, threads, arena)
    folder = Path(tempfile.mkdtemp(prefix="onnxprune-graph-"))
    try:
        path = folder / "graph.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="graph.onnx.data", size_threshold=1024)
        return make_session(str(path), provider, threads, arena)
    finally:  # onnxruntime has read (or mapped) the weights by now
        shutil.rmtree(folder, ignore_errors=True)


def tensor_session(model: onnx.ModelProto, names: list[str], provider: str = "cpu", threads: int | None = None,
                   arena: bool = True):
    """A session whose outputs are the tensors ``names`` (graph outputs or intermediates)."""
    from onnxprune.graph.index import tensor_types

    m = runtime_copy(model)
    types = tensor_types(m)
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None) for n in names)
    return make_session(m, provider, threads, arena)


def run_tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str],
                provider: str = "cpu") -> list[np.ndarray]:
    """Values of the tensors ``names`` for ``feeds`` (one-off; build a tensor_session to loop)."""
    return tensor_session(model, names, provider).run(names, feeds)
