"""The database at archive scale: what a nightly job asks of it, on SQLite and PostgreSQL.

Fills a database with N image rows (default 1,000,000: 7 classes, a real
compressed 18x18 CRM per row, 2% errors, 1% missing, a tenth DICOM) for two
models, then measures, side by side on each backend, each step in a child
process of its own (its wall seconds, its CPU seconds, and its peak RSS as
``ru_maxrss`` of that child: memory that stays flat as N grows is the point):

* the nightly lookup of 10,000 paths: a folder of 10,000 stored files paged
  through in path order as ``scan`` merges them with its walk, and the same
  10,000 paths looked up by value (the lookup of a table of figures);
* the class-level averages (Eq. 8): labeling 100 new images (one write with
  the running sums kept) against a full recompute of the sums over every row;
* the report (``build_report`` with no examples: every format, images.csv
  with a row per image included);
* each named query of ``sql/``, streamed to the end.

It prints figures; it asserts no timing. ``--rows 100000,1000000`` runs each
size in turn (a database each) and ends with the peak RSS of every step at
every size, to compare.

Usage: python benchmarks/bench_db.py [--rows 1000000[,...]] [--postgres URL] [--sqlite-only]
(PostgreSQL: $MODLABEL_TEST_POSTGRES_URL, else the server on 127.0.0.1:5432; a
database of its own is created and dropped.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from modlabel import codec, store
from modlabel.queries import list_queries, open_query
from modlabel.report import build_report

LABELS = [
    "abdominal_ct",
    "brain_mri",
    "chest_xray",
    "fluorescence_microscopy",
    "retinal_funduscopy",
    "statistical_graph",
    "ultrasound",
]
FOLDER_FILES = 1000  # files per folder: /archive/<folder>/<file>.jpg
CHUNK = 20_000
SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy stores a UTC time in SQLite


def random_crms(rng: np.random.Generator, n: int) -> list[bytes]:
    maps = rng.gamma(2.0, 1.0, size=(n, 18, 18)).astype(np.float32)
    return codec.encode_maps(maps)


def insert_rows(engine, batch: list[dict]) -> None:
    """Insert ``batch`` (dicts of ``images`` columns) the fastest way each driver has:
    COPY on PostgreSQL, the driver's executemany on SQLite (SQLAlchemy's per-row work
    made filling a million rows take longer than everything measured)."""
    columns = list(batch[0])
    values = [tuple(r[c] for c in columns) for r in batch]
    with engine.begin() as conn:
        cursor = conn.connection.driver_connection.cursor()
        if engine.dialect.name == "postgresql":
            with cursor.copy(f"COPY images ({', '.join(columns)}) FROM STDIN") as copy:
                for row in values:
                    copy.write_row(row)
        else:
            marks = ", ".join("?" for _ in columns)
            cursor.executemany(
                f"INSERT INTO images ({', '.join(columns)}) VALUES ({marks})",
                [
                    tuple(v.strftime(SQLITE_TIME) if isinstance(v, datetime) else v for v in row)
                    for row in values
                ],
            )


def fill(engine, rows: int, seed: int = 0) -> list[int]:
    """Insert ``rows`` rows for each of two models; returns the model ids."""
    rng = np.random.default_rng(seed)
    now = datetime(2026, 11, 25, tzinfo=timezone.utc)
    crms = random_crms(rng, 4096)  # reused: the bytes of real maps, without 1M encodes
    model_ids = []
    for m in range(2):
        model_id = store.ensure_model(
            engine,
            identity=f"vgg16-{m:012d}",
            sha256="0" * 64,
            backbone="vgg16",
            class_names=LABELS,
            input_size=[300, 300],
            activation_shape=[18, 18, 512],
            path="model.onnx",
        )
        model_ids.append(model_id)
        for start in range(0, rows, CHUNK):
            batch = []
            for i in range(start, min(rows, start + CHUNK)):
                failed = i % 50 == 0
                confidence = float(rng.beta(8, 1))
                dicom = i % 10 == 3  # a tenth of the archive is DICOM
                batch.append(
                    {
                        "model_id": model_id,
                        "path": f"/archive/{i // FOLDER_FILES:05d}/{i:08d}.jpg",
                        "size_bytes": 50_000 + i % 1000,
                        "mtime": 1.7e9 + i,
                        "sha256": f"{(i * 7919) % (rows * 9 // 10):064x}",
                        "width": 512,
                        "height": 512,
                        "label": None if failed else LABELS[i % 7],
                        "confidence": None if failed else confidence,
                        "probabilities": None,
                        "crm": None if failed else crms[i % len(crms)],
                        "error": "cannot decode image: truncated" if failed else None,
                        "labeled_at": now + timedelta(microseconds=i),
                        "missing_since": now if i % 100 == 7 else None,
                        "source_id": None,
                        # What a scan stores beside the label since modlabel computes each
                        # image's figures once (runner-up, ROI share, out-of-set flag).
                        "runner_up": None if failed else LABELS[(i + 3) % 7],
                        "runner_up_probability": None if failed else (1 - confidence) / 2,
                        "roi_share": None if failed else 0.3 + (i % 40) / 100,
                        "ood_score": None if failed else float(i % 300),
                        "out_of_set": None if failed else i % 100 == 11,
                        "dicom_modality": ("CT", "MR", "US", "DX")[i % 4] if dicom else None,
                        "dicom_body_part": "CHEST" if dicom else None,
                        "error_kind": "corrupt" if failed else None,
                    }
                )
            insert_rows(engine, batch)
    # PostgreSQL: statistics and the visibility map (index-only scans need it), as its
    # autovacuum would keep them. SQLite gets no statistics: modlabel never runs ANALYZE,
    # so a user's file has none (the ANALYZE once run here was rolled back unseen, inside
    # the BEGIN modlabel's engine emits).
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE"))
    return model_ids


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def nightly_lookup(engine, model_id: int, rows: int, n: int = 10_000) -> tuple[float, float]:
    """(seconds to page through n stored paths of a folder tree, seconds to look them up)."""
    folders = max(1, min(n, rows) // FOLDER_FILES)
    first = max(0, rows // FOLDER_FILES // 2 - folders // 2)  # from the middle of the archive
    wanted = [
        f"/archive/{i // FOLDER_FILES:05d}/{i:08d}.jpg"
        for i in range(first * FOLDER_FILES, (first + folders) * FOLDER_FILES)
    ]

    def paged() -> int:
        seen = 0
        for folder in range(first, first + folders):
            after = None
            while page := store.known_under(
                engine, model_id, f"/archive/{folder:05d}", after=after, page=2000
            ):
                seen += len(page)
                after = page[-1][0]
        return seen

    t_paged, seen = timed(paged)
    assert seen == len(wanted), (seen, len(wanted))
    t_values = 0.0
    for start in range(0, len(wanted), 256):  # the scan's lookup chunk
        t, _ = timed(store.known_files, engine, model_id, wanted[start : start + 256])
        t_values += t
    return t_paged, t_values


def class_average_costs(engine, model_id: int) -> tuple[float, float]:
    """(seconds to write 100 new labeled rows with the sums kept, seconds of a full rebuild)."""
    t_full, _ = timed(store.rebuild_class_maps, engine, model_id, LABELS, 0.9)
    rng = np.random.default_rng(1)
    crms = random_crms(rng, 100)
    now = store.utcnow()
    rows = [
        {
            "path": f"/incoming/{uuid.uuid4().hex}.jpg",
            "size_bytes": 1,
            "mtime": 1.0,
            "sha256": "f" * 64,
            "width": 512,
            "height": 512,
            "label": LABELS[i % 7],
            "confidence": 0.95,
            "probabilities": None,
            "crm": crms[i],
            "error": None,
            "labeled_at": now,
        }
        for i in range(100)
    ]
    t_incremental, _ = timed(store.write_image_rows, engine, model_id, rows)
    counts, sums = store.sum_class_maps(engine, model_id, 0.9)
    stored = {r["class_name"]: r["image_count"] for r in store.load_class_maps(engine, model_id)}
    assert stored == {k: v for k, v in counts.items() if v}, "running sums drifted"
    return t_incremental, t_full


# -- each step in a child process of its own --------------------------------------------


def step_lookup(engine) -> dict:
    model_id = store.pick_model(engine, "vgg16-000000000000").id
    rows = int(os.environ["BENCH_ROWS"])
    t_paged, t_values = nightly_lookup(engine, model_id, rows)
    return {"paged": t_paged, "values": t_values}


def step_class_averages(engine) -> dict:
    model_id = store.pick_model(engine, "vgg16-000000000000").id
    t_sums, t_full = class_average_costs(engine, model_id)
    return {"sums": t_sums, "full": t_full}


def step_report(engine) -> dict:
    with tempfile.TemporaryDirectory() as out:
        t_report, result = timed(
            build_report, engine, Path(out), model_identity="vgg16-000000000000",
            examples_per_class=0,
        )  # fmt: skip
    return {
        "seconds": t_report,
        "images": result.total_images,
        "errors": result.errors,
        "rows": result.images_written,
    }


def step_query(engine, name: str) -> dict:
    params = {
        "label": "chest_xray",
        "min_confidence": "0.99",
        "threshold": "0.5",
        "model_a": "vgg16-000000000000",
        "model_b": "vgg16-000000000001",
        "path": "/archive/00000/00000001.jpg",
    }
    (query,) = [q for q in list_queries() if q.name == name]
    start = time.perf_counter()
    bound = {p: params[p] for p in query.parameters if p in params}
    with open_query(engine, query, bound) as result:
        count = sum(1 for _ in result.rows)
    return {"seconds": time.perf_counter() - start, "rows": count}


def child(url: str, step: str) -> None:
    """Run one step on ``url`` and print its figures as one JSON line."""
    engine = store.open_db(url)
    if step.startswith("query:"):
        figures = step_query(engine, step.removeprefix("query:"))
    else:
        figures = {"lookup": step_lookup, "averages": step_class_averages,
                   "report": step_report}[step](engine)  # fmt: skip
    engine.dispose()
    print(json.dumps(figures))


# Starts a step's process and reports its rusage. The step is started from this small
# process, not from the benchmark: a child's ru_maxrss starts at the RSS of the process
# that forked it (Linux keeps the high-water mark across exec), and the benchmark holds
# the filled rows' memory.
LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)
out = proc.stdout.read()
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "out": out,
                  "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_kib": usage.ru_maxrss}))
"""


