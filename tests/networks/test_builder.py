"""build_network: the adapter from a plan's NetworkSpec."""

from __future__ import annotations

import torch

from autoseg.networks import UNet, build_network
from autoseg.planning.plans import NetworkSpec


def test_build_network_follows_the_spec():
    spec = NetworkSpec(
        n_stages=3,
        features_per_stage=(4, 8, 16),
        kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)),
        n_conv_per_stage=(1, 2, 2),
        n_conv_per_stage_decoder=(1, 1),
        block="residual",
        deep_supervision=False,
    )
    torch.manual_seed(0)
    net = build_network(spec, in_channels=2, n_outputs=3)
    torch.manual_seed(0)
    direct = UNet(
        2,
        3,
        3,
        (4, 8, 16),
        spec.kernel_sizes,
        spec.strides,
        (1, 2, 2),
        (1, 1),
        block="residual",
        deep_supervision=False,
    )
    x = torch.randn(1, 2, 4, 8, 12)
    out = net(x)
    assert tuple(out.shape) == (1, 3, 4, 8, 12)
    assert torch.equal(out, direct(x))
