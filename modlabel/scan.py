"""The scan pipeline: source → decode → infer → maps → store.

Everything streams. Files are looked up in the database a chunk at a time;
unchanged files (same size and mtime, or same content hash) are never decoded
or labeled again; changed and new files are read and decoded by a small
thread pool while the model runs, labeled in batches, and each batch is
written in its own transaction, so an interrupted scan keeps everything it
finished. A file that cannot be read becomes a row with an error, and the scan
goes on.

The nightly job around it: a scan first takes the lock of its (database,
model) (``modlabel.lock``), marks runs that died without a word as
interrupted, and records itself in ``scans`` with a heartbeat. Every
database call is retried through a restart of the server (``store.DbRetry``);
since each batch is one transaction of upserts, a retried batch is written
exactly once. However it ends, its ``scans`` row says how, where the
database can still be reached.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from . import aggregate, codec, config, maps, stopping, store
from .decode import load_pixels
from .dicom import NO_HEADER_COLUMNS, DicomHeader, dicom_header
from .errors import DatabaseError, ImageError, Interrupted
from .lock import acquire_scan_lock
from .model import OnnxModel, softmax
from .paths import display_fs_path, to_db
from .source import (
    DEFAULT_MAX_FILE_BYTES,
    GONE,
    FileEntry,
    ImageFilter,
    Unreadable,
    WalkCounts,
    check_roots,
    distinct_roots,
    walk_root,
)

log = logging.getLogger(__name__)

LOOKUP_CHUNK = 256
STORED_PAGE = 2000


@dataclass
class ScanStats:
    """What a scan did. ``labeled`` counts images that went through the model."""

    seen: int = 0
    labeled: int = 0
    unchanged: int = 0
    errors: int = 0
    skipped: int = 0  # files passed over as not images (by name, or --exclude)
    missing: int = 0  # stored files found gone, marked missing_since
    returned: int = 0  # files marked missing before, found back unchanged
    seconds: float = 0.0
    error_paths: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    scan_id: int | None = None
    interrupted_before: int = 0  # earlier runs found dead and marked interrupted

    @property
    def images_per_second(self) -> float:
        return self.labeled / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Work:
    """One file on its way through the pipeline."""

    entry: FileEntry
    key: str  # the stored path (modlabel.paths)
    known: store.KnownFile | None
    sha256: str | None = None
    inputs: np.ndarray | None = None  # (H, W, 3) float32, decoded and normalized
    original_wh: tuple[int, int] | None = None  # (width, height), as PIL and the database
    error: str | None = None
    unchanged: bool = False
    dicom: DicomHeader | None = None  # the header's Modality etc., for a DICOM file

    @property
    def dicom_columns(self) -> dict[str, str | None]:
        """The ``images.dicom_*`` columns of this file (None for a file that is not DICOM)."""
        return self.dicom.columns() if self.dicom is not None else NO_HEADER_COLUMNS


def scan_archive(
    roots: Sequence[str | Path],
    model: OnnxModel,
    engine: Engine,
    *,
    batch_size: int = config.DEFAULT_BATCH_SIZE,
    workers: int = 2,
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
    run_pipeline: Pipeline | None = None,
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
    (``modlabel.aggregate``), counting images of at least
    ``class_min_confidence``.

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

    ``run_pipeline`` turns the files that need work into written rows; the
    default decodes and labels them here (``_run_pipeline``), and
    ``modlabel.scan_ray.ray_pipeline`` on a Ray cluster. Listing, change
    detection, the lock, the run record and the writes stay in this process.
    """
    if run_pipeline is None:
        run_pipeline = _run_pipeline
    if entries is None:
        check_roots(roots)
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
        path=str(model.path),
        temperature=info.temperature,
    )
    scan_lock = retry(acquire_scan_lock, engine, model_id, wait=wait)
    retry.on_recovered = scan_lock.reacquire
    stats = ScanStats()
    try:
        stats.interrupted_before = retry(store.interrupt_stale_scans, engine, model_id)
        retry(aggregate.ensure_class_maps, engine, model_id, info.class_names, class_min_confidence)
        scan_id = retry(store.start_scan, engine, model_id, [to_db(str(r)) for r in roots])
        stats.scan_id = scan_id
        progress = store.ScanProgress(scan_id)
        started = time.perf_counter()
        lookup = _Lookup(engine, model_id, stats, progress, retry, on_progress, retry_errors)
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
        with _Heartbeat(engine, scan_id):
            try:
                run_pipeline(
                    changed,
                    model,
                    engine,
                    model_id,
                    stats,
                    progress,
                    retry,
                    batch_size=batch_size,
                    workers=workers,
                    on_progress=on_progress,
                    max_file_bytes=max_file_bytes,
                    commit_rows=commit_rows,
                    abstain=abstain,
                )
                stats.seconds = time.perf_counter() - started
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


