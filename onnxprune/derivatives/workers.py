"""The workers of the sharded statistics service: one actor interface (``Worker``: a job started
once, then shard after shard), run by local processes (``LocalWorkers``, no extra needed) or by Ray
actors (``RayWorkers``, the ``ray`` extra; imported only when asked for).

A local worker is a fresh interpreter in a session of its own (a Ctrl-C in the terminal reaches the
command, not its workers), talking over a socket pair; it dies with the command (PR_SET_PDEATHSIG on
Linux) and is stopped by it on every way out: a result, an error, SIGINT or SIGTERM. A Ray worker is
an actor that reserves --threads CPUs (one GPU with --provider cuda); the command kills its actors on
every way out, and the cluster ends them with the command's connection. A worker that dies ends the
run with one line (``WorkerLost``); nothing is retried.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol, cast

from onnxprune.derivatives.plan import DerivativeSettings
from onnxprune.errors import STOP_SIGNALS, InputError, OnnxPruneError, RuntimeUnavailable, first_line
from onnxprune.io.data import Dataset

CHILD = "from onnxprune.derivatives.workers import serve; serve()"
RAY_DEPTH = 2         # shards queued per Ray actor: the next one's data travels while one is computed
CONNECT_TIMEOUT = 10  # seconds to reach a Ray cluster's address before saying it is unreachable
_joined: list[str] = []  # the address this process's Ray connection is to
STOP_WAIT = 5         # seconds a stopped local worker gets before it is killed


class Job(Protocol):
    """What a worker computes: ``start`` once in the worker (what every shard shares), then
    ``shard`` per shard (its sums and what ran); ``merge`` combines two shards' sums (in place of
    the first) on the driver. ``settings`` says how (the worker's threads are set by the service)."""

    settings: DerivativeSettings

    def start(self) -> None: ...

    def shard(self, index: int, data: Dataset) -> tuple[Any, dict]: ...

    def merge(self, first: Any, second: Any) -> Any: ...


def worker_threads(settings: DerivativeSettings, workers: int) -> int:
    """Threads of each local worker: --threads, else the CPUs shared out (at least one)."""
    return settings.threads or max(1, (os.cpu_count() or 1) // max(workers, 1))


def with_threads(job, threads: int):
    """``job`` (a dataclass with ``settings``) with its engine's threads set to ``threads``."""
    return replace(job, settings=replace(job.settings, threads=threads))


class WorkerLost(OnnxPruneError):
    """A statistics worker died or failed, or its cluster could not be reached: the run stops. Exit 1."""

    exit_code = 1


class Worker:
    """What a long-lived worker holds: its job, started once (the graph is built on the first batch
    and kept), and the shards it is given one at a time."""

    def __init__(self, job: Job):
        self.job = job
        job.start()

    def shard(self, index: int, data: Dataset) -> tuple[int, Any, dict]:
        sums, info = self.job.shard(index, data)
        return index, sums, info

    def pid(self) -> int:
        return os.getpid()


def _portable(exc: BaseException, index: int) -> BaseException:
    """What a worker sends back for a failure: our own one-line errors as they are (bad input stays
    exit 2), anything else as WorkerLost with its type and first line."""
    if isinstance(exc, OnnxPruneError | RuntimeUnavailable):
        try:
            pickle.dumps(exc)
            return exc
        except Exception:  # noqa: BLE001 - an unpicklable error still gets its line across
            pass
    return WorkerLost(f"a statistics worker failed on shard {index}: {type(exc).__name__}: {first_line(exc)}")


def _die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when the command that started it dies (even by SIGKILL)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the command died before the line above
        os._exit(1)


def serve() -> None:
    """A local worker's main: the job (pickled, once), then shards until the socket closes."""
    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    _die_with_parent(parent)
    conn = Connection(fd)
    try:
        job = pickle.loads(conn.recv_bytes())
        worker, failure = None, None
        try:
            worker = Worker(job)
        except Exception as exc:  # noqa: BLE001 - reported with the first shard
            failure = exc
        while True:
            index, data = conn.recv()
            try:
                if worker is None:
                    raise failure  # type: ignore[misc]
                conn.send(("done", worker.shard(index, data)))
            except Exception as exc:  # noqa: BLE001 - every failure goes back as one line
                conn.send(("error", _portable(exc, index)))
    except (EOFError, OSError):  # the command closed the socket or is gone
        return


class LocalWorkers:
    """``size`` worker processes on this machine, each sent the job once."""

    where = "local"

    def __init__(self, job: Job, size: int):
        self.size = size
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self.tails: list[deque] = []
        payload = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for _ in range(size):
                ours, theirs = socket.socketpair()
                with theirs:
                    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs.fileno()), str(os.getpid())],
                                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
                self.procs.append(proc)
                self.conns.append(Connection(ours.detach()))
                self.tails.append(deque(maxlen=3))
                threading.Thread(target=_drain, args=(proc.stderr, self.tails[-1]), daemon=True).start()
            for number, conn in enumerate(self.conns):
                try:
                    conn.send_bytes(payload)
                except OSError:
                    raise self._lost(number, None) from None
        except BaseException:
            self.close()
            raise

    def map(self, shards: Iterator[tuple[int, Dataset]]) -> Iterator[tuple[int, Any, dict]]:
        """(index, sums, report) of every shard, in the order they finish; one shard per worker at a time."""
        idle, busy = list(range(self.size)), {}
        pending = iter(shards)
        while True:
            while idle:
                shard = next(pending, None)
                if shard is None:
                    break
                number = idle.pop(0)
                try:
                    self.conns[number].send(shard)
                except OSError:
                    raise self._lost(number, shard[0]) from None
                busy[self.conns[number]] = (number, shard[0])
            if not busy:
                return
            for ready in wait(list(busy)):
                conn = cast(Connection, ready)
                number, index = busy.pop(conn)
                try:
                    kind, value = conn.recv()
                except (EOFError, OSError):
                    raise self._lost(number, index) from None
                if kind == "error":
                    raise cast(BaseException, value)
                idle.append(number)
                yield cast(tuple[int, Any, dict], value)

    def _lost(self, number: int, index: int | None) -> WorkerLost:
        proc = self.procs[number]
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_WAIT)
        code = proc.poll()
        how = ("is gone" if code is None else f"was killed by {signal.Signals(-code).name}" if code < 0
               else f"exited with code {code}")
        doing = "starting" if index is None else f"computing shard {index}"
        said = f" (its last words: {self.tails[number][-1]})" if self.tails[number] else ""
        return WorkerLost(f"statistics worker {number + 1} of {self.size} (pid {proc.pid}) {how} while {doing}{said}")

    def close(self) -> None:
        """Stop every worker: its socket closed, SIGTERM, then SIGKILL after STOP_WAIT seconds."""
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=STOP_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _drain(stream, tail: deque) -> None:
    """Keep the last lines a worker wrote to stderr (for the one line if it dies); drop the rest."""
    with contextlib.suppress(OSError, ValueError):
        for line in stream:
            text = line.decode(errors="replace").strip()
            if text:
                tail.append(text[:200])


