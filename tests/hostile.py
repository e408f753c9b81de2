"""Hostile inputs, built for real: a DICOM that makes GDCM abort, a deflated-DICOM bomb,
PNGs 20,000,000 pixels tall, a JPEG 2000 codestream that lies about its size.

Shared by the tests of the nightly job and ``benchmarks/adversary.py``; everything is
written a chunk at a time, so that building a bomb never costs what decoding it would.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def jpeg_bytes(arr: np.ndarray, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def noise(h: int = 64, w: int = 64, seed: int = 0, channels: int = 1) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def quiet_pydicom() -> None:
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE


def write_dicom(
    path: Path,
    pixel_data: bytes,
    *,
    syntax: str,
    rows: int = 64,
    columns: int = 64,
    bits_allocated: int = 8,
    bits_stored: int | None = None,
    samples: int = 1,
    photometric: str = "MONOCHROME2",
    encapsulated: bool = True,
    **header: Any,
) -> Path:
    """A small secondary-capture DICOM file; ``pixel_data`` is one frame (encoded when
    ``encapsulated``)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    quiet_pydicom()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits_stored = bits_stored or bits_allocated
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in header.items():
        setattr(ds, key, value)
    if encapsulated:
        frame = pixel_data + (b"\0" if len(pixel_data) % 2 else b"")
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixel_data
        ds["PixelData"].VR = "OB" if bits_allocated <= 8 else "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED_12 = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"


def _segment_end(jpeg: bytes, marker: bytes) -> int:
    at = jpeg.find(marker)
    return at + 2 + int.from_bytes(jpeg[at + 2 : at + 4], "big")


def poison_variants() -> list[tuple[str, bytes, dict[str, Any]]]:
    """JPEG Baseline frames (and header fields) that may make GDCM abort, in the order tried."""
    good = jpeg_bytes(noise())
    sof_end = _segment_end(good, b"\xff\xc0")
    return [
        (
            "4 stray bytes after the SOF0 segment (libjpeg warns 'extraneous bytes before "
            "marker' in jpeg_read_header; GDCM's assert(0) at gdcmJPEGBITSCodec.hxx:782 "
            "throws gdcm::Exception)",
            good[:sof_end] + b"\0\0\0\0" + good[sof_end:],
            {},
        ),
        ("2 stray bytes after SOI", good[:2] + b"\0\0" + good[2:], {}),
        (
            "valid frame, BitsStored 7 of BitsAllocated 8 (gdcmImageCodec.cxx:754)",
            good,
            {"bits_stored": 7},
        ),
    ]


def gdcm_decode_check(path: Path) -> tuple[int, str]:
    """Decode ``path`` with pydicom's gdcm plugin in a subprocess: (exit code, stderr tail)."""
    code = (
        "import sys, pydicom\n"
        "from pydicom.pixels import pixel_array\n"
        "pixel_array(pydicom.dcmread(sys.argv[1]), decoding_plugin='gdcm')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    terminate = [ln for ln in lines if "terminate called" in ln]
    return done.returncode, (terminate or lines or [""])[-1][:160]


def write_png_stream(path: Path, width: int, height: int, channels: int) -> int:
    """An 8-bit grey (1) or RGB (3) PNG of zeros, deflated a strip of rows at a time
    (never the whole image in memory); returns its size in bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    color = {1: 0, 3: 2}[channels]
    row = b"\0" * (1 + width * channels)  # filter byte 0, then the pixels
    strip = 1 << 20
    comp = zlib.compressobj(9)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)))
        for top in range(0, height, strip):
            data = comp.compress(row * min(strip, height - top))
            if data:
                f.write(chunk(b"IDAT", data))
        f.write(chunk(b"IDAT", comp.flush()))
        f.write(chunk(b"IEND", b""))
    return path.stat().st_size


def write_deflate_bomb(path: Path, rows: int, columns: int, frames: int) -> tuple[int, int]:
    """A Deflated Explicit VR Little Endian DICOM whose dataset inflates to ``frames``
    16-bit frames of zeros; written a chunk at a time. Returns (file bytes, inflated bytes)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    quiet_pydicom()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.UID(DEFLATED)
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)

    ds = Dataset()
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    length = rows * columns * 2 * frames
    assert length < 0xFFFFFFFF, "PixelData length must fit 32 bits"
    pixel_header = b"\xe0\x7f\x10\x00OW\0\0" + struct.pack("<I", length)

    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = b"\0" * (16 << 20)
    with open(path, "wb") as f:
        f.write(head.getvalue())
        f.write(comp.compress(body.getvalue() + pixel_header))
        left = length
        while left:
            f.write(comp.compress(zeros[: min(left, len(zeros))]))
            left -= min(left, len(zeros))
        f.write(comp.flush())
    return path.stat().st_size, length + len(body.getvalue()) + len(pixel_header)


def j2k_codestream(arr: np.ndarray) -> bytes:
    """A raw JPEG 2000 codestream (J2K, lossless) of ``arr``, through Pillow's OpenJPEG."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG2000", no_jp2=True, irreversible=False)
    return buf.getvalue()


def j2k_with_siz(codestream: bytes, width: int, height: int) -> bytes:
    """The codestream with its SIZ marker declaring a ``width`` x ``height`` image in one tile."""
    at = codestream.find(b"\xff\x51")
    patched = bytearray(codestream)
    struct.pack_into(">II", patched, at + 6, width, height)  # Xsiz, Ysiz
    struct.pack_into(">II", patched, at + 22, width, height)  # XTsiz, YTsiz
    return bytes(patched)


def poison_dicom(path: Path) -> Path:
    """A JPEG Baseline DICOM that makes GDCM abort the process decoding it: 4 stray bytes
    after the frame's SOF0 segment (libjpeg warns "extraneous bytes before marker"; GDCM
    turns the warning into a gdcm::Exception nobody catches: terminate, SIGABRT)."""
    _name, frame, extra = poison_variants()[0]
    return write_dicom(path, frame, syntax=JPEG_BASELINE, **extra)


def multiframe_bomb(path: Path) -> Path:
    """A native DICOM that declares 1,000,000 frames of 4096x4096 16-bit pixels (32 TB)
    and holds 64 KiB of them."""
    return write_dicom(
        path,
        b"\0" * (64 << 10),
        syntax=EXPLICIT_LE,
        rows=4096,
        columns=4096,
        bits_allocated=16,
        encapsulated=False,
        NumberOfFrames=1_000_000,
    )


def lying_j2k_dicom(path: Path) -> Path:
    """A JPEG 2000 DICOM whose header says 64x64 while its codestream's SIZ marker
    declares one 60000x60000 tile: the decoder would allocate what the codestream says."""
    codestream = j2k_with_siz(j2k_codestream(noise()), 60000, 60000)
    return write_dicom(path, codestream, syntax=J2K_LOSSLESS)
