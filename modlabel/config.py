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
    """--db, else $MODLABEL_DB, else ./modlabel.db, as a SQLAlchemy URL.

    A bare path means a SQLite file; ``postgresql://`` uses psycopg 3; a libpq
    connection string (``host=db dbname=archive user=modlabel``) is taken as the
    PostgreSQL URL it means, never as a file name. Raises ``UsageError`` (exit 2)
    for a value that is none of these (a URL that does not parse, a port that is no
    number). Every password it holds is remembered for masking (``redaction``).
    """
    from . import redaction

    value = (flag or os.environ.get(DB_ENV) or DEFAULT_DB_FILE).strip()
    if "://" not in value:
        if _looks_like_libpq(value):
            value = _libpq_to_url(value)
        else:
            return sqlite_url(value)
    elif value.startswith("postgresql://") or value.startswith("postgres://"):
        # Use psycopg 3, the driver modlabel depends on, rather than psycopg2.
        value = "postgresql+psycopg://" + value.split("://", 1)[1]
    _check_url(value)
    redaction.remember_url(value)
    return value


def _looks_like_libpq(value: str) -> bool:
    """A libpq connection string: ``key=value`` words that libpq itself parses (any of its
    keywords, quotes and escapes as it reads them) and that name a server or a database. A
    file name rarely is that (``labels=v2.db`` is no keyword, so it stays a file)."""
    if "=" not in value:
        return False
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(value)
    except Exception:  # noqa: BLE001 - not libpq's: a file name
        return False
    return bool({"host", "hostaddr", "dbname", "user", "service", "port"} & set(params))


def _libpq_to_url(value: str) -> str:
    """A libpq connection string as the SQLAlchemy URL of the same connection."""
    import sqlalchemy as sa

    from .errors import UsageError

    try:
        from psycopg.conninfo import conninfo_to_dict

        params = {k: str(v) for k, v in conninfo_to_dict(value).items()}
    except Exception as exc:  # noqa: BLE001 - psycopg's parse error names the problem
        from . import redaction

        raise UsageError(
            f"--db: not a valid libpq connection string: {redaction.redact(str(exc))}"
        ) from None
    port = params.pop("port", None)
    if port is not None and not port.isdigit():
        raise UsageError(f"--db: the port {port!r} is not a number")
    url = sa.engine.URL.create(
        "postgresql+psycopg",
        username=params.pop("user", None),
        password=params.pop("password", None),
        host=params.pop("host", None),
        port=int(port) if port is not None else None,
        database=params.pop("dbname", None),
        query=params,
    )
    return url.render_as_string(hide_password=False)


def _check_url(value: str) -> None:
    import sqlalchemy as sa

    from . import redaction
    from .errors import UsageError

    try:
        sa.engine.make_url(value)
    except (sa.exc.ArgumentError, ValueError, TypeError) as exc:
        shown = redaction.redact(value)
        raise UsageError(
            f"--db: not a database URL: {shown} ({redaction.redact(str(exc))})"
        ) from None


def resolve_model_path(flag: Path | None) -> Path | None:
    """--model, else $MODLABEL_MODEL."""
    if flag is not None:
        return flag
    env = os.environ.get(MODEL_ENV)
    return Path(env) if env else None


# Decode worker processes (modlabel.decode_pool): how many (--decoders), the address space
# each may use (--decode-memory: a 100-megapixel RGB image decodes to 400 MB in PIL, and a
# worker starts at about 250 MB), and how long one file may take (--decode-timeout).
DEFAULT_DECODERS = 2
DEFAULT_DECODE_MEMORY = 2 * 1024**3
DEFAULT_DECODE_TIMEOUT = 60.0
# A scan marks the files gone under a root missing only when they are at most this share
# of the root's stored files (--max-missing), and in any case up to MISSING_FLOOR files;
# more looks like a share that did not mount, and marks none (exit 8; --allow-missing).
DEFAULT_MAX_MISSING_SHARE = 0.10
MISSING_FLOOR = 10
# prune deletes the rows of files missing for at least this long (--missing-for).
DEFAULT_PRUNE_GRACE_SECONDS = 7 * 24 * 3600.0
