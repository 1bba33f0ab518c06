"""Metrics on masks: invariants, empty-mask rules, ignore label, regions, brute-force surface distances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

from autoseg.evaluation.metrics import (
    ClassMetrics,
    assd,
    class_metrics,
    dice,
    evaluate_case,
    hd95,
    iou,
    nsd,
    surface_distances,
    surface_mask,
)
from autoseg.evaluation.surfaces import surfels

SHAPE = (7, 11, 13)
SPACING = (3.0, 0.7, 0.8)

masks = arrays(bool, SHAPE, elements=st.booleans())
small_masks = arrays(bool, (4, 5, 6), elements=st.booleans())


def blob(seed: int, shape: tuple[int, ...] = SHAPE, sigma: float = 1.5, level: float = 0.5) -> np.ndarray:
    """A smooth random mask (a few connected blobs), reproducible from ``seed``."""
    noise = np.random.default_rng(seed).random(shape)
    return ndimage.gaussian_filter(noise, sigma) > level + 0.02 * (seed % 3)


def brute_force_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances between surface voxel centres with a KD-tree (slow but obviously right)."""
    structure = ndimage.generate_binary_structure(pred.ndim, 1)
    surf_p = pred & ~ndimage.binary_erosion(pred, structure, border_value=0)
    surf_r = ref & ~ndimage.binary_erosion(ref, structure, border_value=0)
    pts_p = np.argwhere(surf_p) * np.asarray(spacing)
    pts_r = np.argwhere(surf_r) * np.asarray(spacing)
    return cKDTree(pts_r).query(pts_p)[0], cKDTree(pts_p).query(pts_r)[0]


def brute_force_nsd(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float) -> float:
    """Surface Dice from our surfels with all pairwise corner distances (slow but obviously right)."""
    (corners_p, size_p), (corners_r, size_r) = surfels(pred, spacing), surfels(ref, spacing)
    distances = cdist(np.argwhere(corners_p) * np.asarray(spacing), np.argwhere(corners_r) * np.asarray(spacing))
    limit = tolerance_mm + 1e-9
    within = size_p[distances.min(axis=1) <= limit].sum() + size_r[distances.min(axis=0) <= limit].sum()
    return within / (size_p.sum() + size_r.sum())


@settings(max_examples=40, deadline=None)
@given(masks, masks)
def test_dice_is_symmetric_and_in_unit_interval(a, b):
    assert dice(a, b) == dice(b, a)
    assert 0.0 <= dice(a, b) <= 1.0
    assert 0.0 <= iou(a, b) <= dice(a, b) + 1e-12


@settings(max_examples=40, deadline=None)
@given(masks)
def test_dice_of_a_mask_with_itself_is_one(a):
    assert dice(a, a) == 1.0
    assert iou(a, a) == 1.0
    m = class_metrics(a, a, SPACING)
    assert (m.dice, m.nsd, m.hd95_mm, m.assd_mm, m.volume_diff_mm3) == (1.0, 1.0, 0.0, 0.0, 0.0)


@settings(max_examples=40, deadline=None)
@given(small_masks, small_masks)
def test_surface_mask_equals_face_connected_erosion(a, ignore):
    structure = ndimage.generate_binary_structure(3, 1)
    expected = a & ~ndimage.binary_erosion(a, structure, border_value=0)
    assert np.array_equal(surface_mask(a), expected)
    expected_ignore = a & ~ndimage.binary_erosion(a | ignore, structure, border_value=0)
    assert np.array_equal(surface_mask(a, ignore=ignore), expected_ignore)


