"""``scan``, the nightly job, and ``prune``, which deletes the rows of files gone for good."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import config, stopping
from ..errors import ExitCode, ModelError, ModlabelError, StopRequested
from ..outcome import Outcome, labeling_rate, no_counts, scan_counts
from .app import app
from .edge import as_modlabel_error, clean, click_exceptions, command, interactive, say
from .options import (
    DbOption,
    DeviceOption,
    ModelPathOption,
    db_url,
    exit_codes_epilog,
    model_path,
    seconds,
    size_bytes,
)
from .options import (
    decode_memory as decode_memory_bytes,
)

JsonOption = Annotated[
    bool,
    typer.Option(
        "--json",
        help="At the end, print one JSON object on stdout: how the run ended (status, "
        "exit code, the error) and what it did, whatever the outcome "
        "(schema: modlabel.outcome.SCHEMA).",
    ),
]


@contextlib.contextmanager
def printed_outcome(outcome: Outcome | None) -> Iterator[None]:
    """Around a run of a command with ``--json``: print ``outcome`` as one JSON object on
    stdout when the run ends, however it ends (exit 0, a failure's exit code, a stop),
    then let the ending go on to the edge, which prints the one-line error on stderr.

    A usage error (exit 2) prints no object: the run never began. ``outcome=None``
    (no ``--json``): nothing is printed."""
    if outcome is None:
        yield
        return
    clock = time.perf_counter()
    try:
        yield
    except click_exceptions.ClickException:
        raise
    except BaseException as exc:
        code, error = _ending(exc)
        if code == ExitCode.USAGE:  # an option's value that cannot be used (UsageError)
            raise
        outcome.end(code, error, time.perf_counter() - clock)
        typer.echo(outcome.to_json())
        raise
    outcome.end(ExitCode.OK, None, time.perf_counter() - clock)
    typer.echo(outcome.to_json())


def _ending(exc: BaseException) -> tuple[int, str | None]:
    """The exit code and the one line the edge gives ``exc`` (``edge.edge``)."""
    if isinstance(exc, typer.Exit):
        code = int(exc.exit_code)
        return code, None if code == ExitCode.OK else f"exit {code}"
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED, "interrupted (SIGINT)"
    if isinstance(exc, StopRequested):
        return ExitCode.INTERRUPTED, clean(str(exc))
    if isinstance(exc, Exception):
        if stopping.requested():  # what the stop cancelled, failing: a stop, as the edge says
            return ExitCode.INTERRUPTED, clean(stopping.reason())
        try:
            error = as_modlabel_error(exc)
        except BaseException:  # noqa: BLE001 - MODLABEL_DEBUG: the edge shows the traceback
            return ExitCode.INTERNAL, clean(f"internal error: {type(exc).__name__}: {exc}")
        return int(error.exit_code), clean(str(error))
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else ExitCode.ERROR
        return code, None if code == ExitCode.OK else f"exit {code}"
    return ExitCode.INTERNAL, clean(f"{type(exc).__name__}: {exc}")


SCAN_EXIT_CODES = exit_codes_epilog()  # every ExitCode, with its meaning


@command(app, interruptible=False, epilog=SCAN_EXIT_CODES)
def scan(
    paths: Annotated[list[Path] | None, typer.Argument(help="Files or folders to label.")] = None,
    model: ModelPathOption = None,
    db: DbOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = config.DEFAULT_BATCH_SIZE,
    commit_every: Annotated[
        int,
        typer.Option(
            "--commit-every",
            min=1,
            help="Labeled rows per database transaction (and at least every 2 s): larger writes "
            "faster, smaller keeps more of a killed scan.",
        ),
    ] = config.DEFAULT_COMMIT_ROWS,
    decoders: Annotated[
        int,
        typer.Option(
            "--decoders",
            "--workers",
            min=1,
            help="Decode worker processes: each file is read and decoded in one, isolated "
            "from the scan (--workers is the old name).",
        ),
    ] = config.DEFAULT_DECODERS,
    decode_memory: Annotated[
        str,
        typer.Option(
            "--decode-memory",
            help="Address space each decode worker may use (e.g. 2G); a file that needs more "
            "becomes a row with the reason.",
        ),
    ] = "2G",
    decode_timeout: Annotated[
        float,
        typer.Option(
            "--decode-timeout",
            help="Seconds one file may take to read and decode; a file that takes longer "
            "becomes a row with the reason.",
        ),
    ] = config.DEFAULT_DECODE_TIMEOUT,
    max_missing: Annotated[
        str,
        typer.Option(
            "--max-missing",
            help="The most files under a root that a scan marks missing: a share of the "
            "root's stored files (10%) or a count (500). A root that walks empty, or more "
            "gone than this (and more than 10 files), marks none and exits 8: a share that "
            "did not mount must not lose its labels.",
        ),
    ] = f"{config.DEFAULT_MAX_MISSING_SHARE:.0%}",
    allow_missing: Annotated[
        bool,
        typer.Option(
            "--allow-missing",
            help="Mark every file found gone missing, however many: a real mass deletion.",
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="Print nothing but errors: no progress bar, no summary (the default when "
            "not on a terminal).",
        ),
    ] = False,
    as_json: JsonOption = False,
    table: Annotated[
        str | None,
        typer.Option(
            "--table", help="Read the image paths from this database table instead of PATHS."
        ),
    ] = None,
    path_column: Annotated[
        str, typer.Option("--path-column", help="The --table column holding paths.")
    ] = "path",
    id_column: Annotated[
        str | None,
        typer.Option(
            "--id-column",
            help="The --table column of figure ids, stored with each label (images.source_id).",
        ),
    ] = None,
    blob_column: Annotated[
        str | None,
        typer.Option(
            "--blob-column",
            help="The --table column holding the image bytes themselves (needs --id-column).",
        ),
    ] = None,
    table_db: Annotated[
        str | None,
        typer.Option("--table-db", help="Database of --table (default: the --db database)."),
    ] = None,
    base_dir: Annotated[
        Path | None,
        typer.Option("--base-dir", help="Folder that relative paths of --table are relative to."),
    ] = None,
    retry_errors: Annotated[
        bool,
        typer.Option(
            "--retry-errors", help="Try files stored with an error again, even if unchanged."
        ),
    ] = False,
    follow_symlinks: Annotated[
        bool,
        typer.Option(
            "--follow-symlinks",
            help="Descend into linked folders (each folder is walked once, loops included).",
        ),
    ] = False,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include",
            help="Glob of file names that are images (repeatable; default: the image "
            "suffixes). A glob with '/' matches the whole path.",
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Glob of file names to pass over (repeatable)."),
    ] = None,
    class_min_confidence: Annotated[
        float,
        typer.Option(
            "--class-min-confidence",
            min=0,
            max=1,
            help="Confidence an image needs to count in its class's average map (Eq. 8).",
        ),
    ] = config.DEFAULT_CLASS_MIN_CONFIDENCE,
    abstain: Annotated[
        bool,
        typer.Option(
            "--abstain",
            help="Store no label (NULL) for images the model flags out of set; without it "
            "they keep their label, flagged in images.out_of_set.",
        ),
    ] = False,
    max_file_size: Annotated[
        str,
        typer.Option(
            "--max-file-size",
            help="Refuse larger files before reading them (a row with the reason): e.g. 256M, 2G.",
        ),
    ] = "256M",
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="If another scan of this model is running, wait for it (else exit 6)."
        ),
    ] = False,
    db_retry: Annotated[
        float,
        typer.Option(
            "--db-retry",
            min=0,
            help="Seconds to keep retrying when the database is unreachable (a restart, a "
            "failover) before giving up with exit code 5.",
        ),
    ] = config.DEFAULT_DB_RETRY_SECONDS,
    device: DeviceOption = "auto",
    engine_name: Annotated[
        str,
        typer.Option(
            "--engine",
            help="Where files are decoded and labeled: local (this process) or ray (a Ray "
            "cluster's actors, pip install 'modlabel[ray]'; the paths must be readable on "
            "every node). The database is written from here either way.",
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="--engine ray: the cluster (auto, host:port or ray://host:port; default: "
            "$RAY_ADDRESS, a cluster started here, else a new local one).",
        ),
    ] = None,
    actors: Annotated[
        int, typer.Option("--actors", min=1, help="--engine ray: actors, one model each.")
    ] = 2,
    gpus_per_actor: Annotated[
        float,
        typer.Option("--gpus-per-actor", min=0, help="--engine ray: GPUs per actor (0: CPU)."),
    ] = 0.0,
) -> None:
    """Label every new or changed image under PATHS and store labels and CRMs.

    Unchanged files (same size and mtime, or same content) are skipped, so a
    nightly cron job only pays for what is new. Every file is read and decoded in
    an isolated worker process: unreadable images, FIFOs, devices, files over
    --max-file-size and files that crash or exhaust their decoder become rows
    with an error; the scan goes on. One scan per model and database runs at a
    time. A root that looks vanished (an unmounted share) marks nothing missing.

    Example: modlabel scan /archive --model model.onnx --db sqlite:///labels.db

    Or, for figures catalogued in a table:
    modlabel scan --table figures --path-column file --base-dir /figures --model model.onnx
    """
    from .. import decode_pool
    from ..paths import display_fs_path, to_db
    from ..scan import DecodeOptions, ScanStats, scan_archive
    from ..source import ImageFilter, check_roots, table_files
    from ..store import open_db, safe_url, utcnow

    show = interactive() and not quiet
    path_to_model = model_path(model)
    if not paths and table is None:
        raise typer.BadParameter("give PATHS or --table", param_hint="PATHS")
    max_bytes = size_bytes(max_file_size, "--max-file-size")
    decoding = DecodeOptions(
        decoders=decoders,
        memory_bytes=decode_memory_bytes(decode_memory),
        timeout=seconds(decode_timeout, "--decode-timeout"),
    )
    guard = missing_guard(max_missing, allow_missing)
    if engine_name not in ("local", "ray"):
        raise typer.BadParameter(f"local or ray, not {engine_name!r}", param_hint="--engine")
    if engine_name == "ray" and blob_column is not None:
        raise typer.BadParameter("--engine ray reads files, not --blob-column figures")
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"auto, cpu or cuda, not {device!r}", param_hint="--device")
    url = db_url(db)
    source_url = db_url(table_db) if table_db else url
    roots = [str(p) for p in paths or []]
    if table is not None:
        roots = [f"table:{table}.{blob_column or path_column}"]
    stats = ScanStats()
    started = _Started(utcnow())
    outcome = None
    if as_json:
        outcome = Outcome("scan", started.at, db=safe_url(url), counts=scan_counts(stats))
    with printed_outcome(outcome):
        decode_pool.start_server()  # the decoders' imports overlap the model's loading
        try:
            if table is None:
                # Before the model and the database: a root that is not there (a share
                # that did not mount) is recorded without creating a database for it.
                check_roots(roots)
            run_pipeline = None
            if engine_name == "ray":
                from ..scan.ray import ray_pipeline

                run_pipeline = ray_pipeline(
                    address=address, actors=actors, gpus_per_actor=gpus_per_actor, device=device
                )
            onnx_model = load_model(path_to_model, device)
            started.model = onnx_model.identity
            stopping.check()
            with stopping.interruptible():
                started.engine = open_db(url, retry_seconds=db_retry)
            stopping.check()
            entries = None
            if table is not None:
                entries = table_files(
                    source_url,
                    table,
                    path_column,
                    id_column=id_column,
                    blob_column=blob_column,
                    base_dir=base_dir,
                    max_bytes=max_bytes,
                )
            bar = None
            if show:
                total = None
                if table is not None:
                    total = table_row_count(source_url, table, None if blob_column else path_column)
                bar = ScanProgressBar(stats, total)
            try:
                scan_archive(
                    roots,
                    onnx_model,
                    started.engine,
                    entries=entries,
                    retry_errors=retry_errors,
                    batch_size=batch_size,
                    decoding=decoding,
                    on_progress=bar.update if bar is not None else None,
                    follow_symlinks=follow_symlinks,
                    max_file_bytes=max_bytes,
                    image_filter=ImageFilter(tuple(include or ()), tuple(exclude or ())),
                    class_min_confidence=class_min_confidence,
                    abstain=abstain,
                    commit_rows=commit_every,
                    wait=wait,
                    db_retry=db_retry,
                    missing_guard=guard,
                    run_pipeline=run_pipeline,
                    stats=stats,
                )
            finally:
                if bar is not None:
                    bar.close()
        except BaseException as exc:
            if stats.scan_id is None:  # the scan's own row records its end, once it has one
                started.recorded = _record_unstarted(
                    exc, started, url, path_to_model, [to_db(r) for r in roots]
                )
            raise
        finally:
            if outcome is not None:
                _fill_scan_outcome(outcome, stats, started)
        for path, reason in stats.error_paths:
            say(f"{display_fs_path(path)}: {reason}")
        if stats.errors > len(stats.error_paths):
            more = stats.errors - len(stats.error_paths)
            say(f"... and {more} more errors (see images.error)")
        if show and not as_json:  # stdout is the JSON object's alone
            if stats.interrupted_before:
                typer.echo(
                    f"{stats.interrupted_before} earlier run(s) had died; marked interrupted"
                )
            typer.echo(scan_summary(stats))


def scan_summary(stats: Any) -> str:
    """The line a person reads after a scan; the rate only when something was labeled
    (a rescan with nothing new did not run at "0.0 images/s")."""

    rate = labeling_rate(stats.labeled, stats.seconds)
    return (
        f"scan #{stats.scan_id}: {stats.seen} files: {stats.labeled} labeled, "
        f"{stats.unchanged} unchanged, {stats.errors} errors, "
        + (f"{stats.kept} unreachable (labels kept), " if stats.kept else "")
        + f"{stats.skipped} skipped as not images, {stats.missing} found gone, "
        f"in {stats.seconds:.1f} s" + (f" ({rate:.1f} images/s)" if rate is not None else "")
    )


def _fill_scan_outcome(outcome: Any, stats: Any, started: _Started) -> None:

    outcome.counts = scan_counts(stats)
    outcome.scan_id = stats.scan_id if stats.scan_id is not None else started.recorded
    outcome.model = started.model
    outcome.images_per_second = labeling_rate(stats.labeled, stats.seconds)


class _Started:
    """How far a scan command got: when it began, its model and database, and the id of
    the ``scans`` row written for it if it ended before its scan began."""

    def __init__(self, at: Any) -> None:
        self.at = at
        self.model: str | None = None
        self.engine: Any = None
        self.recorded: int | None = None


class ScanProgressBar:
    """The bar a person sees on a terminal (stderr): files done (of the total, with an
    ETA, where the source knows it: a ``--table``), how many were labeled, the rate
    and the elapsed time. Off a terminal there is none."""

    REFRESH_SECONDS = 0.5  # the labeled count is re-rendered this often, not per file

    def __init__(self, stats: Any, total: int | None) -> None:
        from tqdm import tqdm

        self.stats = stats
        self.bar = tqdm(total=total, unit=" files", desc="scan", dynamic_ncols=True)
        self.shown = 0.0

    def update(self, n: int) -> None:
        now = time.monotonic()
        if now - self.shown >= self.REFRESH_SECONDS:
            self.shown = now
            self.bar.set_postfix_str(
                f"seen {self.stats.seen}, labeled {self.stats.labeled}", refresh=False
            )
        self.bar.update(n)

    def close(self) -> None:
        self.bar.set_postfix_str(
            f"seen {self.stats.seen}, labeled {self.stats.labeled}", refresh=False
        )
        self.bar.close()


def table_row_count(url: str, table: str, column: str | None) -> int | None:
    """How many figures a ``--table`` lists (its rows; with ``column``, those with a
    path in it), for the progress bar's total and ETA: one ``count(*)``; None when the
    table cannot be counted (the scan itself then says why)."""
    import sqlalchemy as sa

    from ..store import sqlite_file

    file = sqlite_file(url)
    if file is not None and not file.exists():
        return None  # connecting would create it
    try:
        engine = sa.create_engine(url)
    except Exception:  # noqa: BLE001 - a bar without a total
        return None
    try:
        source = sa.table(table, *([sa.column(column)] if column else []))
        query = sa.select(sa.func.count()).select_from(source)
        if column:
            query = query.where(source.c[column].is_not(None))
        with engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
    except Exception:  # noqa: BLE001 - a bar without a total
        return None
    finally:
        engine.dispose()


def missing_guard(text: str, allow: bool) -> Any:
    """``--max-missing`` (``10%`` or ``500``) and ``--allow-missing`` as a ``MissingGuard``."""
    from ..scan import MissingGuard

    value = text.strip()
    try:
        if value.endswith("%"):
            share = float(value[:-1]) / 100.0
            if not 0.0 <= share <= 1.0:
                raise ValueError
            return MissingGuard(share=share, allow=allow)
        count = int(value)
        if count < 0:
            raise ValueError
        return MissingGuard(share=None, count=count, allow=allow)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: a share such as 10% or a count such as 500", param_hint="--max-missing"
        ) from None


def load_model(path: Path, device: str) -> Any:
    """The ONNX model, loaded on a thread of its own so that a stop during the load ends
    the command at once (onnxruntime's session start cannot be interrupted)."""
    from ..model import OnnxModel

    box: dict[str, Any] = {}

    def load() -> None:
        try:
            box["model"] = OnnxModel(path, device=device)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = exc

    loader = threading.Thread(target=load, name="modlabel-model-load", daemon=True)
    loader.start()
    stopping.wait(lambda: not loader.is_alive())
    if "error" in box:
        raise box["error"]
    model = box["model"]
    if model.info.layer_wise_only:
        # Refused before anything is read: a nightly scan stores closed-form maps.
        raise ModelError(
            f"{path}: the model is layer-wise only (adopted with --layer: no pool-plus-dense "
            "head), so it cannot label a scan's maps; explain it with --layer"
        )
    return model


def _record_unstarted(
    exc: BaseException, started: _Started, url: str, model: Path, roots: list[str]
) -> int | None:
    """A run that ended before its scan began still leaves a ``scans`` row, where the
    database exists and is this modlabel's: a stop (interrupted); a root or table that
    does not exist, a model that cannot be loaded (failed). Returns the row's id.

    Not recorded: a scan refused the lock (the scan that holds it is the one running;
    its row says so) and a database that failed (there is nowhere to record). No
    database is created to hold the row: a SQLite file that does not exist stays absent.
    """
    from ..errors import (
        DatabaseError,
        Interrupted,
        LockedError,
        StopRequested,
        UsageError,
    )

    if isinstance(exc, KeyboardInterrupt):
        status, reason = "interrupted", "interrupted (SIGINT)"
    elif isinstance(exc, (Interrupted, StopRequested)):
        status, reason = "interrupted", str(exc)
    elif isinstance(exc, ModlabelError) and not isinstance(
        exc, (DatabaseError, LockedError, UsageError)
    ):
        status, reason = "failed", str(exc)
    else:
        return None
    try:
        import hashlib

        from .. import store

        engine = started.engine
        if engine is None:
            file = store.sqlite_file(url)
            if file is not None and not file.exists():
                return None  # no database to record in: none is created for it
            engine = store.open_db(url, migrate=False, create=False)
        try:
            digest = hashlib.sha256(model.read_bytes()).hexdigest()
            model_id = store.model_id_of(engine, digest)
        except OSError:
            model_id = None
        try:
            return store.record_run(
                engine, model_id, roots, status=status, reason=reason, started_at=started.at
            )
        finally:
            if engine is not started.engine:
                engine.dispose()
    except BaseException:  # noqa: BLE001 - the record is a courtesy; the exit says it all
        return None


@command(app, interruptible=False)
def prune(
    db: DbOption = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Model identity (or prefix); default: the newest."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the rows that would go; delete nothing.")
    ] = False,
    missing_for: Annotated[
        str,
        typer.Option(
            "--missing-for",
            help="Delete only the rows of files missing for at least this long: a grace "
            "period for a share that comes back (7d, 36h, 90m, 0 for all).",
        ),
    ] = "7d",
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Delete even a mass of rows (more than --max-missing of the model's rows).",
        ),
    ] = False,
    max_missing: Annotated[
        str,
        typer.Option(
            "--max-missing",
            help="The most rows prune deletes without --force: a share of the model's rows "
            "(10%) or a count (500); more needs --force.",
        ),
    ] = f"{config.DEFAULT_MAX_MISSING_SHARE:.0%}",
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="Print nothing but errors (no list, no count of what went)."
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete the rows of files that scans found gone (images.missing_since) at least
    --missing-for ago.

    Missing files already leave counts, class averages, the report and the
    named queries; prune removes their rows for good. It takes the scan lock,
    so it never runs beside a scan of the same model, and it refuses to delete
    a mass of rows (a share that did not mount) without --force.

    Example: modlabel prune --db labels.db --dry-run
    """
    from ..paths import display_path
    from ..scan.lock import acquire_scan_lock
    from ..store import (
        count_prunable,
        count_rows,
        iter_missing,
        open_db,
        pick_model,
        prune_missing,
        safe_url,
        utcnow,
    )

    grace = duration(missing_for, "--missing-for")
    guard = missing_guard(max_missing, force)
    url = db_url(db)
    outcome = None
    if as_json:
        outcome = Outcome(
            "prune", utcnow(), db=safe_url(url), counts=no_counts("prune"), dry_run=dry_run
        )
    talk = not quiet and not as_json  # stdout is the JSON object's alone
    with printed_outcome(outcome):
        with stopping.interruptible():
            engine = open_db(url, create=False, migrate=not dry_run)
            model_row = pick_model(engine, model)
            if outcome is not None:
                outcome.model = model_row.identity
            cutoff = utcnow() - grace
            count = count_prunable(engine, model_row.id, older_than=cutoff)
            total = count_rows(engine, model_row.id)
        if outcome is not None:
            outcome.counts.update(prunable=count, rows=total)
        refusal = guard.refusal(f"model {model_row.identity}", count, total, empty=False)
        if refusal is not None:
            refusal = (
                f"prune would delete {count} of the model's {total} rows, more than "
                "--max-missing allows (a share that did not mount?): nothing was deleted; "
                "--force deletes them"
            )
        if dry_run:
            if talk:
                with stopping.interruptible():
                    for path, since in iter_missing(engine, model_row.id, older_than=cutoff):
                        typer.echo(f"{display_path(path)}\tmissing since {since:%Y-%m-%d %H:%M}")
            if not quiet:
                note = f" ({refusal})" if refusal else ""
                say(
                    f"{count} rows of files missing for {missing_for} or more would be pruned{note}"
                )
            return
        if refusal is not None:
            raise ModlabelError(refusal)
        with stopping.interruptible():
            lock = acquire_scan_lock(engine, model_row.id)
            try:
                pruned = prune_missing(engine, model_row.id, older_than=cutoff)
            finally:
                lock.release()
        if outcome is not None:
            outcome.counts["pruned"] = pruned
        if talk:
            typer.echo(f"pruned {pruned} rows of missing files")


def duration(text: str, option: str) -> timedelta:
    """``7d``, ``36h``, ``90m``, ``30s`` or ``0``, as a usage error when it is none."""
    value = text.strip().lower()
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    try:
        if value in ("0", "0s"):
            return timedelta(0)
        number, unit = (value[:-1], value[-1]) if value[-1:] in units else (value, "s")
        amount = float(number) * units[unit]
        if not 0 <= amount < 1e10:
            raise ValueError
    except (ValueError, IndexError):
        raise typer.BadParameter(
            f"{text!r}: a duration such as 7d, 36h or 0", param_hint=option
        ) from None
    return timedelta(seconds=amount)
