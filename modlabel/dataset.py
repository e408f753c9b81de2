"""Training data from the archive: a folder per class, as ``modlabel train`` reads it.

``write_dataset`` writes ``OUT/<class>/<file>`` for each image of a model whose final
label is a class (``label_final``: the review's where there is one, else the model's):

* the reviewed images, reviewed as one of the classes;
* unless ``reviewed_only``, also the unreviewed images the model labeled with at least
  ``min_confidence`` and did not flag out of set.

Images reviewed as none of the classes are left out (and counted): ``train`` would take
any folder for a class. Every class of the model has its folder, even an empty one, so
that the tree has exactly the model's classes (fine-tuning with ``train --resume-from``
asks for that). Files are symbolic links to the archive's files (absolute), or copies
(``copy``).

The archive's names are untrusted, and nothing is written outside ``OUT``: ``OUT`` must be
empty (or not exist); a class folder is the class name with every character but
``[A-Za-z0-9_.-]`` replaced (``report.files.class_file_stems``: the report's own file
names); a file is ``<name>-<12 hex of its SHA-256><suffix>``, the name likewise cleaned
(dots too, so the suffix stays the file's own), never starting with a dot (``train``
skips hidden files) or a dash, and ``-2``, ``-3``, ... added where a folder has the name
already. The same content is written once. ``OUT/dataset.csv`` lists every
file written: its class, its file, the archive path, where its label came from and the
model's confidence (``train`` reads folders only, and ignores it).

A file whose size or modification time is no longer the one the scan stored, or that is
gone, is left out: its label is that of other bytes.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import spreadsheet, store
from .errors import ModlabelError, UsageError
from .paths import display_path, from_db
from .report.files import class_file_stems
from .store.reviews import current_review_join

MANIFEST = "dataset.csv"
MANIFEST_COLUMNS = ("class", "file", "path", "label_from", "confidence", "sha256")
REVIEWED, MODEL = "review", "model"
# Why an image is left out, as the counts name it.
NONE_OF_THE_CLASSES = "reviewed as none of the classes"
GONE = "file gone or changed since the scan"
DUPLICATE = "same content as a file written already"
UNREADABLE = "cannot be linked or copied"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_SUFFIX_CHARS = re.compile(r"[^A-Za-z0-9]")
NAME_CHARS = 80  # of the archive's file name kept in the data set's
SUFFIX_CHARS = 12


@dataclass
class DatasetResult:
    """What ``write_dataset`` wrote: files per class (by class name) and from where their
    labels came, and how many images were left out and why."""

    out: Path
    folders: dict[str, str]  # class -> its folder's name
    written: dict[str, int]  # class -> files
    label_from: dict[str, int] = field(default_factory=dict)  # review / model -> files
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> images
    copied: bool = False

    @property
    def files(self) -> int:
        return sum(self.written.values())


def data_file_name(stored_path: str, sha256: str) -> str:
    """The data set's file name of an archive file: its name, cleaned, then 12 hex digits
    of its content hash, then its suffix, cleaned (see the module's docstring)."""
    base = os.path.basename(from_db(stored_path)) or "image"
    stem, suffix = os.path.splitext(base)
    if stem.startswith(".") and not suffix:  # ".hidden": a name, not a suffix
        stem, suffix = stem[1:], ""
    stem = _NAME_CHARS.sub("_", stem)[:NAME_CHARS].strip("_-") or "image"
    suffix = _SUFFIX_CHARS.sub("", suffix)[:SUFFIX_CHARS].lower()
    return f"{stem}-{sha256[:12]}" + (f".{suffix}" if suffix else "")


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``stem-2.suffix``, ``-3``, ... where a file of the folder has it already
    (compared without case: a case-insensitive file system would see one name)."""
    stem, dot, suffix = name.partition(".")
    candidate, n = name, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem}-{n}{dot}{suffix}"
    return candidate


def _check_empty(out: Path) -> None:
    if out.is_symlink():
        raise UsageError(f"{out} is a symbolic link; give a new folder for the data set")
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"{out} is a file; give a new folder for the data set")
        if any(out.iterdir()):
            raise UsageError(f"{out} is not empty; give a new (or empty) folder for the data set")


def _rows(model_id: int, reviewed_only: bool, min_confidence: float) -> sa.Select:
    """The model's present, labeled rows that may go in: reviewed, or (unless
    ``reviewed_only``) confidently labeled and not out of set; in path order."""
    c = store.images.c
    review, on = current_review_join(store.images)
    is_reviewed = review.c.reviewer.is_not(None)
    confident = sa.and_(
        c.label.is_not(None),
        c.out_of_set.is_not(True),
        c.confidence >= min_confidence,
    )
    return (
        sa.select(
            c.path,
            c.sha256,
            c.size_bytes,
            c.mtime,
            c.label,
            c.confidence,
            is_reviewed.label("reviewed"),
            review.c.label.label("reviewed_label"),
        )
        .select_from(store.images.outerjoin(review, on))
        .where(
            c.model_id == model_id,
            c.missing_since.is_(None),
            c.error.is_(None),
            c.sha256.is_not(None),
            is_reviewed if reviewed_only else sa.or_(is_reviewed, confident),
        )
        .order_by(c.path)
        .execution_options(yield_per=2000)
    )


def _unchanged(source: str, size: int, mtime: float) -> bool:
    try:
        st = os.stat(source)
    except OSError:
        return False
    return st.st_size == size and abs(st.st_mtime - mtime) < 1e-3


def write_dataset(
    engine: Engine,
    model_row: store.ModelRow,
    out: str | Path,
    *,
    reviewed_only: bool = False,
    copy: bool = False,
    min_confidence: float | None = None,
) -> DatasetResult:
    """Write the model's folder-per-class data set into ``out`` (see the module's
    docstring). ``min_confidence``: the least confidence of an unreviewed image (default:
    the model's class-average threshold, ``store.class_threshold``)."""
    out = Path(out)
    _check_empty(out)
    threshold = store.class_threshold(
        store.model_class_min_confidence(engine, model_row.id), min_confidence
    )
    names = list(model_row.class_names)
    folders = class_file_stems(names)
    result = DatasetResult(out, folders, {name: 0 for name in names}, copied=copy)
    left_out: Counter[str] = Counter()
    label_from: Counter[str] = Counter()
    seen: set[str] = set()
    taken: dict[str, set[str]] = {name: set() for name in names}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            (out / folders[name]).mkdir()
    except OSError as exc:
        raise ModlabelError(f"{out}: cannot create the data set: {exc.strerror or exc}") from None
    manifest: list[list[object]] = []
    with engine.connect() as conn:
        for row in conn.execute(_rows(model_row.id, reviewed_only, threshold)):
            label = row.reviewed_label if row.reviewed else row.label
            if label is None:
                left_out[NONE_OF_THE_CLASSES] += 1
                continue
            if label not in folders:
                continue  # a class of another model, reviewed on its row
            if row.sha256 in seen:
                left_out[DUPLICATE] += 1
                continue
            source = os.path.abspath(from_db(row.path))
            if not _unchanged(source, int(row.size_bytes), float(row.mtime)):
                left_out[GONE] += 1
                continue
            file_name = _unique(data_file_name(row.path, row.sha256), taken[label])
            target = out / folders[label] / file_name
            try:
                if copy:
                    shutil.copyfile(source, target)
                else:
                    os.symlink(source, target)
            except OSError:
                left_out[UNREADABLE] += 1
                continue
            seen.add(row.sha256)
            taken[label].add(file_name.lower())
            result.written[label] += 1
            origin = REVIEWED if row.reviewed else MODEL
            label_from[origin] += 1
            manifest.append(
                [label, f"{folders[label]}/{file_name}", display_path(row.path), origin,
                 row.confidence, row.sha256]
            )  # fmt: skip
    _write_manifest(out / MANIFEST, manifest)
    result.left_out = dict(left_out)
    result.label_from = dict(label_from)
    return result


def _write_manifest(path: Path, rows: list[list[object]]) -> None:
    try:
        with path.open("x", encoding="utf-8", newline="") as f:
            writer = spreadsheet.writer(f)
            writer.writerow(MANIFEST_COLUMNS)
            writer.writerows(rows)
    except OSError as exc:
        raise ModlabelError(f"{path}: cannot write the data set's list: {exc.strerror}") from None
