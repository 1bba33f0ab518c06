"""preprocess_case and its exact inverse, revert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from autoseg.data.geometry import Geometry
from autoseg.data.io import read_image, read_label, write_image
from autoseg.errors import ConfigError, PreprocessingError
from autoseg.planning.plans import ChannelNormalization, ResamplingSpec
from autoseg.preprocessing.normalization import normalize
from autoseg.preprocessing.preprocess import plan_hash, preprocess_case, revert
from tests.conftest import tiny_geometry
from tests.preprocessing.test_plans_fixture import CT_NORM, ct_plans, make_configuration, make_plans

ZSCORE = ChannelNormalization("zscore")


def _phantom(shape, spacing, *, margin: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth image (values in about [0, 300]) and a label map of two nested ellipsoids, in mm coordinates."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    extent = [n * s / 2 for n, s in zip(shape, spacing)]
    big = (z / (0.8 * extent[0])) ** 2 + (y / (0.6 * extent[1])) ** 2 + (x / (0.7 * extent[2])) ** 2
    small = (
        ((z - 0.1 * extent[0]) / (0.4 * extent[0])) ** 2 + (y / (0.3 * extent[1])) ** 2 + (x / (0.3 * extent[2])) ** 2
    )
    label = np.zeros(shape, np.uint8)
    label[big <= 1] = 1
    label[small <= 1] = 2
    image = 100 + 200 * np.exp(-big) + np.random.default_rng(seed).normal(0, 0.01, shape)
    if margin:
        image[:margin] = 0
        image[:, :, -margin:] = 0
        label[:margin] = 0
        label[:, :, -margin:] = 0
    return image[None].astype(np.float32), label


def _near_boundary(label: np.ndarray, radius: tuple[int, ...]) -> np.ndarray:
    """Voxels within ``radius`` voxels (per axis) of a place where the label changes."""
    size = tuple(2 * r + 1 for r in radius)
    return ndimage.maximum_filter(label, size=size) != ndimage.minimum_filter(label, size=size)


def test_outputs_have_the_documented_shapes_and_types() -> None:
    geometry = tiny_geometry((7, 11, 13), spacing=(3.0, 0.7, 0.8))
    image, label = _phantom((7, 11, 13), (3.0, 0.7, 0.8), margin=1)
    data, seg, props = preprocess_case(image, label, geometry, ct_plans((3.0, 1.4, 0.4)), "3d_fullres")
    assert props.crop_bbox == ((1, 7), (0, 11), (0, 12))
    assert props.shape_after_crop == (6, 11, 12)
    assert props.shape_after_resampling == (6, 6, 24)
    assert data.shape == (1, 6, 6, 24) and data.dtype == np.float32
    assert seg.shape == (1, 6, 6, 24) and seg.dtype == np.int8
    assert props.spacing == (3.0, 1.4, 0.4)
    assert props.original_spacing == (3.0, 0.7, 0.8)
    assert props.geometry == geometry


def test_inputs_are_not_modified() -> None:
    geometry = tiny_geometry()
    image, label = _phantom((7, 11, 13), (3.0, 0.7, 0.8))
    before = image.copy(), label.copy()
    preprocess_case(image, label, geometry, ct_plans(), "3d_fullres")
    assert np.array_equal(image, before[0]) and np.array_equal(label, before[1])


_spacings = st.tuples(st.sampled_from([0.7, 1.0, 2.5, 3.0, 4.0]), st.floats(0.5, 1.2), st.floats(0.5, 1.2))


@settings(max_examples=60, deadline=None)
@given(
    _spacings,
    st.tuples(st.floats(0.5, 2.0), st.floats(0.5, 2.0), st.floats(0.5, 2.0)),
    st.sampled_from([(0, 1, 2), (2, 0, 1), (1, 2, 0)]),
    st.integers(0, 2),
)
def test_label_round_trip_differs_only_at_borders(spacing, factors, forward, margin) -> None:
    shape = (9, 16, 18)
    image, label = _phantom(shape, spacing, margin=margin)
    geometry = tiny_geometry(shape, spacing=spacing)
    target_zyx = [s * f for s, f in zip(spacing, factors)]
    plans = make_plans(
        [make_configuration("3d", [target_zyx[a] for a in forward], [ZSCORE])], transpose_forward=forward
    )
    data, seg, props = preprocess_case(image, label, geometry, plans, "3d")
    back = revert(seg, props, is_label=True)
    assert back.shape == label.shape
    assert set(np.unique(back).tolist()) <= {0, 1, 2}
    radius = tuple(int(np.ceil(max(1.0, f))) for f in factors)
    assert not np.any((back != label) & ~_near_boundary(label, radius))
    assert np.mean(back == label) > 0.9


@pytest.mark.parametrize(
    ("spacing", "target"), [((3.0, 0.8, 0.7), (3.0, 1.0, 0.9)), ((1.0, 1.1, 0.9), (1.2, 1.0, 1.1))]
)
def test_smooth_image_round_trip_within_interpolation_error(spacing, target) -> None:
    shape = (12, 20, 22)
    image, label = _phantom(shape, spacing)
    image = ndimage.gaussian_filter(image, (0, 1.5, 1.5, 1.5))
    plans = make_plans([make_configuration("3d", target, [ZSCORE])])
    data, _, props = preprocess_case(image, label, tiny_geometry(shape, spacing=spacing), plans, "3d")
    back = revert(data, props, is_label=False, order=3)
    expected = normalize(image, [ZSCORE])
    span = float(expected.max() - expected.min())
    assert back.shape == image.shape
    assert np.abs(back - expected).max() < 0.03 * span
    assert np.abs(back - expected).mean() < 0.003 * span


def test_anisotropic_case_resamples_the_coarse_axis_with_nearest_slices() -> None:
    shape, spacing = (6, 16, 18), (4.0, 0.8, 0.8)
    image, label = _phantom(shape, spacing)
    plans = make_plans([make_configuration("3d", (2.0, 0.8, 0.8), [ZSCORE], resampling=ResamplingSpec(order_z=0))])
    data, seg, props = preprocess_case(image, label, tiny_geometry(shape, spacing=spacing), plans, "3d")
    assert data.shape == (1, 12, 16, 18)
    for k in range(6):  # each thick slice becomes two identical thin ones: nothing blurred across slices
        assert np.array_equal(data[0, 2 * k], data[0, 2 * k + 1])
        assert np.array_equal(seg[0, 2 * k], seg[0, 2 * k + 1])
    assert np.array_equal(revert(seg, props, is_label=True), label)


def test_two_d_configuration_keeps_the_slice_spacing() -> None:
    shape, spacing = (7, 11, 13), (3.3, 0.7, 0.8)
    image, label = _phantom(shape, spacing)
    plans = make_plans([make_configuration("2d", (1.4, 1.6), [ZSCORE])])
    data, seg, props = preprocess_case(image, label, tiny_geometry(shape, spacing=spacing), plans, "2d")
    assert props.spacing == (3.3, 1.4, 1.6)
    assert data.shape == (1, 7, 6, 6)
    assert revert(seg, props, is_label=True).shape == shape


def test_probabilities_revert_with_background_outside_the_crop() -> None:
    shape = (7, 11, 13)
    image, label = _phantom(shape, (3.0, 0.7, 0.8), margin=2)
    data, seg, props = preprocess_case(image, label, tiny_geometry(shape), ct_plans(), "3d_fullres")
    probs = np.stack([(seg[0] == c).astype(np.float32) for c in range(3)])
    back = revert(probs, props, is_label=False)
    assert back.shape == (3, *shape) and back.dtype == np.float32
    assert np.all(back[0, :2] == 1) and np.all(back[1:, :2] == 0)
    assert np.allclose(back.sum(axis=0), 1, atol=1e-5)
    assert np.array_equal(back.argmax(axis=0), revert(seg, props, is_label=True))


def test_reverted_label_written_has_exactly_the_input_geometry(tmp_path: Path) -> None:
    shape, spacing = (7, 11, 13), (3.0, 0.7, 0.8)
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated in-plane
    source = Geometry(spacing, shape, (12.5, -40.25, 7.0), direction, 3)
    image, label = _phantom(shape, spacing, margin=1)
    write_image(image[0], source, tmp_path / "image.nii.gz")
    image_read, geometry = read_image(tmp_path / "image.nii.gz")
    plans = make_plans([make_configuration("3d", (1.0, 1.0, 2.5), [CT_NORM])], transpose_forward=(1, 2, 0))
    _, seg, props = preprocess_case(image_read, label, geometry, plans, "3d")
    back = revert(seg, props, is_label=True)
    write_image(back, props.geometry, tmp_path / "pred.nii.gz")
    written, written_geometry = read_label(tmp_path / "pred.nii.gz")
    assert written_geometry == geometry
    assert np.array_equal(written, back)


def test_nan_image_is_reported() -> None:
    image, label = _phantom((7, 11, 13), (3.0, 0.7, 0.8))
    image[0, 3, 4, 5] = np.nan
    with pytest.raises(PreprocessingError, match="NaN"):
        preprocess_case(image, label, tiny_geometry(), ct_plans(), "3d_fullres")


def test_label_grid_must_match_the_image() -> None:
    image, _ = _phantom((7, 11, 13), (3.0, 0.7, 0.8))
    with pytest.raises(PreprocessingError, match="label shape"):
        preprocess_case(image, np.zeros((7, 11, 12), np.uint8), tiny_geometry(), ct_plans(), "3d_fullres")


def test_unknown_configuration_lists_the_valid_ones() -> None:
    image, label = _phantom((7, 11, 13), (3.0, 0.7, 0.8))
    with pytest.raises(ConfigError, match="3d_fullres"):
        preprocess_case(image, label, tiny_geometry(), ct_plans(), "3d_lowres")


def test_case_without_label_gives_no_seg() -> None:
    image, _ = _phantom((7, 11, 13), (3.0, 0.7, 0.8))
    data, seg, props = preprocess_case(image, None, tiny_geometry(), ct_plans(), "3d_fullres")
    assert seg is None
    assert data.shape[1:] == props.shape_after_resampling


def test_plan_hash_changes_with_preprocessing_fields_only() -> None:
    base = ct_plans()
    assert plan_hash(base, "3d_fullres") == plan_hash(ct_plans(), "3d_fullres")
    assert plan_hash(base, "3d_fullres") != plan_hash(ct_plans((3.0, 1.0, 1.0)), "3d_fullres")
    assert plan_hash(base, "3d_fullres") != plan_hash(ct_plans(transpose_forward=(2, 0, 1)), "3d_fullres")