def in_child(url: str, step: str, rows: int) -> dict:
    """The figures of ``step`` run in a new Python process, with that process's wall
    seconds, CPU seconds and peak RSS (MiB, ``ru_maxrss`` of that process alone)."""
    start = time.perf_counter()
    launched = subprocess.run(
        [sys.executable, "-c", LAUNCHER, sys.executable, __file__, "--child", step, "--url", url],
        stdout=subprocess.PIPE,
        env={**os.environ, "BENCH_ROWS": str(rows)},
        text=True,
        check=True,
    )
    report = json.loads(launched.stdout)
    if report["exit"] != 0:  # its traceback is on stderr; the other steps go on
        return {"failed": report["exit"], "cpu_s": report["cpu_s"], "rss_mib": 0.0}
    figures = json.loads(report["out"].strip().splitlines()[-1])
    figures.update(
        process_s=time.perf_counter() - start,
        cpu_s=report["cpu_s"],
        rss_mib=report["maxrss_kib"] / 1024,  # KiB on Linux
    )
    return figures


def must(figures: dict, step: str) -> dict:
    if "failed" in figures:
        raise SystemExit(f"step {step} failed (exit {figures['failed']})")
    return figures


def run(url: str, rows: int, label: str) -> dict[str, float]:
    """Fill ``url`` with ``rows`` rows per model, print every step's figures; returns the
    peak RSS (MiB) of each step."""
    engine = store.open_db(url)
    t_fill, _ = timed(fill, engine, rows)
    engine.dispose()
    print(f"\n## {label}: {rows:,} rows per model, 2 models (filled in {t_fill:.0f} s)")
    print("(each step in a process of its own: wall s, CPU s, peak RSS of that process)")
    rss = {}

    def cost(figures: dict) -> str:
        return f"[{figures['cpu_s']:.1f} s CPU, {figures['rss_mib']:.0f} MiB peak RSS]"

    f = must(in_child(url, "lookup", rows), "lookup")
    rss["lookup"] = f["rss_mib"]
    print(
        f"nightly lookup of 10,000 paths: {f['paged']:.3f} s paged by folder (scan's merge), "
        f"{f['values']:.3f} s by value (tables of figures) {cost(f)}"
    )
    f = must(in_child(url, "averages", rows), "averages")
    rss["class averages"] = f["rss_mib"]
    print(
        f"class averages after 100 new images: {f['sums'] * 1000:.0f} ms written with the "
        f"running sums, against {f['full']:.1f} s for a full recompute "
        f"({f['full'] / f['sums']:.0f}x) {cost(f)}"
    )
    f = must(in_child(url, "report", rows), "report")
    rss["report"] = f["rss_mib"]
    print(
        f"report: {f['seconds']:.2f} s ({f['images']:,} images, {f['errors']:,} errors, "
        f"{f['rows']:,} rows of images.csv) {cost(f)}"
    )
    print("named queries, streamed to the end:")
    for query in list_queries():
        f = in_child(url, f"query:{query.name}", rows)
        rss[query.name] = f["rss_mib"]
        if "failed" in f:
            print(f"  {query.name:<22} failed (exit {f['failed']}; its error is above)")
            continue
        print(f"  {query.name:<22} {f['seconds']:8.3f} s  {f['rows']:>9,} rows  {cost(f)}")
    return rss


