"""Image geometry: where an array's voxels lie in physical space."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Geometry", "PLANAR_Z_SPACING_FACTOR"]

#: A 2D image is stored as one slice, shape (1, Y, X). Its z spacing is this factor times the largest in-plane
#: spacing, so every rule that compares spacings sees z as far coarser than any real axis (nnU-Net does the same).
PLANAR_Z_SPACING_FACTOR = 999.0


@dataclass(frozen=True)
class Geometry:
    """Geometry of an image file.

    Array-order fields are (z, y, x), as arrays are indexed; physical fields keep the file's (x, y, z) order
    because they describe points and axes in patient space, not array axes.

    Attributes
    ----------
    spacing_zyx : voxel size in mm, (z, y, x). For 2D images z is a placeholder (see ``PLANAR_Z_SPACING_FACTOR``).
    shape_zyx : array shape (z, y, x); 2D images have z = 1.
    origin_xyz : physical position of voxel (0, 0, 0) in mm, ``ndim`` values, as in the header.
    direction_xyz : direction cosines, ``ndim * ndim`` values in row-major order, as in the header.
    ndim : 2 or 3, the dimensionality of the file (written back the same way).
    """

    spacing_zyx: tuple[float, float, float]
    shape_zyx: tuple[int, int, int]
    origin_xyz: tuple[float, ...]
    direction_xyz: tuple[float, ...]
    ndim: int = 3

    @property
    def is_2d(self) -> bool:
        return self.ndim == 2

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel (its area in mm^2 for 2D images)."""
        return float(np.prod(self.spacing_zyx[1:] if self.is_2d else self.spacing_zyx))

    def same_grid(self, other: Geometry, *, atol: float = 1e-3) -> bool:
        """True when both describe the same voxel grid (shape, spacing, origin and direction within ``atol``)."""
        return (
            self.shape_zyx == other.shape_zyx
            and self.ndim == other.ndim
            and np.allclose(self.spacing_zyx, other.spacing_zyx, rtol=1e-4, atol=1e-5)
            and np.allclose(self.origin_xyz, other.origin_xyz, atol=atol)
            and np.allclose(self.direction_xyz, other.direction_xyz, atol=atol)
        )

    def with_shape(self, shape_zyx: tuple[int, int, int]) -> Geometry:
        """The same geometry with another array shape (for resampled or cropped arrays)."""
        z, y, x = (int(s) for s in shape_zyx)
        return Geometry(
            self.spacing_zyx,
            (z, y, x),
            self.origin_xyz,
            self.direction_xyz,
            self.ndim,
        )
