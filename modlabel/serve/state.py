"""What every page of ``modlabel serve`` shares: the server's state (``ServeState``, with
review mode's ``ReviewDesk``), the templates (``render``) and the stored class maps, below
the pages (``pages``, ``review``) and the application that routes to them (``app``)."""

from __future__ import annotations

import re
import secrets
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import HTMLResponse

from .. import __version__, codec, geometry, rois, store
from ..errors import DatabaseError
from ..model import OnnxModel
from ..paths import display_path
from ..timestamps import iso_utc
from .pictures import Painter, class_map_picture

HERE = Path(__file__).parent
UPLOAD_MAX_BYTES = 20 * 2**20  # an upload larger than this is refused (413)
UPLOAD_SIMILAR = 24
MODELS_SECONDS = 10.0


@dataclass
class ServeState:
    """What every request reads: the engine, the model shown, the optional model file."""

    engine: Any
    model_row: store.ModelRow
    db_label: str
    painter: Painter
    onnx: OnnxModel | None
    model_note: str  # why CAM and Grad-CAM are (not) offered
    root_path: str
    allow_upload: bool
    upload_pool: Any = None
    model_matches: bool = False  # the model file is the shown model's (its content hash)
    review: ReviewDesk | None = None  # review mode (serve --allow-review); None: read-only
    lock: threading.Lock = field(default_factory=threading.Lock)
    _models: tuple[float, list[store.ModelRow]] | None = None

    def models(self) -> list[store.ModelRow]:
        """The database's models, read again at most every MODELS_SECONDS (a scan of a
        new model shows up; a page does not read the table each time)."""
        with self.lock:
            now = time.monotonic()
            if self._models is None or now - self._models[0] > MODELS_SECONDS:
                self._models = (now, store.list_models(self.engine))
            return self._models[1]


# -- review mode ------------------------------------------------------------------------

# A review session (a browser's cookie) is forgotten after this many newer ones.
REVIEW_SESSIONS = 1000


@dataclass
class ReviewSession:
    """One browser's review session: its CSRF token (every POST carries it in a form
    field) and the reviews it recorded, in order (what ``u`` undoes, what it counts)."""

    csrf: str
    recorded: list[store.Review] = field(default_factory=list)
    notice: str = ""  # what the last write did, shown once by the next page


class ReviewDesk:
    """Review mode (``modlabel serve --allow-review``): the one writable engine of the
    server, which may write the ``reviews`` table and nothing else (``reviews_only``),
    the reviewer's name, and the sessions (at most REVIEW_SESSIONS, least recent
    forgotten first). Sessions live in this process: review mode serves one worker."""

    def __init__(self, engine: Any, reviewer: str) -> None:
        self.engine = engine
        self.reviewer = reviewer
        self._sessions: OrderedDict[str, ReviewSession] = OrderedDict()
        self._lock = threading.Lock()

    def session(self, session_id: str | None) -> tuple[str, ReviewSession]:
        """The session of ``session_id``, or a new one (id, session) where it is unknown."""
        with self._lock:
            found = self._sessions.get(session_id) if session_id else None
            if found is not None and session_id is not None:
                self._sessions.move_to_end(session_id)
                return session_id, found
            new_id = secrets.token_urlsafe(24)
            self._sessions[new_id] = found = ReviewSession(csrf=secrets.token_urlsafe(32))
            while len(self._sessions) > REVIEW_SESSIONS:
                self._sessions.popitem(last=False)
            return new_id, found

    def known(self, session_id: str | None) -> ReviewSession | None:
        """The session of ``session_id``; None where there is none (a POST then fails)."""
        with self._lock:
            return self._sessions.get(session_id) if session_id else None

    def record(
        self,
        session: ReviewSession,
        row_id: int,
        key: store.ImageKey,
        label: str | None,
        *,
        strategy: str,
        model_id: int,
    ) -> store.Review:
        """Record the reviewer's ``label`` of the image of row ``row_id`` (``key``); the
        same label of the image this session reviewed last is not recorded twice (a
        key pressed twice before the next page came)."""
        with self._lock:
            if session.recorded:
                last = session.recorded[-1]
                if last.key == key and last.label == label:
                    return last
            review = store.record_review(
                self.engine,
                row_id,
                label,
                reviewer=self.reviewer,
                strategy=strategy,
                model_id=model_id,
            )
            session.recorded.append(review)
            return review

    def undo(self, session: ReviewSession) -> tuple[store.Review | None, str]:
        """Take back the session's last review: (the review undone or None, a sentence).
        One that is no longer its image's review (another review came since, or it was
        undone elsewhere) is left as it is."""
        with self._lock:
            if not session.recorded:
                return None, "nothing to undo in this session"
            last = session.recorded.pop()
            current = store.current_review(self.engine, last.key)
            if current is None or current.id != last.id:
                return None, "the last review of this session is not the image's review any more"
            store.undo_review(self.engine, last.key, reviewer=self.reviewer)
            return last, "undone"


