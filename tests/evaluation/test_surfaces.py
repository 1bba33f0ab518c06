"""Surface elements: known areas and lengths, symmetries, ignored voxels, and the distance paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from autoseg.evaluation import surfaces
from autoseg.evaluation.surfaces import corner_codes, nearest_distances, surface_dice, surfel_sizes, surfels

SPACING = (3.0, 0.7, 0.8)


def box_area(size: tuple[int, int, int], spacing: tuple[float, float, float]) -> float:
    """Marching-cubes area of a box of voxels: flat faces, chamfered edges (quads) and cut corners (triangles)."""
    (a, b, c), (s0, s1, s2) = size, spacing
    faces = 2 * ((b - 1) * (c - 1) * s1 * s2 + (a - 1) * (c - 1) * s0 * s2 + (a - 1) * (b - 1) * s0 * s1)
    edges = 2 * (
        (a - 1) * s0 * math.hypot(s1, s2) + (b - 1) * s1 * math.hypot(s0, s2) + (c - 1) * s2 * math.hypot(s0, s1)
    )
    corners = math.sqrt((s1 * s2) ** 2 + (s0 * s2) ** 2 + (s0 * s1) ** 2)
    return faces + edges + corners


@pytest.mark.parametrize(("start", "size"), [((2, 3, 4), (3, 5, 4)), ((0, 0, 5), (7, 2, 8)), ((3, 4, 5), (1, 1, 1))])
def test_box_surface_area_is_known(start, size):
    """Boxes inside the array and touching its borders (beyond the border is outside), and a single voxel."""
    mask = np.zeros((7, 11, 13), bool)
    mask[tuple(slice(o, o + n) for o, n in zip(start, size))] = True
    corners, sizes = surfels(mask, SPACING)
    assert corners.shape == (8, 12, 14)
    assert sizes.sum() == pytest.approx(box_area(size, SPACING), rel=1e-12)


def test_rectangle_contour_length_is_known():
    mask = np.zeros((9, 12), bool)
    mask[0:4, 3:10] = True  # 4 x 7 pixels touching the top border
    spacing = (0.6, 1.7)
    length = 2 * (3 * 0.6 + 6 * 1.7) + 2 * math.hypot(*spacing)  # straight sides and four cut corners
    assert surfels(mask, spacing)[1].sum() == pytest.approx(length, rel=1e-12)


def test_saddle_cells_hold_two_cut_corners():
    mask = np.array([[1, 0], [0, 1]], bool)
    corners, sizes = surfels(mask, (0.6, 1.7))
    assert corners[1, 1] and sizes.sum() == pytest.approx(4 * 0.5 * math.hypot(0.6, 1.7) + 2 * math.hypot(0.6, 1.7))


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_cell_and_its_complement_have_the_same_surface(ndim):
    spacing = SPACING[-ndim:]
    sizes = surfel_sizes(spacing)
    full = 2 ** (2**ndim) - 1
    assert np.array_equal(sizes, sizes[::-1]) and sizes[0] == sizes[full] == 0.0
    assert np.all(sizes[1:full] > 0)
    assert not sizes.flags.writeable


def test_cell_areas_follow_the_axes():
    """A cell cut by a plane normal to axis k holds the face area of the other two axes."""
    sizes = surfel_sizes(SPACING)
    for axis, area in enumerate((0.7 * 0.8, 3.0 * 0.8, 3.0 * 0.7)):
        cell = np.zeros((2, 2, 2), bool)
        cell[(slice(None),) * axis + (1,)] = True
        code = corner_codes(cell)[1, 1, 1]
        assert sizes[code] == pytest.approx(area, rel=1e-12)


def test_codes_number_cell_voxels_in_c_order():
    mask = np.zeros((2, 3, 4), bool)
    mask[1, 2, 3] = True
    codes = corner_codes(mask)
    assert codes.shape == (3, 4, 5)
    assert codes[2, 3, 4] == 1 and codes[1, 2, 3] == 128 and codes[2, 3, 3] == 2 and codes[1, 3, 4] == 16
    assert np.count_nonzero(codes) == 8


def test_surfels_are_translation_invariant_and_inputs_unchanged():
    rng = np.random.default_rng(0)
    mask = ndimage.gaussian_filter(rng.random((6, 9, 10)), 1.2) > 0.5
    before = mask.copy()
    moved = np.zeros((9, 13, 15), bool)
    moved[2:8, 3:12, 4:14] = mask
    assert surfels(moved, SPACING)[1].sum() == pytest.approx(surfels(mask, SPACING)[1].sum(), rel=1e-12)
    assert np.array_equal(mask, before)


def test_boundary_with_ignored_voxels_is_no_surface():
    mask = np.zeros((5, 6, 7), bool)
    mask[1:4, 1:5, 1:4] = True
    ignore = np.zeros_like(mask)
    ignore[:, :, 4:] = True  # beside the mask's x = 3 side
    (plain, plain_sizes), (kept, kept_sizes) = surfels(mask, SPACING), surfels(mask, SPACING, ignore=ignore)
    assert plain[2, 2, 4] and not kept[2, 2, 4]  # a corner between the mask (x = 3) and ignored voxels (x = 4)
    assert np.all(plain >= kept)
    assert kept_sizes.sum() == pytest.approx(plain_sizes.sum() - 2 * 3 * 3.0 * 0.7, rel=1e-12)  # the flat inner face
    assert surface_dice(mask, mask, SPACING, 0.0, ignore=ignore) == 1.0
    assert math.isnan(surface_dice(mask, mask, SPACING, 1.0, ignore=~mask))  # wrapped in ignored voxels


def test_distance_paths_agree(monkeypatch):
    rng = np.random.default_rng(1)
    a = ndimage.gaussian_filter(rng.random((8, 20, 22)), 1.5) > 0.5
    b = ndimage.gaussian_filter(rng.random((8, 20, 22)), 1.5) > 0.5
    corners_a, corners_b = surfels(a, SPACING)[0], surfels(b, SPACING)[0]
    edt = nearest_distances(corners_a, corners_b, SPACING)
    monkeypatch.setattr(surfaces, "KDTREE_VOXELS_PER_SURFACE_VOXEL", 0)
    tree = nearest_distances(corners_a, corners_b, SPACING)
    np.testing.assert_allclose(edt[0], tree[0], atol=1e-12)
    np.testing.assert_allclose(edt[1], tree[1], atol=1e-12)
