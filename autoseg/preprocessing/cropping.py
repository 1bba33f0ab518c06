"""Cropping to the non-zero region of the image channels, and its exact inverse."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoseg.fingerprint import nonzero_bbox

__all__ = ["Box", "crop_box", "crop", "uncrop", "transpose_spatial"]

#: (start, stop) per spatial axis.
Box = tuple[tuple[int, int], ...]


def crop_box(image: np.ndarray) -> Box:
    """Bounding box of the voxels non-zero in any channel of a (C, Z, Y, X) image (full extent if none)."""
    return nonzero_bbox(image)


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """The part of ``array`` inside ``box``; ``box`` applies to the last ``len(box)`` axes. Returns a view."""
    lead = (slice(None),) * (array.ndim - len(box))
    return array[lead + _slices(box)]


def uncrop(array: np.ndarray, box: Box, shape: Sequence[int], *, fill: float | Sequence[float] = 0) -> np.ndarray:
    """Place a cropped ``array`` back into an array of spatial ``shape`` filled with ``fill``.

    Parameters
    ----------
    array : (..., *spatial) array whose trailing axes have the size of ``box``.
    box : (start, stop) per spatial axis, as returned by :func:`crop_box`.
    shape : spatial shape before cropping.
    fill : value outside the box; a sequence gives one value per entry of the first axis (per channel, e.g.
        background probability 1, other classes 0).

    Returns
    -------
    New array of shape ``(*array.shape[:-len(box)], *shape)`` and ``array``'s dtype.
    """
    spatial = tuple(int(s) for s in shape)
    cropped = tuple(b - a for a, b in box)
    if len(spatial) != len(box) or tuple(array.shape[-len(box) :]) != cropped:
        raise ValueError(f"array of shape {array.shape} does not fit box {box} inside shape {spatial}")
    lead = array.shape[: array.ndim - len(box)]
    out = np.empty((*lead, *spatial), dtype=array.dtype)
    if isinstance(fill, (int, float, np.number)):
        out.fill(fill)
    else:
        values = np.asarray(fill, dtype=array.dtype)
        if not lead or values.shape != (lead[0],):
            raise ValueError(f"fill has {values.size} values; array has leading shape {lead}")
        out[...] = values.reshape((-1,) + (1,) * (out.ndim - 1))
    out[(slice(None),) * len(lead) + _slices(box)] = array
    return out


def transpose_spatial(array: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Permute the last ``len(axes)`` (spatial) axes of ``array`` by ``axes``; leading axes stay. Returns a view."""
    lead = array.ndim - len(axes)
    return array.transpose(*range(lead), *(lead + int(a) for a in axes))
