"""Similar-image search: how good its neighbours are, and how fast it answers at scale.

Two parts, each printing figures (it asserts nothing):

* ``quality``: a labeled archive (``modlabel synth``: ``<root>/<class>/<file>``) is
  scanned with a model into a fresh SQLite database; then, for every image, its 10
  nearest stored neighbours (``modlabel.store.nearest``, the image itself left out),
  and the share of them with the image's own class (its folder), per class and overall.
* ``scale``: N synthetic embeddings (K values, clustered like a model's classes) are
  written as a scan writes them, then Q queries are timed in a child process of their
  own per method, with its peak RSS (``ru_maxrss``): the exact streamed search on SQLite
  and on PostgreSQL, and pgvector's ordering where the server has the extension
  (``--pgvector URL``). With ``--hnsw`` the model's HNSW index is built first
  (``modlabel db index-embeddings``), and its recall@10 against the exact search printed.

Usage:
  python benchmarks/bench_similar.py quality --model demo/model.onnx --archive ARCHIVE
  python benchmarks/bench_similar.py scale --rows 1000000 --dims 512 [--postgres URL]
      [--pgvector URL [--hnsw]] [--sqlite-only]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from modlabel import codec, store
from modlabel.store.similar import EXACT, PGVECTOR, create_search_index, nearest, search_method

CHUNK = 20_000
CLASSES = 7


def quality(model: Path, archive: Path, k: int = 10) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/labels.db"
        started = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "modlabel",
                "scan",
                str(archive),
                "--model",
                str(model),
                "--db",
                db,
                "--quiet",
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            sys.exit(f"scan failed: {done.stderr.strip()}")
        print(f"scanned {archive} in {time.perf_counter() - started:.1f} s")
        engine = store.open_db(db, create=False, migrate=False)
        model_row = store.pick_model(engine)
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(store.images.c.id, store.images.c.path, store.images.c.embedding)
                .where(store.images.c.embedding.is_not(None))
                .order_by(store.images.c.id)
            ).all()
        truth = {int(r.id): Path(r.path).parent.name for r in rows}
        vectors = codec.decode_embeddings([r.embedding for r in rows])
        shares: dict[str, list[float]] = {}
        started = time.perf_counter()
        for row, vector in zip(rows, vectors, strict=True):
            found = nearest(
                engine, model_row.id, vector, k, exclude_id=int(row.id), include_out_of_set=True
            )
            same = sum(1 for n in found if truth[n.id] == truth[int(row.id)])
            shares.setdefault(truth[int(row.id)], []).append(same / max(1, len(found)))
        seconds = time.perf_counter() - started
        print(
            f"{len(rows)} queries of k={k} in {seconds:.1f} s "
            f"({1000 * seconds / len(rows):.1f} ms each, exact, SQLite)"
        )
        print(f"share of the {k} nearest neighbours with the image's own class:")
        for name in sorted(shares):
            print(f"  {name:<26} {np.mean(shares[name]):.3f}  ({len(shares[name])} images)")
        every = [s for values in shares.values() for s in values]
        print(f"  {'all':<26} {np.mean(every):.3f}  ({len(every)} images)")
        engine.dispose()


def synthetic(rows: int, dims: int, seed: int = 0):
    """Chunks of (N, K) non-negative embeddings around CLASSES centres, like GAP vectors."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(CLASSES, dims))) * 2
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        cls = rng.integers(0, CLASSES, n)
        yield start, cls, np.abs(centres[cls] + rng.normal(size=(n, dims)))


def fill(url: str, rows: int, dims: int) -> int:
    engine = store.open_db(url)
    model_id = store.ensure_model(
        engine,
        identity=f"bench-{dims}",
        sha256="0" * 64,
        backbone="bench",
        class_names=[f"c{i}" for i in range(CLASSES)],
        input_size=[300, 300],
        activation_shape=[18, 18, dims],
        path="/nonexistent/bench.onnx",
    )
    now = datetime.now(timezone.utc)
    started = time.perf_counter()
    for start, cls, vectors in synthetic(rows, dims):
        blobs = codec.encode_embeddings(vectors)
        batch = [
            {
                "model_id": model_id,
                "path": f"/archive/{(start + i) // 1000:05d}/{start + i:08d}.jpg",
                "size_bytes": 1000,
                "mtime": 0.0,
                "label": f"c{c}",
                "confidence": 0.9,
                "labeled_at": now,
                "embedding": blob,
            }
            for i, (c, blob) in enumerate(zip(cls.tolist(), blobs, strict=True))
        ]
        with engine.begin() as conn:
            conn.execute(store.images.insert(), batch)
    print(
        f"  wrote {rows:,} rows of {dims} values in {time.perf_counter() - started:.0f} s "
        f"({search_method(engine)})"
    )
    engine.dispose()
    return model_id


