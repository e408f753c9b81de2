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
from markupsafe import Markup, escape
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
# Threads of the pages (HTML) and of the pictures (and the similar images, and the upload
# search), and the read-only engine's connections: one a thread, kept open (a request
# never opens a connection, nor waits for one). Pages are CPU-bound under the GIL: two
# threads answer more of them than more would (measured: 352 pages a second with 2, 253
# with 4, 240 with 15; benchmarks/bench_serve.py); a picture mostly waits for its decode
# worker, so a grid's 48 thumbnails have threads of their own.
PAGE_THREADS = 2
PICTURE_THREADS = 4
MODELS_SECONDS = 10.0
# While the database holds no review, whether one came is asked again at most this often.
REVIEWS_SECONDS = 5.0


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
    picture_threads: Any = None  # anyio.CapacityLimiter of the pictures (pictures_limiter)
    _models: tuple[float, list[store.ModelRow]] | None = None
    _reviews_asked: float | None = None  # when has_reviews last said no; None: not yet
    _reviews_exist: bool = False

    def models(self) -> list[store.ModelRow]:
        """The database's models, read again at most every MODELS_SECONDS (a scan of a
        new model shows up; a page does not read the table each time)."""
        with self.lock:
            now = time.monotonic()
            if self._models is None or now - self._models[0] > MODELS_SECONDS:
                self._models = (now, store.list_models(self.engine))
            return self._models[1]

    def pictures_limiter(self) -> Any:
        """The pictures' threads (PICTURE_THREADS), made on first use in the event loop:
        in the app's lifespan, or by the first picture where the app runs without one
        (mounted inside another application)."""
        if self.picture_threads is None:
            import anyio

            self.picture_threads = anyio.CapacityLimiter(PICTURE_THREADS)
        return self.picture_threads

    def current_review(self, key: store.ImageKey) -> store.Review | None:
        """The image's current review, or None; while the database holds no review at all
        (``store.has_reviews``, asked at most every REVIEWS_SECONDS, and never again once
        it said yes), without a query. In review mode it is asked each time: a review
        just recorded shows on the next page."""
        now = time.monotonic()
        if not self._reviews_exist and (
            self.review is not None
            or self._reviews_asked is None
            or now - self._reviews_asked > REVIEWS_SECONDS
        ):
            self._reviews_exist = store.has_reviews(self.engine)
            self._reviews_asked = now
        if not self._reviews_exist:
            return None
        return store.current_reviews(self.engine, [key], any_known=True).get(key)


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
            try:
                store.undo_review(self.engine, last.key, reviewer=self.reviewer, review_id=last.id)
            except store.NotTheCurrentReview:
                return None, "the last review of this session is not the image's review any more"
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
        auto_reload=False,  # the templates are the installed package's: no stat a page
    )
    env.filters["display_path"] = display_path
    env.filters["utc"] = utc
    env.filters["pct"] = pct
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


def pct(value: float | None) -> str:
    """A probability as pages show it (``97.5%``; nothing for None)."""
    return "" if value is None else f"{float(value):.1%}"


def grid_tiles(rows: list[dict[str, Any]], root_path: str) -> Markup:
    """The class grid's tiles (``grid.html``): a page's 48 images, each a link to its page
    with its thumbnail, path and label. Written here, not in the template: it is the
    server's busiest markup, and Jinja's per-tile calls cost three times this (every
    value escaped all the same)."""
    out = []
    for r in rows:
        row_id = int(r["id"])
        link = escape(f"{root_path}/image/{row_id}")
        shown = escape(display_path(r["path"]))
        if r["error"] is not None:
            text = f'<span class="bad">{escape(r["error"])}</span>'
        else:
            flags = ' <b class="flag">out of set</b>' if r["out_of_set"] else ""
            if r["missing_since"] is not None:
                flags += ' <b class="flag">missing</b>'
            text = f"<span>{escape(r['label'])} {pct(r['confidence'])}{flags}</span>"
        out.append(
            f'  <li>\n    <a href="{link}" title="{shown}">\n'
            f'      <img src="{link}/thumb.png" alt="image #{row_id}" width="180" height="180"'
            f' loading="lazy">\n      <span class="path">{shown}</span>\n      {text}\n'
            "    </a>\n  </li>\n"
        )
    return Markup("".join(out))


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
