"""Store: a relevance map as a few hundred bytes for the database.

Format, version 1 (all little-endian)::

    magic   2 bytes  b"MM"
    version 1 byte   CODEC_VERSION
    height  uint16
    width   uint16
    low     float32  the value that code 0 stands for: min(0, map.min())
    high    float32  the value that code 255 stands for: max(0, map.max())
    payload zlib(uint8 codes, row-major, height * width bytes)

A code is ``round(255 * (value - low) / (high - low))``. For the non-negative
maps modlabel stores (CRM, Grad-CAM) ``low`` is 0, so this is "divide by the
max, keep 8 bits", and zero stays exactly zero. Rounding to the nearest code
bounds the error by half a step: ``MAX_RELATIVE_ERROR * (high - low)``, that is
max/510 for a non-negative map. An 18x18 map takes at most 15 + 335 bytes.

A decoder refuses versions it does not know, so the format can change later
with a new ``CODEC_VERSION`` while old rows stay readable by a decoder that
dispatches on the version byte.
"""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

import numpy as np

from .errors import ModlabelError

CODEC_VERSION = 1
MAGIC = b"MM"
# Largest |decoded - original| as a fraction of the map's range (high - low),
# apart from float32 rounding of the decoded value: half of one 8-bit step.
MAX_RELATIVE_ERROR = 1 / 510

_HEADER = struct.Struct("<2sBHHff")
_LEVELS = 255


class MapCodecError(ModlabelError, ValueError):
    """A map that cannot be encoded, or bytes that are not a map this codec reads."""


def encode_map(map2d: np.ndarray) -> bytes:
    """Compress one relevance map. map2d: (H, W) real, finite. Returns the blob."""
    arr = np.asarray(map2d)
    if arr.ndim != 2:
        raise MapCodecError(f"expected a non-empty (H, W) map, got shape {arr.shape}")
    return encode_maps(arr[None])[0]


def encode_maps(maps: np.ndarray) -> list[bytes]:
    """``encode_map`` of each map of a batch (N, H, W), quantized in one pass."""
    arr = np.asarray(maps)
    if arr.ndim != 3 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise MapCodecError(f"expected non-empty (H, W) maps, got shape {arr.shape[1:]}")
    n, height, width = arr.shape
    if height > 0xFFFF or width > 0xFFFF:
        raise MapCodecError(f"map of {height}x{width} cells is too large to encode")
    values = arr.reshape(n, height * width).astype(np.float64)  # a copy, quantized in place
    bounds = _stored_bounds(values)
    codes = _quantize(values, bounds)
    # zlib reads each row of codes in place (buffer protocol): no tobytes copy.
    return [
        _HEADER.pack(MAGIC, CODEC_VERSION, height, width, low, high) + zlib.compress(row, 9)
        for (low, high), row in zip(bounds.T.tolist(), codes, strict=True)
    ]


def _stored_bounds(values: np.ndarray) -> np.ndarray:
    """(2, N) float32: low = min(0, min) and high = max(0, max) of each map (N, H*W).

    The bounds are stored as float32; quantizing against the stored values lets
    the decoder reconstruct from exactly what the encoder used.
    """
    bounds = np.empty((2, len(values)))
    np.minimum(values.min(axis=1), 0.0, out=bounds[0])
    np.maximum(values.max(axis=1), 0.0, out=bounds[1])
    with np.errstate(over="ignore"):
        stored = bounds.astype(np.float32)
    # One check for the three failures (a NaN propagates through min and max, an
    # infinity or a value beyond float32 makes a bound infinite); tell them
    # apart only when one happened, sparing a pass over every value.
    if not np.isfinite(stored).all():
        finite = np.isfinite(values).all(axis=1)
        if not finite.all():
            raise MapCodecError(f"map {int(np.argmin(finite))} contains NaN or infinite values")
        raise MapCodecError("map values exceed the float32 range")
    return stored


