"""The report's files to take elsewhere: class ROIs (CSV, JSON), class maps (PNG, NPY) and
images.csv, each written whole or not at all."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image
from sqlalchemy.engine import Engine

from .. import (
    codec,
    geometry,
    overlay,
    rois,
    spreadsheet,
    store,
)
from ..errors import ModlabelError
from ..paths import display_path
from ..store.reviews import REVIEW_COLUMNS
from ..timestamps import iso_utc

# What --format can ask for, and what each writes.
FORMATS: dict[str, str] = {
    "html": "report.html",
    "rois": "class_rois.csv, class_rois.json",
    "maps": "class_maps/<class>.png, <class>.nobox.png, <class>.npy",
    "images": "images.csv",
}
ALL_FORMATS = frozenset(FORMATS)

ROI_COLUMNS = (
    "model",
    "backbone",
    "class",
    "file_stem",
    "averaged_over",
    "images",
    "min_confidence",
    "input_height",
    "input_width",
    "x0",
    "y0",
    "x1",
    "y1",
    "fx0",
    "fy0",
    "fx1",
    "fy1",
    "roi_share",
    "roi_fraction",
    "regions",
)
# Every field an output carries for an image (``infer.describe``), then the file's own.
IMAGE_COLUMNS = (
    "path",
    "label",
    "confidence",
    "runner_up",
    "runner_up_probability",
    "out_of_set",
    "ood_score",
    "roi_share",
    "dicom_modality",
    "dicom_body_part",
    "error",
    "error_kind",
    "missing_since",
)
# images.csv: those, then the image's review beside the model's label (store.reviews).
IMAGE_CSV_COLUMNS = (*IMAGE_COLUMNS, *REVIEW_COLUMNS)

# The text cells of images.csv, the only ones that may need defusing (``write_images_csv``).
IMAGE_TEXT_COLUMNS = (
    "path",
    "label",
    "runner_up",
    "dicom_modality",
    "dicom_body_part",
    "error",
    "error_kind",
    "label_reviewed",
    "label_final",
    "reviewed_by",
)
# The timestamps of images.csv, written as every output writes them (``timestamps.iso_utc``:
# ISO 8601 in UTC, to the millisecond, with a Z).
IMAGE_TIME_COLUMNS = ("missing_since", "reviewed_at")

# What a class average is taken over: the stored averages (labels of at least a
# confidence), or, with ground truth, the correctly classified images.
BY_CONFIDENCE, BY_GROUND_TRUTH = "confidence", "ground_truth"


def png_bytes(pixels: np.ndarray | Image.Image) -> bytes:
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # optimize=True: 3% smaller, 8 times slower
    return buf.getvalue()


_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def class_file_stems(class_names: Sequence[str]) -> dict[str, str]:
    """A file name stem per class: [A-Za-z0-9_.-] kept, every other character (and a
    leading dot) replaced by ``_``; a stem taken already by an earlier class gets
    ``-2``, ``-3``, ... Class names come from model metadata and may hold anything."""
    stems: dict[str, str] = {}
    taken: set[str] = set()
    for name in class_names:
        stem = _UNSAFE_FILE_CHARS.sub("_", name) or "_"
        if stem.startswith("."):
            stem = "_" + stem[1:]
        candidate, n = stem, 1
        while candidate.lower() in taken:  # case-insensitive file systems too
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate.lower())
        stems[name] = candidate
    return stems


# -- ROI and map files ----------------------------------------------------------------


def class_rois(
    averages: dict[str, store.ClassMap],
    input_hw: Sequence[int],
    min_confidence: float,
) -> dict[str, rois.ClassRoi]:
    """The ROI of each class average on its upsampling to the input size (``rois``)."""
    return {
        name: rois.class_roi(
            name,
            class_map.average,
            input_hw,
            image_count=class_map.image_count,
            min_confidence=min_confidence,
        )
        for name, class_map in averages.items()
    }


def roi_rows(
    model_row: store.ModelRow,
    class_rois_: dict[str, rois.ClassRoi],
    stems: dict[str, str],
    averaged_over: str,
) -> list[dict[str, Any]]:
    """One record per class (in the model's class order), with ROI_COLUMNS."""
    rows = []
    for name in model_row.class_names:
        roi = class_rois_.get(name)
        if roi is None:
            continue
        row = roi.as_row()
        row.update(
            model=model_row.identity,
            backbone=model_row.backbone,
            file_stem=stems[name],
            averaged_over=averaged_over,
            roi_fraction=roi.fraction,
        )
        if averaged_over == BY_GROUND_TRUTH:
            row["min_confidence"] = None  # correctly classified, whatever the confidence
        rows.append({key: row[key] for key in ROI_COLUMNS})
    return rows


def write_atomic(path: Path, write: Callable[[IO[Any]], None], *, binary: bool = False) -> Path:
    """Write ``path`` through a temporary file beside it, so that a file that is there is
    whole; an OSError becomes a ModlabelError naming the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if binary:
            with tmp.open("wb") as f:
                write(f)
        else:
            with tmp.open("w", encoding="utf-8", newline="") as f:
                write(f)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ModlabelError(f"{path}: cannot write the report: {exc.strerror or exc}") from None
    return path


def write_png(path: Path, pixels: np.ndarray) -> Path:
    data = png_bytes(pixels)
    return write_atomic(path, lambda f: f.write(data), binary=True)


def write_npy(path: Path, array: np.ndarray) -> Path:
    return write_atomic(path, lambda f: np.save(f, array, allow_pickle=False), binary=True)


def write_roi_files(out_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """class_rois.csv (regions as a JSON list in one column) and class_rois.json (a list)."""

    def write_csv(f: IO[str]) -> None:
        writer = spreadsheet.writer(f)
        writer.writerow(ROI_COLUMNS)
        for row in rows:
            writer.writerow([json.dumps(row[k]) if k == "regions" else row[k] for k in ROI_COLUMNS])

    def write_json(f: IO[str]) -> None:
        json.dump(rows, f, indent=2)
        f.write("\n")

    return [
        write_atomic(out_dir / "class_rois.csv", write_csv),
        write_atomic(out_dir / "class_rois.json", write_json),
    ]


def write_class_map_files(
    out_dir: Path,
    averages: dict[str, store.ClassMap],
    class_rois_: dict[str, rois.ClassRoi],
    stems: dict[str, str],
) -> list[Path]:
    """class_maps/<stem>.png (input size, boxes), .nobox.png and .npy (feature-map grid)."""
    folder = out_dir / "class_maps"
    written = []
    for name, class_map in averages.items():
        roi = class_rois_[name]
        boxed = overlay.class_overlay(class_map.average, roi.input_hw, roi=roi)
        plain = overlay.heatmap_rgb(roi.shown)
        average = np.ascontiguousarray(class_map.average, dtype=np.float32)
        stem = stems[name]
        written += [
            write_png(folder / f"{stem}.png", boxed),
            write_png(folder / f"{stem}.nobox.png", plain),
            write_npy(folder / f"{stem}.npy", average),
        ]
    return written


# -- images.csv -----------------------------------------------------------------------


def image_roi_shares(blobs: Sequence[bytes | None], input_hw: Sequence[int]) -> list[float | None]:
    """Each stored CRM's ROI share: the fraction of the image where the map, upsampled to
    the input size (as shown), is above 20% of its own maximum (Table 3's ratio,
    ``geometry.roi_mask``). None for a row without a map (an error) or an unreadable one."""
    decoded: list[np.ndarray | None] = []
    for blob in blobs:
        try:
            decoded.append(codec.decode_map(blob) if blob is not None else None)
        except codec.MapCodecError:
            decoded.append(None)
    # One map at a time, as the scan computes it for the rows it writes.
    return [geometry.roi_share(m, input_hw) if m is not None else None for m in decoded]


def write_images_csv(
    engine: Engine, model_row: store.ModelRow, path: Path, *, chunk: int = 10_000
) -> int:
    """images.csv: one row per image of the model (IMAGE_COLUMNS: every field an output
    carries for an image; then its review, IMAGE_CSV_COLUMNS), in path order, streamed
    ``chunk`` rows at a time from the database; returns the number of rows. Missing and
    failed files are rows too.

    The ROI share is the one the scan stored, and only the maps of rows labeled before it
    was stored are read, to compute theirs: decoding every map again made this file cost
    minutes on an archive of a million images. The file is the one ``spreadsheet.writer``
    makes of the rows, written a chunk's columns at a time (``store.iter_image_columns``):
    each column is converted as a whole, and only when it holds something to convert (a
    timestamp, a path with a control character, text that may start a formula), so that
    what a row costs is the driver's and the csv module's work (docs/scale.md)."""
    written = 0
    input_hw = tuple(model_row.input_size)
    at = {name: i for i, name in enumerate(IMAGE_CSV_COLUMNS)}
    share_at, path_at = at["roi_share"], at["path"]
    time_at = [at[name] for name in IMAGE_TIME_COLUMNS]
    text_at = [at[name] for name in IMAGE_TEXT_COLUMNS]

    def write(f: IO[str]) -> None:
        nonlocal written
        writer = csv.writer(f)
        writer.writerow(IMAGE_CSV_COLUMNS)
        chunks = store.iter_image_columns(
            engine, model_row.id, IMAGE_COLUMNS, chunk=chunk, reviewed=True
        )
        with contextlib.closing(chunks):
            for *values, legacy_crms in chunks:
                if legacy_crms.count(None) < len(legacy_crms):
                    values[share_at] = _with_computed_shares(
                        values[share_at], legacy_crms, input_hw
                    )
                values[path_at] = _displayed_paths(values[path_at])
                for i in time_at:
                    if values[i].count(None) < len(values[i]):
                        values[i] = [None if t is None else iso_utc(t) for t in values[i]]
                for i in text_at:
                    values[i] = spreadsheet.defuse_column(values[i])
                writer.writerows(zip(*values, strict=True))
                written += len(legacy_crms)

    write_atomic(path, write)
    return written


def _with_computed_shares(
    shares: Sequence[float | None], legacy_crms: Sequence[bytes | None], input_hw: Sequence[int]
) -> list[float | None]:
    """``shares`` with the ROI share of each stored map of ``legacy_crms`` (the rows
    labeled before the scan stored the share) put in its row's place."""
    rows = [i for i, blob in enumerate(legacy_crms) if blob is not None]
    out = list(shares)
    computed = image_roi_shares([legacy_crms[i] for i in rows], input_hw)
    for i, share in zip(rows, computed, strict=True):
        out[i] = share
    return out


def _displayed_paths(stored: Sequence[str]) -> Sequence[str]:
    """``display_path`` of each stored path: ``stored`` itself when none holds a control
    character, found by one pass over the chunk's paths joined (``display_path`` escapes
    character by character, and ``/`` is none it escapes), not a call per path."""
    joined = "/".join(stored)
    if display_path(joined) == joined:
        return stored
    return [display_path(p) for p in stored]
