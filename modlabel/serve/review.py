"""Review mode's routes (``modlabel serve --allow-review``): the review queue one image at
a time, and the two writes, a label and an undo. Without ``--allow-review`` none of these
routes exists and the server only reads.

The page shows the queue's next image (``modlabel.review.review_queue``, a strategy
chooser above it) with its CRM overlay, its probabilities and its similar images, as the
image page draws them, and the queue's next images. A class is picked with a button, or
with its key (1-9 in the model's class order, 0 for "none of the classes", u to undo the
last review of this session): ``static/review.js`` presses the button of the key, the
page's only script, loaded from this server (``script-src 'self'``; no inline script).

Writes are POSTs of a form (``application/x-www-form-urlencoded``, at most
``FORM_MAX_BYTES``), answered by a redirect to the review page (post/redirect/get), and
refused (403) unless both hold:

* same origin: the ``Origin`` header (or, where a browser sends none, the ``Referer``)
  names this server's own host, as the request's ``Host`` does; the review page sets
  ``Referrer-Policy: same-origin`` so that the browser sends them on its own POSTs;
* the session's token: the form field ``csrf`` (or the header ``X-CSRF-Token``) equals
  the token of the session that the cookie ``modlabel_review`` names (HttpOnly,
  SameSite=Strict), made when the review page was first shown (OWASP's synchronizer
  token pattern).

The review page and its redirects may not be framed (``frame-ancestors 'none'``).
"""

from __future__ import annotations

import hmac
import urllib.parse
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from .. import store
from ..paths import display_path
from ..review import parse_label, review_queue
from ..store.reviews import NONE_WORD, QUEUE_STRATEGIES, TYPICAL, UNCERTAINTY
from . import data
from .state import DISPLAY_PERCENT, ReviewDesk, ReviewSession, ServeState, render

SESSION_COOKIE = "modlabel_review"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
FORM_MAX_BYTES = 16 * 1024
QUEUE_SHOWN = 12  # the image under review and the next ones, as thumbnails
# The queues the page offers: every one but typical, whose k-means over the sample takes
# seconds (11 s measured on 10,000 images), and the page asks for its queue on every key
# pressed. `modlabel review --strategy typical` lists it; its images can be reviewed here
# by the CSV it writes (`review --from-csv`) or one by one on their image pages.
PAGE_STRATEGIES = tuple(s for s in QUEUE_STRATEGIES if s != TYPICAL)
KEYED_CLASSES = 9  # keys 1-9 pick the model's first nine classes

