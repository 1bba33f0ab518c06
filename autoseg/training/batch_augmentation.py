"""Augmentation of whole training batches on the training device, in torch: the GPU alternative to the loader's.

The same transforms as the CPU pipeline (:func:`~autoseg.training.augmentation.build_transforms`), with the same
probabilities and ranges (:func:`~autoseg.training.augmentation.augmentation_ranges` of the plan's
``AugmentationSpec``) and in the same order: spatial (rotation, scaling, optional elastic deformation; in-plane
only for "dummy 2D"), Gaussian noise, Gaussian blur, brightness, contrast, simulated low resolution, gamma of the
inverted image, gamma, mirroring; then the deep-supervision targets. The input is the loader's crop at the
sampling patch size (enlarged for rotation); the output has the network's patch size.

Sample, then apply: :func:`sample_parameters` draws every random number of a batch (per sample and channel) from a
numpy generator into :class:`BatchParameters`; :func:`apply_parameters` is deterministic. The trainer seeds the
generator with (seed, batch index) (:func:`batch_generator`), so a batch's augmentation does not depend on what
ran before it and a resumed run continues the same sequence.

Spatial transforms are one ``grid_sample`` per batch for images (linear) and a nearest-voxel gather at the same
positions for labels, so they keep their values (zeros outside): output voxel ``c`` (centred coordinates) reads at
``A (c + d(c)) + centre``, with ``A`` = scale x rotation built as batchgenerators builds it. Elastic deformation's
cheap equivalent: batchgenerators smooths per-voxel uniform noise by a Gaussian of ``sigma``; here random
displacements on a coarse grid with nodes ``3 sigma`` apart (about the same correlation length) are upsampled
linearly, with the same mean variance. Samples without a spatial transform are the exact centre crop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from autoseg.planning.plans import AugmentationSpec
from autoseg.training.augmentation import AugmentationRanges, augmentation_ranges, target_slices

__all__ = ["BatchParameters", "sample_parameters", "apply_parameters", "augment_batch", "batch_generator"]

#: Elastic displacement: coarse grid nodes this many sigmas apart.
NODE_SPACING_SIGMAS = 3.0


@dataclass(frozen=True)
class BatchParameters:
    """Every random draw of one batch's augmentation; ``B`` samples, ``C`` channels. Neutral values mean "off".

    ``angles`` (B, 3) radians about axes 0, 1, 2 (3D) or (B, 1) in-plane (2D, dummy 2D); ``scale`` (B,) multiplies
    the sampling coordinates; ``displacement`` per sample: None or (axes, *coarse grid) in voxels; ``noise_std``
    (B,) with ``noise_seed`` for the noise fields; per (B, C): ``blur_sigma`` (voxels, 0 off), ``brightness``,
    ``contrast``, ``zoom`` (low resolution), ``gamma_inverted``, ``gamma``; ``mirror`` (B, spatial axes) flips.
    """

    angles: np.ndarray
    scale: np.ndarray
    displacement: tuple[np.ndarray | None, ...]
    noise_std: np.ndarray
    noise_seed: int
    blur_sigma: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    zoom: np.ndarray
    gamma_inverted: np.ndarray
    gamma: np.ndarray
    mirror: np.ndarray

    @property
    def spatial(self) -> np.ndarray:
        """(B,) whether a sample is rotated, scaled or deformed (the others are centre-cropped)."""
        elastic = np.array([d is not None for d in self.displacement], dtype=bool)
        return (self.angles != 0).any(1) | (self.scale != 1) | elastic


def batch_generator(seed: int, index: int) -> np.random.Generator:
    """The generator of batch ``index``'s augmentation (a stream apart from the loader's cropping)."""
    return np.random.default_rng([seed, index, 1])


def _two_sided(rng: np.random.Generator, bounds: tuple[float, float], shape) -> np.ndarray:
    """batchgenerators' draw: half the time in [low, 1), else in [max(low, 1), high) (when low < 1)."""
    low, high = bounds
    below = (rng.random(shape) < 0.5) & (low < 1)
    return np.where(below, rng.uniform(low, 1, shape), rng.uniform(max(low, 1), high, shape))


def _where(on: np.ndarray, values: np.ndarray, neutral: float) -> np.ndarray:
    return np.where(on.reshape(on.shape + (1,) * (values.ndim - on.ndim)), values, neutral)


