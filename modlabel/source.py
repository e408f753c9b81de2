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
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .decode import is_image_path
from .errors import ImageError, InputError
from .paths import display_fs_path

# A file larger than this is refused before it is read (``--max-file-size``). The
# largest image decode accepts (decode.MAX_PIXELS, 100 megapixels) is 300 MB as
# uncompressed 8-bit RGB; real figures and slices are far smaller.
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    """One candidate image: its path (``str`` as ``os`` gives it) and its stat."""

    path: str
    size_bytes: int
    mtime: float


# A file that was found but cannot be labeled: (path, reason).
Unreadable = tuple[str, str]


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
    if size <= 0:
        raise ValueError(f"a size must be positive, not {text!r}")
    return int(size)


def check_roots(roots: Iterable[str | Path]) -> None:
    """Raise ``InputError`` naming every root that does not exist.

    A nightly scan of an unmounted archive must stop, not label nothing.
    """
    missing = []
    for root in roots:
        try:
            os.stat(Path(root).expanduser())
        except OSError as exc:
            missing.append(f"{display_fs_path(str(root))} ({_stat_reason(exc)})")
    if missing:
        raise InputError("cannot scan: " + "; ".join(missing))


def walk_files(
    roots: Iterable[str | Path],
    *,
    follow_symlinks: bool = False,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
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
    for root_path in _distinct_roots(roots):
        root = str(root_path)
        try:
            st = os.stat(root)
        except OSError as exc:
            yield (root, _stat_reason(exc))
            continue
        if stat.S_ISDIR(st.st_mode):
            visited.add((st.st_dev, st.st_ino))
            yield from _walk_dir(root, follow_symlinks, max_bytes, visited)
        else:
            yield _classify(root, st, max_bytes)  # a file named as a root is taken as it is


def _distinct_roots(roots: Iterable[str | Path]) -> list[Path]:
    """The roots as absolute paths, without repeats or roots inside another root."""
    paths = [Path(os.path.normpath(Path(r).expanduser().absolute())) for r in roots]
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
    top: str, follow_symlinks: bool, max_bytes: int, visited: set[tuple[int, int]]
) -> Iterator[FileEntry | Unreadable]:
    try:
        with os.scandir(top) as it:
            names = sorted(
                (e.name, e.is_dir(follow_symlinks=False), e.is_symlink())
                for e in it
                if not e.name.startswith(".")
            )
    except OSError as exc:
        yield (top, f"cannot list directory: {exc.strerror or exc}")
        return
    for name, is_dir, is_link in names:
        path = os.path.join(top, name)
        if is_dir or (is_link and follow_symlinks):
            try:
                st = os.stat(path)
            except OSError as exc:
                if is_image_path(name):
                    yield (path, _stat_reason(exc))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key not in visited:  # a link loop, or a second link to one folder
                    visited.add(key)
                    yield from _walk_dir(path, follow_symlinks, max_bytes, visited)
                continue
            if is_image_path(name):
                yield _classify(path, st, max_bytes)
        elif is_image_path(name):
            try:
                st = os.stat(path)  # a link's target: the bytes that would be read
            except OSError as exc:
                yield (path, _stat_reason(exc))
                continue
            yield _classify(path, st, max_bytes)


def _classify(path: str, st: os.stat_result, max_bytes: int) -> FileEntry | Unreadable:
    """A ``FileEntry`` for a regular file within the limit, else (path, reason)."""
    if not stat.S_ISREG(st.st_mode):
        return (path, f"not a regular file ({_kind(st.st_mode)})")
    if st.st_size > max_bytes:
        return (path, _too_large(st.st_size, max_bytes))
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


def _stat_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc.errno == errno.ENOENT:
        if exc.filename is not None and os.path.islink(exc.filename):
            return "broken symbolic link"
        return "no such file or directory"
    if exc.errno == errno.EACCES:
        return "permission denied"
    return f"cannot stat: {exc.strerror or exc}"


def read_file(path: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ``ImageError`` otherwise.

    Opened without blocking (a FIFO swapped in since the walk opens at once),
    checked on the open descriptor, and read to at most ``max_bytes + 1``.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        known = exc.errno in (errno.ENOENT, errno.ELOOP, errno.EACCES)
        reason = _stat_reason(exc) if known else f"cannot open file: {exc.strerror or exc}"
        raise ImageError(path, reason) from None
    with os.fdopen(fd, "rb", buffering=0) as handle:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(path, f"not a regular file ({_kind(st.st_mode)})")
            if st.st_size > max_bytes:
                raise ImageError(path, _too_large(st.st_size, max_bytes))
            chunks, total = [], 0
            while chunk := handle.read(min(1 << 20, max_bytes + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise ImageError(path, _too_large(total, max_bytes) + " (it grew while read)")
        except OSError as exc:
            raise ImageError(path, f"cannot read file: {exc.strerror or exc}") from None
    return b"".join(chunks)


def table_files(
    url: str,
    table: str,
    column: str = "path",
    *,
    base_dir: str | Path | None = None,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    chunk: int = 1000,
) -> Iterator[FileEntry | Unreadable]:
    """Yield a ``FileEntry`` per path listed in ``table.column`` of a database.

    For archives whose figures are catalogued in a database (a literature
    index, a PACS export) rather than laid out in folders. Relative paths are
    taken relative to ``base_dir``. Rows are streamed, ``chunk`` at a time,
    in the table's path order. A table or column that does not exist raises
    ``InputError``; a path that is not a readable image file yields
    ``(path, reason)``.
    """
    import sqlalchemy as sa

    from .errors import DatabaseError
    from .store import safe_url

    try:
        engine = sa.create_engine(url)
    except (sa.exc.ArgumentError, ModuleNotFoundError) as exc:
        raise DatabaseError(f"not a usable database URL: {safe_url(url)} ({exc})") from None
    try:
        meta = sa.MetaData()
        try:
            source = sa.Table(table, meta, autoload_with=engine)
        except sa.exc.NoSuchTableError:
            raise InputError(f"no table {table!r} in {safe_url(url)}") from None
        if column not in source.c:
            raise InputError(
                f"table {table!r} has no column {column!r}; it has " + ", ".join(source.c.keys())
            )
        query = (
            sa.select(source.c[column])
            .where(source.c[column].is_not(None))
            .order_by(source.c[column])
            .execution_options(yield_per=chunk)
        )
        base = Path(base_dir).expanduser().absolute() if base_dir is not None else None
        with engine.connect() as conn:
            for (value,) in conn.execute(query):
                path = Path(str(value)).expanduser()
                if not path.is_absolute():
                    path = (base or Path.cwd()) / path
                path_str = str(path.absolute())
                try:
                    st = os.stat(path_str)
                except OSError as exc:
                    yield (path_str, _stat_reason(exc))
                    continue
                yield _classify(path_str, st, max_bytes)
    except sa.exc.DBAPIError as exc:
        raise DatabaseError(f"cannot read table {table!r} of {safe_url(url)}: {exc.orig}") from None
    finally:
        engine.dispose()