def import_ray():
    """The ray module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray, which is not installed: pip install 'onnxprune[ray]'") from None
    return ray


def ray_address(ray, address: str) -> str:
    """host:port of the cluster ``address`` names ("auto": the one `ray start` made on this machine)."""
    if address != "auto" and "://" in address:
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address(address)
    except Exception as exc:  # noqa: BLE001 - ray's own reasons, in one line
        raise WorkerLost(f"no Ray cluster found at {address!r}: {first_line(exc)}") from None
    if not found:
        raise WorkerLost(f"no Ray cluster found at {address!r} (start one with `ray start --head`)")
    return str(found)


def _reachable(address: str) -> None:
    """One line at once, not Ray's minutes of retries, when nothing listens at ``address``."""
    if "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except (OSError, ValueError) as exc:
        raise WorkerLost(f"the Ray cluster at {address} cannot be reached: {first_line(exc)}") from None


def connect(ray, address: str) -> str:
    """Join the cluster at ``address`` (once per process); our stop-signal handlers are kept (Ray's
    would turn SIGTERM into a bare exit)."""
    target = ray_address(ray, address)
    if ray.is_initialized():
        if _joined == [target]:
            return target
        ray.shutdown()  # another cluster (an API caller's earlier run): this one is asked for
    _joined.clear()
    _reachable(target)
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        ray.init(address=target, logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
    except Exception as exc:  # noqa: BLE001 - ray's many connection errors, in one line
        raise WorkerLost(f"cannot join the Ray cluster at {target}: {first_line(exc)}") from None
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)
    _joined.append(target)
    return target


