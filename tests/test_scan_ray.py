"""scan --engine ray: the same rows as the local scan, on a local Ray cluster of 2 CPUs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from modlabel import codec, store
from modlabel.cli import app
from modlabel.model import OnnxModel
from modlabel.scan import scan_archive

ray = pytest.importorskip("ray")  # in the dev extra; `make test` always has it

from modlabel.scan.ray import ray_pipeline  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> str:
    """The SQLAlchemy URL of a new, empty database of either kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'labels.db'}"
    return request.getfixturevalue("postgres_database")("ray")


def _rows(url: str) -> dict[str, dict]:
    engine = store.open_db(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(store.images)).mappings().all()
    engine.dispose()
    return {r["path"]: dict(r) for r in rows}


def _class_counts(url: str) -> dict[str, int]:
    engine = store.open_db(url)
    with engine.connect() as conn:
        maps = store.class_maps.c
        rows = conn.execute(sa.select(maps.class_name, maps.image_count))
        counts = {label: count for label, count in rows}
    engine.dispose()
    return counts


def _assert_same_rows(local: dict[str, dict], remote: dict[str, dict]) -> None:
    assert sorted(local) == sorted(remote)
    for path, row in local.items():
        other = remote[path]
        assert other["label"] == row["label"], path
        assert other["error"] == row["error"], path
        if row["error"] is not None:
            continue
        assert other["confidence"] == pytest.approx(row["confidence"], abs=1e-5)
        a, b = codec.decode_map(row["crm"]), codec.decode_map(other["crm"])
        span = max(float(a.max() - a.min()), 1e-12)
        assert np.max(np.abs(a - b)) <= 2 * codec.MAX_RELATIVE_ERROR * span + 1e-6, path


def _archive(tiny_archive: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "archive"
    shutil.copytree(tiny_archive, dst, ignore=shutil.ignore_patterns("*.jsonl"))
    (dst / "broken.jpg").write_bytes(b"not a jpeg")  # an error row, as locally
    return dst


def test_ray_scan_writes_the_rows_of_the_local_scan(tiny_archive, tiny_onnx, tmp_path, db):
    archive = _archive(tiny_archive, tmp_path)
    local_url = f"sqlite:///{tmp_path / 'local.db'}"
    model = OnnxModel(tiny_onnx)
    local = scan_archive([archive], model, store.open_db(local_url))
    engine = store.open_db(db)
    remote = scan_archive(
        [archive], model, engine, batch_size=4, run_pipeline=ray_pipeline(actors=2)
    )
    assert (remote.seen, remote.labeled, remote.errors) == (
        local.seen,
        local.labeled,
        local.errors,
    )
    assert remote.error_paths == local.error_paths
    _assert_same_rows(_rows(local_url), _rows(db))
    assert _class_counts(db) == _class_counts(local_url)
    # A rescan on Ray, too, costs a stat per file and no inference.
    again = scan_archive([archive], model, engine, run_pipeline=ray_pipeline(actors=1))
    assert (again.labeled, again.unchanged) == (0, again.seen)
    with engine.connect() as conn:
        runs = conn.execute(
            sa.select(store.scans.c.status, store.scans.c.labeled, store.scans.c.errors).order_by(
                store.scans.c.id
            )
        ).all()
    assert [tuple(r) for r in runs] == [
        (store.FINISHED, local.labeled, local.errors),
        (store.FINISHED, 0, 0),
    ]
    engine.dispose()


def _actor_pids() -> list[int]:
    """The pids of this test's Ray Data actors: descendants of this process only."""
    import psutil

    pids = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "MapWorker" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            continue
    return pids


def test_an_actor_killed_mid_run_loses_no_row_and_writes_none_twice(
    tiny_archive, tiny_onnx, tmp_path, sqlite_url, monkeypatch
):
    import modlabel.scan.ray

    # One batch of 2 a block: many small tasks, so the killed actor has some in flight.
    monkeypatch.setattr(modlabel.scan.ray, "BATCHES_PER_BLOCK", 1)
    archive = _archive(tiny_archive, tmp_path)
    files = sum(1 for p in archive.rglob("*") if p.is_file())
    killed: list[int] = []
    done = [0]

    def kill_one_actor(n: int) -> None:
        done[0] += n
        if not killed and (pids := _actor_pids()):
            os.kill(pids[0], signal.SIGKILL)
            killed.append(done[0])  # rows the driver had when the actor died

    model = OnnxModel(tiny_onnx)
    engine = store.open_db(sqlite_url)
    stats = scan_archive(
        [archive],
        model,
        engine,
        batch_size=2,
        on_progress=kill_one_actor,
        run_pipeline=ray_pipeline(actors=2),
    )
    assert killed and killed[0] < files, killed  # it died with work left
    assert (stats.labeled + stats.errors, stats.errors) == (files, 1)
    rows = _rows(sqlite_url)
    assert len(rows) == files
    assert sum(_class_counts(sqlite_url).values()) == sum(
        1 for r in rows.values() if r["error"] is None and r["confidence"] >= 0.9
    )
    engine.dispose()


def test_cli_ray_scan(tiny_archive, tiny_onnx, tmp_path):
    archive = _archive(tiny_archive, tmp_path)
    db = tmp_path / "cli.db"
    args = ["scan", archive, "--model", tiny_onnx, "--db", db, "--engine", "ray", "--actors", "1"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output  # per-file errors are reported as locally
    assert len(_rows(f"sqlite:///{db}")) == sum(1 for p in archive.rglob("*") if p.is_file())


def test_an_unreachable_cluster_is_one_line_and_exit_code_1(tiny_onnx, tmp_path):
    # In a process of its own: this module's fixture has Ray connected already.
    script = f"""
import sys
from typer.testing import CliRunner
from modlabel.cli import app
r = CliRunner().invoke(app, ["scan", {str(tmp_path)!r}, "--model", {str(tiny_onnx)!r},
    "--db", {str(tmp_path / "x.db")!r}, "--engine", "ray", "--address", "127.0.0.1:1"])
print("CODE", r.exit_code)
print(r.output)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "CODE 1" in done.stdout, done.stdout + done.stderr
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in done.stdout
    assert "Traceback" not in done.stdout
    assert not (tmp_path / "x.db").exists()  # nothing was written


def test_without_ray_installed_the_scan_says_how_to_install_it(tiny_onnx, tmp_path):
    script = f"""
import sys
sys.modules["ray"] = None  # as if Ray were not installed
from typer.testing import CliRunner
from modlabel.cli import app
r = CliRunner().invoke(app, ["scan", {str(tmp_path)!r}, "--model", {str(tiny_onnx)!r},
    "--db", {str(tmp_path / "x.db")!r}, "--engine", "ray"])
print("CODE", r.exit_code)
print(r.output)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "CODE 1" in done.stdout, done.stdout + done.stderr
    assert "pip install 'modlabel[ray]'" in done.stdout
