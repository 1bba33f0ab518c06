"""Controlled image perturbations at named severities, for :mod:`autoseg.analysis.robustness`.

Every perturbation acts on an image as read, ``(C, Z, Y, X)`` in its own geometry (``spacing_zyx`` in mm), and
returns an array of the same shape: the geometry (spacing, origin, direction) is unchanged. The one that moves
voxels (``rotation``) transforms the reference label map with the same transform (nearest neighbour), so the
Dice of the prediction on the rotated image against the rotated reference is the Dice of a correctly aligned pair.

Blur, bias field and rotation use TorchIO's deterministic transforms (``Blur``, ``BiasField``, ``Affine``), which
work in millimetres from the image's spacing; lower resolution uses autoseg's own resampling (TorchIO's
``RandomAnisotropy`` leaves a border of zeros where it upsamples past the last coarse sample); what TorchIO gets
wrong for CT (``Gamma`` takes signed powers of negative Hounsfield units) or does not have (intensity scale/shift,
missing slices) is one line of numpy each. Random parts (noise, bias-field coefficients, which slices go missing) come
from a seeded ``numpy.random.Generator``. A 2D image is ``(C, 1, Y, X)``: its singleton axis is never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import comb

import numpy as np
import torch

from autoseg.errors import ConfigError

__all__ = ["PERTURBATIONS", "Perturbation", "apply_perturbation", "perturbations_for"]

Spacing = Sequence[float]
#: (image, label or None, spacing_zyx, severity value, rng) -> (image, label)
Apply = Callable[
    [np.ndarray, np.ndarray | None, Spacing, float, np.random.Generator], tuple[np.ndarray, np.ndarray | None]
]


@dataclass(frozen=True)
class Perturbation:
    """A named perturbation: its severity values (level 1 = ``values[0]``), what a value means, and the function."""

    name: str
    values: tuple[float, ...]
    parameter: str
    apply: Apply
    only_3d: bool = False
    moves_voxels: bool = False


def _subject(image: np.ndarray, spacing: Spacing, label: np.ndarray | None = None):
    """A TorchIO subject of a (C, Z, Y, X) image with a diagonal affine of ``spacing`` (axes kept in our order)."""
    import torchio as tio

    affine = np.diag([*map(float, spacing), 1.0])
    items: dict[str, tio.Image] = {
        "image": tio.ScalarImage(tensor=torch.as_tensor(image, dtype=torch.float32), affine=affine)
    }
    if label is not None:
        items["label"] = tio.LabelMap(tensor=torch.as_tensor(label[None].astype(np.int16)), affine=affine)
    return tio.Subject(**items)


def _image(subject) -> np.ndarray:
    return subject["image"].data.numpy().astype(np.float32)


def _spatial_axes(image: np.ndarray) -> list[int]:
    """The spatial axes (0, 1, 2 of Z, Y, X) that are longer than one voxel."""
    return [a for a in range(3) if image.shape[a + 1] > 1]


def _channel_std(image: np.ndarray) -> np.ndarray:
    """Per-channel intensity standard deviation, shaped to broadcast over (C, Z, Y, X)."""
    return image.reshape(image.shape[0], -1).std(axis=1).reshape(-1, 1, 1, 1)


def _noise(image, label, spacing, value, rng):
    """Additive Gaussian noise of std ``value`` x the channel's intensity std."""
    noise = rng.standard_normal(image.shape, dtype=np.float32) * (value * _channel_std(image)).astype(np.float32)
    return image + noise, label


def _blur(image, label, spacing, value, rng):
    """Gaussian blur of std ``value`` x the finest spacing, in mm, along every non-singleton axis (TorchIO Blur)."""
    import torchio as tio

    axes = _spatial_axes(image)
    sigma_mm = value * min(float(spacing[a]) for a in axes)
    std = tuple(sigma_mm if a in axes else 0.0 for a in range(3))
    return _image(tio.Blur(std=std)(_subject(image, spacing))), label


def _intensity(image, label, spacing, value, rng):
    """Intensity scale and shift: ``x * (1 + value) + value * std`` per channel."""
    return (image * (1 + value) + value * _channel_std(image)).astype(np.float32), label


def _gamma(image, label, spacing, value, rng):
    """Gamma ``value`` on each channel's intensities rescaled to [0, 1], then scaled back to their range."""
    flat = image.reshape(image.shape[0], -1)
    low, high = flat.min(axis=1).reshape(-1, 1, 1, 1), flat.max(axis=1).reshape(-1, 1, 1, 1)
    span = np.maximum(high - low, 1e-12)
    return (low + span * ((image - low) / span) ** value).astype(np.float32), label


def _bias_field(image, label, spacing, value, rng):
    """Smooth multiplicative field exp(polynomial of order 3) with coefficients uniform in [-value, value], applied
    to the intensities above each channel's minimum (TorchIO BiasField)."""
    import torchio as tio

    order = 3
    coefficients = rng.uniform(-value, value, comb(order + 3, 3)).tolist()  # one per monomial of degree <= order
    low = image.reshape(image.shape[0], -1).min(axis=1).reshape(-1, 1, 1, 1)
    field = _image(tio.BiasField(coefficients=coefficients, order=order)(_subject(np.ones_like(image), spacing)))
    return (low + (image - low) * field).astype(np.float32), label


