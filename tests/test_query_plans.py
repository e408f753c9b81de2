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
# Aggregates over every row of a model read them all by nature. class-counts reads every
# present row of an index instead where rows are as wide as a scan writes them (with their
# maps: test_the_class_counts_read_only_an_index); on these narrow rows, reading the table
# is as cheap, and PostgreSQL may.
# similar is exact: it reads every embedding of the model, by design (its header says so).
WHOLE_MODEL_AGGREGATES = {"class-counts", "duplicates", "similar"}  # duplicates: see its test
# Where PostgreSQL reads the table whole by choice, an index serving the query: the DICOM
# rows are a tenth of the rows here, spread over most pages of the table, and its cost
# model finds one pass cheaper than a page read at random for each (see
# test_modality_agreement_reads_only_the_dicom_rows_of_the_mapped_codes).
POSTGRES_CHOOSES_A_TABLE_SCAN = {"modality-agreement"}
# A stored map's bytes (about what an 18x18 CRM compresses to): rows as wide as a scan's, so
# that reading the table costs what it costs on an archive.
CRM_BYTES = bytes(range(256)) * 3


def populate(url: str, *, analyze: bool = True, archive_like: bool = False):
    """A database of two models of ROWS_PER_MODEL rows each (errors, missing files), with
    statistics gathered unless ``analyze`` is False; ``archive_like``: rows as a scan writes
    them, with a map, a DICOM header for a tenth, an out-of-set flag for a hundredth."""
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
            if archive_like and not failed:
                rows[-1].update(crm=CRM_BYTES, out_of_set=i % 100 == 11)
            if archive_like and i % 10 == 3:
                rows[-1]["dicom_modality"] = ("CT", "MR", "us", "DX")[i % 4]
        with engine.begin() as conn:
            conn.execute(store.images.insert(), rows)
        for _ in range(30):
            scan_id = store.start_scan(engine, model_id, ["/archive"])
            store.finish_scan(engine, scan_id, seen=1, unchanged=1)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if engine.dialect.name == "postgresql":
            # VACUUM sets the visibility map an index-only scan needs; autovacuum would too.
            conn.execute(sa.text("VACUUM ANALYZE" if analyze else "VACUUM"))
        elif analyze:
            conn.execute(sa.text("ANALYZE"))
    return engine, identities


@pytest.fixture(params=["sqlite", "postgresql"], scope="module")
def populated(request, tmp_path_factory):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('plans') / 'plans.db'}"
    else:
        url = request.getfixturevalue("postgres_database")("plans")
    engine, identities = populate(url)
    yield engine, identities
    engine.dispose()


@pytest.fixture(params=["sqlite", "sqlite-without-statistics", "postgresql"], scope="module")
def populated_any(request, tmp_path_factory):
    """``populated``, and a SQLite file without statistics: modlabel never runs ANALYZE, so
    a user's SQLite database has none, and its plans must hold without them."""
    if request.param.startswith("sqlite"):
        url = f"sqlite:///{tmp_path_factory.mktemp('plans') / 'plans.db'}"
    else:
        url = request.getfixturevalue("postgres_database")("plans")
    analyze = request.param != "sqlite-without-statistics"
    engine, identities = populate(url, analyze=analyze, archive_like=True)
    yield engine, identities
    engine.dispose()


def plan(engine, sql: str, params: dict, *, without_table_scans: bool = False) -> str:
    """The plan of ``sql``; ``without_table_scans``: as PostgreSQL plans it when it may not
    read a table whole (``enable_seqscan = off``), to show that an index can serve it."""
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        if without_table_scans and engine.dialect.name == "postgresql":
            conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
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
    "path": "/archive/000/0000001.jpg",
    "limit": 20,
}


