"""Memory model: the analytic walk against autograd's saved tensors, real parameter counts and FLOPs, and the
estimate against measured peaks of real training steps on the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoseg.errors import ConfigError, PlanningError
from autoseg.networks import build_network
from autoseg.networks.losses import build_loss
from autoseg.networks.spec import LossSpec
from autoseg.planning import memory
from autoseg.planning.memory import estimate_flops, estimate_training_memory, measure_training_memory
from autoseg.planning.plans import NetworkSpec


def spec3d(block="plain", feats=(8, 16, 32, 32), **kw) -> NetworkSpec:
    n = len(feats)
    return NetworkSpec(
        n,
        feats,
        ((1, 3, 3),) + ((3, 3, 3),) * (n - 1),
        ((1, 1, 1), (1, 2, 2)) + ((2, 2, 2),) * (n - 2),
        (2,) * n if block == "plain" else (1,) + (2,) * (n - 1),
        (2 if block == "plain" else 1,) * (n - 1),
        block=block,
        **kw,
    )


def spec2d(block="plain", feats=(8, 16, 32, 64, 64), **kw) -> NetworkSpec:
    n = len(feats)
    convs = (2,) * n if block == "plain" else (1,) + (2,) * (n - 1)
    return NetworkSpec(
        n, feats, ((3, 3),) * n, ((1, 1),) + ((2, 2),) * (n - 1), convs, (1,) * (n - 1), block=block, **kw
    )


def _targets(spec, patch, batch, n_out):
    sizes = [tuple(patch)]
    for s in spec.strides[1:]:
        sizes.append(tuple(a // b for a, b in zip(sizes[-1], s)))
    return [torch.randint(0, n_out, (batch, 1, *sz)) for sz in sizes[: len(sizes) - 1]]


def _saved_bytes(spec, c_in, n_out, patch, batch):
    """Bytes autograd saves for backward (distinct storages, parameters and inputs excluded) + the logits."""
    torch.manual_seed(0)
    net = build_network(spec, c_in, n_out)
    x, targets = torch.randn(batch, c_in, *patch), _targets(spec, patch, batch, n_out)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = net(x)
        build_loss(LossSpec(), n_outputs=n_out, deep_supervision_scales=len(targets))(outputs, targets)
    exclude = {t.untyped_storage().data_ptr() for t in [*net.parameters(), x, *targets]}
    return sum(n for p, n in seen.items() if p not in exclude) + sum(o.untyped_storage().nbytes() for o in outputs)


@pytest.mark.parametrize(
    "spec",
    [spec3d(), spec3d("residual"), spec3d(nonlin="gelu"), spec3d("residual", nonlin="gelu"), spec3d(norm="batch")],
    ids=["plain", "residual", "gelu", "residual-gelu", "batchnorm"],
)
def test_walk_counts_exactly_what_autograd_saves(spec):
    patch, batch = (4, 16, 24), 2
    walk = memory._walk(spec, 2, 3, patch)
    expected = sum(batch * 4 * (layer.saved + layer.saved_fp32) for layer in walk.layers) + batch * 4 * walk.held
    # within 8 KiB of 1.8 MB: scalars of the real Dice + CE loss, batch-norm statistics
    assert abs(_saved_bytes(spec, 2, 3, patch, batch) - expected) < 8192


@settings(max_examples=20, deadline=None)
@given(
    block=st.sampled_from(["plain", "residual"]),
    norm=st.sampled_from(["instance", "batch"]),
    feats=st.lists(st.integers(1, 12), min_size=2, max_size=5),
    c_in=st.integers(1, 4),
    n_out=st.integers(2, 5),
    bias=st.booleans(),
)
def test_walk_counts_the_real_parameters(block, norm, feats, c_in, n_out, bias):
    spec = dataclasses.replace(spec3d(block, tuple(feats)), norm=norm, conv_bias=bias)
    with torch.device("meta"):
        net = build_network(spec, c_in, n_out)
    walk = memory._walk(spec, c_in, n_out, (4, 16, 16))
    assert sum(layer.params for layer in walk.layers) == sum(p.numel() for p in net.parameters())


def test_flops_equal_six_times_the_convolution_multiply_adds():
    spec, patch = spec3d("residual"), (4, 16, 24)
    net, macs = build_network(spec, 2, 3), []

    def hook(module, inputs, output):
        k = module.weight[0, 0].numel()
        if isinstance(module, torch.nn.ConvTranspose3d):
            macs.append(inputs[0].numel() * module.out_channels * k)
        else:
            macs.append(output.numel() * module.in_channels * k)

    for m in net.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            m.register_forward_hook(hook)
    net(torch.randn(2, 2, *patch))
    assert estimate_flops(spec, 2, 3, patch, 2) == 6 * sum(macs)


# (spec, in_channels, n_outputs, patch, batch): 2D and 3D, plain and residual, batch 1 (PyTorch's native im2col
# convolution on CPU) and larger; each measurement well under two seconds
PLANS = {
    "3d plain b2": (spec3d(feats=(8, 16, 32, 64)), 1, 3, (8, 32, 48), 2),
    "3d residual b2": (spec3d("residual", feats=(8, 16, 32, 64)), 2, 3, (8, 32, 48), 2),
    "3d plain b1": (spec3d(feats=(8, 16, 32, 64)), 1, 3, (8, 32, 48), 1),
    "3d residual gelu b1": (spec3d("residual", nonlin="gelu"), 1, 2, (8, 24, 32), 1),
    "2d plain b4": (spec2d(), 1, 4, (64, 96), 4),
    "2d residual b3": (spec2d("residual"), 3, 2, (96, 64), 3),
    "2d plain batchnorm relu b2": (spec2d(norm="batch", nonlin="relu"), 1, 3, (96, 128), 2),
    "3d no deep supervision b2": (spec3d(deep_supervision=False), 1, 3, (8, 32, 32), 2),
}


@pytest.mark.parametrize("plan", list(PLANS))
def test_estimate_within_25_percent_of_measured_peak(plan):
    spec, c_in, n_out, patch, batch = PLANS[plan]
    measured = measure_training_memory(spec, c_in, n_out, patch, batch)
    estimate = estimate_training_memory(spec, c_in, n_out, patch, batch)
    assert 0.75 <= estimate.total_bytes / measured <= 1.25


@settings(max_examples=25, deadline=None)
@given(
    spec=st.sampled_from([spec3d(), spec3d("residual"), spec3d(nonlin="gelu")]),
    batch=st.integers(1, 6),
    grow=st.integers(0, 2),
    factor=st.integers(1, 3),
    precision=st.sampled_from(["fp32", "bf16"]),
    device=st.sampled_from(["cpu", "cuda"]),
)
def test_estimate_is_monotone_in_batch_and_patch(spec, batch, grow, factor, precision, device):
    patch = [4, 8, 8]
    bigger = list(patch)
    bigger[grow] *= 1 + factor

    def total(p, b):
        return estimate_training_memory(spec, 1, 3, p, b, precision=precision, device=device).total_bytes

    assert total(patch, batch + 1) > total(patch, batch)
    assert total(bigger, batch) > total(patch, batch)


def test_breakdown_sums_to_total_and_mixed_precision_halves_activations():
    spec, args = spec3d(feats=(16, 32, 64, 64)), (1, 3, (16, 64, 64), 2)
    fp32 = estimate_training_memory(spec, *args)
    bf16 = estimate_training_memory(spec, *args, precision="bf16")
    cuda = estimate_training_memory(spec, *args, precision="bf16", device="cuda")
    for e in (fp32, bf16, cuda):
        parts = e.parameters + e.gradients + e.optimizer_state + e.activations + e.inputs + e.workspace
        assert parts == e.total_bytes
    assert bf16.parameters == fp32.parameters  # fp32 master weights
    assert 0.45 < bf16.activations / fp32.activations < 0.6  # the loss stays fp32
    assert cuda.workspace >= memory.CUDNN_WORKSPACE_BYTES


def test_bad_arguments_raise_planning_errors():
    with pytest.raises(PlanningError, match="precision"):
        estimate_training_memory(spec3d(), 1, 2, (4, 8, 8), 1, precision="fp8")
    with pytest.raises(ConfigError, match="unknown block 'unet3000'; valid names: attention"):
        estimate_training_memory(dataclasses.replace(spec3d(), block="unet3000"), 1, 2, (4, 8, 8), 1)
    with pytest.raises(PlanningError, match="axes"):
        estimate_training_memory(spec3d(), 1, 2, (8, 8), 1)