def _quantize(values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Codes round(255 * (value - low) / (high - low)) of maps (N, H*W) float64,
    overwritten; bounds (2, N) from ``_stored_bounds``. Returns (N, H*W) uint8."""
    low, high = bounds.astype(np.float64)[:, :, None]
    span = high - low
    per_unit = np.divide(_LEVELS, span, out=np.zeros_like(span), where=span > 0)
    values -= low
    values *= per_unit  # all-zero maps: all zero codes
    np.rint(values, out=values)
    np.clip(values, 0, _LEVELS, out=values)
    return values.astype(np.uint8)


def decode_map(blob: bytes) -> np.ndarray:
    """Inverse of ``encode_map``. Returns (H, W) float32, never NaN."""
    data = bytes(blob)
    if len(data) < _HEADER.size or data[:2] != MAGIC:
        raise MapCodecError("not an encoded modlabel map (bad magic or too short)")
    version = data[2]
    if version != CODEC_VERSION:
        raise MapCodecError(
            f"unknown map codec version {version}; this modlabel reads version "
            f"{CODEC_VERSION} (upgrade modlabel to read newer maps)"
        )
    _, _, height, width, low, high = _HEADER.unpack_from(data)
    try:
        raw = zlib.decompress(data[_HEADER.size :])
    except zlib.error as exc:
        raise MapCodecError(f"corrupt map payload: {exc}") from None
    if len(raw) != height * width:
        raise MapCodecError(f"corrupt map payload: {len(raw)} bytes for a {height}x{width} map")
    if not (np.isfinite(low) and np.isfinite(high)) or high < low:
        raise MapCodecError("corrupt map header: bad value range")
    codes = np.frombuffer(raw, dtype=np.uint8).reshape(height, width)
    step = (float(high) - float(low)) / _LEVELS
    return (float(low) + codes.astype(np.float64) * step).astype(np.float32)


# -- arrays in JSON (a model's metadata: head weights, out-of-set means) -------------


def encode_array(arr: np.ndarray) -> dict[str, Any]:
    """An array as JSON: dtype, shape and base64 of its little-endian bytes (exact)."""
    arr = np.ascontiguousarray(arr, dtype=np.dtype(arr.dtype).newbyteorder("<"))
    return {
        "dtype": arr.dtype.str,
        "shape": list(arr.shape),
        "data": base64.b64encode(arr.tobytes()).decode("ascii"),
    }


def decode_array(doc: dict[str, Any]) -> np.ndarray:
    """Inverse of ``encode_array``."""
    raw = base64.b64decode(doc["data"])
    return np.frombuffer(raw, dtype=np.dtype(doc["dtype"])).reshape(doc["shape"]).copy()


# -- embeddings: an image's GAP vector, for similar-image search ---------------------
#
# Format, version 1 (little-endian)::
#
#     magic   2 bytes  b"ME"
#     version 1 byte   EMBEDDING_VERSION
#     length  uint16   K, the number of values
#     scale   float32  what code 1 stands for
#     codes   K int8   round(u / scale), u the L2-normalized embedding, scale = max|u| / 127
#
# 9 + K bytes (521 for a 512-filter head, against 2,048 as float32). Only the direction
# is kept: search is by cosine, and the cosine of the codes is the cosine of the decoded
# vectors (the scale is one positive factor), so a database can index the codes alone
# (pgvector: ``store.similar``). Quantizing each value to half a step of max|u| / 127
# keeps the cosine of two decoded vectors within about 1e-3 of the exact one for K >= 64.

EMBEDDING_MAGIC = b"ME"
EMBEDDING_VERSION = 1
_EMBEDDING_HEADER = struct.Struct("<2sBHf")
EMBEDDING_HEADER_BYTES = _EMBEDDING_HEADER.size


def encode_embeddings(vectors: np.ndarray) -> list[bytes]:
    """Compact blobs of (N, K) real embeddings (``EMBEDDING_VERSION``), one per row."""
    arr = np.asarray(vectors, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 1 or arr.shape[1] > 0xFFFF:
        raise MapCodecError(f"expected (N, K) embeddings with 1 <= K <= 65535, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise MapCodecError("an embedding contains NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    unit = np.divide(arr, norms, out=np.zeros_like(arr), where=norms > 0)
    peak = np.abs(unit).max(axis=1, keepdims=True)
    scale = (peak / 127.0).astype(np.float32)
    codes = np.divide(unit, scale, out=np.zeros_like(unit), where=scale > 0)
    codes = np.clip(np.rint(codes), -127, 127).astype(np.int8)
    k = arr.shape[1]
    return [
        _EMBEDDING_HEADER.pack(EMBEDDING_MAGIC, EMBEDDING_VERSION, k, float(s)) + row.tobytes()
        for s, row in zip(scale[:, 0].tolist(), codes, strict=True)
    ]


def embedding_codes(blobs: list[bytes], k: int | None = None) -> np.ndarray:
    """The (N, K) int8 codes of ``encode_embeddings`` blobs, checked, without their scale:
    what a cosine search needs (the scale is one positive factor a row). ``k``: the length
    every blob must have (default: the first one's)."""
    header = _EMBEDDING_HEADER
    if not blobs:
        return np.zeros((0, k or 0), np.int8)
    first = bytes(blobs[0][: header.size])
    if len(first) < header.size or first[:2] != EMBEDDING_MAGIC:
        raise MapCodecError("not an encoded modlabel embedding (bad magic or too short)")
    k = header.unpack(first)[2] if k is None else k
    size = header.size + k
    joined = b"".join(blobs)
    if len(joined) != size * len(blobs):
        raise MapCodecError(f"embeddings of more than one length (expected {k} values each)")
    rows = np.frombuffer(joined, dtype=np.uint8).reshape(len(blobs), size)
    magic = rows[:, 0].astype(np.uint16) << 8 | rows[:, 1]
    if (magic != (EMBEDDING_MAGIC[0] << 8 | EMBEDDING_MAGIC[1])).any():
        raise MapCodecError("not an encoded modlabel embedding (bad magic)")
    if (rows[:, 2] != EMBEDDING_VERSION).any():
        raise MapCodecError(
            f"unknown embedding version; this modlabel reads version {EMBEDDING_VERSION}"
        )
    return rows[:, header.size :].view(np.int8)


def decode_embeddings(blobs: list[bytes], k: int | None = None) -> np.ndarray:
    """Inverse of ``encode_embeddings``: (N, K) float32 unit vectors (zero for a zero
    embedding). ``k``: the length every blob must have (default: the first one's)."""
    # The scale only sets the length, and the result is normalized: the codes suffice.
    vectors = embedding_codes(blobs, k).astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))[:, None]
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors
