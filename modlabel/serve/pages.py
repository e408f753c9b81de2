"""The server's routes: classes, a class grid, an image, scans, search, and the pictures
they show. Handlers that read the database are plain functions (Starlette runs them in
its thread pool); the upload is read asynchronously, bounded, before anything parses it.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio.to_thread
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import maps, store
from ..errors import UsageError
from . import data
from .pictures import MODEL_METHODS, STORED_METHOD
from .state import (
    DISPLAY_PERCENT,
    HERE,
    ROI_PERCENT,
    UPLOAD_MAX_BYTES,
    UPLOAD_SIMILAR,
    ServeState,
    class_map_png,
    class_maps_of,
    grid_tiles,
    render,
    usable_model,
)

PNG_CACHE = "private, max-age=600"
METHOD_TITLES = {"none": "image"} | {name: maps.title(name) for name in MODEL_METHODS}


def _state(request: Request) -> ServeState:
    return request.app.state.serve


def _row_or_404(state: ServeState, row_id: int) -> dict:
    row = data.image_row(state.engine, row_id)
    if row is None or row["model_id"] not in {m.id for m in state.models()}:
        raise HTTPException(404, f"no image #{row_id} in this database")
    return row


def classes_page(request: Request) -> Response:
    state = _state(request)
    counts = data.class_counts(state.engine, state.model_row)
    maps, maps_note = class_maps_of(state)
    views = [
        {
            "name": c.name,
            "count": c.count,
            "out_of_set": c.out_of_set,
            "averaged": maps[c.name][0] if c.name in maps else 0,
            "roi": maps[c.name][2] if c.name in maps else None,
        }
        for c in counts
        if c.count or c.out_of_set or c.name in maps
    ]
    return render(
        request,
        "classes.html",
        title="Classes",
        classes=views,
        maps_note=maps_note,
        errors=store.count_errors(state.engine, state.model_row.id),
        missing=store.count_missing(state.engine, state.model_row.id),
        total=sum(c.count for c in counts),
        total_oos=sum(c.out_of_set for c in counts),
        roi_percent=ROI_PERCENT,
        threshold=store.model_class_min_confidence(state.engine, state.model_row.id),
    )


def grid_page(request: Request) -> Response:
    state = _state(request)
    query = data.GridQuery.from_params(request.query_params)
    labels = data.stored_labels(state.engine, state.model_row.id) if query.label is None else ()
    page = data.grid_page(state.engine, state.model_row.id, query, labels=labels)
    modalities = data.modalities(state.engine, state.model_row.id)
    next_params = query.params(after=page.next_after) if page.next_after is not None else None
    title = "Errors" if query.errors else (f"Class {query.label}" if query.label else "All classes")
    return render(
        request,
        "grid.html",
        title=title,
        page=page,
        tiles=grid_tiles(page.rows, state.root_path),
        query=query,
        first_params=query.params(after=None),
        next_params=next_params,
        modalities=modalities,
        labels=state.model_row.class_names,
        sorts=data.SORTS,
        choices=data.CHOICES,
    )


def image_page(request: Request) -> Response:
    state = _state(request)
    row_id = request.path_params["row_id"]
    row = _row_or_404(state, row_id)
    models = state.models()
    view = data.image_view(state.engine, row, models)
    model = usable_model(state) if row["model_id"] == state.model_row.id else None
    methods = [STORED_METHOD]
    if model is not None:
        methods += [m for m in MODEL_METHODS if m != STORED_METHOD]
    methods.append("none")
    method = request.query_params.get("map") or "crm"
    if method not in methods:
        raise UsageError(f"map: one of {', '.join(methods)}, not {method!r}")
    model_of_row = next((m for m in models if m.id == row["model_id"]), state.model_row)
    key = store.ImageKey(row["path"], row["sha256"]) if row["sha256"] else None
    review = state.current_review(key) if key is not None else None
    return render(
        request,
        "image.html",
        review=review,
        title=f"Image #{row_id}",
        row=row,
        view=view,
        method=method,
        methods=methods,
        titles=METHOD_TITLES,
        model_note=state.model_note if model is None else "",
        no_model_methods=model is None,
        row_model=model_of_row,
        display_percent=DISPLAY_PERCENT,
    )


def similar_fragment(request: Request) -> Response:
    """The image page's 12 most similar images, a page of its own that the image page
    frames: an exact search can take seconds on a large SQLite archive, and the page
    itself must not wait for it. Searches run one at a time (``data.similar_cached``), so
    that they never starve the other pages of the CPU."""
    state = _state(request)
    row_id = request.path_params["row_id"]
    row = _row_or_404(state, row_id)
    similar = data.similar_cached(state.engine, row["model_id"], row_id)
    return render(request, "similar.html", title=f"Similar to #{row_id}", similar=similar)


def scans_page(request: Request) -> Response:
    state = _state(request)
    model_id = state.model_row.id
    runs = store.list_scans(state.engine, model_id, limit=30)
    return render(
        request,
        "scans.html",
        title="Scans",
        runs=runs,
        health=data.nightly_health(runs),
        groups=store.error_groups(state.engine, model_id, reasons=30, examples=3),
        errors=store.count_errors(state.engine, model_id),
        missing=store.count_missing(state.engine, model_id),
        out_of_set=store.count_out_of_set(state.engine, model_id),
    )


def search_page(request: Request) -> Response:
    state = _state(request)
    text = request.query_params.get("q", "")
    rows = data.search_paths(state.engine, state.model_row.id, text) if text else []
    return render(
        request,
        "search.html",
        title="Search",
        q=text,
        rows=rows,
        searched=bool(text),
        shown=data.SEARCH_SHOWN,
        upload=None,
        upload_max_mb=UPLOAD_MAX_BYTES // 2**20,
        upload_note=_upload_note(state),
    )


def _upload_note(state: ServeState) -> str:
    if not state.allow_upload:
        return "uploads are turned off on this server"
    if usable_model(state) is None:
        return "a search by image needs the model file (modlabel serve --model PATH)"
    return ""


async def upload_search(request: Request) -> Response:
    """Find the stored images nearest to an uploaded one: its bytes (at most
    UPLOAD_MAX_BYTES, refused with 413 beyond, before parsing) are decoded by the scan's
    isolated decoder, run through the model, and compared; nothing is stored."""
    state = _state(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > UPLOAD_MAX_BYTES + 65536:
        raise HTTPException(413, f"an upload is at most {UPLOAD_MAX_BYTES // 2**20} MB")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > UPLOAD_MAX_BYTES + 65536:  # the multipart envelope's allowance
            raise HTTPException(413, f"an upload is at most {UPLOAD_MAX_BYTES // 2**20} MB")
    note = _upload_note(state)
    if note:
        raise HTTPException(400, note)

    async def once():
        yield bytes(body)

    form = await MultiPartParser(
        request.headers, once(), max_files=1, max_fields=4, max_part_size=UPLOAD_MAX_BYTES
    ).parse()
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise HTTPException(400, "choose an image file to upload")
    content = await upload.read()
    if len(content) > UPLOAD_MAX_BYTES:
        raise HTTPException(413, f"an upload is at most {UPLOAD_MAX_BYTES // 2**20} MB")
    result = await anyio.to_thread.run_sync(
        _search_by_image, state, content, upload.filename or "", limiter=state.pictures_limiter()
    )
    return render(
        request,
        "search.html",
        title="Search",
        q="",
        rows=[],
        searched=False,
        shown=data.SEARCH_SHOWN,
        upload=result,
        upload_max_mb=UPLOAD_MAX_BYTES // 2**20,
        upload_note="",
    )


def _search_by_image(state: ServeState, content: bytes, filename: str) -> dict:
    from ..decode_pool import DecodeRequest, image_pool
    from ..errors import ImageError, InputError
    from ..similar import label_one

    model = usable_model(state)
    assert model is not None
    with state.lock:
        if state.upload_pool is None:  # kept for the server's life: no start-up per upload
            state.upload_pool = image_pool(model.info.input_size, max_bytes=UPLOAD_MAX_BYTES)
        pool = state.upload_pool
    try:
        labels = label_one(model, pool, DecodeRequest(filename or "upload", data=content))
    except (ImageError, InputError) as exc:
        return {"error": str(exc), "name": filename}
    image = labels[0]
    similar = data.similar_to_vector(
        state.engine, state.model_row.id, labels.embedding[0], UPLOAD_SIMILAR
    )
    return {"error": None, "name": filename, "label": image, "similar": similar}


# -- pictures ---------------------------------------------------------------------------


def _png(picture, *, cache: str = PNG_CACHE) -> Response:
    headers = {"cache-control": cache}
    if picture.note:
        headers["x-modlabel-note"] = picture.note.encode("ascii", "replace").decode()[:200]
        headers["cache-control"] = "no-store"
    return Response(picture.png, media_type="image/png", headers=headers)


def thumbnail(request: Request) -> Response:
    state = _state(request)
    row = _row_or_404(state, request.path_params["row_id"])
    return _png(state.painter.thumbnail(row))


def picture(request: Request) -> Response:
    state = _state(request)
    row = _row_or_404(state, request.path_params["row_id"])
    method = request.query_params.get("map") or STORED_METHOD
    allowed = {"none", STORED_METHOD}
    if usable_model(state) is not None and row["model_id"] == state.model_row.id:
        allowed |= set(MODEL_METHODS)
    if method not in allowed:
        raise HTTPException(404, f"no {method!r} map for this image")
    return _png(state.painter.image(row, method))


def class_map(request: Request) -> Response:
    state = _state(request)
    png = class_map_png(state, request.query_params.get("label", ""))
    if png is None:
        raise HTTPException(404, "no average map for this class")
    return Response(png, media_type="image/png", headers={"cache-control": "no-cache"})


def favicon(_request: Request) -> Response:
    return Response(
        (HERE / "static" / "favicon.svg").read_bytes(),
        media_type="image/svg+xml",
        headers={"cache-control": "max-age=86400"},
    )


def in_picture_threads(handler: Callable[[Request], Response]) -> Callable:
    """``handler`` run in the pictures' threads (``ServeState.picture_threads``), not the
    pages': a grid's thumbnails, which wait for their decode workers, never hold up a page."""

    async def run(request: Request) -> Response:
        limiter = _state(request).pictures_limiter()
        return await anyio.to_thread.run_sync(handler, request, limiter=limiter)

    run.__name__ = run.__qualname__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def routes() -> list[Route]:
    return [
        Route("/", classes_page, name="classes"),
        Route("/grid", grid_page, name="grid"),
        Route("/image/{row_id:int}", image_page, name="image"),
        Route("/image/{row_id:int}/thumb.png", in_picture_threads(thumbnail), name="thumbnail"),
        Route("/image/{row_id:int}/picture.png", in_picture_threads(picture), name="picture"),
        Route("/image/{row_id:int}/similar", in_picture_threads(similar_fragment), name="similar"),
        Route("/classmap.png", in_picture_threads(class_map), name="class_map"),
        Route("/scans", scans_page, name="scans"),
        Route("/search", search_page, name="search", methods=["GET"]),
        Route("/search", upload_search, name="upload", methods=["POST"]),
        Route("/favicon.ico", favicon, name="favicon"),
    ]