# What the writable engine of review mode may execute: reads, the transaction's own
# settings, and writes of the reviews table. Anything else is refused before it runs.
_REVIEW_STATEMENTS = re.compile(
    r"\s*(SELECT\b|BEGIN\b|PRAGMA busy_timeout\b|SET LOCAL statement_timeout\b"
    r"|INSERT INTO reviews\b|UPDATE reviews\b)",
    re.IGNORECASE,
)


def reviews_only(engine: Any) -> Any:
    """``engine``, made to refuse (``DatabaseError``) every statement but a read or a
    write of the ``reviews`` table: review mode writes human labels and nothing else."""

    def check(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not _REVIEW_STATEMENTS.match(statement):
            first = " ".join(statement.split()[:3])
            raise DatabaseError(f"review mode writes the reviews table only, not: {first} ...")

    sa.event.listen(engine, "before_cursor_execute", check)
    return engine


def usable_model(state: ServeState) -> OnnxModel | None:
    """The model file, where it is the shown model's (another model's maps and
    embeddings would not be this database's)."""
    return state.onnx if state.model_matches else None


# -- templates --------------------------------------------------------------------------


def _environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=StrictUndefined,
    )
    env.filters["display_path"] = display_path
    env.filters["utc"] = utc
    env.filters["pct"] = lambda v: "" if v is None else f"{float(v):.1%}"
    env.filters["q"] = lambda v: urllib.parse.quote(str(v), safe="")
    env.globals["version"] = __version__
    return env


_ENV = None


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page: ``templates/name`` with the shared context (links under the root path)."""
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    state: ServeState = request.app.state.serve
    root = state.root_path

    def href(path: str, params: dict[str, Any] | None = None) -> str:
        query = urllib.parse.urlencode(
            {k: v for k, v in (params or {}).items() if v not in (None, "")}
        )
        return root + path + (f"?{query}" if query else "")

    html = _ENV.get_template(name).render(
        href=href,
        db_label=state.db_label,
        model=state.model_row,
        allow_upload=state.allow_upload,
        review_mode=state.review is not None,
        **context,
    )
    return HTMLResponse(html, status_code=status_code)


def utc(moment: datetime | None) -> str:
    """A stored time as every output of modlabel shows it (ISO 8601 UTC, ``Z``)."""
    return "" if moment is None else iso_utc(moment)


# -- shared by the pages --------------------------------------------------------------


def class_maps_of(state: ServeState, only: str | None = None) -> tuple[dict[str, Any], str]:
    """Each class's stored average CRM and its ROI (``rois.ClassRoi``), or a sentence why
    there are none; never computed here (that reads every map). ``only``: that class's
    alone (a picture request decodes one map, not every class's)."""
    engine, model_row = state.engine, state.model_row
    threshold = store.model_class_min_confidence(engine, model_row.id)
    if threshold is None:
        return {}, "class averages are not built yet (modlabel db rebuild-class-maps)"
    out: dict[str, Any] = {}
    for row in store.load_class_maps(engine, model_row.id):
        if only is not None and row["class_name"] != only:
            continue
        try:
            average = codec.decode_map(row["crm"])
        except codec.MapCodecError:
            continue
        roi = rois.class_roi(
            row["class_name"],
            average,
            tuple(model_row.input_size),
            image_count=row["image_count"],
            min_confidence=threshold,
        )
        out[row["class_name"]] = (row["image_count"], average, roi)
    return out, ""


def class_map_png(state: ServeState, label: str) -> bytes | None:
    maps, _ = class_maps_of(state, only=label)
    if label not in maps:
        return None
    _, average, roi = maps[label]
    return class_map_picture(average, roi).png


ROI_PERCENT = round(geometry.CLASS_ROI_FRACTION * 100)
DISPLAY_PERCENT = round(geometry.DISPLAY_FRACTION * 100)
