"""The two kinds of failure a user sees, each with its exit code (see README, "Exit codes")."""
from __future__ import annotations


class OnnxPruneError(Exception):
    """Base class: a one-line message for the user, no traceback."""

    exit_code = 1


class InputError(OnnxPruneError):
    """Bad input: a corrupt or unsupported model, malformed data, a refused output path. Exit 2."""

    exit_code = 2


class CheckFailed(OnnxPruneError):
    """The work ran but a check on its result failed (checker, runtime, a budget). Exit 1."""

    exit_code = 1


def run_script(main) -> None:
    """Entry point of the scripts/: exit with main()'s code, or one line and the error's exit code."""
    import sys

    from .runtime import RuntimeUnavailable

    try:
        sys.exit(main())
    except OnnxPruneError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except RuntimeUnavailable as exc:  # no CUDA, no training build: the work cannot start here
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)
