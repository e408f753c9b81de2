"""CSV that a spreadsheet opens safely: cells that it would run as formulas are defused.

A file name, a DICOM header value or a class name is the archive's text, and an
archive is untrusted: ``=HYPERLINK("http://...",A1)`` in a header would run when
someone opens ``images.csv`` in a spreadsheet. Following OWASP's guidance on CSV
injection, every text cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return gets a leading single quote (``'=HYPERLINK(...)``), which every
spreadsheet shows as text; the cells are quoted as CSV requires. Numbers stay
numbers (a negative confidence would be written ``-0.5``, not defused). The stored
values are never changed, and ``--format json`` gives them as they are.

Every CSV modlabel writes goes through ``writer`` (or ``SafeDictWriter``).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import Any, TextIO

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def defuse(value: Any) -> Any:
    """A cell as it is safe to write: text starting like a formula gets a leading ``'``.

    Reversible (``restore``): text that is quotes then a formula start (``'=x``) gets one
    more quote too, so that a file modlabel reads back (a run's ``split.csv``) gives
    every value as it was."""
    if isinstance(value, str) and value.lstrip("'").startswith(FORMULA_STARTS):
        return "'" + value
    return value


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
