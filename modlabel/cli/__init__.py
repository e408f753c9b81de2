"""The ``modlabel`` command line: a thin face over modlabel's Python API.

Each command turns its options into a call of a library function and prints
the result; one module per group of commands, all behind one error edge
(``edge``: one line and an exit code, whatever happens). TensorFlow is imported
only inside ``train``, ``evaluate`` and ``export``; the other commands never
load it.
"""

from __future__ import annotations

import contextlib
import os
import sys

import typer

from . import bench, explain, query, report, scan, train  # noqa: F401 - they register
from .app import app
from .query import _format_rows  # noqa: F401 - the table writer, for its tests

__all__ = ["app", "main"]


def main() -> None:
    """The console entry point: ``app`` with no traceback for a user, whatever happens.

    Usage errors are one line too (``modlabel: error: --option: why``), exit 2. A
    closed pipe (``modlabel query ... | head``) ends quietly.
    """
    from ..errors import ExitCode
    from .edge import click_exceptions as cx
    from .edge import say_error

    code: int = 0
    try:
        result = app(standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except cx.NoArgsIsHelpError:
        pass  # the help is printed already: asking for it is no error
    except cx.ClickException as exc:
        hint = ""
        if isinstance(exc, cx.UsageError) and exc.ctx is not None:
            hint = f" (see {exc.ctx.command_path} -h)"
        say_error(exc.format_message() + hint)
        code = exc.exit_code
    except typer.Abort:
        say_error("aborted")
        code = ExitCode.INTERRUPTED
    except BrokenPipeError:
        # The reader went away; say nothing, like other Unix tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = ExitCode.ERROR
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else ExitCode.ERROR
    _exit(code)


def _exit(code: int) -> None:
    from ..errors import ExitCode

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if code == ExitCode.INTERRUPTED:
        # A stop: what had to be recorded is. Threads still in a C call (a model still
        # loading) must not make the interpreter's shutdown wait or crash.
        os._exit(code)
    sys.exit(code)
