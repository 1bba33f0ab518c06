"""What a network and its loss are, as the plan records them: the networks own their description, the planner
fills it in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from autoseg.serialization import OMIT_DEFAULT

__all__ = ["GRAD_CLIP", "LossSpec", "NetworkSpec", "stride_product"]

#: Gradient-norm clipping of training (``training.grad_clip``'s default) and of the planner's probes.
GRAD_CLIP = 12.0


def stride_product(strides: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Per-axis product of a network's strides: input sizes must be divisible by it."""
    out = [1] * len(strides[0])
    for s in strides:
        out = [a * b for a, b in zip(out, s)]
    return tuple(out)


@dataclass(frozen=True)
class NetworkSpec:
    """A U-Net: encoder stages (convolution blocks + downsampling by ``strides``), mirrored decoder.

    ``block`` names the architecture family, an entry of the block registry (``plain``: ``n_conv_per_stage``
    convolutions per encoder stage; ``residual``: ``n_conv_per_stage`` residual blocks of two convolutions;
    ``attention``, ``multiscale``, ``dense``, ``convnext``, ``hybrid``: see :mod:`autoseg.networks.families`).
    ``strides[0]`` is the stride of the first stage (all ones: no downsampling before the first stage).
    ``bottleneck_tokens``: the bottleneck feature-map size of the planned patch, for families that size a
    positional encoding from it (``hybrid``); left out of ``plans.json`` when None.
    """

    n_stages: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    n_conv_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    block: str = "plain"
    norm: str = "instance"
    nonlin: str = "leaky_relu"
    deep_supervision: bool = True
    conv_bias: bool = True
    bottleneck_tokens: tuple[int, ...] | None = field(default=None, metadata={OMIT_DEFAULT: True})

    @property
    def ndim(self) -> int:
        return len(self.kernel_sizes[0])

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Product of the strides per axis: the patch size must be divisible by it."""
        return stride_product(self.strides)

    def stage_sizes(self, patch_size: Sequence[int]) -> list[tuple[int, ...]]:
        """Feature-map size of each stage for an input of ``patch_size`` (strides applied stage by stage, floored)."""
        sizes, size = [], tuple(int(p) for p in patch_size)
        for stride in self.strides:
            size = tuple(n // k for n, k in zip(size, stride))
            sizes.append(size)
        return sizes


@dataclass(frozen=True)
class LossSpec:
    """Loss: a registered name plus its options (``dice_ce``: soft Dice + cross-entropy)."""

    name: str = "dice_ce"
    batch_dice: bool = False
    options: dict[str, float] = field(default_factory=dict)
