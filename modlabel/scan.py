"""The scan pipeline: source → decode → infer → maps → store.

Everything streams. Files are looked up in the database a chunk at a time;
unchanged files (same size and mtime, or same content hash) are never decoded
or labeled again; changed and new files are read and decoded by isolated
worker processes (``modlabel.decode_pool``) while the model runs, labeled in
batches, and each batch is written in its own transaction, so an interrupted
scan keeps everything it finished. A file that cannot be read, or that crashes
or exhausts its decoder, becomes a row with an error, and the scan goes on.

The nightly job around it: a scan first takes the lock of its (database,
model) (``modlabel.lock``), marks runs that died without a word as
interrupted, and records itself in ``scans`` with a heartbeat. Every
database call is retried through a restart of the server (``store.DbRetry``);
since each batch is one transaction of upserts, a retried batch is written
exactly once. However it ends, its ``scans`` row says how, where the
database can still be reached.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from . import aggregate, codec, config, decode_pool, maps, stopping, store
from .decode_pool import Decoded, DecodePool, DecodeRequest, DecodeSpec
from .dicom import NO_HEADER_COLUMNS, DicomHeader
from .errors import (
    ImageError,
    Interrupted,
    ModlabelError,
    StopRequested,
    VanishedError,
    one_line,
)
from .lock import acquire_scan_lock
from .model import OnnxModel, softmax
from .paths import display_fs_path, display_path, to_db
from .source import (
    DEFAULT_MAX_FILE_BYTES,
    GONE,
    BlobEntry,
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


@dataclass(frozen=True)
class DecodeOptions:
    """How files are decoded: ``decoders`` worker processes, each under an address space of
    ``memory_bytes`` and a time limit of ``timeout`` seconds a file (``decode_pool``)."""

    decoders: int = config.DEFAULT_DECODERS
    memory_bytes: int = config.DEFAULT_DECODE_MEMORY
    timeout: float = config.DEFAULT_DECODE_TIMEOUT


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
        lookup = _Lookup(
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
                    decoding=decoding,
                    on_progress=on_progress,
                    max_file_bytes=max_file_bytes,
                    commit_rows=commit_rows,
                    abstain=abstain,
                )
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
    decoding: DecodeOptions,
    on_progress: Callable[[int], None] | None,
    max_file_bytes: int,
    commit_rows: int = config.DEFAULT_COMMIT_ROWS,
    abstain: bool = False,
) -> None:
    with decoder_pool(model, decoding, max_file_bytes) as pool:
        prepared = prepare_all(pool, changed, max_file_bytes, window=max(2 * batch_size, 8))
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


def decoder_pool(model: OnnxModel, decoding: DecodeOptions, max_file_bytes: int) -> DecodePool:
    """The decode workers of a scan: the model's input size, normalized as it expects."""
    info = model.info
    spec = DecodeSpec(
        size_hw=(int(info.input_size[0]), int(info.input_size[1])),
        mean=tuple(float(v) for v in info.mean),
        std=tuple(float(v) for v in info.std),
        max_bytes=max_file_bytes,
    )
    return DecodePool(
        spec,
        workers=decoding.decoders,
        memory_bytes=decoding.memory_bytes,
        timeout=decoding.timeout,
    )


def prepare_all(
    pool: DecodePool, works: Iterable[_Work], max_file_bytes: int, *, window: int
) -> Iterator[_Work]:
    """Each work with its file read, hashed and decoded by ``pool``, in order."""
    for work, decoded in pool.map(works, lambda w: _request(w, max_file_bytes), window=window):
        yield _apply(work, decoded)


def _request(work: _Work, max_file_bytes: int) -> DecodeRequest | None:
    """What a decode worker is to do for a work (runs on a pool thread), or None when
    its error is known already."""
    if work.error is not None:
        return None
    data = None
    if isinstance(work.entry, BlobEntry):
        try:
            data = work.entry.read(max_file_bytes)  # the table's bytes, fetched here
        except ImageError as exc:
            work.error = exc.reason
            return None
    known = work.known.sha256 if work.known is not None else None
    return DecodeRequest(work.entry.path, data=data, known_sha256=known)


