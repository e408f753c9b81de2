"""Options that several commands share, and the checks that make a bad value a usage
error (exit 2) before anything runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from .. import config

DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        help="auto (CUDA where a GPU and onnxruntime's CUDA provider are there), cpu or cuda. "
        "CUDA counts only when it really loads; otherwise one line says so and the CPU runs.",
    ),
]

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help=f"SQLAlchemy URL, libpq connection string or SQLite file (default: "
        f"${config.DB_ENV}, else ./{config.DEFAULT_DB_FILE}).",
        show_default=False,
    ),
]

ClassConfidenceOption = Annotated[
    float | None,
    typer.Option(
        "--min-confidence",
        min=0,
        max=1,
        help="Confidence an image needs to count in its class's average map (default: the "
        f"threshold the scans keep the averages for, else {config.DEFAULT_CLASS_MIN_CONFIDENCE}).",
    ),
]

ModelPathOption = Annotated[
    Path | None, typer.Option("--model", help=f"ONNX model (default: ${config.MODEL_ENV}).")
]

VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Show TensorFlow's own start-up and device logs (hidden by default).",
    ),
]


def db_url(flag: str | None) -> str:
    """``--db`` as a SQLAlchemy URL (``config.resolve_db_url``); a value that is no database
    is a usage error."""
    return config.resolve_db_url(flag)


def model_path(flag: Path | None) -> Path:
    """``--model``, else ``$MODLABEL_MODEL``; a usage error when neither is given."""
    path = config.resolve_model_path(flag)
    if path is None:
        raise typer.BadParameter(f"pass --model or set ${config.MODEL_ENV}", param_hint="--model")
    return path


def size_bytes(text: str, option: str) -> int:
    """A size such as ``256M`` (``source.parse_size``), as a usage error when it is none."""
    from ..source import parse_size

    try:
        size = parse_size(text)
    except (ValueError, OverflowError) as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None
    return size


def seconds(value: float, option: str, *, most: float = 86400.0) -> float:
    """A positive number of seconds, at most ``most`` (a day), as a usage error otherwise."""
    if not math.isfinite(value) or value <= 0:
        raise typer.BadParameter(
            f"{value!r} is not a positive number of seconds", param_hint=option
        )
    if value > most:
        raise typer.BadParameter(f"{value:g} s is more than {most:g} s", param_hint=option)
    return value


# Below this, a decode worker cannot even start its decoders (the pool then says how much
# it needs); above it, the pool measures what the worker itself takes first.
LEAST_DECODE_MEMORY = 256 * 2**20


def decode_memory(text: str, option: str = "--decode-memory") -> int:
    """The address space of each decode worker: a size of at least 256M, or 0 (no limit)."""
    size = size_bytes(text, option)
    if 0 < size < LEAST_DECODE_MEMORY:
        raise typer.BadParameter(
            f"{text} is less than a decode worker needs (at least 256M; 0 for no limit)",
            param_hint=option,
        )
    return size


def output_dir(path: Path, option: str = "--out", *, create: bool = True) -> Path:
    """A folder to write to: created if need be (``create``); a usage error when it is a
    file, or cannot be made."""
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} exists and is not a folder", param_hint=option)
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot create {path}: {exc.strerror or exc}", param_hint=option
        ) from None
    return path


MethodsOption = Annotated[
    str | None,
    typer.Option(
        "--methods",
        help="Map methods, comma-separated (cam, gradcam, crm, crm_output, cam_squared, or "
        "all; default: cam, gradcam, crm).",
        show_default=False,
    ),
]


def methods(text: str | None) -> tuple[str, ...]:
    """``--methods`` as registered names (``maps.parse_methods``); a usage error otherwise."""
    from .. import maps

    try:
        return maps.parse_methods(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--methods") from None
