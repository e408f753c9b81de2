"""Errors of modlabel's own, turned into clean messages at the CLI's edge."""

from __future__ import annotations

from pathlib import Path


class ModlabelError(Exception):
    """A user-facing error: the CLI prints its message and exits non-zero."""

    exit_code = 1


class ImageError(ModlabelError):
    """An image that cannot be read or decoded; names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ModelError(ModlabelError):
    """An ONNX model that cannot be loaded or lacks modlabel's metadata."""


class DatabaseError(ModlabelError):
    """A database URL that cannot be opened or a schema that cannot be migrated."""
