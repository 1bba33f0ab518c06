"""Tests for autoseg.networks.losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from autoseg.errors import ConfigError, TrainingError
from autoseg.networks.losses import (
    build_loss,
    deep_supervision_weights,
    list_losses,
    loss_defaults,
    register_loss,
)
from autoseg.planning.plans import LossSpec

ALL = ["ce", "dice", "dice_ce", "dice_focal", "dice_topk", "focal", "topk", "tversky"]
SHAPES = {"2d": (7, 11), "3d": (5, 7, 9)}
REGIONS = [[1, 2], [2], [3]]


def _labels(spatial: tuple[int, ...], n_labels: int = 4, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_labels, (batch, 1, *spatial), generator=g)


def _onehot_logits(labels: torch.Tensor, n: int, scale: float = 20.0) -> torch.Tensor:
    """Logits whose softmax is (almost exactly) the one-hot encoding of ``labels``."""
    onehot = F.one_hot(labels[:, 0], n).movedim(-1, 1).float()
    return (2 * onehot - 1) * scale


def _region_logits(labels: torch.Tensor, regions: list[list[int]], scale: float = 20.0) -> torch.Tensor:
    masks = torch.cat([torch.isin(labels, torch.tensor(r)) for r in regions], 1).float()
    return (2 * masks - 1) * scale


def test_registry_lists_every_loss() -> None:
    assert list_losses() == ALL
    assert LossSpec().name in list_losses()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dims", ["2d", "3d"])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_loss_finite_differentiable_and_prefers_truth(name: str, dims: str, batch_dice: bool) -> None:
    labels = _labels(SHAPES[dims])
    loss = build_loss(LossSpec(name, batch_dice), n_outputs=4)
    logits = torch.randn(2, 4, *SHAPES[dims], generator=torch.Generator().manual_seed(1), requires_grad=True)
    value = loss(logits, labels)
    value.backward()
    assert value.ndim == 0 and value.dtype == torch.float32
    assert math.isfinite(value.item())
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    perfect = loss(_onehot_logits(labels, 4), labels).item()
    wrong = loss(_onehot_logits((labels + 1) % 4, 4), labels).item()
    assert perfect < 1e-3
    assert perfect < value.item() < wrong


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_region_losses_prefer_truth(name: str, dims: str) -> None:
    labels = _labels(SHAPES[dims])
    loss = build_loss(LossSpec(name), n_outputs=3, regions=REGIONS)
    logits = torch.randn(2, 3, *SHAPES[dims], generator=torch.Generator().manual_seed(1), requires_grad=True)
    value = loss(logits, labels)
    value.backward()
    assert math.isfinite(value.item()) and torch.isfinite(logits.grad).all()
    perfect = loss(_region_logits(labels, REGIONS), labels).item()
    wrong = loss(-_region_logits(labels, REGIONS), labels).item()
    assert perfect < 1e-3
    assert perfect < value.item() < wrong


def test_region_targets_are_unions_of_label_values() -> None:
    labels = _labels((5, 7, 9))
    logits = torch.randn(2, 3, 5, 7, 9, generator=torch.Generator().manual_seed(2))
    masks = torch.cat([torch.isin(labels, torch.tensor(r)) for r in REGIONS], 1).float()
    ce = build_loss(LossSpec("ce"), n_outputs=3, regions=REGIONS)(logits, labels)
    assert ce.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, masks).item(), rel=1e-6)
    # label 1 belongs to region 0 only: a prediction of "region 0 everywhere label is 1 or 2" is perfect there
    dice = build_loss(LossSpec("dice"), n_outputs=3, regions=REGIONS)(_region_logits(labels, REGIONS), labels)
    assert dice.item() == pytest.approx(0.0, abs=1e-6)


def test_dice_of_perfect_prediction_is_zero_and_of_disjoint_is_one() -> None:
    labels = _labels((5, 7, 9))
    dice = build_loss(LossSpec("dice"), n_outputs=4)
    assert dice(_onehot_logits(labels, 4, scale=50.0), labels).item() == pytest.approx(0.0, abs=1e-6)
    assert dice(_onehot_logits((labels + 1) % 4, 4, scale=50.0), labels).item() == pytest.approx(1.0, abs=1e-6)


# nnU-Net v2 (DC_and_CE_loss / DC_and_BCE_loss with MemoryEfficientSoftDiceLoss, smooth 1e-5) on the input of
# _reference_input, computed once with nnunetv2 in its own environment. nnU-Net's Dice term is -Dice, ours 1 - Dice.
NNUNET_REFERENCE = {
    ("dice_ce", False): 2.4953184127807617,
    ("dice_ce", True): 2.49522066116333,
    ("dice_ce_ignore", False): 2.580821990966797,
    ("dice_ce_ignore", True): 2.5809695720672607,
    ("regions", False): 0.6341654658317566,
    ("regions", True): 0.6340964436531067,
}


def _reference_input() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.sin(torch.arange(2 * 4 * 3 * 5 * 7, dtype=torch.float32) * 0.37).reshape(2, 4, 3, 5, 7) * 3
    labels = (torch.arange(2 * 3 * 5 * 7) * 7 // 3 % 5).reshape(2, 1, 3, 5, 7)
    return logits, labels


@pytest.mark.parametrize("batch_dice", [False, True])
def test_dice_ce_matches_nnunet(batch_dice: bool) -> None:
    logits, labels = _reference_input()
    spec = LossSpec("dice_ce", batch_dice)
    plain = build_loss(spec, n_outputs=4)(logits, labels.clamp_max(3)).item()
    ignore = build_loss(spec, n_outputs=4, ignore_label=4)(logits, labels).item()
    regions = build_loss(spec, n_outputs=3, regions=[[1, 2, 3], [2, 3], [3]])(logits[:, :3], labels.clamp_max(3))
    assert plain - 1 == pytest.approx(NNUNET_REFERENCE[("dice_ce", batch_dice)], abs=1e-5)
    assert ignore - 1 == pytest.approx(NNUNET_REFERENCE[("dice_ce_ignore", batch_dice)], abs=1e-5)
    assert regions.item() - 1 == pytest.approx(NNUNET_REFERENCE[("regions", batch_dice)], abs=1e-5)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("regions", [None, REGIONS])
def test_ignore_label_makes_masked_voxels_irrelevant(name: str, regions: list[list[int]] | None) -> None:
    labels = _labels((5, 7, 9), n_labels=5)  # label 4 is the ignore label
    ignored = labels == 4
    loss = build_loss(LossSpec(name), n_outputs=3 if regions else 4, regions=regions, ignore_label=4)
    logits = torch.randn(2, 3 if regions else 4, 5, 7, 9, generator=torch.Generator().manual_seed(3))
    logits.requires_grad_(True)
    value = loss(logits, labels)
    value.backward()
    assert bool(ignored.any())
    assert (logits.grad * ignored).abs().max().item() == 0.0
    changed = torch.where(ignored, torch.randn_like(logits) * 100, logits.detach())
    assert loss(changed, labels).item() == pytest.approx(value.item(), rel=1e-6)


def test_ignore_label_everywhere_gives_zero_ce_not_nan() -> None:
    labels = torch.full((2, 1, 5, 7, 9), 4)
    value = build_loss(LossSpec("ce"), n_outputs=4, ignore_label=4)(torch.randn(2, 4, 5, 7, 9), labels)
    assert value.item() == 0.0


def test_special_cases_reduce_to_plain_losses() -> None:
    labels = _labels((5, 7, 9))
    logits = torch.randn(2, 4, 5, 7, 9, generator=torch.Generator().manual_seed(4))

    def value(name: str, **options: float) -> float:
        return build_loss(LossSpec(name, options=options), n_outputs=4)(logits, labels).item()

    assert value("ce") == pytest.approx(F.cross_entropy(logits, labels[:, 0]).item(), rel=1e-6)
    assert value("topk", k=100) == pytest.approx(value("ce"), rel=1e-6)
    assert value("focal", gamma=0) == pytest.approx(value("ce"), rel=1e-6)
    assert value("tversky", alpha=0.5, beta=0.5) == pytest.approx(value("dice"), rel=1e-6)
    assert value("dice_ce") == pytest.approx(value("dice") + value("ce"), rel=1e-6)
    assert value("dice_ce", weight_ce=0) == pytest.approx(value("dice"), rel=1e-6)
    assert value("focal", gamma=2) < value("ce")


def test_batch_dice_pools_the_batch() -> None:
    # sample 0 has class 1 only in a few voxels, sample 1 everywhere: per-sample and batch Dice differ
    labels = torch.zeros(2, 1, 5, 7, 9, dtype=torch.long)
    labels[0, 0, 0, 0, :3] = 1
    labels[1] = 1
    logits = torch.zeros(2, 2, 5, 7, 9)
    per_sample = build_loss(LossSpec("dice", False), n_outputs=2)(logits, labels).item()
    pooled = build_loss(LossSpec("dice", True), n_outputs=2)(logits, labels).item()
    tp0, tp1 = 0.5 * 3, 0.5 * 315
    expected_per_sample = 1 - ((2 * tp0) / (0.5 * 315 + 3) + (2 * tp1) / (0.5 * 315 + 315)) / 2
    expected_pooled = 1 - 2 * (tp0 + tp1) / (0.5 * 630 + 318)
    assert per_sample == pytest.approx(expected_per_sample, rel=1e-4)
    assert pooled == pytest.approx(expected_pooled, rel=1e-4)


def test_deep_supervision_weights_follow_nnunet() -> None:
    assert deep_supervision_weights(1) == (1.0,)
    assert deep_supervision_weights(2) == (1.0, 0.0)
    assert deep_supervision_weights(4) == pytest.approx((4 / 7, 2 / 7, 1 / 7, 0.0))
    assert sum(deep_supervision_weights(6)) == pytest.approx(1.0)


def test_deep_supervision_sums_weighted_scales() -> None:
    shapes = [(8, 12, 16), (4, 6, 8), (2, 3, 4)]
    g = torch.Generator().manual_seed(5)
    outputs = [torch.randn(2, 3, *s, generator=g) for s in shapes]
    targets = [_labels(s, n_labels=3, seed=i) for i, s in enumerate(shapes)]
    loss = build_loss(LossSpec("dice_ce"), n_outputs=3, deep_supervision_scales=3)
    single = build_loss(LossSpec("dice_ce"), n_outputs=3)
    expected = (2 / 3) * single(outputs[0], targets[0]) + (1 / 3) * single(outputs[1], targets[1])
    assert loss(outputs, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    outputs[2] = outputs[2] * 100  # the lowest resolution has weight 0
    assert loss(outputs, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    # a single output (deep supervision off, validation) is scored against the full-resolution target
    assert loss(outputs[0], targets).item() == pytest.approx(single(outputs[0], targets[0]).item(), rel=1e-6)


def test_deep_supervision_scale_count_mismatch_raises() -> None:
    loss = build_loss(LossSpec(), n_outputs=3, deep_supervision_scales=3)
    outputs = [torch.randn(1, 3, 4, 6), torch.randn(1, 3, 2, 3)]
    targets = [_labels((4, 6), 3, batch=1), _labels((2, 3), 3, batch=1)]
    with pytest.raises(TrainingError, match="3 deep-supervision scales but got 2 outputs"):
        loss(outputs, targets)
    with pytest.raises(TrainingError, match="one downsampled target per output"):
        loss(outputs, targets[0])


def test_shape_mismatch_names_both_shapes() -> None:
    loss = build_loss(LossSpec(), n_outputs=3)
    with pytest.raises(TrainingError, match=r"target shape \(2, 1, 7, 11\) does not match output shape"):
        loss(torch.randn(2, 3, 11, 7), _labels((7, 11), 3))
    with pytest.raises(TrainingError, match=r"is not \(B, 3, \*spatial\)"):
        loss(torch.randn(2, 4, 7, 11), _labels((7, 11), 3))


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="'dcie' is not a registered loss") as info:
        build_loss(LossSpec("dcie"), n_outputs=3)
    assert all(name in str(info.value) for name in ALL)


def test_unknown_or_bad_options_raise() -> None:
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['gama'\] for loss 'focal'; valid: \['gamma'\]"):
        build_loss(LossSpec("focal", options={"gama": 2.0}), n_outputs=3)
    with pytest.raises(ConfigError, match=r"loss.options.k: 0.0 .* \(0.0, 100.0\]"):
        build_loss(LossSpec("topk", options={"k": 0.0}), n_outputs=3)
    with pytest.raises(ConfigError, match="every weight of loss 'dice_ce' is 0"):
        build_loss(LossSpec("dice_ce", options={"weight_ce": 0.0, "weight_dice": 0.0}), n_outputs=3)
    assert loss_defaults("topk") == {"k": 10.0}


def test_bad_output_layout_raises() -> None:
    with pytest.raises(ConfigError, match="n_outputs=1"):
        build_loss(LossSpec(), n_outputs=1)
    with pytest.raises(ConfigError, match="3 regions need n_outputs=3"):
        build_loss(LossSpec(), n_outputs=4, regions=REGIONS)
    with pytest.raises(ConfigError, match="ignore label must be the highest label value"):
        build_loss(LossSpec(), n_outputs=4, ignore_label=2)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="'dice_ce' is already registered"):
        register_loss("dice_ce")(lambda options: [])
    assert list_losses() == ALL


@pytest.mark.parametrize("name", ALL)
def test_losses_under_bf16_autocast_reduce_in_float32(name: str) -> None:
    labels = _labels((5, 7, 9))
    conv = torch.nn.Conv3d(2, 4, 3, padding=1)
    image = torch.randn(2, 2, 5, 7, 9, generator=torch.Generator().manual_seed(6))
    loss = build_loss(LossSpec(name), n_outputs=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(image)
        value = loss(logits, labels)
    assert logits.dtype == torch.bfloat16
    assert value.dtype == torch.float32
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    reference = loss(logits.detach().float(), labels).item()
    assert value.item() == pytest.approx(reference, rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n_classes=st.integers(2, 4),
    scale=st.floats(0.1, 30.0),
    batch_dice=st.booleans(),
)
def test_losses_are_non_negative_and_dice_at_most_one(
    seed: int, n_classes: int, scale: float, batch_dice: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (2, 1, 3, 4, 5), generator=g)
    logits = torch.randn(2, n_classes, 3, 4, 5, generator=g) * scale
    for name in ALL:
        value = build_loss(LossSpec(name, batch_dice), n_outputs=n_classes)(logits, labels).item()
        assert math.isfinite(value) and value >= -1e-6
    dice = build_loss(LossSpec("dice", batch_dice), n_outputs=n_classes)(logits, labels).item()
    assert dice <= 1.0 + 1e-6


def _batch_dice_rank(rank: int, world: int, init: str, logits: torch.Tensor, labels: torch.Tensor, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no dependence on the host's network setup
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        share = slice(rank * len(logits) // world, (rank + 1) * len(logits) // world)
        mine = logits[share].clone().requires_grad_(True)
        value = build_loss(LossSpec("dice", batch_dice=True), n_outputs=4)(mine, labels[share])
        value.backward()
        with torch.no_grad():  # validation: rank 0 alone, so no collective
            local = build_loss(LossSpec("dice", batch_dice=True), n_outputs=4)(logits[share], labels[share])
        torch.save({"value": value.detach(), "grad": mine.grad, "no_grad": local}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_batch_dice_under_data_parallelism_is_the_whole_batchs(tmp_path):
    """Two gloo ranks with half a batch each compute the Dice of the whole batch, with the matching gradient."""
    import torch.multiprocessing as mp

    logits = torch.randn(4, 4, 5, 7, 9, generator=torch.Generator().manual_seed(3))
    labels = _labels((5, 7, 9), batch=4, seed=4)
    whole = logits.clone().requires_grad_(True)
    expected = build_loss(LossSpec("dice", batch_dice=True), n_outputs=4)(whole, labels)
    expected.backward()
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_batch_dice_rank, args=(2, init, logits, labels, str(tmp_path / "rank")), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank.{r}") for r in range(2)]
    for r, got in enumerate(ranks):
        assert got["value"].item() == pytest.approx(expected.item(), rel=1e-5)
        share_only = build_loss(LossSpec("dice", batch_dice=True), n_outputs=4)(
            logits[2 * r : 2 * r + 2], labels[2 * r : 2 * r + 2]
        )
        assert got["no_grad"].item() == pytest.approx(share_only.item(), rel=1e-5)
        # the backward pass sums over ranks and DDP averages parameter gradients: rank gradient / 2 = whole's share
        share = whole.grad[2 * r : 2 * r + 2]
        torch.testing.assert_close(got["grad"] / 2, share, rtol=1e-4, atol=1e-4 * share.abs().max().item())
