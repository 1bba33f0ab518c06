"""Agreement with published implementations: medpy (HD95, ASSD, Dice) and DeepMind's surface-distance (NSD).

DeepMind's package places surface elements ("surfels") at voxel corners and weights them by area; ours counts
surface voxels (weight 1, at voxel centres). The fair comparison is therefore their NSD formula fed with our
distances and unit weights, which must agree exactly; on real shapes the two definitions differ by the
discretisation, which is checked only loosely (and only with non-empty masks: the package uses ``np.Inf``,
removed in NumPy 2, when a mask is empty).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from autoseg.evaluation import metrics as metrics_module
from autoseg.evaluation.metrics import assd, class_metrics, hd95, nsd, surface_distances

SPACING = (3.0, 0.7, 0.8)


def random_mask(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    mask = ndimage.gaussian_filter(rng.random(shape), sigma) > 0.5
    if not mask.any():
        mask[tuple(n // 2 for n in shape)] = True
    return mask


def ellipsoid(shape, centre, radii_mm, spacing) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) * s / r) ** 2 for g, c, r, s in zip(grid, centre, radii_mm, spacing)) <= 1


@pytest.fixture(params=["edt", "kdtree"])
def distance_path(request, monkeypatch):
    """Run a test with the distance transform and again with the k-d tree computing surface distances."""
    monkeypatch.setattr(metrics_module, "KDTREE_VOXELS_PER_SURFACE_VOXEL", 10**12 if request.param == "edt" else 0)
    return request.param


@pytest.mark.parametrize("seed", range(8))
def test_hd95_and_assd_match_medpy(seed, distance_path):
    binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(seed)
    shape = (9, 21, 26)
    pred, ref = random_mask(rng, shape, 1.5), random_mask(rng, shape, 2.0)
    assert abs(hd95(pred, ref, SPACING) - binary.hd95(pred, ref, voxelspacing=SPACING)) < 1e-3
    assert abs(assd(pred, ref, SPACING) - binary.assd(pred, ref, voxelspacing=SPACING)) < 1e-3
    m = class_metrics(pred, ref, SPACING)
    assert abs(m.hd95_mm - binary.hd95(pred, ref, voxelspacing=SPACING)) < 1e-3
    assert abs(m.dice - binary.dc(pred, ref)) < 1e-12
    assert abs(m.precision - binary.precision(pred, ref)) < 1e-12
    assert abs(m.recall - binary.recall(pred, ref)) < 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_2d_hd95_and_assd_match_medpy(seed, distance_path):
    binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(seed)
    pred, ref = random_mask(rng, (37, 29), 2.0), random_mask(rng, (37, 29), 2.0)
    spacing = (0.6, 1.7)
    assert abs(hd95(pred, ref, spacing) - binary.hd95(pred, ref, voxelspacing=spacing)) < 1e-3
    assert abs(assd(pred, ref, spacing) - binary.assd(pred, ref, voxelspacing=spacing)) < 1e-3


@pytest.mark.parametrize("seed", range(4))
def test_nsd_equals_deepmind_formula_with_unit_surfel_weights(seed):
    sd = pytest.importorskip("surface_distance")
    rng = np.random.default_rng(seed)
    pred, ref = random_mask(rng, (9, 21, 26), 1.5), random_mask(rng, (9, 21, 26), 1.5)
    d_pred, d_ref = surface_distances(pred, ref, SPACING)
    theirs_input = {
        "distances_gt_to_pred": d_ref,
        "distances_pred_to_gt": d_pred,
        "surfel_areas_gt": np.ones_like(d_ref),
        "surfel_areas_pred": np.ones_like(d_pred),
    }
    for tol in (0.75, 1.5, 3.5):  # not hit exactly by any lattice distance: no rounding ties
        theirs = sd.compute_surface_dice_at_tolerance(theirs_input, tol)
        assert abs(nsd(pred, ref, SPACING, tolerance_mm=tol) - theirs) < 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_nsd_close_to_deepmind_surfels_on_smooth_shapes(seed):
    """The definitions differ by discretisation only: measured |theirs - ours| <= 0.13 for these shapes."""
    sd = pytest.importorskip("surface_distance")
    rng = np.random.default_rng(seed)
    shape = (20, 80, 76)
    centre = np.array(shape) / 2
    ref = ellipsoid(shape, centre, (20, 15, 14), SPACING)
    radii = np.array((20, 15, 14)) * rng.uniform(0.85, 1.15, 3)
    pred = ellipsoid(shape, centre + rng.normal(size=3) * (0.7, 3.0, 3.0), radii, SPACING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the package imports deprecated scipy namespaces
        distances = sd.compute_surface_distances(ref, pred, SPACING)
    for tol in (1.0, 2.0, 3.0):
        theirs = sd.compute_surface_dice_at_tolerance(distances, tol)
        ours = nsd(pred, ref, SPACING, tolerance_mm=tol)
        assert abs(theirs - ours) < 0.15
