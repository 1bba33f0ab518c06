"""Surfaces of binary masks and the distances between them, for the surface metrics of :mod:`.metrics`.

Masks are boolean arrays of shape (Y, X) or (Z, Y, X); ``spacing`` is the voxel size in mm in the same axis order.
Two surface models, one per family of metrics:

Boundary voxels (HD95 and ASSD, medpy's convention)
    The voxels of a mask with a face-neighbour outside it (binary erosion with the face-connected structure; the
    border of the array counts as outside). Distances run between voxel centres; every voxel weighs the same.

Surface elements, "surfels" (NSD, as DeepMind's ``surface-distance`` package; Nikolov et al. 2018)
    Surfels sit on the grid of voxel corners, shifted by half a voxel: corner ``c`` (``0 <= c_k <= n_k``) lies at
    voxel coordinates ``c - 0.5`` and its cell is made of the ``2**ndim`` voxels ``c - 1 + o``, ``o`` in
    ``{0, 1}**ndim`` (voxels beyond the array are outside). A corner whose cell is partly inside and partly
    outside the mask holds a surfel, weighted by the size of the piece of surface that crosses its cell:

    * 3D: the area in mm^2 of the classic marching-cubes triangulation of the cell at level 0.5, vertices at edge
      midpoints (Lorensen & Cline 1987, as ``skimage.measure.marching_cubes(method="lorensen")``); a cell with
      more than four voxels inside is triangulated as its complement, so that a mask and its complement have the
      same surfels. A triangle with area vector ``n`` in voxel units has area
      ``|(n_0 s_1 s_2, n_1 s_0 s_2, n_2 s_0 s_1)|`` mm^2.
    * 2D: the length in mm of the marching-squares contour: half the cell's diagonal where one corner is cut off
      (one voxel inside, or one outside), a cell side where two neighbouring voxels are inside, and two cut
      corners where two diagonal voxels are inside (a saddle).

    Distances run between corners. These are the surfels, sizes and distances of DeepMind's
    ``compute_surface_distances``; ``tests/evaluation/test_reference_implementations.py`` checks the agreement.

Ignored voxels (see :mod:`.metrics`) are not "outside" when surfaces are found, since the true boundary there is
unknown: a boundary voxel needs a face-neighbour that is neither in the mask nor ignored, and a surfel is left out
when every voxel of its cell is in the mask or ignored (the surfels kept keep their size).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes

__all__ = ["surface_mask", "nearest_distances", "corner_codes", "surfel_sizes", "surfels", "surface_dice"]

#: Above this many grid points per surface point, nearest surface points come from a k-d tree rather than the
#: distance transform of the grid (measured crossover: about 10; both give the same distances).
KDTREE_VOXELS_PER_SURFACE_VOXEL = 16


def _at(axis: int, index: slice | int) -> tuple[slice | int, ...]:
    """Index that applies ``index`` along ``axis`` and takes everything along the other axes."""
    return (slice(None),) * axis + (index,)


def surface_mask(mask: np.ndarray, *, ignore: np.ndarray | None = None) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (the array border counts as outside).

    Equivalent to ``mask & ~binary_erosion(mask | ignore, face-connected structure, border_value=0)``: a
    neighbour in ``ignore`` does not make a voxel a surface voxel.
    """
    mask = mask.astype(bool, copy=False)
    inside = mask if ignore is None else mask | ignore
    interior = mask.copy()
    for axis in range(mask.ndim):
        interior[_at(axis, slice(None, -1))] &= inside[_at(axis, slice(1, None))]
        interior[_at(axis, slice(1, None))] &= inside[_at(axis, slice(None, -1))]
        interior[_at(axis, 0)] = False
        interior[_at(axis, -1)] = False
    return mask & ~interior


