"""Every registered architecture family: builds on the plan's topology, trains, predicts, round-trips plans.json."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from autoseg.errors import ConfigError
from autoseg.networks import BlockType, build_network, get_block, list_blocks, register_block
from autoseg.networks.families import TransformerBottleneck
from autoseg.networks.losses import build_loss
from autoseg.networks.spec import LossSpec, NetworkSpec
from autoseg.planning.plans import load_plans
from autoseg.planning.topology import pool_and_conv_props, unet_for_topology
from autoseg.serialization import from_jsonable, to_jsonable
from tests.preprocessing.test_plans_fixture import CT_NORM, make_configuration, make_plans

FAMILIES = ("plain", "residual", "attention", "multiscale", "dense", "convnext", "hybrid")
# anisotropic 3D (1x3x3 kernels on the thick axis) and non-square 2D, every axis a different length
CASES = {3: ((3.0, 0.8, 0.7), (4, 12, 16)), 2: ((0.8, 0.7), (12, 20))}


def _spec(family: str, ndim: int) -> tuple[NetworkSpec, tuple[int, ...]]:
    spacing, patch = CASES[ndim]
    topo = pool_and_conv_props(spacing, patch, min_feature_map_size=2)
    return unet_for_topology(topo, 4, block=family, max_features=16), topo.patch_size


def test_every_family_is_registered():
    assert set(FAMILIES) == set(list_blocks())


def test_registry_errors():
    with pytest.raises(ConfigError, match="block 'hybrid' is already registered"):
        register_block("hybrid", BlockType(build_stage=get_block("plain").build_stage))
    with pytest.raises(ConfigError, match="unknown block 'swin'; valid names: attention, convnext, dense, hybrid"):
        get_block("swin")


@pytest.mark.parametrize("ndim", [3, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_and_predicts(family, ndim):
    """A few SGD steps on a trivial task (label = bright voxels) lower the loss; prediction has the input's shape."""
    spec, patch = _spec(family, ndim)
    assert spec.n_stages >= 3 and spec.block == family
    assert (spec.bottleneck_tokens is not None) == (family == "hybrid")
    torch.manual_seed(0)
    net = build_network(spec, in_channels=1, n_outputs=2)
    x = torch.randn(2, 1, *patch)
    label = (x > 0.5).long()
    sizes = spec.stage_sizes(patch)[: spec.n_stages - 1]
    targets = [nn.functional.interpolate(label.float(), size=s, mode="nearest").long() for s in sizes]
    loss_fn = build_loss(LossSpec(), n_outputs=2, deep_supervision_scales=len(targets))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        outputs = net(x)
        assert [tuple(o.shape[2:]) for o in outputs] == [tuple(s) for s in sizes]
        loss = loss_fn(outputs, targets)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    net.eval()
    net.deep_supervision = False
    with torch.no_grad():
        out = net(torch.randn(1, 1, *patch))
    assert tuple(out.shape) == (1, 2, *patch)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_round_trips_plans_json(family, tmp_path):
    configs = []
    for ndim, name in ((3, "3d_fullres"), (2, "2d")):
        spec, patch = _spec(family, ndim)
        c = make_configuration(name, CASES[ndim][0], [CT_NORM])
        configs.append(dataclasses.replace(c, network=spec, patch_size=patch))
    plans = make_plans(configs)
    plans.save(tmp_path / "plans.json")
    loaded = load_plans(tmp_path / "plans.json")
    assert loaded == plans
    raw = json.loads((tmp_path / "plans.json").read_text())["configurations"]["3d_fullres"]["network"]
    assert raw["block"] == family
    assert ("bottleneck_tokens" in raw) == (family == "hybrid")  # left out when unset: older plans unchanged
    spec = loaded.configurations["3d_fullres"].network
    torch.manual_seed(0)
    a = build_network(spec, 1, 5).eval()
    b = build_network(plans.configurations["3d_fullres"].network, 1, 5).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, *loaded.configurations["3d_fullres"].patch_size)
    with torch.no_grad():
        assert torch.equal(a(x)[0], b(x)[0])


def test_older_network_entries_load_with_the_default_family():
    spec, _ = _spec("plain", 3)
    data = to_jsonable(spec)
    del data["block"]
    assert "bottleneck_tokens" not in data
    assert from_jsonable(NetworkSpec, data) == spec


def test_hybrid_needs_its_token_grid_and_resizes_it():
    spec, patch = _spec("hybrid", 2)
    with pytest.raises(ConfigError, match="bottleneck_tokens must give the 2D bottleneck size"):
        build_network(dataclasses.replace(spec, bottleneck_tokens=None), 1, 2)
    net = build_network(spec, 1, 2).eval()
    bottleneck = net.bottleneck
    assert isinstance(bottleneck, TransformerBottleneck)
    assert bottleneck.token_grid == tuple(p // d for p, d in zip(patch, spec.total_stride))
    bigger = tuple(p + d for p, d in zip(patch, spec.total_stride))  # another grid: the encoding is interpolated
    with torch.no_grad():
        assert net(torch.randn(1, 1, *bigger))[0].shape[2:] == bigger
