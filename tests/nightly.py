"""Helpers for the tests of the nightly job: the real CLI in a subprocess, an archive
big enough to be stopped half-way, and a PostgreSQL server of the test's own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent


def sa_url(db: str) -> str:
    """The SQLAlchemy URL of what ``--db`` was given (a SQLite file's path, or a URL)."""
    return db if "://" in db else f"sqlite:///{db}"


def image_rows(db: str) -> dict[str, dict]:
    """Every ``images`` row, by stored path."""
    from modlabel import store

    engine = sa.create_engine(sa_url(db))
    try:
        with engine.connect() as conn:
            found = conn.execute(sa.select(store.images)).mappings().all()
    finally:
        engine.dispose()
    return {r["path"]: dict(r) for r in found}


def modlabel_cmd(*args: object) -> list[str]:
    """``python -m modlabel ARGS`` (paths may be bytes: any name a file system allows)."""
    return [
        sys.executable,
        "-m",
        "modlabel",
        *(os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args),
    ]


def run_cli(
    *args: object, timeout: float = 180, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the real ``modlabel`` command off a terminal, as cron does."""
    return subprocess.run(
        modlabel_cmd(*args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def start_cli(*args: object, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        modlabel_cmd(*args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def text(output: bytes) -> str:
    return output.decode("utf-8", errors="replace")


def assert_clean_failure(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exit ``code``, no traceback, and the last line says why (in one line)."""
    err = text(result.stderr)
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err and "Traceback" not in text(result.stdout), err
    last = err.strip().splitlines()[-1]
    assert last.startswith("modlabel: error: "), err
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def wait_for(condition: Callable[[], bool], *, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


def count_rows(url: str, table: str = "images") -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar() or 0)
    except sa.exc.DBAPIError:
        return 0  # not created yet, or the server is away
    finally:
        engine.dispose()


def large_archive(tiny_archive: Path, dst: Path, copies: int) -> Path:
    """``copies`` copies of the tiny archive side by side: long enough to stop half-way."""
    for i in range(copies):
        shutil.copytree(
            tiny_archive, dst / f"copy{i:02d}", ignore=shutil.ignore_patterns("*.jsonl")
        )
    return dst


def kill(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    process.send_signal(sig)
    process.communicate(timeout=60)


class ThrowawayPostgres:
    """A PostgreSQL server of the test's own (from the ``pgserver`` wheel), to stop and start.

    Never the shared server: stopping it would break every other user of it.
    """

    def __init__(self, pgdata: Path) -> None:
        import pgserver

        self.server = pgserver.get_server(pgdata, cleanup_mode="stop")
        self.pgdata = pgdata
        self.url = self.server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)

    def stop(self) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.server.system_user)

    def start(self) -> None:
        self.server.ensure_postgres_running()
        url = self.server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
        assert url == self.url, (url, self.url)

    def database(self, name: str) -> str:
        admin = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return sa.engine.make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def cleanup(self) -> None:
        self.server.cleanup()


# Runs one command and prints the peak RSS (KiB) of its largest process: the command
# itself or any descendant it waited for (the decode workers, through their zygote).
_MEASURE = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, done.returncode)\n"
)


def run_measured(
    *args: object, timeout: float = 300, env: dict | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    """``run_cli`` in a measuring wrapper: (its result, the peak RSS in MiB of its largest
    process, ``ru_maxrss`` of its children)."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        wrapper = subprocess.run(
            [sys.executable, "-c", _MEASURE, *modlabel_cmd(*args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            timeout=timeout,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        lines = wrapper.stdout.decode().strip().splitlines()
        peak_kib, code = (int(v) for v in lines[-1].split())
        out.seek(0)
        err.seek(0)
        stdout = b"\n".join(line.encode() for line in lines[:-1])
        result = subprocess.CompletedProcess(wrapper.args, code, stdout, err.read())
    return result, peak_kib / 1024
