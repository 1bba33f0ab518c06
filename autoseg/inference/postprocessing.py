"""Connected-component postprocessing of label maps, chosen on cross-validation by ``autoseg select``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = ["PostprocessingSpec", "keep_largest_component", "remove_small_components", "apply_postprocessing"]


@dataclass(frozen=True)
class PostprocessingSpec:
    """What to do to a predicted label map (voxels removed become background).

    keep_largest_foreground : keep only the largest connected component of all foreground labels together.
    keep_largest_classes : labels reduced to their largest connected component.
    min_component_mm3 : per label (as str), connected components smaller than this volume are removed.
    """

    keep_largest_foreground: bool = False
    keep_largest_classes: tuple[int, ...] = ()
    min_component_mm3: dict[str, float] = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        return not (self.keep_largest_foreground or self.keep_largest_classes or self.min_component_mm3)


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    components, n = ndimage.label(mask, structure=structure)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    sizes[0] = 0
    return components, sizes


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest face-connected component of ``mask`` (empty stays empty)."""
    components, sizes = _components(mask)
    if sizes.sum() == 0:
        return np.zeros_like(mask, dtype=bool)
    return components == int(sizes.argmax())


def remove_small_components(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """Boolean mask without the face-connected components of fewer than ``min_voxels`` voxels."""
    components, sizes = _components(mask)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[components]


def apply_postprocessing(labels: np.ndarray, spec: PostprocessingSpec, voxel_mm3: float = 1.0) -> np.ndarray:
    """Apply ``spec`` to a label map (a new array is returned; the input is not modified).

    ``voxel_mm3`` converts the minimum component volumes into voxel counts.
    """
    out = labels.copy()
    if spec.keep_largest_foreground:
        foreground = out > 0
        out[foreground & ~keep_largest_component(foreground)] = 0
    for value in spec.keep_largest_classes:
        mask = out == value
        out[mask & ~keep_largest_component(mask)] = 0
    if spec.min_component_mm3:
        for key, volume in spec.min_component_mm3.items():
            mask = out == int(key)
            out[mask & ~remove_small_components(mask, volume / voxel_mm3)] = 0
    return out
