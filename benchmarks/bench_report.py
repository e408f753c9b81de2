"""The report's memory at archive scale: peak RSS for 10,000 and 100,000 image rows.

Fills a database per size (``bench_db.fill``: 7 classes, a real compressed 18x18
CRM per row, 2% errors, 1% missing, input 300x300; the class sums built once), then
runs the report in a fresh process for each part and prints the peak resident
memory side by side: the process's ``VmHWM`` (Linux), its ``ru_maxrss`` elsewhere.
(On Linux a child's ``ru_maxrss`` starts from its parent's peak, which survives
the exec: here the parent that filled the database.) ``images.csv`` is streamed and the page's
queries aggregate in the database, so the peaks should not grow with the rows; the
"imports" column is a process that only imports modlabel and opens the database.

Usage: python benchmarks/bench_report.py [--rows 10000,100000] [--postgres URL [--no-sqlite]]
(SQLite always; PostgreSQL too with --postgres: a database of its own per size is
created and dropped, the server-side cursor path.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from modlabel import store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_db import LABELS, fill  # noqa: E402

# Each runs in a fresh process: (column title, --format, or None for imports only).
RUNS = [
    ("imports", None),
    ("html", "html"),
    ("rois,maps", "rois,maps"),
    ("images", "images"),
    ("all", "all"),
]

CHILD = """
import json, resource, sys, time
from pathlib import Path
from modlabel import store
from modlabel.report import build_report

url, out, formats = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
engine = store.open_db(url)
start = time.perf_counter()
rows = 0
if formats != "-":
    result = build_report(
        engine, out, model_identity="vgg16-000000000000", examples_per_class=0, formats=formats
    )
    rows = result.images_written
seconds = time.perf_counter() - start
try:  # this process's own high-water mark (Linux)
    status = Path("/proc/self/status").read_text()
    peak_kib = int(status.split("VmHWM:")[1].split()[0])
except (OSError, IndexError):
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
print(json.dumps({"seconds": seconds, "peak_mib": peak_kib / 1024, "rows": rows}))
"""


def run_child(url: str, out: Path, formats: str | None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, url, str(out), formats or "-"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"report process failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(url: str, rows: int) -> float:
    engine = store.open_db(url)
    start = time.perf_counter()
    model_id, _ = fill(engine, rows)
    store.rebuild_class_maps(engine, model_id, LABELS, 0.9)
    engine.dispose()
    return time.perf_counter() - start


def bench(label: str, urls: dict[int, str], tmp: Path) -> None:
    results: dict[int, dict[str, dict]] = {}
    for rows, url in urls.items():
        t_fill = prepare(url, rows)
        print(f"{label}: filled {rows:,} rows per model, 2 models, in {t_fill:.0f} s", flush=True)
        results[rows] = {
            title: run_child(url, tmp / f"{label}-{rows}-{i}", formats)
            for i, (title, formats) in enumerate(RUNS)
        }
    sizes = list(results)
    print(f"\n## {label}: peak RSS (MiB) of a fresh process per part, and its time")
    header = f"{'part':<12}" + "".join(f"{f'{n:,} rows':>24}" for n in sizes)
    print(header)
    for title, _ in RUNS:
        cells = "".join(
            f"{results[n][title]['peak_mib']:>13.0f} MiB {results[n][title]['seconds']:>6.1f} s"
            for n in sizes
        )
        print(f"{title:<12}{cells}")
    for n in sizes:
        assert results[n]["all"]["rows"] == n, results[n]["all"]
    growth = results[sizes[-1]]["all"]["peak_mib"] - results[sizes[0]]["all"]["peak_mib"]
    print(
        f"images.csv rows: {', '.join(f'{n:,}' for n in sizes)}; peak of 'all' grew "
        f"{growth:+.0f} MiB from {sizes[0]:,} to {sizes[-1]:,} rows"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="10000,100000")
    parser.add_argument("--postgres", default=None, help="also on this PostgreSQL server")
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            urls = {n: f"sqlite:///{Path(tmp) / f'bench-{n}.db'}" for n in sizes}
            bench("SQLite", urls, Path(tmp))
    if not args.postgres:
        return
    admin = sa.create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    names = {n: f"modlabel_bench_report_{uuid.uuid4().hex[:8]}" for n in sizes}
    try:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        base = sa.engine.make_url(args.postgres)
        urls = {
            n: base.set(database=name).render_as_string(hide_password=False)
            for n, name in names.items()
        }
        with tempfile.TemporaryDirectory() as tmp:
            bench("PostgreSQL", urls, Path(tmp))
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