def postgres_database(admin_url: str):
    """A new database on the server of ``admin_url``: (its URL, a function that drops it)."""
    name = f"modlabel_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    url = sa.engine.make_url(admin_url).set(database=name)
    return url.render_as_string(hide_password=False), drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1_000_000],
        help="rows per model; several sizes comma-separated (100000,1000000)",
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "MODLABEL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--sqlite-only", action="store_true")
    parser.add_argument("--postgres-only", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.url, args.child)
        return
    peaks: dict[tuple[str, int], dict[str, float]] = {}
    for rows in args.rows:
        if not args.postgres_only:
            with tempfile.TemporaryDirectory() as tmp:
                url = f"sqlite:///{Path(tmp) / 'bench.db'}"
                peaks["SQLite", rows] = run(url, rows, "SQLite")
        if not args.sqlite_only:
            url, drop = postgres_database(args.postgres)
            try:
                peaks["PostgreSQL", rows] = run(url, rows, "PostgreSQL")
            finally:
                drop()
    if len(args.rows) > 1:
        print("\n## peak RSS (MiB) of each step's process, by size")
        for dialect in ("SQLite", "PostgreSQL"):
            sizes = [rows for rows in args.rows if (dialect, rows) in peaks]
            if not sizes:
                continue
            print(f"{dialect:<22} " + " ".join(f"{rows:>10,}" for rows in sizes))
            for step in peaks[dialect, sizes[0]]:
                cells = " ".join(f"{peaks[dialect, rows][step]:>10.0f}" for rows in sizes)
                print(f"  {step:<20} {cells}")


if __name__ == "__main__":
    main()
