"""The `onnxprune` command: parse options, call the API, print; one module per command. Exit codes:
0 ok, 1 a check on the result failed, 2 bad input (also for usage errors, as click does);
130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 141 stdout closed by its reader."""
from __future__ import annotations

import sys

import click

from onnxprune.cli.ensemble import ensemble
from onnxprune.cli.evaluate import evaluate
from onnxprune.cli.finetune import finetune
from onnxprune.cli.inspect import inspect
from onnxprune.cli.prune import prune
from onnxprune.cli.ui import Group, command_errors
from onnxprune.runtime import check_installation

MMAP_THRESHOLD = 64 << 20


def return_freed_memory() -> None:
    """Blocks over 64 MB get their own mappings, given back to the system when freed (glibc only).

    glibc's default threshold rises to 32 MB with the first large frees, after which numpy's
    per-layer derivative arrays and im2col patches are carved from the heap and stay resident once
    freed: on ResNet-18 at 224x224 (4 calibration images) the peak was 2,056 MB as it is and
    1,982 MB with the threshold held at 1 MB (1,773 MB with onnxruntime's CPU arena also off). At
    1 MB every temporary of the statistics was a fresh zero-filled mapping, which cost 1.36x on the
    whole run (issue 22); at 64 MB only the large ones are (the derivative arrays of a batch, the
    patches of a 224x224 layer), and the many small ones reuse the heap.
    The command owns its process, so the command sets it, not the library."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator keeps its own policy
        pass


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxprune")
@command_errors
def main():
    """Prune ONNX models with elimination-compensation (ECP) and check them on onnxruntime."""
    return_freed_memory()
    if not {"-h", "--help"} & set(sys.argv):
        check_installation()  # a missing or clobbered onnxruntime: one line with the fix, before any work


for command in (prune, evaluate, inspect, finetune, ensemble):  # the ensemble commands share this CLI's conventions
    main.add_command(command)
