"""decode and source: every image mode to RGB, clear errors for bad files, stable walks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from modlabel import decode, limits
from modlabel.errors import ImageError
from modlabel.reasons import Kind
from modlabel.source import FileEntry, Unreadable, walk_files


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_every_mode_decodes_to_rgb(tmp_path, mode):
    path = tmp_path / f"img.{'tiff' if mode in ('I;16', 'CMYK') else 'png'}"
    Image.new(mode, (30, 20)).save(path)
    pixels, original = decode.load_pixels(path, (16, 24))
    assert pixels.shape == (16, 24, 3) and pixels.dtype == np.uint8
    assert original == (30, 20)


def test_sixteen_bit_images_are_stretched_not_clipped(tmp_path):
    arr = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "ct.png")
    pixels, _ = decode.load_pixels(tmp_path / "ct.png", (64, 64))
    assert pixels.min() == 0 and pixels.max() == 255


def test_resize_is_a_bilinear_stretch_of_the_whole_image(tmp_path):
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 40:] = 255  # right half white
    Image.fromarray(arr).save(tmp_path / "half.png")
    pixels, original = decode.load_pixels(tmp_path / "half.png", (10, 10))
    assert original == (80, 40)
    assert pixels[:, :4].max() == 0 and pixels[:, 6:].min() == 255


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not a recognized image format"),
        (b"hello", "not a recognized image format"),
    ],
)
def test_bad_files_name_the_file_and_the_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError) as err:
        decode.load_pixels(path, (8, 8))
    assert str(path) in str(err.value) and reason in str(err.value)


def test_truncated_jpeg_is_an_error(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        tmp_path / "ok.jpg"
    )
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cannot decode"):
        decode.load_pixels(tmp_path / "cut.jpg", (8, 8))


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        decode.open_rgb(tmp_path / "nope.png")


def test_huge_images_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_PIXELS", 100)
    Image.new("L", (20, 20)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="too large"):
        decode.open_rgb(tmp_path / "big.png")


def test_normalize_applies_mean_and_std():
    pixels = np.full((2, 2, 3), 100, np.uint8)
    out = decode.normalize(pixels, (50, 100, 150), (2, 1, 10))
    assert out.dtype == np.float32
    assert np.allclose(out[0, 0], [25, 0, -5])


def test_walk_is_sorted_skips_hidden_and_non_images_and_reports_missing_roots(tmp_path):
    for rel in ["b/2.jpg", "b/1.PNG", "a/x.tif", ".hidden/h.jpg", "a/notes.txt", "a/.h.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = list(walk_files([tmp_path, tmp_path / "missing"]))
    paths = [e.path for e in found if isinstance(e, FileEntry)]
    assert paths == [str(tmp_path / p) for p in ["a/x.tif", "b/1.PNG", "b/2.jpg"]]
    gone = Unreadable(str(tmp_path / "missing"), "no such file or directory", Kind.GONE)
    assert found[-1] == gone


def test_large_jpegs_are_decoded_at_a_reduced_scale_with_their_own_size_reported(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (30, 40, 3), np.uint8)
    big = Image.fromarray(base).resize((1200, 900), Image.Resampling.BILINEAR)
    big.save(tmp_path / "big.jpg", quality=92)
    pixels, original = decode.load_pixels(tmp_path / "big.jpg", (60, 80))
    assert original == (1200, 900)
    full = decode.resize_rgb(decode.open_rgb(tmp_path / "big.jpg"), (60, 80))
    assert pixels.shape == full.shape == (60, 80, 3)
    # The DCT-scaled decode sees nearly the same picture as the full decode, even for
    # this worst case of colour noise (natural images differ far less).
    assert np.abs(pixels.astype(float) - full.astype(float)).mean() < 6.0


def test_float_images_are_stretched_not_clipped_to_black(tmp_path):
    arr = np.linspace(0.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(arr, "F").save(tmp_path / "float.tif")
    pixels, _ = decode.load_pixels(tmp_path / "float.tif", (32, 32))
    assert pixels.min() == 0 and pixels.max() == 255


def test_images_just_above_pillows_default_limit_are_decoded(tmp_path, monkeypatch):
    # Pillow warns above its MAX_IMAGE_PIXELS; modlabel's own limit is what refuses.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("L", (12, 12)).save(tmp_path / "a.png")
    pixels, original = decode.load_pixels(tmp_path / "a.png", (4, 4))
    assert original == (12, 12) and pixels.shape == (4, 4, 3)


def test_overlapping_roots_are_walked_once(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for rel in ["a/1.jpg", "a/sub/2.jpg"]:
        (tmp_path / rel).write_bytes(b"x")
    roots = [tmp_path / "a", tmp_path / "a" / "sub", tmp_path / "a" / "1.jpg", tmp_path / "a"]
    paths = [e.path for e in walk_files(roots)]
    assert paths == [str(tmp_path / "a/1.jpg"), str(tmp_path / "a/sub/2.jpg")]


def test_a_linked_file_is_statted_through_its_link(tmp_path):
    (tmp_path / "real.jpg").write_bytes(b"x" * 10)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "link.jpg").symlink_to(tmp_path / "real.jpg")
    (entry,) = walk_files([tmp_path / "dir"])
    assert entry.size_bytes == 10  # the target's size, so a changed target is seen


def _rotated_jpeg_pair(tmp_path):
    """An upright JPEG and the same picture stored turned, with EXIF orientation 6
    ("turn 90 degrees clockwise to show"), as a phone camera writes it."""
    from PIL import Image

    upright = np.zeros((60, 40, 3), np.uint8)  # tall: white top third, gray bottom
    upright[:20] = 255
    upright[40:] = 128
    plain = tmp_path / "upright.jpg"
    Image.fromarray(upright).save(plain, quality=95)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # as the sensor saw it
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = tmp_path / "turned.jpg"
    stored.save(turned, quality=95, exif=exif.tobytes())
    return plain, turned


def test_exif_orientation_is_applied_so_a_turned_photo_decodes_upright(tmp_path):
    plain, turned = _rotated_jpeg_pair(tmp_path)
    from modlabel.decode import load_pixels

    want, want_size = load_pixels(plain, (30, 20))
    got, got_size = load_pixels(turned, (30, 20))
    assert got_size == want_size == (40, 60)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 8  # JPEG noise only
    assert got[:5].mean() > 200 and got[-5:].mean() < 160  # white on top, as shown


def test_training_reads_turned_photos_upright(tmp_path):
    from modlabel.train.data import make_dataset

    plain, turned = _rotated_jpeg_pair(tmp_path)
    dataset = make_dataset(
        [str(plain), str(turned)],
        np.array([0, 0]),
        input_size=(30, 20),
        mean=[0.0, 0.0, 0.0],
        std=[1.0, 1.0, 1.0],
        batch_size=2,
    )
    x, _, weights = next(iter(dataset))
    assert weights.numpy().tolist() == [1.0, 1.0]
    assert np.abs(x[0].numpy() - x[1].numpy()).max() <= 8
