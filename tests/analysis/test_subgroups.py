"""Subgroups: quartile groups, the permutation test, the command with metadata and from image properties."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.analysis.common import analysis_cases
from autoseg.analysis.subgroups import compare_groups, group_difference_test, quartile_groups
from autoseg.cli import main
from autoseg.data.io import read_scanner_fields
from autoseg.errors import DatasetError


def test_permutation_test_detects_a_planted_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    planted = [rng.normal(0.8, 0.05, 12), rng.normal(0.65, 0.05, 12)]
    assert group_difference_test(planted, n_resamples=2000)[1] < 0.01
    null = [rng.normal(0.7, 0.05, 12), rng.normal(0.7, 0.05, 12), rng.normal(0.7, 0.05, 12)]
    assert group_difference_test(null, n_resamples=2000)[1] > 0.05


def test_compare_groups_names_the_worst_group_with_interval():
    dice = {f"c{i}": 0.9 - 0.3 * (i % 2) + 0.01 * i for i in range(10)}
    groups = {f"c{i}": "odd" if i % 2 else "even" for i in range(10)}
    result = compare_groups(dice, groups, n_resamples=2000)
    worst = result["worst_vs_rest"]
    assert worst["group"] == "odd" and worst["ci_low"] <= worst["difference"] <= worst["ci_high"] < 0
    assert result["p_value"] < 0.05 and result["groups"]["odd"]["n"] == 5


def test_quartile_groups():
    groups = quartile_groups({f"c{i}": float(v) for i, v in enumerate([5, 1, 7, 3, 2, 8, 6, 4])})
    assert groups["c1"] == groups["c4"] != groups["c0"] and len(set(groups.values())) == 4


def test_scanner_fields_from_a_nifti_description(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16))
    image.SetMetaData("ITK_FileNotes", "Siemens Prisma")  # written as the NIfTI descrip field
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"))
    assert read_scanner_fields(tmp_path / "a.nii.gz") == {"description": "Siemens Prisma"}


def test_analyze_subgroups_with_metadata_and_from_image_properties(small_run, tmp_path):
    _, copy = small_run("3d_fullres", ("0", "1", "2", "3"))
    cases = json.loads((copy / "splits.json").read_text())
    ids = sorted(c for fold in cases["folds"][:4] for c in fold["val"])
    csv = tmp_path / "cases.csv"
    csv.write_text("case,site\n" + "".join(f"{c},{'A' if i % 2 else 'B'}\n" for i, c in enumerate(ids)))
    args = ["analyze", "subgroups", str(copy), "-c", "3d_fullres", "--resamples", "500"]
    assert main([*args, "--metadata", str(csv), "--by", "site"]) == 0
    report = json.loads((copy / "analysis" / "subgroups.json").read_text())
    assert set(report["analyses"]["site"]["groups"]) == {"A", "B"} and report["n_cases"] == len(ids)
    assert (copy / "analysis" / "subgroups.png").stat().st_size > 0
    assert main(args) == 0
    report = json.loads((copy / "analysis" / "subgroups.json").read_text())
    assert {"spacing_mm", "size_voxels", "intensity_range"} <= set(report["analyses"])


def test_a_test_folder_pairs_each_image_with_its_label(small_run, tmp_path):
    data, run = small_run("2d", ("0",))
    cases = analysis_cases(run, "2d", data / "imagesTs", data / "labelsTs")
    assert [(c.id, c.fold, c.label.name) for c in cases] == [
        ("case_005", None, "case_005.nii.gz"),
        ("case_006", None, "case_006.nii.gz"),
    ]
    (tmp_path / "no_labels").mkdir()
    with pytest.raises(DatasetError, match="case_005"):
        analysis_cases(run, "2d", data / "imagesTs", tmp_path / "no_labels")
