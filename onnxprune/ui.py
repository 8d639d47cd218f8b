"""What the commands share: where messages go, one-line errors with the documented exit codes
(0 ok, 1 a check on the result failed, 2 bad input, 130 interrupted), --verbose/--quiet, JSON."""
from __future__ import annotations

import functools
import json
import sys
import traceback
import warnings

import click

from .errors import OnnxPruneError
from .fileio import check_output_path, write_json
from .runtime import RuntimeUnavailable


class Ui:
    """Where messages go: stdout for reports, stderr for progress and errors."""

    def __init__(self, verbose: bool = False, quiet: bool = False):
        self.verbose, self.quiet = verbose, quiet
        self._bar, self._step = None, None
        self.written: list[str] = []  # outputs already in place (an interrupt after them says so)

    def out(self, text: str = "") -> None:
        if not self.quiet:
            click.echo(text)

    def info(self, text: str) -> None:
        if self.verbose and not self.quiet:
            click.echo(text, err=True)

    def progress(self, step: str, done: int, total: int) -> None:
        """A progress bar per step, only on a terminal and not with --quiet."""
        if self.quiet or not sys.stderr.isatty():
            return
        if self._step != step:
            self.close()
            self._bar = click.progressbar(length=total, label=step, file=sys.stderr)
            self._bar.__enter__()
            self._step, self._done = step, 0
        self._bar.update(done - self._done)
        self._done = done
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar, self._step = None, None


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
        except KeyboardInterrupt:
            written = ui().written if ui() else []
            _fail("interrupted" + (f"; {', '.join(map(str, written))} had been written" if written
                                   else "; no output was written"), 130, ui())
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
    if ui:
        ui.close()
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def common(func):
    """--verbose / --quiet on every command."""
    func = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors; no progress bars.")(func)
    func = click.option("--verbose", "-v", is_flag=True, help="Print timings, skipped layers and details.")(func)
    return func


def make_ui(verbose: bool, quiet: bool) -> Ui:
    ui = Ui(verbose, quiet)
    click.get_current_context().obj = ui
    return ui


def emit_json(path: str | None, report: dict, force: bool, ui: Ui) -> None:
    if path == "-":
        click.echo(json.dumps(report, indent=2, default=str))
    elif path:
        write_json(check_output_path(path, force=force), report)
        ui.info(f"report written to {path}")