@settings(max_examples=30, deadline=None)
@given(small_masks, small_masks, st.floats(0.1, 10.0))
def test_surface_distances_scale_with_spacing(a, b, k):
    spacing = (2.0, 0.6, 0.9)
    scaled = tuple(k * s for s in spacing)
    if not a.any() or not b.any():
        assert math.isnan(hd95(a, b, scaled)) or (not a.any() and not b.any())
        return
    assert hd95(a, b, scaled) == pytest.approx(k * hd95(a, b, spacing), rel=1e-9)
    assert assd(a, b, scaled) == pytest.approx(k * assd(a, b, spacing), rel=1e-9)
    assert nsd(a, b, scaled, tolerance_mm=k * 1.3) == pytest.approx(nsd(a, b, spacing, tolerance_mm=1.3))


@settings(max_examples=30, deadline=None)
@given(small_masks, small_masks)
def test_distance_metrics_are_symmetric_and_nsd_in_unit_interval(a, b):
    spacing = (2.0, 0.6, 0.9)
    for metric in (hd95, assd, nsd):
        x, y = metric(a, b, spacing), metric(b, a, spacing)
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-12)
    value = nsd(a, b, spacing)
    assert math.isnan(value) or 0.0 <= value <= 1.0


@pytest.mark.parametrize("seed", range(6))
def test_surface_distances_match_brute_force(seed, distance_path):
    pred, ref = blob(seed), blob(seed + 100)
    pred[0, :3, :4] = True  # touches the array border: border counts as outside
    ours = surface_distances(pred, ref, SPACING)
    expected = brute_force_distances(pred, ref, SPACING)
    np.testing.assert_allclose(ours[0], expected[0], atol=1e-9)
    np.testing.assert_allclose(ours[1], expected[1], atol=1e-9)
    pooled = np.concatenate(expected)
    assert hd95(pred, ref, SPACING) == pytest.approx(np.percentile(pooled, 95), abs=1e-9)
    assert assd(pred, ref, SPACING) == pytest.approx(pooled.mean(), abs=1e-9)
    for tol in (0.5, 1.0, 2.5):  # 2.5 mm = |(0, 0.7, 2.4)| is hit exactly: ties count as within the tolerance
        assert nsd(pred, ref, SPACING, tolerance_mm=tol) == pytest.approx(
            brute_force_nsd(pred, ref, SPACING, tol), abs=1e-12
        )


def test_large_compact_objects_match_brute_force(distance_path):
    grid = np.ogrid[:9, :40, :44]
    ref = ((grid[0] - 4) * 3.0) ** 2 + ((grid[1] - 20) * 0.7) ** 2 + ((grid[2] - 22) * 0.8) ** 2 < 11.0**2
    pred = ((grid[0] - 4.4) * 3.0) ** 2 + ((grid[1] - 21) * 0.7) ** 2 + ((grid[2] - 21) * 0.8) ** 2 < 10.0**2
    pooled = np.concatenate(brute_force_distances(pred, ref, SPACING))
    m = class_metrics(pred, ref, SPACING, nsd_tolerance_mm=1.2)
    assert m.hd95_mm == pytest.approx(np.percentile(pooled, 95), abs=1e-9)
    assert m.assd_mm == pytest.approx(pooled.mean(), abs=1e-9)
    assert m.nsd == pytest.approx(brute_force_nsd(pred, ref, SPACING, 1.2), abs=1e-12)


def test_2d_masks_match_brute_force(distance_path):
    pred, ref = blob(1, (23, 17)), blob(2, (23, 17))
    spacing = (0.7, 1.9)
    pooled = np.concatenate(brute_force_distances(pred, ref, spacing))
    assert hd95(pred, ref, spacing) == pytest.approx(np.percentile(pooled, 95), abs=1e-9)
    assert assd(pred, ref, spacing) == pytest.approx(pooled.mean(), abs=1e-9)
    for tol in (0.9, 1.9, 2.4):
        assert nsd(pred, ref, spacing, tolerance_mm=tol) == pytest.approx(
            brute_force_nsd(pred, ref, spacing, tol), abs=1e-12
        )


