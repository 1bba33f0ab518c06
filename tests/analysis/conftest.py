"""A cheap copy of the session's tiny trained run: a few folds, and the dataset cropped around its centre."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import SimpleITK as sitk


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
