"""Patch sampling, augmentation and the multi-process loader."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import pytest

from autoseg.errors import TrainingError
from autoseg.planning.plans import AugmentationSpec
from autoseg.training.augmentation import build_transforms, deep_supervision_scales, sampling_patch_size
from autoseg.training.loader import BatchLoader, BatchRecipe, CaseData, choose_workers, sample_patch


def _case(seed: int, shape=(9, 21, 25)) -> CaseData:
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.int16)
    label[4, 10:12, 3:5] = 1  # tiny class near a border
    label[2:7, 2:18, 12:24] = 2
    image = rng.normal(size=(2, *shape)).astype(np.float32) + label
    locs = {c: np.argwhere(label == c) for c in (1, 2)}
    return CaseData(image, label, locs)


@dataclass(frozen=True)
class _Source:
    fail_on: str | None = None
    die_on: str | None = None

    def open(self, case_id: str) -> CaseData:
        if case_id == self.fail_on:
            raise ValueError(f"cannot open {case_id}")
        if case_id == self.die_on:
            os.kill(os.getpid(), signal.SIGKILL)
        return _case(int(case_id[-1]))


def _recipe(aug: AugmentationSpec | None, **kw) -> BatchRecipe:
    patch = kw.pop("patch", (8, 16, 16))
    ds = tuple(deep_supervision_scales([(1, 1, 1), (1, 2, 2), (2, 2, 2)], 3))
    base = dict(
        case_ids=("c0", "c1", "c2"),
        patch_size=patch,
        sampling_patch_size=sampling_patch_size(patch, aug) if aug else patch,
        batch_size=3,
        oversample_foreground=0.34,
        augmentation=aug,
        ds_scales=ds,
        seed=7,
    )
    base.update(kw)
    return BatchRecipe(**base)


def test_foreground_patch_contains_the_chosen_class():
    case = _case(0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        image, label = sample_patch(case, (5, 8, 8), True, rng)
        assert image.shape == (2, 5, 8, 8) and label.shape == (1, 5, 8, 8)
        assert label.max() > 0


def _centre(array: np.ndarray, size) -> np.ndarray:
    """The centre crop of ``size`` over the last axes, as the spatial transform takes it."""
    starts = [(n - f) // 2 for n, f in zip(array.shape[-len(size) :], size)]
    return array[(..., *[slice(s, s + f) for s, f in zip(starts, size)])]


def test_final_patches_reach_every_border():
    """Random patches, after the centre crop to the network patch, cover every voxel index of every axis."""
    shape, size, final = (12, 30, 30), (8, 16, 16), (4, 8, 8)
    grids = np.stack(np.meshgrid(*[np.arange(1, n + 1) for n in shape], indexing="ij")).astype(np.float32)
    case = CaseData(grids, np.zeros(shape, np.int16), {})  # channel a holds index + 1 along axis a; padding is 0
    rng = np.random.default_rng(0)
    covered = [set() for _ in shape]
    for _ in range(300):
        crop = _centre(sample_patch(case, size, False, rng, final)[0], final)
        for axis in range(3):
            covered[axis] |= set(np.unique(crop[axis]).astype(int).tolist()) - {0}
    assert covered == [set(range(1, n + 1)) for n in shape]


def test_forced_foreground_at_an_edge_is_in_the_final_patch():
    """Every oversampled patch holds the tiny class in the crop the network gets, even in an image corner, and
    that crop lies inside the image."""
    label = np.zeros((12, 40, 40), np.int16)
    label[5:7, 0:2, 38:40] = 1  # tiny object in an in-plane corner
    case = CaseData(np.ones((1, *label.shape), np.float32), label, {1: np.argwhere(label == 1)})
    size, final = (16, 28, 28), (8, 16, 16)
    rng = np.random.default_rng(0)
    for _ in range(50):
        image, patch_label = sample_patch(case, size, True, rng, final)
        assert (_centre(patch_label, final) == 1).any()
        assert (_centre(image, final) == 1).all()  # inside the image: no padding in what the network sees


def test_patch_larger_than_image_is_padded():
    image = np.ones((1, 3, 5, 7), np.float32)
    case = CaseData(image, np.zeros((3, 5, 7), np.int16), {})
    patch, label = sample_patch(case, (4, 8, 9), False, np.random.default_rng(0))
    assert patch.shape == (1, 4, 8, 9) and label.shape == (1, 4, 8, 9)
    assert patch.sum() == 3 * 5 * 7  # every real voxel kept, the rest is zero padding


def test_2d_patches_from_3d_cases():
    image, label = sample_patch(_case(0), (8, 12), True, np.random.default_rng(1))
    assert image.shape == (2, 8, 12) and label.shape == (1, 8, 12) and label.max() > 0


def test_deep_supervision_scales():
    assert deep_supervision_scales([(1, 1, 1), (1, 2, 2), (2, 2, 2)], 3) == [
        (1.0, 1.0, 1.0),
        (1.0, 0.5, 0.5),
        (0.5, 0.25, 0.25),
    ]


def test_sampling_patch_size_covers_rotation_and_dummy_2d():
    spec = AugmentationSpec(mirror_axes=(0, 1, 2), rotation_deg=30)
    assert all(s >= p for s, p in zip(sampling_patch_size((20, 32, 40), spec), (20, 32, 40)))
    dummy = AugmentationSpec(mirror_axes=(1, 2), dummy_2d=True, rotation_deg=180)
    size = sampling_patch_size((6, 32, 40), dummy)
    assert size[0] == 6 and size[1] > 32


@pytest.mark.parametrize("dummy", [False, True])
def test_augmented_batches_have_plan_shapes_and_valid_labels(dummy):
    aug = AugmentationSpec(mirror_axes=(1, 2) if dummy else (0, 1, 2), dummy_2d=dummy, p_rotation=1.0, p_scale=1.0)
    batch = next(BatchLoader(_Source(), _recipe(aug)))
    assert batch["data"].shape == (3, 2, 8, 16, 16) and batch["data"].dtype == np.float32
    assert [t.shape for t in batch["target"]] == [(3, 1, 8, 16, 16), (3, 1, 8, 8, 8), (3, 1, 4, 4, 4)]
    assert set(np.unique(batch["target"][0])) <= {0, 1, 2}


def test_batches_depend_only_on_seed_and_index():
    aug = AugmentationSpec(mirror_axes=(0, 1, 2), p_rotation=0.5)
    recipe = _recipe(aug)
    with BatchLoader(_Source(), recipe, workers=0) as serial:
        expected = [next(serial) for _ in range(5)]
    with BatchLoader(_Source(), recipe, workers=2) as parallel:
        got = [next(parallel) for _ in range(5)]
    with BatchLoader(_Source(), recipe, workers=2, start=3) as resumed:
        tail = [next(resumed) for _ in range(2)]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a["data"], b["data"])
        np.testing.assert_array_equal(a["target"][0], b["target"][0])
    np.testing.assert_array_equal(expected[3]["data"], tail[0]["data"])
    np.testing.assert_array_equal(expected[4]["target"][1], tail[1]["target"][1])


def test_worker_error_is_reported_with_traceback():
    recipe = _recipe(None, case_ids=("c1", "c9"), batch_size=4)
    with pytest.raises(TrainingError, match="cannot open c9"):
        with BatchLoader(_Source(fail_on="c9"), recipe, workers=1) as loader:
            for _ in range(10):
                next(loader)


def test_dead_worker_is_reported_and_others_are_stopped():
    recipe = _recipe(None, case_ids=("c8",), batch_size=1)
    loader = BatchLoader(_Source(die_on="c8"), recipe, workers=2)
    with pytest.raises(TrainingError, match="SIGKILL"):
        next(loader)
    time.sleep(0.1)
    assert all(not p.is_alive() for p in loader._procs)


def test_close_leaves_no_process_behind():
    loader = BatchLoader(_Source(), _recipe(None), workers=2)
    next(loader)
    procs = list(loader._procs)
    loader.close()
    assert all(not p.is_alive() for p in procs)


def test_choose_workers():
    assert choose_workers(10 * 2**20, cores=2, free_bytes=16 * 2**30) == 1
    assert choose_workers(10 * 2**20, cores=16, free_bytes=16 * 2**30) == 12
    assert choose_workers(2**30, cores=16, free_bytes=8 * 2**30) == 1


def test_transform_pipeline_builds_for_2d():
    spec = AugmentationSpec(mirror_axes=(0, 1), rotation_deg=180)
    t = build_transforms((16, 24), spec)
    out = t(
        data=np.random.default_rng(0).normal(size=(2, 1, 30, 40)).astype(np.float32),
        seg=np.zeros((2, 1, 30, 40), np.float32),
    )
    assert out["data"].shape == (2, 1, 16, 24)
