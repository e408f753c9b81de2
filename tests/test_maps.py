"""Maps: closed forms against brute force, thresholds, boxes, averages, geometry."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from PIL import Image

from modlabel import geometry, maps
from modlabel.decode import resize_rgb

H, W, K, C = 6, 9, 32, 5  # non-square on purpose


@pytest.fixture
def head():
    rng = np.random.default_rng(7)
    acts = np.maximum(rng.normal(size=(3, H, W, K)), 0).astype(np.float32)
    weights = (rng.normal(size=(K, C)) * 0.3).astype(np.float32)
    bias = rng.normal(size=C).astype(np.float32)
    return acts, weights, bias


def reference_scores(acts, weights, bias, pooling):
    """The head as a model computes it: pool, then dense (float64)."""
    pooled = acts.astype(np.float64).sum(axis=(1, 2))
    if pooling == "mean":
        pooled = pooled / (acts.shape[1] * acts.shape[2])
    return pooled @ weights.astype(np.float64) + bias.astype(np.float64)


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def brute_force(acts, weights, bias, pooling, relevance):
    """Remove each spatial element (zero f_k(l, m) for all k), re-run the head,
    and score the change with ``relevance(full_scores, removed_scores) -> (N,)``."""
    full = reference_scores(acts, weights, bias, pooling)
    out = np.zeros(acts.shape[:3])
    for row in range(acts.shape[1]):
        for col in range(acts.shape[2]):
            removed = acts.copy()
            removed[:, row, col, :] = 0
            out[:, row, col] = relevance(full, reference_scores(removed, weights, bias, pooling))
    return out


def crm_relevance(full, removed):
    return ((full - removed) ** 2).sum(axis=-1)  # Eq. 7


def output_relevance(full, removed):
    target = np.eye(full.shape[1])[np.argmax(full, axis=1)]  # one-hot, predicted class
    return ((target - softmax(removed)) ** 2).sum(-1) - ((target - softmax(full)) ** 2).sum(-1)


def assert_close(actual, expected, rtol=1e-5):
    """Relative to each map's largest magnitude."""
    scale = np.abs(expected).max(axis=(1, 2), keepdims=True)
    assert np.all(np.abs(actual - expected) <= rtol * scale), np.abs(actual - expected).max()


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_crm_closed_form_equals_brute_force(head, pooling):
    acts, weights, bias = head
    expected = brute_force(acts, weights, bias, pooling, crm_relevance)
    got = maps.crm(acts, weights, bias=bias, pooling=pooling)
    assert got.shape == (3, H, W) and got.dtype == np.float32
    assert_close(got, expected)


def test_crm_pooling_conventions_differ_by_constant(head):
    acts, weights, bias = head
    mean = maps.crm(acts, weights, bias=bias, pooling="mean")
    summed = maps.crm(acts, weights, bias=None, pooling="sum")  # the authors' code: no bias
    np.testing.assert_allclose(summed, mean * (H * W) ** 2, rtol=1e-5)
    np.testing.assert_array_equal(geometry.roi_mask(summed), geometry.roi_mask(mean))


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_crm_output_closed_form_equals_brute_force(head, pooling):
    acts, weights, bias = head
    if pooling == "sum":
        weights = weights / (H * W)  # keep the softmax away from saturation
    expected = brute_force(acts, weights, bias, pooling, output_relevance)
    got = maps.closed_form("crm_output", acts, weights, bias=bias, pooling=pooling)
    assert got.shape == (3, H, W) and got.dtype == np.float32
    assert np.abs(expected).max() > 1e-4  # the test is not vacuous
    assert_close(got, expected)