def _lowres(image, label, spacing, value, rng):
    """Lower resolution: sampled ``value`` times coarser along every non-singleton axis, then back onto its own grid
    (linear both ways, with the preprocessing's resampling, which keeps the borders)."""
    from autoseg.preprocessing.resampling import compute_new_shape, resample_image

    axes = _spatial_axes(image)
    coarse = [float(s) * (value if a in axes else 1.0) for a, s in enumerate(spacing)]
    small = resample_image(image, compute_new_shape(image.shape[1:], spacing, coarse), orders=(1, 1, 1))
    return resample_image(small, image.shape[1:], orders=(1, 1, 1)), label


def _rotation(image, label, spacing, value, rng):
    """Rotation by ``value`` degrees in the (Y, X) plane about the image centre, in mm (TorchIO Affine); voxels
    rotated in from outside get the channel minimum, the reference label map is rotated with the image."""
    import torchio as tio

    transform = tio.Affine(
        scales=(1.0, 1.0, 1.0), degrees=(float(value), 0.0, 0.0), translation=(0.0, 0.0, 0.0), check_shape=False
    )
    rotated = transform(_subject(image, spacing, label))
    out_label = None if label is None else rotated["label"].data.numpy()[0].astype(label.dtype)
    return _image(rotated), out_label


def _missing_slices(image, label, spacing, value, rng):
    """A share ``value`` of the slices along the coarsest axis (at least one) set to the channel minimum."""
    axis = max(_spatial_axes(image), key=lambda a: (float(spacing[a]), -a))
    n = image.shape[axis + 1]
    lost = rng.choice(n, size=max(1, round(value * n)), replace=False)
    out = image.copy()
    index: list = [slice(None)] * 4
    index[axis + 1] = np.sort(lost)
    low = image.reshape(image.shape[0], -1).min(axis=1).reshape(-1, 1, 1, 1)
    out[tuple(index)] = np.broadcast_to(low, out[tuple(index)].shape)
    return out, label


#: name -> perturbation; severities 1, 2, 3 in order of increasing strength.
PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p
    for p in (
        Perturbation("noise", (0.1, 0.25, 0.5), "noise std / image intensity std", _noise),
        Perturbation("blur", (0.75, 1.5, 3.0), "Gaussian std in units of the finest spacing", _blur),
        Perturbation("intensity", (0.1, 0.25, 0.5), "v: x * (1 + v) + v * std", _intensity),
        Perturbation("gamma", (1.25, 1.5, 2.0), "gamma on the [0, 1]-rescaled intensities", _gamma),
        Perturbation("bias_field", (0.15, 0.3, 0.6), "max |coefficient| of the log-polynomial field", _bias_field),
        Perturbation("lowres", (1.5, 2.0, 3.0), "downsampling factor per axis", _lowres),
        Perturbation("rotation", (5.0, 10.0, 20.0), "degrees in the (y, x) plane", _rotation, moves_voxels=True),
        Perturbation("missing_slices", (0.1, 0.2, 0.3), "share of slices lost", _missing_slices, only_3d=True),
    )
}


def perturbations_for(names: Sequence[str] | None, *, is_2d: bool) -> list[Perturbation]:
    """The perturbations called ``names`` (default: every one that applies to 2D or 3D images)."""
    if names is None:
        return [p for p in PERTURBATIONS.values() if not (p.only_3d and is_2d)]
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise ConfigError(f"unknown perturbation(s) {', '.join(unknown)}; choose from {', '.join(PERTURBATIONS)}")
    return [PERTURBATIONS[n] for n in names]


def apply_perturbation(
    name: str,
    image: np.ndarray,
    spacing_zyx: Spacing,
    level: int,
    *,
    label: np.ndarray | None = None,
    seed: int = 0,
    value_range: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply perturbation ``name`` at severity ``level`` (1-based) to a (C, Z, Y, X) image; inputs are not modified.

    Returns the perturbed image (float32, same shape) and the label map (Z, Y, X), transformed with the image when
    the perturbation moves voxels, else returned as given. ``value_range`` clips the result to what the input can
    hold (8-bit colour saturates at 0 and 255, as a camera does).
    """
    perturbation = perturbations_for([name], is_2d=False)[0]
    if not 1 <= level <= len(perturbation.values):
        raise ConfigError(f"{name}: severity level {level} is not in 1..{len(perturbation.values)}")
    if image.ndim != 4:
        raise ValueError(f"image must be (C, Z, Y, X); got shape {image.shape}")
    if perturbation.only_3d and image.shape[1] == 1:
        raise ConfigError(f"{name} applies to 3D images only")
    rng = np.random.default_rng(seed)
    out, out_label = perturbation.apply(
        np.asarray(image, np.float32), label, spacing_zyx, perturbation.values[level - 1], rng
    )
    assert out.shape == image.shape
    if value_range is not None:
        out = np.clip(out, *value_range)
    return out.astype(np.float32, copy=False), out_label
