"""Sliding-window prediction with Gaussian importance weighting and test-time mirroring.

The image is covered by overlapping tiles of the training patch size (``step`` 0.5: half a patch between tile
starts). Each tile's logits are weighted by a Gaussian centred on the tile (sigma = patch / 8), so voxels near a
tile's border, where the network sees little context, count less. Mirroring averages the predictions of flipped
copies of each tile. :func:`sliding_window_rows` streams the result along the first axis (a band of about one
patch is held); :func:`sliding_window_logits` collects it into the (K, Z, Y, X) logits of the whole image.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

__all__ = ["tile_starts", "gaussian_importance", "mirror_combinations", "sliding_window_logits", "sliding_window_rows"]


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
    accumulate_on: torch.device | str = "cpu",
    **options: Any,
) -> torch.Tensor:
    """Predict a whole image tile by tile.

    Parameters
    ----------
    predict : maps a (B, C, *patch_size) tensor on ``device`` to (B, n_outputs, *patch_size) logits.
    image : (C, *spatial) array; spatial dims must match ``len(patch_size)``. Smaller images are padded with 0.
    options : ``step``, ``mirror_axes``, ``mirror_mode``, ``tile_batch``, ``device``, ``autocast_dtype`` of
        :func:`sliding_window_rows`.

    Returns
    -------
    (n_outputs, *spatial) float32 tensor of Gaussian-weighted mean logits, on ``accumulate_on``.
    """
    spatial = tuple(image.shape[1:])
    logits = torch.zeros((n_outputs, *spatial), dtype=torch.float32, device=accumulate_on)
    for first, rows in sliding_window_rows(
        predict, image, patch_size, n_outputs, accumulate_on=accumulate_on, **options
    ):
        logits[:, first : first + rows.shape[1]] = rows
    return logits


#: Finished rows handed out per step by :func:`sliding_window_rows`.
YIELD_ROWS = 8


def _shift_rows(buffer: torch.Tensor, n: int, live: int) -> None:
    """Move rows ``[n, n + live)`` of ``buffer`` (axis 1) to the front, in non-overlapping steps, and zero the rest."""
    for s in range(0, live, n):
        m = min(n, live - s)
        buffer[:, s : s + m].copy_(buffer[:, s + n : s + n + m])
    buffer[:, live:].zero_()


def sliding_window_rows(
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
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`sliding_window_logits` streamed along the first spatial axis: yields ``(first_row, logits)``, the
    finished rows ``(n_outputs, rows, ...)`` in order, as soon as no later tile touches them.

    Only a band of rows as deep as the tiles in flight (about one patch) is held, so memory does not grow with the
    length of that axis. Tiles are batched and summed exactly as for the whole image: the same numbers come out.
    ``autocast_dtype`` is e.g. torch.float16 on CUDA for half-precision inference.
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
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial))
    weight = torch.from_numpy(gaussian_importance(patch)).to(accumulate_on)
    starts = list(itertools.product(*[tile_starts(s, p, step) for s, p in zip(padded, patch)]))
    chunks = [starts[i : i + tile_batch] for i in range(0, len(starts), tile_batch)]
    # row k of the band is padded row base + k; finished rows: those before the next chunk's first tile
    finished = [c[0][0] for c in chunks[1:]] + [padded[0]]
    depth = max(max(s[0] for s in c) + patch[0] - low for c, low in zip(chunks, [0] + finished[:-1]))
    logits = torch.zeros((n_outputs, depth, *padded[1:]), dtype=torch.float32, device=accumulate_on)
    weights = torch.zeros((depth, *padded[1:]), dtype=torch.float32, device=accumulate_on)
    flips = mirror_combinations(mirror_axes, mirror_mode)
    base = 0
    for chunk, done in zip(chunks, finished):
        with torch.inference_mode():  # per chunk: a generator must not hold the mode across yields
            slices = [tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in chunk]
            batch = torch.stack([x[(slice(None), *sl)] for sl in slices]).to(device)
            summed: torch.Tensor | None = None
            for flip in flips:
                dims = [a + 2 for a in flip]
                inp = torch.flip(batch, dims) if dims else batch
                amp = autocast_dtype is not None
                with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=amp):
                    pred = predict(inp)
                pred = pred.float()
                pred = torch.flip(pred, dims) if dims else pred
                summed = pred if summed is None else summed + pred
            assert summed is not None  # flips holds at least the unflipped pass
            out = summed.div_(len(flips)).to(accumulate_on)  # in place: no second copy of the tiles' outputs
            for k, sl in enumerate(slices):
                band = (slice(sl[0].start - base, sl[0].stop - base), *sl[1:])
                logits[(slice(None), *band)].addcmul_(out[k], weight)  # no temporary of classes x patch
                weights[band] += weight
        if done == base:
            continue
        n = done - base
        lo, hi = max(base, crop[0].start), min(done, crop[0].stop)  # the padding is not returned
        for a in range(lo, hi, YIELD_ROWS):  # a few rows at a time: what the caller makes of them stays small
            b = min(a + YIELD_ROWS, hi)
            rows = logits[:, a - base : b - base] / weights[a - base : b - base]
            yield a - crop[0].start, rows[(slice(None), slice(None), *crop[1:])]
        live = max(0, max(s[0] for s in chunk) + patch[0] - done)
        _shift_rows(logits, n, live)
        _shift_rows(weights[None], n, live)
        base = done
