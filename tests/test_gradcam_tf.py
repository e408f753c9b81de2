"""Grad-CAM and CRM from the head weights agree with TensorFlow on a Keras model.

The model is the paper's shape in miniature: conv backbone -> "crm_conv" (ReLU)
-> GlobalAveragePooling2D -> Dense logits, with a non-square input.
"""

from __future__ import annotations

import numpy as np
import pytest

from modlabel import maps

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

N, IN_H, IN_W, CLASSES = 4, 24, 40, 5


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((IN_H, IN_W, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    acts = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="crm_conv")(x)
    pooled = keras.layers.GlobalAveragePooling2D()(acts)
    logits = keras.layers.Dense(CLASSES, bias_initializer="random_normal", name="logits")(pooled)
    return keras.Model(inp, [acts, logits])


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(N, IN_H, IN_W, 3)).astype(np.float32)


def tape_gradcam(model, images, class_index, reduction):
    """Grad-CAM by autodiff: dS_c/df_k, reduced over locations, then Eq. 3."""
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        acts, logits = model(x)
        score = tf.reduce_sum(tf.gather(logits, class_index, axis=1, batch_dims=1))
    grads = tape.gradient(score, acts).numpy()
    alpha = grads.sum(axis=(1, 2)) if reduction == "sum" else grads.mean(axis=(1, 2))
    return np.maximum(np.einsum("nhwk,nk->nhw", acts.numpy(), alpha), 0), acts.numpy(), alpha


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradcam_equals_gradient_tape(model, images, reduction):
    dense = model.get_layer("logits")
    weights, bias = (v.numpy() for v in dense.weights)
    for class_index in ([0, 1, 2, 3], [4, 4, 4, 4]):
        expected, acts, alpha = tape_gradcam(model, images, np.array(class_index), reduction)
        # Eq. 4's channel weights come from the head alone, as the paper says
        _, h, w, _ = acts.shape
        from_head = maps.gradcam_weights(weights, h, w, gradient=reduction)[:, class_index].T
        np.testing.assert_allclose(alpha, from_head, rtol=1e-5, atol=1e-7)
        got = maps.gradcam(acts, weights, class_index=class_index, gradient=reduction)
        assert expected.max() > 0
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.max())


def test_gradcam_default_class_is_the_models_prediction(model, images):
    weights, bias = (v.numpy() for v in model.get_layer("logits").weights)
    acts, logits = (t.numpy() for t in model(tf.constant(images)))
    predicted = np.argmax(logits, axis=1)
    expected, _, _ = tape_gradcam(model, images, predicted, "sum")
    for got in (maps.gradcam(acts, weights, logits=logits), maps.gradcam(acts, weights, bias=bias)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.max())


def test_crm_equals_removing_elements_in_the_keras_head(model, images):
    """Eq. 6-7 brute force through the real GAP + Dense layers (mean pooling)."""
    weights, bias = (v.numpy() for v in model.get_layer("logits").weights)
    acts = model(tf.constant(images))[0].numpy()
    head = keras.Sequential([keras.layers.GlobalAveragePooling2D(), model.get_layer("logits")])
    _, h, w, _ = acts.shape
    removed = np.repeat(acts[None], h * w, axis=0)  # one copy per removed element
    for i in range(h * w):
        removed[i, :, i // w, i % w, :] = 0
    full = head(acts).numpy().astype(np.float64)
    scores = head(removed.reshape(-1, h, w, acts.shape[3])).numpy().astype(np.float64)
    expected = ((full[None] - scores.reshape(h * w, N, CLASSES)) ** 2).sum(-1)
    expected = expected.T.reshape(N, h, w)
    got = maps.crm(acts, weights, bias=bias, pooling="mean")
    # float32 scores lose digits in S_c - S_c(l, m); the closed form does not
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-3 * expected.max())
