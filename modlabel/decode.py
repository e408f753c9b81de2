"""Decode: file bytes to the model's input array.

Training (``train/``) and the runtime (``scan``) both call these functions, so
the pixels a model was trained on are produced by exactly the same code as the
pixels it labels: no train/serve skew.

The geometry is a plain stretch: the whole image is resampled (bilinear) to the
model's input size, whatever its aspect ratio, as in the paper (section 2.1).
A map at the model's resolution therefore lines up with the original image by
stretching it back to the original width and height. An EXIF orientation
(photos of screens and prints taken with a phone) is applied first, so "original"
means upright, as a person sees the image.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import config, limits
from .dicom import (
    HEAD_BYTES,
    DicomHeader,
    dicom_image,
    header_of,
    is_dicom_name,
    looks_like_dicom,
    read_dataset,
)
from .errors import ImageError
from .reasons import Kind

# Kept here for callers of modlabel.decode: the limits live in modlabel.limits.
MAX_PIXELS = limits.MAX_PIXELS
MAX_SIDE = limits.MAX_SIDE

# modlabel's own limits (modlabel.limits) are checked before decoding; Pillow's warning
# at its lower default limit would only repeat them. (Changing the warnings filters per
# call is not thread-safe.)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def open_rgb(
    source: str | Path | bytes, *, name: str | None = None, max_bytes: int | None = None
) -> Image.Image:
    """Open an image file (or its bytes) fully decoded, as 8-bit RGB.

    Grayscale, palette, 16-bit and alpha images are converted; alpha is
    composited on black. Raises ``ImageError`` naming the file and the reason.
    """
    # The file's own image dies with the file: keep a copy of it, not of a conversion.
    return _decode(
        source,
        name=name,
        max_bytes=max_bytes,
        finish=lambda rgb, own, _wh: rgb.copy() if own else rgb,
    )[0]


@dataclass
class DecodedImage:
    """What ``decode_image`` made of one file."""

    original_wh: tuple[int, int]  # (width, height) as shown (upright), as PIL and the database
    pixels: np.ndarray | None = None  # (H, W, 3) uint8 at the model's input size
    display: np.ndarray | None = None  # (h, w, 3) uint8, the original's shape, for people
    dicom: DicomHeader | None = None  # a DICOM file's header fields


def decode_image(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    size_hw: Sequence[int] | None = None,
    display_px: int | None = None,
    max_bytes: int | None = None,
) -> DecodedImage:
    """Decode one image for the model (``size_hw`` = (height, width): ``load_pixels``'
    pixels) and/or for people (``display_px``: the whole image, its longest side at most
    this), with a DICOM file's header. A DICOM file is parsed once for all three.

    ``max_bytes``: the most a deflated DICOM dataset may inflate to. Raises ``ImageError``.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if _is_dicom(source, name):
        try:
            ds = read_dataset(source, label, max_bytes=max_bytes)
            header = header_of(ds)
        except ImageError:
            raise
        except OSError as exc:
            raise ImageError(
                label, f"cannot read file: {exc.strerror or exc}", Kind.UNREADABLE
            ) from None
        out = DecodedImage((0, 0), dicom=header)
        try:
            frame = dicom_image(ds, label, limits.MAX_PIXELS)
        except ImageError as exc:
            exc.dicom = header  # what the file claims to be, kept on its error row too
            raise
        out.original_wh = frame.size
        if size_hw is not None:
            out.pixels = resize_rgb(_to_rgb(frame, size_hw), size_hw)
        if display_px is not None:
            shown = display_hw(frame.size, display_px)
            out.display = resize_rgb(_to_rgb(frame, shown), shown)
        return out
    out = DecodedImage((0, 0))
    if size_hw is not None:
        out.pixels, out.original_wh = load_pixels(source, size_hw, name=name)
    if display_px is not None:
        out.display, out.original_wh = _decode(
            source,
            name=name,
            size_for=lambda wh: display_hw(wh, display_px),
            finish=lambda rgb, _own, hw: resize_rgb(rgb, hw),
        )
    if size_hw is None and display_px is None:  # the size alone
        out.original_wh = _decode(source, name=name, finish=lambda *_: None)[1]
    return out