# The review page's own headers, over the server's (``app.SECURITY_HEADERS``): its one
# script from this server, the Origin and Referer of its own POSTs sent, never framed.
REVIEW_HEADERS = {
    "content-security-policy": "default-src 'none'; img-src 'self'; style-src 'self'; "
    "script-src 'self'; frame-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


def _state(request: Request) -> tuple[ServeState, ReviewDesk]:
    state: ServeState = request.app.state.serve
    assert state.review is not None  # the routes exist only in review mode
    return state, state.review


def _queue_choice(
    state: ServeState, params: Any, label_field: str = "label"
) -> tuple[str, str | None]:
    """The strategy and the class of the queue asked for (a bad one is a 400): the page's
    query ``strategy`` and ``label``, a form's ``strategy`` and ``queue_label``."""
    strategy = params.get("strategy") or UNCERTAINTY
    if strategy not in PAGE_STRATEGIES:
        raise HTTPException(400, f"strategy: one of {', '.join(PAGE_STRATEGIES)}")
    label = params.get(label_field) or None
    if label is not None and label not in state.model_row.class_names:
        raise HTTPException(400, f"label: a class of the model, not {label!r}")
    return strategy, label


def _page_url(state: ServeState, strategy: str, label: str | None) -> str:
    query = urllib.parse.urlencode({"strategy": strategy, **({"label": label} if label else {})})
    return f"{state.root_path}/review?{query}"


def _with_headers(response: Response, state: ServeState, session_id: str | None) -> Response:
    for key, value in REVIEW_HEADERS.items():
        response.headers[key] = value
    if session_id is not None:
        response.set_cookie(
            SESSION_COOKIE,
            session_id,
            httponly=True,
            samesite="strict",
            path=(state.root_path or "") + "/",
        )
    return response


def review_page(request: Request) -> Response:
    state, desk = _state(request)
    strategy, label = _queue_choice(state, request.query_params)
    cookie = request.cookies.get(SESSION_COOKIE)
    session_id, session = desk.session(cookie)
    notice, session.notice = session.notice, ""
    queue = review_queue(state.engine, state.model_row.id, strategy, label=label, n=QUEUE_SHOWN)
    current = queue[0] if queue else None
    row = data.image_row(state.engine, current.row_id) if current is not None else None
    view = data.image_view(state.engine, row, state.models()) if row is not None else None
    class_names = list(state.model_row.class_names)
    keys = [str(i + 1) if i < KEYED_CLASSES else "" for i in range(len(class_names))]
    response = render(
        request,
        "review.html",
        title="Review",
        strategies=PAGE_STRATEGIES,
        strategy=strategy,
        label=label,
        labels=class_names,
        choices=list(zip(keys, class_names, strict=True)),
        none_word=NONE_WORD,
        current=current,
        row=row,
        view=view,
        upcoming=queue[1:],
        csrf=session.csrf,
        session_count=len(session.recorded),
        total_count=store.count_reviews(state.engine),
        reviewer=desk.reviewer,
        notice=notice,
        display_percent=DISPLAY_PERCENT,
    )
    return _with_headers(response, state, session_id if session_id != cookie else None)


# -- the writes ---------------------------------------------------------------------------


def same_origin(request: Request) -> bool:
    """The request comes from a page of this server: its ``Origin`` (else its
    ``Referer``) has the host and port of its ``Host`` header. ``Origin: null`` (a
    sandboxed or privacy-stripped page) and a request naming neither are refused."""
    host = (request.headers.get("host") or "").lower()
    origin = request.headers.get("origin")
    if origin is None:
        origin = request.headers.get("referer")
    if not host or not origin or origin == "null":
        return False
    parts = urllib.parse.urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host


async def _form(request: Request) -> dict[str, str]:
    """The POSTed form's fields (the first value of each), read bounded."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise HTTPException(415, "a review is posted as a form (application/x-www-form-urlencoded)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_MAX_BYTES:
            raise HTTPException(413, "a review form is small; this one is not")
    try:
        fields = urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise HTTPException(400, "the form is not UTF-8") from None
    return {k: v[0] for k, v in fields.items()}


async def _checked(request: Request) -> tuple[ServeState, ReviewDesk, ReviewSession, dict]:
    """The state, desk, session and form of a POST that passed the CSRF checks."""
    state, desk = _state(request)
    if not same_origin(request):
        raise HTTPException(403, "refused: the request does not come from this server's pages")
    form = await _form(request)
    session = desk.known(request.cookies.get(SESSION_COOKIE))
    given = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    if session is None or not hmac.compare_digest(given.encode(), session.csrf.encode()):
        raise HTTPException(403, "refused: no review session or a wrong token (reload the page)")
    return state, desk, session, form


async def post_review(request: Request) -> Response:
    """Record the label a reviewer picked for the image under review; back to the queue."""
    state, desk, session, form = await _checked(request)
    strategy, label_filter = _queue_choice(state, form, "queue_label")
    try:
        row_id = int(form.get("row", ""))
    except ValueError:
        raise HTTPException(400, "row: the id of the image under review") from None
    label = parse_label(form.get("label", ""))
    if label == "":
        raise HTTPException(400, f"label: a class of the model, or {NONE_WORD}")
    row = await run_in_threadpool(data.image_row, state.engine, row_id)
    if row is None or row["model_id"] != state.model_row.id or row["sha256"] is None:
        raise HTTPException(404, f"no image #{row_id} of this model to review")
    key = store.ImageKey(row["path"], row["sha256"])
    await run_in_threadpool(
        desk.record, session, row_id, key, label, strategy=strategy, model_id=state.model_row.id
    )
    return _redirect(state, strategy, label_filter)


async def post_undo(request: Request) -> Response:
    """Take back this session's last review; back to the queue, with what happened."""
    state, desk, session, form = await _checked(request)
    strategy, label_filter = _queue_choice(state, form, "queue_label")
    undone, notice = await run_in_threadpool(desk.undo, session)
    if undone is not None:
        what = undone.label or "none of the classes"
        notice = f"undone: your review of {display_path(undone.path)} as {what}"
    session.notice = notice
    return _redirect(state, strategy, label_filter)


def _redirect(state: ServeState, strategy: str, label: str | None) -> Response:
    response = RedirectResponse(_page_url(state, strategy, label), status_code=303)
    return _with_headers(response, state, None)


def review_routes() -> list[Route]:
    """The routes of review mode, added only with ``--allow-review``."""
    return [
        Route("/review", review_page, name="review", methods=["GET"]),
        Route("/review", post_review, name="review_label", methods=["POST"]),
        Route("/review/undo", post_undo, name="review_undo", methods=["POST"]),
    ]
