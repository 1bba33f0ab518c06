"""Sliding-window prediction with Gaussian importance weighting and test-time mirroring.

The image is covered by overlapping tiles of the training patch size (``step`` 0.5: half a patch between tile
starts). Each tile's logits are weighted by a Gaussian centred on the tile (sigma = patch / 8), so voxels near a
tile's border, where the network sees little context, count less. Mirroring averages the predictions of flipped
copies of each tile. Only the (K, Z, Y, X) accumulator and a weight map live at full resolution.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch

__all__ = ["tile_starts", "gaussian_importance", "mirror_combinations", "sliding_window_logits"]


def tile_starts(image_size: int, patch_size: int, step: float) -> list[int]:
    """Start indices of tiles along one axis: evenly spread, first at 0, last ending at the image end."""
    if image_size <= patch_size:
        return [0]
    n = math.ceil((image_size - patch_size) / (patch_size * step)) + 1
    return sorted({round(i * (image_size - patch_size) / (n - 1)) for i in range(n)})


@lru_cache(maxsize=8)
def _gaussian(patch_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(p) for p in patch_size], indexing="ij")
    g = np.ones(patch_size, dtype=np.float64)
    for grid, p in zip(grids, patch_size):
        sigma = p * sigma_scale
        g *= np.exp(-0.5 * ((grid - (p - 1) / 2) / sigma) ** 2)
    g /= g.max()
    g = np.maximum(g, g[g > 0].min(), out=g)  # no zero weight anywhere: every voxel gets a prediction
    return g.astype(np.float32)


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """Gaussian weight map of ``patch_size``, maximum 1, strictly positive."""
    return _gaussian(tuple(int(p) for p in patch_size), float(sigma_scale))


def mirror_combinations(mirror_axes: Sequence[int], mode: str = "all") -> list[tuple[int, ...]]:
    """Flip combinations (spatial axes) to average over.

    ``all``: every subset of ``mirror_axes`` (2^k passes, as nnU-Net); ``single``: no flip plus one flip per axis
    (k + 1 passes, most of the benefit at a fraction of the cost); ``none``: no mirroring.
    """
    axes = tuple(mirror_axes)
    if mode == "none" or not axes:
        return [()]
    if mode == "single":
        return [()] + [(a,) for a in axes]
    if mode == "all":
        return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    raise ValueError(f"unknown mirror mode {mode!r}; choose all, single or none")


def sliding_window_logits(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray | torch.Tensor,
    patch_size: Sequence[int],
    n_outputs: int,
    *,
    step: float = 0.5,
    mirror_axes: Sequence[int] = (),
    mirror_mode: str = "all",
    tile_batch: int = 4,
    device: torch.device | str = "cpu",
    accumulate_on: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Predict a whole image tile by tile.

    Parameters
    ----------
    predict : maps a (B, C, *patch_size) tensor on ``device`` to (B, n_outputs, *patch_size) logits.
    image : (C, *spatial) array; spatial dims must match ``len(patch_size)``. Smaller images are padded with 0.
    mirror_axes : spatial axes (0-based, of the patch) that the network was trained with mirroring on.
    tile_batch : tiles per forward pass.
    autocast_dtype : e.g. torch.float16 on CUDA for half-precision inference.

    Returns
    -------
    (n_outputs, *spatial) float32 tensor of Gaussian-weighted mean logits, on ``accumulate_on``.
    """
    x = torch.as_tensor(image, dtype=torch.float32)
    spatial = tuple(x.shape[1:])
    patch = tuple(int(p) for p in patch_size)
    if len(spatial) != len(patch):
        raise ValueError(f"image has {len(spatial)} spatial dims, patch_size {patch} has {len(patch)}")
    pad = [max(0, p - s) for p, s in zip(patch, spatial)]
    if any(pad):
        pads = []
        for p in reversed(pad):
            pads += [p // 2, p - p // 2]
        x = torch.nn.functional.pad(x, pads)
    padded = tuple(x.shape[1:])
    weight = torch.from_numpy(gaussian_importance(patch)).to(accumulate_on)
    logits = torch.zeros((n_outputs, *padded), dtype=torch.float32, device=accumulate_on)
    weights = torch.zeros(padded, dtype=torch.float32, device=accumulate_on)
    starts = list(itertools.product(*[tile_starts(s, p, step) for s, p in zip(padded, patch)]))
    flips = mirror_combinations(mirror_axes, mirror_mode)
    with torch.inference_mode():
        for i in range(0, len(starts), tile_batch):
            chunk = starts[i : i + tile_batch]
            slices = [tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in chunk]
            batch = torch.stack([x[(slice(None), *sl)] for sl in slices]).to(device)
            out = None
            for flip in flips:
                dims = [a + 2 for a in flip]
                inp = torch.flip(batch, dims) if dims else batch
                amp = autocast_dtype is not None
                with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=amp):
                    pred = predict(inp)
                pred = pred.float()
                pred = torch.flip(pred, dims) if dims else pred
                out = pred if out is None else out + pred
            out = (out / len(flips)).to(accumulate_on)
            for k, sl in enumerate(slices):
                logits[(slice(None), *sl)] += out[k] * weight
                weights[sl] += weight
    logits /= weights
    if any(pad):
        crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial))
        logits = logits[(slice(None), *crop)]
    return logits