def _apply(work: _Work, decoded: Decoded | None) -> _Work:
    """A work with what its decode gave (pixels normalized for the model, or an error)."""
    if decoded is None:
        return work
    if decoded.cancelled:  # the workers were stopped: a stop, never the file's error
        stopping.check()
        raise Interrupted("decoding stopped")
    work.sha256 = decoded.sha256
    work.unchanged = decoded.unchanged  # touched: same bytes, same label
    work.dicom = decoded.dicom  # kept on error rows too: what the file claims to be
    work.error = decoded.error
    work.inputs = decoded.pixels
    work.original_wh = decoded.original_wh
    return work


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
        except ModlabelError:  # unreachable, or cut short by the stop: the next run redoes it
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


def _tick(on_progress: Callable[[int], None] | None, n: int) -> None:
    if on_progress is not None and n:
        on_progress(n)


@dataclass(frozen=True)
class MissingGuard:
    """When a scan marks nothing missing: a root that looks vanished.

    A share that did not mount, or a mount point left empty, must not turn the
    archive's labels into "missing" (and ``prune`` then into nothing). A root's
    stored files found gone are marked missing only once its walk is over, and
    only when fewer than the limit are: at most ``share`` of the root's stored
    files that were there (and ``MISSING_FLOOR`` files in any case), or at most
    ``count`` files. A root that walks empty while files are stored under it marks
    none. ``allow``: mark them all (a real mass deletion, confirmed).
    """

    share: float | None = config.DEFAULT_MAX_MISSING_SHARE
    count: int | None = None
    allow: bool = False

    def refusal(self, root: str, gone: int, live: int, empty: bool) -> str | None:
        """Why ``gone`` of ``live`` stored files under ``root`` are not marked missing, or
        None when they may be."""
        if self.allow or gone == 0:
            return None
        shown = display_path(root)
        if empty:
            return (
                f"{shown} is empty, but {live} files are stored under it (a share that did "
                "not mount?): nothing was marked missing; --allow-missing marks them"
            )
        if self.count is not None:
            limit = self.count
        else:
            limit = max(int(math.ceil((self.share or 0.0) * live)), config.MISSING_FLOOR)
        if gone <= limit:
            return None
        what = f"{self.count}" if self.count is not None else f"{self.share:.0%} of {live}"
        return (
            f"{gone} of the {live} files stored under {shown} are gone, more than "
            f"--max-missing allows ({what}): nothing was marked missing; check the archive, "
            "then --allow-missing marks them"
        )


class _GoneList:
    """Stored paths found gone under one root, to be marked missing once the walk is
    over: held in memory up to a chunk, then spilled to a temporary file (flat memory)."""

    def __init__(self) -> None:
        self.head: list[str] = []
        self.spill: Any = None
        self.count = 0

    def add(self, path: str) -> None:
        self.count += 1
        if len(self.head) < LOOKUP_CHUNK:
            self.head.append(path)
            return
        if self.spill is None:
            import tempfile

            self.spill = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # noqa: SIM115
        self.spill.write(json.dumps(path) + "\n")  # one line per path, whatever it holds

    def chunks(self) -> Iterator[list[str]]:
        if self.head:
            yield self.head
        if self.spill is not None:
            self.spill.seek(0)
            chunk = []
            for line in self.spill:
                chunk.append(json.loads(line))
                if len(chunk) >= LOOKUP_CHUNK:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

    def clear(self) -> None:
        self.head, self.count = [], 0
        if self.spill is not None:
            self.spill.close()
            self.spill = None


