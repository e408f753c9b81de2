"""Timestamps as modlabel prints them: ISO 8601, in UTC, with a ``Z``, to the millisecond.

Every moment modlabel shows or writes for a reader (``query`` output in every format,
the ``--json`` summaries of ``scan``, ``prune`` and ``report``) goes through ``iso_utc``,
so that one archive gives the same text on SQLite, which hands timestamps back without
their zone (``2026-12-01 08:05:37.980448``), and on PostgreSQL, which hands them back
with one (``+00:00``, or the session's zone). Milliseconds: enough to order the events
of one night's run, short enough for a table; the rest is cut, never rounded up, so a
printed moment is never later than the stored one.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime, timezone

# How SQLite gives back a timestamp SQLAlchemy wrote (``DateTime``: microseconds, no zone)
# or one of its own (``CURRENT_TIMESTAMP``: seconds): a text of exactly this form.
_SQLITE_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{1,6})?")


def iso_utc(moment: datetime) -> str:
    """``moment`` as ISO 8601 in UTC with a ``Z``, to the millisecond:
    ``2026-12-01T08:05:37.980Z``. A naive datetime is taken as UTC (modlabel writes UTC,
    and SQLite keeps no zone)."""
    return as_utc(moment).isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware datetime in UTC (a naive one is taken as UTC)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def sqlite_timestamp(text: str) -> datetime | None:
    """The UTC moment a SQLite timestamp text stands for, or None for any other text.

    A raw query on SQLite (``sa.text``) has no column types, so its timestamps come
    back as text; only a text of exactly SQLite's form (``YYYY-MM-DD HH:MM:SS[.ffffff]``)
    is taken as one."""
    if len(text) < 19 or text[10] != " " or not _SQLITE_TIMESTAMP.fullmatch(text):
        return None  # (the length and the space first: this runs on every text cell)
    return _parse_sqlite(text)


@functools.lru_cache(maxsize=4096)  # a scan's rows share their batch's moment
def _parse_sqlite(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text)  # Python 3.10 reads 0, 3 or 6 digits
    except ValueError:
        try:
            moment = datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f")
        except ValueError:  # the form, but no such moment (month 13)
            return None
    return moment.replace(tzinfo=timezone.utc)
