"""DICOM input: the pixel pipeline (Modality LUT, window, MONOCHROME1, middle frame,
JPEG), the header columns, clear errors, the walk by content, training's listing and the
modality-agreement query on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from modlabel import decode, store
from modlabel.dicom import dicom_header
from modlabel.model import OnnxModel
from modlabel.queries import load_query, run_query
from modlabel.scan import scan_archive
from modlabel.source import ImageFilter, is_image_file

ROWS, COLUMNS = 20, 30


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    syntax: str = uid.ExplicitVRLittleEndian,
    encapsulated: bytes | None = None,
    **attributes,
) -> Path:
    """A DICOM file (preamble, DICM, file meta) holding ``pixels``: (rows, columns) or
    (frames, rows, columns) uint16, or the ``encapsulated`` fragments of ``syntax``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    ds.SOPClassUID = uid.SecondaryCaptureImageStorage
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    if pixels is not None or encapsulated is not None:
        shape = pixels.shape if pixels is not None else (ROWS, COLUMNS)
        ds.Rows, ds.Columns = shape[-2], shape[-1]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        if pixels is not None and pixels.ndim == 3:
            ds.NumberOfFrames = pixels.shape[0]
        ds.PixelData = encapsulated if encapsulated is not None else pixels.tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(low: int, high: int) -> np.ndarray:
    return np.linspace(low, high, ROWS * COLUMNS).round().reshape(ROWS, COLUMNS).astype(np.uint16)


