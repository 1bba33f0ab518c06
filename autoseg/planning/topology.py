"""U-Net topology from spacing and patch size: where to pool, which kernels, what the patch must divide by.

This is nnU-Net's published rule (``get_pool_and_conv_props``), written as one pure function:

* an axis is pooled (stride 2) only while its current size is at least ``2 * min_feature_map_size`` and its current
  spacing is less than ``anisotropy_ratio`` times the finest current spacing among the axes that may still pool;
  an axis that is pooled alone must be at least ``3 * min_feature_map_size`` long;
* a convolution kernel is 1 along an axis until that axis's current spacing comes within ``anisotropy_ratio`` of the
  finest current spacing, and 3 from then on (``1x3x3`` kernels for thick slices);
* the bottleneck gets a ``3x3(x3)`` kernel and is at least ``min_feature_map_size`` voxels long on every pooled axis;
* the patch size is padded up to a multiple of the total stride (``2 ** pools`` per axis).

Spatial lists are in the order they are given (the preprocessed axis order for a plan).

The planning skeleton shared by the default planner, the nnU-Net presets and the search space also lives here:
:func:`unet_for_topology` (the one network builder), :func:`shrink_patch` (the one patch-shrink loop; each caller
passes its own fit rule and tie-break) and :func:`conv_feature_map_voxels` (nnU-Net's memory proxy for a U-Net
built on such a topology).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from autoseg.networks import get_block
from autoseg.networks.blocks import RESIDUAL_BLOCKS
from autoseg.planning.plans import NetworkSpec

__all__ = [
    "Topology",
    "pool_and_conv_props",
    "pad_to_multiple",
    "unet_for_topology",
    "shrink_patch",
    "conv_feature_map_voxels",
]

__all__ += ["RESIDUAL_BLOCKS"]


@dataclass(frozen=True)
class Topology:
    """Encoder topology of a U-Net.

    ``strides[0]`` is all ones (the first stage does not downsample); ``kernel_sizes`` has one entry per stage, the
    last one being the bottleneck's. ``patch_size`` is the input patch padded to a multiple of ``divisor``.
    """

    pools_per_axis: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    patch_size: tuple[int, ...]
    divisor: tuple[int, ...]

    @property
    def n_stages(self) -> int:
        return len(self.strides)

    @property
    def bottleneck_size(self) -> tuple[int, ...]:
        """Feature-map size at the bottleneck for ``patch_size``."""
        return tuple(p // d for p, d in zip(self.patch_size, self.divisor))


def pad_to_multiple(shape: Sequence[float] | np.ndarray, divisor: Sequence[int]) -> tuple[int, ...]:
    """Round every entry of ``shape`` up to the next multiple of ``divisor`` (an exact multiple stays as it is).

    Non-integer entries (a median shape of 230.5 voxels) are allowed: the result is the smallest multiple that is not
    smaller than the entry.
    """
    return tuple(int(math.ceil(s / d) * d) for s, d in zip(shape, divisor))


def _poolable_axes(
    size: list[float], spacing: list[float], pools: list[int], min_size: int, ratio: float, max_pools: int
) -> list[int]:
    axes = [i for i in range(len(size)) if size[i] >= 2 * min_size]
    if not axes:
        return []
    finest = min(spacing[i] for i in axes)
    axes = [i for i in axes if spacing[i] / finest < ratio and pools[i] < max_pools]
    if len(axes) == 1 and size[axes[0]] < 3 * min_size:
        return []
    return axes


def pool_and_conv_props(
    spacing: Sequence[float] | np.ndarray,
    patch_size: Sequence[float] | np.ndarray,
    *,
    min_feature_map_size: int = 4,
    max_pools_per_axis: int = 999999,
    anisotropy_ratio: float = 2.0,
) -> Topology:
    """Pooling strides, kernel sizes and padded patch size of a U-Net for a patch of ``patch_size`` voxels.

    Parameters
    ----------
    spacing : sequence of float
        Voxel spacing (mm) per axis of the patch.
    patch_size : sequence of float
        Wanted patch size in voxels per axis (may be non-integer; it is padded up).
    min_feature_map_size : int, optional
        Smallest edge length of the bottleneck feature map (nnU-Net: 4).
    max_pools_per_axis : int, optional
        Upper bound on the number of poolings per axis (nnU-Net: effectively none).
    anisotropy_ratio : float, optional
        Spacing ratio to the finest axis below which an axis is pooled and gets 3-wide kernels (nnU-Net: 2).

    Returns
    -------
    Topology
        Strides, kernels, padded patch size and its divisor (total stride per axis).
    """
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(s) for s in patch_size]
    pools = [0] * dim
    kernel = [1] * dim
    strides: list[tuple[int, ...]] = [(1,) * dim]
    kernels: list[tuple[int, ...]] = []
    while True:
        axes = _poolable_axes(
            current_size, current_spacing, pools, min_feature_map_size, anisotropy_ratio, max_pools_per_axis
        )
        if not axes:
            break
        finest = min(current_spacing)
        kernel = [3 if k == 3 or current_spacing[d] / finest < anisotropy_ratio else 1 for d, k in enumerate(kernel)]
        for a in axes:
            pools[a] += 1
            current_spacing[a] *= 2
            current_size[a] = math.ceil(current_size[a] / 2)
        strides.append(tuple(2 if d in axes else 1 for d in range(dim)))
        kernels.append(tuple(kernel))
    kernels.append((3,) * dim)
    divisor = tuple(2**p for p in pools)
    return Topology(
        pools_per_axis=tuple(pools),
        strides=tuple(strides),
        kernel_sizes=tuple(kernels),
        patch_size=pad_to_multiple(patch_size, divisor),
        divisor=divisor,
    )


def unet_for_topology(
    topology: Topology,
    base: int,
    *,
    max_features: int,
    block: str = "plain",
    encoder: Sequence[int] | None = None,
    decoder: Sequence[int] | None = None,
) -> NetworkSpec:
    """U-Net of architecture family ``block`` on ``topology``: ``base`` features doubling per stage up to
    ``max_features``.

    ``encoder`` / ``decoder`` (blocks per encoder stage, convolutions per decoder stage) default to the family's
    registered defaults: two convolutions per stage for plain blocks, :data:`RESIDUAL_BLOCKS` with one decoder
    convolution for residual ones. A family whose bottleneck needs the token grid (``hybrid``) gets the
    bottleneck size of ``topology.patch_size``.
    """
    n = topology.n_stages
    family = get_block(block)
    if encoder is None:
        encoder = family.encoder_blocks or (2,) * n
    if decoder is None:
        decoder = (family.decoder_convs,) * (n - 1)
    if n > len(encoder) or n - 1 > len(decoder):
        raise ValueError(f"{n} stages needed but only {len(encoder)} encoder stages are defined; reduce the patch")
    return NetworkSpec(
        n_stages=n,
        features_per_stage=tuple(min(max_features, base * 2**i) for i in range(n)),
        kernel_sizes=topology.kernel_sizes,
        strides=topology.strides,
        n_conv_per_stage=tuple(encoder[:n]),
        n_conv_per_stage_decoder=tuple(decoder[: n - 1]),
        block=block,
        bottleneck_tokens=topology.bottleneck_size if family.needs_tokens else None,
    )


def shrink_patch(
    start: Sequence[float] | np.ndarray,
    median: Sequence[float] | np.ndarray,
    topology: Callable[[Sequence[float] | np.ndarray], Topology],
    fits: Callable[[Topology], bool],
    *,
    step: Literal["current", "next"] = "current",
    ties: Literal["last", "first"] = "last",
    min_edge: int = 4,
) -> tuple[Topology, int] | None:
    """Shrink a patch until ``fits(topology(patch))``: the planners' one shrink loop.

    Each round takes one divisor step off the axis whose patch is largest relative to the ``median`` image (``ties``:
    the last or the first such axis). ``step="current"`` subtracts the current topology's divisor on that axis;
    ``"next"`` subtracts the divisor the smaller patch will need, so that no valid size is skipped (nnU-Net's rule).

    Returns the fitting topology and the number of rounds, or None once an axis would drop below ``min_edge``.
    """
    topo = topology(start)
    steps = 0
    while not fits(topo):
        ratios = np.array([p / m for p, m in zip(topo.patch_size, median)])
        axis = int(np.flatnonzero(ratios == ratios.max())[-1 if ties == "last" else 0])
        patch = list(topo.patch_size)
        if step == "next":
            trial = list(patch)
            trial[axis] -= topo.divisor[axis]
            patch[axis] -= topology(trial).divisor[axis]
        else:
            patch[axis] -= topo.divisor[axis]
        if patch[axis] < min_edge:
            return None
        topo = topology(patch)
        steps += 1
    return topo, steps


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def conv_feature_map_voxels(network: NetworkSpec, patch_size: Sequence[int], n_outputs: int) -> int:
    """nnU-Net's memory proxy: summed size (channels x voxels) of every convolution output for one sample.

    Counts the encoder convolutions (for residual blocks: both convolutions and the projection of the skip path
    where the block changes channels or resolution, plus the stem), the decoder's transposed convolutions and
    convolutions, and the final segmentation layer (deep-supervision heads are not counted). Sizes are floor-divided
    by the strides stage by stage.
    """
    sizes = [tuple(int(p) for p in patch_size)]
    for stride in network.strides:
        sizes.append(tuple(a // b for a, b in zip(sizes[-1], stride)))
    feats = network.features_per_stage
    total = 0
    if network.block == "residual":
        total += feats[0] * _prod(sizes[0])  # stem
        in_channels = feats[0]
        for k, n_blocks in enumerate(network.n_conv_per_stage):
            out = _prod(sizes[k + 1])
            projection = in_channels != feats[k] or sizes[k] != sizes[k + 1]
            total += (2 * n_blocks + int(projection)) * feats[k] * out
            in_channels = feats[k]
    else:
        for k, n_conv in enumerate(network.n_conv_per_stage):
            total += n_conv * feats[k] * _prod(sizes[k + 1])
    n = network.n_stages
    for s, n_conv in enumerate(network.n_conv_per_stage_decoder):
        k = n - 2 - s  # the encoder stage whose skip this decoder stage merges
        total += (n_conv + 1) * feats[k] * _prod(sizes[k + 1])
    if n > 1:  # the segmentation layer sits on the last decoder stage; a one-stage network has no decoder
        total += n_outputs * _prod(sizes[1])
    return total