def child(url: str, model_id: int, dims: int, method: str, queries: int, k: int) -> None:
    """One method's timings, in a process of its own: p50 and max latency, peak RSS."""
    engine = store.open_db(url, create=False, migrate=False)
    rng = np.random.default_rng(99)
    _, _, qs = next(synthetic(queries, dims, seed=7))
    latencies, results = [], []
    for q in qs:
        started = time.perf_counter()
        found = nearest(engine, model_id, q, k, method=method, include_out_of_set=True)
        latencies.append(time.perf_counter() - started)
        results.append([n.id for n in found])
    del rng
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"latencies": latencies, "results": results, "peak_mb": peak}))


def in_child(url: str, model_id: int, dims: int, method: str, queries: int, k: int) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "child",
            url,
            str(model_id),
            str(dims),
            method,
            str(queries),
            str(k),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(name: str, figures: dict, exact: dict | None = None) -> None:
    if "error" in figures:
        print(f"  {name:<28} failed: {figures['error']}")
        return
    lat = sorted(figures["latencies"])
    line = (
        f"  {name:<28} p50 {1000 * statistics.median(lat):8.1f} ms   max "
        f"{1000 * lat[-1]:8.1f} ms   peak RSS {figures['peak_mb']:6.0f} MB"
    )
    if exact is not None and "results" in exact:
        recall = np.mean(
            [
                len(set(a) & set(b)) / max(1, len(b))
                for a, b in zip(figures["results"], exact["results"], strict=True)
            ]
        )
        line += f"   recall@k {recall:.3f}"
    print(line)


def postgres_database(admin_url: str) -> tuple[str, callable]:
    name = f"bench_similar_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


def scale(args: argparse.Namespace) -> None:
    targets: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        targets.append(("SQLite", f"sqlite:///{tmp}/vectors.db"))
        drops = []
        if not args.sqlite_only:
            url, drop = postgres_database(args.postgres)
            targets.append(("PostgreSQL", url))
            drops.append(drop)
        if args.pgvector:
            url, drop = postgres_database(args.pgvector)
            targets.append(("PostgreSQL + pgvector", url))
            drops.append(drop)
        try:
            for name, url in targets:
                print(
                    f"{name}: {args.rows:,} embeddings of {args.dims} values, "
                    f"{args.queries} queries of k={args.k}"
                )
                model_id = fill(url, args.rows, args.dims)
                exact = in_child(url, model_id, args.dims, EXACT, args.queries, args.k)
                report("exact, streamed", exact)
                engine = store.open_db(url, create=False, migrate=False)
                if search_method(engine) == PGVECTOR:
                    report(
                        "pgvector, no index",
                        in_child(url, model_id, args.dims, PGVECTOR, args.queries, args.k),
                        exact,
                    )
                    if args.hnsw:
                        started = time.perf_counter()
                        create_search_index(engine, model_id)
                        print(f"  built the HNSW index in {time.perf_counter() - started:.0f} s")
                        report(
                            "pgvector, HNSW",
                            in_child(url, model_id, args.dims, PGVECTOR, args.queries, args.k),
                            exact,
                        )
                engine.dispose()
        finally:
            for drop in drops:
                drop()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        url, model_id, dims, method, queries, k = sys.argv[2:8]
        child(url, int(model_id), int(dims), method, int(queries), int(k))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = parser.add_subparsers(dest="part", required=True)
    q = parts.add_parser("quality")
    q.add_argument("--model", type=Path, required=True)
    q.add_argument("--archive", type=Path, required=True)
    q.add_argument("-k", type=int, default=10)
    s = parts.add_parser("scale")
    s.add_argument("--rows", type=int, default=1_000_000)
    s.add_argument("--dims", type=int, default=512)
    s.add_argument("--queries", type=int, default=20)
    s.add_argument("-k", type=int, default=10)
    s.add_argument(
        "--postgres",
        default=os.environ.get(
            "MODLABEL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    s.add_argument("--pgvector", help="a PostgreSQL server with the vector extension")
    s.add_argument("--hnsw", action="store_true", help="build and measure the HNSW index")
    s.add_argument("--sqlite-only", action="store_true")
    args = parser.parse_args()
    if args.part == "quality":
        quality(args.model, args.archive, args.k)
    else:
        scale(args)


if __name__ == "__main__":
    main()