# What turns the files that need work into written rows: _run_pipeline's signature.
Pipeline = Callable[..., None]


def _run_pipeline(
    changed: Iterable[_Work],
    model: OnnxModel,
    engine: Engine,
    model_id: int,
    stats: ScanStats,
    progress: store.ScanProgress,
    retry: store.DbRetry,
    *,
    batch_size: int,
    workers: int,
    on_progress: Callable[[int], None] | None,
    max_file_bytes: int,
    commit_rows: int = config.DEFAULT_COMMIT_ROWS,
    abstain: bool = False,
) -> None:
    info = model.info
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="modlabel-decode")
    try:
        prepared = _bounded_map(
            pool,
            lambda w: _prepare(w, info.input_size, model.preprocess, max_file_bytes),
            changed,
            window=max(2 * batch_size, 4 * workers),
        )
        writer = _RowWriter(engine, model_id, stats, progress, retry, commit_rows, on_progress)
        try:
            for batch in _batches(prepared, writer.touched, batch_size):
                writer.stop_if_asked()
                writer.flush_touched()
                writer.add(_label_batch(batch, model, abstain=abstain), batch)
            writer.finish()
        except BaseException:
            writer.flush_once()  # a signal or a failure keeps the labels already made
            raise
    finally:
        # On an error or a signal, queued decodes are dropped rather than run.
        pool.shutdown(wait=True, cancel_futures=True)


# Labeled rows are committed in transactions of up to ``commit_rows`` rows
# (config.DEFAULT_COMMIT_ROWS), and at least every FLUSH_SECONDS: fewer, larger transactions
# (a PostgreSQL round trip or a SQLite commit costs more than a row), while a killed scan
# loses at most a few seconds of work.
FLUSH_SECONDS = 2.0


