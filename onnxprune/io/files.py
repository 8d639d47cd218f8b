"""Atomic, non-clobbering writes for every file the product produces.

A result appears under its final name only once it is complete: we write a temporary file in the
same folder and rename it. A command with several outputs (a model, its external data, a JSON
report, a plot) stages them all in ``Outputs`` and puts them in place together at the end, all or
none: a rename that fails undoes the ones before it. Output paths are checked against every input
and against each other by resolved real path: an input (a model's external data files included,
which ``note_inputs`` adds when the model is read) is never replaced, with or without ``force``; an
existing file (a dangling symlink included) only with ``force``; a FIFO, device, socket or
directory never. Those checks are made again at the moment of each rename, so a file that
appeared at an output path meanwhile (another run's result, a FIFO, the input renamed there) is
not replaced either.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import stat
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from onnxprune.errors import STOP_SIGNALS, InputError, OutputFailed, first_line
from onnxprune.io.paths import STDOUT, check_output_path, file_identity, file_kind, same_file

DATA_SUFFIX = ".data"  # a written model's external data file is OUT + this


def usual_mode(path: Path) -> None:
    """Give ``path`` the permissions of any file the user creates (0666 less the umask): mkstemp and
    onnx's external data writer make theirs 0600, which a service running as another user cannot
    read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _short(name: str) -> str:
    """The start of a file name, short enough that a temporary name made of it fits any filesystem."""
    return os.fsencode(name)[:100].decode("utf-8", "ignore")


def _temporary(path: Path, directory: bool = False) -> Path:
    """A new, empty temporary file (or folder) beside ``path``, with the usual permissions. Its
    name keeps the start of ``path``'s name (to tell whose it is) within the filesystem's limit,
    and its suffix (matplotlib chooses the format by it)."""
    suffix = path.suffix if len(path.suffix) <= 16 else ""
    stem = _short(path.name)
    if directory:
        return Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=path.parent))
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    usual_mode(Path(tmp))
    return Path(tmp)


@contextlib.contextmanager
def _signals_held():
    """Stop signals (Ctrl-C, SIGTERM, ...) wait until the block is done (the renames of one set of
    outputs, or their removal), then take effect. Their handlers are swapped, not the signal mask:
    onnxruntime's and BLAS's threads would still receive a masked signal, and Python runs its
    handler in the main thread all the same."""
    pending: list[int] = []
    try:
        previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in STOP_SIGNALS}
    except ValueError:  # not the main thread, whose handlers run anyway
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            handler = previous[signal.Signals(pending[0])]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])


_active: list[Outputs] = []  # the output sets being written now (the innermost last)


def note_inputs(paths: Iterable[str | Path], what: str = "") -> None:
    """Files that are read as inputs though no option named them (a model's external data files):
    every output set being written now refuses to write over them, and says so at once when one of
    its claimed paths is one of them. ``what`` says whose they are, for the message."""
    files = [Path(p) for p in paths]
    for outputs in _active:
        outputs.add_inputs(files, what)