def sample_parameters(
    ranges: AugmentationRanges, batch_size: int, channels: int, patch_size: Sequence[int], rng: np.random.Generator
) -> BatchParameters:
    """Draw one batch's parameters with the probabilities and ranges of ``ranges`` (see :class:`BatchParameters`)."""
    r, b, shape = ranges, batch_size, (batch_size, channels)
    planar = len(patch_size) == 2 or r.dummy_2d
    chance = lambda p, size=b: rng.random(size) < p  # noqa: E731
    angles = _where(chance(r.p_rotation), rng.uniform(-r.max_angle, r.max_angle, (b, 1 if planar else 3)), 0.0)
    scale = _where(chance(r.p_scale), _two_sided(rng, r.scale, b), 1.0)
    moving = tuple(patch_size[1:] if r.dummy_2d else patch_size)
    displacement = []
    for on in chance(r.p_elastic) & r.elastic:
        displacement.append(_displacement(rng, r, moving) if on else None)
    noise_std = _where(chance(r.p_noise), rng.uniform(*r.noise_std, b), 0.0)
    blur = chance(r.p_blur)[:, None] & chance(r.p_blur_channel, shape)
    low_resolution = chance(r.p_low_resolution)[:, None] & chance(r.p_low_resolution_channel, shape)
    mirror = chance(0.5, (b, len(patch_size))) & np.isin(np.arange(len(patch_size)), r.mirror_axes)
    return BatchParameters(
        angles=angles,
        scale=scale,
        displacement=tuple(displacement),
        noise_std=noise_std,
        noise_seed=int(rng.integers(2**62)),
        blur_sigma=_where(blur, rng.uniform(*r.blur_sigma, shape), 0.0),
        brightness=_where(chance(r.p_brightness), rng.uniform(*r.brightness, shape), 1.0),
        contrast=_where(chance(r.p_contrast), _two_sided(rng, r.contrast, shape), 1.0),
        zoom=_where(low_resolution, rng.uniform(*r.zoom, shape), 1.0),
        gamma_inverted=_where(chance(r.p_gamma_inverted), _two_sided(rng, r.gamma, shape), 1.0),
        gamma=_where(chance(r.p_gamma), _two_sided(rng, r.gamma, shape), 1.0),
        mirror=mirror,
    )


def _displacement(rng: np.random.Generator, r: AugmentationRanges, moving: Sequence[int]) -> np.ndarray:
    """Coarse-grid displacements (axes, *nodes) in voxels, with the variance of batchgenerators' smoothed noise."""
    alpha, sigma = rng.uniform(*r.elastic_alpha), rng.uniform(*r.elastic_sigma)
    nodes = [max(2, math.ceil(n / (NODE_SPACING_SIGMAS * sigma)) + 1) for n in moving]
    d = len(moving)
    # uniform(-1, 1) noise (variance 1/3) through a unit-sum Gaussian: variance / (2 sqrt(pi) sigma)^d; linear
    # interpolation between nodes lowers the mean variance by (2/3)^d, which the nodes make up for
    std = alpha * math.sqrt(1 / 3 / (2 * math.sqrt(math.pi) * sigma) ** d * 1.5**d)
    return rng.normal(0.0, std, (d, *nodes))


def _matrices(p: BatchParameters, ndim: int, dummy_2d: bool) -> np.ndarray:
    """(B, ndim, ndim) maps from output to input coordinates: scale x rotation, as batchgenerators composes them."""
    out = np.zeros((len(p.scale), ndim, ndim))
    for b in range(len(p.scale)):
        cos, sin = np.cos(p.angles[b]), np.sin(p.angles[b])
        if p.angles.shape[1] == 1:
            rotation = np.array([[cos[0], -sin[0]], [sin[0], cos[0]]])
        else:
            rx = np.array([[1, 0, 0], [0, cos[0], -sin[0]], [0, sin[0], cos[0]]])
            ry = np.array([[cos[1], 0, sin[1]], [0, 1, 0], [-sin[1], 0, cos[1]]])
            rz = np.array([[cos[2], -sin[2], 0], [sin[2], cos[2], 0], [0, 0, 1]])
            rotation = rx @ ry @ rz
        m = p.scale[b] * rotation.T
        out[b] = np.block([[np.ones((1, 1)), np.zeros((1, 2))], [np.zeros((2, 1)), m]]) if dummy_2d else m
    return out


