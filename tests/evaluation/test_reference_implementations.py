"""Agreement with published implementations: medpy (HD95, ASSD, Dice) and DeepMind's surface-distance (NSD).

Both packages are in the dev extras; in CI a skip for want of them fails (see ``tests/conftest.py``). NSD must equal
DeepMind's ``compute_surface_dice_at_tolerance`` within 1e-6 wherever no surfel lies exactly at the tolerance (at
such ties the package's distance can round one step above the tolerance and drop the surfel, while ours counts
it: there the package is compared at the tolerance plus ``NSD_ROUNDING_MM``). The package still uses ``np.Inf``,
removed in NumPy 2, when a mask is empty: the tests put it back for the reference's sake.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from autoseg.evaluation.metrics import NSD_ROUNDING_MM, assd, class_metrics, hd95, nsd

SPACING = (3.0, 0.7, 0.8)
#: Anisotropic spacings in mm (Z, Y, X); the 2D tests take the last two values.
SPACINGS = [(3.0, 0.7, 0.8), (0.45, 1.3, 2.2), (1.0, 1.0, 1.0), (5.0, 0.36, 0.36)]
#: Tolerances in mm that no distance of these lattices hits exactly.
TOLERANCES = (0.31, 0.93, 1.57, 2.71, 4.43)


@pytest.fixture
def surface_distance(monkeypatch):
    """DeepMind's package, made to run on NumPy 2 (``np.Inf``) and quiet about deprecated SciPy namespaces."""
    sd = pytest.importorskip("surface_distance")
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield sd


def deepmind_nsd(sd, pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float) -> float:
    distances = sd.compute_surface_distances(ref.astype(bool), pred.astype(bool), spacing)
    with np.errstate(invalid="ignore"):  # 0 / 0 when both masks are empty
        return float(sd.compute_surface_dice_at_tolerance(distances, tolerance_mm))


def random_mask(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    mask = ndimage.gaussian_filter(rng.random(shape), sigma) > 0.5
    if not mask.any():
        mask[tuple(n // 2 for n in shape)] = True
    return mask


def ellipsoid(shape, centre, radii_mm, spacing) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) * s / r) ** 2 for g, c, r, s in zip(grid, centre, radii_mm, spacing)) <= 1


def assert_nsd_matches(sd, pred, ref, spacing, tolerances=TOLERANCES) -> None:
    for tol in tolerances:
        theirs = deepmind_nsd(sd, pred, ref, spacing, tol)
        ours = nsd(pred, ref, spacing, tolerance_mm=tol)
        assert abs(ours - theirs) < 1e-6, (tol, ours, theirs)


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


@pytest.mark.parametrize("seed", range(8))
def test_nsd_matches_deepmind_on_random_3d_masks(seed, surface_distance, distance_path):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(5, 24, 3))
    spacing = SPACINGS[seed % len(SPACINGS)]
    pred, ref = random_mask(rng, shape, rng.uniform(0.6, 2.0)), random_mask(rng, shape, rng.uniform(0.6, 2.0))
    assert_nsd_matches(surface_distance, pred, ref, spacing)


@pytest.mark.parametrize("seed", range(8))
def test_nsd_matches_deepmind_on_random_2d_masks(seed, surface_distance, distance_path):
    rng = np.random.default_rng(100 + seed)
    shape = tuple(int(n) for n in rng.integers(5, 50, 2))
    spacing = SPACINGS[seed % len(SPACINGS)][1:]
    pred, ref = random_mask(rng, shape, rng.uniform(0.6, 2.5)), random_mask(rng, shape, rng.uniform(0.6, 2.5))
    assert_nsd_matches(surface_distance, pred, ref, spacing)


@pytest.mark.parametrize("shape", [(4, 5, 6), (7, 9)])
@settings(max_examples=60, deadline=None)
@given(data=st.data(), spacing=st.sampled_from(SPACINGS), tolerance_mm=st.sampled_from(TOLERANCES))
def test_nsd_matches_deepmind_on_any_small_masks(shape, data, spacing, tolerance_mm):
    """Noise masks: every cell configuration, masks touching every border, empty and full masks."""
    sd = pytest.importorskip("surface_distance")
    pred = data.draw(arrays(bool, shape, elements=st.booleans()), label="pred")
    ref = data.draw(arrays(bool, shape, elements=st.booleans()), label="ref")
    spacing = spacing[-len(shape) :]
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:  # hypothesis shuns function fixtures
        warnings.simplefilter("ignore", DeprecationWarning)
        patch.setattr(np, "Inf", np.inf, raising=False)
        theirs = deepmind_nsd(sd, pred, ref, spacing, tolerance_mm)
    ours = nsd(pred, ref, spacing, tolerance_mm=tolerance_mm)
    if not pred.any() and not ref.any():
        assert ours == 1.0 and math.isnan(theirs)  # our convention for "correctly nothing here"
    else:
        assert abs(ours - theirs) < 1e-6


@pytest.mark.parametrize("ndim", [2, 3])
def test_nsd_matches_deepmind_on_edge_cases(ndim, surface_distance):
    shape = (6, 9, 11)[-ndim:]
    spacing = SPACING[-ndim:]
    empty, full = np.zeros(shape, bool), np.ones(shape, bool)
    single, other_single, corner = empty.copy(), empty.copy(), empty.copy()
    single[(2, 4, 5)[-ndim:]] = True
    other_single[(4, 4, 8)[-ndim:]] = True
    corner[(slice(0, 2),) * ndim] = True  # touches the array's borders on every axis
    rng = np.random.default_rng(ndim)
    blob = random_mask(rng, shape, 1.0)
    pairs = [(single, other_single), (single, single), (single, blob), (corner, full), (full, blob), (corner, blob)]
    pairs += [(empty, blob), (blob, empty), (empty, single), (full, empty)]
    for pred, ref in pairs:
        assert_nsd_matches(surface_distance, pred, ref, spacing)
        assert_nsd_matches(surface_distance, ref, pred, spacing)
    assert nsd(empty, empty, spacing) == 1.0 and math.isnan(deepmind_nsd(surface_distance, empty, empty, spacing, 1.0))


def test_nsd_ties_count_as_within_the_tolerance(surface_distance, distance_path):
    """At lattice distances ours equals the package given the tolerance plus NSD_ROUNDING_MM."""
    rng = np.random.default_rng(7)
    shape = (9, 17, 15)
    spacing = (2.0, 0.7, 0.8)
    pred, ref = random_mask(rng, shape, 1.3), random_mask(rng, shape, 1.3)
    for tol in (0.7, 0.8, 2.0, math.hypot(0.7, 0.8), math.hypot(2.0, 0.8), 2.5):
        theirs = deepmind_nsd(surface_distance, pred, ref, spacing, tol + NSD_ROUNDING_MM)
        assert abs(nsd(pred, ref, spacing, tolerance_mm=tol) - theirs) < 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_nsd_weights_surfels_by_area_not_voxel_count(seed, surface_distance, distance_path):
    """Regression: counting surface voxels gave up to 0.15 from DeepMind's NSD on these displaced ellipsoids."""
    rng = np.random.default_rng(seed)
    shape = (20, 80, 76)
    centre = np.array(shape) / 2
    ref = ellipsoid(shape, centre, (20, 15, 14), SPACING)
    radii = np.array((20, 15, 14)) * rng.uniform(0.85, 1.15, 3)
    pred = ellipsoid(shape, centre + rng.normal(size=3) * (0.7, 3.0, 3.0), radii, SPACING)
    assert_nsd_matches(surface_distance, pred, ref, SPACING, tolerances=(0.93, 1.57, 2.71))
