"""Source: where the images of an archive come from.

``walk_files`` streams the image files under a set of roots in a stable
(sorted) order without ever listing a whole archive in memory: a directory's
entries are sorted one directory at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .decode import is_image_path


@dataclass(frozen=True)
class FileEntry:
    """One candidate image: absolute path and its stat."""

    path: str
    size_bytes: int
    mtime: float


def walk_files(
    roots: Iterable[str | Path], *, follow_symlinks: bool = False
) -> Iterator[FileEntry | tuple[str, str]]:
    """Yield a ``FileEntry`` per image file under ``roots`` (files or directories).

    A root or directory that cannot be read yields ``(path, reason)`` instead,
    so that the caller can record it and go on. Hidden files and directories
    (names starting with '.') are skipped; a root inside another root is
    walked once. A file's stat is its target's for a symbolic link (the
    bytes labeled are the target's); ``follow_symlinks`` decides only whether
    linked directories are descended into.
    """
    for root_path in _distinct_roots(roots):
        if root_path.is_file():
            entry = _entry(str(root_path), True)
            yield entry if entry is not None else (str(root_path), "cannot stat file")
        elif root_path.is_dir():
            yield from _walk_dir(str(root_path), follow_symlinks)
        else:
            yield (str(root_path), "no such file or directory")


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


def _walk_dir(top: str, follow_symlinks: bool) -> Iterator[FileEntry | tuple[str, str]]:
    try:
        with os.scandir(top) as it:
            names = sorted(
                (e.name, e.is_dir(follow_symlinks=follow_symlinks))
                for e in it
                if not e.name.startswith(".")
            )
    except OSError as exc:
        yield (top, f"cannot list directory: {exc.strerror or exc}")
        return
    for name, is_dir in names:
        path = os.path.join(top, name)
        if is_dir:
            yield from _walk_dir(path, follow_symlinks)
        elif is_image_path(name):
            entry = _entry(path, True)
            yield entry if entry is not None else (path, "cannot stat file (broken link?)")


def _entry(path: str, follow_symlinks: bool) -> FileEntry | None:
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except OSError:
        return None
    return FileEntry(path=path, size_bytes=st.st_size, mtime=st.st_mtime)


def table_files(
    url: str,
    table: str,
    column: str = "path",
    *,
    base_dir: str | Path | None = None,
    chunk: int = 1000,
) -> Iterator[FileEntry | tuple[str, str]]:
    """Yield a ``FileEntry`` per path listed in ``table.column`` of a database.

    For archives whose figures are catalogued in a database (a literature
    index, a PACS export) rather than laid out in folders. Relative paths are
    taken relative to ``base_dir``. Rows are streamed, ``chunk`` at a time,
    in the table's path order.
    """
    import sqlalchemy as sa

    from .errors import DatabaseError

    try:
        engine = sa.create_engine(url)
    except sa.exc.ArgumentError as exc:  # also a URL whose driver is not installed
        raise DatabaseError(f"not a usable database URL: {url!r} ({exc})") from None
    try:
        meta = sa.MetaData()
        try:
            source = sa.Table(table, meta, autoload_with=engine)
        except sa.exc.NoSuchTableError:
            raise DatabaseError(f"no table {table!r} in {engine.url!r}") from None
        if column not in source.c:
            raise DatabaseError(
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
                entry = _entry(path_str, True)
                yield entry if entry is not None else (path_str, "no such file")
    except sa.exc.DBAPIError as exc:
        raise DatabaseError(f"cannot read table {table!r} of {url!r}: {exc.orig}") from None
    finally:
        engine.dispose()
