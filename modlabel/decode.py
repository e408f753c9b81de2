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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import config
from .dicom import HEAD_BYTES, dicom_image, is_dicom_name, looks_like_dicom
from .errors import ImageError

# Decompression bombs are refused, not decoded: a nightly scan must not be taken
# down by one hostile file. 100 megapixels is far above any figure or slice.
MAX_PIXELS = 100_000_000
# The limit above is modlabel's own, checked before decoding; Pillow's warning at
# its lower default limit would only repeat it. (Changing the warnings filters per
# call is not thread-safe, and decoding runs in threads.)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def open_rgb(source: str | Path | bytes, *, name: str | None = None) -> Image.Image:
    """Open an image file (or its bytes) fully decoded, as 8-bit RGB.

    Grayscale, palette, 16-bit and alpha images are converted; alpha is
    composited on black. Raises ``ImageError`` naming the file and the reason.
    """
    # The file's own image dies with the file: keep a copy of it, not of a conversion.
    return _decode(source, name=name, finish=lambda rgb, own: rgb.copy() if own else rgb)[0]


_T = TypeVar("_T")


def _decode(
    source: str | Path | bytes,
    *,
    finish: Callable[[Image.Image, bool], _T],
    name: str | None = None,
    at_least_hw: Sequence[int] | None = None,
    size_hw: Sequence[int] | None = None,
) -> tuple[_T, tuple[int, int]]:
    """Decode to RGB and apply ``finish`` while the file is open; also the image's
    own (width, height).

    finish(rgb, own): ``own`` is True when ``rgb`` is the file's own image,
    which is released when the file closes (so resampling inside ``finish``
    spares a full-resolution copy).
    at_least_hw: (height, width). A JPEG is then decoded at the smallest of its
    DCT scales (1/2, 1/4, 1/8) that is still at least this size: two to four
    times faster for archive images much larger than the model's input, and
    the bilinear resample that follows sees nearly the same pixels.
    size_hw: (height, width) that ``finish`` resamples to. An image that is not
    RGB is then converted and resampled to it together, strip by strip, so that a
    large 16-bit or alpha image costs little more than its own pixels; ``finish``
    gets it at this size (an RGB image it gets whole, as the file's own).
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        if _is_dicom(source, name):
            # DICOM goes through pydicom (modlabel.dicom), then the same resampling.
            frame = dicom_image(source, label, MAX_PIXELS)
            return finish(_to_rgb(frame, size_hw), False), frame.size
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(fp) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(label, f"image too large ({img.width}x{img.height} pixels)")
            orientation = _exif_orientation(img)
            turned = orientation in _QUARTER_TURNS
            original_wh = (img.height, img.width) if turned else img.size  # as shown: upright
            if at_least_hw is not None and img.format == "JPEG":
                high, wide = at_least_hw[0], at_least_hw[1]
                if turned:  # the file's pixels are not upright yet
                    high, wide = wide, high
                img.draft("RGB", (int(wide), int(high)))
            img.load()
            upright = ImageOps.exif_transpose(img) if orientation != 1 else img
            rgb = _to_rgb(upright, size_hw)
            return finish(rgb, rgb is img), original_wh
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(label, "file not found") from None
    except IsADirectoryError:
        raise ImageError(label, "is a directory") from None
    except PermissionError:
        raise ImageError(label, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(label, "not a recognized image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(label, f"refused as a decompression bomb ({exc})") from None
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
    of a 16-bit scan is 8 bytes a pixel, four times the scan itself): it runs in
    strips of rows, each resampled across as soon as it is made. PIL's bilinear
    resample is two passes, across and then down, rounding to 8 bits between them,
    so stacking the strips and resampling them down at the end gives, pixel for
    pixel, what resampling the whole converted image gave.
    """
    if img.mode == "RGB":
        return img
    strip_mode, convert = _eight_bit_strips(img)
    width, height = (int(size_hw[1]), int(size_hw[0])) if size_hw is not None else img.size
    # Gray strips that will be resampled stay gray until the end: 1 byte a pixel
    # (RGB takes 4 in PIL), and its 3 equal channels would be resampled alike.
    resampled = (width, height) != img.size
    across = Image.new(strip_mode if resampled else "RGB", (width, img.height))
    rows = max(1, _STRIP_PIXELS // max(1, img.width))
    for top in range(0, img.height, rows):
        strip = convert(img.crop((0, top, img.width, min(top + rows, img.height))))
        if strip.width != width:
            strip = strip.resize((width, strip.height), Image.Resampling.BILINEAR)
        across.paste(strip, (0, top))  # paste converts a gray strip to RGB itself
    if across.height != height:
        across = across.resize((width, height), Image.Resampling.BILINEAR)
    return across.convert("RGB") if across.mode != "RGB" else across


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
    source: str | Path | bytes, size_hw: Sequence[int], *, name: str | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Open, convert and resample one image to ``size_hw`` = (height, width).

    Returns ((height, width, 3) uint8 pixels at the model's size,
    (original_width, original_height)): the original size in PIL's order, as
    scan stores it (``width``, ``height``); callers name it ``original_wh``.
    """
    return _decode(
        source,
        name=name,
        at_least_hw=size_hw,
        size_hw=size_hw,
        finish=lambda rgb, _: resize_rgb(rgb, size_hw),
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