class RayWorkers:
    """Ray actors of a cluster, the job shipped once through its object store."""

    def __init__(self, job: Job, settings: DerivativeSettings, shards: int):
        self.ray = ray = import_ray()
        address = connect(ray, str(settings.ray))
        gpu = settings.provider == "cuda"
        threads = settings.threads or 1
        kind, each = ("GPU", 1) if gpu else ("CPU", threads)
        have = ray.cluster_resources().get(kind, 0)
        asked = settings.workers or int(have // each)
        if asked < 1 or asked * each > have:
            raise InputError(f"the Ray cluster at {address} has {have:g} {kind}s: "
                             f"{asked or 'no'} workers of {each} {kind} each do not fit")
        self.size, self.where = min(asked, shards), f"ray {address}"
        shipped = ray.put(with_threads(job, threads))
        actor = ray.remote(Worker).options(num_cpus=0 if gpu else threads, num_gpus=1 if gpu else 0, max_restarts=0)
        self.actors = [actor.remote(shipped) for _ in range(self.size)]

    def map(self, shards: Iterator[tuple[int, Dataset]]) -> Iterator[tuple[int, Any, dict]]:
        ray = self.ray
        pending: dict[Any, tuple[int, int]] = {}
        load = [0] * self.size
        source, exhausted = iter(shards), False
        while True:
            while not exhausted and min(load) < RAY_DEPTH:
                shard = next(source, None)
                if shard is None:
                    exhausted = True
                    break
                number = load.index(min(load))
                pending[self.actors[number].shard.remote(*shard)] = (number, shard[0])
                load[number] += 1
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # a timeout: signals are seen
            for ref in done:
                number, index = pending.pop(ref)
                load[number] -= 1
                yield self._result(ref, number, index)

    def _result(self, ref, number: int, index: int):
        from ray.exceptions import RayActorError, RayError, RayTaskError

        try:
            index, sums, info = self.ray.get(ref)
            return index, copy.deepcopy(sums), info  # the object store's arrays are read-only; the reduce adds in place
        except RayTaskError as exc:  # the job raised: ours as it is, else one line
            raise _portable(exc.cause if exc.cause is not None else exc, index) from None
        except RayActorError as exc:
            raise WorkerLost(f"statistics worker {number + 1} of {self.size} (a Ray actor) died while computing "
                             f"shard {index}: {first_line(exc)}") from None
        except RayError as exc:
            raise WorkerLost(f"the Ray cluster failed on shard {index}: {first_line(exc)}") from None

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)


@contextlib.contextmanager
def pool(job: Job, settings: DerivativeSettings, shards: int):
    """The workers ``settings`` ask for (at most one per shard), stopped on every way out."""
    if settings.workers is not None and settings.workers < 1:
        raise InputError(f"--workers must be a positive number, got {settings.workers}")
    if settings.ray is not None:
        workers: LocalWorkers | RayWorkers = RayWorkers(job, settings, shards)
    else:
        size = min(int(settings.workers or 1), max(shards, 1))
        workers = LocalWorkers(with_threads(job, worker_threads(settings, size)), size)
    try:
        yield workers
    finally:
        workers.close()