@pytest.mark.parametrize("shift", [1000.0, -1000.0])
def test_crm_output_does_not_overflow_for_large_scores(head, shift):
    # The softmax ignores a shift common to all classes, but exp(+-1000) does not:
    # it must be taken of scores shifted by their max over classes.
    acts, weights, bias = head
    shifted = bias + np.float32(shift)
    with np.errstate(over="raise", under="ignore", invalid="raise", divide="raise"):
        got = maps.closed_form("crm_output", acts, weights, bias=shifted)
    assert_close(got, brute_force(acts, weights, shifted, "mean", output_relevance))


def test_methods_accept_terms_in_either_layout(head):
    # terms keeps the class maps classes first in memory; terms built by
    # hand with class-last (N, H, W, C) memory must give the same maps.
    acts, weights, bias = head
    terms = maps.terms(acts, weights, bias=bias)
    class_last = dataclasses.replace(terms, class_maps=np.ascontiguousarray(terms.class_maps))
    assert class_last.class_maps.flags.c_contiguous and terms.by_class.flags.c_contiguous
    for name in maps.closed_form_methods():
        method = maps.METHODS[name]
        got, expected = method.fn(class_last), method.fn(terms)
        assert got.dtype == expected.dtype == np.float32, name
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0, err_msg=name)


def test_crm_output_uses_given_class(head):
    acts, weights, bias = head
    predicted = np.argmax(reference_scores(acts, weights, bias, "mean"), axis=1)
    other = (predicted + 1) % C
    default = maps.closed_form("crm_output", acts, weights, bias=bias)
    np.testing.assert_array_equal(
        default, maps.closed_form("crm_output", acts, weights, bias=bias, class_index=predicted)
    )
    assert not np.allclose(
        default, maps.closed_form("crm_output", acts, weights, bias=bias, class_index=other)
    )


def test_cam_sums_to_score_and_defaults_to_predicted_class(head):
    acts, weights, bias = head
    scores = reference_scores(acts, weights, bias, "mean")
    predicted = np.argmax(scores, axis=1)
    m = maps.closed_form("cam", acts, weights, logits=scores)
    assert m.shape == (3, H, W) and m.dtype == np.float32
    # Eq. 1: the score is the pooled CAM plus the bias.
    np.testing.assert_allclose(
        m.mean(axis=(1, 2)) + bias[predicted], scores[np.arange(3), predicted], rtol=1e-5
    )
    np.testing.assert_array_equal(m, maps.closed_form("cam", acts, weights, bias=bias))
    np.testing.assert_array_equal(m, maps.closed_form("cam", acts, weights, class_index=predicted))
    for c in range(C):
        expected = np.einsum("nhwk,k->nhw", acts.astype(np.float64), weights[:, c])
        np.testing.assert_allclose(
            maps.closed_form("cam", acts, weights, class_index=c), expected, rtol=1e-4, atol=1e-5
        )


def test_gradcam_is_relu_of_cam_for_a_gap_head(head):
    acts, weights, bias = head
    c = [0, 3, 4]
    cam = maps.closed_form("cam", acts, weights, class_index=c)
    np.testing.assert_array_equal(maps.gradcam(acts, weights, class_index=c), np.maximum(cam, 0))
    assert_close(
        maps.gradcam(acts, weights, class_index=c, gradient="mean"), np.maximum(cam, 0) / (H * W)
    )
    assert_close(
        maps.gradcam(acts, weights, class_index=c, pooling="sum"), np.maximum(cam, 0) * (H * W)
    )


def test_cam_squared_is_cam_squared(head):
    acts, weights, bias = head
    cam = maps.closed_form("cam", acts, weights, bias=bias)
    np.testing.assert_allclose(
        maps.closed_form("cam_squared", acts, weights, bias=bias), cam**2, rtol=1e-6
    )


