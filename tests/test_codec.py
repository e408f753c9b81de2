"""The stored map format: size, error bound, edge cases, versioning."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from modlabel import codec, maps

LIMIT_18x18 = 400


def realistic_crm(seed: int) -> np.ndarray:
    """A CRM-like 18x18 map: a few smooth blobs of squared evidence plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:18, 0:18]
    field = np.zeros((18, 18))
    for _ in range(rng.integers(1, 4)):
        cy, cx, r = rng.uniform(0, 18), rng.uniform(0, 18), rng.uniform(1.5, 6)
        field += rng.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    field += 0.05 * rng.random((18, 18))
    return (field**2 * 1e-4).astype(np.float32)


def assert_within_tolerance(original, decoded):
    original = original.astype(np.float64)
    span = max(original.max(), 0) - min(original.min(), 0)
    err = np.abs(decoded.astype(np.float64) - original).max()
    # half an 8-bit step of the range, plus float32 rounding of the decoded value
    assert err <= codec.MAX_RELATIVE_ERROR * span + 1e-6 * span, (err, span)


@pytest.mark.parametrize("kind", ["uniform", "gamma", "realistic", "crm"])
@pytest.mark.parametrize("seed", range(5))
def test_round_trip_size_and_error(kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        m = rng.random((18, 18)).astype(np.float32)
    elif kind == "gamma":
        m = rng.gamma(0.5, 1e3, size=(18, 18)).astype(np.float32)
    elif kind == "realistic":
        m = realistic_crm(seed)
    else:
        acts = np.maximum(rng.normal(size=(1, 18, 18, 64)), 0).astype(np.float32)
        m = maps.crm(acts, rng.normal(size=(64, 7)).astype(np.float32))[0]
    blob = codec.encode_map(m)
    assert isinstance(blob, bytes)
    assert len(blob) <= LIMIT_18x18
    decoded = codec.decode_map(blob)
    assert decoded.shape == (18, 18) and decoded.dtype == np.float32
    assert np.isfinite(decoded).all()
    assert_within_tolerance(m, decoded)
    # the max is kept exactly: normalized maps and thresholds survive storage
    assert decoded.max() == m.max()


def test_realistic_maps_compress_well():
    sizes = [len(codec.encode_map(realistic_crm(s))) for s in range(20)]
    assert max(sizes) <= LIMIT_18x18
    assert np.mean(sizes) < 300  # random maps take 350


def test_signed_maps_and_zeros_survive():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(7, 11)).astype(np.float32)
    m[2, 3] = 0.0
    decoded = codec.decode_map(codec.encode_map(m))
    assert_within_tolerance(m, decoded)
    nonneg = np.maximum(m, 0)
    decoded = codec.decode_map(codec.encode_map(nonneg))
    np.testing.assert_array_equal(decoded[nonneg == 0], 0)  # zero stays zero


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_constant_maps(value):
    m = np.full((18, 18), value, np.float32)
    decoded = codec.decode_map(codec.encode_map(m))
    np.testing.assert_array_equal(decoded, m)


def test_rejects_bad_input():
    with pytest.raises(codec.MapCodecError, match="NaN"):
        codec.encode_map(np.array([[1.0, np.nan]]))
    with pytest.raises(codec.MapCodecError, match="NaN"):
        codec.encode_map(np.array([[1.0, np.inf]]))
    with pytest.raises(codec.MapCodecError, match="shape"):
        codec.encode_map(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError):  # MapCodecError is a ValueError too
        codec.encode_map(np.zeros((0, 3)))


def test_batch_encoding_equals_one_by_one():
    rng = np.random.default_rng(2)
    batch = rng.gamma(1.0, size=(6, 18, 18)).astype(np.float32)
    batch[2] = 0.0
    batch[4] *= -1
    assert codec.encode_maps(batch) == [codec.encode_map(m) for m in batch]
    batch[3, 1, 1] = np.nan
    with pytest.raises(codec.MapCodecError, match="map 3 contains NaN"):
        codec.encode_maps(batch)


def test_rejects_values_beyond_float32_after_nan():
    batch = np.zeros((2, 3, 3))
    batch[1, 0, 0] = 1e39  # finite in float64, not as a stored float32 bound
    with pytest.raises(codec.MapCodecError, match="float32 range"):
        codec.encode_maps(batch)
    batch[0, 1, 1] = np.nan  # NaN or infinity is reported first, with its map
    with pytest.raises(codec.MapCodecError, match="map 0 contains NaN"):
        codec.encode_maps(batch)


def test_version_1_layout_is_pinned():
    # Existing databases hold version 1 blobs: the header fields, then zlib of
    # the codes (any zlib stream decodes the same, so only the codes are pinned).
    m = np.array([[0.0, 0.5, 1.0], [2.0, -1.0, 4.0]], np.float32)
    blob = codec.encode_map(m)
    assert blob[:15] == struct.pack("<2sBHHff", b"MM", 1, 2, 3, -1.0, 4.0)
    assert zlib.decompress(blob[15:]) == bytes([51, 76, 102, 153, 0, 255])  # 76.5 -> 76, to even
    stored = bytes.fromhex("4d4d0102000300000080bf0000804078da33f6499bc9f01f000716027e")
    np.testing.assert_array_equal(codec.decode_map(stored), codec.decode_map(blob))


def test_rejects_unknown_version_and_corruption():
    blob = codec.encode_map(np.ones((4, 4), np.float32))
    future = blob[:2] + bytes([codec.CODEC_VERSION + 1]) + blob[3:]
    with pytest.raises(codec.MapCodecError, match="unknown map codec version 2"):
        codec.decode_map(future)
    with pytest.raises(codec.MapCodecError, match="bad magic"):
        codec.decode_map(b"PNG" + blob[3:])
    with pytest.raises(codec.MapCodecError, match="corrupt"):
        codec.decode_map(blob[:-3])
    header = struct.pack("<2sBHHff", b"MM", codec.CODEC_VERSION, 5, 5, 0.0, 1.0)
    with pytest.raises(codec.MapCodecError, match="16 bytes for a 5x5"):
        codec.decode_map(header + zlib.compress(bytes(16)))