def display_hw(original_wh: Sequence[int], longest: int) -> tuple[int, int]:
    """(height, width) of an image of ``original_wh`` shown with its longest side at most
    ``longest`` pixels (never enlarged), as PIL's ``thumbnail`` sizes it."""
    width, height = int(original_wh[0]), int(original_wh[1])
    scale = min(1.0, longest / max(width, height, 1))
    return max(1, round(height * scale)), max(1, round(width * scale))


_T = TypeVar("_T")


def _decode(
    source: str | Path | bytes,
    *,
    finish: Callable[[Image.Image, bool, tuple[int, int] | None], _T],
    name: str | None = None,
    size_for: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
    max_bytes: int | None = None,
) -> tuple[_T, tuple[int, int]]:
    """Decode to RGB and apply ``finish`` while the file is open; also the image's
    own (width, height), upright.

    size_for(original_wh) -> (height, width): the size ``finish`` resamples to, or
    None for the whole image. A JPEG is then decoded at the smallest of its DCT scales
    (1/2, 1/4, 1/8) that is still at least this size: two to four times faster for
    archive images much larger than the model's input, and the bilinear resample that
    follows sees nearly the same pixels. An image that is not RGB is converted and
    resampled to it together, band by band, so that a large 16-bit or alpha image costs
    little more than its own pixels; ``finish`` gets it at this size (an RGB image it
    gets whole, as the file's own).

    finish(rgb, own, size_hw): ``own`` is True when ``rgb`` is the file's own image,
    which is released when the file closes (so resampling inside ``finish`` spares a
    full-resolution copy).
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        if _is_dicom(source, name):
            # DICOM goes through pydicom (modlabel.dicom), then the same resampling.
            frame = dicom_image(source, label, limits.MAX_PIXELS, max_bytes=max_bytes)
            size_hw = size_for(frame.size) if size_for is not None else None
            return finish(_to_rgb(frame, size_hw), False, size_hw), frame.size
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(fp) as img:
            limits.check_declared_size(label, img.width, img.height)
            orientation = _exif_orientation(img)
            turned = orientation in _QUARTER_TURNS
            original_wh = (img.height, img.width) if turned else img.size  # as shown: upright
            size_hw = size_for(original_wh) if size_for is not None else None
            if size_hw is not None and img.format == "JPEG":
                high, wide = size_hw[0], size_hw[1]
                if turned:  # the file's pixels are not upright yet
                    high, wide = wide, high
                img.draft("RGB", (int(wide), int(high)))
            img.load()
            upright = ImageOps.exif_transpose(img) if orientation != 1 else img
            rgb = _to_rgb(upright, size_hw)
            return finish(rgb, rgb is img, size_hw), original_wh
    except ImageError:
        raise
    except MemoryError:
        raise
    except FileNotFoundError:
        raise ImageError(label, "file not found", Kind.GONE) from None
    except IsADirectoryError:
        raise ImageError(label, "is a directory", Kind.SPECIAL_FILE) from None
    except PermissionError:
        raise ImageError(label, "permission denied", Kind.PERMISSION) from None
    except UnidentifiedImageError:
        raise ImageError(label, "not a recognized image format", Kind.NOT_AN_IMAGE) from None
    except Image.DecompressionBombError as exc:
        raise ImageError(
            label, f"refused as a decompression bomb ({exc})", Kind.OVER_LIMITS
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Truncated and corrupt files surface here from PIL's decoders.
        raise ImageError(label, f"cannot decode image: {exc}") from None


# EXIF orientations (tag 0x0112) that turn the image a quarter: width and height swap.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright, 2-8 = mirrored and/or turned); 1 when absent.

    Cameras and phones store a photo as the sensor saw it and say in EXIF how
    to turn it; the pixels a model sees must be upright, as a person sees them.
    """
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block must not make the image unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# Pixels converted at a time by _to_rgb: a quarter megapixel, whose float64 values
# take 2 MB (smaller strips only add Python overhead; larger ones, memory).
_STRIP_PIXELS = config.DECODE_STRIP_PIXELS
# 16-bit, 32-bit and float grayscale: their used range is stretched to 8 bits.
_STRETCHED_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def _to_rgb(img: Image.Image, size_hw: Sequence[int] | None = None) -> Image.Image:
    """``img`` itself when it is RGB already, else a converted new image, resampled
    (bilinear) to ``size_hw`` = (height, width) when given.

    The conversion never holds a converted copy of the whole image (a float64 copy
    of a 16-bit scan is 8 bytes a pixel, four times the scan itself), nor a canvas
    as tall as the image: rows are converted in strips, each resampled across as
    soon as it is made, and the output is resampled down a band of rows at a time
    from a window of the strips that band needs (``_BandResampler``). PIL's bilinear
    resample is two passes, across and then down, rounding to 8 bits between them,
    so the bands give, pixel for pixel up to the rounding of a weight, what
    resampling the whole converted image gave.
    """
    if img.mode == "RGB":
        return img
    strip_mode, convert = _eight_bit_strips(img)
    width, height = (int(size_hw[1]), int(size_hw[0])) if size_hw is not None else img.size
    if (width, height) == img.size:  # a conversion, no resampling: the output is the canvas
        out = Image.new("RGB", img.size)
        for top, strip in _converted_strips(img, convert, 0, img.height):
            out.paste(strip, (0, top))  # paste converts a gray strip to RGB itself
        return out
    # Gray strips stay gray until the end: 1 byte a pixel (RGB takes 4 in PIL), and its
    # 3 equal channels would be resampled alike.
    out = _BandResampler(img, convert, strip_mode, width, height).run()
    return out.convert("RGB") if out.mode != "RGB" else out


