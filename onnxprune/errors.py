"""The kinds of failure a user sees, each with its exit code (docs/guide/outputs.md, "Exit codes")."""
from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    return ((str(exc).strip() or type(exc).__name__).splitlines() or [type(exc).__name__])[0][:limit]


class RuntimeUnavailable(RuntimeError):
    """The installed onnxruntime build cannot do what was asked (no CUDA, no training support)."""


class OnnxPruneError(Exception):
    """Base class: a one-line message for the user, no traceback."""

    exit_code = 1


class InputError(OnnxPruneError):
    """Bad input: a corrupt or unsupported model, malformed data, a refused output path. Exit 2."""

    exit_code = 2


class Limitation(OnnxPruneError):
    """The input is valid (the model runs) but onnxprune cannot do this with it: an op without a
    derivative rule, a derivative graph onnxruntime refuses. Ours to fix, not the user's. Exit 1."""

    exit_code = 1


class CheckFailed(OnnxPruneError):
    """The work ran but a check on its result failed (checker, runtime, a budget). Exit 1."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same clean-ups run. Exit 143."""


INTERRUPT_EXIT = {KeyboardInterrupt: 130, Terminated: 128 + signal.SIGTERM}


def interrupt_exit(exc: KeyboardInterrupt) -> tuple[str, int]:
    """('interrupted' or 'terminated', exit code) for an interruption."""
    if isinstance(exc, Terminated):
        return "terminated", INTERRUPT_EXIT[Terminated]
    return "interrupted", INTERRUPT_EXIT[KeyboardInterrupt]


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated()


def handle_sigterm() -> None:
    """From now on SIGTERM unwinds the program like Ctrl-C (temporary files are removed on the way)."""
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave the default
        pass


COMMAND = "onnxprune"


@contextlib.contextmanager
def loading():
    """Around the package's imports. Under the ``onnxprune`` command, SIGTERM is handled from here
    on, and an interruption while the libraries load ends with one line and its exit code (nothing
    has been written yet). Imported as a library, nothing changes."""
    if Path(sys.argv[0] if sys.argv else "").name != COMMAND:
        yield
        return
    handle_sigterm()
    try:
        yield
    except KeyboardInterrupt as exc:
        what, code = interrupt_exit(exc)
        sys.stderr.write(f"Error: {what} while starting; no output was written\n")
        sys.exit(code)


def run_script(main) -> None:
    """Entry point of the scripts/: exit with main()'s code, or one line and the error's exit code."""
    import sys

    try:
        sys.exit(main())
    except OnnxPruneError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except RuntimeUnavailable as exc:  # no CUDA, no training build: the work cannot start here
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)
