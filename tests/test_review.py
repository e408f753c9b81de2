"""The review loop: human labels kept apart (reviews survive scans, relabels, prunes and
migrations on SQLite and PostgreSQL), the review queues' orders, the archive's accuracy
against a direct computation, the training set from the archive, and the CSV import."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image
from toy_onnx import toy_model, write_pngs
from typer.testing import CliRunner

from modlabel import codec, stats, store
from modlabel.accuracy import archive_accuracy, reviewed_sample, sample_figures, weighted_ece
from modlabel.calibration import expected_calibration_error
from modlabel.cli import app
from modlabel.config import resolve_db_url
from modlabel.dataset import MANIFEST, data_file_name, write_dataset
from modlabel.errors import ModlabelError, UsageError
from modlabel.metrics import one_vs_rest_auc, weighted_auc
from modlabel.model import OnnxModel
from modlabel.paths import to_db
from modlabel.queries import load_query, run_query
from modlabel.report import build_report
from modlabel.report.files import IMAGE_CSV_COLUMNS, write_images_csv
from modlabel.review import (
    _place,
    import_reviews_csv,
    k_center_greedy,
    review_queue,
    typicality,
)
from modlabel.scan import scan_archive
from modlabel.store.reviews import ImageKey

CLASSES = ["abdominal_ct", "brain_mri", "chest_xray"]
NOW = datetime(2026, 12, 2, tzinfo=timezone.utc)


def engine_of(url: str) -> sa.Engine:
    return store.open_db(resolve_db_url(url))


def clear_reviews(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(store.reviews.delete())


def row(i: int, label: str, confidence: float, **more) -> dict:
    """An image row as a scan writes one (the store API's shape), of class ``label``."""
    others = [c for c in CLASSES if c != label]
    runner = more.pop("runner_up_probability", (1 - confidence) * 0.6)
    probs = {label: confidence, others[0]: runner, others[1]: max(0.0, 1 - confidence - runner)}
    return {
        "path": more.pop("path", f"/archive/{i:03d}.png"), "size_bytes": 10 + i, "mtime": 1.0,
        "sha256": more.pop("sha256", f"{i:064x}"), "width": 8, "height": 8, "label": label,
        "confidence": confidence, "probabilities": probs, "crm": None, "error": None,
        "labeled_at": NOW, "runner_up": others[0], "runner_up_probability": runner, **more,
    }  # fmt: skip


def hand_model(engine: sa.Engine, rows: list[dict], identity: str = "hand-000000000001") -> int:
    model_id = store.ensure_model(
        engine, identity=identity, sha256="1" * 64, backbone="tiny", class_names=CLASSES,
        input_size=[8, 8], activation_shape=[4, 4, 4], path="m.onnx",
    )  # fmt: skip
    store.write_image_rows(engine, model_id, rows)
    return model_id


@pytest.fixture(params=["sqlite", "postgresql"], scope="module")
def module_db(request, tmp_path_factory) -> str:
    """One database of either kind for the tests of this module that start by clearing
    the reviews (a PostgreSQL database and its migrations are worth sharing)."""
    if request.param == "sqlite":
        return str(tmp_path_factory.mktemp("reviews") / "labels.db")
    return request.getfixturevalue("postgres_database")("reviews")


# -- reviews are kept apart ---------------------------------------------------------------


def reviews_table(engine: sa.Engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(store.reviews).order_by("id"))]


def test_reviews_survive_rescans_relabels_and_prunes(db_url, tmp_path, toy_onnx):
    folder = tmp_path / "images"
    paths = write_pngs(folder, 5)
    engine = engine_of(db_url)
    first = OnnxModel(toy_onnx)
    scan_archive([folder], first, engine)
    model_a = store.pick_model(engine, first.identity)
    stored = [to_db(str(p)) for p in paths]
    store.record_review(engine, stored[0], "b", reviewer="ann", strategy="manual", note="x")
    store.record_review(engine, stored[1], None, reviewer="ann", strategy="random")
    store.record_review(engine, stored[2], "c", reviewer="bob", strategy="uncertainty")
    before = reviews_table(engine)

    scan_archive([folder], first, engine)  # a rescan: nothing changed
    second = OnnxModel(toy_model(tmp_path / "new.onnx", seed=3))
    scan_archive([folder], second, engine)  # a relabel with a new model
    model_b = store.pick_model(engine, second.identity)
    assert model_b.id != model_a.id
    for model in (model_a, model_b):
        found = {r.path: r.review.label for r in store.reviewed_rows(engine, model.id)}
        assert found == {stored[0]: "b", stored[1]: None, stored[2]: "c"}

    paths[0].unlink()  # gone, then pruned: its rows go, its review stays
    Image.new("RGB", (20, 20), (9, 9, 9)).save(paths[2])  # new content: a new image
    scan_archive([folder], first, engine)
    assert store.prune_missing(engine, model_a.id) == 1
    assert reviews_table(engine) == before  # no scan, relabel or prune wrote a review
    found = {r.path: r.review.label for r in store.reviewed_rows(engine, model_a.id)}
    assert found == {stored[1]: None}  # path 0 pruned, path 2's content is another image
    assert store.current_review(engine, ImageKey(stored[0], before[0][2])).label == "b"
    engine.dispose()


