"""A scan from start to end: the lock, the run record, the heartbeat, and how it ended.

``scan_archive`` takes the lock of its (database, model) (``scan.lock``), marks
runs that died without a word as interrupted, records itself in ``scans`` with a
heartbeat, finds the files that need work (``scan.changes``) and hands them to
a pipeline (``scan.pipeline``). Every database call is retried through a
restart of the server (``store.DbRetry``); since each batch is one transaction
of upserts, a retried batch is written exactly once. However it ends, its
``scans`` row says how, where the database can still be reached.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from sqlalchemy.engine import Engine

from .. import config, decode_pool, store
from ..errors import Interrupted, ModlabelError, StopRequested, VanishedError, one_line
from ..model import OnnxModel
from ..paths import absolute, to_db
from ..source import (
    DEFAULT_MAX_FILE_BYTES,
    FileEntry,
    ImageFilter,
    Unreadable,
    WalkCounts,
    check_roots,
    distinct_roots,
    walk_root,
)
from .changes import ChangeLookup, MissingGuard, ScanStats
from .lock import acquire_scan_lock
from .pipeline import DecodeOptions, Pipeline, ScanContext, local

log = logging.getLogger("modlabel.scan")


def scan_archive(
    roots: Sequence[str | Path],
    model: OnnxModel,
    engine: Engine,
    *,
    batch_size: int = config.DEFAULT_BATCH_SIZE,
    decoding: DecodeOptions = DecodeOptions(),
    on_progress: Callable[[int], None] | None = None,
    entries: Iterable[FileEntry | Unreadable] | None = None,
    retry_errors: bool = False,
    follow_symlinks: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    image_filter: ImageFilter | None = None,
    class_min_confidence: float = config.DEFAULT_CLASS_MIN_CONFIDENCE,
    wait: bool = False,
    db_retry: float = store.DEFAULT_RETRY_SECONDS,
    commit_rows: int = config.DEFAULT_COMMIT_ROWS,
    abstain: bool = False,
    missing_guard: MissingGuard | None = None,
    run_pipeline: Pipeline | None = None,
    stats: ScanStats | None = None,
) -> ScanStats:
    """Label every image under ``roots`` that the database lacks for ``model``.

    ``entries`` replaces the walk of ``roots`` by another source (for example
    ``source.table_files``); ``roots`` then only names the source in the
    ``scans`` table. Files stored with an error are skipped while unchanged,
    unless ``retry_errors`` (for errors that may have been passing: a file
    being written, a permission since fixed). Stored files under a folder
    root that the walk no longer finds are marked missing (``missing_since``),
    and marked back when they return. Returns the counts; per-file errors are
    stored as rows and also listed in ``ScanStats.error_paths`` (at most 1000
    of them).

    Labels are committed ``commit_rows`` at a time (and at least every
    ``FLUSH_SECONDS``), each transaction with the scan's counts.

    The class-level average maps are kept current as the rows change
    (``modlabel.store.class_sums``), counting images of at least
    ``class_min_confidence``. Each image is labeled by ``modlabel.infer`` (the
    one inference path of every command).

    Probabilities and confidences are calibrated: softmax(logits / T) with the
    model's temperature. Each labeled image gets the model's out-of-set score
    (``ood_score``) and flag (``out_of_set``; NULL for a model without a
    threshold); a flagged image keeps its label, or, with ``abstain``, gets
    none (its probabilities are kept).

    Raises ``InputError`` when a root does not exist (before anything is
    written), ``LockedError`` when another scan of the model runs on the
    database (``wait``: wait for it instead), ``DatabaseError`` when the
    database stays unreachable past ``db_retry`` seconds or refuses a write,
    and ``Interrupted`` (or ``KeyboardInterrupt``) when stopped by a signal;
    what was committed stays, and the next run goes on from there.

    ``run_pipeline`` turns the files that need work into written rows (a
    ``scan.pipeline.Pipeline``): the default decodes and labels them here
    (``scan.pipeline.local``), ``modlabel.scan.ray.ray_pipeline`` on a Ray cluster.
    Listing, change detection, the lock, the run record and the writes stay in
    this process.

    ``stats``: the counts to fill in as the scan goes (a new ``ScanStats`` if None), so
    that a caller has them, and the ``scan_id`` of its ``scans`` row, when the scan
    raises; ``stats.scan_id`` stays None until that row exists.
    """
    if stats is None:
        stats = ScanStats()
    if run_pipeline is None:
        run_pipeline = local
    if entries is None:
        check_roots(roots)
    decode_pool.start_server()  # the decoders' imports overlap the database's first calls
    info = model.info
    retry = store.DbRetry(db_retry, what=f"database {store.safe_url(engine.url)}")
    model_id = retry(
        store.ensure_model,
        engine,
        identity=model.identity,
        sha256=model.sha256,
        backbone=info.backbone,
        class_names=info.class_names,
        input_size=info.input_size,
        activation_shape=info.activation_shape,
        path=absolute(model.path),  # found from any folder: similar, report --truth
        temperature=info.temperature,
    )
    scan_lock = retry(acquire_scan_lock, engine, model_id, wait=wait)
    retry.on_recovered = scan_lock.reacquire
    try:
        stats.interrupted_before = retry(store.interrupt_stale_scans, engine, model_id)
        retry(store.ensure_class_maps, engine, model_id, info.class_names, class_min_confidence)
        named = roots if entries is not None else [absolute(r) for r in roots]  # a table's name
        scan_id = retry(store.start_scan, engine, model_id, [to_db(str(r)) for r in named])
        stats.scan_id = scan_id
        progress = store.ScanProgress(scan_id)
        started = time.perf_counter()
        lookup = ChangeLookup(
            engine,
            model_id,
            stats,
            progress,
            retry,
            on_progress,
            retry_errors,
            missing_guard or MissingGuard(),
        )
        if entries is None:
            counts = WalkCounts()
            changed = lookup.folders(
                distinct_roots(roots),
                lambda root: walk_root(
                    root,
                    follow_symlinks=follow_symlinks,
                    max_bytes=max_file_bytes,
                    image_filter=image_filter,
                    counts=counts,
                ),
                counts,
            )
        else:
            changed = lookup.entries(entries)
        run = ScanContext(
            model=model,
            engine=engine,
            model_id=model_id,
            stats=stats,
            progress=progress,
            retry=retry,
            batch_size=batch_size,
            decoding=decoding,
            on_progress=on_progress,
            max_file_bytes=max_file_bytes,
            commit_rows=commit_rows,
            abstain=abstain,
        )
        with _Heartbeat(engine, scan_id):
            try:
                run_pipeline(changed, run)
                stats.seconds = time.perf_counter() - started
                if lookup.refusals:  # labels were written; nothing was marked missing
                    raise VanishedError("; ".join(lookup.refusals))
                retry(
                    store.finish_scan,
                    engine,
                    scan_id,
                    seen=stats.seen,
                    unchanged=stats.unchanged,
                    skipped=stats.skipped,
                    missing=stats.missing,
                )
            except BaseException as exc:
                stats.seconds = time.perf_counter() - started
                _record_end(engine, scan_id, stats, exc)
                raise
    finally:
        scan_lock.release()
    return stats


def _record_end(engine: Engine, scan_id: int, stats: ScanStats, exc: BaseException) -> None:
    """Write how a scan ended badly to its row, if the database can still be reached."""
    if isinstance(exc, KeyboardInterrupt):
        status, reason = store.INTERRUPTED, "interrupted (SIGINT)"
    elif isinstance(exc, (Interrupted, StopRequested)):
        status, reason = store.INTERRUPTED, str(exc)
    elif isinstance(exc, Exception) and hasattr(exc, "exit_code"):
        status, reason = store.FAILED, str(exc)
    else:
        status, reason = store.FAILED, f"{type(exc).__name__}: {exc}"
    try:
        store.DbRetry(0)(
            store.finish_scan,
            engine,
            scan_id,
            status=status,
            reason=one_line(reason, 2000),
            seen=stats.seen,
            unchanged=stats.unchanged,
            skipped=stats.skipped,
            missing=stats.missing,
        )
    except ModlabelError as unrecorded:
        # The row stays "running" until its heartbeat lapses, then shows as interrupted.
        log.debug("could not record the end of scan #%s: %s", scan_id, unrecorded)


class _Heartbeat:
    """Renews the scan's ``alive_until`` from a thread while the scan runs."""

    def __init__(self, engine: Engine, scan_id: int) -> None:
        self.engine = engine
        self.scan_id = scan_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="modlabel-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(store.HEARTBEAT_SECONDS):
            try:
                store.heartbeat(self.engine, self.scan_id)
            except Exception as exc:  # the main thread's retries deal with outages
                log.debug("heartbeat of scan #%s failed: %s", self.scan_id, exc)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join()
