"""`autoseg verify`: every problem reported at once, each naming its file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import SimpleITK as sitk

from autoseg.cli import main
from autoseg.data.io import write_image
from autoseg.data.verify import verify_dataset
from tests.conftest import shared_data, tiny_geometry, write_nnunet_dataset


def test_clean_dataset_is_ok(tiny_dataset):
    report = verify_dataset(tiny_dataset)
    assert report.ok and report.errors == [] and report.label_values == [0, 1, 2]


def test_every_problem_is_reported_with_its_file(tmp_path):
    # NRRD keeps NaN (ITK's NIfTI reader turns NaN into 0, so a NIfTI NaN never reaches autoseg)
    root = write_nnunet_dataset(tmp_path / "d", n_cases=9, channels=("CT", "PET"), ending=".nrrd")
    geo = tiny_geometry()
    images, labels = root / "imagesTr", root / "labelsTr"
    (labels / "case_00.nrrd").unlink()  # missing label
    shutil.copy(labels / "case_01.nrrd", labels / "orphan.nrrd")  # extra label
    write_image(np.zeros((7, 11, 12), np.uint8), tiny_geometry((7, 11, 12)), labels / "case_02.nrrd")  # shape
    write_image(
        np.zeros(geo.shape_zyx, np.uint8), tiny_geometry(spacing=(2.0, 0.7, 0.8)), labels / "case_03.nrrd"
    )  # spacing
    write_image(
        np.zeros(geo.shape_zyx, np.uint8), tiny_geometry(origin=(0.0, 0.0, 0.0)), labels / "case_04.nrrd"
    )  # origin: warning only
    write_image(np.full(geo.shape_zyx, 1.5, np.float32), geo, labels / "case_05.nrrd")  # non-integer
    bad = np.zeros(geo.shape_zyx, np.uint8)
    bad[0, 0, 0] = 7
    write_image(bad, geo, labels / "case_06.nrrd")  # undeclared value
    nan = np.zeros(geo.shape_zyx, np.float32)
    nan[1, 1, 1] = np.nan
    write_image(nan, geo, images / "case_07_0001.nrrd")  # NaN
    (images / "case_08_0000.nrrd").write_bytes(b"")  # empty file
    report = verify_dataset(root)
    text = "\n".join(report.errors)
    assert not report.ok
    assert "labelsTr/case_00.nrrd: missing label file" in text
    assert "orphan.nrrd: label file without images" in text
    assert "case_02.nrrd: shape (z, y, x) (7, 11, 12) differs" in text
    assert "case_03.nrrd: spacing (z, y, x) (2, 0.7, 0.8) mm differs" in text
    assert "case_05.nrrd: label map has non-integer values" in text
    assert "case_06.nrrd: label value(s) [7] are not declared" in text
    assert "case_07_0001.nrrd: 1 NaN/Inf voxel(s)" in text
    assert "case_08_0000.nrrd: file is empty" in text
    assert any("case_04.nrrd: origin" in w for w in report.warnings)
    assert len(report.errors) == 8, text


def test_channel_count_and_label_declaration(tmp_path):
    root = write_nnunet_dataset(tmp_path / "d", n_cases=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "a": 1, "b": 3}
    (root / "dataset.json").write_text(json.dumps(meta))
    geo = tiny_geometry()
    rgb = np.zeros((*geo.shape_zyx[1:], 3), np.uint8)
    image = sitk.GetImageFromArray(np.stack([rgb] * geo.shape_zyx[0]), isVector=True)
    image.SetSpacing((0.8, 0.7, 3.0))
    image.SetOrigin(geo.origin_xyz)
    sitk.WriteImage(image, str(root / "imagesTr" / "case_01_0000.nii.gz"))
    report = verify_dataset(root)
    text = "\n".join(report.errors)
    assert "not consecutive" in text and "dataset.json" in text
    assert "case_01 has 3 channel(s) but the dataset declares 1" in text


def test_cli_verify_exit_status_and_no_traceback(tmp_path, capsys):
    root = write_nnunet_dataset(tmp_path / "d", n_cases=2)
    assert main(["verify", str(root)]) == 0
    (root / "labelsTr" / "case_00.nii.gz").unlink()
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr()
    assert "error:" in out.out and "case_00.nii.gz" in out.out and "Traceback" not in out.err
    assert main(["verify", str(tmp_path / "missing")]) == 1
    assert "dataset folder not found" in capsys.readouterr().err


def test_real_scans_verify(tmp_path):
    report = verify_dataset(shared_data("pyradiomics"))
    assert report.ok, report.errors
    src = shared_data("totalseg_dicom")
    (tmp_path / "ct_image").symlink_to(src / "example_ct_dicom")
    (tmp_path / "ct_label.nii.gz").symlink_to(src / "example_seg_dicom.nii.gz")
    report = verify_dataset(tmp_path)
    # the label is the same grid stored y-flipped: mapped exactly, reported as a warning
    assert any("another orientation" in w for w in report.warnings)
    # TotalSegmentator exports keep the tool's class IDs (0, 1, 5, 6, ...): not consecutive
    assert any("not consecutive" in e for e in report.errors)
