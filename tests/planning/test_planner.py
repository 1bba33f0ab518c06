"""The default planner on every real fingerprint of fingerprints/: valid, within budget, monotone in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoseg.errors import ConfigError, PlanningError
from autoseg.fingerprint import Fingerprint
from autoseg.planning.memory import estimate_training_memory
from autoseg.planning.planner import make_plans
from autoseg.planning.plans import Plans
from autoseg.serialization import from_jsonable, to_jsonable

CORPUS = sorted(p for p in (Path(__file__).resolve().parents[2] / "fingerprints").glob("*.json"))


def _fingerprint(path: Path) -> Fingerprint | None:
    data = json.loads(path.read_text())
    return from_jsonable(Fingerprint, data["fingerprint"]) if data.get("fingerprint") else None


FINGERPRINTS = {p.stem: fp for p in CORPUS if (fp := _fingerprint(p)) is not None}


def _plan(fp: Fingerprint, device) -> Plans:
    if device == "cpu":
        return make_plans(fp, device="cpu", check_speed=False, cpu_flops=25e9)
    return make_plans(fp, gpu_memory_gb=device)


def test_corpus_is_there():
    assert len(FINGERPRINTS) >= 15


@pytest.mark.parametrize("name", sorted(FINGERPRINTS))
def test_plans_are_valid_within_budget_and_monotone(name):
    fp = FINGERPRINTS[name]
    previous = None
    for device in ("cpu", 8, 24, 80):
        plans = _plan(fp, device)
        assert from_jsonable(Plans, to_jsonable(plans)) == plans
        assert "2d" in plans.configurations
        assert ("3d_fullres" in plans.configurations) == (fp.dim == 3)
        for c in plans.configurations.values():
            assert all(p % s == 0 for p, s in zip(c.patch_size, c.network.total_stride)), (name, device, c.name)
            assert c.batch_size >= 2 and c.why and c.training.epochs >= 1
            assert len(c.normalization) == len(fp.channels)
            estimate = estimate_training_memory(
                c.network,
                len(fp.channels),
                plans.n_outputs,
                c.patch_size,
                c.batch_size,
                precision="fp32" if device == "cpu" else "bf16",
                device="cpu" if device == "cpu" else "cuda",
            ).total_bytes
            assert estimate <= plans.device.memory_bytes, (name, device, c.name)
        if previous is not None and device != 8:
            for key, c in plans.configurations.items():
                if key in previous.configurations:
                    before = previous.configurations[key]
                    assert all(a >= b for a, b in zip(c.patch_size, before.patch_size)), (name, device, key)
                    assert c.batch_size >= before.batch_size, (name, device, key)
        previous = plans if device != "cpu" else None


def test_class_balance_drives_loss_and_oversampling():
    fp = FINGERPRINTS.get("Dataset004_Hippocampus")
    plans = _plan(fp, 8)
    # imported nnU-Net fingerprints carry no class balance: nnU-Net's defaults, with the reason
    c = plans.configurations["3d_fullres"]
    assert (c.loss.name, c.foreground_oversampling) == ("dice_ce", 0.33)
    assert any("class balance unknown" in w for w in c.why)


def test_tiny_class_gets_topk_and_more_oversampling(tmp_path):
    from autoseg.data.synth import make_dataset
    from autoseg.fingerprint import extract_fingerprint

    data = make_dataset(tmp_path / "d", "ct3d", cases=3, test_cases=0)
    fp = extract_fingerprint(data, workers=1)
    c = make_plans(fp, gpu_memory_gb=8).configurations["3d_fullres"]
    assert c.loss.name == "dice_topk" and c.foreground_oversampling == 0.5
    assert any("lesion" in w and "tiny" in w for w in c.why)


def test_time_budget_sets_epochs():
    fp = FINGERPRINTS["Dataset004_Hippocampus"]
    short = make_plans(fp, device="cpu", check_speed=False, cpu_flops=25e9, time_budget_hours=2)
    long = make_plans(fp, device="cpu", check_speed=False, cpu_flops=25e9, time_budget_hours=20)
    for key in short.configurations:  # more time: more training in all (2 h is one model, 20 h cross-validates)
        trained = [p.configurations[key].training.epochs * (5 if p.cross_validation else 1) for p in (short, long)]
        assert trained[1] > trained[0]
        assert any("time budget" in w for w in short.configurations[key].why)
        # each job keeps to its share of the budget: one model gets 2 h less the reserve, 20 h is shared by folds
        limits = [p.configurations[key].training.time_limit_hours for p in (short, long)]
        assert 1.0 < limits[0] < 2.0 and limits[1] < 20 / 5 / len(long.configurations)
    unbounded = make_plans(fp, device="cpu", check_speed=False, cpu_flops=25e9)
    assert all(c.training.time_limit_hours is None for c in unbounded.configurations.values())


def test_small_budgets_go_to_fewer_jobs():
    """Less budget: all configurations x folds, then the primary configuration alone, then one model on all cases."""
    from autoseg.planning.planner import MIN_JOB_ITERATIONS

    fp = FINGERPRINTS["Dataset004_Hippocampus"]
    seen = []
    for hours in (20, 8, 5, 3, 2.5, 2, 1.5, 1, 0.5, 0.2, 0.05, 0.01):
        plans = make_plans(fp, device="cpu", check_speed=False, cpu_flops=25e9, time_budget_hours=hours)
        jobs = len(plans.configurations) * (5 if plans.cross_validation else 1)
        iterations = min(c.training.epochs * c.training.iterations_per_epoch for c in plans.configurations.values())
        seen.append((len(plans.configurations), plans.cross_validation))
        if jobs > 1:  # more than one job only when each trains enough
            assert iterations >= MIN_JOB_ITERATIONS, (hours, jobs, iterations)
        if len(plans.configurations) == 1:
            assert "3d_fullres" in plans.configurations
            assert any("only 3d_fullres is planned" in w for w in plans.why)
        if not plans.cross_validation:
            assert any("one model is trained on all cases" in w for w in plans.why)
    assert seen[0][0] >= 2 and seen[0][1] and seen[-1] == (1, False)
    assert seen == sorted(seen, reverse=True)  # monotone: never more jobs for less time
    assert (1, True) in seen


def test_cross_validation_can_be_forced_either_way():
    """``--cross-validation never`` puts the whole budget into one model of the primary configuration; ``always``
    keeps five folds where the budget rule would have trained one model."""
    fp = FINGERPRINTS["Dataset004_Hippocampus"]
    kwargs = dict(device="cpu", check_speed=False, cpu_flops=25e9)
    auto = make_plans(fp, time_budget_hours=20, **kwargs)
    never = make_plans(fp, time_budget_hours=20, cross_validation=False, **kwargs)
    assert auto.cross_validation and len(auto.configurations) >= 2
    assert not never.cross_validation and list(never.configurations) == ["3d_fullres"]
    assert any("asked for" in w for w in never.why)
    one, five = never.configurations["3d_fullres"].training, auto.configurations["3d_fullres"].training
    assert one.epochs > 4 * five.epochs  # one job instead of configurations x 5 folds
    tiny = make_plans(fp, time_budget_hours=0.01, **kwargs)
    forced = make_plans(fp, time_budget_hours=0.01, cross_validation=True, **kwargs)
    assert not tiny.cross_validation and forced.cross_validation
    assert make_plans(fp, preset="nnunet", cross_validation=False).cross_validation is False


def test_presets_and_overrides():
    fp = FINGERPRINTS["Dataset004_Hippocampus"]
    plans = make_plans(fp, preset="nnunet", overrides=["training.epochs=50", "3d_fullres.batch_size=4"])
    assert plans.planner.startswith("nnunet") or "Planner" in plans.planner
    assert plans.configurations["3d_fullres"].batch_size == 4
    assert {c.training.epochs for c in plans.configurations.values()} == {50}
    with pytest.raises(PlanningError, match="unknown preset"):
        make_plans(fp, preset="nope")
    with pytest.raises(ConfigError, match="valid keys"):
        make_plans(fp, preset="nnunet", overrides=["training.epoch=5"])


def test_fragmented_large_structure_is_not_tiny(tmp_path):
    """A membrane-like grid (one large connected network, ~20% of each image) plus many small fragments where the
    image border cuts it: the plain median object is a small fragment, but most voxels lie in the network, so the
    class is not "tiny" (no TopK loss, nnU-Net's oversampling). The synthetic lesion (truly small blobs) stays tiny."""
    import numpy as np
    from PIL import Image

    from autoseg.fingerprint import extract_fingerprint

    rng = np.random.default_rng(0)
    for i in range(4):
        label = np.zeros((128, 128), np.uint8)
        label[::16, :] = 1
        label[:, ::16] = 1
        label[2:126:16, 2:126:16] = 1  # two pixels away from the grid: small fragments outnumber the network
        label[8:120:16, 8:120:16] = 1
        image = (rng.normal(120, 20, label.shape) - 60 * label).clip(0, 255).astype(np.uint8)
        for folder, array in (("images", image), ("labels", label)):
            (tmp_path / "d" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(tmp_path / "d" / folder / f"c{i}.png")
    fp = extract_fingerprint(tmp_path / "d", workers=1)
    (membrane,) = fp.classes
    assert membrane.median_object_volume_mm3 == 1.0  # the fragments win the plain median
    assert membrane.typical_object_volume_mm3 > 1000  # ... but not the voxel-weighted one
    assert 0.1 < membrane.image_fraction < 0.3
    c = make_plans(fp, device="cpu", check_speed=False, cpu_flops=25e9).configurations["2d"]
    assert (c.loss.name, c.foreground_oversampling) == ("dice_ce", 0.33), c.why
    assert not any("tiny" in w for w in c.why)


def test_weighted_median_object_volume():
    import numpy as np

    from autoseg.fingerprint import _weighted_median

    assert _weighted_median(np.array([1.0] * 99 + [1000.0])) == 1000.0  # 91% of the voxels are in the big one
    assert _weighted_median(np.array([5.0, 5.0, 5.0])) == 5.0
    assert _weighted_median(np.array([1.0, 2.0, 3.0, 4.0])) == 3.0  # 6 of 10 voxels are in objects >= 3


def test_augmentation_runs_on_the_gpu_for_a_cuda_plan():
    """On for a GPU plan, off for a CPU plan and in the nnU-Net presets (as nnU-Net), each with its reason; --set
    overrides."""
    fp = FINGERPRINTS["Dataset004_Hippocampus"]
    for c in _plan(fp, 24).configurations.values():
        assert c.augmentation.device == "gpu" and any("augmentation on the GPU" in w for w in c.why)
    for plans in (_plan(fp, "cpu"), make_plans(fp, preset="nnunet")):
        for c in plans.configurations.values():
            assert c.augmentation.device == "cpu" and any("CPU data loader" in w for w in c.why)
    preset = make_plans(fp, preset="nnunet", overrides=["augmentation.device=gpu"])
    assert {c.augmentation.device for c in preset.configurations.values()} == {"gpu"}
    forced = make_plans(fp, gpu_memory_gb=24, overrides=["augmentation.device=cpu"])
    assert {c.augmentation.device for c in forced.configurations.values()} == {"cpu"}
    assert from_jsonable(Plans, to_jsonable(forced)) == forced
    with pytest.raises(ConfigError, match="augmentation.device 'tpu' unknown; choose cpu or gpu"):
        make_plans(fp, gpu_memory_gb=24, overrides=["augmentation.device=tpu"])
