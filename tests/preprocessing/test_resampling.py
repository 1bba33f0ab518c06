"""Resampling: equal to scipy/skimage for images, per-label arg-max for label maps, nnU-Net's out-of-plane rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage.transform import resize

from autoseg.preprocessing.resampling import (
    RowResampler,
    axis_orders,
    compute_new_shape,
    lowres_axis,
    resample_axes,
    resample_image,
    resample_label,
)

_shapes = st.tuples(st.integers(2, 12), st.integers(2, 12), st.integers(2, 12))


def _smooth(shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 1.0).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(_shapes, _shapes, st.sampled_from([0, 1, 2, 3, 4, 5]), st.integers(0, 1000))
def test_separable_passes_equal_scipy_zoom(shape, new_shape, order, seed) -> None:
    volume = _smooth(shape, seed)
    expected = ndimage.zoom(
        volume.astype(np.float64), np.divide(new_shape, shape), order=order, mode="nearest", grid_mode=True
    )
    out = resample_axes(volume, new_shape, [order] * 3)
    assert out.shape == tuple(new_shape)
    assert out.dtype == np.float32
    assert np.abs(out - expected).max() < 1e-5


def test_cubic_image_equals_skimage_resize_with_clipping() -> None:
    image = _smooth((7, 11, 13))[None]
    expected = resize(image[0].astype(np.float64), (9, 15, 10), order=3, mode="edge", anti_aliasing=False)
    out = resample_image(image, (9, 15, 10), orders=(3, 3, 3))
    assert np.abs(out[0] - expected).max() < 1e-5
    assert out.min() >= image.min() and out.max() <= image.max()


def test_separate_axis_resamples_slices_in_plane_then_takes_the_nearest_slice() -> None:
    image = _smooth((7, 11, 13))[None]
    out = resample_image(image, (14, 16, 9), orders=axis_orders(3, 3, 0, 0), separate=0)
    for k in range(7):
        expected = resize(image[0, k].astype(np.float64), (16, 9), order=3, mode="edge", anti_aliasing=False)
        assert np.abs(out[0, 2 * k] - expected).max() < 1e-5
        assert np.array_equal(out[0, 2 * k], out[0, 2 * k + 1])


def test_resample_image_leaves_input_alone_and_copies_when_nothing_changes() -> None:
    image = _smooth((7, 11, 13))[None]
    before = image.copy()
    out = resample_image(image, (7, 11, 13), orders=(3, 3, 3))
    assert np.array_equal(out, image)
    out[...] = 0
    assert np.array_equal(image, before)


@st.composite
def _label_maps(draw) -> np.ndarray:
    shape = draw(_shapes)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = draw(st.lists(st.integers(0, 200), min_size=1, max_size=5, unique=True))
    label = np.asarray(values, np.int16)[rng.integers(0, len(values), shape)]
    return ndimage.median_filter(label, 2) if draw(st.booleans()) else label


@settings(max_examples=60, deadline=None)
@given(_label_maps(), _shapes, st.tuples(*[st.sampled_from([0, 1])] * 3))
def test_label_resampling_never_invents_labels(label, new_shape, orders) -> None:
    out = resample_label(label, new_shape, orders=orders)
    assert out.shape == tuple(new_shape)
    assert out.dtype == label.dtype
    assert set(np.unique(out).tolist()) <= set(np.unique(label).tolist())


def test_label_order_zero_is_nearest_neighbour() -> None:
    label = np.random.default_rng(0).integers(0, 4, (7, 11, 13)).astype(np.uint8)
    expected = ndimage.zoom(label, np.divide((5, 17, 9), label.shape), order=0, mode="nearest", grid_mode=True)
    assert np.array_equal(resample_label(label, (5, 17, 9), orders=(0, 0, 0)), expected)


def test_label_resampling_is_identity_when_the_shape_does_not_change() -> None:
    label = np.random.default_rng(0).integers(0, 4, (7, 11, 13)).astype(np.uint8)
    assert np.array_equal(resample_label(label, label.shape, orders=(1, 1, 1)), label)


def test_linear_label_resampling_keeps_shapes_better_than_nearest() -> None:
    zz, yy, xx = np.mgrid[:20, :44, :52]
    label = np.zeros((20, 44, 52), np.uint8)
    label[((zz - 10) / 7) ** 2 + ((yy - 20) / 15) ** 2 + ((xx - 25) / 18) ** 2 <= 1] = 1
    label[((zz - 10) / 2.5) ** 2 + ((yy - 24) / 3) ** 2 + ((xx - 30) / 3) ** 2 <= 1] = 2  # small, inside
    small = (14, 29, 35)

    def round_trip(order: int) -> float:
        down = resample_label(label, small, orders=(order,) * 3)
        back = resample_label(down, label.shape, orders=(order,) * 3)
        return float(np.mean(back == label))

    assert round_trip(1) > round_trip(0)


def test_label_resampling_handles_many_labels_with_values_above_255() -> None:
    rng = np.random.default_rng(3)
    label = np.zeros((9, 20, 22), np.int16)
    for value in (1, 7, 117, 300, 1000):
        z, y, x = rng.integers(0, 6), rng.integers(0, 15), rng.integers(0, 17)
        label[z : z + 3, y : y + 5, x : x + 5] = value
    out = resample_label(label, (9, 31, 33), orders=axis_orders(3, 1, 0, 0))
    assert set(np.unique(out).tolist()) == {0, 1, 7, 117, 300, 1000}


def test_label_orders_above_one_are_rejected() -> None:
    with pytest.raises(ValueError, match="order 0 or 1"):
        resample_label(np.zeros((2, 3, 4), np.uint8), (3, 3, 3), orders=(3, 3, 3))


@pytest.mark.parametrize(
    ("spacing", "target", "expected"),
    [
        ((3.0, 0.8, 0.8), (3.0, 0.8, 0.8), 0),
        ((0.8, 0.8, 0.8), (1.0, 1.0, 1.0), None),
        ((2.4, 0.8, 0.8), (2.4, 0.8, 0.8), None),  # ratio exactly 3: not above the threshold
        ((0.8, 0.8, 5.0), (1.0, 1.0, 1.0), 2),
        ((3.0, 3.0, 0.8), (3.0, 3.0, 0.8), None),  # two coarse axes
        ((1.0, 1.0, 1.0), (4.0, 1.0, 1.0), 0),  # decided by the target when the case is isotropic
    ],
)
def test_lowres_axis_follows_nnunet_rule(spacing, target, expected) -> None:
    assert lowres_axis(spacing, target, 3.0) == expected


def test_compute_new_shape_rounds_and_keeps_at_least_one_voxel() -> None:
    assert compute_new_shape((7, 11, 13), (3.0, 0.7, 0.8), (3.0, 1.4, 0.5)) == (7, 6, 21)
    assert compute_new_shape((1, 11, 13), (1.0, 1.0, 1.0), (5.0, 1.0, 1.0)) == (1, 11, 13)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 9), st.integers(1, 9)),
    new=st.tuples(st.integers(1, 15), st.integers(1, 11), st.integers(1, 11)),
    orders=st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 1)),
    separate=st.sampled_from([None, 0, 1, 2]),
    band=st.integers(1, 5),
)
def test_row_resampler_streams_resample_image_exactly(shape, new, orders, separate, band):
    """Fed a band of input rows at a time, it gives resample_image's rows, bit for bit (orders <= 1, no clip)."""
    volume = np.random.default_rng(0).random(shape, dtype=np.float32)
    expected = resample_image(volume[None], new, orders=orders, separate=separate, clip=False)[0]
    rows = RowResampler(shape, new, orders, separate)
    got, start, done = [], 0, 0
    for stop in [*range(band, shape[0], band), shape[0]]:
        ready = rows.ready(stop)
        if ready > done:
            got.append(rows.rows(volume[start:stop], start, done, ready))
            done = ready
            start = min(rows.first_input(done), stop)
    assert done == new[0]
    np.testing.assert_array_equal(np.concatenate(got), expected)
