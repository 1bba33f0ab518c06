"""Batch augmentation on the device: the CPU pipeline's distributions, valid and aligned labels, exact operations."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.ndimage import gaussian_filter
from skimage.transform import resize

from autoseg.planning.plans import AugmentationSpec
from autoseg.training.augmentation import augmentation_ranges, build_transforms, sampling_patch_size
from autoseg.training.batch_augmentation import (
    BatchParameters,
    apply_parameters,
    augment_batch,
    batch_generator,
    gaussian_blur,
    sample_parameters,
)

OFF = dict(p_rotation=0, p_scale=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_low_resolution=0, p_gamma=0)


def _within(flags: np.ndarray, p: float) -> None:
    """The fraction of ``flags`` set is ``p`` within 4.5 binomial standard deviations."""
    n = flags.size
    assert abs(flags.mean() - p) <= 4.5 * np.sqrt(p * (1 - p) / n) + 1e-12, (flags.mean(), p)


SPECS = {
    "3d": (AugmentationSpec((0, 1, 2), elastic=True), (10, 20, 30)),
    "dummy_2d": (AugmentationSpec((1, 2), dummy_2d=True, rotation_deg=180, strength=0.6), (4, 20, 30)),
    "2d": (AugmentationSpec((0, 1), rotation_deg=15, strength=1.5), (20, 30)),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_drawn_parameters_follow_the_spec(name):
    spec, patch = SPECS[name]
    r = augmentation_ranges(spec)
    n, channels = 4000, 2
    p = sample_parameters(r, n, channels, patch, np.random.default_rng(0))
    rotated = (p.angles != 0).any(1)
    _within(rotated, r.p_rotation)
    assert p.angles.shape == (n, 3 if name == "3d" else 1) and np.abs(p.angles).max() <= r.max_angle
    assert np.abs(p.angles[rotated]).max() > 0.95 * r.max_angle  # the whole range is used
    scaled = p.scale != 1
    _within(scaled, r.p_scale)
    assert r.scale[0] <= p.scale.min() and p.scale.max() <= r.scale[1]
    _within(p.scale[scaled] < 1, 0.5)  # batchgenerators: half zoom in, half zoom out
    elastic = np.array([d is not None for d in p.displacement])
    _within(elastic, r.p_elastic if spec.elastic else 0.0)
    assert all(d.shape[0] == (2 if name != "3d" else 3) for d in p.displacement if d is not None)
    _within(p.noise_std > 0, r.p_noise)
    assert p.noise_std.max() <= r.noise_std[1]
    for values, prob, bounds in (
        (p.brightness, r.p_brightness, r.brightness),
        (p.contrast, r.p_contrast, r.contrast),
        (p.gamma_inverted, r.p_gamma_inverted, r.gamma),
        (p.gamma, r.p_gamma, r.gamma),
    ):
        on = (values != 1).all(1)
        _within(on, prob)  # per sample, every channel
        assert (values[~on] == 1).all() and bounds[0] <= values.min() and values.max() <= bounds[1]
    _within((p.contrast != 1).all(1) & (p.contrast < 1)[:, 0], r.p_contrast * 0.5)
    _within(p.blur_sigma > 0, r.p_blur * r.p_blur_channel)
    _within((p.blur_sigma > 0).any(1), r.p_blur * (1 - (1 - r.p_blur_channel) ** channels))
    assert r.blur_sigma[0] <= p.blur_sigma[p.blur_sigma > 0].min() and p.blur_sigma.max() <= r.blur_sigma[1]
    _within(p.zoom != 1, r.p_low_resolution * r.p_low_resolution_channel)
    assert r.zoom[0] <= p.zoom.min()
    for axis in range(len(patch)):
        _within(p.mirror[:, axis], 0.5 if axis in spec.mirror_axes else 0.0)


def _smooth_volume(rng: np.random.Generator, shape) -> np.ndarray:
    """A smooth positive image (interpolation changes it little), different along every axis."""
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    phases = rng.uniform(0, 2 * np.pi, len(shape))
    return 2 + sum(np.sin(2 * np.pi * (a + 1) * g / 2 + ph) for a, (g, ph) in enumerate(zip(grids, phases)))


FAMILIES = {
    "spatial": dict(p_rotation=0.2, p_scale=0.2),
    "noise": dict(p_noise=0.3),
    "blur": dict(p_blur=0.4),
    "brightness": dict(p_brightness=0.3),
    "contrast": dict(p_contrast=0.3),
    "low_resolution": dict(p_low_resolution=0.5),
    "gamma": dict(p_gamma=0.3),
    "mirror": dict(mirror_axes=(0, 1, 2)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batch_and_cpu_pipelines_agree(family):
    """Each transform family alone, on the same inputs: the CPU pipeline (batchgenerators) and the batch
    augmentation change the same fraction of samples, by amounts from the same distribution (Kolmogorov-Smirnov)."""
    spec = AugmentationSpec(**{"mirror_axes": (), **OFF, **FAMILIES[family]})
    patch, n = (6, 10, 12), 300
    size = sampling_patch_size(patch, spec)
    rng = np.random.default_rng(1)
    data = np.stack([_smooth_volume(rng, size)[None] for _ in range(n)]).astype(np.float32)
    seg = np.zeros((n, 1, *size), np.float32)
    start = [(s - q) // 2 for s, q in zip(size, patch)]
    before = data[(Ellipsis, *[slice(a, a + q) for a, q in zip(start, patch)])]
    np.random.seed(2)  # noqa: NPY002 - batchgenerators draws from the global generators
    random.seed(2)
    cpu = build_transforms(patch, spec)(data=data.copy(), seg=seg.copy())["data"]
    gpu, _ = augment_batch(torch.from_numpy(data), torch.from_numpy(seg), spec, patch, np.random.default_rng(3))
    amounts = []
    for out in (cpu, gpu.numpy()):
        change = np.abs(out - before).reshape(n, -1).mean(1)
        amounts.append(change[change > 1e-4])
    a, b = amounts
    pooled = (len(a) + len(b)) / (2 * n)
    assert abs(len(a) - len(b)) / n <= 3.5 * np.sqrt(2 * pooled * (1 - pooled) / n) + 1e-9, (len(a), len(b))
    assert len(a) > 0.1 * n
    assert stats.ks_2samp(a, b).pvalue > 1e-3, (np.median(a), np.median(b))


def _neutral(p: BatchParameters) -> BatchParameters:
    """Only the spatial part of ``p``."""
    ones = np.ones_like(p.brightness)
    return dataclasses.replace(
        p,
        noise_std=np.zeros_like(p.noise_std),
        blur_sigma=np.zeros_like(p.blur_sigma),
        brightness=ones,
        contrast=ones,
        zoom=ones,
        gamma_inverted=ones,
        gamma=ones,
    )


@pytest.mark.parametrize("name", sorted(SPECS))
def test_labels_stay_valid_and_aligned_with_the_image(name):
    """A label map drawn from the image's intensities is still the image's after rotation, scaling, elastic
    deformation and mirroring; label values are only those present before."""
    spec, patch = SPECS[name]
    spec = dataclasses.replace(spec, p_rotation=1.0, p_scale=1.0, elastic=True, p_elastic=1.0, strength=1.0)
    size = sampling_patch_size(patch, spec)
    rng = np.random.default_rng(4)
    image = np.stack([_smooth_volume(rng, size) for _ in range(6)])[:, None]
    labels = np.array([0, 2, 5])[np.digitize(image, [1.5, 2.5])]
    image = np.concatenate([image, np.ones_like(image)], 1)  # channel 1 shows where the zero padding reaches
    data, seg = torch.from_numpy(image.astype(np.float32)), torch.from_numpy(labels.astype(np.int16))
    p = _neutral(sample_parameters(augmentation_ranges(spec), 6, 2, patch, rng))
    assert p.spatial.all()
    out, out_seg = apply_parameters(p, data, seg, patch, dummy_2d=spec.dummy_2d)
    assert out.shape == (6, 2, *patch) and out.dtype == torch.float32
    assert out_seg.shape == (6, 1, *patch) and out_seg.dtype == torch.int16
    assert set(torch.unique(out_seg).tolist()) <= {0, 2, 5}
    assert (torch.nn.functional.one_hot(out_seg.long()).sum(-1) == 1).all()
    values = out[:, :1]
    # away from the padding, and from where linear interpolation reaches across a label boundary
    inside = (out[:, 1:] > 0.9999) & ((values - 1.5).abs() > 0.3) & ((values - 2.5).abs() > 0.3)
    from_image = torch.tensor([0, 2, 5])[torch.bucketize(values.contiguous(), torch.tensor([1.5, 2.5]))]
    agree = (from_image == out_seg)[inside].float().mean()
    assert inside.float().mean() > 0.5 and agree > 0.995
    shuffled = (from_image == out_seg.flip(0))[inside].float().mean()  # another sample's labels: misaligned
    assert shuffled < agree - 0.1
    assert torch.equal(data, torch.from_numpy(image.astype(np.float32)))  # inputs not modified


def test_quarter_turn_mirror_and_identity_are_exact():
    rng = np.random.default_rng(5)
    image = torch.from_numpy(rng.normal(size=(3, 2, 24, 24)).astype(np.float32))
    seg = torch.from_numpy(rng.integers(0, 4, (3, 1, 24, 24)).astype(np.int16))
    p = _neutral(sample_parameters(augmentation_ranges(AugmentationSpec((0, 1), **OFF)), 3, 2, (16, 16), rng))
    p = dataclasses.replace(p, mirror=np.zeros((3, 2), bool))
    out, out_seg = apply_parameters(p, image, seg, (16, 16))
    assert torch.equal(out, image[..., 4:20, 4:20]) and torch.equal(out_seg, seg[..., 4:20, 4:20])
    turned = dataclasses.replace(p, angles=np.array([[np.pi / 2], [0.0], [-np.pi / 2]]))
    out, out_seg = apply_parameters(turned, image, seg, (16, 16))
    # batchgenerators' convention: output (i, j) reads the input at (j, -i) for +90 degrees
    assert torch.allclose(out[0], torch.rot90(image[0, :, 4:20, 4:20], 1, (1, 2)), rtol=0, atol=1e-5)
    assert torch.allclose(out[2], torch.rot90(image[2, :, 4:20, 4:20], -1, (1, 2)), rtol=0, atol=1e-5)
    assert torch.equal(out_seg[0], torch.rot90(seg[0, :, 4:20, 4:20], 1, (1, 2)))
    assert torch.equal(out[1], image[1, :, 4:20, 4:20])
    flipped = dataclasses.replace(p, mirror=np.array([[True, False], [False, True], [True, True]]))
    out, out_seg = apply_parameters(flipped, image, seg, (16, 16))
    assert torch.equal(out[0], image[0, :, 4:20, 4:20].flip(1)) and torch.equal(
        out[2], image[2, :, 4:20, 4:20].flip(1, 2)
    )
    assert torch.equal(out_seg[1], seg[1, :, 4:20, 4:20].flip(2))
    assert torch.equal(out_seg[2], seg[2, :, 4:20, 4:20].flip(1, 2))


def test_blur_and_low_resolution_equal_scipy_and_skimage():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 10, 20, 30)).astype(np.float32)
    sigma = np.array([0.5, 0.8, 1.2], np.float32)
    blurred = gaussian_blur(torch.from_numpy(x), torch.from_numpy(sigma)).numpy()
    for i in range(3):
        np.testing.assert_allclose(blurred[i], gaussian_filter(x[i], float(sigma[i])), atol=1e-5)
    p = _neutral(sample_parameters(augmentation_ranges(AugmentationSpec((), **OFF)), 3, 1, (10, 20, 30), rng))
    zoom = np.array([[0.3], [1.0], [0.77]])
    out, _ = apply_parameters(
        dataclasses.replace(p, zoom=zoom), torch.from_numpy(x[:, None]), torch.zeros(3, 1, 10, 20, 30), (10, 20, 30)
    )
    for i in (0, 2):
        shape = np.array(x[i].shape)
        small = resize(
            x[i].astype(float), np.round(shape * zoom[i, 0]).astype(int), order=0, mode="edge", anti_aliasing=False
        )
        expected = resize(small, shape, order=1, mode="edge", anti_aliasing=False)
        np.testing.assert_allclose(out[i, 0].numpy(), expected, atol=1e-4)
    assert torch.equal(out[1, 0], torch.from_numpy(x[1]))


@pytest.mark.parametrize("dummy", [False, True])
def test_augmented_batch_shapes_and_replay(dummy):
    spec = AugmentationSpec((1, 2) if dummy else (0, 1, 2), dummy_2d=dummy, p_rotation=1, p_low_resolution=1, p_blur=1)
    patch = (4, 16, 16) if dummy else (8, 16, 16)
    size = sampling_patch_size(patch, spec)
    rng = np.random.default_rng(7)
    data = torch.from_numpy(rng.normal(size=(2, 2, *size)).astype(np.float32))
    seg = torch.from_numpy(rng.integers(0, 3, (2, 1, *size))).long()
    scales = [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (0.5, 0.25, 0.25)]
    out, targets = augment_batch(data, seg, spec, patch, batch_generator(7, 3), ds_scales=scales)
    assert out.shape == (2, 2, *patch) and torch.isfinite(out).all()
    assert [tuple(t.shape) for t in targets] == [(2, 1, *patch), (2, 1, patch[0], 8, 8), (2, 1, patch[0] // 2, 4, 4)]
    assert all(t.dtype == torch.int64 for t in targets)
    again, _ = augment_batch(data, seg, spec, patch, batch_generator(7, 3), ds_scales=scales)
    other, _ = augment_batch(data, seg, spec, patch, batch_generator(7, 4), ds_scales=scales)
    assert torch.equal(out, again) and not torch.equal(out, other)
