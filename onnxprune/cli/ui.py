"""What the commands share: where messages go, one-line errors with the documented exit codes
(0 ok, 1 a check on the result failed, 2 bad input, 130 interrupted, 143 terminated, 141 a closed
pipe), --verbose/--quiet, JSON, and the outputs of a command written all or none."""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import click

from onnxprune.errors import (
    OnnxPruneError,
    RuntimeUnavailable,
    command_finished,
    command_started,
    interrupt_exit,
    received_signal,
)
from onnxprune.io.files import STDOUT, Outputs, json_text

BROKEN_PIPE_EXIT = 141  # what a shell reports for a tool killed by SIGPIPE (128 + 13)


class Ui:
    """Where messages go: stdout for reports (stderr when stdout carries the JSON), stderr for
    progress and errors."""

    def __init__(self, verbose: bool = False, quiet: bool = False, json_path: str | None = None):
        self.verbose, self.quiet = verbose, quiet
        self.json_to_stdout = json_path == STDOUT
        self._bar: Any = None          # click's progress bar of the current step
        self._step: str | None = None
        self._outputs: list[Outputs] = []
        self.steps = 1                # a multi-step run labels its bars "step k/S"
        self._first_step: str | None = None
        self._rounds = 0

    def outputs(self, inputs, force: bool) -> Outputs:
        """The command's set of outputs (written all or none when its ``with`` block ends)."""
        self._outputs.append(Outputs(inputs, force))
        return self._outputs[-1]

    @property
    def written(self) -> list[str]:
        """Outputs already in place (an interruption after them says so)."""
        return [str(path) for outputs in self._outputs for path in outputs.committed]

    def out(self, text: str = "") -> None:
        if not self.quiet:
            click.echo(text, err=self.json_to_stdout)

    def info(self, text: str) -> None:
        if self.verbose and not self.quiet:
            click.echo(text, err=True)

    def progress(self, step: str, done: int, total: int) -> None:
        """A progress bar per step, only on a terminal and not with --quiet."""
        if self.quiet or not sys.stderr.isatty():
            return
        if self._step != step:
            self.close()
            self._first_step = self._first_step or step
            self._rounds += step == self._first_step  # each step of a multi-step run starts by scoring
            label = f"step {(self._rounds - 1) % self.steps + 1}/{self.steps} {step}" if self.steps > 1 else step
            self._bar = click.progressbar(length=total, label=label, file=sys.stderr)
            self._bar.__enter__()
            self._step, self._done = step, 0
        self._bar.update(done - self._done)
        self._done = done
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
        self._step = None


