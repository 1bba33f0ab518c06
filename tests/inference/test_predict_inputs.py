"""Which cases ``autoseg predict`` finds in its input: channel files, multi-channel files, numbered names."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.data.io import write_image
from autoseg.errors import InferenceError
from autoseg.inference.predict import collect_inputs
from tests.conftest import tiny_geometry
from tests.data.colour import colour_case, write_colour_dataset, write_png


def _found(path, n_channels):
    return [(case.id, [p.name for p in case.images], ending) for case, ending in collect_inputs(path, n_channels)]


def test_plain_folder_of_rgb_pngs_for_a_three_channel_model(tmp_path):
    # regression: "case X lacks channel file(s) X_0001.png, X_0002.png; the model expects 3 channel(s)" for the
    # very images/ folder `autoseg run` trained from
    root = write_colour_dataset(tmp_path / "d", "folders")
    assert _found(root / "images", 3) == [(f"case_{i:02d}", [f"case_{i:02d}.png"], ".png") for i in range(3)]
    assert _found(root / "images" / "case_01.png", 3) == [("case_01", ["case_01.png"], ".png")]


def test_nnunet_named_rgb_files_keep_the_case_name(tmp_path):
    root = write_colour_dataset(tmp_path / "d", "nnunet")
    assert _found(root / "imagesTr", 3)[0] == ("case_00", ["case_00_0000.png"], ".png")
    assert _found(root / "imagesTr" / "case_02_0000.png", 3) == [("case_02", ["case_02_0000.png"], ".png")]


def test_numbered_rgb_names_are_cases_not_channels(tmp_path):
    for i in range(1, 6):  # img_0001 .. img_0005: five cases of three channels, not one case of five
        write_png(colour_case(i)[0], tmp_path / f"img_{i:04d}.png")
    assert [case_id for case_id, _, _ in _found(tmp_path, 3)] == [f"img_{i:04d}" for i in range(1, 6)]
    assert _found(tmp_path / "img_0004.png", 3) == [("img_0004", ["img_0004.png"], ".png")]


def test_numbered_grey_names_are_cases_for_a_one_channel_model(tmp_path):
    for i in range(4):  # isbi_0000 .. isbi_0003: four cases, not case isbi (before: three silently dropped)
        write_png(colour_case(i)[1] * 200, tmp_path / f"isbi_{i:04d}.png")
    assert [case_id for case_id, _, _ in _found(tmp_path, 1)] == [f"isbi_{i:04d}" for i in range(4)]


def test_separate_channel_files_are_one_case(tmp_path):
    geometry = tiny_geometry()
    for c in range(2):
        write_image(np.full(geometry.shape_zyx, c, np.float32), geometry, tmp_path / f"p1_{c:04d}.nii.gz")
    assert _found(tmp_path, 2) == [("p1", ["p1_0000.nii.gz", "p1_0001.nii.gz"], ".nii.gz")]
    assert _found(tmp_path / "p1_0001.nii.gz", 2) == [("p1", ["p1_0000.nii.gz", "p1_0001.nii.gz"], ".nii.gz")]
    (tmp_path / "p1_0001.nii.gz").unlink()
    with pytest.raises(InferenceError, match=r"case p1: missing channel file\(s\) p1_0001.nii.gz; the model expects 2"):
        collect_inputs(tmp_path, 2)


def test_wrong_channel_count_names_the_file_and_the_counts(tmp_path):
    rgba = write_png(colour_case(0, components=4)[0], tmp_path / "a.png")
    with pytest.raises(
        InferenceError, match=r"a.png holds 4 channel\(s\), but the model expects 3 .*save the image as RGB"
    ):
        collect_inputs(tmp_path, 3)
    rgba.unlink()
    write_png(colour_case(0)[1], tmp_path / "grey.png")
    with pytest.raises(InferenceError, match=r"case grey: missing channel file\(s\) grey_0001.png, grey_0002.png"):
        collect_inputs(tmp_path, 3)


def test_channel_files_beyond_the_model_are_an_error(tmp_path):
    geometry = tiny_geometry()
    for c in range(3):
        write_image(np.zeros(geometry.shape_zyx, np.float32), geometry, tmp_path / f"p1_{c:04d}.nii.gz")
    with pytest.raises(InferenceError, match=r"p1_0002.nii.gz beyond the 2 channel\(s\) the model expects"):
        collect_inputs(tmp_path, 2)