class _RowWriter:
    """The write side of a pipeline (local or Ray): buffers labeled rows and writes them,
    with the scan's counts, in one transaction; records the new stat of touched files;
    ticks the progress; stops the scan at a safe point when a signal asked for it."""

    def __init__(
        self,
        engine: Engine,
        model_id: int,
        stats: ScanStats,
        progress: store.ScanProgress,
        retry: store.DbRetry,
        commit_rows: int,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.model_id = model_id
        self.stats = stats
        self.progress = progress
        self.retry = retry
        self.commit_rows = max(1, commit_rows)
        self.on_progress = on_progress
        self.rows: list[dict[str, Any]] = []
        self.works: list[_Work] = []
        self.touched: list[tuple[str, int, float]] = []  # (stored path, size, mtime)
        self.since = 0.0

    def add(self, rows: list[dict[str, Any]], batch: Sequence[_Work]) -> None:
        if not self.rows:
            self.since = time.monotonic()
        self.rows.extend(rows)
        self.works.extend(batch)
        if len(self.rows) >= self.commit_rows or time.monotonic() - self.since >= FLUSH_SECONDS:
            self.flush()
        _tick(self.on_progress, len(batch))

    def flush_touched(self) -> None:
        """Record the new stat of files whose content did not change (same hash)."""
        if not self.touched:
            return
        self.stats.unchanged += len(self.touched)
        _sync(self.progress, self.stats)
        self.retry(store.touch_files, self.engine, self.model_id, self.touched, self.progress)
        _tick(self.on_progress, len(self.touched))
        self.touched.clear()

    def stop_if_asked(self) -> None:
        """On SIGTERM or Ctrl-C: keep what is labeled, then raise ``Interrupted``."""
        if stopping.requested():
            self.flush()
            stopping.check()

    def finish(self) -> None:
        self.flush()
        self.flush_touched()

    def flush(self) -> None:
        if not self.rows:
            return
        _sync(self.progress, self.stats)
        self.retry(store.write_image_rows, self.engine, self.model_id, self.rows, self.progress)
        self._count()

    def flush_once(self) -> None:
        """One try, no retries: on the way out of a failed or stopped scan."""
        try:
            store.DbRetry(0)(
                store.write_image_rows, self.engine, self.model_id, self.rows, self.progress
            )
        except DatabaseError:
            return
        self._count()

    def _count(self) -> None:
        failed = [w for w in self.works if w.error is not None]
        self.stats.labeled += len(self.works) - len(failed)
        self.stats.errors += len(failed)
        for work in failed:
            if len(self.stats.error_paths) < 1000:
                self.stats.error_paths.append((work.entry.path, work.error))
            log.info("%s: %s", display_fs_path(work.entry.path), work.error)
        self.rows, self.works = [], []


def _sync(progress: store.ScanProgress, stats: ScanStats) -> None:
    progress.seen, progress.unchanged = stats.seen, stats.unchanged
    progress.skipped, progress.missing = stats.skipped, stats.missing


def _record_end(engine: Engine, scan_id: int, stats: ScanStats, exc: BaseException) -> None:
    """Write how a scan ended badly to its row, if the database can still be reached."""
    if isinstance(exc, KeyboardInterrupt):
        status, reason = store.INTERRUPTED, "interrupted (SIGINT)"
    elif isinstance(exc, Interrupted):
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
            reason=reason,
            seen=stats.seen,
            unchanged=stats.unchanged,
            skipped=stats.skipped,
            missing=stats.missing,
        )
    except DatabaseError as unrecorded:
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


def _tick(on_progress: Callable[[int], None] | None, n: int) -> None:
    if on_progress is not None and n:
        on_progress(n)


