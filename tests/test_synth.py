"""Tests for the synthetic archive renderer (modlabel.synth)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modlabel import synth
from modlabel.synth import (
    CLASS_NAMES,
    DISTRACTOR_LABELS,
    STRUCTURE_LABELS,
    SynthImage,
    image_seed,
    read_ground_truth,
    render_archive,
    render_image,
)

SIZE = 96


def _render(class_name: str, index: int, size: int = SIZE) -> SynthImage:
    return render_image(class_name, image_seed(0, CLASS_NAMES.index(class_name), index), size)


def _assert_valid_box(entry: dict, width: int, height: int) -> None:
    x0, y0, x1, y1 = entry["box"]
    assert all(isinstance(v, int) for v in entry["box"]), entry
    assert 0 <= x0 < x1 <= width, entry
    assert 0 <= y0 < y1 <= height, entry


def _box_mean(pixels: np.ndarray, box: list[int], channel: int | None = None) -> float:
    x0, y0, x1, y1 = box
    region = pixels[y0:y1, x0:x1].astype(np.float64)
    return float(region.mean() if channel is None else region[:, :, channel].mean())


def _first_box(synth_image: SynthImage, label: str) -> list[int]:
    return next(b["box"] for b in synth_image.boxes if b["label"] == label)


def test_class_names_are_the_papers_seven_modalities() -> None:
    assert len(CLASS_NAMES) == 7
    assert set(CLASS_NAMES) == set(STRUCTURE_LABELS)


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_each_class_renders_its_structures_inside_the_image(class_name: str) -> None:
    for index in range(4):
        result = _render(class_name, index)
        width, height = result.image.size
        assert result.image.mode == "RGB"
        assert result.class_name == class_name
        assert 0.75 * SIZE - 1 <= width <= 1.25 * SIZE + 1
        assert 0.75 * SIZE - 1 <= height <= 1.25 * SIZE + 1
        labels = {b["label"] for b in result.boxes}
        assert STRUCTURE_LABELS[class_name] <= labels, (index, labels)
        for entry in result.boxes:
            _assert_valid_box(entry, width, height)
        for entry in result.distractors:
            assert entry["label"] in DISTRACTOR_LABELS
            _assert_valid_box(entry, width, height)


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_every_class_renders_at_the_smallest_size(class_name: str) -> None:
    # Narrow bars once rounded to an inverted rectangle at this size.
    class_index = CLASS_NAMES.index(class_name)
    for index in range(25):
        result = render_image(class_name, image_seed(7, class_index, index), synth.MIN_SIZE)
        assert STRUCTURE_LABELS[class_name] <= {b["label"] for b in result.boxes}
        for entry in result.boxes:
            _assert_valid_box(entry, *result.image.size)


def test_structure_boxes_sit_on_their_structures() -> None:
    for index in range(3):
        fundus = _render("retinal_funduscopy", index)
        pixels = np.asarray(fundus.image)
        # The optic disc is the yellow-white spot: far more green than the red fundus.
        disc_green = _box_mean(pixels, _first_box(fundus, "optic_disc"), channel=1)
        fundus_green = _box_mean(pixels, _first_box(fundus, "fundus"), channel=1)
        assert disc_green > fundus_green + 40

        chest = _render("chest_xray", index)
        pixels = np.asarray(chest.image)
        heart = _box_mean(pixels, _first_box(chest, "heart"))
        for lung in ("right_lung", "left_lung"):
            assert _box_mean(pixels, _first_box(chest, lung)) < heart - 20

        scan = _render("ultrasound", index)
        pixels = np.asarray(scan.image)
        chamber = _box_mean(pixels, _first_box(scan, "chamber"))
        assert chamber < _box_mean(pixels, _first_box(scan, "sector"))

        ct = _render("abdominal_ct", index)
        pixels = np.asarray(ct.image)
        assert _box_mean(pixels, _first_box(ct, "spine")) > _box_mean(
            pixels, _first_box(ct, "body")
        )


def test_box_rotation_matches_the_pixel_rotation() -> None:
    width, height = 90, 60
    canvas = np.zeros((height, width), np.uint8)
    canvas[12, 70] = 255
    for angle in (-12.0, 7.0, 30.0):
        turned = Image.fromarray(canvas).rotate(
            angle, resample=Image.Resampling.NEAREST, center=(width / 2, height / 2)
        )
        row, col = np.unravel_index(np.asarray(turned).argmax(), (height, width))
        point = synth._rotate_points(np.array([[70.5, 12.5]]), angle, width / 2, height / 2)
        assert math.isclose(point[0, 0], col + 0.5, abs_tol=1.0)
        assert math.isclose(point[0, 1], row + 0.5, abs_tol=1.0)


def test_boxes_are_clipped_and_empty_ones_dropped() -> None:
    points = np.array([[-5.0, 3.5], [10.5, 50.0]])
    assert synth._points_box(points, 8, 20) == [0, 3, 8, 20]
    assert synth._points_box(np.array([[-3.0, -3.0], [-1.0, -2.0]]), 8, 20) is None


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    first = render_archive(tmp_path / "a", per_class=2, size=64, seed=3)
    again = render_archive(tmp_path / "b", per_class=2, size=64, seed=3)
    other = render_archive(tmp_path / "c", per_class=2, size=64, seed=4)
    files = sorted(p.relative_to(first.out) for p in first.out.rglob("*") if p.is_file())
    assert len(files) == 7 * 2 + 1
    for relative in files:
        assert (first.out / relative).read_bytes() == (again.out / relative).read_bytes()
    differing = [
        rel
        for rel in files
        if rel.suffix == ".jpg" and (first.out / rel).read_bytes() != (other.out / rel).read_bytes()
    ]
    assert len(differing) == 7 * 2


def test_an_image_does_not_depend_on_per_class(tmp_path: Path) -> None:
    small = render_archive(tmp_path / "small", per_class=1, size=64, seed=0)
    large = render_archive(tmp_path / "large", per_class=3, size=64, seed=0)
    for name in CLASS_NAMES:
        relative = f"{name}/{name}_00000.jpg"
        assert (small.out / relative).read_bytes() == (large.out / relative).read_bytes()
    assert read_ground_truth(small.ground_truth) == read_ground_truth(large.ground_truth)[::3]


def test_archive_layout_matches_its_ground_truth(tmp_path: Path) -> None:
    summary = render_archive(tmp_path / "archive", per_class=2, size=64, seed=0)
    assert summary.counts == {name: 2 for name in CLASS_NAMES}
    assert summary.total == 14
    assert summary.ground_truth == tmp_path / "archive" / "ground_truth.jsonl"
    for name in CLASS_NAMES:
        names = sorted(p.name for p in (summary.out / name).iterdir())
        assert names == [f"{name}_00000.jpg", f"{name}_00001.jpg"]

    records = read_ground_truth(summary.ground_truth)
    assert [r["path"] for r in records] == [
        f"{name}/{name}_{i:05d}.jpg" for name in CLASS_NAMES for i in range(2)
    ]
    for record in records:
        assert list(record) == ["path", "class", "width", "height", "boxes", "distractors"]
        assert record["path"].split("/")[0] == record["class"]
        with Image.open(summary.out / record["path"]) as img:
            assert img.format == "JPEG"
            assert img.mode == "RGB"
            assert img.size == (record["width"], record["height"])
        assert STRUCTURE_LABELS[record["class"]] <= {b["label"] for b in record["boxes"]}
        for entry in record["boxes"] + record["distractors"]:
            _assert_valid_box(entry, record["width"], record["height"])


def test_sizes_and_aspect_ratios_vary() -> None:
    shapes = [_render(name, index).image.size for name in CLASS_NAMES for index in range(4)]
    ratios = [w / h for w, h in shapes]
    assert len(set(shapes)) >= 20
    assert min(ratios) < 0.9 and max(ratios) > 1.1


def test_optic_disc_appears_on_both_sides() -> None:
    sides = set()
    for index in range(10):
        fundus = _render("retinal_funduscopy", index)
        dx0, _, dx1, _ = _first_box(fundus, "optic_disc")
        fx0, _, fx1, _ = _first_box(fundus, "fundus")
        sides.add("left" if (dx0 + dx1) < (fx0 + fx1) else "right")
    assert sides == {"left", "right"}


def test_distractors_appear_in_every_class_and_of_every_kind() -> None:
    kinds_per_class = {
        name: {d["label"] for index in range(10) for d in _render(name, index, 64).distractors}
        for name in CLASS_NAMES
    }
    assert all(kinds for kinds in kinds_per_class.values()), kinds_per_class
    assert set().union(*kinds_per_class.values()) == set(DISTRACTOR_LABELS)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown class"):
        render_image("x_ray_of_a_cat", rng, 64)
    with pytest.raises(ValueError, match="size"):
        render_image("brain_mri", rng, 8)
    with pytest.raises(ValueError, match="per_class"):
        render_archive(tmp_path, per_class=-1)