def test_single_voxel_distances_are_known():
    pred, ref = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    pred[1, 2, 3] = True
    ref[3, 2, 5] = True
    expected = math.hypot(2 * 3.0, 2 * 0.8)
    assert hd95(pred, ref, SPACING) == pytest.approx(expected, abs=1e-12)
    assert assd(pred, ref, SPACING) == pytest.approx(expected, abs=1e-12)


def test_single_voxel_nsd_is_known():
    """A voxel has 8 corner surfels of equal area; each lies 1 or 2 voxels from the other voxel per axis (z, x)."""
    pred, ref = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    pred[1, 2, 3] = True
    ref[3, 2, 5] = True
    near, z_far, x_far, far = (math.hypot(dz * 3.0, dx * 0.8) for dz, dx in ((1, 1), (2, 1), (1, 2), (2, 2)))
    assert nsd(pred, ref, SPACING, tolerance_mm=near - 0.01) == 0.0
    assert nsd(pred, ref, SPACING, tolerance_mm=near) == 0.25
    assert nsd(pred, ref, SPACING, tolerance_mm=x_far) == 0.5
    assert nsd(pred, ref, SPACING, tolerance_mm=z_far) == 0.75
    assert nsd(pred, ref, SPACING, tolerance_mm=far) == 1.0


def test_inputs_are_not_modified():
    pred, ref = blob(3).astype(np.uint8), blob(4).astype(np.uint8)
    ref[0, 0, :5] = 9
    before = pred.copy(), ref.copy()
    evaluate_case(pred, ref, SPACING, labels=[1], ignore_label=9)
    class_metrics(pred > 0, ref == 1, SPACING, ignore=ref == 9)
    assert np.array_equal(pred, before[0]) and np.array_equal(ref, before[1])


def test_both_empty():
    empty = np.zeros(SHAPE, bool)
    m = class_metrics(empty, empty, SPACING)
    assert m == ClassMetrics(1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0)
    assert (hd95(empty, empty, SPACING), assd(empty, empty, SPACING), nsd(empty, empty, SPACING)) == (0.0, 0.0, 1.0)


def test_prediction_empty():
    ref = blob(5)
    m = class_metrics(np.zeros(SHAPE, bool), ref, SPACING)
    assert (m.dice, m.iou, m.nsd, m.recall) == (0.0, 0.0, 0.0, 0.0)
    assert math.isnan(m.precision) and math.isnan(m.hd95_mm) and math.isnan(m.assd_mm)
    assert m.volume_diff_rel == -1.0
    assert math.isnan(hd95(np.zeros(SHAPE, bool), ref, SPACING))


def test_reference_empty():
    pred = blob(6)
    m = class_metrics(pred, np.zeros(SHAPE, bool), SPACING)
    assert (m.dice, m.iou, m.nsd, m.precision) == (0.0, 0.0, 0.0, 0.0)
    assert math.isnan(m.recall) and math.isnan(m.hd95_mm) and math.isnan(m.assd_mm)
    assert math.isnan(m.volume_diff_rel)
    assert m.volume_pred_mm3 == pytest.approx(pred.sum() * 3.0 * 0.7 * 0.8)


def test_volumes_and_counts():
    pred, ref = blob(7), blob(8)
    m = class_metrics(pred, ref, SPACING)
    voxel = 3.0 * 0.7 * 0.8
    assert (m.tp, m.fp, m.fn) == (int((pred & ref).sum()), int((pred & ~ref).sum()), int((~pred & ref).sum()))
    assert m.volume_diff_mm3 == pytest.approx((pred.sum() - ref.sum()) * voxel)
    assert m.volume_diff_rel == pytest.approx((pred.sum() - ref.sum()) / ref.sum())
    assert m.precision == pytest.approx(m.tp / (m.tp + m.fp))
    assert m.recall == pytest.approx(m.tp / (m.tp + m.fn))


