"""Training-time augmentation (paper section 2.1), as Keras preprocessing layers.

The paper augments "with rotations and horizontal and vertical shifts in the
ranges [-5, 5] and [-3, 3]" without giving the shift's unit. We read it the
way Keras' ``ImageDataGenerator`` (which the paper's Keras setup most likely
used) reads an integer ``width_shift_range=3``: pixels. So:

* rotation: uniform in [-5, +5] degrees about the image center;
* shift: uniform in [-3, +3] pixels horizontally and, independently,
  vertically, in pixels of the model's input (the image is resampled to the
  input size first, then augmented);
* bilinear interpolation; pixels that come in from outside the image repeat
  the nearest edge pixel (``fill_mode="nearest"``, ``ImageDataGenerator``'s
  default).

Applied to the training split only, on (N, H, W, 3) float32 pixels in
[0, 255] before normalization, inside the tf.data pipeline (not in the model,
so export and scan never see it).
"""

from __future__ import annotations

import keras

ROTATION_DEGREES = 5.0
SHIFT_PIXELS = 3.0

AUGMENTATION = {
    "rotation_degrees": [-ROTATION_DEGREES, ROTATION_DEGREES],
    "shift_pixels": [-SHIFT_PIXELS, SHIFT_PIXELS],
    "shift_unit": "pixels of the model input, after resampling to input_size",
    "interpolation": "bilinear",
    "fill_mode": "nearest",
    "applied_to": "train split only",
}


def build_augmenter(input_size: tuple[int, int], *, seed: int | None = None) -> keras.Sequential:
    """Random rotation then random shift, for (N, H, W, 3) float32 batches.

    input_size: (height, width); the shift factors are SHIFT_PIXELS over it.
    Layers are named "rotate" and "shift" so each can be checked on its own.
    """
    height, width = int(input_size[0]), int(input_size[1])
    return keras.Sequential(
        [
            keras.layers.RandomRotation(
                ROTATION_DEGREES / 360.0,
                fill_mode="nearest",
                interpolation="bilinear",
                seed=seed,
                name="rotate",
            ),
            keras.layers.RandomTranslation(
                SHIFT_PIXELS / height,
                SHIFT_PIXELS / width,
                fill_mode="nearest",
                interpolation="bilinear",
                seed=None if seed is None else seed + 1,
                name="shift",
            ),
        ],
        name="augment",
    )
