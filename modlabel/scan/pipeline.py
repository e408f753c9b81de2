"""The middle of a scan: the files that need work, decoded in isolated workers, labeled by
the one inference core (``infer``) in batches, and written as rows.

``Pipeline`` is what turns them into written rows: ``local`` here, and the Ray
engine (``scan.ray``) on a cluster. Either way the rows are made by ``label_rows``
and written by a ``RowWriter``, in this process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from sqlalchemy.engine import Engine

from .. import codec, config, geometry, infer, stopping, store
from ..decode_pool import Decoded, DecodePool, DecodeRequest, DecodeSpec
from ..errors import ImageError, Interrupted, ModlabelError
from ..model import OnnxModel
from ..paths import display_fs_path
from ..reasons import Kind
from ..source import BlobEntry
from .changes import ScanStats, Work, sync_progress, tick

log = logging.getLogger("modlabel.scan")


@dataclass(frozen=True)
class DecodeOptions:
    """How files are decoded: ``decoders`` worker processes, each under an address space of
    ``memory_bytes`` and a time limit of ``timeout`` seconds a file (``decode_pool``)."""

    decoders: int = config.DEFAULT_DECODERS
    memory_bytes: int = config.DEFAULT_DECODE_MEMORY
    timeout: float = config.DEFAULT_DECODE_TIMEOUT


@dataclass
class ScanContext:
    """What a pipeline works with: the model, the store and the scan's run record."""

    model: OnnxModel
    engine: Engine
    model_id: int
    stats: ScanStats
    progress: store.ScanProgress
    retry: store.DbRetry
    batch_size: int = config.DEFAULT_BATCH_SIZE
    decoding: DecodeOptions = field(default_factory=lambda: DecodeOptions())
    on_progress: Callable[[int], None] | None = None
    max_file_bytes: int = 256 * 1024 * 1024
    commit_rows: int = config.DEFAULT_COMMIT_ROWS
    abstain: bool = False

    def writer(self) -> RowWriter:
        return RowWriter(self)


class Pipeline(Protocol):
    """Turns the files that need work into written rows (``local``, ``scan.ray``)."""

    def __call__(self, changed: Iterable[Work], run: ScanContext) -> None: ...


def local(changed: Iterable[Work], run: ScanContext) -> None:
    """The pipeline of one machine: decode workers here, the model here."""
    with decoder_pool(run.model, run.decoding, run.max_file_bytes) as pool:
        window = max(2 * run.batch_size, 8)
        prepared = prepare_all(pool, changed, run.max_file_bytes, window=window)
        writer = run.writer()
        try:
            for batch in batches(prepared, writer.touched, run.batch_size):
                writer.stop_if_asked()
                writer.flush_touched()
                writer.add(label_rows(batch, run.model, abstain=run.abstain), batch)
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
    pool: DecodePool, works: Iterable[Work], max_file_bytes: int, *, window: int
) -> Iterator[Work]:
    """Each work with its file read, hashed and decoded by ``pool``, in order."""
    for work, decoded in pool.map(works, lambda w: _request(w, max_file_bytes), window=window):
        yield _apply(work, decoded)


def _request(work: Work, max_file_bytes: int) -> DecodeRequest | None:
    """What a decode worker is to do for a work, or None when its error is known
    already."""
    if work.error is not None:
        return None
    data = None
    if isinstance(work.entry, BlobEntry):
        try:
            data = work.entry.read(max_file_bytes)  # the table's bytes, fetched here
        except ImageError as exc:
            work.error, work.error_kind = exc.reason, exc.kind
            return None
    known = work.known.sha256 if work.known is not None else None
    return DecodeRequest(work.entry.path, data=data, known_sha256=known)


def _apply(work: Work, decoded: Decoded | None) -> Work:
    """A work with what its decode gave (pixels normalized for the model, or an error)."""
    if decoded is None:
        return work
    if decoded.failed is not None:  # the pool itself: never the file's error
        raise ModlabelError(decoded.failed)
    if decoded.cancelled:  # the workers were stopped: a stop, never the file's error
        stopping.check()
        raise Interrupted("decoding stopped")
    work.sha256 = decoded.sha256
    work.unchanged = decoded.unchanged  # touched: same bytes, same label
    work.dicom = decoded.dicom  # kept on error rows too: what the file claims to be
    work.error, work.error_kind = decoded.error, decoded.error_kind
    work.inputs = decoded.pixels
    work.original_wh = decoded.original_wh
    return work


# Labeled rows are committed in transactions of up to ``commit_rows`` rows
# (config.DEFAULT_COMMIT_ROWS), and at least every FLUSH_SECONDS: fewer, larger transactions
# (a PostgreSQL round trip or a SQLite commit costs more than a row), while a killed scan
# loses at most a few seconds of work.
FLUSH_SECONDS = 2.0