def test_undo_brings_back_the_review_before(module_db):
    engine = engine_of(module_db)
    clear_reviews(engine)
    model_id = hand_model(engine, [row(i, "brain_mri", 0.9) for i in range(2)])
    first = store.record_review(engine, "/archive/000.png", "chest_xray", reviewer="a",
                                strategy="manual")  # fmt: skip
    store.record_review(engine, "/archive/000.png", None, reviewer="b", strategy="manual")
    undone = store.undo_review(engine, "/archive/000.png", reviewer="c")
    assert undone.label is None and undone.undone_by == "c" and undone.undone_at is not None
    assert store.current_review(engine, "/archive/000.png") == first
    store.undo_review(engine, "/archive/000.png", reviewer="c")
    assert store.current_review(engine, "/archive/000.png") is None
    with pytest.raises(ModlabelError, match="no review to undo"):
        store.undo_review(engine, "/archive/000.png", reviewer="c")
    with pytest.raises(UsageError, match="no class of the model"):
        store.record_review(engine, "/archive/001.png", "cat", reviewer="a", strategy="manual")
    history = store.review_history(engine, first.key)
    assert [r.reviewer for r in history] == ["a", "b"] and all(r.undone_at for r in history)
    assert store.count_reviews(engine) == 0 and model_id
    engine.dispose()


def test_an_undo_of_one_review_never_takes_back_a_later_one(module_db):
    """undo_review(review_id=...): the review is taken back only while it is its image's,
    checked in the undo's own transaction (serve's u key: another reviewer's label that
    came in between stays)."""
    engine = engine_of(module_db)
    clear_reviews(engine)
    hand_model(engine, [row(i, "brain_mri", 0.9) for i in range(1)])
    mine = store.record_review(engine, "/archive/000.png", "chest_xray", reviewer="a",
                               strategy="manual")  # fmt: skip
    theirs = store.record_review(engine, "/archive/000.png", None, reviewer="b", strategy="manual")
    with pytest.raises(store.NotTheCurrentReview, match=f"review {mine.id} is not"):
        store.undo_review(engine, "/archive/000.png", reviewer="a", review_id=mine.id)
    assert store.current_review(engine, "/archive/000.png") == theirs
    undone = store.undo_review(engine, "/archive/000.png", reviewer="b", review_id=theirs.id)
    assert undone.id == theirs.id and store.current_review(engine, "/archive/000.png") == mine
    engine.dispose()


def test_a_review_recorded_while_an_undo_runs_waits_for_it(module_db):
    """A review recorded from another connection while an undo is between its look at the
    image's current review and its update waits until the undo has committed (BEGIN
    IMMEDIATE on SQLite, the reviews' advisory lock on PostgreSQL), then is the image's."""
    import threading

    engine = engine_of(module_db)
    other = engine_of(module_db)  # a second engine: another connection, as another process
    clear_reviews(engine)
    hand_model(engine, [row(0, "brain_mri", 0.9)])
    path = "/archive/000.png"
    mine = store.record_review(engine, path, "chest_xray", reviewer="a", strategy="manual")
    recorded: list = []
    waited: list[bool] = []

    def record() -> None:
        recorded.append(store.record_review(other, path, None, reviewer="b", strategy="manual"))

    def before_update(conn, cursor, statement, *args) -> None:
        if statement.lstrip().upper().startswith("UPDATE REVIEWS") and not waited:
            writer = threading.Thread(target=record)
            writer.start()
            # Well within the writer's own wait for a lock (store.SQLITE_BUSY_SECONDS, 1 s):
            # it waits on the undo's transaction, then writes once the undo commits.
            writer.join(0.25)
            waited.append(writer.is_alive())
            threads.append(writer)

    threads: list[threading.Thread] = []
    sa.event.listen(engine, "before_cursor_execute", before_update)
    try:
        undone = store.undo_review(engine, path, reviewer="a", review_id=mine.id)
    finally:
        sa.event.remove(engine, "before_cursor_execute", before_update)
    for writer in threads:
        writer.join(30)
    assert waited == [True] and undone.id == mine.id and undone.undone_by == "a"
    (theirs,) = recorded
    assert store.current_review(engine, path) == theirs
    other.dispose()
    engine.dispose()


