"""How a run of ``scan``, ``prune`` or ``report`` ended, as one JSON object for a machine.

``--json`` prints exactly one such object on stdout when the command ends, whatever
the outcome (finished, failed, interrupted), so that a cron wrapper or a monitoring
job reads a run's status without parsing sentences: ``status`` and ``exit_code``
say how it ended, ``counts`` what it did, ``error`` why it failed (the same one
line that goes to stderr). ``SCHEMA`` is the object's JSON Schema (draft 2020-12);
``schema_version`` in every object says which version of it the object follows,
and grows only with a change that an old reader would misread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import ExitCode
from .reasons import Kind
from .timestamps import iso_utc

SCHEMA_VERSION = 1
COMMANDS = ("scan", "prune", "report")
FINISHED, FAILED, INTERRUPTED = "finished", "failed", "interrupted"
# ExitCode names as a machine reads them: "no_input", "model", "database", ...
EXIT_REASONS = tuple(code.name.lower() for code in ExitCode)


def status_of(exit_code: int) -> str:
    """The status of a run that ended with ``exit_code``: 0 finished, 7 interrupted,
    anything else failed (the same words as ``scans.status``)."""
    if exit_code == ExitCode.OK:
        return FINISHED
    if exit_code == ExitCode.INTERRUPTED:
        return INTERRUPTED
    return FAILED


def exit_reason(exit_code: int) -> str | None:
    """The name of ``exit_code`` (``ExitCode``), lower case; None for a code it lacks."""
    try:
        return ExitCode(exit_code).name.lower()
    except ValueError:
        return None


@dataclass
class Outcome:
    """One run of a command as ``--json`` prints it.

    ``counts`` holds the command's own counts (``SCHEMA``'s ``$defs``); a run that
    failed early has the counts it reached (zeros for a scan that never began).
    ``seconds`` is the command's whole run (model loading and database opening
    included); ``images_per_second`` is the labeling rate of the scan itself, None
    when nothing was labeled."""

    command: str
    started_at: datetime
    db: str | None = None
    model: str | None = None
    scan_id: int | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    images_per_second: float | None = None
    outputs: list[str] | None = None
    dry_run: bool | None = None
    exit_code: int = ExitCode.OK
    error: str | None = None
    seconds: float = 0.0
    finished_at: datetime | None = None

    def end(self, exit_code: int, error: str | None, seconds: float) -> None:
        """Say how the run ended: its exit code, its one-line error (None when it
        finished) and how long it took."""
        self.exit_code = int(exit_code)
        self.error = error
        self.seconds = float(seconds)
        self.finished_at = datetime.now(timezone.utc)

    def to_dict(self) -> dict[str, Any]:
        finished = self.finished_at or datetime.now(timezone.utc)
        return {
            "schema_version": SCHEMA_VERSION,
            "command": self.command,
            "status": status_of(self.exit_code),
            "exit_code": self.exit_code,
            "exit_reason": exit_reason(self.exit_code),
            "error": self.error,
            "scan_id": self.scan_id,
            "db": self.db,
            "model": self.model,
            "counts": self.counts,
            "seconds": round(self.seconds, 3),
            "images_per_second": (
                round(self.images_per_second, 3) if self.images_per_second is not None else None
            ),
            "started_at": iso_utc(self.started_at),
            "finished_at": iso_utc(finished),
            "dry_run": self.dry_run,
            "outputs": self.outputs,
        }

    def to_json(self) -> str:
        """The object as one line of JSON (non-ASCII kept as it is)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)


def scan_counts(stats: Any) -> dict[str, Any]:
    """``counts`` of a scan from its ``ScanStats`` (what it did so far, if it failed)."""
    return {
        "seen": stats.seen,
        "labeled": stats.labeled,
        "unchanged": stats.unchanged,
        "errors": stats.errors,
        "errors_by_reason": dict(sorted(stats.errors_by_kind.items())),
        "skipped": stats.skipped,
        "missing": stats.missing,
        "returned": stats.returned,
        "kept": stats.kept,
        "out_of_set": stats.out_of_set,
    }


def labeling_rate(labeled: int, seconds: float) -> float | None:
    """Images labeled per second; None when none was (a rescan with nothing new is no
    "0.0 images/s" run)."""
    if labeled <= 0 or seconds <= 0:
        return None
    return labeled / seconds


_COUNT = {"type": "integer", "minimum": 0}


