"""UNet: parameter parity with dynamic_network_architectures, shapes, deep supervision, state dicts, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoseg.errors import ConfigError
from autoseg.networks import UNet
from autoseg.networks.blocks import BasicResidualBlock

ANISO_KERNELS = ((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
ANISO_STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2))


def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# Expected counts: dynamic_network_architectures (the version installed in /work/nnunet-venv) built with the same
# arguments -- PlainConvUNet(..., n_conv_per_stage=...) or ResidualEncoderUNet(..., n_blocks_per_stage=...), with
# conv_op Conv2d/Conv3d, norm_op InstanceNorm/BatchNorm (eps 1e-5, affine), LeakyReLU(inplace), deep supervision --
# by a small script run with /work/nnunet-venv/bin/python; "real plan" rows take arch_kwargs from nnU-Net's own
# plans files in ../shared/reference/nnunet. Each case: args, keyword args, expected parameter count.
K3, K2 = (3, 3, 3), (3, 3)
PARITY = {
    "2d plain": ((1, 3, 4, (16, 32, 64, 128), [K2] * 4, [(1, 1)] + [(2, 2)] * 3, [2] * 4, [2] * 3), {}, 483481),
    "2d plain batch norm, no bias": (
        (1, 3, 4, (16, 32, 64, 128), [K2] * 4, [(1, 1)] + [(2, 2)] * 3, [2] * 4, [2] * 3),
        {"norm": "batch", "conv_bias": False},
        482665,
    ),
    "3d plain anisotropic": ((2, 4, 4, (8, 16, 32, 64), ANISO_KERNELS, ANISO_STRIDES, [2] * 4, [2] * 3), {}, 346196),
    "3d residual anisotropic": (
        (2, 4, 4, (8, 16, 32, 64), ANISO_KERNELS, ANISO_STRIDES, [1, 2, 2, 2], [1] * 3),
        {"block": "residual"},
        605380,
    ),
    "2d residual, capped features (pool-only skips)": (
        (3, 2, 5, (16, 32, 64, 64, 64), [K2] * 5, [(1, 1)] + [(2, 2)] * 4, [1, 2, 2, 3, 3], [1] * 4),
        {"block": "residual"},
        829608,
    ),
    "real plan: Dataset003_Liver 3d_fullres": (
        (1, 3, 6, (32, 64, 128, 256, 320, 320), [K3] * 6, [(1, 1, 1)] + [(2, 2, 2)] * 5, [2] * 6, [2] * 5),
        {},
        31196399,
    ),
    "real plan: Dataset003_Liver 2d": (
        (1, 3, 8, (32, 64, 128, 256, 512, 512, 512, 512), [K2] * 8, [(1, 1)] + [(2, 2)] * 7, [2] * 8, [2] * 7),
        {},
        46326581,
    ),
    "real plan: Dataset001_BrainTumour 3d_fullres (4 channels)": (
        (4, 4, 6, (32, 64, 128, 256, 320, 320), [K3] * 6, [(1, 1, 1)] + [(2, 2, 2)] * 5, [2] * 6, [2] * 5),
        {},
        31199796,
    ),
    "real plan: Dataset002_Heart ResEnc-L 3d_fullres": (
        (
            1,
            2,
            6,
            (32, 64, 128, 256, 320, 320),
            [K3] * 6,
            [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)],
            [1, 3, 4, 6, 6, 6],
            [1] * 5,
        ),
        {"block": "residual"},
        101940170,
    ),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_parameter_count_matches_dynamic_network_architectures(case):
    args, kwargs, expected = PARITY[case]
    with torch.device("meta"):
        net = UNet(*args, **kwargs)
    assert _n_params(net) == expected


@pytest.mark.parametrize("block", ["plain", "residual"])
def test_anisotropic_strides_output_shapes(block):
    net = UNet(2, 3, 4, (4, 8, 8, 8), ANISO_KERNELS, ANISO_STRIDES, [1, 2, 1, 1], [1, 1, 1], block=block)
    out = net(torch.randn(2, 2, 4, 16, 24))
    assert [tuple(o.shape) for o in out] == [(2, 3, 4, 16, 24), (2, 3, 4, 8, 12), (2, 3, 2, 4, 6)]


def test_deep_supervision_switch_returns_full_resolution_logits():
    net = UNet(1, 4, 5, (4, 8, 8, 8, 8), [K2] * 5, [(1, 1)] + [(2, 2)] * 4, [1] * 5, [1] * 4)
    x = torch.randn(3, 1, 32, 48)
    outputs = net(x)
    assert len(outputs) == 4
    assert [tuple(o.shape[2:]) for o in outputs] == [(32, 48), (16, 24), (8, 12), (4, 6)]
    net.deep_supervision = False
    single = net(x)
    assert isinstance(single, torch.Tensor)
    assert torch.equal(single, outputs[0])


def test_state_dict_round_trip_and_loads_without_deep_supervision():
    args = (1, 2, 3, (4, 8, 16), [K3] * 3, ANISO_STRIDES[:3], [1, 1, 1], [1, 1])
    torch.manual_seed(0)
    trained = UNet(*args, block="residual")
    torch.manual_seed(1)
    fresh = UNet(*args, block="residual", deep_supervision=False)
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(1, 1, 4, 8, 12)
    assert torch.equal(fresh(x), trained(x)[0])


@pytest.mark.parametrize(("norm", "nonlin"), [("batch", "relu"), ("instance", "gelu"), ("batch", "leaky_relu")])
def test_norm_and_nonlinearity_variants_run_backward(norm, nonlin):
    net = UNet(1, 2, 3, (4, 8, 8), [K2] * 3, [(1, 1), (2, 2), (2, 2)], [2, 2, 2], [1, 1], norm=norm, nonlin=nonlin)
    out = net(torch.randn(2, 1, 12, 20))
    sum(o.sum() for o in out).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_initialisation_follows_nnunet():
    torch.manual_seed(0)
    net = UNet(1, 2, 3, (32, 64, 64), [K3] * 3, [(1, 1, 1), (2, 2, 2), (2, 2, 2)], [1, 2, 2], [1, 1], block="residual")
    conv = net.encoder[1][1].conv1.conv  # 64 -> 64, 3x3x3: He normal with a=0.01 has std sqrt(2 / 1.0001 / fan_in)
    expected_std = (2 / (1 + 1e-4) / (64 * 27)) ** 0.5
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.02
    assert all(
        m.bias.abs().max().item() == 0 for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.bias is not None
    )
    blocks = [m for m in net.modules() if isinstance(m, BasicResidualBlock)]
    assert len(blocks) == 5
    assert all(b.conv2.norm.weight.abs().max().item() == 0 for b in blocks)


def test_wrong_list_length_names_the_field():
    with pytest.raises(ConfigError, match="n_conv_per_stage_decoder"):
        UNet(1, 2, 3, (4, 8, 8), [K2] * 3, [(1, 1), (2, 2), (2, 2)], [2, 2, 2], [1, 1, 1])


def test_a_single_stage_is_refused():
    with pytest.raises(ConfigError, match="n_stages must be at least 2"):
        UNet(1, 2, 1, (4,), [K2], [(1, 1)], [1], [])


def test_input_not_divisible_by_total_stride_is_refused():
    net = UNet(1, 2, 3, (4, 8, 8), [K2] * 3, [(1, 1), (2, 2), (2, 2)], [1, 1, 1], [1, 1])
    with pytest.raises(ConfigError, match="divisible by the total stride"):
        net(torch.randn(1, 1, 12, 10))


@settings(max_examples=15, deadline=None)
@given(
    ndim=st.sampled_from([2, 3]),
    strides=st.lists(st.lists(st.sampled_from([1, 2]), min_size=3, max_size=3), min_size=1, max_size=3),
    block=st.sampled_from(["plain", "residual"]),
    ds=st.booleans(),
)
def test_output_shapes_follow_the_strides(ndim, strides, block, ds):
    strides = [(1,) * ndim] + [tuple(s[:ndim]) for s in strides]
    n = len(strides)
    total = [1] * ndim
    for s in strides:
        total = [a * b for a, b in zip(total, s)]
    shape = tuple(t * m for t, m in zip(total, (3, 2, 5)[:ndim]))
    net = UNet(2, 3, n, (2,) * n, [(3,) * ndim] * n, strides, [1] * n, [1] * (n - 1), block=block, deep_supervision=ds)
    out = net(torch.randn(1, 2, *shape))
    outs = out if ds else [out]
    assert len(outs) == (n - 1 if ds else 1)
    size = list(shape)
    for i, o in enumerate(outs):
        assert tuple(o.shape) == (1, 3, *size)
        size = [a // b for a, b in zip(size, strides[i + 1])] if i + 1 < n else size
