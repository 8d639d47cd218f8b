"""Atomic, non-clobbering writes for every file the product produces.

A result appears under its final name only once it is complete: we write a temporary file in the
same folder and ``os.replace`` it. An existing file is replaced only with ``force``; an input is
never replaced, with or without it.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import InputError


def check_output_path(path: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse to write over an input, or over an existing file without ``force``."""
    path = Path(path)
    for source in inputs:
        if source is not None and Path(source).exists() and path.exists() and os.path.samefile(source, path):
            raise InputError(f"refusing to overwrite the input file {path}; choose another output path")
    if path.exists() and not force:
        raise InputError(f"{path} exists; pass --force to replace it")
    if path.exists() and path.is_dir():
        raise InputError(f"{path} is a directory")
    if not path.parent.exists():
        raise InputError(f"output folder {path.parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, else removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results get the usual permissions
    try:
        yield Path(tmp)
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


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


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
