"""Options that several commands share, and the checks that make a bad value a usage
error (exit 2) before anything runs."""

from __future__ import annotations

import getpass
import math
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperArgument, TyperOption

from .. import config
from ..errors import ExitCode

if TYPE_CHECKING:
    from .. import perturb


def _device(value: str) -> str:
    """--device checked where it is read: a wrong one is a usage error (exit 2)."""
    from ..model import DEVICES

    if value not in DEVICES:
        raise typer.BadParameter(f"{value!r} is none of {', '.join(DEVICES)}")
    return value


DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        callback=_device,
        help="auto (CUDA where a GPU and onnxruntime's CUDA provider are there), cpu or cuda. "
        "CUDA counts only when it really loads; otherwise one line says so and the CPU runs.",
    ),
]

# A stored model of the database, for the commands that read one model's rows.
ModelIdOption = Annotated[
    str | None,
    typer.Option("--model", help="Model identity (or prefix); default: the newest."),
]
DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        metavar="URL",
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
    Path | None,
    typer.Option("--model", metavar="PATH", help=f"ONNX model (default: ${config.MODEL_ENV})."),
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
    """A folder to write to: created if need be (``create``); a usage error when it, or a
    folder above it, is a file (else the first write says "File exists" or "Not a
    directory" about a path inside it), or when it cannot be made."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                what = f"{path} is a file" if part == path else f"{part}, above {path}, is a file"
                raise typer.BadParameter(f"must be a folder; {what}", param_hint=option)
            break
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot create {path}: {exc.strerror or exc}", param_hint=option
        ) from None
    return path


# The map methods by name, for help texts (the CLI starts without importing numpy, so
# without the registry; tests/test_methods.py checks that this names every method).
METHOD_NAMES_HELP = (
    "cam, gradcam, crm, crm_output, cam_squared, gradcampp, layercam, xgradcam, hirescam, "
    "eigencam, ablationcam, scorecam, rise"
)

MethodsOption = Annotated[
    str | None,
    typer.Option(
        "--methods",
        help=f"Map methods, comma-separated ({METHOD_NAMES_HELP}, or all; default: cam, "
        "gradcam, crm). scorecam and rise run the model again, once per channel or mask.",
        show_default=False,
    ),
]

RISE_MASKS_HELP_DEFAULT = 2000  # perturb.RISE_MASKS (tests/test_methods.py checks)

RiseMasksOption = Annotated[
    int | None,
    typer.Option(
        "--rise-masks",
        min=1,
        help=f"RISE's number of random masks, one forward pass each per image (default "
        f"{RISE_MASKS_HELP_DEFAULT}, as in the RISE authors' example).",
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


def perturbation(rise_masks: int | None) -> perturb.Options:
    """``--rise-masks`` as the forward-pass methods' options (``perturb.Options``)."""
    from .. import perturb

    if rise_masks is None:
        return perturb.Options()
    return perturb.Options(rise_masks=rise_masks)


# Exit codes, one line each, for help texts (``exit_codes_epilog``). ``ExitCode`` is the
# source of truth: a code added there without a line here fails ``exit_codes_epilog``.
EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "done (files that could not be labeled are rows with their error, not a failure)",
    ExitCode.ERROR: "any other error",
    ExitCode.USAGE: "bad command line",
    ExitCode.NO_INPUT: "a root or table does not exist",
    ExitCode.MODEL: "the model cannot be loaded",
    ExitCode.DATABASE: "the database cannot be reached, opened or written",
    ExitCode.LOCKED: "another scan of this model holds the database's lock",
    ExitCode.INTERRUPTED: "interrupted by a signal",
    ExitCode.VANISHED: "a root looks vanished (nothing was marked missing)",
    ExitCode.INTERNAL: "a bug in modlabel (MODLABEL_DEBUG=1 shows the traceback)",
}


def exit_codes_epilog() -> str:
    """Every ``ExitCode`` with its meaning, as a help epilog: made from the enum, so a code
    added there cannot be missing from ``scan -h``."""
    missing = [code.name for code in ExitCode if code not in EXIT_CODE_MEANINGS]
    if missing:
        raise RuntimeError(f"EXIT_CODE_MEANINGS lacks {', '.join(missing)}")
    return (
        "Exit codes: "
        + "; ".join(f"{int(code)} {EXIT_CODE_MEANINGS[code]}" for code in ExitCode)
        + "."
    )


# Placeholders in help (``--db URL``, ``--batch-size N``), by option name where the type
# alone does not say what the value is; the rest by type (``placeholder``).
PLACEHOLDERS_BY_OPTION = {
    "--db": "URL",
    "--table-db": "URL",
    "--decode-memory": "SIZE",
    "--max-file-size": "SIZE",
    "--decode-timeout": "SECONDS",
    "--db-retry": "SECONDS",
    "--missing-for": "AGE",
    "--max-missing": "N|SHARE",
    "--param": "KEY=VALUE",
    "--compare": "keras PATH",
}
PLACEHOLDERS_BY_TYPE: dict[Any, str] = {
    Path: "PATH",
    int: "N",
    float: "NUMBER",
    str: "TEXT",
}


def placeholder(param: TyperOption | TyperArgument) -> str | None:
    """What help shows for a parameter's value: ``PATH``, ``N``, ``NUMBER``, ``TEXT``,
    ``URL``, ``SIZE``, ``SECONDS``, ...; ``""`` for a flag, which takes none; ``None`` where
    nothing here says better than Typer (a choice, a date). Typer's own ``<list[Path]>``
    and ``<bool>`` name Python types, not what to type."""
    if isinstance(param, TyperOption) and (param.is_flag or param.count):
        return ""
    for name in param.opts:
        if name in PLACEHOLDERS_BY_OPTION:
            return PLACEHOLDERS_BY_OPTION[name]
    annotation = param.type_descriptor.annotation
    if typing.get_origin(annotation) in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        names = [PLACEHOLDERS_BY_TYPE.get(_bare(a)) for a in args]
        if None in names:
            return None
        if typing.get_origin(annotation) is list:
            return names[0]
        return " ".join(n for n in names if n)
    return PLACEHOLDERS_BY_TYPE.get(_bare(annotation))


def _bare(annotation: Any) -> Any:
    """``X`` of ``X | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def reviewer_name(flag: str | None) -> str:
    """Who records a review: --reviewer, else the session's user name (``review``, and
    ``serve --allow-review``)."""
    if flag is not None:
        return flag
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container)
        return "unknown"