def gray(path: Path) -> np.ndarray:
    """The decoded pixels at the file's own size (no resampling), one channel."""
    pixels, original = decode.load_pixels(path, (ROWS, COLUMNS))
    assert original == (COLUMNS, ROWS)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    return pixels[..., 0].astype(int)


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, onto 0..255."""
    out = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.clip(np.rint(out), 0, 255).astype(int)


def test_ct_goes_through_rescale_and_window(tmp_path):
    stored = ramp(0, 2000)
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024,
                       WindowCenter=40, WindowWidth=400)  # fmt: skip
    hounsfield = stored.astype(float) - 1024
    assert (gray(path) == linear_window(hounsfield, 40, 400)).all()
    # The window is applied after the rescale: without the intercept the picture differs.
    assert (gray(path) != linear_window(stored.astype(float), 40, 400)).any()


def test_monochrome1_is_inverted_and_stretched_without_a_window(tmp_path):
    stored = ramp(100, 3000)
    path = write_dicom(tmp_path / "cr.dcm", stored, modality="CR", photometric="MONOCHROME1")
    stretched = np.rint((stored - 100.0) * 255 / 2900).astype(int)
    assert (gray(path) == 255 - stretched).all()


def test_a_multi_frame_file_gives_its_middle_frame(tmp_path):
    frames = np.stack([ramp(0, 255) + 1000 * k for k in range(3)]).astype(np.uint16)
    path = write_dicom(tmp_path / "mr.dcm", frames, modality="MR",
                       WindowCenter=1128, WindowWidth=256)  # fmt: skip
    assert (gray(path) == linear_window(frames[1].astype(float), 1128, 256)).all()


def _jpeg_dicom(path: Path) -> tuple[Path, np.ndarray]:
    rgb = np.zeros((ROWS, COLUMNS, 3), np.uint8)
    rgb[..., 0], rgb[:, COLUMNS // 2 :, 2] = 200, 220  # red, the right half also blue
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95)
    write_dicom(path, None, modality="OP", syntax=uid.JPEGBaseline8Bit,
                encapsulated=encapsulate([buffer.getvalue()]), photometric="YBR_FULL_422",
                SamplesPerPixel=3, BitsAllocated=8, BitsStored=8, HighBit=7,
                PlanarConfiguration=0)  # fmt: skip
    return path, rgb


def test_jpeg_baseline_decodes_to_rgb(tmp_path):
    path, rgb = _jpeg_dicom(tmp_path / "fundus.dcm")
    pixels, original = decode.load_pixels(path, (ROWS, COLUMNS))
    assert original == (COLUMNS, ROWS)
    assert np.abs(pixels.astype(int) - rgb).mean() < 6  # lossy, but the colours are RGB


def _recompress(source: Path, syntax: str, out: Path) -> Path:
    """``source`` re-encoded losslessly in ``syntax``: pydicom's own RLE encoder, Pillow's
    JPEG 2000, or GDCM for lossless JPEG and JPEG-LS (pydicom has no encoder for those)."""
    if syntax == uid.RLELossless:
        ds = pydicom.dcmread(source)
        ds.compress(syntax)
        ds.save_as(out)
    elif syntax == uid.JPEG2000Lossless:
        buffer = io.BytesIO()
        Image.fromarray(pydicom.dcmread(source).pixel_array).save(
            buffer, "JPEG2000", irreversible=False, no_jp2=True
        )
        write_dicom(out, None, syntax=syntax, encapsulated=encapsulate([buffer.getvalue()]))
    else:
        import gdcm

        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(syntax)))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(str(out))
        assert writer.Write()
    assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    return out


@pytest.mark.parametrize(
    "syntax",
    [uid.RLELossless, uid.JPEG2000Lossless, uid.JPEGLosslessSV1, uid.JPEGLSLossless],
    ids=lambda s: s.name,
)
def test_lossless_transfer_syntaxes_decode_to_the_same_pixels(tmp_path, syntax):
    plain = write_dicom(tmp_path / "plain.dcm", ramp(0, 4000))
    assert (gray(_recompress(plain, syntax, tmp_path / "packed.dcm")) == gray(plain)).all()


def test_broken_files_get_a_clear_reason(tmp_path):
    no_pixels = write_dicom(tmp_path / "report.dcm", None, modality="SR")
    mpeg = write_dicom(tmp_path / "video.dcm", None, syntax=uid.MPEG4HP41,
                       encapsulated=encapsulate([b"\0" * 64]))  # fmt: skip
    truncated = tmp_path / "cut.dcm"
    truncated.write_bytes(write_dicom(tmp_path / "whole.dcm", ramp(0, 9)).read_bytes()[:-300])
    with pytest.raises(decode.ImageError, match="without pixel data"):
        decode.load_pixels(no_pixels, (8, 8))
    with pytest.raises(decode.ImageError, match=r"unsupported DICOM transfer syntax MPEG-4"):
        decode.load_pixels(mpeg, (8, 8))
    with pytest.raises(decode.ImageError, match="frames of 30x20 but the pixel data holds"):
        decode.load_pixels(truncated, (8, 8))


def test_extensionless_dicom_is_found_by_content(tmp_path):
    write_dicom(tmp_path / "IM000001", ramp(0, 99))
    write_dicom(tmp_path / "1.2.840.113619.2.55", ramp(0, 99))  # named by its UID
    (tmp_path / "NOTES").write_bytes(b"\0" * 200)
    (tmp_path / "readme.txt").write_bytes(b"\0" * 128 + b"DICM")  # a suffix: never opened
    found = [p.name for p in sorted(tmp_path.iterdir()) if ImageFilter().is_image(str(p))]
    assert found == ["1.2.840.113619.2.55", "IM000001"]
    assert is_image_file(tmp_path / "x.DCM") and not is_image_file(tmp_path / "gone")


def _archive(folder: Path) -> Path:
    folder.mkdir()
    write_dicom(folder / "ct.dcm", ramp(0, 2000), RescaleSlope=1, RescaleIntercept=-1024,
                WindowCenter=40, WindowWidth=400)  # fmt: skip
    write_dicom(folder / "cr.DICOM", ramp(100, 3000), modality="CR", photometric="MONOCHROME1")
    frames = np.stack([ramp(0, 255) + 1000 * k for k in range(3)]).astype(np.uint16)
    write_dicom(folder / "mr.dcm", frames, modality="MR", WindowCenter=1128, WindowWidth=256)
    _jpeg_dicom(folder / "fundus.dcm")
    write_dicom(folder / "IM000001", ramp(0, 500), modality="US")
    write_dicom(folder / "report.dcm", None, modality="SR")
    return folder


@pytest.fixture(params=["sqlite", "postgresql"])
def scanned(request, tmp_path, tiny_onnx):
    """A scanned DICOM archive: (engine, folder)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'labels.db'}"
    else:  # a database of its own: the session's one is shared by the other tests
        url = request.getfixturevalue("postgres_database")("dicom")
    engine = store.open_db(url)
    folder = _archive(tmp_path / "archive")
    stats = scan_archive([folder], OnnxModel(tiny_onnx), engine, class_min_confidence=0.0)
    assert (stats.labeled, stats.errors, stats.skipped) == (5, 1, 0)
    yield engine, folder
    engine.dispose()