def test_compute_maps_shares_the_predicted_class(head):
    acts, weights, bias = head
    scores = reference_scores(acts, weights, bias, "mean")
    out = maps.compute_maps(acts, weights, bias=bias, logits=scores)
    assert set(out) == set(maps.closed_form_methods())
    np.testing.assert_array_equal(out["cam"], maps.closed_form("cam", acts, weights, logits=scores))
    np.testing.assert_array_equal(out["crm"], maps.crm(acts, weights, bias=bias))
    with pytest.raises(ValueError, match="unknown map methods"):
        maps.compute_maps(acts, weights, bias=bias, methods=["nope"])


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\(N, H, W, K\)"):
        maps.crm(np.zeros((4, 4, 8)), np.zeros((8, 2)))
    with pytest.raises(ValueError, match="K=8"):
        maps.crm(np.zeros((1, 4, 4, 8)), np.zeros((7, 2)))
    with pytest.raises(ValueError, match="pooling"):
        maps.crm(np.zeros((1, 4, 4, 8)), np.zeros((8, 2)), pooling="max")


# -- one calling convention --------------------------------------------------

# Every function over (activations, weights), with the keyword arguments it needs: each
# closed-form method through closed_form(name, ...), and its shorthands.
ENTRY_POINTS = {
    "class_maps": (maps.class_maps, {}),
    "terms": (maps.terms, {}),
    "compute_maps": (maps.compute_maps, {"bias": None}),
    "crm": (maps.crm, {}),
    "gradcam": (maps.gradcam, {}),
    **{
        f"closed_form {name}": (functools.partial(maps.closed_form, name), {"bias": None})
        for name in maps.closed_form_methods()
    },
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_bias_or_class_passed_positionally_is_refused(name):
    # N == C: a bias (C,) read as class_index (N,) would pass every check, so
    # anything after (activations, weights) must be passed by name.
    rng = np.random.default_rng(0)
    acts = rng.random((4, 3, 3, 6)).astype(np.float32)
    weights = rng.normal(size=(6, 4)).astype(np.float32)
    bias = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    function, kw = ENTRY_POINTS[name]
    function(acts, weights, **kw)  # the two positional inputs are fine
    with pytest.raises(TypeError, match="positional"):
        function(acts, weights, bias)
    with pytest.raises(TypeError, match="positional"):
        function(acts, weights, 2)


@pytest.mark.parametrize("name", ["crm_output", "ablationcam", "compute_maps"])
def test_bias_must_be_given_where_it_changes_the_numbers(name, head):
    acts, weights, _ = head
    function = (
        maps.compute_maps if name == "compute_maps" else functools.partial(maps.closed_form, name)
    )
    with pytest.raises(TypeError, match="bias"):
        function(acts, weights)


def test_needs_bias_and_class_specific_say_what_changes_the_maps(head):
    # A method needs the bias exactly when another bias changes its maps, the class held
    # fixed; it is class-specific exactly when another class does.
    acts, weights, bias = head
    other_bias = np.random.default_rng(1).normal(size=C).astype(np.float32)
    for name in maps.closed_form_methods():
        method = maps.METHODS[name]
        base = method.fn(maps.terms(acts, weights, bias=bias, class_index=[4, 0, 2]))
        rebiased = method.fn(maps.terms(acts, weights, bias=other_bias, class_index=[4, 0, 2]))
        reclassed = method.fn(maps.terms(acts, weights, bias=bias, class_index=[1, 3, 3]))
        assert method.needs_bias == (not np.allclose(base, rebiased, rtol=1e-5)), name
        assert method.class_specific == (not np.allclose(base, reclassed, rtol=1e-5)), name
    assert {n for n in maps.METHODS if maps.METHODS[n].needs_bias} == {"crm_output", "ablationcam"}
    assert {n for n in maps.closed_form_methods() if not maps.METHODS[n].class_specific} == {
        "crm",
        "eigencam",
    }
    # Without the bias the others run, as a head without one.
    np.testing.assert_array_equal(
        maps.closed_form("cam", acts, weights, class_index=2),
        maps.closed_form("cam", acts, weights, bias=None, class_index=2),
    )


@pytest.mark.parametrize("name", ["crm", "eigencam"])
def test_a_map_for_no_one_class_refuses_a_class(name, head):
    acts, weights, bias = head
    with pytest.raises(TypeError, match="class_index or logits"):
        maps.closed_form(name, acts, weights, bias=bias, class_index=1)
    with pytest.raises(TypeError, match="class_index or logits"):
        maps.closed_form(name, acts, weights, logits=np.zeros((3, C)))
    with pytest.raises(TypeError, match="class_index"):
        maps.crm(acts, weights, class_index=1)


def test_closed_form_refuses_unknown_and_forward_pass_methods(head):
    acts, weights, bias = head
    with pytest.raises(ValueError, match=r"'gradcam\+\+' is not a map method.*one of cam, "):
        maps.closed_form("gradcam++", acts, weights, bias=bias)
    with pytest.raises(ValueError, match="'rise' runs the model"):
        maps.closed_form("rise", acts, weights, bias=bias)
    with pytest.raises(TypeError, match="gradient"):  # an option of Grad-CAM's only
        maps.closed_form("cam", acts, weights, bias=bias, gradient="mean")


# Keyword arguments of one call, from the head's (bias, scores).
CALLS = {
    "predicted by the head": lambda bias, scores: {"bias": bias},
    "sum pooling": lambda bias, scores: {"bias": bias, "pooling": "sum"},
    "predicted by the logits": lambda bias, scores: {"bias": None, "logits": scores},
    "one class for all": lambda bias, scores: {"bias": bias, "class_index": 3},
    "one class each": lambda bias, scores: {"bias": bias, "class_index": [4, 0, 2]},
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_each_method_is_its_piece_of_the_shared_terms(head, call):
    # The same keyword arguments give the same maps through closed_form, through
    # compute_maps and through METHODS over terms.
    acts, weights, bias = head
    kw = CALLS[call](bias, reference_scores(acts, weights, bias, "mean"))
    terms = maps.terms(acts, weights, **kw)
    together = maps.compute_maps(acts, weights, **kw)
    assert set(together) == set(maps.closed_form_methods())
    for name in maps.closed_form_methods():
        method = maps.METHODS[name]
        own_kw = dict(kw)
        if not method.class_specific:  # CRM, Eigen-CAM: no class to choose
            own_kw.pop("class_index", None)
            own_kw.pop("logits", None)
        alone = maps.closed_form(name, acts, weights, **own_kw)
        assert alone.shape == (3, H, W) and alone.dtype == np.float32, name
        np.testing.assert_array_equal(alone, together[name], err_msg=name)
        np.testing.assert_array_equal(alone, method.fn(terms), err_msg=name)


# -- thresholds and boxes ---------------------------------------------------


def test_normalize_and_display_threshold():
    m = np.array([[-5.0, 0.0, 1.0], [2.0, 10.0, 2.1]], dtype=np.float32)
    norm = geometry.normalize_255(m)
    assert norm.max() == 255 and norm.min() == 0
    np.testing.assert_allclose(norm[1, 0], 51.0)
    # above 20% of the max: strictly greater, negatives never pass
    np.testing.assert_array_equal(
        geometry.roi_mask(m), [[False, False, False], [False, True, True]]
    )
    assert geometry.roi_stats(m) == geometry.RoiStats(pixels=2, ratio=2 / 6)
    zero = np.zeros((4, 4))
    assert not geometry.roi_mask(zero).any()
    assert geometry.normalize_255(-np.ones((3, 3))).max() == 0
    assert geometry.roi_box(zero) is None and geometry.component_boxes(zero) == []


def test_roi_stats_counts_pixels_at_image_size():
    m = np.zeros((18, 18), np.float32)
    m[6:12, 6:12] = 1.0
    stats = geometry.roi_stats(m, (300, 300))
    # the block covers a third of each side; bilinear edges add at most one cell
    assert 100**2 <= stats.pixels <= (100 + 2 * 300 / 18) ** 2
    assert stats.ratio == stats.pixels / 300**2


def test_roi_box_and_components():
    m = np.zeros((10, 12), np.float32)
    m[2:4, 1:3] = 1.0  # strongest region
    m[6:9, 8:11] = 0.8  # second region, above 70%
    m[0, 11] = 0.5  # below 70%
    assert geometry.roi_box(m) == (1, 2, 11, 9)
    assert geometry.component_boxes(m) == [(1, 2, 3, 4), (8, 6, 11, 9)]
    m[4:6, 3] = 0.9  # a bridge that touches the first region only diagonally
    m[6, 3:8] = 0.9
    assert len(geometry.component_boxes(m)) == 1
    assert len(geometry.component_boxes(m, connectivity=4)) == 2
    assert geometry.roi_box(m, fraction=0.95) == (1, 2, 3, 4)


def brute_force_regions(mask, connectivity):
    """Connected regions by definition: cells are neighbours when they share an
    edge (4) or an edge or a corner (8); each region grown from the first cell
    in raster order not yet taken, by scanning every remaining cell."""

    def neighbours(a, b):
        dy, dx = abs(a[0] - b[0]), abs(a[1] - b[1])
        return dy + dx == 1 if connectivity == 4 else max(dy, dx) == 1

    left = {tuple(cell) for cell in np.argwhere(mask).tolist()}
    regions = []
    while left:
        seed = min(left)  # raster order: (row, column)
        left.discard(seed)
        region, frontier = {seed}, [seed]
        while frontier:
            cell = frontier.pop()
            for other in [c for c in left if neighbours(cell, c)]:
                left.discard(other)
                region.add(other)
                frontier.append(other)
        regions.append(region)
    return regions


@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_match_a_brute_force_flood_fill(connectivity):
    rng = np.random.default_rng(connectivity)
    for _ in range(150):
        h, w = rng.integers(1, 13, size=2)
        m = (rng.random((h, w)) * (rng.random((h, w)) < rng.uniform(0.1, 0.9))).astype(np.float32)
        mask = geometry.roi_mask(m, 0.3)
        regions = brute_force_regions(mask, connectivity)
        labels, count = geometry.label_components(mask, connectivity=connectivity)
        assert labels.shape == mask.shape and count == len(regions)
        assert not labels[~mask].any()
        for label, region in enumerate(regions, start=1):
            assert {tuple(c) for c in np.argwhere(labels == label).tolist()} == region
        # boxes: (x0, y0, x1, y1) around each region, highest peak first
        peaks = [max(m[cell] for cell in region) for region in regions]
        expected = [
            (
                min(x for _, x in regions[i]),
                min(y for y, _ in regions[i]),
                max(x for _, x in regions[i]) + 1,
                max(y for y, _ in regions[i]) + 1,
            )
            for i in sorted(range(len(regions)), key=lambda i: -peaks[i])
        ]
        assert geometry.component_boxes(m, 0.3, connectivity=connectivity) == expected


def test_connectivity_rule():
    diagonal = np.eye(3, dtype=bool)  # cells touching at corners only
    assert geometry.label_components(diagonal, connectivity=8)[1] == 1
    labels, count = geometry.label_components(diagonal, connectivity=4)
    assert count == 3 and labels.tolist() == [[1, 0, 0], [0, 2, 0], [0, 0, 3]]
    assert geometry.label_components(diagonal)[1] == 1  # 8 by default, as component_boxes
    assert geometry.label_components(np.ones((2, 3), bool), connectivity=4)[1] == 1
    with pytest.raises(ValueError, match="connectivity"):
        geometry.label_components(diagonal, connectivity=6)
    with pytest.raises(ValueError, match="connectivity"):
        geometry.component_boxes(np.eye(3), connectivity=6)


def test_scale_box():
    assert geometry.scale_box((1, 2, 3, 4), (18, 18), (300, 450)) == (25, 33, 75, 67)
    assert geometry.scale_box((0, 0, 18, 18), (18, 18), (300, 450)) == (0, 0, 450, 300)


def test_class_average_streams_the_mean_of_normalized_maps():
    rng = np.random.default_rng(3)
    batch = rng.gamma(1.0, size=(9, 18, 18)).astype(np.float32) * rng.uniform(
        0.01, 1000, size=(9, 1, 1)
    ).astype(np.float32)
    avg = maps.ClassAverage()
    avg.add(batch[0])
    avg.add_batch(batch[1:5])
    other = maps.ClassAverage()
    other.add_batch(batch[5:])
    avg.merge(other)
    expected = np.mean([b / b.max() for b in batch], axis=0)
    assert avg.count == 9
    np.testing.assert_allclose(avg.mean(), expected, rtol=1e-6)
    assert avg.mean().max() <= 1.0

    raw = maps.ClassAverage(normalization="none")
    raw.add_batch(batch)
    np.testing.assert_allclose(raw.mean(), batch.mean(axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match="differs"):
        avg.add(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="no maps"):
        maps.ClassAverage().mean()


# -- geometry ---------------------------------------------------------------


def test_upsample_matches_pil_bilinear():
    rng = np.random.default_rng(1)
    m = rng.random((6, 9)).astype(np.float32)
    ours = geometry.upsample(m, (61, 200))
    pil = np.asarray(Image.fromarray(m, mode="F").resize((200, 61), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(ours, pil, atol=1e-5)
    batch = geometry.upsample(np.stack([m, 2 * m]), (61, 200))
    assert batch.shape == (2, 61, 200)
    np.testing.assert_allclose(batch[1], 2 * ours, rtol=1e-6)


@pytest.mark.parametrize("cell", [(1, 6), (4, 0), (0, 8)])
def test_hot_spot_lands_on_matching_place_of_original(cell):
    i, j = cell
    h, w = 5, 9
    orig_h, orig_w = 240, 700  # aspect ratio unlike the map's and the input's
    m = np.zeros((h, w), np.float32)
    m[i, j] = 1.0
    up = geometry.upsample(m, (orig_h, orig_w))
    assert up.shape == (orig_h, orig_w)
    y, x = np.unravel_index(np.argmax(up), up.shape)
    assert i * orig_h / h <= y < (i + 1) * orig_h / h
    assert j * orig_w / w <= x < (j + 1) * orig_w / w


def test_overlay_geometry_follows_the_decoder_stretch():
    # An original non-square image with a bright patch, stretched to a square
    # input as decode does; a stride-8 "activation" of the input, taken back to
    # the original size, must peak inside the patch.
    orig = np.zeros((180, 420, 3), np.uint8)
    orig[120:150, 300:360] = 255
    pixels = resize_rgb(Image.fromarray(orig), (64, 64)).astype(np.float32).mean(axis=2)
    activation = pixels.reshape(8, 8, 8, 8).mean(axis=(1, 3))
    up = geometry.upsample(activation, orig.shape[:2])
    y, x = np.unravel_index(np.argmax(up), up.shape)
    assert 120 <= y < 150 and 300 <= x < 360


def test_label_components_numbers_regions_as_scipy_does_on_random_masks():
    """The run-based labeling against scipy.ndimage.label (a dev dependency, via
    scikit-image): the same regions, numbered in the same raster order, for both
    connectivities, on masks of every density."""
    from scipy import ndimage

    from modlabel.geometry import label_components

    rng = np.random.default_rng(7)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 48, 2))
        mask = rng.random((height, width)) < rng.random()
        for connectivity, rank in ((4, 1), (8, 2)):
            expected, count = ndimage.label(mask, ndimage.generate_binary_structure(2, rank))
            labels, found = label_components(mask, connectivity=connectivity)
            assert found == count
            np.testing.assert_array_equal(labels, expected)
    assert label_components(np.zeros((0, 5), bool))[1] == 0
