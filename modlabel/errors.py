"""Errors of modlabel's own, turned into one clean line and an exit code at the CLI's edge.

Exit codes (also in README and ``modlabel scan -h``). A file that cannot be
labeled is data, not a failure: it is stored as a row with its error and the
scan exits 0.
"""

from __future__ import annotations

import re
from enum import IntEnum
from pathlib import Path

from .reasons import Kind


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # any other error of the user's (a bad option value, a missing file to read)
    USAGE = 2  # the command line itself (click's own code)
    NO_INPUT = 3  # a root or table to scan does not exist
    MODEL = 4  # the model cannot be loaded (not ONNX, bad or inconsistent metadata)
    DATABASE = 5  # the database cannot be reached, opened or written
    LOCKED = 6  # another scan of the same model holds the database's lock
    INTERRUPTED = 7  # stopped by a signal (SIGINT, SIGTERM) before it finished
    VANISHED = 8  # a root looks vanished (an unmounted share): nothing was marked missing
    INTERNAL = 70  # a bug in modlabel (EX_SOFTWARE); MODLABEL_DEBUG=1 shows the traceback


# A reason stored or printed is one line of at most this many characters.
MAX_REASON_CHARS = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` as one line: runs of white space (newlines included) become one space, and
    a text longer than ``limit`` is cut with an ellipsis. Stored errors, ``scans.reason``
    and every message a command prints go through this."""
    flat = " ".join(str(text).split())
    # Control characters a header or a decoder quoted (an ESC that would drive the
    # terminal) are written as escapes, never passed on.
    flat = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", flat)
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "\u2026"


class ModlabelError(Exception):
    """A user-facing error: the CLI prints its message and exits with ``exit_code``."""

    exit_code: int = ExitCode.ERROR


class ImageError(ModlabelError):
    """An image that cannot be read or decoded; names the file, the reason (a sentence)
    and its kind (``reasons.Kind``, what code branches on)."""

    def __init__(self, path: str | Path, reason: str, kind: Kind = Kind.CORRUPT) -> None:
        self.path = str(path)
        self.reason = one_line(reason)
        self.kind = kind
        super().__init__(f"{self.path}: {reason}")


class InputError(ModlabelError):
    """A root or a table to scan that does not exist."""

    exit_code = ExitCode.NO_INPUT


class ModelError(ModlabelError):
    """An ONNX model that cannot be loaded or lacks modlabel's metadata."""

    exit_code = ExitCode.MODEL


class DatabaseError(ModlabelError):
    """A database that cannot be reached, opened, migrated or written."""

    exit_code = ExitCode.DATABASE


class LockedError(ModlabelError):
    """Another scan of the same model is running on the same database."""

    exit_code = ExitCode.LOCKED


class Interrupted(ModlabelError):
    """A scan stopped by a signal at a safe point; what it committed stays."""

    exit_code = ExitCode.INTERRUPTED


class VanishedError(ModlabelError):
    """A scan would have marked a mass of files missing (an unmounted share, an emptied
    mount point): it marked none, and says so."""

    exit_code = ExitCode.VANISHED


class UsageError(ModlabelError):
    """An option's value that cannot be used (a size, a port, an output path)."""

    exit_code = ExitCode.USAGE


class StopRequested(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """A stop signal that arrived in an ``stopping.interruptible()`` block.

    A BaseException, like ``KeyboardInterrupt``: no ``except Exception`` in a library
    swallows it on its way to the command's edge (exit 7).
    """

    exit_code = ExitCode.INTERRUPTED
