"""The one edge between modlabel and whoever runs it: a person, or cron.

Every command runs inside ``edge``, which turns whatever ends it into one line
on stderr and an exit code (README "Exit codes"):

* modlabel's own errors (``ModlabelError``) print their message;
* a stop signal prints why, exit 7 (``stopping``: the first signal asks for a
  stop, a second ends at once);
* a database that fails where no retry applies (a damaged file, a server that
  refuses) prints what it said, without its SQL, exit 5;
* anything else is a bug of modlabel's: one line, exit 70, and the traceback only
  with ``MODLABEL_DEBUG=1``.

No log record reaches the terminal with a traceback (``setup_logging``), no
Python warning reaches it, and no password (``redaction``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer

try:  # typer vendors its own click (typer._click) since 0.20; older ones use click's
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - an older typer
    from click import exceptions as click_exceptions

from .. import redaction, stopping
from ..errors import DatabaseError, ExitCode, ModlabelError, StopRequested, one_line

DEBUG_ENV = "MODLABEL_DEBUG"

_F = TypeVar("_F", bound=Callable[..., Any])


def command(app: typer.Typer, *, interruptible: bool = True, **kwargs: Any) -> Callable[[_F], _F]:
    """``app.command(**kwargs)`` with the edge around the command.

    ``interruptible``: a stop signal ends the command wherever it is (commands that
    read, or write in single transactions); without it the command checks for the
    stop at its own safe points (``scan``)."""

    def register(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kw: Any) -> Any:
            with edge(interruptible=interruptible):
                return fn(*args, **kw)

        app.command(**kwargs)(wrapped)
        return fn

    return register


@contextlib.contextmanager
def edge(*, interruptible: bool = True) -> Iterator[None]:
    """Run a command: one line and an exit code for whatever ends it badly."""
    setup_logging()
    try:
        if interruptible:
            with stopping.interruptible():
                yield
        else:
            yield
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:
        if isinstance(exc, click_exceptions.ClickException):
            raise  # a usage error: the command line's own message and exit 2
        if stopping.requested():  # what the stop cancelled (a query, a fetch) failing
            raise fail(StopRequested(stopping.reason())) from None
        raise fail(as_modlabel_error(exc)) from None
    except StopRequested as exc:
        raise fail(exc) from None


def as_modlabel_error(exc: Exception) -> ModlabelError:
    """The user-facing error of an exception that reached the edge."""
    if isinstance(exc, ModlabelError):
        return exc
    database = _database_error(exc)
    if database is not None:
        return database
    if isinstance(exc, BrokenPipeError):
        raise exc
    if os.environ.get(DEBUG_ENV):
        raise exc
    error = ModlabelError(
        f"internal error: {type(exc).__name__}: {exc} "
        f"({DEBUG_ENV}=1 shows the traceback; please report it)"
    )
    error.exit_code = ExitCode.INTERNAL
    return error


def _database_error(exc: Exception) -> DatabaseError | None:
    """A database driver's error, as one line without its SQL (exit 5)."""
    import sqlite3

    try:
        import sqlalchemy as sa
    except ImportError:  # pragma: no cover - a dependency
        sa = None
    if sa is not None and isinstance(exc, sa.exc.DBAPIError):
        from ..store import describe_db_error

        return DatabaseError(f"database error: {describe_db_error(exc)}")
    if isinstance(exc, sqlite3.Error):
        from ..store import describe_db_error

        return DatabaseError(f"database error: {describe_db_error(exc)}")
    if sa is not None and isinstance(exc, sa.exc.SQLAlchemyError):
        return DatabaseError(f"database error: {one_line(exc)}")
    return None


def fail(exc: ModlabelError | StopRequested) -> typer.Exit:
    """Print ``exc`` as one line on stderr; the ``typer.Exit`` to raise with its code."""
    say_error(str(exc))
    return typer.Exit(int(exc.exit_code))


def say_error(message: str) -> None:
    typer.secho(f"modlabel: error: {clean(message)}", err=True, fg=typer.colors.RED)


def say(message: str) -> None:
    """A line on stderr that is not an error (a warning, a note for the operator)."""
    typer.echo(f"modlabel: {clean(message)}", err=True)


def clean(message: str) -> str:
    """What modlabel prints: one line, no password."""
    return redaction.redact(one_line(message, 4000))


def interactive() -> bool:
    return sys.stderr.isatty()


class _OneLine(logging.Formatter):
    """A record as ``modlabel: message`` (a library's: ``modlabel: name: message``), one
    line, without its traceback or stack, with no password."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a library's bad format string
            message = str(record.msg)
        if not record.name.startswith("modlabel"):
            message = f"{record.name}: {message}"
        return "modlabel: " + clean(message)


def _shown(record: logging.LogRecord) -> bool:
    # modlabel's warnings (a database retried, a lock waited for); a library's errors only.
    threshold = logging.WARNING if record.name.startswith("modlabel") else logging.ERROR
    return record.levelno >= threshold


_LOGGING_SET_UP = False


def setup_logging() -> None:
    """modlabel's warnings on stderr, one line each; libraries' only when they are errors,
    as one line too; Python warnings and exceptions of background threads likewise."""
    global _LOGGING_SET_UP
    if _LOGGING_SET_UP:
        return
    _LOGGING_SET_UP = True
    redaction.remember_environment()
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLine())
    handler.addFilter(_shown)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)  # as "py.warnings" records: below ERROR, so not shown
    threading.excepthook = _thread_failed
    sys.unraisablehook = _unraisable


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "a thread"
    logging.getLogger("modlabel").error(
        "%s stopped: %s: %s", name, args.exc_type.__name__, args.exc_value
    )


def _unraisable(args: Any) -> None:
    # An exception in a destructor or at shutdown: nothing a user can act on.
    logging.getLogger("modlabel").debug("unraisable: %s", args.exc_value)