class _Lookup:
    """Which files need work: each is compared with what the database holds for it.

    Folder roots are walked in the byte order of the stored paths and merged
    with the stored rows under the folder, read page by page in that order: a
    stored row that the walk passes by is a file that is gone (marked missing),
    and neither stream is ever held whole. Other sources (a table of figures,
    a file given as a root) are looked up a chunk at a time.
    """

    def __init__(
        self,
        engine: Engine,
        model_id: int,
        stats: ScanStats,
        progress: store.ScanProgress,
        retry: store.DbRetry,
        on_progress: Callable[[int], None] | None,
        retry_errors: bool,
    ) -> None:
        self.engine = engine
        self.model_id = model_id
        self.stats = stats
        self.progress = progress
        self.retry = retry
        self.on_progress = on_progress
        self.retry_errors = retry_errors
        self.gone: list[str] = []  # stored paths found gone, to mark missing
        self.back: list[str] = []  # stored paths marked missing, found back unchanged

    def folders(
        self,
        roots: Sequence[Path],
        walk: Callable[[str], Iterable[FileEntry | Unreadable]],
        counts: WalkCounts,
    ) -> Iterator[_Work]:
        for root in roots:
            root_str = str(root)
            if Path(root_str).is_dir():
                yield from self._merge(to_db(root_str), walk(root_str))
            else:
                yield from self.entries(walk(root_str))
            self.stats.skipped = counts.skipped
        self._flush(force=True)

    def entries(self, items: Iterable[FileEntry | Unreadable]) -> Iterator[_Work]:
        iterator = iter(items)
        while chunk := list(itertools.islice(iterator, LOOKUP_CHUNK)):
            stopping.check()
            keys = [to_db(_path(item)) for item in chunk]
            known = self.retry(store.known_files, self.engine, self.model_id, keys)
            in_chunk: set[str] = set()  # a path listed twice (a table, overlapping roots) once
            for item, key in zip(chunk, keys, strict=True):
                self.stats.seen += 1
                if key in in_chunk:
                    self._skip()
                    continue
                in_chunk.add(key)
                work = self._decide(item, key, known.get(key))
                if work is not None:
                    yield work
            self._flush()
        self._flush(force=True)

    def _merge(self, folder: str, walked: Iterable[FileEntry | Unreadable]) -> Iterator[_Work]:
        stored = _StoredPages(self.engine, self.model_id, folder, self.retry)
        kept: str | None = None  # rows under an unreadable folder are not "gone"
        for item in walked:
            if self.stats.seen % LOOKUP_CHUNK == 0:
                stopping.check()
            self.stats.seen += 1
            key = to_db(_path(item))
            while (head := stored.peek()) is not None and head[0] < key:
                self._pass_by(stored.pop(), kept)
            old = stored.pop()[1] if head is not None and head[0] == key else None
            if isinstance(item, tuple) and item[1].startswith("cannot list directory"):
                kept = key + "/"
            work = self._decide(item, key, old)
            if work is not None:
                yield work
            self._flush()
        while stored.peek() is not None:
            self._pass_by(stored.pop(), kept)

    def _pass_by(self, row: tuple[str, store.KnownFile], kept: str | None) -> None:
        path, known = row
        if not known.missing and not (kept is not None and path.startswith(kept)):
            self.gone.append(path)

    def _decide(
        self, item: FileEntry | Unreadable, key: str, old: store.KnownFile | None
    ) -> _Work | None:
        """The work for one file, or None when nothing is to be read."""
        if isinstance(item, tuple):
            if item[1] == GONE and old is not None and not old.failed:
                self.gone.append(key)  # a listed file that is gone (a table of figures)
                return self._skip()
            if old is not None and old.failed and not self.retry_errors:
                return self._skip()  # still unreadable: the stored error stands
            return _Work(FileEntry(item[0], 0, 0.0), key, old, error=item[1])
        if old is not None and old.failed and self.retry_errors:
            return _Work(item, key, None)  # no hash shortcut: the same bytes are tried again
        if old is not None and old.size_bytes == item.size_bytes and old.mtime == item.mtime:
            if old.missing:
                self.back.append(key)
            return self._skip()
        return _Work(item, key, old)

    def _skip(self) -> None:
        self.stats.unchanged += 1
        _tick(self.on_progress, 1)
        return None

    def _flush(self, *, force: bool = False) -> None:
        if self.gone and (force or len(self.gone) >= LOOKUP_CHUNK):
            _sync(self.progress, self.stats)
            self.stats.missing += self.retry(
                store.set_missing, self.engine, self.model_id, self.gone, True, self.progress
            )
            self.gone = []
        if self.back and (force or len(self.back) >= LOOKUP_CHUNK):
            _sync(self.progress, self.stats)
            self.stats.returned += self.retry(
                store.set_missing, self.engine, self.model_id, self.back, False, self.progress
            )
            self.back = []


class _StoredPages:
    """The stored rows under a folder, in path order, a page at a time."""

    def __init__(self, engine: Engine, model_id: int, folder: str, retry: store.DbRetry) -> None:
        self.engine = engine
        self.model_id = model_id
        self.folder = folder
        self.retry = retry
        self.page: list[tuple[str, store.KnownFile]] = []
        self.pos = 0
        self.done = False

    def peek(self) -> tuple[str, store.KnownFile] | None:
        if self.pos >= len(self.page):
            if self.done:
                return None
            after = self.page[-1][0] if self.page else None
            self.page = self.retry(
                store.known_under, self.engine, self.model_id, self.folder, after=after,
                page=STORED_PAGE,
            )  # fmt: skip
            self.pos = 0
            self.done = len(self.page) < STORED_PAGE
            if not self.page:
                return None
        return self.page[self.pos]

    def pop(self) -> tuple[str, store.KnownFile]:
        row = self.peek()
        assert row is not None
        self.pos += 1
        return row


