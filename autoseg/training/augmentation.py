"""Training augmentation built from a plan's :class:`~autoseg.planning.plans.AugmentationSpec` (batchgenerators).

The pipeline follows nnU-Net's published defaults: rotation and scaling (optionally elastic deformation) applied
in 2D per slice for anisotropic 3D data ("dummy 2D"), Gaussian noise and blur, multiplicative brightness,
contrast, simulated low resolution, gamma (also on the inverted image) and mirroring. ``strength`` scales every
probability and range around its neutral value, which is what the search tunes.

Interpolation follows nnU-Net v2's current augmentation (batchgeneratorsv2): linear for images in the spatial
transform and when simulating low resolution, nearest for label maps. Cubic interpolation here cost 3x the time
of the whole batch for no measurable gain.

Transforms consume and return batchgenerators' dict ``{"data": (B, C, *patch), "seg": (B, 1, *patch)}``. They
draw from numpy's global generator (a batchgenerators convention): the loader seeds it per batch, so a batch
depends only on the seed and its index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from autoseg.planning.plans import AugmentationSpec
from autoseg.training.cascade import PreviousStageToData

__all__ = ["sampling_patch_size", "build_transforms", "deep_supervision_scales", "DownsampleTargets"]


def _rotated_extent(patch: np.ndarray, angle: float) -> np.ndarray:
    """Bounding box of ``patch`` (2D or 3D) rotated by up to ``angle`` radians about each axis."""
    extent = patch.astype(float)
    a = min(abs(angle), math.pi / 2)
    if len(patch) == 2:
        c, s = math.cos(a), math.sin(a)
        return np.array([c * extent[0] + s * extent[1], s * extent[0] + c * extent[1]])
    for i, j in ((1, 2), (0, 2), (0, 1)):  # rotate in each plane in turn
        c, s = math.cos(a), math.sin(a)
        extent[i], extent[j] = c * extent[i] + s * extent[j], s * extent[i] + c * extent[j]
    return extent


def sampling_patch_size(patch_size: Sequence[int], spec: AugmentationSpec) -> tuple[int, ...]:
    """Size of the region to cut before spatial augmentation, so that rotated/scaled patches see real data.

    With dummy 2D the first axis is not rotated and keeps its size.
    """
    patch = np.asarray(patch_size, dtype=float)
    angle = math.radians(spec.rotation_deg * spec.strength) if spec.p_rotation > 0 else 0.0
    inplane = patch[1:] if spec.dummy_2d else patch
    extent = (
        _rotated_extent(inplane, angle) / min(spec.scale_range) if spec.p_scale > 0 else _rotated_extent(inplane, angle)
    )
    extent = np.maximum(extent, inplane)
    out = np.concatenate([patch[:1], extent]) if spec.dummy_2d else extent
    return tuple(int(math.ceil(v)) for v in out)


class _To2D(AbstractTransform):
    """(B, C, Z, Y, X) -> (B, C*Z, Y, X) so that spatial transforms act per slice (dummy 2D)."""

    def __call__(self, **d):
        for key in ("data", "seg"):
            b, c, z = d[key].shape[:3]
            d[f"_{key}_shape"] = (c, z)
            d[key] = d[key].reshape(b, c * z, *d[key].shape[3:])
        return d


class _To3D(AbstractTransform):
    def __call__(self, **d):
        for key in ("data", "seg"):
            c, z = d.pop(f"_{key}_shape")
            d[key] = d[key].reshape(d[key].shape[0], c, z, *d[key].shape[2:])
        return d


def deep_supervision_scales(strides: Sequence[Sequence[int]], n_outputs: int) -> list[tuple[float, ...]]:
    """Relative resolution of each deep-supervision output, highest first (1.0, then the cumulative strides)."""
    scales, current = [], np.ones(len(strides[0]))
    for stride in strides:
        current = current / np.asarray(stride)
        scales.append(tuple(float(v) for v in current))
    return scales[:n_outputs]


class DownsampleTargets(AbstractTransform):
    """Replace ``seg`` by a list of label maps at each deep-supervision scale (nearest, by strided slicing)."""

    def __init__(self, scales: Sequence[Sequence[float]]):
        self.scales = [tuple(scale) for scale in scales]

    def __call__(self, **d):
        seg, out = d["seg"], []
        for scale in self.scales:
            if all(s == 1 for s in scale):
                out.append(seg)
                continue
            step = [round(1 / s) for s in scale]
            out.append(np.ascontiguousarray(seg[(slice(None), slice(None), *[slice(0, None, k) for k in step])]))
        d["seg"] = out
        return d


def build_transforms(
    patch_size: Sequence[int],
    spec: AugmentationSpec,
    *,
    ds_scales: Sequence[Sequence[float]] | None = None,
    previous_stage_values: Sequence[int] | None = None,
) -> Compose:
    """The training pipeline for ``patch_size`` (the network's input size) from ``spec``.

    ``previous_stage_values``: a cascade stage, whose batches carry the previous stage's labels as a second label
    channel; they are transformed spatially with the labels, then become perturbed one-hot input channels.
    """
    k = spec.strength
    ndim = len(patch_size)
    angle = math.radians(spec.rotation_deg * k)
    spatial_patch = tuple(patch_size[1:]) if spec.dummy_2d else tuple(patch_size)
    scale_lo, scale_hi = spec.scale_range
    scale = (1 - (1 - scale_lo) * k, 1 + (scale_hi - 1) * k)
    transforms: list[AbstractTransform] = []
    if spec.dummy_2d:
        transforms.append(_To2D())
    transforms.append(
        SpatialTransform(
            spatial_patch,
            patch_center_dist_from_border=None,
            do_elastic_deform=spec.elastic,
            alpha=(0.0, 200.0 * k),
            sigma=(9.0, 13.0),
            do_rotation=spec.p_rotation > 0,
            angle_x=(-angle, angle),
            angle_y=(-angle, angle) if ndim == 3 and not spec.dummy_2d else (0, 0),
            angle_z=(-angle, angle) if ndim == 3 and not spec.dummy_2d else (0, 0),
            do_scale=spec.p_scale > 0,
            scale=scale,
            border_mode_data="constant",
            border_cval_data=0,
            order_data=1,
            border_mode_seg="constant",
            border_cval_seg=0,
            order_seg=0,
            random_crop=False,
            p_el_per_sample=min(1.0, spec.p_elastic * k),
            p_scale_per_sample=min(1.0, spec.p_scale * k),
            p_rot_per_sample=min(1.0, spec.p_rotation * k),
            independent_scale_for_each_axis=False,
        )
    )
    if spec.dummy_2d:
        transforms.append(_To3D())
    p = lambda value: min(1.0, value * k)  # noqa: E731
    transforms += [
        GaussianNoiseTransform(noise_variance=(0, 0.1 * k), p_per_sample=p(spec.p_noise)),
        GaussianBlurTransform(
            (0.5, 0.5 + 0.5 * k), different_sigma_per_channel=True, p_per_sample=p(spec.p_blur), p_per_channel=0.5
        ),
        BrightnessMultiplicativeTransform(
            multiplier_range=(1 - 0.25 * k, 1 + 0.25 * k), p_per_sample=p(spec.p_brightness)
        ),
        ContrastAugmentationTransform(contrast_range=(1 - 0.25 * k, 1 + 0.25 * k), p_per_sample=p(spec.p_contrast)),
        SimulateLowResolutionTransform(
            zoom_range=(max(0.25, 1 - 0.5 * k), 1),
            per_channel=True,
            p_per_channel=0.5,
            order_downsample=0,
            order_upsample=1,
            p_per_sample=p(spec.p_low_resolution),
            ignore_axes=(0,) if spec.dummy_2d else None,
        ),
        GammaTransform(
            (max(0.3, 1 - 0.3 * k), 1 + 0.5 * k),
            invert_image=True,
            per_channel=True,
            retain_stats=True,
            p_per_sample=p(0.1),
        ),
        GammaTransform(
            (max(0.3, 1 - 0.3 * k), 1 + 0.5 * k),
            invert_image=False,
            per_channel=True,
            retain_stats=True,
            p_per_sample=p(spec.p_gamma),
        ),
    ]
    if spec.mirror_axes:
        transforms.append(MirrorTransform(tuple(spec.mirror_axes)))
    if previous_stage_values is not None:
        transforms.append(PreviousStageToData(previous_stage_values, perturb=True))
    if ds_scales is not None:
        transforms.append(DownsampleTargets(ds_scales))
    return Compose(transforms)
