"""Atomic, non-clobbering writes for every file the product produces.

A result appears under its final name only once it is complete: we write a temporary file in the
same folder and ``os.replace`` it. A command with several outputs (a model, its external data, a
JSON report, a plot) stages them all in ``Outputs`` and renames them together at the end, so a
failure in any one leaves none behind. Output paths are checked against every input and against
each other by resolved real path: an input is never replaced, with or without ``force``; an existing
file (a dangling symlink included) only with ``force``; a FIFO, device, socket or directory never.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from onnxprune.errors import InputError

STDOUT = "-"  # the --json path that means standard output


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file: the same real path, or hard links to one inode."""
    if _real(a) == _real(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def check_output_path(path: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse to write over an input, over anything but a regular file, or over an existing file
    (a dangling symlink included) without ``force``."""
    path = Path(path)
    for source in inputs:
        if source is not None and str(source) != STDOUT and _same_file(Path(source), path):
            raise InputError(f"refusing to overwrite the input file {path}; choose another output path")
    if os.path.lexists(path):
        try:
            mode = os.stat(path).st_mode
        except OSError:  # a dangling symlink: replacing it needs --force like any existing name
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "not a regular file")
            raise InputError(f"{path} is {kind}, not a regular file; choose another output path")
        if not force:
            raise InputError(f"{path} exists; pass --force to replace it")
    if not path.parent.exists():
        raise InputError(f"output folder {path.parent} does not exist")
    return path


def _temporary(path: Path, directory: bool = False) -> Path:
    """A new, empty temporary file (or folder) beside ``path``, with the usual permissions."""
    if directory:
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results get the usual permissions
    return Path(tmp)


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done (the renames of one set of outputs)."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Outputs:
    """The files one command writes, all or none.

    ``claim`` checks a path up front (against the inputs, the other outputs and ``force``);
    ``stage`` writes its content to a temporary file beside it; leaving the ``with`` block renames
    every staged file into place (signals held meanwhile), or, on any exception, removes them all.
    """

    def __init__(self, inputs: Iterable[str | Path | None] = (), force: bool = False):
        self.inputs = [Path(p) for p in inputs if p is not None and str(p) != STDOUT]
        self.force = force
        self.claimed: list[Path] = []
        self.committed: list[Path] = []              # renamed into place
        self._staged: list[tuple[Path, Path]] = []   # (temporary, final)
        self._scratch: list[Path] = []               # temporary folders to remove at the end

    def claim(self, path: str | Path) -> Path:
        """Check ``path`` as a new output."""
        path = check_output_path(path, self.force, self.inputs)
        for other in self.claimed:
            if _same_file(other, path):
                raise InputError(f"two outputs would be written to {path}; give them different paths")
        self.claimed.append(path)
        return path

    def claimed_or_claim(self, path: str | Path) -> Path:
        """``path`` if it was claimed already (in this spelling), else claimed now."""
        return Path(path) if Path(path) in self.claimed else self.claim(path)

    def stage(self, path: str | Path, write: Callable[[Path], None]) -> None:
        """Produce the content of ``path`` (claimed before) with ``write(temporary_path)``."""
        path = Path(path)
        tmp = _temporary(path)
        self._staged.append((tmp, path))
        write(tmp)

    def stage_file(self, tmp: Path, path: str | Path) -> None:
        """Adopt ``tmp``, already written beside ``path``, as its content."""
        self._staged.append((Path(tmp), Path(path)))

    def scratch_folder(self, near: Path) -> Path:
        """A temporary folder beside ``near``, removed when the outputs are committed or discarded."""
        folder = _temporary(Path(near), directory=True)
        self._scratch.append(folder)
        return folder

    def staged_size(self, path: str | Path) -> dict[str, int]:
        """Bytes staged for ``path`` (its external data file included), raw and zlib-compressed."""
        path = Path(path)
        data = path.parent / (path.name + ".data")
        files = [tmp for tmp, final in self._staged if final in (path, data)]
        return {"bytes": sum(f.stat().st_size for f in files),
                "zlib_bytes": sum(len(zlib.compress(f.read_bytes(), 6)) for f in files)}

    def commit(self) -> None:
        with _signals_held():
            for tmp, final in self._staged:
                os.replace(tmp, final)
                self.committed.append(final)
            self._staged = []
        self._clean()

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._staged = []
        self._clean()

    def _clean(self) -> None:
        for folder in self._scratch:
            shutil.rmtree(folder, ignore_errors=True)
        self._scratch = []

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, else removed."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def json_text(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def write_json(path: str | Path, obj) -> None:
    write_text(path, json_text(obj))


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically produce ``path`` with ``writer(tmp_path)`` (e.g. matplotlib's savefig)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
