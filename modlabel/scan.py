"""The scan pipeline: source → decode → infer → maps → store.

Everything streams. Files are looked up in the database a chunk at a time;
unchanged files (same size and mtime, or same content hash) are never decoded
or labeled again; changed and new files are read and decoded by a small
thread pool while the model runs, labeled in batches, and each batch is
written in its own transaction, so an interrupted scan keeps everything it
finished. A file that cannot be read becomes a row with an error, and the scan
goes on.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from . import codec, maps, store
from .decode import load_pixels
from .errors import ImageError
from .model import OnnxModel, softmax
from .source import FileEntry, walk_files

log = logging.getLogger(__name__)

LOOKUP_CHUNK = 256


@dataclass
class ScanStats:
    """What a scan did. ``labeled`` counts images that went through the model."""

    seen: int = 0
    labeled: int = 0
    unchanged: int = 0
    errors: int = 0
    seconds: float = 0.0
    error_paths: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.labeled / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Work:
    """One file on its way through the pipeline."""

    entry: FileEntry
    known: store.KnownFile | None
    sha256: str | None = None
    inputs: np.ndarray | None = None  # (H, W, 3) float32, decoded and normalized
    original_size: tuple[int, int] | None = None
    error: str | None = None
    unchanged: bool = False


def scan_archive(
    roots: Sequence[str | Path],
    model: OnnxModel,
    engine: Engine,
    *,
    batch_size: int = 32,
    workers: int = 2,
    on_progress: Callable[[int], None] | None = None,
    aggregate: bool = True,
    entries: Iterable[FileEntry | tuple[str, str]] | None = None,
    retry_errors: bool = False,
) -> ScanStats:
    """Label every image under ``roots`` that the database lacks for ``model``.

    ``entries`` replaces the walk of ``roots`` by another source (for example
    ``source.table_files``); ``roots`` then only names the source in the
    ``scans`` table. Files stored with an error are skipped while unchanged,
    unless ``retry_errors`` (for errors that may have been passing: a file
    being written, a permission since fixed). Returns the counts; per-file
    errors are stored as rows and also listed in ``ScanStats.error_paths`` (at
    most 1000 of them).
    """
    info = model.info
    model_id = store.ensure_model(
        engine,
        identity=model.identity,
        sha256=model.sha256,
        backbone=info.backbone,
        class_names=info.class_names,
        input_size=info.input_size,
        activation_shape=info.activation_shape,
        path=str(model.path),
    )
    scan_id = store.start_scan(engine, model_id, [str(r) for r in roots])
    stats = ScanStats()
    started = time.perf_counter()
    try:
        changed = _changed_files(
            walk_files(roots) if entries is None else entries,
            engine,
            model_id,
            stats,
            on_progress,
            retry_errors=retry_errors,
        )
        with ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix="modlabel-decode"
        ) as pool:
            prepared = _bounded_map(
                pool,
                lambda w: _prepare(w, info.input_size, model.preprocess),
                changed,
                window=max(2 * batch_size, 4 * workers),
            )
            pending_touch: list[tuple[str, int, float]] = []
            for batch in _batches(prepared, pending_touch, batch_size):
                store.touch_files(engine, model_id, pending_touch)
                stats.unchanged += len(pending_touch)
                _tick(on_progress, len(pending_touch))
                pending_touch.clear()
                rows = _label_batch(batch, model)
                store.write_image_rows(engine, model_id, rows)
                for work in batch:
                    if work.error is None:
                        stats.labeled += 1
                    else:
                        stats.errors += 1
                        if len(stats.error_paths) < 1000:
                            stats.error_paths.append((work.entry.path, work.error))
                        log.warning("%s: %s", work.entry.path, work.error)
                _tick(on_progress, len(batch))
            store.touch_files(engine, model_id, pending_touch)
            stats.unchanged += len(pending_touch)
            _tick(on_progress, len(pending_touch))
    finally:
        stats.seconds = time.perf_counter() - started
        store.finish_scan(
            engine,
            scan_id,
            seen=stats.seen,
            labeled=stats.labeled,
            unchanged=stats.unchanged,
            errors=stats.errors,
        )
    if aggregate and (stats.labeled or stats.errors):
        from .aggregate import update_class_maps

        update_class_maps(engine, model_id, info.class_names)
    return stats


def _tick(on_progress: Callable[[int], None] | None, n: int) -> None:
    if on_progress is not None and n:
        on_progress(n)


def _changed_files(
    entries: Iterable[FileEntry | tuple[str, str]],
    engine: Engine,
    model_id: int,
    stats: ScanStats,
    on_progress: Callable[[int], None] | None,
    *,
    retry_errors: bool = False,
) -> Iterator[_Work]:
    """The files whose stat differs from the database's, looked up a chunk at a time."""
    iterator = iter(entries)
    while chunk := list(itertools.islice(iterator, LOOKUP_CHUNK)):
        stats.seen += len(chunk)
        paths = [e.path if isinstance(e, FileEntry) else e[0] for e in chunk]
        known = store.known_files(engine, model_id, paths)
        skipped = 0
        in_chunk: set[str] = set()  # a path listed twice (a table, overlapping roots) once
        for item in chunk:
            path = item.path if isinstance(item, FileEntry) else item[0]
            if path in in_chunk:
                skipped += 1
                continue
            in_chunk.add(path)
            old = known.get(path)
            if isinstance(item, tuple):
                if old is not None and old.failed and not retry_errors:
                    skipped += 1  # still missing: the stored error stands
                    continue
                yield _Work(FileEntry(path, 0, 0.0), old, error=item[1])
                continue
            if old is not None and old.failed and retry_errors:
                yield _Work(item, None)  # no hash shortcut: the same bytes are tried again
                continue
            if old is not None and old.size_bytes == item.size_bytes and old.mtime == item.mtime:
                skipped += 1
                continue
            yield _Work(item, old)
        stats.unchanged += skipped
        _tick(on_progress, skipped)