def _path(item: FileEntry | Unreadable) -> str:
    return item.path if isinstance(item, FileEntry) else item[0]


def _prepare(
    work: _Work,
    input_size: Sequence[int],
    preprocess: Callable[[np.ndarray], np.ndarray],
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> _Work:
    """Read, hash, decode and normalize one file (runs in a worker thread)."""
    if work.error is not None:
        return work
    try:
        data = work.entry.read(max_file_bytes)
    except ImageError as exc:
        work.error = exc.reason
        return work
    work.sha256 = hashlib.sha256(data).hexdigest()
    if work.known is not None and work.known.sha256 == work.sha256:
        work.unchanged = True  # touched, e.g. copied with a new mtime: same bytes, same label
        return work
    try:
        work.dicom = dicom_header(data)  # kept on error rows too: what the file claims to be
        pixels, work.original_wh = load_pixels(data, input_size, name=work.entry.path)
    except ImageError as exc:
        work.error = exc.reason
        return work
    # Normalizing here, in the worker, keeps the model's thread free for inference.
    work.inputs = preprocess(pixels)
    return work


def _bounded_map(
    pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], *, window: int
) -> Iterator[Any]:
    """``pool.map`` in order, but with at most ``window`` items in flight (flat memory)."""
    queue: deque[Future] = deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) >= window:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def _batches(
    prepared: Iterable[_Work], touched: list[tuple[str, int, float]], batch_size: int
) -> Iterator[list[_Work]]:
    """Group decoded files into model batches; unchanged-content files go to ``touched``."""
    batch: list[_Work] = []
    for work in prepared:
        if work.unchanged:
            touched.append((work.key, work.entry.size_bytes, work.entry.mtime))
            continue
        batch.append(work)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _label_batch(
    batch: Sequence[_Work], model: OnnxModel, *, abstain: bool = False
) -> list[dict[str, Any]]:
    """Run the model on the decoded files of a batch; one row per file, errors included.

    Probabilities are softmax(logits / T); ``abstain``: no label for out-of-set images."""
    now = store.utcnow()
    ok = [w for w in batch if w.error is None]
    rows: list[dict[str, Any]] = []
    if ok:
        logits, activations = model.run(np.stack([w.inputs for w in ok]))
        info = model.info
        probs = softmax(logits.astype(np.float64) / info.temperature)
        rule = info.out_of_set
        ood = rule.scores(activations) if rule is not None else [None] * len(ok)
        flagged = rule.flags(ood) if rule is not None else [None] * len(ok)
        crms = maps.crm(activations, info.head_weights, bias=info.head_bias, pooling=info.pooling)
        blobs = codec.encode_maps(crms)
        names = info.class_names
        for work, p, blob, score, out in zip(ok, probs, blobs, ood, flagged, strict=True):
            top = int(np.argmax(p))
            rows.append(
                {
                    "path": work.key,
                    "size_bytes": work.entry.size_bytes,
                    "mtime": work.entry.mtime,
                    "sha256": work.sha256,
                    "width": work.original_wh[0],
                    "height": work.original_wh[1],
                    "label": None if abstain and out else names[top],
                    "confidence": float(p[top]),
                    "probabilities": {n: float(v) for n, v in zip(names, p, strict=True)},
                    "crm": blob,
                    "error": None,
                    "labeled_at": now,
                    "source_id": work.entry.source_id,
                    "ood_score": None if score is None else float(score),
                    "out_of_set": None if out is None else bool(out),
                    **work.dicom_columns,
                }
            )
    for work in batch:
        if work.error is not None:
            rows.append(
                {
                    "path": work.key,
                    "size_bytes": work.entry.size_bytes,
                    "mtime": work.entry.mtime,
                    "sha256": work.sha256,
                    "width": None,
                    "height": None,
                    "label": None,
                    "confidence": None,
                    "probabilities": None,
                    "crm": None,
                    "error": work.error,
                    "labeled_at": now,
                    "source_id": work.entry.source_id,
                    **work.dicom_columns,
                }
            )
    return rows
