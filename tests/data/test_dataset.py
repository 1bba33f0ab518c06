"""Dataset discovery for every supported layout."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.data.dataset import discover, load_case, scan
from autoseg.data.io import write_image
from autoseg.data.verify import verify_dataset
from autoseg.errors import DatasetError
from tests.conftest import shared_data, tiny_geometry, write_nnunet_dataset
from tests.data.colour import SHAPE_YX, colour_case, write_colour_dataset, write_png


def test_nnunet_layout(tmp_path):
    root = write_nnunet_dataset(tmp_path / "d", n_cases=3, channels=("T1", "T2"))
    spec = discover(root)
    assert spec.layout == "nnunet" and spec.channels == ("T1", "T2")
    assert [c.id for c in spec.cases] == ["case_00", "case_01", "case_02"]
    assert spec.cases[0].images[1].name == "case_00_0001.nii.gz"
    assert spec.label_values == (0, 1, 2) and spec.foreground_values == (1, 2)
    image, label, geo = load_case(spec, spec.cases[0])
    assert (
        image.shape == (2, 7, 11, 13)
        and label.shape == (7, 11, 13)
        and geo.spacing_zyx == pytest.approx((3.0, 0.7, 0.8))
    )


def test_nnunet_regions_ignore_and_test_images(tmp_path):
    root = write_nnunet_dataset(tmp_path / "d", n_cases=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "whole": [1, 2], "core": [2], "ignore": 3}
    meta["regions_class_order"] = [1, 2]
    (root / "dataset.json").write_text(json.dumps(meta))
    shutil.copytree(root / "imagesTr", root / "imagesTs")
    spec = discover(root)
    assert spec.regions == {"whole": (1, 2), "core": (2,)}
    assert spec.ignore_label == 3 and spec.label_values == (0, 1, 2)
    assert spec.region_class_order == (1, 2)
    assert len(spec.test_cases) == 2 and spec.test_cases[0].label is None


def test_nnunet_explicit_dataset_dict(tmp_path):
    root = write_nnunet_dataset(tmp_path / "d", n_cases=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["dataset"] = {"only": {"images": ["imagesTr/case_01_0000.nii.gz"], "label": "labelsTr/case_01.nii.gz"}}
    meta.pop("numTraining")
    (root / "dataset.json").write_text(json.dumps(meta))
    spec = discover(root)
    assert [c.id for c in spec.cases] == ["only"]
    assert spec.cases[0].images[0] == root / "imagesTr" / "case_01_0000.nii.gz"


def test_msd_layout_with_4d_images(tmp_path):
    geo = tiny_geometry()
    for i in range(2):
        vol = np.random.default_rng(i).normal(size=(2, *geo.shape_zyx)).astype(np.float32)
        image = sitk.JoinSeries([sitk.GetImageFromArray(v) for v in vol])
        image.SetSpacing((0.8, 0.7, 3.0, 1.0))
        (tmp_path / "imagesTr").mkdir(exist_ok=True)
        sitk.WriteImage(image, str(tmp_path / "imagesTr" / f"p{i}.nii.gz"))
        write_image(np.zeros(geo.shape_zyx, np.uint8), geo, tmp_path / "labelsTr" / f"p{i}.nii.gz")
    meta = {
        "name": "msd",
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "tumour"},
        "training": [{"image": f"./imagesTr/p{i}.nii.gz", "label": f"./labelsTr/p{i}.nii.gz"} for i in range(2)],
        "test": [],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    spec = discover(tmp_path)
    assert spec.layout == "msd" and spec.channels == ("FLAIR", "T1w")
    assert spec.labels == {"background": 0, "tumour": 1}
    image, label, _ = load_case(spec, spec.cases[1])
    assert image.shape == (2, 7, 11, 13) and label.shape == (7, 11, 13)


def test_plain_pairs_and_folders(tmp_path):
    geo = tiny_geometry()
    label = np.zeros(geo.shape_zyx, np.uint8)
    label[1:3, 2:4, 3:5] = 2
    for layout in ("pairs", "folders"):
        root = tmp_path / layout
        for cid in ("a", "b"):
            img = np.full(geo.shape_zyx, -1000.0, np.float32)
            if layout == "pairs":
                write_image(img, geo, root / f"{cid}_image.nrrd")
                write_image(label, geo, root / f"{cid}_label.nrrd")
            else:
                write_image(img, geo, root / "images" / f"{cid}.nii.gz")
                write_image(label, geo, root / "labels" / f"{cid}.nii.gz")
        spec = discover(root)
        assert spec.layout == layout and [c.id for c in spec.cases] == ["a", "b"]
        assert spec.channels == ("CT",)  # air at -1000 HU
        assert spec.labels == {"background": 0, "label_2": 2}
        assert any("inferred" in n for n in spec.notes)


def test_missing_and_extra_files_are_listed(tmp_path):
    root = write_nnunet_dataset(tmp_path / "d", n_cases=3, channels=("A", "B"))
    (root / "labelsTr" / "case_01.nii.gz").unlink()
    (root / "imagesTr" / "case_02_0001.nii.gz").unlink()
    shutil.copy(root / "labelsTr" / "case_00.nii.gz", root / "labelsTr" / "stray.nii.gz")
    spec, problems = scan(root)
    text = "\n".join(problems)
    assert "case_01.nii.gz: missing label file" in text
    assert "missing channel file(s) case_02_0001.nii.gz" in text
    assert "stray.nii.gz: label file without images" in text
    with pytest.raises(DatasetError, match="missing label"):
        discover(root)


def test_no_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no dataset found"):
        discover(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        discover(tmp_path / "nope")


def test_real_pyradiomics_pairs_discovered():
    root = shared_data("pyradiomics")
    spec = discover(root)
    assert spec.layout == "pairs"
    assert [c.id for c in spec.cases] == ["brain1", "brain2", "breast1", "lung1", "lung2"]
    image, label, geo = load_case(spec, spec.cases[0])
    assert image.shape[1:] == label.shape == (25, 256, 256)
    assert geo.spacing_zyx == pytest.approx((6.5, 0.78125, 0.78125))


def test_real_dicom_series_as_pair(tmp_path):
    src = shared_data("totalseg_dicom")
    (tmp_path / "ct_image").symlink_to(src / "example_ct_dicom")
    (tmp_path / "ct_label.nii.gz").symlink_to(src / "example_seg_dicom.nii.gz")
    spec = discover(tmp_path)
    assert spec.cases[0].id == "ct" and spec.file_ending == ".nii.gz"
    image, label, geo = load_case(spec, spec.cases[0])
    assert label.shape == (20, 512, 512) and geo.direction_xyz[4] == 1.0


def test_plain_folder_of_colour_pngs_is_rgb_and_planned_as_such(tmp_path):
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.planning.planner import make_plans

    rng = np.random.default_rng(0)
    for cid in ("a", "b", "c"):
        label = np.zeros((24, 28), np.uint8)
        label[5:15, 6:20] = 1
        rgb = rng.integers(0, 120, (24, 28, 3)).astype(np.uint8)
        rgb[label == 1] += 100
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "labels").mkdir(exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "images" / f"{cid}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(tmp_path / "labels" / f"{cid}.png"))
    spec = discover(tmp_path)
    assert spec.channels == ("R", "G", "B")
    fp = extract_fingerprint(tmp_path, tmp_path / "run" / "fingerprint.json", workers=1)
    assert [c.normalization_hint for c in fp.channels] == ["rgb"] * 3
    plans = make_plans(fp, device="cpu", check_speed=False, cpu_flops=5e7)
    assert [n.scheme for n in plans.configurations["2d"].normalization] == ["rgb"] * 3


@pytest.mark.parametrize("layout", ["folders", "pairs", "nnunet"])
def test_one_rgb_png_per_case_is_three_channels_in_every_layout(tmp_path, layout):
    # regression: an nnU-Net layout with channel_names R, G, B and one <case>_0000.png holding RGB (what nnU-Net's
    # NaturalImage2DIO reads) failed with "missing channel file(s) <case>_0001.png, <case>_0002.png"
    root = write_colour_dataset(tmp_path / layout, layout)
    spec = discover(root)
    assert spec.channels == ("R", "G", "B") and len(spec.cases) == 3
    assert all(len(case.images) == 1 for case in spec.cases)
    image, label, geometry = load_case(spec, spec.cases[1])
    pixels, expected = colour_case(1)
    assert image.shape == (3, 1, *SHAPE_YX) and geometry.is_2d
    np.testing.assert_array_equal(image[:, 0], np.moveaxis(pixels, -1, 0))
    np.testing.assert_array_equal(label[0], expected)
    report = verify_dataset(root, workers=1)
    assert report.ok, report.errors
    assert report.label_values == [0, 1]
    from autoseg.fingerprint import extract_fingerprint

    fingerprint = extract_fingerprint(root, tmp_path / "run" / "fingerprint.json", workers=1)
    assert [c.normalization_hint for c in fingerprint.channels] == ["rgb"] * 3


def test_rgb_test_images_of_an_nnunet_layout_are_found(tmp_path):
    root = write_colour_dataset(tmp_path / "d", "nnunet", n_cases=2)
    write_png(colour_case(5)[0], root / "imagesTs" / "new_0000.png")
    spec = discover(root)
    assert [(c.id, [p.name for p in c.images]) for c in spec.test_cases] == [("new", ["new_0000.png"])]


def test_wrong_channel_count_in_one_file_names_the_file_and_the_counts(tmp_path):
    root = write_colour_dataset(tmp_path / "d", "nnunet", n_cases=3)
    rgba = write_png(colour_case(1, components=4)[0], root / "imagesTr" / "case_01_0000.png")
    grey = write_png(colour_case(2)[1], root / "imagesTr" / "case_02_0000.png")
    spec, problems = scan(root)
    text = "\n".join(problems)
    assert [c.id for c in spec.cases] == ["case_00"]
    assert f"{rgba} holds 4 channel(s), but dataset.json declares 3 channel(s) (R, G, B)" in text
    assert "save the image as RGB" in text
    assert "case_02: missing channel file(s) case_02_0001.png, case_02_0002.png" in text and grey.exists()
    with pytest.raises(DatasetError, match="case_01_0000.png holds 4"):
        discover(root)


def test_rgb_file_where_two_channels_are_declared_is_an_error(tmp_path):
    root = write_colour_dataset(tmp_path / "d", "nnunet", n_cases=1)
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "R", "1": "G"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"case_00_0000.png holds 3 channel\(s\), but dataset.json declares 2"):
        discover(root)