@pytest.mark.parametrize("query", [q.name for q in list_queries()])
def test_each_named_query_is_served_by_an_index(populated, query):
    engine, _ = populated
    named = load_query(query)
    text = plan(engine, named.body, {p: PARAMS[p] for p in named.parameters})
    if query in WHOLE_MODEL_AGGREGATES:
        return  # reads every row of a model; see README
    if query in POSTGRES_CHOOSES_A_TABLE_SCAN and engine.dialect.name == "postgresql":
        return
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


def reads_index_only(engine, text: str, index: str) -> bool:
    """Does the plan read ``index`` alone, never the table behind it?"""
    if engine.dialect.name == "sqlite":
        return f"USING COVERING INDEX {index}" in text
    return f"Index Only Scan using {index}" in text


def test_the_class_counts_read_only_an_index(populated_any):
    """class-counts counts every present row of every model on the narrow index of present
    files' labels, never reading the rows (with their maps): 3 s on a million rows before."""
    engine, _ = populated_any
    text = plan(engine, load_query("class-counts").body, {})
    assert reads_index_only(engine, text, "ix_images_present_labels"), text
    assert not full_scan_of_images(engine, text), text


def test_modality_agreement_reads_only_the_dicom_rows_of_the_mapped_codes(populated_any):
    """modality-agreement finds the rows of each Modality code of its mapping on the index
    of (model_id, upper(dicom_modality)), not every row of the model: 27 s on a million
    rows before."""
    engine, _ = populated_any
    named = load_query("modality-agreement")
    # PostgreSQL may rather read the table (POSTGRES_CHOOSES_A_TABLE_SCAN); the index must
    # still be able to serve the query's shape (the model as a value, the expression).
    text = plan(engine, named.body, {"model": PARAMS["model"]}, without_table_scans=True)
    assert "ix_images_model_dicom_modality_upper" in text, text
    assert not full_scan_of_images(engine, text), text


def test_duplicates_group_hashes_paths_and_labels_on_one_index(populated_any):
    """duplicates groups the model's hashes, with their paths and labels, in one pass over
    the index of present hashes, never reading the table: 7 s on a million rows with the
    table, 3.8 s with the hashes from an index and the repeated rows from the table."""
    engine, _ = populated_any
    named = load_query("duplicates")
    text = plan(engine, named.body, {"model": PARAMS["model"]}, without_table_scans=True)
    assert reads_index_only(engine, text, "ix_images_present_hashes"), text
    assert not full_scan_of_images(engine, text), text
    assert text.count("ix_images_present_hashes") == 1, text  # one pass
    if engine.dialect.name == "sqlite":
        assert "TEMP B-TREE FOR GROUP BY" not in text, text  # in the index's hash order


def test_disagreements_merge_two_models_on_one_index(populated_any):
    """model-disagreements reads each model's rows from the index of (model, path, label,
    ...) alone on PostgreSQL, and merges them, never reading the table: 3.5 s on a million
    rows per model with the table."""
    engine, _ = populated_any
    named = load_query("model-disagreements")
    params = {"model_a": PARAMS["model_a"], "model_b": PARAMS["model_b"]}
    text = plan(engine, named.body, params, without_table_scans=True)
    assert not full_scan_of_images(engine, text), text
    if engine.dialect.name == "sqlite":
        # Model A's rows in path order from it; model B's row of each path by its key.
        assert "SEARCH a USING COVERING INDEX ix_images_model_path_labels" in text, text
        assert re.search(r"SEARCH b USING .*INDEX \S+ \(model_id=\? AND path=\?\)", text), text
    else:
        assert text.count("Index Only Scan using ix_images_model_path_labels") == 2, text
        assert "Merge Join" in text and "Sort" not in text, text  # both in path order


def test_errors_read_the_error_rows_in_their_order(populated_any):
    """errors reads the model's error rows on the partial index in the query's order, with
    or without statistics, never every row of the model: 2.5 s on a million rows before."""
    engine, _ = populated_any
    named = load_query("errors")
    text = plan(engine, named.body, {"model": PARAMS["model"]}, without_table_scans=True)
    assert "ix_images_errors" in text, text
    assert not full_scan_of_images(engine, text), text


