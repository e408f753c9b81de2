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

from . import (  # noqa: F401 - they register
    adopt,
    bench,
    explain,
    query,
    report,
    review,
    scan,
    serve,
    similar,
    train,
)
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
        code = _reader_gone()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else ExitCode.ERROR
        if code == ExitCode.ERROR and _typer_saw_a_closed_pipe():
            code = _reader_gone()
    _exit(code)


def _reader_gone() -> int:
    """The reader of stdout went away (``| head``): what it wanted it has, so say nothing
    and exit 0, like other Unix tools. What is still buffered goes to /dev/null, or
    Python's own flush at exit would fail again (and exit 120)."""
    from ..errors import ExitCode

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return ExitCode.OK


def _typer_saw_a_closed_pipe() -> bool:
    # Typer (like click) turns a closed pipe met inside a command into ``sys.exit(1)``,
    # after wrapping the streams in PacifyFlushWrapper: that wrapper is the only sign.
    return type(sys.stdout).__name__ == "PacifyFlushWrapper"


def _exit(code: int) -> None:
    from ..errors import ExitCode

    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left after the last write
        code = _reader_gone() if code == ExitCode.OK else code
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    if code == ExitCode.INTERRUPTED:
        # A stop: what had to be recorded is. Threads still in a C call (a model still
        # loading) must not make the interpreter's shutdown wait or crash.
        os._exit(code)
    sys.exit(code)
