"""Configuration has one home: flags, then environment variables, then these defaults."""

from __future__ import annotations

import os
from pathlib import Path

DB_ENV = "MODLABEL_DB"
MODEL_ENV = "MODLABEL_MODEL"
DEFAULT_DB_FILE = "modlabel.db"
# Images per inference batch. On the CPU a larger batch is not faster (onnxruntime's threads
# already share one image), but its memory grows with it: VGG16 at 300 px peaks near 0.7 GB
# at 8 and 1.8-3.6 GB at 32 (benchmarks/bench_session.py).
DEFAULT_BATCH_SIZE = 8
# Large images are converted to 8 bits in strips of about this many pixels, never whole as
# floats (modlabel.decode, modlabel.dicom): a few MB of scratch memory however large the image.
DECODE_STRIP_PIXELS = 1 << 18
# Labeled rows per database transaction of a scan (--commit-every); see scan.FLUSH_SECONDS.
DEFAULT_COMMIT_ROWS = 256
# How long a scan waits out an unreachable database (a restart, a failover), in seconds.
DEFAULT_DB_RETRY_SECONDS = 60.0
# An image counts in its class's average map (Eq. 8) when labeled with at least this
# confidence: without ground truth, the stand-in for "classified correctly".
DEFAULT_CLASS_MIN_CONFIDENCE = 0.9


def sqlite_url(path: str | Path) -> str:
    """The SQLAlchemy URL of a SQLite file."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def resolve_db_url(flag: str | None) -> str:
    """--db, else $MODLABEL_DB, else ./modlabel.db. A bare path means a SQLite file."""
    value = flag or os.environ.get(DB_ENV) or DEFAULT_DB_FILE
    if "://" not in value:
        return sqlite_url(value)
    if value.startswith("postgresql://") or value.startswith("postgres://"):
        # Use psycopg 3, the driver modlabel depends on, rather than psycopg2.
        value = "postgresql+psycopg://" + value.split("://", 1)[1]
    return value


def resolve_model_path(flag: Path | None) -> Path | None:
    """--model, else $MODLABEL_MODEL."""
    if flag is not None:
        return flag
    env = os.environ.get(MODEL_ENV)
    return Path(env) if env else None
