"""decode: large 16-bit and alpha images decode within a memory bound, and the
bounded conversion gives the pixels the whole-image conversion gave."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from modlabel import decode

# Each measurement runs in a fresh interpreter: ru_maxrss is a process's peak, so
# the decode's cost is the peak after decoding minus the peak after the imports.
_WRITE_GRAY16 = """
import sys
import numpy as np
from PIL import Image

path, side = sys.argv[1], int(sys.argv[2])
ramp = np.arange(side, dtype=np.uint16)
arr = np.empty((side, side), np.uint16)
np.add(ramp[None, :] * 5, ramp[:, None] * 2 + 1000, out=arr)  # 1000 .. ~43000, no temporary
arr[side // 3 : side // 3 + 4, side // 2 : side // 2 + 4] = 65000  # a small bright spot
img = Image.fromarray(arr)
del arr
img.save(path, compress_level=1)
"""

_WRITE_RGBA = """
import sys
from PIL import Image

path, side = sys.argv[1], int(sys.argv[2])
ramp = Image.linear_gradient("L").resize((side, side))
alpha = Image.radial_gradient("L").resize((side, side))  # opaque centre, clear corners
img = Image.merge("RGBA", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp, alpha))
del ramp, alpha
img.save(path, compress_level=1)
"""

_MEASURE = """
import resource, sys
from modlabel.decode import load_pixels

base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pixels, original = load_pixels(sys.argv[1], (300, 300))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024, int(pixels.max()), *original)  # ru_maxrss is in kB on Linux
"""

_SIDE = 6000  # 36 megapixels, as a large radiograph or a scanned film


def _decode_cost(tmp_path, writer: str) -> tuple[int, int]:
    """Bytes the decode of a written _SIDE x _SIDE image adds to the peak, and its max pixel."""
    path = tmp_path / "big.png"
    subprocess.run([sys.executable, "-c", writer, str(path), str(_SIDE)], check=True)
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], check=True, capture_output=True, text=True
    ).stdout.split()
    extra, top, width, height = (int(v) for v in out)
    assert (width, height) == (_SIDE, _SIDE)
    return extra, top


def test_a_large_16_bit_image_costs_little_more_than_its_own_pixels(tmp_path):
    extra, top = _decode_cost(tmp_path, _WRITE_GRAY16)
    # What must be held: the file's own I;16 image, 2 bytes a pixel. The conversion
    # runs in strips of a quarter megapixel (a few MB), so 0.5 bytes a pixel (18 MB
    # here) is ample; a full-resolution float64 copy alone would be 8 bytes a pixel.
    # (Measured: 66 MB; 616 MB before the conversion went by strips.)
    assert extra <= 2.5 * _SIDE * _SIDE, f"{extra / 1e6:.0f} MB"
    # The stretch used the whole image's range, the spot's 65000 included: the
    # gradient (at most ~43000) stays well below white once the spot is resampled away.
    assert 150 < top < 200


def test_a_large_rgba_image_costs_little_more_than_its_own_pixels(tmp_path):
    extra, _ = _decode_cost(tmp_path, _WRITE_RGBA)
    # What must be held: the file's own RGBA image, 4 bytes a pixel; the compositing
    # on black runs in strips. (Measured: 141 MB; 685 MB when the whole image was
    # composited, with four RGBA-sized copies.)
    assert extra <= 5.0 * _SIDE * _SIDE, f"{extra / 1e6:.0f} MB"


def _reference_rgb(img: Image.Image) -> Image.Image:
    """The whole-image conversion that decode used before it went by strips: the
    pixels trained models were trained on."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _reference_open(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return _reference_rgb(ImageOps.exif_transpose(img)).copy()


