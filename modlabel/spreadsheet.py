"""CSV that a spreadsheet opens safely: cells that it would run as formulas are defused.

A file name, a DICOM header value or a class name is the archive's text, and an
archive is untrusted: ``=HYPERLINK("http://...",A1)`` in a header would run when
someone opens ``images.csv`` in a spreadsheet. Following OWASP's guidance on CSV
injection, every text cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return gets a leading single quote (``'=HYPERLINK(...)``), which every
spreadsheet shows as text; the cells are quoted as CSV requires. Numbers stay
numbers (a negative confidence would be written ``-0.5``, not defused). The stored
values are never changed, and ``--format json`` gives them as they are.

Every CSV modlabel writes goes through ``writer`` (or ``SafeDictWriter``), or, for a file
written a column at a time (``images.csv``), through ``defuse_column``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# The first characters of the text that ``defuse`` may change (a formula start, or the
# quotes before one), each after a NUL: found in a column's cells joined by NULs.
_MAY_CHANGE = re.compile("\x00[" + "".join(re.escape(c) for c in ("'", *FORMULA_STARTS)) + "]")


def defuse(value: Any) -> Any:
    """A cell as it is safe to write: text starting like a formula gets a leading ``'``.

    Reversible (``restore``): text that is quotes then a formula start (``'=x``) gets one
    more quote too, so that a file modlabel reads back (a run's ``split.csv``) gives
    every value as it was."""
    if isinstance(value, str) and value.lstrip("'").startswith(FORMULA_STARTS):
        return "'" + value
    return value


def defuse_column(values: Sequence[Any]) -> Sequence[Any]:
    """``defuse`` of each cell of a column (a chunk of one column of a CSV file).

    The column itself when none of its text can start a formula (nearly every column of an
    archive), found by one regular-expression search over its text cells joined by NULs,
    not a test in Python per cell; else a list of the defused cells. A NUL inside a cell
    can only make the search find a cell to check in vain."""
    try:
        joined = "\x00" + "\x00".join(filter(None, values))
    except TypeError:  # a cell that is not text (a number): each is looked at
        return [defuse(v) for v in values]
    if _MAY_CHANGE.search(joined) is None:
        return values
    return [defuse(v) for v in values]


def restore(value: str) -> str:
    """The value ``defuse`` was given."""
    if value.startswith("'") and value.lstrip("'").startswith(FORMULA_STARTS):
        return value[1:]
    return value


class SafeWriter:
    """``csv.writer`` whose rows are defused (``defuse``) cell by cell."""

    def __init__(self, handle: TextIO, **kwargs: Any) -> None:
        self._writer = csv.writer(handle, **kwargs)

    def writerow(self, row: Iterable[Any]) -> Any:
        return self._writer.writerow([defuse(v) for v in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


class SafeDictWriter(csv.DictWriter):
    """``csv.DictWriter`` whose values are defused (``defuse``)."""

    def writerow(self, rowdict: dict[str, Any]) -> Any:
        return super().writerow({k: defuse(v) for k, v in rowdict.items()})

    def writerows(self, rowdicts: Iterable[dict[str, Any]]) -> None:
        for row in rowdicts:
            self.writerow(row)


def writer(handle: TextIO, **kwargs: Any) -> SafeWriter:
    """A CSV writer for ``handle`` that defuses formulas."""
    return SafeWriter(handle, **kwargs)
