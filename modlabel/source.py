"""Source: where the images of an archive come from.

``walk_files`` streams the image files under a set of roots in a stable
(sorted) order without ever listing a whole archive in memory: a directory's
entries are sorted one directory at a time.

Only regular files are ever opened. A FIFO, a socket or a device named like
an image, directly or through a symbolic link, is reported with the reason
and never read (opening a FIFO blocks; reading ``/dev/zero`` never ends); so
is a file over the size limit, a broken link and a link loop. Reading goes
through ``read_file``, which checks again on the open descriptor and never
reads past the limit, whatever happened to the file since the walk.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from . import stopping
from .decode import is_image_path
from .dicom import HEAD_BYTES, looks_like_dicom
from .errors import ImageError, InputError
from .paths import absolute, display_fs_path, to_db
from .reasons import Kind

# A file larger than this is refused before it is read (``--max-file-size``). The
# largest image decode accepts (decode.MAX_PIXELS, 100 megapixels) is 300 MB as
# uncompressed 8-bit RGB; real figures and slices are far smaller.
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    """One candidate image: its path (``str`` as ``os`` gives it) and its stat.

    ``source_id``: the figure's id in the user's table, stored with the label.
    """

    path: str
    size_bytes: int
    mtime: float
    source_id: str | None = None

    def read(self, max_bytes: int = 0) -> bytes:
        """The image's bytes (``read_file``: regular files only, at most ``max_bytes``)."""
        return read_file(self.path, max_bytes or DEFAULT_MAX_FILE_BYTES)


@dataclass(frozen=True)
class BlobEntry(FileEntry):
    """A figure whose bytes are stored in a database table, fetched when it is read.

    ``path`` is ``table:<table>/<id>``: the key its label is stored under.
    """

    fetch: Callable[[], bytes | None] | None = None

    def read(self, max_bytes: int = 0) -> bytes:
        limit = max_bytes or DEFAULT_MAX_FILE_BYTES
        if self.size_bytes > limit:
            raise ImageError(self.path, _too_large(self.size_bytes, limit), Kind.TOO_LARGE)
        data = self.fetch() if self.fetch is not None else None
        if data is None:
            raise ImageError(self.path, "no image bytes (NULL) in the table", Kind.NO_BYTES)
        return bytes(data)


class Unreadable(NamedTuple):
    """A file that was found but cannot be labeled: its path, the reason (a sentence) and
    its kind (what code branches on)."""

    path: str
    reason: str
    kind: Kind


# The reason of a listed file that does not exist (a table's path, a root).
GONE = "no such file or directory"


def parse_size(text: str) -> int:
    """Bytes of a size such as ``256M``, ``2G``, ``500k`` or ``1048576`` (powers of 1024)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in units and value[-1:] else ""
    number = value[: len(value) - len(unit)]
    try:
        size = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 256M, 2G)") from None
    if not 0 < size < MAX_SIZE:
        raise ValueError(f"a size must be positive and below 1 PiB, not {text!r}")
    return int(size)


# No size modlabel is given means more than this (1 PiB): larger is a typo.
MAX_SIZE = float(1 << 50)


def check_roots(roots: Iterable[str | Path]) -> None:
    """Raise ``InputError`` naming every root that does not exist.

    A nightly scan of an unmounted archive must stop, not label nothing.
    """
    missing = []
    for root in roots:
        try:
            os.stat(Path(root).expanduser())
        except OSError as exc:
            missing.append(f"{display_fs_path(str(root))} ({_stat_problem(exc)[1]})")
    if missing:
        raise InputError("cannot scan: " + "; ".join(missing))


@dataclass(frozen=True)
class ImageFilter:
    """Which files are images: ``--include`` and ``--exclude`` globs.

    Without ``include``, a file is an image when its suffix is one of
    ``decode.IMAGE_SUFFIXES`` or ``.dcm``/``.dicom`` (any case), or when it is
    DICOM by content (``is_image_file``); with it, when its name matches one of
    the globs. ``exclude`` then removes files whose name matches. A glob with a
    ``/`` is matched against the whole path instead of the name
    (``--exclude '*/thumbnails/*'``). Globs are ``fnmatch``'s, case-sensitive.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def is_image(self, path: str) -> bool:
        name = os.path.basename(path)
        if self.include:
            if not any(_glob_match(g, name, path) for g in self.include):
                return False
        elif not is_image_file(path):
            return False
        return not any(_glob_match(g, name, path) for g in self.exclude)


