"""Commands as the results pages record them: runnable from the repository root on any machine, so
a path of the machine that ran them (a data folder, a temporary file) is written as ``…/NAME``."""
from __future__ import annotations

import shlex
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
MACHINE_FOLDERS = {"tmp", "work", "home", "root", "Users", "wt", "shared"}


def portable_path(text: str) -> str:
    """``text`` unchanged unless it is a path outside the repository: then ``…/`` and its last two
    parts, the last alone under a machine's top folders (a relative path that leaves the repository
    counts as outside)."""
    if "/" not in text or text.startswith("-"):
        return text
    path = Path(text)
    resolved = path.resolve() if not path.is_absolute() else path
    try:
        resolved.relative_to(REPOSITORY)
    except ValueError:
        parent = path.parent.name
        return "…/" + (path.name if parent in MACHINE_FOLDERS or not parent or parent == ".." else f"{parent}/{path.name}")
    return text if not path.is_absolute() else str(resolved.relative_to(REPOSITORY))


def portable_command(words: list[str]) -> str:
    """A shell command line of ``words`` with every path outside the repository elided (portable_path),
    options written ``--name=VALUE`` included."""
    out = []
    for word in words:
        name, sep, value = word.partition("=")
        out.append(f"{name}={portable_path(value)}" if sep and word.startswith("--") else portable_path(word))
    return " ".join(word if "…/" in word else shlex.quote(word) for word in out)
