"""Errors of modlabel's own, turned into one clean line and an exit code at the CLI's edge.

Exit codes (also in README and ``modlabel scan -h``). A file that cannot be
labeled is data, not a failure: it is stored as a row with its error and the
scan exits 0.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # any other error of the user's (a bad option value, a missing file to read)
    USAGE = 2  # the command line itself (click's own code)
    NO_INPUT = 3  # a root or table to scan does not exist
    MODEL = 4  # the model cannot be loaded (not ONNX, bad or inconsistent metadata)
    DATABASE = 5  # the database cannot be reached, opened or written
    LOCKED = 6  # another scan of the same model holds the database's lock
    INTERRUPTED = 7  # stopped by a signal (SIGINT, SIGTERM) before it finished
    INTERNAL = 70  # a bug in modlabel (EX_SOFTWARE); MODLABEL_DEBUG=1 shows the traceback


class ModlabelError(Exception):
    """A user-facing error: the CLI prints its message and exits with ``exit_code``."""

    exit_code: int = ExitCode.ERROR


class ImageError(ModlabelError):
    """An image that cannot be read or decoded; names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
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
    """A scan stopped by a signal; what it committed stays."""

    exit_code = ExitCode.INTERRUPTED
