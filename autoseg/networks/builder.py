"""The one adapter from a plan's :class:`NetworkSpec` to a network."""

from __future__ import annotations

from autoseg.networks.spec import NetworkSpec
from autoseg.networks.unet import UNet

__all__ = ["build_network"]


def build_network(spec: NetworkSpec, in_channels: int, n_outputs: int) -> UNet:
    """Build the U-Net of the architecture family (``spec.block``) that ``spec`` describes.

    Parameters
    ----------
    spec
        The configuration's ``network`` entry.
    in_channels
        Input channels (image modalities, plus previous-stage one-hot channels for a cascade).
    n_outputs
        Output channels: classes including background, or regions.

    Returns
    -------
    torch.nn.Module
        A :class:`~autoseg.networks.unet.UNet` with freshly initialised weights.
    """
    return UNet(
        in_channels,
        n_outputs,
        spec.n_stages,
        spec.features_per_stage,
        spec.kernel_sizes,
        spec.strides,
        spec.n_conv_per_stage,
        spec.n_conv_per_stage_decoder,
        block=spec.block,
        norm=spec.norm,
        nonlin=spec.nonlin,
        deep_supervision=spec.deep_supervision,
        conv_bias=spec.conv_bias,
        bottleneck_tokens=spec.bottleneck_tokens,
    )