def test_migrations_keep_reviews_and_go_down_and_up(db_url):
    from alembic import command

    url = resolve_db_url(db_url)
    engine = sa.create_engine(url)
    cfg = store.schema._alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0010")
        conn.execute(store.reviews.insert().values(
            path="/a.png", sha256="0" * 64, label=None, reviewer="ann", reviewed_at=NOW,
            strategy="random",
        ))  # fmt: skip
        command.upgrade(cfg, "head")
    assert [r[1] for r in reviews_table(engine)] == ["/a.png"]
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0009")
    assert "reviews" not in sa.inspect(engine).get_table_names()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    assert reviews_table(engine) == []
    engine.dispose()


# -- the queues ----------------------------------------------------------------------------


def test_the_queues_orders_on_constructed_rows(module_db):
    engine = engine_of(module_db)
    clear_reviews(engine)
    rng = np.random.default_rng(1)
    centres = np.eye(8)[:3] * 5  # three far apart clusters of embeddings
    embeddings = np.concatenate([c + rng.normal(0, 0.05, (4, 8)) for c in centres])
    rows = []
    for i in range(12):
        label = CLASSES[i % 3]
        rows.append(row(
            i, label, 0.5 + 0.04 * i, runner_up_probability=0.45 - 0.01 * i,
            out_of_set=i in (3, 7), ood_score=float((i * 7) % 12),
            dicom_modality={2: "CT", 5: "mr", 8: "CR", 10: "XA"}.get(i),
            embedding=codec.encode_embeddings(embeddings[i : i + 1])[0],
        ))  # fmt: skip
    rows.append({**row(12, "brain_mri", 0.9), "error": "corrupt", "label": None})
    model_id = hand_model(engine, rows, identity="hand-000000000002")
    path = [r["path"] for r in rows]

    def listed(strategy: str, **kw) -> list[str]:
        return [i.path for i in review_queue(engine, model_id, strategy, **kw)]

    margin = [
        (rows[i]["confidence"] - rows[i]["runner_up_probability"], path[i]) for i in range(12)
    ]
    assert listed("uncertainty", n=4) == [p for _, p in sorted(margin)[:4]]
    assert listed("uncertainty", label="chest_xray") == [path[i] for i in (2, 5, 8, 11)]
    by_score = sorted(range(12), key=lambda i: (rows[i]["out_of_set"] is not True,
                                                -rows[i]["ood_score"], path[i]))  # fmt: skip
    assert listed("out-of-set", n=5) == [path[i] for i in by_score[:5]]
    assert by_score[:2] == [3, 7]  # the flagged ones first
    # 2: CT -> abdominal_ct but chest_xray; 5: MR -> brain_mri but chest_xray; 8: CR agrees;
    # 10: XA is not in the mapping. Least confident first.
    assert listed("disagreement") == [path[2], path[5]]
    places = sorted((_place(7, p), p) for p in path[:12])
    assert listed("random", n=5, seed=7) == [p for _, p in places[:5]]
    assert listed("random", n=5, seed=8) != listed("random", n=5, seed=7)
    spread = listed("diverse", n=3)
    assert sorted(path.index(p) // 4 for p in spread) == [0, 1, 2]  # one per cluster

    reviewed = path[0]
    store.record_review(engine, reviewed, "brain_mri", reviewer="a", strategy="random")
    assert listed("random", n=12, seed=7) == [p for _, p in places if p != reviewed]
    assert len(listed("uncertainty", n=20)) == 11  # reviewed and error rows left out
    cluster = path.index(reviewed) // 4
    first_two = [path.index(p) // 4 for p in listed("diverse", n=2)]
    assert cluster not in first_two  # the reviewed image is a centre already
    with pytest.raises(UsageError, match="unknown queue strategy"):
        review_queue(engine, model_id, "loudest")
    engine.dispose()


def test_k_center_greedy_picks_the_farthest_point_each_time():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(60, 5))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    centers = points[:2]
    picked = k_center_greedy(points[2:], centers, 6)
    chosen = list(centers)
    for index, distance in picked:  # brute force: the farthest from all chosen so far
        nearest = [min(1 - p @ c for c in chosen) for p in points[2:]]
        for j, _ in picked[: len(chosen) - 2]:
            nearest[j] = -np.inf
        assert index == int(np.argmax(nearest)) and math.isclose(distance, max(nearest))
        chosen.append(points[2 + index])


def typical_archive(engine: sa.Engine) -> tuple[int, list[str], list[str], list[str]]:
    """Three tight clusters of 8 embeddings (in each, row 0 at the centre: its densest
    member) and an outlier beside each. Returns the model, the paths of the cluster
    members by cluster (8 each), of the centres and of the outliers."""
    rng = np.random.default_rng(3)
    centres = np.eye(8)[:3]
    members = [np.concatenate([c[None], c + rng.normal(0, 0.05, (7, 8))]) for c in centres]
    outliers = centres + 0.6 * np.eye(8)[5:8]  # far from its cluster, nearer than the others
    embeddings = np.concatenate([*members, outliers])
    rows = [
        row(i, CLASSES[0] if i >= 24 else CLASSES[i % 3], 0.8, path=f"/typical/{i:02d}.png",
            sha256=f"{1000 + i:064x}", embedding=codec.encode_embeddings(embeddings[i : i + 1])[0])
        for i in range(27)
    ]  # fmt: skip
    model_id = hand_model(engine, rows, identity="hand-000000000009")
    path = [r["path"] for r in rows]
    return model_id, path[:24], path[0:24:8], path[24:]


def test_the_typical_queue_picks_each_clusters_densest_image(module_db):
    engine = engine_of(module_db)
    clear_reviews(engine)
    model_id, members, centres, outliers = typical_archive(engine)

    def listed(**kw) -> list[str]:
        return [i.path for i in review_queue(engine, model_id, "typical", **kw)]

    for seed in range(4):  # one image of each cluster, its densest, never an outlier
        assert sorted(listed(n=3, seed=seed)) == centres
    first = review_queue(engine, model_id, "typical", n=3, seed=5)
    assert [i.path for i in first] == listed(n=3, seed=5)  # the same seed, the same queue
    assert all(
        i.why.startswith("the most typical of a cluster of 9 unreviewed images") for i in first
    )
    assert all(i.strategy == "typical" and i.score > 0 for i in first)
    only = review_queue(engine, model_id, "typical", n=3, label=CLASSES[1])
    assert {i.label for i in only} == {CLASSES[1]}
    assert sorted(members.index(i.path) // 8 for i in only) == [0, 1, 2]

    store.record_review(engine, members[3], CLASSES[0], reviewer="a", strategy="typical")
    assert sorted(listed(n=2)) == centres[1:]  # the reviewed image's cluster is skipped
    everything = listed(n=100)  # fewer free clusters than asked: the clusters in turn
    assert sorted(everything) == sorted(p for p in members + outliers if p != members[3])
    assert set(listed(n=3)) & set(outliers) == set()
    engine.dispose()


def test_review_cli_lists_the_typical_queue(module_db):
    engine = engine_of(module_db)
    clear_reviews(engine)
    model_id, _, centres, _ = typical_archive(engine)
    base = ["review", "--db", module_db, "--model", "hand-000000000009", "--strategy", "typical"]
    listed = CliRunner().invoke(app, [*base, "-n", "3", "--seed", "2", "--format", "json"])
    assert listed.exit_code == 0, listed.output
    got = json.loads(listed.stdout)
    queue = review_queue(engine, model_id, "typical", n=3, seed=2)
    assert [r["path"] for r in got] == [i.path for i in queue]
    assert sorted(r["path"] for r in got) == centres
    assert all(r["why"].startswith("the most typical of a cluster") for r in got)
    engine.dispose()


def test_typicality_is_the_inverse_mean_distance_to_the_nearest_neighbours():
    rng = np.random.default_rng(2)
    for size in (1, 2, 7, 30):
        points = rng.normal(size=(size, 4)).astype(np.float32)
        distances = np.linalg.norm(points[:, None] - points[None], axis=2)
        np.fill_diagonal(distances, np.inf)
        k = min(20, size - 1)
        expected = (
            1 / (np.sort(distances, axis=1)[:, :k].mean(axis=1) + 1e-5) if k else np.zeros(size)
        )
        np.testing.assert_allclose(typicality(points), expected, rtol=1e-4)


# -- the archive's accuracy ----------------------------------------------------------------


def reviewed_archive(engine: sa.Engine) -> tuple[int, list[dict]]:
    """30 rows with random labels, probabilities and reviews; a fifth chosen by random."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(30):
        p = rng.dirichlet(np.ones(3) * 0.7)
        label = CLASSES[int(p.argmax())]
        probs = dict(zip(CLASSES, p.tolist(), strict=True))
        rows.append({**row(i, label, float(p.max())), "probabilities": probs,
                     "out_of_set": i % 10 == 9})  # fmt: skip
    model_id = hand_model(engine, rows, identity="hand-000000000003")
    for i, r in enumerate(rows):
        truth = None if i % 10 == 9 else (r["label"] if i % 3 else CLASSES[(i // 3) % 3])
        strategy = "random" if i % 5 == 0 else "uncertainty"
        store.record_review(engine, r["path"], truth, reviewer="r", strategy=strategy)
    return model_id, rows


def test_evaluate_against_a_direct_computation(tmp_path):
    from sklearn.metrics import (  # the independent reference of Table 2's figures
        accuracy_score,
        confusion_matrix,
        matthews_corrcoef,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    engine = engine_of(str(tmp_path / "labels.db"))  # reading both dialects: the test below
    reviewed_archive(engine)
    model_row = store.pick_model(engine, "hand-000000000003")
    sample = reviewed_sample(engine, model_row)
    figures = sample_figures(sample, resamples=200, seed=3)
    keep = sample.true >= 0
    true, pred, probs = sample.true[keep], sample.predicted[keep], sample.probabilities[keep]
    supported = sorted(set(true.tolist()))
    assert len(supported) == 3  # every class reviewed: macro means over the same classes
    per = precision_recall_fscore_support(true, pred, labels=supported, zero_division=0)
    sk = {
        "accuracy": accuracy_score(true, pred),
        "precision": per[0].mean(),
        "recall": per[1].mean(),
        "f1": per[2].mean(),
        "mcc": matthews_corrcoef(true, pred),
        "auc": np.mean([roc_auc_score(true == k, probs[:, k]) for k in supported]),
    }
    for key in ("accuracy", "precision", "recall", "f1", "mcc", "auc"):
        assert math.isclose(figures.summary[key].estimate, sk[key], abs_tol=1e-12), key
    for k in supported:
        assert math.isclose(figures.per_class[CLASSES[k]]["f1"].estimate, per[2][k], abs_tol=1e-12)
    assert figures.confusion_matrix == confusion_matrix(true, pred, labels=[0, 1, 2]).tolist()
    correct = int((true == pred).sum())
    assert figures.summary["accuracy"].interval == stats.wilson_interval(correct, true.size)
    for k, name in enumerate(CLASSES):
        tp = int(((true == k) & (pred == k)).sum())
        assert figures.per_class[name]["recall"].interval == stats.wilson_interval(
            tp, int((true == k).sum())
        )
        assert figures.per_class[name]["precision"].interval == stats.wilson_interval(
            tp, int((pred == k).sum())
        )
    values = np.column_stack([true, pred, probs])

    def direct(fn):
        def statistic(v, axis):
            if axis == 0:
                return fn(v)
            return np.array([fn(s) for s in v])

        return statistic

    def f1(v):  # 2 TP / (support + predicted), 0 where nothing; macro over the classes
        y, p = v[:, 0], v[:, 1]
        scores = []
        for k in supported:
            both = (y == k).sum() + (p == k).sum()
            scores.append(2 * ((y == k) & (p == k)).sum() / both if both else 0.0)
        return np.mean(scores)

    def auc(v):  # the share of (positive, negative) pairs ordered right, ties half
        y, p = v[:, 0].astype(int), v[:, 2:]
        defined = []
        for c in supported:
            pos, neg = p[y == c, c], p[y != c, c]
            if len(pos) and len(neg):
                pairs = pos[:, None] - neg[None, :]
                defined.append(((pairs > 0) + 0.5 * (pairs == 0)).mean())
        return np.mean(defined)

    def ece(v):
        return expected_calibration_error(v[:, 2:], v[:, 0].astype(int))

    for key, fn in (("f1", f1), ("auc", auc), ("ece", ece)):
        expected = stats.bootstrap_interval(values, direct(fn), resamples=200, seed=3)
        got = figures.summary[key].interval
        expected_bounds = [expected.estimate, expected.low, expected.high]
        assert np.allclose([got.estimate, got.low, got.high], expected_bounds, atol=1e-12), key
    o = figures.out_of_set
    assert (o["reviewed_none"], o["reviewed_none_flagged"]) == (3, 3)
    engine.dispose()


def test_weighted_auc_and_ece_are_the_plain_ones_of_each_resample():
    rng = np.random.default_rng(2)
    score = np.round(rng.random(40), 1)  # ties
    is_class = rng.random(40) < 0.4
    idx = rng.integers(0, 40, size=(5, 40))
    weights = np.stack([np.bincount(i, minlength=40) for i in idx]).astype(float)
    for b in range(5):
        assert math.isclose(
            weighted_auc(is_class, score, weights)[b],
            one_vs_rest_auc(is_class[idx[b]], score[idx[b]]),
        )
    probs = rng.dirichlet(np.ones(3), size=40)
    labels = rng.integers(0, 3, 40)
    for b in range(5):
        assert math.isclose(
            weighted_ece(probs, labels, weights)[b],
            expected_calibration_error(probs[idx[b]], labels[idx[b]]),
        )


def test_evaluate_says_which_strategies_chose_and_reports_random_apart(module_db):
    engine = engine_of(module_db)
    clear_reviews(engine)
    reviewed_archive(engine)
    result = archive_accuracy(engine, store.pick_model(engine, "hand-000000000003"), resamples=100)
    assert result.reviewed.strategies == {"random": 6, "uncertainty": 24}
    assert result.biased and "uncertainty 24" in result.warnings[0]
    assert result.random.images == 6 and result.random.strategies == {"random": 6}
    runner = CliRunner()
    out = runner.invoke(app, ["evaluate", "--db", module_db, "--model", "hand-000000000003",
                              "--json", "--resamples", "100"])  # fmt: skip
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["command"] == "evaluate" and doc["biased"] is True
    assert doc["reviewed"]["summary"]["accuracy"]["method"] == "wilson"
    assert doc["random"]["images"] == 6
    text = runner.invoke(app, ["evaluate", "--db", module_db, "--model", "hand-000000000003",
                               "--resamples", "100"])  # fmt: skip
    assert "random sample (unbiased)" in text.stdout and "warning:" in text.stderr
    engine.dispose()


# -- reads show the reviewed label -----------------------------------------------------------


def test_images_csv_and_the_queries_show_the_reviewed_label(module_db, tmp_path):
    import csv

    engine = engine_of(module_db)
    clear_reviews(engine)
    rows = [row(i, "brain_mri", 0.95) for i in range(3)]
    hand_model(engine, rows, identity="hand-000000000004")
    model_row = store.pick_model(engine, "hand-000000000004")
    store.record_review(engine, rows[0]["path"], "chest_xray", reviewer="=ann", strategy="manual")
    store.record_review(engine, rows[1]["path"], None, reviewer="bob", strategy="csv")
    out = tmp_path / "images.csv"
    write_images_csv(engine, model_row, out, chunk=2)
    with out.open(newline="") as f:
        lines = list(csv.DictReader(f))
    assert tuple(lines[0]) == IMAGE_CSV_COLUMNS and list(lines[0])[-4:] == [
        "label_reviewed", "label_final", "reviewed_by", "reviewed_at"
    ]  # fmt: skip
    shown = [(r["label"], r["label_reviewed"], r["label_final"], r["reviewed_by"]) for r in lines]
    assert shown == [
        ("brain_mri", "chest_xray", "chest_xray", "'=ann"),  # defused: a formula start
        ("brain_mri", "", "", "bob"),
        ("brain_mri", "", "brain_mri", ""),
    ]  # fmt: skip
    assert lines[0]["reviewed_at"].endswith("Z")  # as every output writes a time (iso_utc)
    params = {"label": "brain_mri", "model": "hand-000000000004"}
    columns, found = run_query(engine, load_query("by-label"), params)
    final = {r[0]: r[columns.index("label_final")] for r in found}
    assert final == {rows[0]["path"]: "chest_xray", rows[1]["path"]: None,
                     rows[2]["path"]: "brain_mri"}  # fmt: skip
    columns, found = run_query(engine, load_query("reviewed"), {"model": "hand-000000000004"})
    assert [(r[0], r[columns.index("reviewed_by")]) for r in found] == [
        (rows[1]["path"], "bob"), (rows[0]["path"], "=ann")
    ]  # fmt: skip
    report = build_report(engine, tmp_path / "report", model_identity="hand-000000000004",
                          examples_per_class=0, formats="html")  # fmt: skip
    page = report.path.read_text()
    assert "Accuracy on the reviewed images" in page and "Biased sample" in page
    hand_model(engine, [row(9, "brain_mri", 0.9, sha256="f" * 64)], identity="hand-000000000008")
    report = build_report(engine, tmp_path / "other", model_identity="hand-000000000008",
                          examples_per_class=0, formats="html")  # fmt: skip
    assert 'id="reviews"' not in report.path.read_text()  # no review of its images
    engine.dispose()


# -- the training set ------------------------------------------------------------------------


def test_dataset_is_the_tree_trains_loader_reads_safely_named(tmp_path):
    from modlabel.train.data import discover_split

    archive = tmp_path / "archive"
    hostile = ["-up.png", ".hidden.png", "new\nline.png", "a b;rm -rf.PNG", "é" * 120 + ".png",
               "'=cmd'.png", "x.jpeg", "UPPER.JPG"]  # fmt: skip
    engine = store.open_db(resolve_db_url(str(tmp_path / "labels.db")))
    rows, files = [], []
    for i in range(12):
        folder = archive / f"d{i:02d}"
        folder.mkdir(parents=True)
        path = folder / hostile[i % len(hostile)]
        Image.fromarray(np.full((6, 6, 3), i * 20, np.uint8)).save(path, format="PNG")
        files.append(path)
        st = path.stat()
        rows.append({**row(i, CLASSES[i % 3], 0.99), "path": to_db(str(path)),
                     "size_bytes": st.st_size, "mtime": st.st_mtime})  # fmt: skip
    rows[11]["confidence"] = 0.2  # not confident, not reviewed: left out
    model_id = hand_model(engine, rows, identity="hand-000000000005")
    model_row = store.pick_model(engine)
    store.record_review(engine, rows[0]["path"], None, reviewer="a", strategy="manual")
    store.record_review(engine, rows[1]["path"], "abdominal_ct", reviewer="a", strategy="manual")

    def outside() -> list[Path]:
        return sorted(p for p in tmp_path.rglob("*") if not p.name.startswith("labels.db")
                      and p != out and out not in p.parents)  # fmt: skip

    out = tmp_path / "out"
    before = outside()
    result = write_dataset(engine, model_row, out)
    assert outside() == before  # nothing written outside --out
    split = discover_split(out, seed=0)
    assert split.class_names == sorted(CLASSES)
    found = {rel for s in ("train", "val", "test") for rel, _ in split.files[s]}
    assert len(found) == result.files == 10  # 0: none of the classes; 11: not confident
    # Rows 1 and 9, both .hidden.png (and here the same 12 hex digits), in one folder:
    assert {
        "abdominal_ct/hidden-000000000000.png",
        "abdominal_ct/hidden-000000000000-2.png",
    } <= found
    assert result.left_out == {"reviewed as none of the classes": 1}
    assert result.written["abdominal_ct"] == 4  # 3, 6, 9 by the model and 1 by its review
    for entry in out.rglob("*"):
        assert not entry.name.startswith((".", "-", "'")) and "\n" not in entry.name, entry
        if entry.is_symlink():
            assert entry.resolve().parent.parent == archive.resolve()
    assert (out / MANIFEST).is_file()
    assert data_file_name(to_db("/x/../.evil.tar.gz"), "ab" * 32) == "evil_tar-abababababab.gz"
    with pytest.raises(UsageError, match="not empty"):
        write_dataset(engine, model_row, out)

    copied = write_dataset(engine, model_row, tmp_path / "copies", reviewed_only=True, copy=True)
    assert copied.files == 1 and copied.written["abdominal_ct"] == 1
    (only,) = (tmp_path / "copies" / "abdominal_ct").iterdir()
    assert not only.is_symlink() and only.read_bytes() == files[1].read_bytes()
    assert model_id
    engine.dispose()


# -- reviews from a CSV file -----------------------------------------------------------------


def test_csv_import_keeps_good_lines_and_names_each_bad_one(module_db, tmp_path):
    engine = engine_of(module_db)
    clear_reviews(engine)
    rows = [row(i, "brain_mri", 0.9) for i in range(3)]
    hand_model(engine, rows, identity="hand-000000000006")
    model_row = store.pick_model(engine, "hand-000000000006")
    sheet = tmp_path / "reviews.csv"
    sheet.write_text(  # no header: the columns by position, path,label[,note,reviewer]
        f"{rows[0]['path']},chest_xray,looks like a chest,ann\n"
        "/archive/nope.png,brain_mri\n"
        f"{rows[1]['path']},cat\n"
        f"{rows[1]['path']}\n"
        f"{rows[2]['path']},NONE,,\n"
        f"{rows[1]['path']},brain_mri,a,b,c\n"
        f"#{10**9},brain_mri\n",
        encoding="utf-8",
    )
    result = import_reviews_csv(engine, sheet, model_id=model_row.id, reviewer="default")
    assert result.recorded == 2
    assert [(e.line, e.reason.split(";")[0]) for e in result.errors] == [
        (2, "/archive/nope.png: no such image of the model"),
        (3, "'cat' is no class of the model"),
        (4, "1 columns"),
        (6, "5 columns"),
        (7, f"#{10**9}: no such image in the database"),
    ]
    got = {r.path: (r.label, r.reviewer, r.note, r.strategy) for r in store.latest_reviews(engine)}
    assert got == {rows[0]["path"]: ("chest_xray", "ann", "looks like a chest", "csv"),
                   rows[2]["path"]: (None, "default", None, "csv")}  # fmt: skip
    out = CliRunner().invoke(app, ["review", "--db", module_db, "--model", "hand-000000000006",
                                   "--from-csv", str(sheet)])  # fmt: skip
    assert out.exit_code == 1 and "line 2: /archive/nope.png" in out.stderr
    assert "recorded 2 reviews" in out.stdout

    clear_reviews(engine)  # the queue as a sheet to fill in, read back by its header
    base = ["review", "--db", module_db, "--model", "hand-000000000006"]
    listed = CliRunner().invoke(app, [*base, "--strategy", "random", "--format", "csv"])
    lines = listed.stdout.splitlines()
    assert lines[0].startswith("path,label,note,reviewer,model_label,confidence")
    first = lines[1].split(",")
    first[1], first[3] = "chest_xray", "cy"
    sheet.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    out = CliRunner().invoke(app, [*base, "--from-csv", str(sheet), "--strategy", "random"])
    assert out.exit_code == 0, out.output
    assert "recorded 1 reviews" in out.stdout and "2 lines without a label" in out.stdout
    (done,) = store.latest_reviews(engine)
    assert (done.path, done.label, done.reviewer, done.strategy) == (
        first[0], "chest_xray", "cy", "random"
    )  # fmt: skip
    engine.dispose()


def test_a_review_sheet_of_a_path_with_a_newline_reads_back(module_db, tmp_path):
    """The review sheet shows a stored path with a control character escaped (a newline as
    \\n, paths.display_path); --from-csv and --set take the path as shown, as stored."""
    import csv

    engine = engine_of(module_db)
    clear_reviews(engine)
    hostile = "/archive/new\nline_%_x/a.png"  # a newline, and LIKE's wildcards
    hand_model(engine, [row(0, "brain_mri", 0.6, path=hostile), row(1, "brain_mri", 0.7,
               path="/archive/new_line/a.png")], identity="hand-000000000008")  # fmt: skip
    runner = CliRunner()
    base = ["review", "--db", module_db, "--model", "hand-000000000008"]
    sheet = runner.invoke(app, [*base, "--format", "csv", "-n", "5"])
    assert sheet.exit_code == 0, sheet.output
    rows = list(csv.DictReader(sheet.stdout.splitlines()))
    shown = [r["path"] for r in rows]
    assert "/archive/new\\nline_%_x/a.png" in shown and hostile not in shown
    for r in rows:
        r["label"] = "chest_xray" if r["path"].startswith("/archive/new\\n") else "none"
    filled = tmp_path / "sheet.csv"
    with filled.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    read = runner.invoke(app, [*base, "--from-csv", str(filled), "--reviewer", "ann"])
    assert read.exit_code == 0, read.output
    assert store.current_review(engine, hostile).label == "chest_xray"
    assert store.current_review(engine, "/archive/new_line/a.png").label is None
    again = runner.invoke(app, [*base, "--set", "/archive/new\\nline_%_x/a.png", "brain_mri"])
    assert again.exit_code == 0, again.output
    assert store.current_review(engine, hostile).label == "brain_mri"
    engine.dispose()


def test_review_cli_lists_sets_and_undoes(module_db):
    engine = engine_of(module_db)
    clear_reviews(engine)
    rows = [row(i, "brain_mri", 0.5 + 0.1 * i) for i in range(3)]
    hand_model(engine, rows, identity="hand-000000000007")
    runner = CliRunner()
    base = ["review", "--db", module_db, "--model", "hand-000000000007"]
    listed = runner.invoke(app, [*base, "--format", "json", "-n", "2"])
    assert listed.exit_code == 0, listed.output
    assert [r["path"] for r in json.loads(listed.stdout)] == [rows[0]["path"], rows[1]["path"]]
    done = runner.invoke(app, [*base, "--set", rows[0]["path"], "none", "--reviewer", "ann"])
    assert done.exit_code == 0 and "is none of the classes (by ann)" in done.stdout
    listed = runner.invoke(app, [*base, "--format", "json", "-n", "1"])
    assert [r["path"] for r in json.loads(listed.stdout)] == [rows[1]["path"]]
    bad = runner.invoke(app, [*base, "--set", rows[1]["path"], "cat"])
    assert bad.exit_code == 2 and "no class of the model" in bad.stderr
    undone = runner.invoke(app, [*base, "--undo", rows[0]["path"], "--format", "json"])
    assert undone.exit_code == 0 and json.loads(undone.stdout)["current"] is None
    again = runner.invoke(app, [*base, "--undo", rows[0]["path"]])
    assert again.exit_code == 1 and "no review to undo" in again.stderr
    engine.dispose()


def test_review_evaluate_and_dataset_import_no_tensorflow(tmp_path):
    db = str(tmp_path / "labels.db")
    engine = engine_of(db)
    hand_model(engine, [row(i, CLASSES[i % 3], 0.95) for i in range(4)])
    engine.dispose()
    script = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from modlabel.cli import app

        runner = CliRunner()
        for args in (["review", "--db", {db!r}, "--strategy", "random"],
                     ["review", "--db", {db!r}, "--set", "#1", "brain_mri", "--strategy", "random"],
                     ["evaluate", "--db", {db!r}, "--resamples", "100"],
                     ["dataset", "--db", {db!r}, "--out", {str(tmp_path / "set")!r}]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, (args, result.output)
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "sklearn"))
        print("HEAVY", heavy)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "HEAVY []" in done.stdout
    assert any((tmp_path / "set").iterdir())
    shutil.rmtree(tmp_path / "set")