def _rows(engine) -> dict[str, sa.Row]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(store.images)).all()
    return {Path(r.path).name: r for r in rows}


def test_a_scan_labels_dicom_and_stores_the_header(scanned):
    engine, folder = scanned
    rows = _rows(engine)
    assert sorted(rows) == ["IM000001", "cr.DICOM", "ct.dcm", "fundus.dcm", "mr.dcm",
                            "report.dcm"]  # fmt: skip
    for name in ("IM000001", "cr.DICOM", "ct.dcm", "fundus.dcm", "mr.dcm"):
        assert rows[name].label is not None and rows[name].error is None, name
        assert (rows[name].width, rows[name].height) == (COLUMNS, ROWS)
    assert rows["report.dcm"].label is None
    assert "without pixel data" in rows["report.dcm"].error
    expected = {"ct.dcm": "CT", "cr.DICOM": "CR", "mr.dcm": "MR", "fundus.dcm": "OP",
                "IM000001": "US", "report.dcm": "SR"}  # fmt: skip
    for name, modality in expected.items():
        assert rows[name].dicom_modality == modality
        assert rows[name].dicom_body_part == "CHEST"
        assert rows[name].dicom_sop_uid.startswith("1.2.")
    header = dicom_header((folder / "ct.dcm").read_bytes())
    assert header is not None and rows["ct.dcm"].dicom_sop_uid == header.sop_instance_uid


MAPPING = {"CT": "abdominal_ct", "MR": "brain_mri", "US": "ultrasound", "CR": "chest_xray",
           "OP": "retinal_funduscopy"}  # fmt: skip


def test_modality_agreement_lists_the_disagreements(scanned):
    engine, _folder = scanned
    rows = _rows(engine)
    # Make the outcome certain whatever the tiny model predicts (or flags out of set: these
    # ramps are no modality): the CT row agrees with its header, the MR row disagrees.
    with engine.begin() as conn:
        for name, label in (("ct.dcm", "abdominal_ct"), ("mr.dcm", "chest_xray")):
            conn.execute(
                store.images.update()
                .where(store.images.c.path == rows[name].path)
                .values(label=label, out_of_set=False)
            )
    rows = _rows(engine)
    columns, found = run_query(engine, load_query("modality-agreement"), {})
    assert columns[:3] == ["path", "dicom_modality", "dicom_body_part"]
    assert {"label", "confidence", "out_of_set"} <= set(columns)
    listed = {Path(r[0]).name: r[columns.index("out_of_set")] for r in found}
    # Images flagged out of set are listed too, with their flag: their label is least sure.
    expected = {
        name: r.out_of_set
        for name, r in rows.items()
        if r.label is not None and MAPPING.get(r.dicom_modality, r.label) != r.label
    }
    assert listed == expected and "mr.dcm" in listed and "ct.dcm" not in listed
    assert listed["mr.dcm"] in (False, 0)


def test_training_lists_dicom_files(tmp_path):
    from modlabel.train.data import _list_images

    archive = tmp_path / "data"
    for name in ("abdominal_ct", "chest_xray"):
        (archive / name).mkdir(parents=True)
    write_dicom(archive / "abdominal_ct" / "a.dcm", ramp(0, 99))
    write_dicom(archive / "abdominal_ct" / "IM000002", ramp(0, 99))
    Image.new("L", (8, 8)).save(archive / "chest_xray" / "b.png")
    (archive / "chest_xray" / "notes.txt").write_text("not an image")
    listed = _list_images(archive, archive, ["abdominal_ct", "chest_xray"])
    assert listed == [("abdominal_ct/IM000002", 0), ("abdominal_ct/a.dcm", 0),
                      ("chest_xray/b.png", 1)]  # fmt: skip


def test_open_rgb_reads_dicom_for_the_report(tmp_path):
    path = shutil.copyfile(_jpeg_dicom(tmp_path / "a.dcm")[0], tmp_path / "NOSUFFIX")
    assert decode.open_rgb(path).size == (COLUMNS, ROWS)
