"""What every page of ``modlabel serve`` shares: the server's state (``ServeState``), the
templates (``render``) and the stored class maps, below the pages (``pages``) and the
application that routes to them (``app``)."""

from __future__ import annotations

import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse

from .. import __version__, codec, geometry, rois, store
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