def report_reads(engine) -> dict[str, list[sa.Select]]:
    """The queries of the report's class counts and histograms, as run (``_minus_failed``
    receives each pair: the present files, then the failed ones)."""
    from modlabel.store import reads

    seen: list[sa.Select] = []
    original = reads._minus_failed

    def recording(conn, present, failed):
        seen.extend([present, failed])
        return original(conn, present, failed)

    reads._minus_failed = recording
    try:
        store.class_counts(engine, 1)
        counts = list(seen)
        seen.clear()
        store.confidence_histograms(engine, 1, 20)
        histograms = list(seen)
    finally:
        reads._minus_failed = original
    return {"class counts": counts, "histograms": histograms}


def test_the_reports_counts_and_histograms_read_indexes_not_rows(populated_any):
    """The report's class counts and confidence histograms read the index of present files'
    labels alone, and the few failed files on the partial index of errors: without
    statistics too, where SQLite would otherwise look every row up for its error."""
    engine, _ = populated_any
    for name, (present, failed) in report_reads(engine).items():
        for query, index, only in ((present, "ix_images_present_labels", True),
                                   (failed, "ix_images_errors", False)):  # fmt: skip
            compiled = query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
            text = plan(engine, str(compiled), {})
            assert index in text, (name, text)
            assert not full_scan_of_images(engine, text), (name, text)
            if only:
                assert reads_index_only(engine, text, index), (name, text)


def statements_of(engine, read) -> list[tuple[str, object]]:
    """The statements (SQL, parameters) that ``read()`` sends to ``engine``."""
    seen: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        read()
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    return [(s, p) for s, p in seen if s.lstrip().upper().startswith("SELECT")]


def test_the_reports_error_count_and_groups_read_the_errors_index(populated_any):
    """The report's count of failed files and its errors by reason read the partial index of
    errors, without statistics too: SQLite otherwise took an index of every row of the
    model and looked each up for its error (3 s each on a million rows)."""
    engine, _ = populated_any
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    reads = {
        "count": lambda: store.count_errors(engine, 1),
        "groups": lambda: store.error_groups(engine, 1),
    }
    for name, read in reads.items():
        statements = statements_of(engine, read)
        assert statements, name
        with engine.connect() as conn:
            for statement, parameters in statements:
                rows = conn.exec_driver_sql(prefix + statement, parameters).all()
                text = "\n".join(str(r[-1]) for r in rows)
                assert "ix_images_errors" in text, (name, text)
                assert not full_scan_of_images(engine, text), (name, text)


# Rows of two more models, by path: (label A, label B, ...) as the queries must tell them
# apart: missing files, out-of-set flags, errors, files only one model has, shared hashes.
EDGE_ROWS = {
    # path: (row of model A, row of model B); a row: label, confidence, sha256, flags
    "/edge/p00.jpg": (("chest", 0.9, "h1", {}), ("chest", 0.8, None, {})),
    "/edge/p01.jpg": (("chest", 0.9, "h1", {}), ("brain", 0.7, None, {})),
    "/edge/p02.jpg": (("brain", 0.6, "h2", {"missing": True}), ("chest", 0.5, None, {})),
    "/edge/p03.jpg": (("brain", 0.6, "h2", {}), ("chest", 0.5, None, {"missing": True})),
    "/edge/p04.jpg": (("brain", 0.6, "h3", {"out_of_set": True}), ("chest", 0.5, None, {})),
    "/edge/p05.jpg": (("brain", 0.6, "h3", {}), ("chest", 0.5, None, {"out_of_set": True})),
    "/edge/p06.jpg": (("brain", 0.6, "h1", {"out_of_set": False}), ("chest", None, None, {})),
    "/edge/p07.jpg": ((None, None, "h4", {"error": "cannot decode"}), ("chest", 0.5, None, {})),
    "/edge/p08.jpg": (("us", 0.99, "h5", {}), None),
    "/edge/p09.jpg": (None, ("us", 0.99, None, {})),
    "/edge/p10.jpg": (("x", 0.3, "h4", {}), ("y", 0.2, None, {})),
    "/edge/p11.jpg": (("abc", 0.3, "h5", {}), ("abc", 0.2, None, {})),
    "/edge/p12.jpg": (("brain", 0.6, None, {}), ("chest", 0.5, None, {})),
}


