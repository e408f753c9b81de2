"""The server's pictures: thumbnails with their CRM, an image with a map and its colour
bar, a class's average map with its ROI box and colour bar; PNG bytes, drawn by the
report's own functions (``report.html``) and ``overlay``.

Archive files are untrusted: they are read and decoded only in the isolated decode
workers (``decode_pool``), as a scan decodes them, and only at the path stored in a row
the request named by id. A file that can no longer be read becomes a grey placeholder
(with a header saying why), so that a grid never shows a broken image.
"""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from .. import codec, geometry, maps, overlay
from ..decode_pool import DecodePool, DecodeRequest, image_pool
from ..model import OnnxModel
from ..paths import from_db
from ..report.files import png_bytes
from ..report.html import EXAMPLE_PX, class_heatmap_png

IMAGE_PX = 512  # the image page's picture, longest side
THUMB_PX = EXAMPLE_PX  # the grid's thumbnails, the report's example size
THUMBS_CACHED = 2048  # thumbnails kept in memory (about 30 kB each)
# Methods the image page offers: the stored CRM always; with the model file, every
# closed-form method of the registry, recomputed from one forward pass (those that run the
# model again per image, Score-CAM and RISE, are for explain and localize).
STORED_METHOD = "crm"
MODEL_METHODS = maps.closed_form_methods()


@dataclass(frozen=True)
class Picture:
    png: bytes
    note: str = ""  # why it is a placeholder ("" for a real picture)


class LruCache:
    """A small thread-safe LRU of bytes by key."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Picture] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Picture | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: Any, value: Picture) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class Painter:
    """Decodes stored files in isolated workers and draws what the pages show.

    The worker pool is started on first use (a server that only lists starts none) and
    closed by ``close``. ``model``: the ONNX file of the database's model, for CAM and
    Grad-CAM (recomputed through ``infer``); None: the stored CRM only."""

    def __init__(self, model: OnnxModel | None = None) -> None:
        self.model = model
        self._pool: DecodePool | None = None
        self._lock = threading.Lock()
        self.thumbs = LruCache(THUMBS_CACHED)

    def _decoder(self) -> DecodePool:
        with self._lock:
            if self._pool is None:
                size = self.model.info.input_size if self.model is not None else None
                self._pool = image_pool(size, display_px=IMAGE_PX)
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _decode(self, stored_path: str) -> tuple[Any, str]:
        decoded = self._decoder().decode(DecodeRequest(from_db(stored_path)))
        if decoded.error or decoded.cancelled or decoded.failed:
            return None, decoded.error or decoded.failed or "decoding stopped"
        return decoded, ""

    def thumbnail(self, row: dict[str, Any]) -> Picture:
        """The row's image, fit to the thumbnail box, with its stored CRM (the report's
        example picture); cached by row id and content hash."""
        key = (row["id"], row.get("sha256"))
        cached = self.thumbs.get(key)
        if cached is not None:
            return cached
        decoded, why = self._decode(row["path"])
        if decoded is None:
            picture = placeholder(THUMB_PX, why)
        else:
            try:
                crm = codec.decode_map(row["crm"]) if row.get("crm") is not None else None
            except codec.MapCodecError as exc:
                picture = placeholder(THUMB_PX, str(exc))
            else:
                picture = Picture(png_bytes(fit_overlay(decoded.display, crm, THUMB_PX)))
        if not picture.note:
            self.thumbs.put(key, picture)
        return picture

    def image(self, row: dict[str, Any], method: str) -> Picture:
        """The row's image at IMAGE_PX with ``method``'s map overlaid: ``none``, the stored
        ``crm``, or, with a model, any of ``MODEL_METHODS`` recomputed."""
        decoded, why = self._decode(row["path"])
        if decoded is None:
            return placeholder(IMAGE_PX // 2, why)
        display = decoded.display
        if method == "none":
            return Picture(png_bytes(fit_overlay(display, None, IMAGE_PX)))
        if method == STORED_METHOD and row.get("crm") is not None:
            try:
                map2d = codec.decode_map(row["crm"])
            except codec.MapCodecError as exc:
                return placeholder(IMAGE_PX // 2, str(exc))
        elif self.model is None or decoded.pixels is None:
            return placeholder(IMAGE_PX // 2, "no model file: CRM only")
        else:
            from ..infer import label_pixels

            labels = label_pixels(self.model, decoded.pixels[None])
            map2d = labels.maps([method])[method][0]
        shown = fit_overlay(display, map2d, IMAGE_PX)
        return Picture(png_bytes(overlay.with_colorbar(shown, threshold=geometry.DISPLAY_FRACTION)))


def fit_overlay(display: np.ndarray, map2d: np.ndarray | None, box_px: int) -> np.ndarray:
    """An image fit to a square box (small images enlarged, as the report's examples are)
    with a map overlaid above the display threshold (``overlay.overlay``); no map: the
    image alone."""
    img = ImageOps.contain(Image.fromarray(display), (box_px, box_px), Image.Resampling.BILINEAR)
    pixels = np.asarray(img)
    if map2d is None:
        return pixels
    return overlay.overlay(pixels, map2d, threshold=geometry.DISPLAY_FRACTION)


def class_map_picture(average: np.ndarray, roi: Any) -> Picture:
    """A class's average CRM with its ROI box, as the report draws it."""
    return Picture(base64.b64decode(class_heatmap_png(average, roi)))


def placeholder(size: int, why: str) -> Picture:
    """A grey square with a cross, standing for a picture that cannot be drawn."""
    img = Image.new("RGB", (size, size), (96, 96, 96))
    draw = ImageDraw.Draw(img)
    draw.line([(0, 0), (size, size)], fill=(140, 140, 140), width=2)
    draw.line([(0, size), (size, 0)], fill=(140, 140, 140), width=2)
    return Picture(png_bytes(img), why or "cannot be drawn")
