"""``create_app``: the read-only web UI over a modlabel database (Starlette, Jinja2).

Pages are rendered on the server, autoescaped, with no script at all, under a strict
Content-Security-Policy (``SECURITY_HEADERS``). The database is opened read-only
(``data.open_read_only``). Pictures are served by row id, from the path stored in that
row, decoded in the isolated decode workers (``pictures.Painter``); no request ever
names a file. With a token, every request needs it (``TokenGuard``).

Review mode (``allow_review``, ``modlabel serve --allow-review``) adds the review page and
its two POSTs (``review``), and a second engine, the only writable one, which may write
the ``reviews`` table and nothing else (``state.reviews_only``). Without it no review
route exists and nothing is written.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import store
from ..errors import ModelError, ModlabelError, UsageError
from ..model import OnnxModel
from . import data
from .pages import routes
from .pictures import Painter
from .review import review_routes
from .state import (
    HERE,
    PAGE_THREADS,
    PICTURE_THREADS,
    ReviewDesk,
    ServeState,
    render,
    reviews_only,
)

log = logging.getLogger("modlabel.serve")

# Where ``modlabel serve --workers N`` hands each worker process create_app's arguments.
CONFIG_ENV = "MODLABEL_SERVE_CONFIG"
TOKEN_COOKIE = "modlabel_token"
SECURITY_HEADERS = {
    # No script, no inline style, nothing from elsewhere; forms post back here only; only
    # this server's own pages frame its pages (the image page's similar images).
    "content-security-policy": "default-src 'none'; img-src 'self'; style-src 'self'; "
    "frame-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "SAMEORIGIN",
    "cross-origin-opener-policy": "same-origin",
}


def create_app(
    db_url: str,
    *,
    model_path: str | Path | None = None,
    token: str | None = None,
    root_path: str = "",
    allow_upload: bool = True,
    allow_review: bool = False,
    reviewer: str | None = None,
) -> Starlette:
    """The web UI of the database at ``db_url``, opened read-only.

    model_path: the ONNX file of the database's model, for CAM and Grad-CAM and for
    uploads (default: the model row's stored path, where that file exists). token: when
    given, every request must carry it (``Authorization: Bearer``, or a cookie set by
    visiting any page with ``?token=``). root_path: the prefix a reverse proxy serves
    the app under (``/modlabel``), for every link. allow_upload: offer the upload search.
    allow_review: review mode (the review page, writes to the ``reviews`` table only)
    with ``reviewer`` as the name its reviews are recorded under (required with it).
    """
    if allow_review and not (reviewer or "").strip():
        raise UsageError("review mode needs the reviewer's name (--reviewer)")
    root_path = _clean_root(root_path)
    engine = data.open_read_only(db_url, connections=PAGE_THREADS + PICTURE_THREADS)
    onnx, model_note = _load_model(engine, model_path)
    model_row = _model_row(engine, onnx)
    matches = onnx is not None and store.model_id_of(engine, onnx.sha256) == model_row.id
    if onnx is not None and not matches:
        model_note = f"{onnx.path} is not the model that labeled this database: the stored CRM only"
    state = ServeState(
        engine=engine,
        model_row=model_row,
        db_label=store.safe_url(db_url),
        painter=Painter(onnx),
        onnx=onnx,
        model_note=model_note,
        root_path=root_path,
        allow_upload=allow_upload,
        model_matches=matches,
    )
    if allow_review:
        assert reviewer is not None
        # Only here is a writable engine made: without review mode there is none.
        writer = reviews_only(store.open_db(db_url, create=False, migrate=False))
        state.review = ReviewDesk(writer, reviewer.strip())

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # No more threads at once than the engine's pool has connections: a request then
        # waits for a thread, never for a connection (whose wait would end in an error).
        # The review engine is used by one thread at a time (ReviewDesk's lock).
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = PAGE_THREADS
        state.pictures_limiter()
        try:
            yield
        finally:
            state.painter.close()
            if state.upload_pool is not None:
                state.upload_pool.close()
            if state.review is not None:
                state.review.engine.dispose()
            engine.dispose()

    app = Starlette(
        routes=[
            *routes(),
            *(review_routes() if allow_review else []),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, ModlabelError: _modlabel_error},
    )
    app.state.serve = state
    app.add_middleware(SecurityHeaders)
    if token:
        app.add_middleware(TokenGuard, token=token)
    if root_path:
        app.add_middleware(RootPath, root_path=root_path)
    return app


def app_from_environment() -> Starlette:
    """``create_app`` with the arguments in ``$MODLABEL_SERVE_CONFIG`` (JSON): the app
    factory each uvicorn worker process calls under ``modlabel serve --workers N``."""
    return create_app(**json.loads(os.environ[CONFIG_ENV]))


def _clean_root(root_path: str) -> str:
    root = (root_path or "").strip()
    if not root or root == "/":
        return ""
    if not root.startswith("/") or any(ch in root for ch in "?#\\ \"'<>"):
        raise UsageError(f"--root-path: a URL path such as /modlabel, not {root_path!r}")
    return root.rstrip("/")


def _load_model(engine: Any, model_path: str | Path | None) -> tuple[OnnxModel | None, str]:
    """The model file (``model_path``, else the newest model row's stored path where that
    file exists), and a sentence for the image page. A ``model_path`` that cannot be
    loaded is an error (``ModelError``); a stored path that cannot is a sentence."""
    explicit = model_path is not None
    if model_path is None:
        rows = store.list_models(engine)
        stored = Path(rows[-1].path) if rows else None
        if stored is None or not stored.is_file():
            return None, "no model file (pass --model): the stored CRM only"
        model_path = stored
    try:
        model = OnnxModel(model_path, device="cpu")
    except ModelError as exc:
        if explicit:
            raise
        return None, f"the model file cannot be loaded ({exc}): the stored CRM only"
    return model, ""


def _model_row(engine: Any, onnx: OnnxModel | None) -> store.ModelRow:
    """The model shown: the one the model file labeled with, else the newest."""
    labeled_with = store.model_id_of(engine, onnx.sha256) if onnx is not None else None
    for row in store.list_models(engine):
        if row.id == labeled_with:
            return row
    return store.pick_model(engine)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if request.url.path.endswith(".png"):
        return Response(status_code=exc.status_code)
    return render(
        request,
        "error.html",
        exc.status_code,
        title=str(exc.status_code),
        message=exc.detail,
        code=exc.status_code,
    )


async def _modlabel_error(request: Request, exc: Exception) -> Response:
    code = 400 if isinstance(exc, UsageError) else 503
    return render(request, "error.html", code, title=str(code), message=str(exc), code=code)


# -- middleware -------------------------------------------------------------------------


class SecurityHeaders:
    """Every response carries ``SECURITY_HEADERS``, but for those it set itself (the
    review page's, ``review.REVIEW_HEADERS``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    # The review page sets its own (``review.REVIEW_HEADERS``); no other
                    # response sets any of these.
                    headers.setdefault(key, value)
            await send(message)

        await self.app(scope, receive, send_secured)


class TokenGuard:
    """Requests need the token: ``Authorization: Bearer TOKEN``, or the cookie that a
    visit with ``?token=TOKEN`` sets (the visit is redirected to the same page without
    it, so that the token leaves the address bar and the history)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode("utf-8")

    def _ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode("utf-8"), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header[:7].lower() == "bearer " else None
        if self._ok(bearer) or self._ok(request.cookies.get(TOKEN_COOKIE)):
            await self.app(scope, receive, send)
            return
        given = request.query_params.get("token")
        if self._ok(given):
            kept = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = scope.get("root_path", "") + request.url.path.removeprefix(
                scope.get("root_path", "")
            )
            if kept:
                target += "?" + urllib.parse.urlencode(kept)
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict", path="/")
            await response(scope, receive, send)
            return
        response = Response(
            "401: this modlabel server needs its token (open a page with ?token=..., or send "
            "Authorization: Bearer ...)\n",
            status_code=401,
            media_type="text/plain",
            headers={"www-authenticate": "Bearer"},
        )
        await response(scope, receive, send)


class RootPath:
    """Serve under a prefix (``--root-path``) whether or not the proxy strips it: the
    scope's ``root_path`` is set, which Starlette's routing takes off the path."""

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not scope.get("root_path"):
            scope = dict(scope)
            scope["root_path"] = self.root_path
            if not scope["path"].startswith(self.root_path):
                scope["path"] = self.root_path + scope["path"]
        await self.app(scope, receive, send)
