"""Augmentation stays within the paper's ranges; the pipeline feeds the model
exactly what the runtime computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from modlabel.decode import load_pixels, normalize
from modlabel.train.augment import ROTATION_DEGREES, SHIFT_PIXELS, build_augmenter
from modlabel.train.data import make_dataset

SIDE = 65  # odd: the rotation center (32, 32) is a pixel center
CENTER = (SIDE - 1) / 2
COPIES = 200


def _dot_images(y: int, x: int) -> np.ndarray:
    """COPIES images, black but for one bright 3x3 dot centered on (y, x)."""
    image = np.zeros((SIDE, SIDE, 3), np.float32)
    image[y - 1 : y + 2, x - 1 : x + 2] = 255.0
    return np.repeat(image[None], COPIES, axis=0)


def _centroids(batch) -> np.ndarray:
    """(N, 2) intensity-weighted (y, x) of each image."""
    weights = np.asarray(batch)[..., 0].astype(np.float64)
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    total = weights.sum(axis=(1, 2))
    return np.stack(
        [(weights * ys).sum(axis=(1, 2)) / total, (weights * xs).sum(axis=(1, 2)) / total], axis=1
    )


def test_shift_moves_a_dot_by_at_most_3_pixels_each_way():
    shift = build_augmenter((SIDE, SIDE), seed=1).get_layer("shift")
    moved = _centroids(shift(_dot_images(32, 32), training=True)) - CENTER
    assert np.abs(moved).max() <= SHIFT_PIXELS + 1e-3
    # The range is used, in both directions of both axes.
    assert moved.max(axis=0).min() > 2.5 and moved.min(axis=0).max() < -2.5


def test_rotation_turns_by_at_most_5_degrees_about_the_center():
    rotate = build_augmenter((SIDE, SIDE), seed=2).get_layer("rotate")
    assert np.allclose(_centroids(rotate(_dot_images(32, 32), training=True)), CENTER, atol=1e-3)
    dy, dx = (_centroids(rotate(_dot_images(32, 32 + 24), training=True)) - CENTER).T
    angles = np.degrees(np.arctan2(dy, dx))
    assert np.abs(angles).max() <= ROTATION_DEGREES + 0.05
    assert angles.max() > 4.0 and angles.min() < -4.0
    assert np.allclose(np.hypot(dy, dx), 24, atol=0.3)  # a turn, not a shift


def test_rotation_and_shift_together_keep_the_center_dot_within_3_pixels():
    moved = (
        _centroids(build_augmenter((SIDE, SIDE), seed=3)(_dot_images(32, 32), training=True))
        - CENTER
    )
    assert np.abs(moved).max() <= SHIFT_PIXELS + 1e-3


def _write_images(folder: Path, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (30 + i, 41, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_pipeline_without_augmentation_equals_the_runtime_preprocessing(tmp_path: Path):
    paths = _write_images(tmp_path, 5)
    mean, std = [120.0, 110.5, 100.25], [60.0, 55.0, 50.0]
    ds = make_dataset(
        paths, np.array([0, 1, 0, 1, 1]), input_size=(24, 32), mean=mean, std=std, batch_size=2
    )
    x = np.concatenate([np.asarray(b[0]) for b in ds])
    w = np.concatenate([np.asarray(b[2]) for b in ds])
    expected = np.stack([normalize(load_pixels(p, (24, 32))[0], mean, std) for p in paths])
    np.testing.assert_array_equal(x, expected)
    np.testing.assert_array_equal(w, 1.0)


def test_unreadable_file_gets_weight_zero_and_augmentation_is_seeded(tmp_path: Path):
    paths = _write_images(tmp_path, 4)
    Path(paths[2]).write_bytes(b"not an image")
    common = {
        "input_size": (24, 24),
        "mean": [0.0] * 3,
        "std": [1.0] * 3,
        "batch_size": 4,
        "class_weights": [1.0, 3.0],
    }
    ds = make_dataset(paths, np.array([0, 1, 1, 0]), **common)
    np.testing.assert_array_equal(np.asarray(next(iter(ds))[2]), [1.0, 3.0, 0.0, 1.0])
    first, again = (
        np.asarray(
            next(
                iter(
                    make_dataset(
                        paths, np.zeros(4, int), augment=True, shuffle=True, seed=5, **common
                    )
                )
            )[0]
        )
        for _ in range(2)
    )
    np.testing.assert_array_equal(first, again)
    plain = np.asarray(next(iter(make_dataset(paths, np.zeros(4, int), **common)))[0])
    assert not np.array_equal(np.sort(first.ravel()), np.sort(plain.ravel()))
