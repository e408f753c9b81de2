"""The ``scans`` table: one row per run of the nightly job, how it ended and what it did.

A running scan renews a heartbeat (``alive_until``); a row whose heartbeat lapsed,
or whose process is gone from this host, shows as interrupted.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .. import redaction
from ..errors import one_line
from .schema import ALIVE_SECONDS, FINISHED, INTERRUPTED, RUNNING, _aware, scans, utcnow


@dataclass
class ScanProgress:
    """What a scan has done so far; written to its ``scans`` row with every batch."""

    scan_id: int
    seen: int = 0
    unchanged: int = 0
    skipped: int = 0
    missing: int = 0


# A run's counts when it begins (and of a run that ended before its scan began).
NO_COUNTS = {"seen": 0, "labeled": 0, "unchanged": 0, "errors": 0, "skipped": 0, "missing": 0}


def record_progress(
    conn: sa.Connection, progress: ScanProgress, *, labeled: int, errors: int
) -> None:
    conn.execute(
        scans.update()
        .where(scans.c.id == progress.scan_id)
        .values(
            seen=progress.seen,
            unchanged=progress.unchanged,
            skipped=progress.skipped,
            missing=progress.missing,
            labeled=scans.c.labeled + labeled,
            errors=scans.c.errors + errors,
            alive_until=_alive_until(),
        )
    )


def _alive_until() -> datetime:
    return utcnow() + timedelta(seconds=ALIVE_SECONDS)


def start_scan(engine: Engine, model_id: int, roots: Sequence[str]) -> int:
    """Insert the ``scans`` row of a starting scan (status running) and return its id."""
    with engine.begin() as conn:
        return int(
            conn.execute(
                scans.insert().values(
                    model_id=model_id,
                    roots=list(roots),
                    started_at=utcnow(),
                    **NO_COUNTS,
                    status=RUNNING,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    alive_until=_alive_until(),
                )
            ).inserted_primary_key[0]
        )


def record_run(
    engine: Engine,
    model_id: int | None,
    roots: Sequence[str],
    *,
    status: str,
    reason: str,
    started_at: datetime | None = None,
) -> int:
    """The ``scans`` row of a run that ended before its scan began (a stop during start-up,
    a root that does not exist, a model that cannot be loaded): finished now, with its
    status and reason. ``started_at``: when the run began (default: now), so that the
    row shows how long its start-up took."""
    now = utcnow()
    with engine.begin() as conn:
        return int(
            conn.execute(
                scans.insert().values(
                    model_id=model_id,
                    roots=list(roots),
                    started_at=started_at or now,
                    finished_at=now,
                    **NO_COUNTS,
                    status=status,
                    reason=redaction.redact(one_line(reason, 2000)),
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    alive_until=None,
                )
            ).inserted_primary_key[0]
        )


def heartbeat(engine: Engine, scan_id: int) -> None:
    """Renew a running scan's ``alive_until``."""
    with engine.begin() as conn:
        conn.execute(
            scans.update()
            .where(scans.c.id == scan_id, scans.c.status == RUNNING)
            .values(alive_until=_alive_until())
        )


def finish_scan(
    engine: Engine,
    scan_id: int,
    *,
    status: str = FINISHED,
    reason: str | None = None,
    seen: int,
    unchanged: int,
    skipped: int = 0,
    missing: int = 0,
) -> None:
    """Close a scan's row: its final status and the counts not already committed.

    ``labeled`` and ``errors`` are not passed: they were counted with each
    committed batch.
    """
    with engine.begin() as conn:
        conn.execute(
            scans.update()
            .where(scans.c.id == scan_id)
            .values(
                status=status,
                reason=redaction.redact(one_line(reason, 2000)) if reason else None,
                finished_at=utcnow(),
                seen=seen,
                unchanged=unchanged,
                skipped=skipped,
                missing=missing,
                alive_until=None,
            )
        )


def interrupt_stale_scans(engine: Engine, model_id: int) -> int:
    """Mark the model's scans still shown as running as interrupted; returns how many.

    Called by a scan that holds the model's lock: no other scan of the model
    can be running then, so those rows belong to processes that died.
    """
    with engine.begin() as conn:
        result = conn.execute(
            scans.update()
            .where(scans.c.model_id == model_id, scans.c.status == RUNNING)
            .values(
                status=INTERRUPTED,
                reason="the process ended without finishing (killed, or its machine stopped)",
                alive_until=None,
            )
        )
        return int(result.rowcount or 0)


@dataclass(frozen=True)
class ScanRow:
    id: int
    model_id: int | None
    roots: list[str]
    started_at: datetime
    finished_at: datetime | None
    status: str
    reason: str | None
    host: str | None
    pid: int | None
    seen: int
    labeled: int
    unchanged: int
    errors: int
    skipped: int = 0
    missing: int = 0

    def describe(self) -> str:
        """'scan #12 on host h, pid 345, since 2026-11-25 02:15 UTC'"""
        since = _aware(self.started_at).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"scan #{self.id} on host {self.host}, pid {self.pid}, since {since}"


def effective_status(row: dict[str, Any], *, now: datetime | None = None) -> str:
    """A row's status as it truly is: a running scan whose process is gone is interrupted.

    Gone: on this host, its pid no longer exists; anywhere, its heartbeat lapsed.
    """
    if row["status"] != RUNNING:
        return row["status"]
    alive_until = row.get("alive_until")
    if alive_until is not None and _aware(alive_until) < (now or utcnow()):
        return INTERRUPTED
    if row.get("host") == socket.gethostname() and row.get("pid") and not _pid_alive(row["pid"]):
        return INTERRUPTED
    return RUNNING


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def list_scans(engine: Engine, model_id: int | None = None, *, limit: int = 20) -> list[ScanRow]:
    """The latest scans, newest first, with their effective status."""
    query = sa.select(scans).order_by(scans.c.id.desc()).limit(limit)
    if model_id is not None:
        query = query.where(scans.c.model_id == model_id)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query).mappings()]
    return [
        ScanRow(
            id=r["id"],
            model_id=r["model_id"],
            roots=list(r["roots"] or []),
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            status=effective_status(r),
            reason=r["reason"],
            host=r["host"],
            pid=r["pid"],
            seen=r["seen"],
            labeled=r["labeled"],
            unchanged=r["unchanged"],
            errors=r["errors"],
            skipped=r["skipped"],
            missing=r["missing"],
        )
        for r in rows
    ]


def running_scan(engine: Engine, model_id: int) -> ScanRow | None:
    """The newest scan of the model shown as running, if any (to name a lock's holder)."""
    for row in list_scans(engine, model_id, limit=5):
        if row.status == RUNNING:
            return row
    return None