def _prepare(
    work: _Work, input_size: Sequence[int], preprocess: Callable[[np.ndarray], np.ndarray]
) -> _Work:
    """Read, hash, decode and normalize one file (runs in a worker thread)."""
    if work.error is not None:
        return work
    try:
        data = Path(work.entry.path).read_bytes()
    except OSError as exc:
        work.error = f"cannot read file: {exc.strerror or exc}"
        return work
    work.sha256 = hashlib.sha256(data).hexdigest()
    if work.known is not None and work.known.sha256 == work.sha256:
        work.unchanged = True  # touched, e.g. copied with a new mtime: same bytes, same label
        return work
    try:
        pixels, work.original_size = load_pixels(data, input_size, name=work.entry.path)
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
            touched.append((work.entry.path, work.entry.size_bytes, work.entry.mtime))
            continue
        batch.append(work)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _label_batch(batch: Sequence[_Work], model: OnnxModel) -> list[dict[str, Any]]:
    """Run the model on the decoded files of a batch; one row per file, errors included."""
    now = store.utcnow()
    ok = [w for w in batch if w.error is None]
    rows: list[dict[str, Any]] = []
    if ok:
        logits, activations = model.run(np.stack([w.inputs for w in ok]))
        probs = softmax(logits.astype(np.float64))
        info = model.info
        crms = maps.crm(activations, info.head_weights, info.head_bias, pooling=info.pooling)
        blobs = codec.encode_maps(crms)
        names = info.class_names
        for work, p, blob in zip(ok, probs, blobs, strict=True):
            top = int(np.argmax(p))
            rows.append(
                {
                    "path": work.entry.path,
                    "size_bytes": work.entry.size_bytes,
                    "mtime": work.entry.mtime,
                    "sha256": work.sha256,
                    "width": work.original_size[0],
                    "height": work.original_size[1],
                    "label": names[top],
                    "confidence": float(p[top]),
                    "probabilities": {n: float(v) for n, v in zip(names, p, strict=True)},
                    "crm": blob,
                    "error": None,
                    "labeled_at": now,
                }
            )
    for work in batch:
        if work.error is not None:
            rows.append(
                {
                    "path": work.entry.path,
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
                }
            )
    return rows
