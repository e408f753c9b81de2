"""The database at archive scale: what a nightly job asks of it, on SQLite and PostgreSQL.

Fills a database with N image rows (default 1,000,000: 7 classes, a real
compressed 18x18 CRM per row, 2% errors, 1% missing) for two models, then
times, side by side on each backend:

* the nightly lookup of 10,000 paths: a folder of 10,000 stored files paged
  through in path order as ``scan`` merges them with its walk, and the same
  10,000 paths looked up by value (the lookup of a table of figures);
* the report (``build_report`` with no examples: counts, class maps, errors);
* each named query of ``sql/``, streamed to the end;
* the class-level averages (Eq. 8): labeling 100 new images (one write with
  the running sums kept) against a full recompute of the sums over every row.

Usage: python benchmarks/bench_db.py [--rows 1000000] [--postgres URL] [--sqlite-only]
(PostgreSQL: $MODLABEL_TEST_POSTGRES_URL, else the server on 127.0.0.1:5432; a
database of its own is created and dropped.)
"""

from __future__ import annotations

import argparse
import os
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


def random_crms(rng: np.random.Generator, n: int) -> list[bytes]:
    maps = rng.gamma(2.0, 1.0, size=(n, 18, 18)).astype(np.float32)
    return codec.encode_maps(maps)


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
            with engine.begin() as conn:
                conn.execute(store.images.insert(), batch)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(
            sa.text("VACUUM ANALYZE" if engine.dialect.name == "postgresql" else "ANALYZE")
        )
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


def query_times(engine) -> dict[str, tuple[float, int]]:
    params = {
        "label": "chest_xray",
        "min_confidence": "0.99",
        "threshold": "0.5",
        "model_a": "vgg16-000000000000",
        "model_b": "vgg16-000000000001",
    }
    out = {}
    for q in list_queries():
        start = time.perf_counter()
        with open_query(engine, q, {p: params[p] for p in q.parameters if p in params}) as r:
            count = sum(1 for _ in r.rows)
        out[q.name] = (time.perf_counter() - start, count)
    return out


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


def run(url: str, rows: int, label: str) -> None:
    engine = store.open_db(url)
    t_fill, (model_id, _) = timed(fill, engine, rows)
    print(f"\n## {label}: {rows:,} rows per model, 2 models (filled in {t_fill:.0f} s)")
    t_paged, t_values = nightly_lookup(engine, model_id, rows)
    print(
        f"nightly lookup of 10,000 paths: {t_paged:.3f} s paged by folder (scan's merge), "
        f"{t_values:.3f} s by value (tables of figures)"
    )
    t_sums, t_full = class_average_costs(engine, model_id)
    print(
        f"class averages after 100 new images: {t_sums * 1000:.0f} ms written with the running "
        f"sums, against {t_full:.1f} s for a full recompute ({t_full / t_sums:.0f}x)"
    )
    with tempfile.TemporaryDirectory() as out:
        t_report, result = timed(
            build_report, engine, Path(out), model_identity="vgg16-000000000000",
            examples_per_class=0,
        )  # fmt: skip
    print(f"report: {t_report:.2f} s ({result.total_images:,} images, {result.errors:,} errors)")
    print("named queries, streamed to the end:")
    for name, (seconds, count) in query_times(engine).items():
        print(f"  {name:<22} {seconds:8.3f} s  {count:>9,} rows")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "MODLABEL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--sqlite-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(f"sqlite:///{Path(tmp) / 'bench.db'}", args.rows, "SQLite")
    if args.sqlite_only:
        return
    name = f"modlabel_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = sa.engine.make_url(args.postgres).set(database=name)
        run(url.render_as_string(hide_password=False), args.rows, "PostgreSQL")
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
