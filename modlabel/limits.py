"""The sizes an image may declare, checked before anything proportional to them is made.

Decompression bombs are refused, not decoded: a nightly scan must not be taken
down by one hostile file. Every decoder (``modlabel.decode`` for PIL's formats,
``modlabel.dicom`` for DICOM and the JPEG, JPEG-LS and JPEG 2000 codestreams
inside it) reads the size a file declares and calls ``check_declared_size``
before it decodes.
"""

from __future__ import annotations

from .errors import ImageError
from .reasons import Kind

# 100 megapixels is far above any figure or slice.
MAX_PIXELS = 100_000_000
# Neither side may exceed this many pixels (the most JPEG and DICOM can hold): an image
# 20,000,000 pixels tall and 1 wide is within the pixel limit, but every row costs PIL a
# row pointer and every resample a filter coefficient per row.
MAX_SIDE = 65_535


def check_declared_size(label: str, width: int, height: int) -> None:
    """Raise ``ImageError`` for an image whose declared size is over the limits
    (``MAX_PIXELS`` for a frame, ``MAX_SIDE`` for either side), before it is decoded."""
    if width < 1 or height < 1:
        raise ImageError(label, f"image has no pixels ({width}x{height})", Kind.OVER_LIMITS)
    if width > MAX_SIDE or height > MAX_SIDE:
        raise ImageError(
            label,
            f"image too large ({width}x{height} pixels; a side may be at most {MAX_SIDE})",
            Kind.OVER_LIMITS,
        )
    if width * height > MAX_PIXELS:
        raise ImageError(
            label,
            f"image too large ({width}x{height} pixels; the limit is {MAX_PIXELS:,})",
            Kind.OVER_LIMITS,
        )