class _Lookup:
    """Which files need work: each is compared with what the database holds for it.

    Folder roots are walked in the byte order of the stored paths and merged
    with the stored rows under the folder, read page by page in that order: a
    stored row that the walk passes by is a file that is gone, and neither stream
    is ever held whole. Other sources (a table of figures, a file given as a root)
    are looked up a chunk at a time. Files found gone are marked missing when a
    root's walk is over, if ``guard`` lets them (``MissingGuard``); otherwise its
    reason is kept in ``refusals`` and nothing is marked.
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
        guard: MissingGuard,
    ) -> None:
        self.engine = engine
        self.model_id = model_id
        self.stats = stats
        self.progress = progress
        self.retry = retry
        self.on_progress = on_progress
        self.retry_errors = retry_errors
        self.guard = guard
        self.gone = _GoneList()  # the current root's stored paths found gone
        self.live = 0  # the current root's stored files that were there before this scan
        self.back: list[str] = []  # stored paths marked missing, found back unchanged
        self.refusals: list[str] = []

    def folders(
        self,
        roots: Sequence[Path],
        walk: Callable[[str], Iterable[FileEntry | Unreadable]],
        counts: WalkCounts,
    ) -> Iterator[_Work]:
        for root in roots:
            root_str = str(root)
            skipped_before = counts.skipped
            if Path(root_str).is_dir():
                walked = yield from self._merge(to_db(root_str), walk(root_str))
                empty = walked == 0 and counts.skipped == skipped_before
                self._settle(root_str, empty=empty)
            else:
                yield from self.entries(walk(root_str))
            self.stats.skipped = counts.skipped
        self._flush(force=True)

    def entries(
        self, items: Iterable[FileEntry | Unreadable], *, source: str = "the table"
    ) -> Iterator[_Work]:
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
                old = known.get(key)
                if old is not None and not old.missing:
                    self.live += 1
                work = self._decide(item, key, old)
                if work is not None:
                    yield work
            self._flush()
        self._settle(source, empty=False)
        self._flush(force=True)

    def _merge(self, folder: str, walked: Iterable[FileEntry | Unreadable]):
        """The works of one folder root; returns how many entries its walk yielded."""
        stored = _StoredPages(self.engine, self.model_id, folder, self.retry)
        kept: str | None = None  # rows under an unreadable folder are not "gone"
        count = 0
        for item in walked:
            if self.stats.seen % LOOKUP_CHUNK == 0:
                stopping.check()
            self.stats.seen += 1
            count += 1
            key = to_db(_path(item))
            while (head := stored.peek()) is not None and head[0] < key:
                self._pass_by(stored.pop(), kept)
            old = None
            if head is not None and head[0] == key:
                old = stored.pop()[1]
                self.live += not old.missing
            if isinstance(item, tuple) and item[1].startswith("cannot list directory"):
                kept = key + "/"
            work = self._decide(item, key, old)
            if work is not None:
                yield work
            self._flush()
        while stored.peek() is not None:
            self._pass_by(stored.pop(), kept)
        return count

    def _pass_by(self, row: tuple[str, store.KnownFile], kept: str | None) -> None:
        path, known = row
        if known.missing:
            return
        self.live += 1
        if not (kept is not None and path.startswith(kept)):
            self.gone.add(path)

    def _settle(self, root: str, *, empty: bool) -> None:
        """A root's walk is over: mark its gone files missing, unless the guard refuses."""
        refusal = self.guard.refusal(root, self.gone.count, self.live, empty)
        if refusal is not None:
            self.refusals.append(refusal)
            log.warning("%s", refusal)
        else:
            for chunk in self.gone.chunks():
                stopping.check()
                _sync(self.progress, self.stats)
                self.stats.missing += self.retry(
                    store.set_missing, self.engine, self.model_id, chunk, True, self.progress
                )
        self.gone.clear()
        self.live = 0

    def _decide(
        self, item: FileEntry | Unreadable, key: str, old: store.KnownFile | None
    ) -> _Work | None:
        """The work for one file, or None when nothing is to be read."""
        if isinstance(item, tuple):
            if item[1] == GONE and old is not None and not old.failed:
                if not old.missing:
                    self.gone.add(key)  # a listed file that is gone (a table of figures)
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
