"""Which files need work: the walk (or a table of figures) merged with what the store holds.

Folder roots are walked in the byte order of the stored paths and merged with
the stored rows under the folder, read page by page in that order: a stored row
that the walk passes by is a file that is gone, and neither stream is ever held
whole. Files found gone are marked missing when a root's walk is over, if the
``MissingGuard`` lets them: a share that did not mount marks nothing.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from .. import config, stopping, store
from ..dicom import NO_HEADER_COLUMNS, DicomHeader
from ..errors import ModlabelError
from ..paths import display_path, to_db
from ..reasons import ACCESS_KINDS, Kind
from ..source import FileEntry, Unreadable, WalkCounts

log = logging.getLogger("modlabel.scan")

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
    kept: int = 0  # files labeled before that could not be reached: their rows stay
    scan_id: int | None = None
    interrupted_before: int = 0  # earlier runs found dead and marked interrupted
    errors_by_kind: dict[str, int] = field(default_factory=dict)  # Kind value -> files
    out_of_set: int = 0  # labeled images the model flagged out of set

    @property
    def images_per_second(self) -> float:
        return self.labeled / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Work:
    """One file on its way through the pipeline."""

    entry: FileEntry
    key: str  # the stored path (modlabel.paths)
    known: store.KnownFile | None
    sha256: str | None = None
    inputs: np.ndarray | None = None  # (H, W, 3) float32, decoded and normalized
    original_wh: tuple[int, int] | None = None  # (width, height), as PIL and the database
    error: str | None = None
    error_kind: Kind | None = None
    unchanged: bool = False
    dicom: DicomHeader | None = None  # the header's Modality etc., for a DICOM file

    @property
    def kept(self) -> bool:
        """A file labeled before that could not be reached this time: its row stays."""
        return (
            self.error_kind in ACCESS_KINDS
            and self.known is not None
            and not self.known.failed
            and not self.known.missing
        )

    @property
    def dicom_columns(self) -> dict[str, str | None]:
        """The ``images.dicom_*`` columns of this file (None for a file that is not DICOM)."""
        return self.dicom.columns() if self.dicom is not None else NO_HEADER_COLUMNS


def sync_progress(progress: store.ScanProgress, stats: ScanStats) -> None:
    progress.seen, progress.unchanged = stats.seen, stats.unchanged
    progress.skipped, progress.missing = stats.skipped, stats.missing


def tick(on_progress: Callable[[int], None] | None, n: int) -> None:
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
        try:
            if self.spill is None:
                import tempfile

                self.spill = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # noqa: SIM115
            self.spill.write(json.dumps(path) + "\n")  # one line per path, whatever it holds
        except OSError as exc:
            raise ModlabelError(
                "cannot keep the list of files found gone in a temporary file "
                f"({exc.strerror or exc}): nothing was marked missing; give TMPDIR room"
            ) from None

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


class ChangeLookup:
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
    ) -> Iterator[Work]:
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
    ) -> Iterator[Work]:
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
        stored = StoredPages(self.engine, self.model_id, folder, self.retry)
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
            if isinstance(item, Unreadable) and item.kind is Kind.UNLISTED_FOLDER:
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
            log.info("%s", refusal)  # said once, in the VanishedError at the end
        else:
            for chunk in self.gone.chunks():
                stopping.check()
                sync_progress(self.progress, self.stats)
                self.stats.missing += self.retry(
                    store.set_missing, self.engine, self.model_id, chunk, True, self.progress
                )
        self.gone.clear()
        self.live = 0

    def _decide(
        self, item: FileEntry | Unreadable, key: str, old: store.KnownFile | None
    ) -> Work | None:
        """The work for one file, or None when nothing is to be read."""
        if isinstance(item, Unreadable):
            if item.kind is Kind.GONE and old is not None and not old.failed:
                if not old.missing:
                    self.gone.add(key)  # a listed file that is gone (a table of figures)
                return self._skip()
            if old is not None and old.failed and not self.retry_errors:
                return self._skip()  # still unreadable: the stored error stands
            entry = FileEntry(item.path, 0, 0.0)
            return Work(entry, key, old, error=item.reason, error_kind=item.kind)
        if old is not None and old.failed and self.retry_errors:
            return Work(item, key, None)  # no hash shortcut: the same bytes are tried again
        if old is not None and old.size_bytes == item.size_bytes and old.mtime == item.mtime:
            if old.missing:
                self.back.append(key)
            return self._skip()
        return Work(item, key, old)

    def _skip(self) -> None:
        self.stats.unchanged += 1
        tick(self.on_progress, 1)
        return None

    def _flush(self, *, force: bool = False) -> None:
        if self.back and (force or len(self.back) >= LOOKUP_CHUNK):
            sync_progress(self.progress, self.stats)
            self.stats.returned += self.retry(
                store.set_missing, self.engine, self.model_id, self.back, False, self.progress
            )
            self.back = []


class StoredPages:
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
    return item.path