def _positions(p: BatchParameters, size, patch, dummy_2d: bool, device) -> torch.Tensor:
    """(B, *patch, ndim) input voxel coordinates read by each output voxel (identity plus crop offset when off)."""
    batch = len(p.scale)
    axes = [torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2 for n in patch]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).expand(batch, *patch, len(patch)).clone()
    first = 1 if dummy_2d else 0
    mode = "bilinear" if len(patch) - first == 2 else "trilinear"
    for b, nodes in enumerate(p.displacement):
        if nodes is not None:
            coarse = torch.as_tensor(nodes, dtype=torch.float32, device=device)[None]
            field = F.interpolate(coarse, size=tuple(patch[first:]), mode=mode, align_corners=True)[0]
            coords[b, ..., first:] += field.movedim(0, -1)
    matrix = torch.as_tensor(_matrices(p, len(patch), dummy_2d), dtype=torch.float32, device=device)
    centre = torch.tensor([(s - n) // 2 + (n - 1) / 2 for s, n in zip(size, patch)], device=device)
    return torch.einsum("b...j,bij->b...i", coords, matrix) + centre


def _nearest(seg: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Labels (B, 1, *size) read at the nearest voxel of ``positions`` (B, *patch, ndim); 0 outside."""
    last = torch.tensor(seg.shape[2:], device=seg.device, dtype=positions.dtype) - 1
    index = positions.round()  # half to even, as grid_sample's nearest
    inside = ((index >= 0) & (index <= last)).all(-1)
    strides = torch.tensor(seg[0, 0].stride(), device=seg.device)
    flat = (torch.clamp(index, torch.zeros_like(last), last).long() * strides).sum(-1).reshape(len(seg), -1)
    values = seg.reshape(len(seg), -1).gather(1, flat).reshape(inside.shape)
    return torch.where(inside, values, torch.zeros_like(values))[:, None]


def _spatial(p: BatchParameters, data, seg, patch, dummy_2d: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``grid_sample`` for the batch's images, a nearest-voxel gather for its labels; samples without a spatial
    transform are the exact centre crop."""
    size = tuple(data.shape[2:])
    crop = (Ellipsis, *[slice((s - n) // 2, (s - n) // 2 + n) for s, n in zip(size, patch)])
    if not p.spatial.any():
        return data[crop].clone(), seg[crop].clone()
    still = torch.as_tensor(np.flatnonzero(~p.spatial), device=data.device)
    positions = _positions(p, size, patch, dummy_2d, data.device)
    grid = (positions * torch.tensor([2 / max(s - 1, 1) for s in size], device=data.device) - 1).flip(-1)
    images = F.grid_sample(data.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out_data, out_seg = images.to(data.dtype), _nearest(seg.contiguous(), positions)
    out_data[still], out_seg[still] = data[crop][still], seg[crop][still]
    return out_data, out_seg


def _column(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """(B, C) parameters as a tensor that broadcasts over (B, C, *spatial)."""
    t = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return t.reshape(*t.shape, *[1] * (like.ndim - t.ndim))


def _mirrored(n: int, radius: int, device) -> torch.Tensor:
    """Indices ``-radius .. n + radius - 1`` mirrored into ``0 .. n-1`` (scipy.ndimage's ``reflect``)."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each of ``n`` images (n, *spatial) by its own ``sigma`` (voxels), as scipy.ndimage.gaussian_filter
    (kernel cut at 4 sigma, borders mirrored)."""
    n, spatial = x.shape[0], x.shape[1:]
    radius = int(4 * float(sigma.max()) + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    cut = offsets.abs()[None] <= torch.floor(4 * sigma + 0.5)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2) * cut
    kernel = kernel / kernel.sum(1, keepdim=True)
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    out = x[None]
    for axis in range(len(spatial)):
        out = out.index_select(axis + 2, _mirrored(spatial[axis], radius, x.device))
        shape = [n, 1] + [2 * radius + 1 if a == axis else 1 for a in range(len(spatial))]
        out = conv(out, kernel.reshape(shape), groups=n)
    return out[0]


def _intensity(p: BatchParameters, data: torch.Tensor, dummy_2d: bool) -> torch.Tensor:
    dims = tuple(range(2, data.ndim))
    noisy = np.flatnonzero(p.noise_std > 0)
    if noisy.size:
        generator = torch.Generator(device=data.device).manual_seed(p.noise_seed)
        noise = torch.randn((len(noisy), *data.shape[1:]), generator=generator, device=data.device, dtype=data.dtype)
        data[noisy] += noise * _column(p.noise_std[noisy], data)
    blurred = np.nonzero(p.blur_sigma > 0)
    if blurred[0].size:
        sigma = torch.as_tensor(p.blur_sigma[blurred], dtype=data.dtype, device=data.device)
        data[blurred] = gaussian_blur(data[blurred], sigma)
    data = data * _column(p.brightness, data) if (p.brightness != 1).any() else data
    contrast = np.flatnonzero((p.contrast != 1).any(1))
    if contrast.size:
        x = data[contrast]
        low, high, mean = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True), x.mean(dims, keepdim=True)
        data[contrast] = torch.clamp((x - mean) * _column(p.contrast[contrast], x) + mean, low, high)
    for b, c in zip(*np.nonzero(p.zoom != 1)):
        data[b, c] = _low_resolution(data[b, c], float(p.zoom[b, c]), dummy_2d)
    for gamma, invert in ((p.gamma_inverted, True), (p.gamma, False)):
        samples = np.flatnonzero((gamma != 1).any(1))
        if samples.size:
            data[samples] = _gamma(data[samples], _column(gamma[samples], data), invert, dims)
    return data


def _low_resolution(x: torch.Tensor, zoom: float, dummy_2d: bool) -> torch.Tensor:
    """Downsample one channel by ``zoom`` (nearest) and back (linear), as skimage's resize does."""
    shape = np.asarray(x.shape)
    small = np.maximum(np.round(shape * zoom).astype(int), 1)
    if dummy_2d:
        small[0] = shape[0]
    mode = "bilinear" if x.ndim == 2 else "trilinear"
    down = F.interpolate(x[None, None], size=tuple(int(v) for v in small), mode="nearest-exact")
    return F.interpolate(down, size=tuple(int(v) for v in shape), mode=mode, align_corners=False)[0, 0]


def _gamma(x: torch.Tensor, gamma: torch.Tensor, invert: bool, dims) -> torch.Tensor:
    """batchgenerators' gamma per channel, mean and standard deviation kept."""
    x = -x if invert else x
    mean, std = x.mean(dims, keepdim=True), x.std(dims, correction=0, keepdim=True)
    low = x.amin(dims, keepdim=True)
    extent = x.amax(dims, keepdim=True) - low + 1e-7
    y = ((x - low) / extent).pow(gamma) * extent + low
    y = (y - y.mean(dims, keepdim=True)) / (y.std(dims, correction=0, keepdim=True) + 1e-8) * std + mean
    return -y if invert else y


def apply_parameters(
    p: BatchParameters, data: torch.Tensor, seg: torch.Tensor, patch_size: Sequence[int], *, dummy_2d: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment ``data`` (B, C, *sampling patch) float and ``seg`` (B, 1, *sampling patch) integer labels with the
    drawn parameters ``p``; returns both at ``patch_size`` (inputs are not modified)."""
    data, seg = _spatial(p, data, seg, tuple(patch_size), dummy_2d)
    data = _intensity(p, data, dummy_2d)
    for axis in range(len(patch_size)):
        flip = np.flatnonzero(p.mirror[:, axis])
        if flip.size:
            data[flip] = data[flip].flip(axis + 2)
            seg[flip] = seg[flip].flip(axis + 2)
    return data, seg


def augment_batch(
    data: torch.Tensor,
    seg: torch.Tensor,
    spec: AugmentationSpec,
    patch_size: Sequence[int],
    rng: np.random.Generator,
    *,
    ds_scales: Sequence[Sequence[float]] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Augment a batch on its device with ``spec``: data (B, C, *patch_size) and the label maps at each
    deep-supervision scale (all of them at ``patch_size`` when ``ds_scales`` is None, as the loader's)."""
    ranges = augmentation_ranges(spec)
    params = sample_parameters(ranges, data.shape[0], data.shape[1], patch_size, rng)
    data, seg = apply_parameters(params, data, seg, patch_size, dummy_2d=ranges.dummy_2d)
    if ds_scales is None:
        return data, [seg]
    return data, [seg[target_slices(scale)].contiguous() for scale in ds_scales]