def is_image_file(path: str | Path) -> bool:
    """True when a file is an image by its name (``decode.is_image_path``), or is DICOM
    by content: ``DICM`` at byte 128.

    PACS exports name files without a suffix (``IM000001``) or by their UID
    (``1.2.840.113619.2.55.3.604``, a suffix of digits). Only such names are opened,
    132 bytes each (``read_head``), so a walk stays a walk of names: a
    ``notes.txt`` is never read.
    """
    if is_image_path(path):
        return True
    suffix = os.path.splitext(os.path.basename(path))[1]
    if suffix and not suffix[1:].isdigit():
        return False
    try:
        # Only regular files are opened: opening a device can have effects of its own.
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        return looks_like_dicom(read_head(str(path), HEAD_BYTES))
    except (OSError, ImageError):  # unreadable or gone: not taken as an image
        return False


def _glob_match(glob: str, name: str, path: str) -> bool:
    return fnmatch.fnmatchcase(path if "/" in glob else name, glob)


@dataclass
class WalkCounts:
    """What a walk passed over: files that are not images (by name or ``--exclude``).

    Hidden files and folders (names starting with '.') are neither walked nor counted.
    """

    skipped: int = 0


def walk_files(
    roots: Iterable[str | Path],
    *,
    follow_symlinks: bool = False,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    image_filter: ImageFilter | None = None,
    counts: WalkCounts | None = None,
) -> Iterator[FileEntry | Unreadable]:
    """Yield a ``FileEntry`` per image file under ``roots`` (files or directories).

    A file, root or directory that cannot be labeled or read yields
    ``(path, reason)`` instead, so that the caller can record it and go on.
    Hidden files and directories (names starting with '.') are skipped; a
    root inside another root is walked once. A file's stat is its target's
    for a symbolic link (the bytes labeled are the target's);
    ``follow_symlinks`` decides only whether linked directories are descended
    into, and each directory is walked once however many links lead to it.
    """
    visited: set[tuple[int, int]] = set()
    for root in distinct_roots(roots):
        yield from walk_root(
            str(root),
            follow_symlinks=follow_symlinks,
            max_bytes=max_bytes,
            image_filter=image_filter,
            counts=counts,
            visited=visited,
        )


def walk_root(
    root: str,
    *,
    follow_symlinks: bool = False,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    image_filter: ImageFilter | None = None,
    counts: WalkCounts | None = None,
    visited: set[tuple[int, int]] | None = None,
) -> Iterator[FileEntry | Unreadable]:
    """``walk_files`` of one root, in the byte order of the stored paths.

    Entries of a directory are sorted by their stored text (``paths.to_db``),
    a folder's name followed by '/', so the whole walk comes out in the order
    in which the database sorts the stored paths (byte-wise): a scan merges the
    two streams to find vanished files without holding either in memory.
    """
    visited = set() if visited is None else visited
    try:
        st = os.stat(root)
    except OSError as exc:
        yield _stat_failed(root, exc)
        return
    if stat.S_ISDIR(st.st_mode):
        visited.add((st.st_dev, st.st_ino))
        yield from _walk_dir(
            root,
            follow_symlinks,
            max_bytes,
            visited,
            image_filter or ImageFilter(),
            counts if counts is not None else WalkCounts(),
        )
    else:
        yield _classify(root, st, max_bytes)  # a file named as a root is taken as it is


def distinct_roots(roots: Iterable[str | Path]) -> list[Path]:
    """The roots as absolute paths, without repeats or roots inside another root."""
    paths = [Path(absolute(r)) for r in roots]
    dirs = [p for p in paths if p.is_dir()]
    distinct: list[Path] = []
    for p in paths:
        # An existing path under a directory root is walked with it; a missing one is
        # still reported.
        nested = p.exists() and any(d != p and d in p.parents for d in dirs)
        if p not in distinct and not nested:
            distinct.append(p)
    return distinct


