"""Every named query and every lookup of the scan is served by an index, on a populated
database, on SQLite and on PostgreSQL (EXPLAIN, not timing)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from modlabel import store
from modlabel.queries import list_queries, load_query

ROWS_PER_MODEL = 20_000
LABELS = ["abdominal_ct", "brain_mri", "chest_xray", "fluorescence", "fundus", "graph", "us"]
# Aggregates over every row of a model read them all by nature; modality-agreement reads
# every row of a model too, since no index holds images.dicom_modality (see README).
WHOLE_MODEL_AGGREGATES = {"class-counts", "duplicates", "modality-agreement"}


@pytest.fixture(params=["sqlite", "postgresql"], scope="module")
def populated(request, tmp_path_factory):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('plans') / 'plans.db'}"
    else:
        url = request.getfixturevalue("postgres_database")("plans")
    engine = store.open_db(url)
    now = datetime(2026, 11, 25, tzinfo=timezone.utc)
    identities = []
    for m in range(2):
        model_id = store.ensure_model(
            engine, identity=f"vgg16-{m:012d}", sha256="0" * 64, backbone="vgg16",
            class_names=LABELS, input_size=[300, 300], activation_shape=[18, 18, 512],
            path="m.onnx",
        )  # fmt: skip
        identities.append(f"vgg16-{m:012d}")
        rows = []
        for i in range(ROWS_PER_MODEL):
            failed = i % 50 == 0
            rows.append({
                "model_id": model_id, "path": f"/archive/{i // 1000:03d}/{i:07d}.jpg",
                "size_bytes": 1000 + i, "mtime": 1.0 * i, "sha256": f"{i % 15000:064x}",
                "width": 512, "height": 512,
                "label": None if failed else LABELS[i % 7],
                "confidence": None if failed else (i % 1000) / 1000,
                "probabilities": None, "crm": None,
                "error": "cannot decode image" if failed else None,
                "labeled_at": now + timedelta(seconds=i),
                "missing_since": now if i % 97 == 0 else None, "source_id": None,
            })  # fmt: skip
        with engine.begin() as conn:
            conn.execute(store.images.insert(), rows)
        for _ in range(30):
            scan_id = store.start_scan(engine, model_id, ["/archive"])
            store.finish_scan(engine, scan_id, seen=1, unchanged=1)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(
            sa.text("VACUUM ANALYZE" if engine.dialect.name == "postgresql" else "ANALYZE")
        )
    yield engine, identities
    engine.dispose()


def plan(engine, sql: str, params: dict) -> str:
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        rows = conn.execute(sa.text(prefix + sql), params).all()
    return "\n".join(str(r[-1]) for r in rows)


def full_scan_of_images(engine, text: str) -> bool:
    """Does the plan read the images table whole (not an index of it)?"""
    if engine.dialect.name == "sqlite":
        # "SCAN i" reads the table; "SCAN i USING COVERING INDEX ..." reads only an index.
        return any(
            re.match(r"SCAN (images|i|a|b)\b", line.strip()) and "INDEX" not in line
            for line in text.splitlines()
        )
    return "Seq Scan on images" in text


PARAMS = {
    "label": "chest_xray",
    "min_confidence": "0.95",
    "threshold": "0.01",
    "model": "vgg16-000000000000",
    "model_a": "vgg16-000000000000",
    "model_b": "vgg16-000000000001",
}


@pytest.mark.parametrize("query", [q.name for q in list_queries()])
def test_each_named_query_is_served_by_an_index(populated, query):
    engine, _ = populated
    named = load_query(query)
    text = plan(engine, named.body, {p: PARAMS[p] for p in named.parameters})
    if query in WHOLE_MODEL_AGGREGATES:
        return  # reads every row of a model; see README
    assert not full_scan_of_images(engine, text), text


def test_the_scan_and_report_lookups_are_served_by_an_index(populated):
    engine, _ = populated
    c = store.images.c
    dialect = engine.dialect
    lookups = {
        "folder page": store.known_under_query(1, "/archive/007", after=None, page=1000),
        "paths": sa.select(c.path).where(c.model_id == 1, c.path.in_(["/archive/000/0000001.jpg"])),
        "examples": sa.select(c.path)
        .where(
            c.model_id == 1, c.missing_since.is_(None), c.label == "brain_mri", c.error.is_(None)
        )
        .order_by(c.confidence.desc(), c.path)
        .limit(4),
        "errors": sa.select(c.path, c.error)
        .where(c.model_id == 1, c.missing_since.is_(None), c.error.is_not(None))
        .order_by(c.path)
        .limit(100),
        "missing": sa.select(c.path).where(c.model_id == 1, c.missing_since.is_not(None)),
        "latest label": sa.select(sa.func.max(c.labeled_at)).where(c.model_id == 1),
    }
    for name, query in lookups.items():
        compiled = query.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
        text = plan(engine, str(compiled), {})
        assert not full_scan_of_images(engine, text), (name, text)