def test_ignore_label_excludes_voxels_from_every_metric():
    ref = np.zeros(SHAPE, np.uint8)
    ref[1:6, 2:9, 3:11] = 1
    ref[:, :, 11:] = 255  # ignored slab beside the object
    pred = ref.copy()
    pred[pred == 255] = 1  # the prediction claims the ignored slab
    pred[:, :, 12] = 0
    result = evaluate_case(pred, ref, SPACING, ignore_label=255)
    assert list(result) == ["1"]
    m = result["1"]
    assert (m.dice, m.hd95_mm, m.nsd, m.fp) == (1.0, 0.0, 1.0, 0)
    assert m.volume_pred_mm3 == m.volume_ref_mm3
    without_ignore = evaluate_case(pred, ref, SPACING, labels=[1])["1"]
    assert without_ignore.dice < 1.0


def test_ignored_neighbours_do_not_make_surface():
    mask = np.zeros((5, 6, 7), bool)
    mask[1:4, 1:5, 1:4] = True
    ignore = np.zeros_like(mask)
    ignore[:, :, 4:] = True
    with_ignore = surface_mask(mask, ignore=ignore)
    assert surface_mask(mask)[2, 2, 3] and not with_ignore[2, 2, 3]


def test_ignore_label_cannot_be_evaluated():
    ref = np.zeros(SHAPE, np.uint8)
    with pytest.raises(ValueError, match="ignore label"):
        evaluate_case(ref, ref, SPACING, labels=[1, 255], ignore_label=255)


def test_regions_unite_labels():
    pred, ref = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    pred[blob(9)], pred[blob(10)] = 1, 2
    ref[blob(11)], ref[blob(12)] = 1, 2
    regions = {"whole": (1, 2), "core": (2,)}
    result = evaluate_case(pred, ref, SPACING, regions=regions, nsd_tolerance_mm=2.0)
    assert list(result) == ["whole", "core"]
    assert result["whole"] == class_metrics(pred > 0, ref > 0, SPACING, nsd_tolerance_mm=2.0)
    assert result["core"] == class_metrics(pred == 2, ref == 2, SPACING, nsd_tolerance_mm=2.0)
    both = evaluate_case(pred, ref, SPACING, labels=[1], regions=regions)
    assert list(both) == ["1", "whole", "core"]


def test_evaluate_case_default_labels_and_label_zero():
    pred, ref = np.zeros(SHAPE, np.int16), np.zeros(SHAPE, np.int16)
    pred[blob(13)] = 3
    ref[blob(14)] = 1
    result = evaluate_case(pred, ref, SPACING)
    assert list(result) == ["1", "3"]
    assert result["1"].dice == 0.0 and math.isnan(result["1"].precision)
    assert result["3"].dice == 0.0 and math.isnan(result["3"].recall)
    background = evaluate_case(pred, ref, SPACING, labels=[0])["0"]
    assert background == class_metrics(pred == 0, ref == 0, SPACING)
    absent = evaluate_case(pred, ref, SPACING, labels=[7])["7"]
    assert (absent.dice, absent.hd95_mm) == (1.0, 0.0)


def test_evaluate_case_matches_class_metrics_per_label():
    pred = (blob(15).astype(np.uint8) + 2 * blob(16)).astype(np.uint8)
    ref = (blob(17).astype(np.uint8) + 2 * blob(18)).astype(np.uint8)
    result = evaluate_case(pred, ref, SPACING, nsd_tolerance_mm=0.9)
    for value in (1, 2, 3):
        if str(value) in result:
            assert result[str(value)] == class_metrics(pred == value, ref == value, SPACING, nsd_tolerance_mm=0.9)


def test_bad_inputs_raise():
    a = np.zeros(SHAPE, bool)
    with pytest.raises(ValueError, match="shape"):
        dice(a, a[:-1])
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="nsd_tolerance_mm"):
        nsd(a, a, SPACING, tolerance_mm=-1.0)
    with pytest.raises(ValueError, match="integer"):
        evaluate_case(a.astype(float), a.astype(float), SPACING)