class RowWriter:
    """The write side of a pipeline (local or Ray): buffers labeled rows and writes them,
    with the scan's counts, in one transaction; records the new stat of touched files;
    ticks the progress; stops the scan at a safe point when a signal asked for it."""

    def __init__(self, run: ScanContext) -> None:
        self.run = run
        self.commit_rows = max(1, run.commit_rows)
        self.rows: list[dict[str, Any]] = []
        self.works: list[Work] = []
        self.touched: list[tuple[str, int, float]] = []  # (stored path, size, mtime)
        self.since = 0.0

    def add(self, rows: list[dict[str, Any]], batch: Sequence[Work]) -> None:
        if not self.rows:
            self.since = time.monotonic()
        self.rows.extend(rows)
        self.works.extend(batch)
        if len(self.rows) >= self.commit_rows or time.monotonic() - self.since >= FLUSH_SECONDS:
            self.flush()
        tick(self.run.on_progress, len(batch))

    def flush_touched(self) -> None:
        """Record the new stat of files whose content did not change (same hash)."""
        if not self.touched:
            return
        run = self.run
        run.stats.unchanged += len(self.touched)
        sync_progress(run.progress, run.stats)
        run.retry(store.touch_files, run.engine, run.model_id, self.touched, run.progress)
        tick(run.on_progress, len(self.touched))
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
        if self.rows:
            run = self.run
            sync_progress(run.progress, run.stats)
            run.retry(store.write_image_rows, run.engine, run.model_id, self.rows, run.progress)
        self._count()  # files whose labels were kept have works but no rows

    def flush_once(self) -> None:
        """One try, no retries: on the way out of a failed or stopped scan."""
        run = self.run
        try:
            store.DbRetry(0)(
                store.write_image_rows, run.engine, run.model_id, self.rows, run.progress
            )
        except ModlabelError:  # unreachable, or cut short by the stop: the next run redoes it
            return
        self._count()

    def _count(self) -> None:
        stats = self.run.stats
        kept = [w for w in self.works if w.kept]
        failed = [w for w in self.works if w.error is not None and not w.kept]
        stats.labeled += len(self.works) - len(failed) - len(kept)
        stats.errors += len(failed)
        stats.kept += len(kept)
        stats.out_of_set += sum(1 for row in self.rows if row.get("out_of_set"))
        for work in failed:
            kind = (work.error_kind or Kind.CORRUPT).value  # as label_rows stores it
            stats.errors_by_kind[kind] = stats.errors_by_kind.get(kind, 0) + 1
            if len(stats.error_paths) < 1000:
                stats.error_paths.append((work.entry.path, work.error))
            log.info("%s: %s", display_fs_path(work.entry.path), work.error)
        for work in kept:
            if len(stats.error_paths) < 1000:
                stats.error_paths.append((work.entry.path, f"{work.error}: its label is kept"))
        self.rows, self.works = [], []


def batches(
    prepared: Iterable[Work], touched: list[tuple[str, int, float]], batch_size: int
) -> Iterator[list[Work]]:
    """Group decoded files into model batches; unchanged-content files go to ``touched``."""
    batch: list[Work] = []
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


def label_rows(
    batch: Sequence[Work], model: OnnxModel, *, abstain: bool = False
) -> list[dict[str, Any]]:
    """The ``images`` rows of a batch of decoded files, errors included: each labeled
    file through ``infer.label_batch`` (calibrated probabilities, runner-up, out-of-set
    score and flag, CRM and its ROI share, GAP embedding); ``abstain``: no label for
    flagged images."""
    now = store.utcnow()
    ok = [w for w in batch if w.error is None]
    rows: list[dict[str, Any]] = []
    if ok:
        labels = infer.label_batch(model, np.stack([w.inputs for w in ok]))
        crms = labels.crm()
        blobs = codec.encode_maps(crms)
        embeddings = codec.encode_embeddings(labels.embedding)
        input_hw = model.info.input_size
        for i, (work, blob) in enumerate(zip(ok, blobs, strict=True)):
            image = labels[i]
            rows.append(
                {
                    **_file_columns(work, now),
                    "width": work.original_wh[0],
                    "height": work.original_wh[1],
                    **infer.describe(image),
                    "label": image.stored_label(abstain=abstain),
                    "probabilities": image.probabilities,
                    "crm": blob,
                    "roi_share": geometry.roi_share(crms[i], input_hw),
                    "embedding": embeddings[i],
                    "error": None,
                    "error_kind": None,
                }
            )
    for work in batch:
        if work.error is not None and not work.kept:  # a kept file's row stays as it is
            rows.append(
                {
                    **_file_columns(work, now),
                    "width": None,
                    "height": None,
                    "label": None,
                    "confidence": None,
                    "runner_up": None,
                    "runner_up_probability": None,
                    "probabilities": None,
                    "crm": None,
                    "roi_share": None,
                    "embedding": None,
                    "ood_score": None,
                    "out_of_set": None,
                    "error": work.error,
                    "error_kind": (work.error_kind or Kind.CORRUPT).value,
                }
            )
    return rows


def _file_columns(work: Work, now: Any) -> dict[str, Any]:
    """The columns of a row that come from the file itself."""
    return {
        "path": work.key,
        "size_bytes": work.entry.size_bytes,
        "mtime": work.entry.mtime,
        "sha256": work.sha256,
        "labeled_at": now,
        "source_id": work.entry.source_id,
        **work.dicom_columns,
    }