def _converted_strips(
    img: Image.Image, convert: Callable[[Image.Image], Image.Image], top: int, bottom: int
) -> Iterator[tuple[int, Image.Image]]:
    """(first row, 8-bit strip) of rows ``top``..``bottom`` of ``img``, a strip of about
    ``_STRIP_PIXELS`` at a time (a row at least)."""
    rows = max(1, _STRIP_PIXELS // max(1, img.width))
    for start in range(top, bottom, rows):
        yield start, convert(img.crop((0, start, img.width, min(start + rows, bottom))))


class _BandResampler:
    """Resample a converted image band by band, as PIL's bilinear resample of the whole.

    PIL computes output row ``yy`` from input rows ``[first(yy), end(yy))`` around the
    centre ``(yy + 0.5) * scale`` (support ``max(scale, 1)`` for its triangle filter).
    A band of output rows needs a run of input rows; those are converted and resampled
    across once each, kept in a window as long as a later band needs them, and the band
    is resampled down from the window with PIL's ``box`` in window coordinates.
    """

    def __init__(
        self,
        img: Image.Image,
        convert: Callable[[Image.Image], Image.Image],
        mode: str,
        width: int,
        height: int,
    ) -> None:
        self.img, self.convert, self.mode = img, convert, mode
        self.width, self.height = width, height
        self.scale = img.height / height
        self.support = max(self.scale, 1.0)
        self.window = Image.new(mode, (width, 0))
        self.window_top = 0  # the input row of the window's first row

    def first(self, yy: int) -> int:
        return max(0, int((yy + 0.5) * self.scale - self.support + 0.5))

    def end(self, yy: int) -> int:
        return min(self.img.height, int((yy + 0.5) * self.scale + self.support + 0.5))

    def run(self) -> Image.Image:
        out = Image.new(self.mode, (self.width, self.height))
        rows = max(1, _STRIP_PIXELS // max(1, self.img.width))  # input rows per band, about
        top = 0
        while top < self.height:
            bottom = top + 1
            while bottom < self.height and self.end(bottom) - self.first(top) <= rows:
                bottom += 1
            out.paste(self._band(top, bottom), (0, top))
            top = bottom
        return out

    def _band(self, top: int, bottom: int) -> Image.Image:
        y0, y1 = self.first(top), self.end(bottom - 1)
        self._slide(y0, y1)
        window = self.window.crop((0, y0 - self.window_top, self.width, y1 - self.window_top))
        box_top = top * self.scale - y0
        box_bottom = min(bottom * self.scale - y0, float(y1 - y0))
        return window.resize(
            (self.width, bottom - top),
            Image.Resampling.BILINEAR,
            box=(0, box_top, self.width, box_bottom),
        )

    def _slide(self, y0: int, y1: int) -> None:
        """Make the window hold input rows ``y0``..``y1``, resampled across, and no others.

        Bands come in order and ``first``/``end`` never decrease, so rows are converted
        once each: those the window holds already are kept, the rest appended."""
        end = self.window_top + self.window.height
        if y0 >= end:  # nothing to keep (bilinear supports overlap, so only at the start)
            parts, start = [], y0
        else:
            parts = [self.window.crop((0, y0 - self.window_top, self.width, self.window.height))]
            start = end
        self.window_top = y0
        for _top, strip in _converted_strips(self.img, self.convert, start, y1):
            if strip.width != self.width:
                strip = strip.resize((self.width, strip.height), Image.Resampling.BILINEAR)
            parts.append(strip)
        window = Image.new(self.mode, (self.width, sum(p.height for p in parts)))
        row = 0
        for part in parts:
            window.paste(part, (0, row))  # paste converts a gray strip to RGB itself
            row += part.height
        self.window = window


def _eight_bit_strips(img: Image.Image) -> tuple[str, Callable[[Image.Image], Image.Image]]:
    """How strips (crops) of ``img`` become 8-bit: the mode they come out in ("L"
    or "RGB") and the conversion of one strip."""
    if img.mode in _STRETCHED_MODES:
        # Stretched rather than clipped; by the whole image's range, so that a
        # small bright spot still sets the white point, as it did.
        lo, hi = _value_range(img)
        return "L", lambda strip: _stretch(strip, lo, hi)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return "RGB", _on_black
    if img.mode == "L":
        return "L", lambda strip: strip
    return "RGB", lambda strip: strip.convert("RGB")


def _value_range(img: Image.Image) -> tuple[float, float]:
    """(min, max) of a grayscale image's values, read in strips (NaN when any is NaN)."""
    rows = max(1, _STRIP_PIXELS // max(1, img.width))
    lows, highs = [], []
    for top in range(0, img.height, rows):
        values = np.asarray(img.crop((0, top, img.width, min(top + rows, img.height))))
        lows.append(values.min())
        highs.append(values.max())
    return float(np.min(lows)), float(np.max(highs))  # np.min: NaN wins, as it did


def _stretch(strip: Image.Image, lo: float, hi: float) -> Image.Image:
    """A grayscale strip's values from [lo, hi] to 0..255 (truncated), mode L."""
    arr = np.asarray(strip, dtype=np.float64)
    arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(arr.astype(np.uint8))


def _on_black(strip: Image.Image) -> Image.Image:
    """An alpha strip composited on opaque black, mode RGB."""
    rgba = strip.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def resize_rgb(img: Image.Image, size_hw: Sequence[int]) -> np.ndarray:
    """Resample an RGB image to ``size_hw`` = (height, width), bilinear.

    Returns (height, width, 3) uint8.
    """
    height, width = int(size_hw[0]), int(size_hw[1])
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_pixels(
    source: str | Path | bytes,
    size_hw: Sequence[int],
    *,
    name: str | None = None,
    max_bytes: int | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Open, convert and resample one image to ``size_hw`` = (height, width).

    Returns ((height, width, 3) uint8 pixels at the model's size,
    (original_width, original_height)): the original size in PIL's order, as
    scan stores it (``width``, ``height``); callers name it ``original_wh``.
    """
    return _decode(
        source,
        name=name,
        max_bytes=max_bytes,
        size_for=lambda _wh: (int(size_hw[0]), int(size_hw[1])),
        finish=lambda rgb, _own, hw: resize_rgb(rgb, hw),
    )


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Apply the model's preprocessing: (pixels - mean) / std per RGB channel.

    pixels: (..., 3) uint8 or float in [0, 255]. Returns float32 of the same shape.
    """
    out = pixels.astype(np.float32)  # a new array: the in-place steps below never touch pixels
    out -= np.asarray(mean, dtype=np.float32)
    out /= np.asarray(std, dtype=np.float32)
    return out


def is_image_path(path: str | Path) -> bool:
    """True when the file name has one of the image suffixes that scan reads (DICOM's
    ``.dcm``/``.dicom`` included; extensionless DICOM files are found by content:
    ``source.is_image_file``)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES or is_dicom_name(path)


def _is_dicom(source: str | Path | bytes, name: str | None) -> bool:
    """DICOM by content (``DICM`` at byte 128, or a file meta group first) or by name."""
    if isinstance(source, bytes):
        return looks_like_dicom(source[:HEAD_BYTES]) or (name is not None and is_dicom_name(name))
    if is_dicom_name(source):
        return True
    with open(source, "rb") as handle:  # 132 bytes: cheap beside the decode that follows
        return looks_like_dicom(handle.read(HEAD_BYTES))