class Outputs:
    """The files one command writes, all or none.

    ``claim`` checks a path up front (against the inputs, the other outputs and ``force``);
    ``stage`` writes its content to a temporary file beside it; leaving the ``with`` block puts
    every staged file in place (signals held meanwhile; a rename that fails undoes the others), or,
    on any exception, removes them all.
    """

    def __init__(self, inputs: Iterable[str | Path | None] = (), force: bool = False):
        self.inputs: list[Path] = []
        self._identities: dict[tuple[int, int], Path] = {}
        self.force = force
        self.claimed: list[Path] = []
        self.committed: list[Path] = []              # put in place
        self._staged: list[tuple[Path, Path]] = []   # (temporary, final)
        self._scratch: list[Path] = []               # temporary folders to remove at the end
        self.add_inputs([Path(p) for p in inputs if p is not None and str(p) != STDOUT])

    def add_inputs(self, paths: Iterable[Path], what: str = "") -> None:
        """More input files (see ``note_inputs``), checked against the paths claimed so far."""
        for path in paths:
            self.inputs.append(path)
            identity = file_identity(path)
            if identity is not None:
                self._identities.setdefault(identity, path)
            whose = f" ({what})" if what else ""
            for claimed in self.claimed:
                if same_file(claimed, path):
                    raise InputError(f"refusing to overwrite the input file {claimed}{whose}; choose another output path")
                data = claimed.parent / (claimed.name + DATA_SUFFIX)
                if same_file(data, path):
                    raise InputError(f"refusing to write {claimed}: its external data file {data} is an input file"
                                     f"{whose}; choose another output path")

    def claim(self, path: str | Path) -> Path:
        """Check ``path`` as a new output."""
        path = check_output_path(path, self.force, self.inputs)
        for other in self.claimed:
            if same_file(other, path):
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
        data = path.parent / (path.name + DATA_SUFFIX)
        files = [tmp for tmp, final in self._staged if final in (path, data)]
        return {"bytes": sum(f.stat().st_size for f in files),
                "zlib_bytes": sum(len(zlib.compress(f.read_bytes(), 6)) for f in files)}

    def commit(self) -> None:
        """Put every staged file in place, or none: on the first failure the files already put in
        place are taken back (a replaced file gets its old content back) and an OutputFailed says why."""
        placed: list[tuple[Path, Path | None]] = []  # (final, backup of what it replaced)
        current = None
        with _signals_held():
            try:
                for tmp, current in self._staged:
                    placed.append((current, self._place(tmp, current)))
            except BaseException as exc:
                for final, backup in reversed(placed):
                    with contextlib.suppress(OSError):
                        if backup is not None:
                            os.replace(backup, final)
                        else:
                            os.unlink(final)
                self._remove_staged()
                self._clean()
                if isinstance(exc, InputError):
                    raise OutputFailed(f"{exc}; no output was written") from None
                if isinstance(exc, OSError):
                    raise OutputFailed(f"cannot write {current} ({first_line(exc)}); no output was written") from None
                raise
            for _, backup in placed:
                if backup is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(backup)
            self.committed.extend(final for final, _ in placed)
            self._staged = []
        self._clean()

    def _place(self, tmp: Path, final: Path) -> Path | None:
        """Rename ``tmp`` to ``final`` if what is there now may be replaced: nothing (a new file
        never replaces one that appeared meanwhile), or with ``force`` a regular file that is no
        input. Returns a hard link to the replaced file (to undo the rename), or None."""
        try:
            os.link(tmp, final)  # fails if anything appeared at final, atomically
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if not os.path.lexists(final):  # no hard links on this filesystem: the check, then the rename
                os.replace(tmp, final)
                return None
        else:
            os.unlink(tmp)
            return None
        identity = file_identity(final)
        if identity in self._identities:
            raise InputError(f"refusing to overwrite the input file {self._identities[identity]}, which is now at {final}")
        try:
            mode = os.stat(final).st_mode
        except OSError:
            mode = stat.S_IFREG  # a dangling symlink
        if not stat.S_ISREG(mode):
            raise InputError(f"{final} became {file_kind(mode)} while this command ran; it is not replaced")
        if not self.force:
            raise InputError(f"{final} appeared while this command ran; pass --force to replace it")
        backup = final.parent / f".{_short(final.name)}.{secrets.token_hex(4)}.replaced"
        try:
            os.link(final, backup, follow_symlinks=False)
            linked = True
        except OSError:  # no hard link to it allowed: move it aside (its name is empty for a moment)
            os.rename(final, backup)
            linked = False
        try:
            os.replace(tmp, final)
        except BaseException:
            if linked:
                os.unlink(backup)
            else:
                os.rename(backup, final)
            raise
        return backup

    def _remove_staged(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._staged = []

    def discard(self) -> None:
        with _signals_held():
            self._remove_staged()
            self._clean()

    def _clean(self) -> None:
        for folder in self._scratch:
            shutil.rmtree(folder, ignore_errors=True)
        self._scratch = []

    def __enter__(self) -> Outputs:
        _active.append(self)
        return self

    def __exit__(self, kind, value, tb) -> None:
        with contextlib.suppress(ValueError):
            _active.remove(self)
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


def available_memory() -> int:
    """Bytes of memory the system can give now without swapping (MemAvailable; all of it where
    that is not known)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 1 << 62


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