def nearest_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each point of ``a`` to the nearest point of ``b``, and from each point of ``b`` to ``a``.

    ``a`` and ``b`` are non-empty boolean masks of points on one grid with ``spacing`` mm between points; each
    array of distances follows the points' C order. The distance transform costs time and memory per grid point,
    a k-d tree per surface point; the tree answers (with the same distances, to rounding) when the grid holds
    many points per surface point, as for large compact objects.
    """
    n_a, n_b = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    if a.size <= KDTREE_VOXELS_PER_SURFACE_VOXEL * (n_a + n_b):
        to_b = ndimage.distance_transform_edt(~b, sampling=spacing)[a]
        return to_b, ndimage.distance_transform_edt(~a, sampling=spacing)[b]
    points_a = np.argwhere(a) * np.asarray(spacing)  # C order, as boolean indexing
    points_b = np.argwhere(b) * np.asarray(spacing)
    return cKDTree(points_b).query(points_a)[0], cKDTree(points_a).query(points_b)[0]


def corner_codes(mask: np.ndarray) -> np.ndarray:
    """Code of the cell of every corner: bit ``i`` is set when the ``i``-th voxel of the cell is inside ``mask``.

    The voxels of a cell are numbered in C order of their offset ``o`` (see the module docstring); the result has
    shape ``n + 1`` along every axis and dtype uint8 (codes below 16 in 2D, below 256 in 3D).
    """
    padded = np.pad(mask.astype(bool, copy=False), 1)
    codes = np.zeros(tuple(n + 1 for n in mask.shape), np.uint8)
    for bit, offset in enumerate(np.ndindex((2,) * mask.ndim)):
        window = tuple(slice(o, o + n + 1) for o, n in zip(offset, mask.shape))
        codes |= padded[window].astype(np.uint8) << bit
    return codes


def _cell(code: int, ndim: int) -> np.ndarray:
    """The (2,) * ndim voxels of a cell with ``code``, True inside."""
    return ((code >> np.arange(2**ndim)) & 1).astype(bool).reshape((2,) * ndim)


@functools.cache
def _triangle_area_vectors() -> np.ndarray:
    """(256, T, 3) area vectors, in voxel units, of the marching-cubes triangles of every 3D cell code.

    Codes with fewer than T triangles are padded with zero vectors; codes 0 and 255 have none.
    """
    triangles = [np.zeros((0, 3))] * 256
    for code in range(1, 255):
        inside = _cell(code, 3)
        if np.count_nonzero(inside) > 4:
            inside = ~inside
        verts, faces, _, _ = marching_cubes(inside.astype(np.float64), 0.5, method="lorensen")
        corners = verts.astype(np.float64)[faces]  # (triangles, 3 vertices, 3 axes); exact multiples of 0.5
        triangles[code] = 0.5 * np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    table = np.zeros((256, max(len(t) for t in triangles), 3))
    for code, t in enumerate(triangles):
        table[code, : len(t)] = t
    return table


def _contour_lengths(spacing: tuple[float, float]) -> np.ndarray:
    """(16,) marching-squares contour length in mm of every 2D cell code."""
    cut_corner = 0.5 * math.hypot(*spacing)
    lengths = np.zeros(16)
    for code in range(1, 15):
        inside = _cell(code, 2)
        if np.count_nonzero(inside) != 2:
            lengths[code] = cut_corner
        elif inside[0, 0] == inside[0, 1]:  # the two rows differ: the contour runs along axis 1
            lengths[code] = spacing[1]
        elif inside[0, 0] == inside[1, 0]:
            lengths[code] = spacing[0]
        else:
            lengths[code] = 2 * cut_corner
    return lengths


@functools.lru_cache(maxsize=32)
def surfel_sizes(spacing: tuple[float, ...]) -> np.ndarray:
    """Size of the surfel of every cell code (read-only): area in mm^2 (3D, 256 codes) or length in mm (2D, 16)."""
    if len(spacing) == 2:
        sizes = _contour_lengths((spacing[0], spacing[1]))
    else:
        s0, s1, s2 = spacing
        scaled = _triangle_area_vectors() * np.array([s1 * s2, s0 * s2, s0 * s1])
        sizes = np.linalg.norm(scaled, axis=-1).sum(axis=-1)
    sizes.setflags(write=False)
    return sizes


def surfels(
    mask: np.ndarray, spacing: Sequence[float], *, ignore: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Surface elements of ``mask``: which corners hold one, and their sizes.

    Parameters
    ----------
    mask : (Y, X) or (Z, Y, X) boolean mask.
    spacing : voxel size in mm per array axis.
    ignore : optional mask of voxels whose side of the surface is unknown (see the module docstring).

    Returns
    -------
    corners : boolean array, one longer than ``mask`` along every axis; corner ``c`` lies at voxel coordinates
        ``c - 0.5``.
    sizes : areas in mm^2 (3D) or lengths in mm (2D) of the surfels, in C order of ``corners``.
    """
    codes = corner_codes(mask)
    full = (1 << 2**mask.ndim) - 1
    corners = (codes != 0) & (codes != full)
    if ignore is not None:
        corners &= corner_codes(mask.astype(bool, copy=False) | ignore) != full
    return corners, surfel_sizes(tuple(float(s) for s in spacing))[codes[corners]]


def surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], limit_mm: float, *, ignore: np.ndarray | None = None
) -> float:
    """Surface Dice: the surfel area of both masks within ``limit_mm`` of the other surface over their total area.

    Distances equal to ``limit_mm`` count as within it (``<=``, as DeepMind's ``compute_surface_dice_at_tolerance``).
    Returns NaN when either mask has no surfel (it is empty, or wrapped in ignored voxels).
    """
    corners_pred, sizes_pred = surfels(pred, spacing, ignore=ignore)
    corners_ref, sizes_ref = surfels(ref, spacing, ignore=ignore)
    if sizes_pred.size == 0 or sizes_ref.size == 0:
        return math.nan
    to_ref, to_pred = nearest_distances(corners_pred, corners_ref, spacing)
    within = sizes_pred[to_ref <= limit_mm].sum() + sizes_ref[to_pred <= limit_mm].sum()
    return float(within / (sizes_pred.sum() + sizes_ref.sum()))
