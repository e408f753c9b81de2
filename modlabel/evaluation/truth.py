"""The truth: a ground_truth.jsonl, a CSV of path,label, or each image's folder."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import ModlabelError
from .localization import GroundTruth, read_records

# How many paths of the truth records without a row are listed.
EXAMPLES = 10
TruthKind = Literal["jsonl", "csv", "folders"]


# --------------------------------------------------------------------------
# The truth.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TruthRecord:
    """One image's truth: its class, and its boxes when the truth file has them."""

    class_name: str
    boxes: GroundTruth | None = None


@dataclass(frozen=True)
class Truth:
    """Ground truth keyed by the absolute path of each file (``file_key``).

    kind "folders" holds no records: an image's class is its parent folder's name.
    """

    source: str
    kind: TruthKind
    records: dict[str, TruthRecord] = field(default_factory=dict)

    @property
    def has_boxes(self) -> bool:
        return self.kind == "jsonl"

    def class_of(self, key: str) -> str | None:
        """The true class of the file ``key`` (``file_key``), None when unknown."""
        if self.kind == "folders":
            return os.path.basename(os.path.dirname(key)) or None
        record = self.records.get(key)
        return record.class_name if record is not None else None


def file_key(path: str | os.PathLike[str]) -> str:
    """How truth and stored rows are joined: the absolute, normalized path."""
    return os.path.abspath(os.fspath(path))


def load_truth(path: str | Path | None, *, from_folders: bool = False) -> Truth:
    """Read ground truth: a ``ground_truth.jsonl``, a CSV ``path,label``, or folder names.

    path: a ``.jsonl`` (records as ``modlabel synth`` writes them, paths relative
    to the file's folder) or a ``.csv`` with a header row naming the columns
    ``path`` and ``label`` (other columns ignored; paths absolute or relative to
    the CSV's folder). Another suffix is read as JSON lines when its first line
    starts with ``{``, else as CSV. from_folders=True: no file (``path`` None);
    an image's class is the name of its parent folder. Raises ModlabelError
    naming the file (and line) when the input is not usable.
    """
    if from_folders:
        if path is not None:
            raise ModlabelError(
                f"{path}: give either a truth file or from_folders (folder names), not both"
            )
        return Truth(source="the name of each image's parent folder", kind="folders")
    if path is None:
        raise ModlabelError(
            "no ground truth: give a ground_truth.jsonl or a CSV with columns path,label, "
            "or take the classes from the folder names"
        )
    path = Path(path)
    if not path.is_file():
        raise ModlabelError(f"{path}: no such truth file")
    try:
        if _is_jsonl(path):
            records = _jsonl_records(path)
            kind: TruthKind = "jsonl"
        else:
            records = _csv_records(path)
            kind = "csv"
    except UnicodeDecodeError:
        raise ModlabelError(f"{path}: not a text file (UTF-8)") from None
    except OSError as exc:
        raise ModlabelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not records:
        raise ModlabelError(f"{path}: holds no truth records")
    return Truth(source=str(path), kind=kind, records=records)


def _is_jsonl(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return True
    if suffix in (".csv", ".txt"):
        return False
    with path.open(encoding="utf-8-sig") as lines:
        for line in lines:
            if line.strip():
                return line.lstrip().startswith("{")
    return False


def _add(records: dict[str, TruthRecord], key: str, record: TruthRecord, where: str) -> None:
    known = records.get(key)
    if known is not None and known.class_name != record.class_name:
        raise ModlabelError(
            f"{where}: {key} is given twice, as {known.class_name!r} and {record.class_name!r}"
        )
    records[key] = record


def _jsonl_records(path: Path) -> dict[str, TruthRecord]:
    archive = path.parent
    records: dict[str, TruthRecord] = {}
    for gt in read_records(path):  # ModlabelError with the line number
        _add(records, file_key(archive / gt.path), TruthRecord(gt.class_name, gt), str(path))
    return records


def _csv_records(path: Path) -> dict[str, TruthRecord]:
    base = path.parent
    records: dict[str, TruthRecord] = {}
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        names = [h.strip().lower() for h in header or []]
        if "path" not in names or "label" not in names:
            found = ",".join(header or []) or "nothing"
            raise ModlabelError(
                f"{path}: a truth CSV needs a header row with the columns path,label "
                f"(found {found})"
            )
        at_path, at_label = names.index("path"), names.index("label")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(at_path, at_label):
                raise ModlabelError(f"{where}: expected the columns path,label, got {row}")
            file, label = row[at_path].strip(), row[at_label].strip()
            if not file or not label:
                raise ModlabelError(f"{where}: empty path or label")
            _add(records, file_key(base / file), TruthRecord(label), where)
    return records