def command_errors(func):
    """One-line errors with the documented exit codes instead of tracebacks."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        def ui():  # the command makes its Ui once it has parsed -v/-q: look it up when needed
            return click.get_current_context().find_object(Ui)

        try:
            with warnings.catch_warnings():
                if not kwargs.get("verbose"):  # numpy's RuntimeWarnings would add lines to a one-line error
                    warnings.simplefilter("ignore")
                return func(*args, **kwargs)
        except OnnxPruneError as exc:
            _fail(str(exc), exc.exit_code, ui())
        except (RuntimeUnavailable, MemoryError) as exc:
            _fail(str(exc) or type(exc).__name__, 1, ui())
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (errors.Terminated)
            what, code = interrupt_exit(exc)
            written = ui().written if ui() else []
            _fail(what + (f"; {', '.join(map(str, written))} had been written" if written
                          else "; no output was written"), code, ui())
        except BrokenPipeError:  # the reader of stdout went away (| head): what a Unix tool does
            sys.exit(_stdout_closed())
        except (click.exceptions.Exit, click.ClickException):
            raise
        except Exception as exc:  # a bug or an onnxruntime failure we did not foresee: still one line
            if ui() and ui().verbose:
                traceback.print_exc()
            _fail(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
                  "(run with --verbose for the traceback)", 1, ui())
        finally:
            if ui():
                ui().close()

    return wrapper


def _fail(message: str, code: int, ui) -> None:
    """The one line and the exit code; a stop signal that came meanwhile is what ended the command,
    whatever a library made of the KeyboardInterrupt it raised on its way up."""
    if received_signal() is not None:
        what, code = interrupt_exit()
        written = ui.written if ui else []
        message = what + (f"; {', '.join(map(str, written))} had been written" if written else "; no output was written")
    if ui:
        ui.close()
    try:
        click.echo(f"Error: {message}", err=True)
    except OSError:  # stderr is gone too (a closed terminal after SIGHUP): the exit code still says it
        pass
    sys.exit(code)


def common(func):
    """--verbose / --quiet on every command."""
    func = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors; no progress bars.")(func)
    func = click.option("--verbose", "-v", is_flag=True, help="Print timings, skipped layers and details.")(func)
    return func


def json_option(func):
    return click.option("--json", "json_path", default=None, metavar="PATH",
                        help="Also write the report as JSON ('-' for stdout; the tables then go to stderr).")(func)


def make_ui(verbose: bool, quiet: bool, json_path: str | None = None) -> Ui:
    ui = Ui(verbose, quiet, json_path)
    click.get_current_context().obj = ui
    return ui


def stage_json(outputs: Outputs, path: str | None, report: dict) -> None:
    """Stage the JSON report in ``outputs`` (claimed before); '-' is printed by ``print_json``."""
    if path and path != STDOUT:
        text = json_text(report)
        outputs.stage(path, lambda tmp: _write_text(tmp, text))


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def print_json(path: str | None, report: dict) -> None:
    if path == STDOUT:
        click.echo(json.dumps(report, indent=2, default=str))


def finish(ui: Ui, outputs: Outputs) -> None:
    """After the outputs' ``with`` block (which renamed them into place): say what was written."""
    for path in outputs.committed:
        ui.info(f"wrote {path}")


class Group(click.Group):
    """A click group whose every failure is one line on stderr: usage errors too (exit 2), an
    interruption while the options are parsed (130, or 143 for SIGTERM), and a reader that closed
    our stdout (``| head``: no message, exit 141, as a tool killed by SIGPIPE)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        command_started()
        try:
            code = self._exit_code(args, prog_name, complete_var, extra)
        except KeyboardInterrupt as exc:  # a stop signal while an error was being reported
            what, code = interrupt_exit(exc)
            with contextlib.suppress(OSError):
                click.echo(f"Error: {what}", err=True)
        finally:  # also when a command's one-line error exits
            command_finished()
        sys.exit(code)

    def _exit_code(self, args, prog_name, complete_var, extra) -> int:
        stdout = sys.stdout
        try:
            try:
                super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            finally:
                sys.stdout.flush()
            code = 0
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare `onnxprune`: the help, as click shows it
            exc.show()
            code = exc.exit_code
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx else (prog_name or self.name)
            click.echo(f"Error: {exc.format_message()} (see '{command} --help')", err=True)
            code = exc.exit_code
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            code = exc.exit_code
        except click.Abort as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, KeyboardInterrupt) else KeyboardInterrupt()
            what, code = interrupt_exit(cause)
            click.echo(f"Error: {what}; no output was written", err=True)
        except KeyboardInterrupt as exc:
            what, code = interrupt_exit(exc)
            click.echo(f"Error: {what}; no output was written", err=True)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            code = _stdout_closed()
        except SystemExit:  # click ends a --help or --version that met a closed stdout (EPIPE) with exit 1,
            if sys.stdout is stdout:  # after wrapping sys.stdout so that its flush stays quiet
                raise
            code = _stdout_closed()
        return code


def _stdout_closed() -> int:
    """The reader of stdout went away: send what is still buffered nowhere, and say nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (click's test runner)
        pass
    return BROKEN_PIPE_EXIT
