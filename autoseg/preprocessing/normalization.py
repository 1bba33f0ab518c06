"""Intensity normalisation per channel, as the plan says (``ct``, ``zscore``, ``rescale``, ``rgb``, ``none``).

Every function returns a new float32 array and leaves its input alone. Statistics are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autoseg.errors import PreprocessingError
from autoseg.planning.plans import ChannelNormalization

__all__ = [
    "SCHEMES",
    "nonzero_mask",
    "normalize_ct",
    "normalize_zscore",
    "normalize_rescale",
    "normalize_rgb",
    "normalize",
]

SCHEMES = ("ct", "zscore", "rescale", "rgb", "none")
_EPS = 1e-8


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Voxels non-zero in any channel of a (C, Z, Y, X) image, with enclosed holes filled (bool (Z, Y, X)).

    A hole is a zero region that does not touch the border of the array (face connectivity), e.g. dark
    structures inside a skull-stripped brain: they belong to the object and are normalised with it.
    """
    return ndimage.binary_fill_holes(np.any(image != 0, axis=0))


def normalize_ct(image: np.ndarray, clip: tuple[float, float], mean: float, std: float) -> np.ndarray:
    """Clip to ``clip`` (dataset foreground percentiles 0.5 and 99.5) and subtract ``mean``, divide by ``std``."""
    out = np.array(image, dtype=np.float32, copy=True)
    np.clip(out, clip[0], clip[1], out=out)
    out -= np.float32(mean)
    out /= np.float32(max(std, _EPS))
    return out


def normalize_zscore(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Subtract the image's mean and divide by its standard deviation.

    With ``mask``, the statistics come from the voxels inside the mask and voxels outside are set to 0.
    """
    out = np.array(image, dtype=np.float32, copy=True)
    values = out if mask is None else out[mask]
    if values.size == 0:
        return np.zeros_like(out)
    mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
    out -= np.float32(mean)
    out /= np.float32(max(std, _EPS))
    if mask is not None:
        out[~mask] = 0
    return out


def normalize_rescale(image: np.ndarray) -> np.ndarray:
    """Rescale the image's range to [0, 1] (a constant image becomes 0)."""
    out = np.array(image, dtype=np.float32, copy=True)
    if out.size == 0:
        return out
    low, high = float(out.min()), float(out.max())
    out -= np.float32(low)
    out /= np.float32(max(high - low, _EPS))
    return out


def normalize_rgb(image: np.ndarray, where: str = "image") -> np.ndarray:
    """8-bit colour to [0, 1] by dividing by 255: the same scale for every image, so colours stay comparable.

    Values outside 0..255 are an error (such a channel is not 8-bit colour; its name should not say R, G or B).
    """
    out = np.array(image, dtype=np.float32, copy=True)
    if out.size and (out.min() < 0 or out.max() > 255):
        raise PreprocessingError(
            f"{where}: scheme 'rgb' expects 8-bit values 0..255, found {out.min():g}..{out.max():g}; "
            "rename the channel in dataset.json (e.g. 'rescale_to_0_1', or a stain name for zscore) and plan again"
        )
    out /= np.float32(255)
    return out


def _normalize_channel(
    channel: np.ndarray, scheme: ChannelNormalization, mask: np.ndarray | None, where: str
) -> np.ndarray:
    if scheme.scheme == "ct":
        if scheme.clip is None or scheme.mean is None or scheme.std is None:
            raise PreprocessingError(
                f"{where}: scheme 'ct' needs clip, mean and std (the dataset's foreground "
                "intensity statistics); re-run `autoseg plan`"
            )
        return normalize_ct(channel, scheme.clip, scheme.mean, scheme.std)
    if scheme.scheme == "zscore":
        return normalize_zscore(channel, mask if scheme.use_mask else None)
    if scheme.scheme == "rescale":
        return normalize_rescale(channel)
    if scheme.scheme == "rgb":
        return normalize_rgb(channel, where)
    if scheme.scheme == "none":
        return np.array(channel, dtype=np.float32, copy=True)
    raise PreprocessingError(f"{where}: unknown normalisation scheme {scheme.scheme!r}; valid: {list(SCHEMES)}")


def normalize(image: np.ndarray, schemes: Sequence[ChannelNormalization]) -> np.ndarray:
    """Normalise each channel of a (C, Z, Y, X) image with its scheme; returns a new float32 array.

    The non-zero mask (:func:`nonzero_mask`) is computed once, and only when a ``zscore`` channel uses it.
    """
    if len(schemes) != image.shape[0]:
        raise PreprocessingError(
            f"configuration normalization has {len(schemes)} entries but the image has "
            f"{image.shape[0]} channel(s); the plan does not match this dataset"
        )
    needs_mask = any(s.scheme == "zscore" and s.use_mask for s in schemes)
    mask = nonzero_mask(image) if needs_mask else None
    out = np.empty(image.shape, dtype=np.float32)
    for c, scheme in enumerate(schemes):
        out[c] = _normalize_channel(image[c], scheme, mask, f"normalization[{c}]")
    return out