def _sample(mode: str, size_wh: tuple[int, int]) -> tuple[bytes, str]:
    """An image of ``mode`` with noise, a spot and (for alpha) partial transparency,
    as file bytes, and the mode it opens in."""
    rng = np.random.default_rng(sum(map(ord, mode)))
    w, h = size_wh
    if mode in ("I;16", "I;16B"):
        arr = rng.integers(900, 3100, (h, w)).astype(np.uint16)
        arr[h // 2, w // 3] = 60000
        img = Image.fromarray(arr)
        if mode == "I;16B":
            img = Image.frombytes("I;16B", (w, h), arr.astype(">u2").tobytes())
        fmt = "TIFF" if mode == "I;16B" else "PNG"
    elif mode == "I":
        img = Image.fromarray(rng.integers(-70000, 90000, (h, w)).astype(np.int32))
        fmt = "TIFF"
    elif mode == "F":
        img = Image.fromarray(rng.normal(-3.0, 2.0, (h, w)).astype(np.float32))
        fmt = "TIFF"
    elif mode == "F constant":
        img = Image.fromarray(np.full((h, w), -2.5, np.float32))
        fmt, mode = "TIFF", "F"
    elif mode in ("RGBA", "LA"):
        channels = 4 if mode == "RGBA" else 2
        arr = rng.integers(0, 256, (h, w, channels)).astype(np.uint8)
        arr[: h // 4, :, -1] = 0  # clear on top, opaque at the bottom
        arr[-h // 4 :, :, -1] = 255
        img = Image.fromarray(arr, mode)
        fmt = "PNG"
    elif mode in ("P", "P transparent"):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).quantize(32)
        fmt = "PNG"
        if mode == "P transparent":
            img.info["transparency"] = 3
            mode = "P"
    elif mode == "L":
        img = Image.fromarray(rng.integers(0, 256, (h, w)).astype(np.uint8))
        fmt = "PNG"
    else:  # CMYK
        img = Image.fromarray(rng.integers(0, 256, (h, w, 4)).astype(np.uint8), "CMYK")
        fmt = "TIFF"
    buf = io.BytesIO()
    img.save(buf, fmt, **({"transparency": 3} if "transparency" in img.info else {}))
    return buf.getvalue(), mode


_MODES = ["I;16", "I;16B", "I", "F", "F constant", "RGBA", "LA", "P transparent", "P", "L", "CMYK"]


@pytest.mark.parametrize("mode", _MODES)
@pytest.mark.parametrize("size_wh", [(61, 47), (13, 9)])  # down and up to the model's size
def test_strip_conversion_gives_the_whole_image_conversions_pixels(monkeypatch, mode, size_wh):
    # Strips of 64 pixels: a 61x47 image is converted in 47 strips of one row,
    # a 13x9 one in 3 strips of 4 rows at most, so strip edges are crossed everywhere.
    monkeypatch.setattr(decode, "_STRIP_PIXELS", 64)
    data, opened_mode = _sample(mode, size_wh)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == opened_mode  # the file really is in the mode under test
    want = _reference_open(data)

    full = decode.open_rgb(data)
    assert full.mode == "RGB" and full.size == want.size
    assert np.array_equal(np.asarray(full), np.asarray(want))  # no resampling: exact

    pixels, _ = decode.load_pixels(data, (24, 32))
    want_pixels = decode.resize_rgb(want, (24, 32))
    # Trained models depend on these pixels: at most rounding (in fact none, as PIL
    # resamples across, rounds to 8 bits, then resamples down, as the strips do).
    assert np.abs(pixels.astype(int) - want_pixels.astype(int)).max() <= 1


def test_a_turned_16_bit_image_is_stretched_upright(tmp_path):
    arr = np.linspace(1000, 3000, 40 * 30).reshape(30, 40).astype(np.uint16)
    arr[:5] = 60000  # bright top as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "turned.png", exif=exif.tobytes())
    data = (tmp_path / "turned.png").read_bytes()
    pixels, original = decode.load_pixels(data, (20, 16))
    assert original == (30, 40)
    want = decode.resize_rgb(_reference_open(data), (20, 16))
    assert np.abs(pixels.astype(int) - want.astype(int)).max() <= 1
    assert pixels[:, -2:].min() > 200  # the stored top is on the right once turned
