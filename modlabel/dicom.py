"""DICOM: a hospital export's files to 8-bit pixels, and the header fields kept beside a label.

Part of the decode step: ``modlabel.decode`` hands a file here when its bytes are
DICOM (``DICM`` at byte 128, or a file meta group at byte 0) or its name ends in
``.dcm``/``.dicom``. The pixels go the way a viewer shows them (PS3.3 C.11):

1. one frame: the middle one of a multi-frame file (index ``N // 2``, 0-based);
   only that frame is decoded (``pydicom.pixels.pixel_array(ds, index=...)``);
2. grayscale: the Modality LUT (RescaleSlope/Intercept, or a Modality LUT table),
   then the first window (WindowCenter/WindowWidth, with its VOILUTFunction) or
   VOI LUT table mapped onto 0..255; without either, the frame's own min-max
   range is stretched to 0..255. MONOCHROME1 (white is low) is inverted;
3. colour: PALETTE COLOR through its palette, YBR_* converted to RGB, then
   scaled to 8 bits by BitsStored.

The 8-bit frame then goes through the same resampling as every other image.
Grayscale values are converted in strips of rows, so a large frame costs its own
pixels plus a few MB, never a full-size float64 copy.

A file is parsed once (``read_dataset``) for its header and its pixels, and every
size it declares is checked before anything proportional to it is allocated:

* a Deflated Explicit VR Little Endian dataset is inflated to at most the byte limit
  a file may have (``--max-file-size``), never whole first;
* Rows x Columns of a frame, and either side, within decode's limits; a frame count
  that the pixel data can really hold (native: the bytes are there; encapsulated: at
  least one fragment a frame);
* an encapsulated frame's own codestream header (JPEG's SOF, JPEG-LS's SOF55,
  JPEG 2000's SIZ) must declare the size the DICOM header says, since its decoder
  allocates what the codestream declares.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import config, limits
from .errors import ImageError, one_line
from .reasons import Kind

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
PREAMBLE_BYTES = 128
MAGIC = b"DICM"
HEAD_BYTES = PREAMBLE_BYTES + len(MAGIC)  # what ``looks_like_dicom`` needs of a file

# A file without the 128-byte preamble starts with its file meta group (0002,xxxx),
# in explicit VR little endian: (0002,0000) UL or (0002,0001) OB.
_META_STARTS = (b"\x02\x00\x00\x00UL", b"\x02\x00\x01\x00OB")

# The widths of the images.dicom_* columns (store.images): longer values are cut.
_MODALITY_CHARS, _BODY_PART_CHARS, _UID_CHARS = 16, 64, 64

# Converted at a time: a quarter megapixel of float64 is 2 MB.
_STRIP_PIXELS = config.DECODE_STRIP_PIXELS


def looks_like_dicom(head: bytes) -> bool:
    """True when ``head`` (a file's first bytes, at least ``HEAD_BYTES``) is DICOM."""
    return head[PREAMBLE_BYTES:HEAD_BYTES] == MAGIC or head[:6] in _META_STARTS


def is_dicom_name(name: str | Path) -> bool:
    """True when the file name ends in ``.dcm`` or ``.dicom`` (any case)."""
    return Path(name).suffix.lower() in DICOM_SUFFIXES


@dataclass(frozen=True)
class DicomHeader:
    """The header fields stored beside a label (``images.dicom_*``); None when absent."""

    modality: str | None  # (0008,0060) Modality: CT, MR, US, CR, DX, OP, SM, ...
    body_part: str | None  # (0018,0015) BodyPartExamined: CHEST, HEAD, ...
    sop_instance_uid: str | None  # (0008,0018) SOPInstanceUID: the image's identity

    def columns(self) -> dict[str, str | None]:
        """The ``images`` columns of this header."""
        return {
            "dicom_modality": self.modality,
            "dicom_body_part": self.body_part,
            "dicom_sop_uid": self.sop_instance_uid,
        }


NO_HEADER_COLUMNS: dict[str, str | None] = {
    "dicom_modality": None,
    "dicom_body_part": None,
    "dicom_sop_uid": None,
}


def dicom_header(data: bytes, max_bytes: int | None = None) -> DicomHeader | None:
    """The header fields of DICOM bytes; None when the bytes are not DICOM or unreadable.

    Parsed as ``read_dataset`` parses (a deflated dataset inflated within ``max_bytes``).
    """
    if not looks_like_dicom(data[:HEAD_BYTES]):
        return None
    try:
        return header_of(read_dataset(data, "<bytes>", max_bytes=max_bytes))
    except Exception:  # a corrupt header: the pixel decode gives the reason
        return None


def header_of(ds) -> DicomHeader:
    """The ``images.dicom_*`` fields of a parsed dataset."""
    return DicomHeader(
        modality=_text(ds.get("Modality"), _MODALITY_CHARS),
        body_part=_text(ds.get("BodyPartExamined"), _BODY_PART_CHARS),
        sop_instance_uid=_text(ds.get("SOPInstanceUID"), _UID_CHARS),
    )


# A deflated dataset is inflated to at most this many bytes unless told otherwise: the
# largest file a scan reads (source.DEFAULT_MAX_FILE_BYTES).
DEFAULT_INFLATED_BYTES = 256 * 1024 * 1024


def read_dataset(source: str | Path | bytes, label: str, *, max_bytes: int | None = None):
    """Parse a DICOM file (its bytes, or a path) once, whole, for header and pixels.

    A Deflated Explicit VR Little Endian dataset is inflated to at most ``max_bytes``
    (default ``DEFAULT_INFLATED_BYTES``): pydicom's own reader inflates it whole, twice,
    before any check, so a 4 MB file could take gigabytes. Raises ``ImageError``.
    """
    import pydicom
    from pydicom import uid
    from pydicom.filereader import read_preamble

    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    limit = DEFAULT_INFLATED_BYTES if max_bytes is None else max_bytes
    fp = io.BytesIO(data)
    try:
        preamble = read_preamble(fp, True)
        meta = _read_meta(fp)
    except Exception:
        meta = None
    if (
        meta is not None
        and str(meta.get("TransferSyntaxUID", "")) == uid.DeflatedExplicitVRLittleEndian
    ):
        start = fp.tell()
        inflated = _inflate(data, start, limit, label)
        from pydicom.dataset import FileDataset
        from pydicom.filereader import read_dataset as read_plain

        try:
            dataset = read_plain(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
        except Exception as exc:
            raise ImageError(label, f"cannot read deflated DICOM: {_why(exc)}") from None
        ds = FileDataset(label, dataset, preamble=preamble, file_meta=meta,
                         is_implicit_VR=False, is_little_endian=True)  # fmt: skip
        ds.set_original_encoding(False, True, dataset._character_set)
        # Inflated, the dataset is Explicit VR Little Endian: pydicom decodes it as such.
        ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
        return ds
    try:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise ImageError(label, f"cannot read DICOM: {_why(exc)}") from None


def _read_meta(fp):
    from pydicom.filereader import _read_file_meta_info

    return _read_file_meta_info(fp)


def _inflate(data: bytes, start: int, limit: int, label: str) -> bytes:
    import zlib

    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(memoryview(data)[start:], limit + 1)
    except zlib.error as exc:
        raise ImageError(label, f"deflated DICOM is corrupt ({exc})") from None
    if len(out) > limit:
        raise ImageError(
            label,
            f"deflated DICOM inflates to more than {limit:,} bytes (the file size limit, "
            "--max-file-size)",
            Kind.TOO_LARGE,
        )
    return out


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _text(value: object, width: int) -> str | None:
    """A header value as stored: one line, control characters as escapes (an ESC in a
    Modality never reaches a terminal or a CSV), cut to the column's ``width``."""
    text = one_line(value, width + 1) if value is not None else ""
    return text[:width] or None


def dicom_image(
    source, label: str, max_pixels: int, *, max_bytes: int | None = None
) -> Image.Image:
    """One frame of a DICOM file (bytes, a path, or a dataset ``read_dataset`` parsed) as an
    8-bit PIL image (mode ``L`` or ``RGB``), full size.

    Raises ``ImageError`` with the reason: no pixel data, an unsupported transfer
    syntax, a declared size over the limits, a corrupt file.
    """
    import pydicom

    try:
        ds = source if hasattr(source, "dir") else read_dataset(source, label, max_bytes=max_bytes)
        if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise ImageError(label, _why_no_pixels(ds), Kind.NOT_AN_IMAGE)
        syntax = _transfer_syntax(ds)
        _check_decoder(syntax, label)
        rows, columns = int(ds.Rows), int(ds.Columns)
        limits.check_declared_size(label, columns, rows)
        if rows * columns > max_pixels:
            raise ImageError(label, f"image too large ({columns}x{rows} pixels)", Kind.OVER_LIMITS)
        frames = _frame_count(ds, label)
        index = frames // 2 if frames > 1 else None
        if syntax.is_encapsulated and "PixelData" in ds:
            _check_codestream(ds, index or 0, frames, rows, columns, label)
        frame = pydicom.pixels.pixel_array(ds, index=index)
        if frame.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
            frame = frame[0]  # a one-frame file that still says NumberOfFrames
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if frame.ndim == 2 and photometric != "PALETTE COLOR":
            return Image.fromarray(_gray_to_8bit(frame, ds, invert=photometric == "MONOCHROME1"))
        return Image.fromarray(_color_to_8bit(frame, ds, photometric), "RGB")
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # pydicom and its decoder plugins raise many kinds
        raise ImageError(label, f"cannot decode DICOM: {_why(exc)}") from None


# The sample sizes a frame may declare, and the most samples a pixel may have.
_BITS_ALLOCATED = (1, 8, 16, 32, 64)
_MAX_SAMPLES = 4


def _frame_count(ds, label: str) -> int:
    """NumberOfFrames, checked against what the pixel data can really hold."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError) as exc:
        raise ImageError(label, f"DICOM header has a malformed size ({exc})") from None
    if frames < 1:
        raise ImageError(label, f"DICOM header declares {frames} frames", Kind.OVER_LIMITS)
    if not 1 <= samples <= _MAX_SAMPLES or bits not in _BITS_ALLOCATED:
        declared = f"DICOM header declares {samples} samples of {bits} bits a pixel"
        raise ImageError(label, declared, Kind.OVER_LIMITS)
    if "PixelData" not in ds:
        return frames
    data = ds.PixelData
    length = len(data) if data is not None else 0
    if _transfer_syntax(ds).is_encapsulated:
        from pydicom.encaps import parse_fragments

        try:
            fragments, _offsets = parse_fragments(data)
        except Exception as exc:
            raise ImageError(label, f"DICOM pixel data is corrupt ({_why(exc)})") from None
        if frames > max(fragments, 1):
            raise ImageError(
                label,
                f"DICOM header declares {frames:,} frames but the pixel data holds "
                f"{fragments:,} fragments",
                Kind.OVER_LIMITS,
            )
        return frames
    frame_bits = int(ds.Rows) * int(ds.Columns) * samples * bits
    if frames * frame_bits > 8 * length + 8 * 2:  # a padding byte or two is allowed
        raise ImageError(
            label,
            f"DICOM header declares {frames:,} frames of {ds.Columns}x{ds.Rows} but the "
            f"pixel data holds {length:,} bytes",
            Kind.OVER_LIMITS,
        )
    return frames


def _check_codestream(ds, index: int, frames: int, rows: int, columns: int, label: str) -> None:
    """The frame's own codestream must declare the header's size: its decoder allocates
    what the codestream says, whatever Rows and Columns say."""
    from pydicom.encaps import get_frame

    try:
        frame = get_frame(ds.PixelData, index, number_of_frames=frames)
    except Exception as exc:
        raise ImageError(label, f"DICOM pixel data is corrupt ({_why(exc)})") from None
    declared = codestream_size(frame)
    if declared is None:
        return  # RLE and other codings carry no size of their own: the header's is used
    coding, width, height, components = declared
    if (width, height) != (columns, rows) or not 1 <= components <= _MAX_SAMPLES:
        raise ImageError(
            label,
            f"the {coding} codestream declares {width}x{height} pixels with {components} "
            f"components, but the DICOM header says {columns}x{rows}",
            Kind.OVER_LIMITS,
        )


# JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman and
# arithmetic), and JPEG-LS's SOF55.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                       0xCE, 0xCF, 0xF7})  # fmt: skip


# The box that opens a JP2 file (ISO 15444-1 I.5.1), which some encoders put around a
# DICOM frame's JPEG 2000 codestream.
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def codestream_size(data: bytes) -> tuple[str, int, int, int] | None:
    """(kind, width, height, components) that a JPEG, JPEG-LS or JPEG 2000 codestream
    declares in its header, read without decoding; None for data of another kind."""
    import struct

    if data[:12] == JP2_SIGNATURE:  # a JP2 file around the codestream: its SIZ inside
        start = data.find(b"\xff\x4f\xff\x51")
        if start < 0:
            return None
        data = data[start:]
    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 42:  # J2K: SOC, then SIZ
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", data[8:24])
        (csiz,) = struct.unpack(">H", data[40:42])
        return "JPEG 2000", xsiz - xosiz, ysiz - yosiz, csiz
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None  # not a marker where one must be: let the decoder say why
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF and pos + 10 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            kind = "JPEG-LS" if marker == 0xF7 else "JPEG"
            return kind, width, height, data[pos + 9]
        if marker in (0xDA, 0xD9):  # scan data before any frame header
            return None
        pos += 2 + length
    return None


def _why_no_pixels(ds) -> str:
    """The reason a dataset read (by force) has no pixel data: not DICOM, or not an image."""
    if getattr(ds, "preamble", None) is None and "TransferSyntaxUID" not in ds.file_meta:
        return "not a DICOM file (no 'DICM' marker at byte 128)"
    if len(ds) == 0:
        return "not a valid DICOM file (no data elements)"
    return "DICOM file without pixel data (not an image object)"


def _transfer_syntax(ds):
    """The dataset's transfer syntax; for a file without one, what it was read as."""
    from pydicom import uid

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None:
        return uid.UID(str(syntax))
    implicit, little = ds.original_encoding
    if implicit:
        syntax = uid.ImplicitVRLittleEndian
    else:
        syntax = uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = syntax  # pydicom decodes by it
    return syntax


def _check_decoder(syntax, label: str) -> None:
    from pydicom.pixels import get_decoder

    name = f"{syntax.name} ({syntax})" if syntax.is_transfer_syntax else str(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageError(
            label, f"unsupported DICOM transfer syntax {name}", Kind.UNSUPPORTED
        ) from None
    if not decoder.is_available:
        raise ImageError(
            label, f"no decoder installed for DICOM transfer syntax {name}", Kind.UNSUPPORTED
        )


def _gray_to_8bit(frame: np.ndarray, ds, *, invert: bool) -> np.ndarray:
    """(rows, columns) stored values to uint8 through the Modality LUT and the VOI."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    to_8bit = _window(ds)
    if to_8bit is None and "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        scale = 255.0 / (2**bits - 1)

        def to_8bit(values: np.ndarray) -> np.ndarray:
            return apply_voi_lut(values, ds, prefer_lut=True) * scale

    rows = max(1, _STRIP_PIXELS // max(1, frame.shape[1]))
    strips = [frame[top : top + rows] for top in range(0, frame.shape[0], rows)]  # views

    def modality(strip: np.ndarray) -> np.ndarray:
        return np.asarray(apply_modality_lut(strip, ds), dtype=np.float64)

    if to_8bit is None:  # no window: the frame's own range, as for other 16-bit images
        # Two passes over the strips rather than one float64 copy of the whole frame.
        ranges = [(float(v.min()), float(v.max())) for v in map(modality, strips)]
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)

        def to_8bit(values: np.ndarray) -> np.ndarray:
            return (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)

    out = np.empty(frame.shape, np.uint8)
    top = 0
    for strip in strips:
        eight = np.clip(np.rint(to_8bit(modality(strip))), 0, 255).astype(np.uint8)
        out[top : top + len(strip)] = 255 - eight if invert else eight
        top += len(strip)
    return out


def _window(ds) -> Callable[[np.ndarray], np.ndarray] | None:
    """The first window of the header as a function of modality values to 0..255 (floats).

    PS3.3 C.11.2.1.2: LINEAR (the default), LINEAR_EXACT and SIGMOID, with the
    output range 0..255. None when the header has no usable window.
    """
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    c, w = _first(center), _first(width)
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if function == "SIGMOID" and w > 0:
        return lambda x: 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT" and w > 0:
        return lambda x: ((x - c) / w + 0.5) * 255.0
    if w >= 1:
        # LINEAR: x <= c - 0.5 - (w-1)/2 gives 0, x > c - 0.5 + (w-1)/2 gives 255.
        return lambda x: ((x - (c - 0.5)) / max(w - 1.0, 1e-9) + 0.5) * 255.0
    return None


def _first(value: object) -> float:
    """The first of a multi-valued element (several windows: the first is the default)."""
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)


def _color_to_8bit(frame: np.ndarray, ds, photometric: str) -> np.ndarray:
    """(rows, columns, 3) RGB uint8 of a colour frame (RGB, YBR_* already as RGB, palette)."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        frame = apply_color_lut(frame, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        bits = int(ds.get("BitsStored", 8))
    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=2)
    if bits <= 8 and frame.dtype == np.uint8:
        return np.ascontiguousarray(frame[..., :3])
    scale = 255.0 / (2 ** max(bits, 1) - 1)
    return np.clip(np.rint(frame[..., :3] * scale), 0, 255).astype(np.uint8)
