"""Cropping to the non-zero box and its inverse."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoseg.preprocessing.cropping import crop, crop_box, transpose_spatial, uncrop


@st.composite
def _image_with_zero_border(draw) -> np.ndarray:
    shape = tuple(draw(st.integers(1, 9)) for _ in range(3))
    channels = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    image = np.zeros((channels, *shape), np.float32)
    lo = [int(rng.integers(0, s)) for s in shape]
    hi = [int(rng.integers(a + 1, s + 1)) for a, s in zip(lo, shape)]
    block = rng.normal(size=(channels, *(b - a for a, b in zip(lo, hi)))).astype(np.float32)
    image[(slice(None), *(slice(a, b) for a, b in zip(lo, hi)))] = block
    return image


@settings(max_examples=60, deadline=None)
@given(_image_with_zero_border())
def test_crop_then_uncrop_is_identity(image: np.ndarray) -> None:
    box = crop_box(image)
    cropped = crop(image, box)
    assert np.array_equal(uncrop(cropped, box, image.shape[1:]), image)


@settings(max_examples=30, deadline=None)
@given(_image_with_zero_border())
def test_crop_keeps_every_nonzero_voxel(image: np.ndarray) -> None:
    cropped = crop(image, crop_box(image))
    assert np.count_nonzero(cropped) == np.count_nonzero(image)


def test_crop_applies_to_labels_identically() -> None:
    image = np.zeros((1, 7, 11, 13), np.float32)
    image[0, 2:5, 3:9, 1:12] = 1
    label = (np.arange(7 * 11 * 13).reshape(7, 11, 13) % 3).astype(np.uint8)
    box = crop_box(image)
    assert box == ((2, 5), (3, 9), (1, 12))
    assert crop(label, box).shape == (3, 6, 11)
    assert np.array_equal(crop(label, box), label[2:5, 3:9, 1:12])


def test_uncrop_fills_probabilities_with_background_one() -> None:
    probs = np.full((3, 2, 3, 4), 0.25, np.float32)
    out = uncrop(probs, ((1, 3), (0, 3), (2, 6)), (5, 3, 7), fill=[1.0, 0.0, 0.0])
    assert out.shape == (3, 5, 3, 7)
    assert np.all(out[0, 0] == 1.0)
    assert np.all(out[1:, 0] == 0.0)
    assert np.all(out[:, 1:3, :, 2:6] == 0.25)


def test_uncrop_rejects_a_box_of_another_size() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        uncrop(np.zeros((2, 3, 4)), ((0, 2), (0, 3), (0, 5)), (7, 11, 13))


def test_transpose_spatial_round_trip() -> None:
    array = np.arange(2 * 7 * 11 * 13).reshape(2, 7, 11, 13)
    forward = (2, 0, 1)
    moved = transpose_spatial(array, forward)
    assert moved.shape == (2, 13, 7, 11)
    assert np.array_equal(transpose_spatial(moved, tuple(np.argsort(forward))), array)
