"""Quiet TensorFlow's start-up for the command line (imported before TensorFlow).

A GPU build of TensorFlow on a machine without CUDA writes "Could not find cuda
drivers" lines to stderr while it loads, before its logging settings apply, and
"failed call to cuInit" errors once it runs. `python -m tfhybrid` and the `tfhybrid`
command raise `TF_CPP_MIN_LOG_LEVEL` to 3 (unless it is set to 0 or 1: TensorFlow's
logs asked for) so that only the command's own output is printed; any program that
sets `TF_CPP_MIN_LOG_LEVEL=3` itself before importing tfhybrid gets the same quiet
import. A library import changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
from collections.abc import Iterator

QUIET_LEVEL = "3"
COMMAND_MODULES = ("tfhybrid", "tfhybrid.cli")


def is_command_line() -> bool:
    """Whether this process is `python -m tfhybrid` or the `tfhybrid` console script."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] in COMMAND_MODULES:
        return True
    return pathlib.Path(sys.argv[0]).name == "tfhybrid"


@contextlib.contextmanager
def stderr_muted() -> Iterator[None]:
    """Sends file descriptor 2 (where TensorFlow's C++ code writes) to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow() -> None:
    """Imports TensorFlow, muted when the log level asks for quiet (see the module doc)."""
    if is_command_line() and os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") >= "2":
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = QUIET_LEVEL
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != QUIET_LEVEL or "tensorflow" in sys.modules:
        return
    with stderr_muted():
        import tensorflow  # noqa: F401


import_tensorflow()