def _counts(properties: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


_SCAN_COUNTS = _counts(
    {
        "seen": {**_COUNT, "description": "files the scan looked at"},
        "labeled": {**_COUNT, "description": "images that went through the model"},
        "unchanged": {**_COUNT, "description": "files already labeled, not labeled again"},
        "errors": {**_COUNT, "description": "files stored with an error (images.error)"},
        "errors_by_reason": {
            "type": "object",
            "description": "errors by kind (images.error_kind, modlabel.reasons.Kind)",
            "propertyNames": {"enum": [kind.value for kind in Kind]},
            "additionalProperties": _COUNT,
        },
        "skipped": {**_COUNT, "description": "files passed over as not images"},
        "missing": {**_COUNT, "description": "stored files found gone, marked missing"},
        "returned": {**_COUNT, "description": "files marked missing before, found back"},
        "kept": {
            **_COUNT,
            "description": "files labeled before that could not be reached: labels kept",
        },
        "out_of_set": {**_COUNT, "description": "labeled images the model flags out of set"},
    },
    "what the scan did (what it committed, for a run that failed)",
)
_PRUNE_COUNTS = _counts(
    {
        "prunable": {**_COUNT, "description": "rows of files missing for --missing-for or more"},
        "pruned": {**_COUNT, "description": "rows deleted (0 with --dry-run)"},
        "rows": {**_COUNT, "description": "the model's rows before the prune"},
    },
    "what prune found and deleted",
)
_REPORT_COUNTS = _counts(
    {
        "images": {**_COUNT, "description": "labeled images of the model reported on"},
        "classes": {**_COUNT, "description": "classes the report shows"},
        "errors": {**_COUNT, "description": "files stored with an error"},
        "out_of_set": {
            **_COUNT,
            "description": "present images the model flags out of set (not in images)",
        },
    },
    "what the report covers",
)


def _schema() -> dict[str, Any]:
    nullable_string = {"type": ["string", "null"]}

    def when(command: str, counts: str, **more: Any) -> dict[str, Any]:
        return {
            "if": {"properties": {"command": {"const": command}}},
            "then": {"properties": {"counts": {"$ref": f"#/$defs/{counts}"}, **more}},
        }

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://modlabel.invalid/schema/outcome-v{SCHEMA_VERSION}.json",
        "title": "modlabel run outcome",
        "description": "What `modlabel scan|prune|report --json` prints on stdout: one object "
        "per run, whatever its outcome.",
        "type": "object",
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "command": {"enum": list(COMMANDS)},
            "status": {
                "enum": [FINISHED, FAILED, INTERRUPTED],
                "description": "finished (exit 0), interrupted (exit 7) or failed",
            },
            "exit_code": {"enum": [int(code) for code in ExitCode if code != ExitCode.USAGE]},
            "exit_reason": {"enum": [r for r in EXIT_REASONS if r != "usage"]},
            "error": {**nullable_string, "description": "the one-line reason; null if none"},
            "scan_id": {
                "type": ["integer", "null"],
                "description": "the run's scans row, where one was written",
            },
            "db": {**nullable_string, "description": "the database, its password masked"},
            "model": {**nullable_string, "description": "the model's identity, once known"},
            "counts": {"type": "object"},
            "seconds": {"type": "number", "minimum": 0, "description": "the whole run"},
            "images_per_second": {
                "type": ["number", "null"],
                "minimum": 0,
                "description": "labeled images per second of scanning; null if none",
            },
            "started_at": {"$ref": "#/$defs/utc"},
            "finished_at": {"$ref": "#/$defs/utc"},
            "dry_run": {"type": ["boolean", "null"], "description": "prune --dry-run"},
            "outputs": {
                "type": ["array", "null"],
                "items": {"type": "string"},
                "description": "report: the files written",
            },
        },
        "required": [
            "schema_version",
            "command",
            "status",
            "exit_code",
            "exit_reason",
            "error",
            "scan_id",
            "db",
            "model",
            "counts",
            "seconds",
            "images_per_second",
            "started_at",
            "finished_at",
            "dry_run",
            "outputs",
        ],
        "additionalProperties": False,
        "allOf": [
            {
                "if": {"properties": {"status": {"const": FINISHED}}},
                "then": {"properties": {"exit_code": {"const": 0}, "error": {"type": "null"}}},
                "else": {"properties": {"error": {"type": "string"}}},
            },
            when("scan", "scan_counts", outputs={"type": "null"}, dry_run={"type": "null"}),
            when(
                "prune",
                "prune_counts",
                scan_id={"type": "null"},
                outputs={"type": "null"},
                dry_run={"type": "boolean"},
                images_per_second={"type": "null"},
            ),
            when(
                "report",
                "report_counts",
                scan_id={"type": "null"},
                dry_run={"type": "null"},
                images_per_second={"type": "null"},
            ),
        ],
        "$defs": {
            "utc": {
                "type": "string",
                "format": "date-time",
                "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$",
                "description": "ISO 8601, UTC, with a Z",
            },
            "scan_counts": _SCAN_COUNTS,
            "prune_counts": _PRUNE_COUNTS,
            "report_counts": _REPORT_COUNTS,
        },
    }


SCHEMA: dict[str, Any] = _schema()


def no_counts(command: str) -> dict[str, Any]:
    """The counts of a run of ``command`` that did nothing yet (all zero)."""
    defs = {"scan": _SCAN_COUNTS, "prune": _PRUNE_COUNTS, "report": _REPORT_COUNTS}[command]
    return {name: ({} if name == "errors_by_reason" else 0) for name in defs["properties"]}
