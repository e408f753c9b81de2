"""The scan lock: one scan per (database, model) at a time.

Two scans of the same model on the same database would run the same
inference twice and race on the same rows, so a scan takes a lock first:

* PostgreSQL: a session advisory lock, ``pg_try_advisory_lock(namespace,
  model id)``, held on a connection of its own for the whole scan;
* SQLite: an exclusive ``flock`` on a file beside the database,
  ``<database>.lock-<model id>``.

Both are released by the operating system or the server when the process
dies, however it dies: a lock left by a killed scan never blocks the next
one. A second scan exits at once with ``LockedError`` naming the running
scan, or, with ``wait=True``, waits for it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .. import stopping, store
from ..errors import DatabaseError, LockedError

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


class ScanLock(Protocol):
    def try_acquire(self) -> bool: ...

    def reacquire(self) -> None: ...

    def release(self) -> None: ...


def acquire_scan_lock(engine: Engine, model_id: int, *, wait: bool = False) -> ScanLock:
    """Take the scan lock of ``model_id`` on ``engine``'s database, or raise ``LockedError``."""
    lock = _lock_for(engine, model_id)
    announced = False
    while not lock.try_acquire():
        holder = store.running_scan(engine, model_id)
        who = holder.describe() if holder is not None else "a scan that is starting"
        if not wait:
            raise LockedError(
                f"another scan of this model is running on this database: {who}; "
                "pass --wait to wait for it"
            )
        if not announced:
            log.warning("waiting for %s to finish", who)
            announced = True
        stopping.sleep(POLL_SECONDS)
    return lock


def _lock_for(engine: Engine, model_id: int) -> ScanLock:
    if engine.dialect.name == "postgresql":
        return PostgresAdvisoryLock(engine, model_id)
    database = store.sqlite_file(engine.url)
    if database is not None:
        return FileLock(Path(f"{database}.lock-{model_id}"))
    return NoLock()  # an in-memory database belongs to one process


class PostgresAdvisoryLock:
    """``pg_try_advisory_lock`` on a connection held for the scan.

    A server restart drops the lock with the connection; ``reacquire`` takes
    it back after the scan's database retries succeed, and fails with
    ``LockedError`` if another scan took it in between.
    """

    def __init__(self, engine: Engine, model_id: int) -> None:
        self.engine = engine
        self.model_id = model_id
        self.conn: sa.Connection | None = None

    def try_acquire(self) -> bool:
        conn = self.engine.connect()
        got = conn.execute(
            sa.text("SELECT pg_try_advisory_lock(:ns, :id)"),
            {"ns": store.LOCK_NAMESPACE, "id": self.model_id},
        ).scalar()
        conn.commit()  # a session lock outlives the transaction; stay idle, not "in transaction"
        if got:
            self.conn = conn
        else:
            conn.close()
        return bool(got)

    def reacquire(self) -> None:
        if self.conn is not None:
            try:
                self.conn.execute(sa.text("SELECT 1")).scalar()
                self.conn.commit()
                return  # the connection, and so the lock, survived
            except sa.exc.DBAPIError:
                self.conn.invalidate()
                self.conn = None
        if not self.try_acquire():
            raise LockedError(
                "the scan lock was lost while the database was away, and another scan "
                "has taken it; this scan stops"
            )

    def release(self) -> None:
        if self.conn is None:
            return
        try:
            self.conn.execute(
                sa.text("SELECT pg_advisory_unlock(:ns, :id)"),
                {"ns": store.LOCK_NAMESPACE, "id": self.model_id},
            )
            self.conn.commit()
        except sa.exc.DBAPIError:
            pass  # the server is gone, and the lock with the session
        finally:
            self.conn.close()
            self.conn = None


class FileLock:
    """An exclusive ``flock`` on a file beside a SQLite database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DatabaseError(
                f"cannot create the scan lock {self.path}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def reacquire(self) -> None:
        pass  # a file lock does not depend on the database's connection

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


class NoLock:
    def try_acquire(self) -> bool:
        return True

    def reacquire(self) -> None:
        pass

    def release(self) -> None:
        pass