def _walk_dir(
    top: str,
    follow_symlinks: bool,
    max_bytes: int,
    visited: set[tuple[int, int]],
    image_filter: ImageFilter,
    counts: WalkCounts,
) -> Iterator[FileEntry | Unreadable]:
    """The walk under ``top``, depth first in stored-path order, at any depth: an explicit
    stack of folders (one sorted listing each), never a recursion. A stop asked for
    (``stopping``) ends it between any two entries, whether they are images or not."""
    listing = _listing(top, follow_symlinks)
    if isinstance(listing, str):
        yield Unreadable(top, listing, Kind.UNLISTED_FOLDER)
        return
    stack: list[Iterator[tuple[str, bool, os.stat_result | OSError | None]]] = [iter(listing)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        stopping.check()
        path, is_dir, target = entry
        if is_dir:
            try:
                st = target if isinstance(target, os.stat_result) else os.stat(path)
            except OSError as exc:
                reason = f"cannot list directory: {_stat_problem(exc)[1]}"
                yield Unreadable(path, reason, Kind.UNLISTED_FOLDER)
                continue
            dir_key = (st.st_dev, st.st_ino)
            if dir_key in visited:  # a link loop, or a second link to one folder
                continue
            visited.add(dir_key)
            inner = _listing(path, follow_symlinks)
            if isinstance(inner, str):
                yield Unreadable(path, inner, Kind.UNLISTED_FOLDER)
            else:
                stack.append(iter(inner))
            continue
        if not image_filter.is_image(path):
            counts.skipped += 1
            continue
        try:
            st = os.stat(path)  # a link's target: the bytes that would be read
        except OSError as exc:
            yield _stat_failed(path, exc)
            continue
        yield _classify(path, st, max_bytes)


def _listing(
    top: str, follow_symlinks: bool
) -> list[tuple[str, bool, os.stat_result | OSError | None]] | str:
    """A folder's entries (path, is a folder, a followed link's stat) in the order of their
    stored paths, a folder sorting as "name/"; or the reason it cannot be listed."""
    try:
        with os.scandir(top) as it:
            listed = [
                (e.name, e.is_dir(follow_symlinks=False), e.is_symlink())
                for e in it
                if not e.name.startswith(".")
            ]
    except OSError as exc:
        return f"cannot list directory: {exc.strerror or exc}"
    entries = []
    for name, is_dir, is_link in listed:
        path = os.path.join(top, name)
        target: os.stat_result | OSError | None = None
        if is_link and follow_symlinks:
            try:
                target = os.stat(path)
            except OSError as exc:
                target = exc
            is_dir = isinstance(target, os.stat_result) and stat.S_ISDIR(target.st_mode)
        # A folder sorts as "name/": its files come where their full paths sort.
        entries.append((to_db(name) + ("/" if is_dir else ""), path, is_dir, target))
    entries.sort(key=lambda item: item[0])
    return [(path, is_dir, target) for _key, path, is_dir, target in entries]


def _classify(path: str, st: os.stat_result, max_bytes: int) -> FileEntry | Unreadable:
    """A ``FileEntry`` for a regular file within the limit, else ``Unreadable``."""
    if not stat.S_ISREG(st.st_mode):
        return Unreadable(path, f"not a regular file ({_kind(st.st_mode)})", Kind.SPECIAL_FILE)
    if st.st_size > max_bytes:
        return Unreadable(path, _too_large(st.st_size, max_bytes), Kind.TOO_LARGE)
    return FileEntry(path=path, size_bytes=st.st_size, mtime=st.st_mtime)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "unknown file type"


def _too_large(size: int, max_bytes: int) -> str:
    return f"file too large ({size} bytes; the limit is {max_bytes}, see --max-file-size)"


def _unreadable(path: str, exc: OSError) -> ImageError:
    return ImageError(path, f"cannot read file: {exc.strerror or exc}", Kind.UNREADABLE)


def _stat_failed(path: str, exc: OSError) -> Unreadable:
    kind, reason = _stat_problem(exc)
    return Unreadable(path, reason, kind)


def _stat_problem(exc: OSError) -> tuple[Kind, str]:
    """(kind, sentence) of an OSError from stat or open."""
    if exc.errno == errno.ELOOP:
        return Kind.LINK_LOOP, "symbolic link loop"
    if exc.errno == errno.ENOENT:
        if exc.filename is not None and os.path.islink(exc.filename):
            return Kind.BROKEN_LINK, "broken symbolic link"
        return Kind.GONE, GONE
    if exc.errno == errno.EACCES:
        return Kind.PERMISSION, "permission denied"
    return Kind.UNREADABLE, f"cannot stat: {exc.strerror or exc}"


def read_file(path: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ``ImageError`` otherwise.

    Opened without blocking (a FIFO swapped in since the walk opens at once),
    checked on the open descriptor, and read to at most ``max_bytes + 1``.
    """
    with _open_regular(path) as (handle, st):
        try:
            if st.st_size > max_bytes:
                raise ImageError(path, _too_large(st.st_size, max_bytes), Kind.TOO_LARGE)
            chunks, total = [], 0
            while chunk := handle.read(min(1 << 20, max_bytes + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    grown = _too_large(total, max_bytes) + " (it grew while read)"
                    raise ImageError(path, grown, Kind.TOO_LARGE)
        except OSError as exc:
            raise ImageError(
                path, f"cannot read file: {exc.strerror or exc}", Kind.UNREADABLE
            ) from None
    return b"".join(chunks)


def read_head(path: str, size: int) -> bytes:
    """The first ``size`` bytes (or fewer) of a regular file; ``ImageError`` otherwise.

    Opened like ``read_file``: without blocking, checked on the descriptor.
    """
    with _open_regular(path) as (handle, _st):
        try:
            return handle.read(size)
        except OSError as exc:
            raise ImageError(
                path, f"cannot read file: {exc.strerror or exc}", Kind.UNREADABLE
            ) from None


@contextmanager
def _open_regular(path: str) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """(unbuffered handle, its fstat) of a regular file; ``ImageError`` for anything else.

    Opened without blocking (a FIFO swapped in since the walk opens at once) and
    checked on the open descriptor, whatever the walk saw.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        kind, reason = _stat_problem(exc)
        if kind is Kind.UNREADABLE:
            reason = f"cannot open file: {exc.strerror or exc}"
        raise ImageError(path, reason, kind) from None
    with os.fdopen(fd, "rb", buffering=0) as handle:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise ImageError(
                path, f"cannot read file: {exc.strerror or exc}", Kind.UNREADABLE
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(path, f"not a regular file ({_kind(st.st_mode)})", Kind.SPECIAL_FILE)
        yield handle, st


def table_files(
    url: str,
    table: str,
    column: str | None = "path",
    *,
    id_column: str | None = None,
    blob_column: str | None = None,
    base_dir: str | Path | None = None,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    chunk: int = 1000,
) -> Iterator[FileEntry | Unreadable]:
    """Yield an entry per figure listed in a database table.

    For archives whose figures are catalogued in a database (a literature
    index, a PACS export) rather than laid out in folders:

    * ``column`` holds file paths (relative ones are taken relative to
      ``base_dir``), yielding a ``FileEntry`` per existing file; or
    * ``blob_column`` holds the image bytes themselves, yielding a
      ``BlobEntry`` per row, keyed ``table:<table>/<id>`` by ``id_column``
      (required then); only the byte length is read here, the bytes are
      fetched when the image is decoded.

    ``id_column``'s value is stored with each label (``images.source_id``), so
    labels join back to the user's table. Rows are streamed, ``chunk`` at a
    time, ordered by the id (or the path). A table or column that does not
    exist raises ``InputError``; a path that is not a readable image file
    yields ``Unreadable``.
    """
    import sqlalchemy as sa

    from .errors import DatabaseError
    from .redaction import safe_url

    if blob_column is not None and id_column is None:
        raise InputError("--blob-column needs --id-column: the id names the figure")
    try:
        engine = sa.create_engine(url, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ModuleNotFoundError) as exc:
        raise DatabaseError(f"not a usable database URL: {safe_url(url)} ({exc})") from None
    try:
        meta = sa.MetaData()
        try:
            source = sa.Table(table, meta, autoload_with=engine)
        except sa.exc.NoSuchTableError:
            raise InputError(f"no table {table!r} in {safe_url(url)}") from None
        wanted = [c for c in (blob_column or column, id_column) if c is not None]
        for name in wanted:
            if name not in source.c:
                raise InputError(
                    f"table {table!r} has no column {name!r}; it has " + ", ".join(source.c.keys())
                )
        id_col = source.c[id_column] if id_column is not None else None
        if blob_column is not None:
            yield from _blob_rows(engine, source, table, source.c[blob_column], id_col, chunk)
            return
        path_col = source.c[column]
        query = (
            sa.select(path_col, *([id_col] if id_col is not None else []))
            .where(path_col.is_not(None))
            .order_by(id_col if id_col is not None else path_col)
            .execution_options(yield_per=chunk)
        )
        base = Path(base_dir).expanduser().absolute() if base_dir is not None else None
        with engine.connect() as conn:
            for row in conn.execute(query):
                path = Path(str(row[0])).expanduser()
                if not path.is_absolute():
                    path = (base or Path.cwd()) / path
                path_str = str(path.absolute())
                try:
                    st = os.stat(path_str)
                except OSError as exc:
                    yield _stat_failed(path_str, exc)
                    continue
                entry = _classify(path_str, st, max_bytes)
                if isinstance(entry, FileEntry) and id_col is not None:
                    entry = FileEntry(entry.path, entry.size_bytes, entry.mtime, str(row[1]))
                yield entry
    except sa.exc.DBAPIError as exc:
        raise DatabaseError(f"cannot read table {table!r} of {safe_url(url)}: {exc.orig}") from None
    finally:
        engine.dispose()


def _blob_rows(engine, source, table: str, blob_col, id_col, chunk: int) -> Iterator[BlobEntry]:
    import sqlalchemy as sa

    query = (
        sa.select(id_col, sa.func.length(blob_col))
        .order_by(id_col)
        .execution_options(yield_per=chunk)
    )

    def fetcher(figure_id: object) -> Callable[[], bytes | None]:
        def fetch() -> bytes | None:
            with engine.connect() as conn:
                return conn.execute(sa.select(blob_col).where(id_col == figure_id)).scalar()

        return fetch

    with engine.connect() as conn:
        for figure_id, length in conn.execute(query):
            yield BlobEntry(
                path=f"table:{table}/{figure_id}",
                size_bytes=int(length or 0),
                mtime=0.0,
                source_id=str(figure_id),
                fetch=fetcher(figure_id),
            )
