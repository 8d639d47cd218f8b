"""The kinds of failure a user sees, each with its exit code (docs/guide/outputs.md, "Exit codes")."""
from __future__ import annotations

import contextlib
import os
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


class OutputFailed(OnnxPruneError):
    """The work ran but its outputs could not be put in place (a full disk, a path that changed
    meanwhile); none of them was left. Exit 1."""

    exit_code = 1


# The signals that stop a command, and how its last line names them. Each ends the command with
# 128 + its number (the code a shell shows for a process killed by it), after the clean-ups.
STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hung up",
                signal.SIGQUIT: "quit"}
_received: list[int] = []  # the first stop signal this process received


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP, SIGQUIT), raised like Ctrl-C's KeyboardInterrupt so that the same
    clean-ups run. Exit 128 + the signal's number (143 for SIGTERM)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__()
        self.signum = signum


INTERRUPT_EXIT = {KeyboardInterrupt: 128 + signal.SIGINT, Terminated: 128 + signal.SIGTERM}


def received_signal() -> int | None:
    """The stop signal that is ending this process, if one came (the exception it raised may have
    been turned into another one by a library on its way up)."""
    return _received[0] if _received else None


def interrupt_exit(exc: BaseException | None = None) -> tuple[str, int]:
    """('interrupted', 'terminated', ... , exit code) for an interruption: the first stop signal
    received, else the one ``exc`` stands for."""
    signum = received_signal()
    if signum is None:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
    return STOP_SIGNALS[signal.Signals(signum)], 128 + signum


def _stop(signum, frame):
    """While a command runs: unwind like Ctrl-C (temporary files are removed on the way); further
    stop signals are ignored from here on, so that they cannot cut the clean-up short."""
    if not _received:
        _received.append(signum)
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _stop_while_starting(signum, frame):
    """While the libraries load nothing has been written: say so and end at once (unwinding an
    import half way only prints its traceback)."""
    word = STOP_SIGNALS[signal.Signals(signum)]
    with contextlib.suppress(OSError):
        os.write(2, f"Error: {word} while starting; no output was written\n".encode())
    os._exit(128 + signum)


def _handle(handler) -> None:
    for signum in STOP_SIGNALS:
        try:
            signal.signal(signum, handler)
        except ValueError:  # not the main thread: leave the defaults
            return


def handle_sigterm() -> None:
    """From now on SIGTERM, SIGHUP and SIGQUIT unwind the program like Ctrl-C (temporary files are
    removed on the way), and a second stop signal cannot interrupt that clean-up."""
    _handle(_stop)


COMMAND = "onnxprune"


def is_command() -> bool:
    """Whether this process is the ``onnxprune`` command (not a library user, not a test runner)."""
    return Path(sys.argv[0] if sys.argv else "").name == COMMAND


@contextlib.contextmanager
def loading():
    """Around the package's imports. Under the ``onnxprune`` command, a stop signal from here until
    the command starts (``command_started``) ends the process with one line and its exit code
    (nothing has been written yet). Imported as a library, nothing changes."""
    if not is_command():
        yield
        return
    _handle(_stop_while_starting)
    try:
        yield
    except KeyboardInterrupt as exc:
        what, code = interrupt_exit(exc)
        sys.stderr.write(f"Error: {what} while starting; no output was written\n")
        sys.exit(code)


def command_started() -> None:
    """The command's own code runs from here: stop signals unwind it (see ``handle_sigterm``)."""
    if is_command():
        handle_sigterm()


def command_finished() -> None:
    """The command has done its work and said so: a stop signal arriving while the interpreter shuts
    down (which can take a while after onnxruntime) must not change its exit code, so from here on
    they are ignored (Python's shut-down restores the default action of handlers it installed, not
    of ignored signals)."""
    if is_command():
        _handle(signal.SIG_IGN)


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