@pytest.fixture(scope="module")
def edge_models(populated):
    """``populated`` with two more models of EDGE_ROWS: their identities."""
    engine, _ = populated
    now = datetime(2026, 11, 25, tzinfo=timezone.utc)
    identities = ("edge-000000000000", "edge-000000000001")
    rows = []
    for side, identity in enumerate(identities):
        model_id = store.ensure_model(
            engine, identity=identity, sha256="0" * 64, backbone="vgg16", class_names=LABELS,
            input_size=[300, 300], activation_shape=[18, 18, 512], path="m.onnx",
        )  # fmt: skip
        for path, pair in EDGE_ROWS.items():
            if pair[side] is None:
                continue
            label, confidence, sha, flags = pair[side]
            rows.append({
                "model_id": model_id, "path": path, "size_bytes": 1, "mtime": 1.0,
                "sha256": None if sha is None else sha * 32, "label": label,
                "confidence": confidence, "labeled_at": now, "error": flags.get("error"),
                "missing_since": now if flags.get("missing") else None,
                "out_of_set": flags.get("out_of_set"),
            })  # fmt: skip
    with engine.begin() as conn:
        conn.execute(store.images.insert(), rows)
    return identities


def named_rows(engine, name: str, params: dict) -> list[tuple]:
    from modlabel.queries import run_query

    return run_query(engine, load_query(name), params)[1]


def test_disagreements_and_duplicates_give_the_rows_their_definitions_give(populated, edge_models):
    """model-disagreements and duplicates, computed in Python from every stored row of the
    two models, give the same rows on both databases (however their SQL reads them)."""
    engine, _ = populated
    model_a, model_b = edge_models
    c = store.images.c
    with engine.connect() as conn:
        stored = {
            (identity, r.path): r
            for identity in edge_models
            for r in conn.execute(
                sa.select(store.images).where(c.model_id == store.pick_model(engine, identity).id)
            )
        }

    def kept(r) -> bool:
        return r.out_of_set is not True and r.label is not None

    expected = sorted(
        (a.path, a.label, a.confidence, b.label, b.confidence)
        for (identity, path), a in stored.items()
        if identity == model_a and (b := stored.get((model_b, path))) is not None
        if kept(a) and kept(b) and a.missing_since is None and a.label != b.label
    )
    assert [r[0] for r in expected] == [f"/edge/p{i:02d}.jpg" for i in (1, 3, 6, 10, 12)]
    got = named_rows(engine, "model-disagreements", {"model_a": model_a, "model_b": model_b})
    assert got == expected

    groups: dict[str, list] = {}
    for (identity, _), r in stored.items():
        present = r.error is None and r.missing_since is None and r.out_of_set is not True
        if identity == model_a and r.sha256 is not None and present:
            groups.setdefault(r.sha256, []).append(r)
    expected = []
    for sha, rs in groups.items():
        if len(rs) > 1:
            paths, labels = [r.path for r in rs], [r.label for r in rs if r.label is not None]
            expected.append((sha, len(rs), min(paths), max(paths), min(labels, default=None)))
    expected.sort(key=lambda row: (-row[1], row[2]))
    assert [(row[0][0], row[1]) for row in expected] == [("h", 3), ("h", 2)]
    assert named_rows(engine, "duplicates", {"model": model_a}) == expected
