"""Paths: any file name a POSIX file system allows, stored as text that leads back to it.

A file name is a byte string; it need not be UTF-8 (archives copied from
older systems hold Latin-1 names), and it may hold newlines and quotes.
Python hands such names over as ``str`` with the undecodable bytes as lone
surrogates (``os.fsdecode``'s surrogateescape), which neither SQLite's driver
nor PostgreSQL can store.

modlabel stores a path as text with two escapes, so that the mapping is exact
and reversible and the same on every database:

* a byte that is not part of valid UTF-8 becomes ``\\xNN`` (two lower-case hex digits);
* a backslash becomes ``\\\\``.

Every other character, newlines and quotes included, is stored as it is. A
valid UTF-8 path without a backslash (nearly every path) is therefore stored
unchanged, and ``WHERE path LIKE '/archive/%'`` works as one would expect.

For people (logs, the report, ``query``'s table output) ``display_path`` also
escapes control characters (``\\n``, ``\\t``, ``\\x1b``), so that one path is
always one line.
"""

from __future__ import annotations

import os
import re

_STORED_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAMED_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def absolute(path: str | os.PathLike[str]) -> str:
    """``path`` as an absolute, normalized path (``~`` expanded; symbolic links kept as
    named): what modlabel stores of a path given on a command line, so that it means the
    same file from whatever folder a later command runs in."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def to_db(path: str | bytes) -> str:
    """The stored text of a file system path (``str`` as ``os`` returns it, or bytes)."""
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    out: list[str] = []
    text = raw.decode("utf-8", errors="surrogateescape")
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape marks it
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def from_db(stored: str) -> str:
    """The file system path (``str`` with surrogateescape, as ``os`` takes it) of stored text."""
    if "\\" not in stored:
        return stored
    raw = bytearray()
    pos = 0
    for match in _STORED_ESCAPE.finditer(stored):
        raw += stored[pos : match.start()].encode("utf-8", errors="surrogateescape")
        token = match.group(1)
        raw += b"\\" if token == "\\" else bytes([int(token[1:], 16)])
        pos = match.end()
    raw += stored[pos:].encode("utf-8", errors="surrogateescape")
    return os.fsdecode(bytes(raw))


def display_path(stored: str) -> str:
    """Stored path text for people: one line, printable on any terminal.

    Control characters become ``\\n``, ``\\t`` or ``\\xNN``; the stored escapes
    stay as they are, so what is shown is unambiguous.
    """
    return _CONTROL.sub(lambda m: _NAMED_CONTROL.get(m.group(), f"\\x{ord(m.group()):02x}"), stored)


def display_fs_path(path: str) -> str:
    """``display_path`` of a file system path."""
    return display_path(to_db(path))
