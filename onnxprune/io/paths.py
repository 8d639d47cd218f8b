"""Output paths: names that say what the user meant and that the filesystem takes, and whether a
path names an input (by resolved real path, or as a hard link to it)."""
from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from onnxprune.errors import InputError

STDOUT = "-"  # the --json path that means standard output


def real_path(path: Path) -> str:
    return os.path.realpath(path)


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file: the same real path, or hard links to one inode."""
    if real_path(a) == real_path(b):
        return True
    with contextlib.suppress(OSError, ValueError):
        return os.path.samefile(a, b)
    return False


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file ``path`` names (through symlinks), None when there is none."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the filesystem of ``folder`` takes."""
    with contextlib.suppress(OSError, ValueError):
        return int(os.pathconf(folder if folder.is_dir() else ".", "PC_NAME_MAX"))
    return 255


PATH_MAX = 4096  # bytes of a path the system calls take, the terminating NUL included (Linux)


def check_output_name(text: str | Path, room: int = 0) -> None:
    """Refuse an output path that names no file the way a user meant it: empty, ending in a slash
    (a folder), starting with '-' (an option that went astray: ``--json -v``), a name longer than
    the filesystem takes (with ``room`` bytes to spare for a suffix such as '.data'), a path longer
    than the system takes. ``text`` is the path as given (a ``Path`` has lost its trailing slash)."""
    raw = str(text)
    if not raw:
        raise InputError("an output path is empty")
    if "\0" in raw:
        raise InputError(f"the output path {raw!r} contains a NUL character")
    path = Path(raw)
    shown = raw if len(raw) <= 80 else raw[:60] + "..." + raw[-15:]
    if raw.endswith(("/", os.sep)) or path.name in ("", ".", ".."):
        raise InputError(f"the output path {shown} names a folder; give the path of a file")
    if raw.startswith("-") and raw != STDOUT:
        raise InputError(f"the output path {shown} starts with '-' like an option; write ./{raw} if that is the "
                         "file's name")
    limit = name_max(path.parent)
    size = len(os.fsencode(path.name))
    if size + room > limit:
        extra = f" (and its external data file adds {room} more)" if room else ""
        raise InputError(f"the file name of {shown} is {size} bytes{extra}; the filesystem takes at most {limit}")
    full = len(os.fsencode(os.path.abspath(raw))) + room
    if full >= PATH_MAX:
        raise InputError(f"the output path {shown} is {full} bytes long; the system takes paths of at most "
                         f"{PATH_MAX - 1}")


def check_output_path(path: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse a badly formed name (``check_output_name``), to write over an input, over anything
    but a regular file, or over an existing file (a dangling symlink included) without ``force``."""
    check_output_name(path)
    path = Path(path)
    for source in inputs:
        if source is not None and str(source) != STDOUT and same_file(Path(source), path):
            raise InputError(f"refusing to overwrite the input file {path}; choose another output path")
    if os.path.lexists(path):
        try:
            mode = os.stat(path).st_mode
        except OSError:  # a dangling symlink: replacing it needs --force like any existing name
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise InputError(f"{path} is {file_kind(mode)}, not a regular file; choose another output path")
        if not force:
            raise InputError(f"{path} exists; pass --force to replace it")
    try:
        folder_exists = path.parent.is_dir()
    except OSError:
        folder_exists = False
    if not folder_exists:
        raise InputError(f"output folder {path.parent} does not exist")
    return path


def file_kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
