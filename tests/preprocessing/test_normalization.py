"""Intensity normalisation schemes."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.errors import PreprocessingError
from autoseg.planning.plans import ChannelNormalization
from autoseg.preprocessing.normalization import (
    nonzero_mask,
    normalize,
    normalize_ct,
    normalize_rescale,
    normalize_zscore,
)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, (7, 11, 13)).astype(np.float32)


def test_ct_clips_then_uses_dataset_statistics() -> None:
    image = np.array([-2000.0, -1000.0, 0.0, 500.0, 3000.0], np.float32)
    out = normalize_ct(image, (-1000.0, 700.0), mean=100.0, std=50.0)
    assert out.dtype == np.float32
    assert np.allclose(out, [-22.0, -22.0, -2.0, 8.0, 12.0])


def test_ct_accepts_integer_input() -> None:
    out = normalize_ct(np.array([-3000, 0, 3000], np.int16), (-1024.0, 1024.0), 0.0, 1024.0)
    assert np.allclose(out, [-1.0, 0.0, 1.0])


def test_zscore_without_mask() -> None:
    out = normalize_zscore(_image())
    assert abs(float(out.mean())) < 1e-4
    assert abs(float(out.std()) - 1) < 1e-4


def test_zscore_with_mask_uses_inside_voxels_and_zeroes_outside() -> None:
    image = _image()
    mask = np.zeros(image.shape, bool)
    mask[1:6, 2:9, 3:10] = True
    out = normalize_zscore(image, mask)
    assert np.all(out[~mask] == 0)
    assert abs(float(out[mask].mean())) < 1e-4
    assert abs(float(out[mask].std()) - 1) < 1e-4


def test_rescale_to_unit_range() -> None:
    out = normalize_rescale(_image())
    assert float(out.min()) == 0.0
    assert float(out.max()) == pytest.approx(1.0)


def test_nonzero_mask_fills_enclosed_holes_only() -> None:
    image = np.zeros((1, 7, 11, 13), np.float32)
    image[0, 1:6, 2:9, 3:10] = 5
    image[0, 3, 5, 6] = 0  # enclosed hole
    image[0, 1:6, 2, 3] = 0  # notch open to the outside
    mask = nonzero_mask(image)
    assert mask[3, 5, 6]
    assert not mask[3, 2, 3]
    assert not mask[0, 0, 0]
    assert np.array_equal(
        mask,
        (image[0] != 0) | (np.arange(7)[:, None, None] == 3) & (np.arange(11)[:, None] == 5) & (np.arange(13) == 6),
    )


def test_normalize_uses_one_scheme_per_channel_and_leaves_input_alone() -> None:
    image = np.stack([_image(0), _image(1) * 10]).copy()
    before = image.copy()
    schemes = (ChannelNormalization("ct", clip=(50.0, 150.0), mean=100.0, std=20.0), ChannelNormalization("none"))
    out = normalize(image, schemes)
    assert out.dtype == np.float32
    assert np.array_equal(image, before)
    assert np.array_equal(out[1], image[1])
    assert float(out[0].max()) <= 2.5 + 1e-6


def test_zscore_use_mask_in_normalize_masks_the_zero_background() -> None:
    image = np.zeros((1, 7, 11, 13), np.float32)
    image[0, 1:6, 2:9, 3:10] = _image()[1:6, 2:9, 3:10]
    out = normalize(image, (ChannelNormalization("zscore", use_mask=True),))
    inside = image[0] != 0
    assert np.all(out[0][~inside] == 0)
    assert abs(float(out[0][inside].mean())) < 1e-4
    assert float(out[0][inside].std()) == pytest.approx(1.0, rel=1e-4)


def test_ct_without_statistics_names_the_field() -> None:
    with pytest.raises(PreprocessingError, match="needs clip, mean and std"):
        normalize(np.ones((1, 2, 3, 4), np.float32), (ChannelNormalization("ct"),))


def test_unknown_scheme_lists_the_valid_ones() -> None:
    with pytest.raises(PreprocessingError, match="valid:"):
        normalize(np.ones((1, 2, 3, 4), np.float32), (ChannelNormalization("histogram"),))


def test_channel_count_must_match_the_plan() -> None:
    with pytest.raises(PreprocessingError, match="2 channel"):
        normalize(np.ones((2, 2, 3, 4), np.float32), (ChannelNormalization("none"),))


def test_rgb_divides_by_255_and_rejects_values_that_are_not_8_bit() -> None:
    from autoseg.errors import PreprocessingError
    from autoseg.fingerprint import normalization_hint
    from autoseg.preprocessing.normalization import normalize_rgb

    image = np.array([[[0, 51, 255]]], dtype=np.uint8)
    assert np.allclose(normalize_rgb(image), [[[0.0, 0.2, 1.0]]])  # not stretched per image: colours comparable
    with pytest.raises(PreprocessingError, match="case_7.*0..255"):
        normalize_rgb(np.array([[[-3.0, 300.0]]]), "case_7")
    assert [normalization_hint(n) for n in ("R", "green", "rgb_to_0_1", "rescale_to_0_1")] == [
        "rgb",
        "rgb",
        "rgb",
        "rescale",
    ]
