"""Shared by the analysis tests: a tiny trained run whose model has learned something (organ Dice about 0.5 after
50 iterations), and a cheap copy of the session's tiny trained run (a few folds, the dataset cropped around its
centre)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import SimpleITK as sitk

from autoseg.planning.overrides import apply_overrides
from autoseg.planning.plans import load_plans
from autoseg.training.trainer import TrainOptions, train_fold
from tests.training.test_trainer import make_tiny_run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """RUN with fold ``all`` of :func:`~tests.training.test_trainer.tiny_plans` trained for 10 x 5 iterations on 4
    synthetic CT cases (the dataset is RUN/../data)."""
    run = make_tiny_run(tmp_path_factory.mktemp("analysis"), cases=4, epochs=10)
    apply_overrides(load_plans(run), ["training.iterations_per_epoch=5"]).save(run / "plans.json")
    train_fold(run, "3d_fullres", "all", options=TrainOptions(device="cpu", workers=0, deterministic=True))
    return run


def _crop_centre(src: Path, dest: Path) -> None:
    """Write the central half (in y and x) and middle half (in z) of an image; SimpleITK keeps the geometry."""
    image = sitk.ReadImage(str(src))
    x, y, z = image.GetSize()
    dest.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image[x // 4 : 3 * x // 4, y // 4 : 3 * y // 4, z // 4 : 3 * z // 4], str(dest))


@pytest.fixture
def small_run(trained, tmp_path) -> Callable[[str, Sequence[str]], tuple[Path, Path]]:
    """``small_run(config, folds)`` -> (dataset, run): the trained run with only ``folds`` of ``config``, recorded on
    a copy of its dataset whose images and labels are cropped to an eighth of their voxels (fast to predict)."""
    data, run = trained

    def make(config: str, folds: Sequence[str]) -> tuple[Path, Path]:
        small_data, small = tmp_path / "data", tmp_path / "run"
        small_data.mkdir()
        shutil.copy(data / "dataset.json", small_data / "dataset.json")
        for path in data.glob("*/*.nii.gz"):
            _crop_centre(path, small_data / path.parent.name / path.name)
        small.mkdir()
        for name in ("plans.json", "splits.json", "fingerprint.json"):
            shutil.copy(run / name, small / name)
        (small / "run.json").write_text(json.dumps({"format": 1, "data_dir": str(small_data)}))
        for fold in folds:
            shutil.copytree(run / "models" / config / f"fold_{fold}", small / "models" / config / f"fold_{fold}")
        return small_data, small

    return make
