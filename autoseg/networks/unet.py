"""The U-Net: an encoder of registered blocks, a transposed-convolution decoder and deep-supervision heads.

The network takes primitive arguments only (no plan, no files); :func:`autoseg.networks.builder.build_network`
adapts a plan's :class:`~autoseg.networks.spec.NetworkSpec` to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from autoseg.errors import ConfigError
from autoseg.networks.blocks import BasicResidualBlock, ConvNormAct, LayerOps, get_block
from autoseg.networks.spec import stride_product

__all__ = ["UNet", "init_weights"]


def _check_lengths(n_stages: int, **lists: Sequence) -> None:
    for name, values in lists.items():
        expected = n_stages - 1 if name == "n_conv_per_stage_decoder" else n_stages
        if len(values) != expected:
            raise ConfigError(
                f"network.{name} has {len(values)} entries but n_stages={n_stages} needs {expected}; "
                f"give one entry per {'decoder' if expected < n_stages else 'encoder'} stage"
            )


class UNet(nn.Module):
    """U-Net for 2D or 3D inputs (the dimension is ``len(kernel_sizes[0])``).

    Parameters
    ----------
    input_channels, num_classes
        Input channels and output channels (classes or regions).
    n_stages
        Number of resolution stages (encoder stages; the decoder has ``n_stages - 1``).
    features_per_stage, kernel_sizes, strides, n_conv_per_stage
        Per encoder stage. Stage ``i`` applies ``strides[i]`` in its first convolution (``strides[0]`` is usually
        all ones). With ``block="residual"``, ``n_conv_per_stage[i]`` counts residual blocks of two convolutions.
    n_conv_per_stage_decoder
        Plain convolutions per decoder stage, listed from the bottleneck upwards (as nnU-Net).
    block, norm, nonlin
        Names in the block (architecture family), norm and nonlinearity registries (:mod:`autoseg.networks.blocks`,
        :mod:`autoseg.networks.families`).
    deep_supervision
        When True, ``forward`` returns one logits tensor per decoder stage, highest resolution first; else the
        full-resolution logits only. An attribute: switch it off for inference.
    conv_bias
        Bias in every convolution of the encoder and decoder (heads always have one).
    bottleneck_tokens
        Bottleneck feature-map size of the planned patch, for families whose bottleneck needs it (``hybrid``).
    """

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        n_stages: int,
        features_per_stage: Sequence[int],
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        n_conv_per_stage: Sequence[int],
        n_conv_per_stage_decoder: Sequence[int],
        *,
        block: str = "plain",
        norm: str = "instance",
        nonlin: str = "leaky_relu",
        deep_supervision: bool = True,
        conv_bias: bool = True,
        bottleneck_tokens: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if n_stages < 2:
            raise ConfigError(f"network.n_stages must be at least 2 (an encoder and a decoder stage), got {n_stages}")
        _check_lengths(
            n_stages,
            features_per_stage=features_per_stage,
            kernel_sizes=kernel_sizes,
            strides=strides,
            n_conv_per_stage=n_conv_per_stage,
            n_conv_per_stage_decoder=n_conv_per_stage_decoder,
        )
        ndim = len(kernel_sizes[0])
        if ndim not in (2, 3) or any(len(k) != ndim for k in list(kernel_sizes) + list(strides)):
            raise ConfigError(f"network.kernel_sizes/strides must all have 2 or 3 entries per stage, got {ndim}")
        if min(list(n_conv_per_stage) + list(n_conv_per_stage_decoder)) < 1:
            raise ConfigError("network.n_conv_per_stage(_decoder) entries must be >= 1")
        ops = LayerOps(ndim=ndim, norm=norm, nonlin=nonlin, conv_bias=conv_bias)
        block_type = get_block(block)
        self.ndim = ndim
        self.strides = tuple(tuple(int(v) for v in s) for s in strides)
        self.deep_supervision = deep_supervision
        ones = [1] * ndim
        self.stem = (
            ConvNormAct(ops, input_channels, features_per_stage[0], kernel_sizes[0], ones) if block_type.stem else None
        )
        c_in = features_per_stage[0] if block_type.stem else input_channels
        self.encoder = nn.ModuleList()
        for i in range(n_stages):
            stage = block_type.build_stage(
                ops, c_in, features_per_stage[i], kernel_sizes[i], strides[i], n_conv_per_stage[i]
            )
            self.encoder.append(stage)
            c_in = features_per_stage[i]
        self.bottleneck = (
            block_type.bottleneck(ops, features_per_stage[-1], kernel_sizes[-1], bottleneck_tokens)
            if block_type.bottleneck is not None
            else None
        )
        self.gates = nn.ModuleList()
        # decoder stage j (j = 0 next to the bottleneck) upsamples stage s+1 to stage s = n_stages - 2 - j
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for j, s in enumerate(range(n_stages - 2, -1, -1)):
            c = features_per_stage[s]
            self.upsample.append(ops.transposed_conv(features_per_stage[s + 1], c, strides[s + 1]))
            if block_type.skip_gate is not None:
                self.gates.append(block_type.skip_gate(ops, c, c))
            n = n_conv_per_stage_decoder[j]
            convs = [ConvNormAct(ops, 2 * c if i == 0 else c, c, kernel_sizes[s], ones) for i in range(n)]
            self.decoder.append(nn.Sequential(*convs))
            self.heads.append(ops.conv(c, num_classes, ones, ones, bias=True))
        self.apply(init_weights)

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Per-axis product of the strides: input sizes must be divisible by it."""
        return stride_product(self.strides)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        spatial = tuple(x.shape[2:])
        if len(spatial) != self.ndim or any(n % t for n, t in zip(spatial, self.total_stride)):
            raise ConfigError(
                f"input of shape {tuple(x.shape)} does not fit this {self.ndim}D network: each spatial size must be "
                f"divisible by the total stride {self.total_stride}; pad the input or change the patch size"
            )
        if self.stem is not None:
            x = self.stem(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        if self.bottleneck is not None:
            x = self.bottleneck(x)
        outputs = []
        n_dec = len(self.decoder)
        for j in range(n_dec):
            up, skip = self.upsample[j](x), skips[-(j + 2)]
            if len(self.gates):
                skip = self.gates[j](skip, up)
            x = self.decoder[j](torch.cat((up, skip), dim=1))
            if self.deep_supervision or j == n_dec - 1:
                outputs.append(self.heads[j](x))
        if not self.deep_supervision:
            return outputs[-1]
        return outputs[::-1]


def init_weights(module: nn.Module) -> None:
    """nnU-Net's initialisation: He normal (``a=1e-2``) for (transposed) convolutions, zero biases; the last norm
    of each residual branch starts at zero so that a residual block starts as its skip."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    if isinstance(module, BasicResidualBlock):
        for p in module.conv2.norm.parameters():  # affine weight and bias
            nn.init.zeros_(p)
