"""Architecture families beyond the plain and residual U-Nets, registered in the block registry.

Every family keeps the U-Net skeleton of :class:`~autoseg.networks.unet.UNet` (the plan's stages, features,
kernels and strides; transposed-convolution decoder; deep-supervision heads) and changes one part of it:

- ``attention``: plain encoder; each skip connection is multiplied by an additive attention gate computed from
  the skip and the upsampled decoder features (Oktay et al. 2018, Attention U-Net);
- ``multiscale``: plain encoder; the bottleneck adds a dilated pyramid (1x1 and 3x3 convolutions at dilations 1,
  2 and 4 in parallel, concatenated and projected back, added to its input: DeepLab's ASPP as a residual);
- ``dense``: each encoder stage is a strided conv-norm-nonlinearity, then ``n`` densely connected layers of
  ``c / 2`` features each (every layer sees all earlier outputs), then a 1x1 transition back to ``c``;
- ``convnext``: MedNeXt-like stages (Roy et al. 2023): a strided convolution (kernel = stride) changes resolution
  and width, then ``n`` blocks of depthwise large-kernel convolution (5 wherever the plan's kernel is 3), norm,
  1x1 expansion (x2), GELU, 1x1 compression, added to the block's input;
- ``hybrid``: plain encoder; the bottleneck's voxels are tokens for two pre-norm transformer layers with a learned
  positional encoding sized at plan time (``token_grid``: the bottleneck feature-map size of the planned patch;
  resized by interpolation for another input size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from autoseg.errors import ConfigError
from autoseg.networks.blocks import BlockType, ConvNormAct, LayerOps, get_block, register_block

__all__ = [
    "AttentionGate",
    "MultiScaleContext",
    "DenseStage",
    "ConvNeXtBlock",
    "TransformerLayer",
    "TransformerBottleneck",
]

#: Dilations of the multi-scale bottleneck's 3x3 branches (a 1x1 branch runs beside them).
DILATIONS = (1, 2, 4)
#: Channel expansion of a ConvNeXt block's 1x1 convolutions (MedNeXt's smaller variants use 2).
CONVNEXT_EXPANSION = 2
#: Transformer layers of the hybrid's bottleneck.
TRANSFORMER_LAYERS = 2


class AttentionGate(nn.Module):
    """``skip * sigmoid(psi(act(theta(skip) + phi(gate))))``: one attention coefficient per voxel of the skip."""

    def __init__(self, ops: LayerOps, c_skip: int, c_gate: int) -> None:
        super().__init__()
        inter = max(1, c_skip // 2)
        ones = [1] * ops.ndim
        self.theta = ops.conv(c_skip, inter, ones, ones, bias=False)
        self.phi = ops.conv(c_gate, inter, ones, ones, bias=True)
        self.act = nn.ReLU()
        self.psi = ops.conv(inter, 1, ones, ones, bias=True)

    def forward(self, skip: Tensor, gate: Tensor) -> Tensor:
        return skip * torch.sigmoid(self.psi(self.act(self.theta(skip) + self.phi(gate))))


class MultiScaleContext(nn.Module):
    """Parallel 1x1 and dilated 3x3 conv-norm-nonlinearity branches, concatenated, projected to ``channels`` and
    added to the input. Dilations apply only along axes whose kernel is 3 (an anisotropic bottleneck keeps 1)."""

    def __init__(self, ops: LayerOps, channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        ones = [1] * ops.ndim
        branch = max(1, channels // 4)
        self.branches = nn.ModuleList([ConvNormAct(ops, channels, branch, ones, ones)])
        for d in DILATIONS:
            dilation = [d if k > 1 else 1 for k in kernel]
            conv = ops.conv(channels, branch, kernel, ones, dilation=dilation)
            self.branches.append(nn.Sequential(conv, ops.norm_layer(branch), ops.nonlin_layer()))
        self.project = ConvNormAct(ops, branch * len(self.branches), channels, ones, ones, act=False)
        self.act = ops.nonlin_layer()

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(torch.cat([b(x) for b in self.branches], dim=1))
        return self.act(out + x)


class DenseStage(nn.Module):
    """Strided conv-norm-nonlinearity to ``c_out``, ``n`` dense layers of ``c_out // 2`` features, 1x1 transition."""

    def __init__(self, ops: LayerOps, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int], n: int):
        super().__init__()
        ones = [1] * ops.ndim
        growth = max(1, c_out // 2)
        self.entry = ConvNormAct(ops, c_in, c_out, kernel, stride)
        self.layers = nn.ModuleList(ConvNormAct(ops, c_out + i * growth, growth, kernel, ones) for i in range(n))
        self.transition = ConvNormAct(ops, c_out + n * growth, c_out, ones, ones)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.entry(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return self.transition(torch.cat(features, dim=1))


class ConvNeXtBlock(nn.Module):
    """``x + pw2(gelu(pw1(norm(dw(x)))))``: depthwise large-kernel conv, norm, 1x1 expansion, GELU, 1x1."""

    def __init__(self, ops: LayerOps, channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        ones = [1] * ops.ndim
        large = [k + 2 if k > 1 else 1 for k in kernel]
        self.dw = ops.conv(channels, channels, large, ones, groups=channels)
        self.norm = ops.norm_layer(channels)
        self.expand = ops.conv(channels, CONVNEXT_EXPANSION * channels, ones, ones)
        self.act = nn.GELU()
        self.compress = ops.conv(CONVNEXT_EXPANSION * channels, channels, ones, ones)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.compress(self.act(self.expand(self.norm(self.dw(x)))))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: ``x + proj(attention(norm(x)))``, then ``x + mlp(norm(x))`` (GELU, x2 width).

    Attention is :func:`torch.nn.functional.scaled_dot_product_attention`, which runs fused kernels on CPU and
    CUDA (no tokens x tokens matrix is kept for backward).
    """

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class TransformerBottleneck(nn.Module):
    """Transformer layers over the bottleneck voxels as tokens, with a learned positional encoding of
    ``token_grid`` (resized by linear interpolation when the input's bottleneck has another size)."""

    def __init__(self, channels: int, token_grid: Sequence[int], layers: int = TRANSFORMER_LAYERS) -> None:
        super().__init__()
        heads = next(h for h in (8, 4, 2, 1) if (channels % h == 0 and channels // h >= 16) or h == 1)
        self.token_grid = tuple(int(t) for t in token_grid)
        self.position = nn.Parameter(torch.zeros(1, channels, *self.token_grid))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.layers = nn.Sequential(*(TransformerLayer(channels, heads) for _ in range(layers)))

    def forward(self, x: Tensor) -> Tensor:
        grid = tuple(x.shape[2:])
        position: Tensor = self.position
        if grid != self.token_grid:
            mode = "bilinear" if len(grid) == 2 else "trilinear"
            position = F.interpolate(position, size=grid, mode=mode, align_corners=False)
        tokens = (x + position).flatten(2).transpose(1, 2)  # (B, N, C)
        return self.layers(tokens).transpose(1, 2).reshape(x.shape)


def _convnext_stage(ops: LayerOps, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int], n: int):
    layers: list[nn.Module] = []
    if c_in != c_out or any(s != 1 for s in stride):
        layers += [ops.conv(c_in, c_out, stride, stride), ops.norm_layer(c_out)]
    layers += [ConvNeXtBlock(ops, c_out, kernel) for _ in range(n)]
    return nn.Sequential(*layers)


def _multiscale(ops: LayerOps, channels: int, kernel: Sequence[int], grid: Sequence[int] | None) -> nn.Module:
    return MultiScaleContext(ops, channels, kernel)


def _transformer(ops: LayerOps, channels: int, kernel: Sequence[int], grid: Sequence[int] | None) -> nn.Module:
    if grid is None or len(grid) != ops.ndim or math.prod(grid) < 1:
        raise ConfigError(
            f"network.bottleneck_tokens must give the {ops.ndim}D bottleneck size for block 'hybrid' (got {grid}); "
            "plan the network with unet_for_topology or set it to the patch size divided by the total stride"
        )
    return TransformerBottleneck(channels, grid)


_plain = get_block("plain").build_stage
register_block("attention", BlockType(build_stage=_plain, skip_gate=AttentionGate))
register_block("multiscale", BlockType(build_stage=_plain, bottleneck=_multiscale))
register_block("dense", BlockType(build_stage=DenseStage, decoder_convs=1))
register_block("convnext", BlockType(build_stage=_convnext_stage, stem=True, decoder_convs=1))
register_block("hybrid", BlockType(build_stage=_plain, bottleneck=_transformer, needs_tokens=True))
