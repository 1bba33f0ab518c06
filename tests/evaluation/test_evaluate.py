"""Folder evaluation: pairing, geometry checks, summary.json / summary.csv, parallel workers."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.data.geometry import Geometry
from autoseg.data.io import read_label, write_image
from autoseg.errors import AutosegError
from autoseg.evaluation.evaluate import SUMMARY_METRICS, Summary, evaluate_folders
from autoseg.evaluation.metrics import evaluate_case
from autoseg.serialization import from_jsonable, load_json, to_jsonable

SHAPE = (7, 11, 13)
SPACING = (3.0, 0.7, 0.8)
GEOMETRY = Geometry(SPACING, SHAPE, (10.0, -5.0, 2.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def label_map(seed: int, labels: tuple[int, ...] = (1, 2)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros(SHAPE, np.uint8)
    for value in labels:
        z, y, x = (int(rng.integers(1, n - 3)) for n in SHAPE)
        out[z : z + 3, y : y + int(rng.integers(2, 6)), x : x + int(rng.integers(2, 7))] = value
    return out


def file_spacing(path) -> tuple[float, ...]:
    """Spacing as stored in the file header (NIfTI stores float32: 0.7 reads back as 0.699999988...)."""
    return read_label(path)[1].spacing_zyx


@pytest.fixture
def folders(tmp_path):
    """Three reference cases with labels 1 and 2 (label 2 missing in case c) and predictions for them."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    arrays = {}
    for i, case in enumerate(["a", "b", "c"]):
        ref = label_map(i, (1, 2) if case != "c" else (1,))
        pred = np.roll(ref, 1, axis=2) if case != "b" else label_map(10 + i)
        write_image(ref, GEOMETRY, ref_dir / f"{case}.nii.gz")
        write_image(pred, GEOMETRY, pred_dir / f"{case}.nii.gz")
        arrays[case] = (pred, ref)
    return pred_dir, ref_dir, arrays


def test_summary_json_and_csv(folders, tmp_path):
    pred_dir, ref_dir, arrays = folders
    out = tmp_path / "eval"
    summary = evaluate_folders(pred_dir, ref_dir, out=out, workers=1, nsd_tolerance_mm=1.5)
    assert summary.classes == ("1", "2")
    assert [c.case for c in summary.cases] == ["a", "b", "c"]
    for case in summary.cases:
        pred, ref = arrays[case.case]
        spacing = file_spacing(ref_dir / f"{case.case}.nii.gz")
        expected = evaluate_case(pred, ref, spacing, labels=[1, 2], nsd_tolerance_mm=1.5)
        assert case.metrics == expected
    # label 2 is absent from case c in both maps: Dice 1, HD95 0 by the empty-mask rule
    assert summary.cases[2].metrics["2"].dice == 1.0
    dice_1 = [c.metrics["1"].dice for c in summary.cases]
    assert summary.per_class["1"]["dice"].mean == pytest.approx(np.mean(dice_1))
    assert summary.per_class["1"]["dice"].median == pytest.approx(np.median(dice_1))
    assert summary.per_class["1"]["dice"].std == pytest.approx(np.std(dice_1))
    means = [summary.per_class[k]["dice"].mean for k in ("1", "2")]
    assert summary.foreground_mean["dice"] == pytest.approx(np.mean(means))
    assert set(summary.per_class["1"]) == set(SUMMARY_METRICS)

    loaded = load_json(Summary, out / "summary.json", format_version=1)
    assert to_jsonable(loaded) == to_jsonable(summary)
    assert to_jsonable(from_jsonable(Summary, json.loads((out / "summary.json").read_text()))) == to_jsonable(summary)

    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * 2
    assert (rows[0]["case"], rows[0]["class"]) == ("a", "1")
    assert float(rows[0]["dice"]) == summary.cases[0].metrics["1"].dice
    assert float(rows[0]["hd95_mm"]) == summary.cases[0].metrics["1"].hd95_mm


def test_default_output_is_the_prediction_folder(folders):
    pred_dir, ref_dir, _ = folders
    evaluate_folders(pred_dir, ref_dir, workers=1)
    assert (pred_dir / "summary.json").is_file() and (pred_dir / "summary.csv").is_file()
    again = evaluate_folders(pred_dir, ref_dir, workers=1)  # summary files are not mistaken for images
    assert len(again.cases) == 3


def test_workers_give_the_same_result(folders, tmp_path):
    pred_dir, ref_dir, _ = folders
    serial = evaluate_folders(pred_dir, ref_dir, out=tmp_path / "s", workers=1)
    parallel = evaluate_folders(pred_dir, ref_dir, out=tmp_path / "p", workers=2)
    assert to_jsonable(parallel) == to_jsonable(serial)


def test_undefined_values_are_counted_and_survive_json(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref = label_map(0, (1,))
    write_image(ref, GEOMETRY, ref_dir / "x.nii.gz")
    write_image(np.zeros(SHAPE, np.uint8), GEOMETRY, pred_dir / "x.nii.gz")  # missed object: HD95 undefined
    write_image(ref, GEOMETRY, ref_dir / "y.nii.gz")
    write_image(ref, GEOMETRY, pred_dir / "y.nii.gz")
    summary = evaluate_folders(pred_dir, ref_dir, out=tmp_path / "out", workers=1)
    stats = summary.per_class["1"]["hd95_mm"]
    assert (stats.n_defined, stats.n_undefined, stats.mean) == (1, 1, 0.0)
    assert summary.per_class["1"]["dice"].mean == 0.5
    raw = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert raw["cases"][0]["metrics"]["1"]["hd95_mm"] is None
    loaded = load_json(Summary, tmp_path / "out" / "summary.json")
    assert math.isnan(loaded.cases[0].metrics["1"].hd95_mm)


def test_labels_regions_and_ignore(folders, tmp_path):
    pred_dir, ref_dir, arrays = folders
    summary = evaluate_folders(pred_dir, ref_dir, labels=[2], regions={"fg": (1, 2)}, out=tmp_path / "o", workers=1)
    assert summary.classes == ("2", "fg")
    assert to_jsonable(load_json(Summary, tmp_path / "o" / "summary.json")) == to_jsonable(summary)
    assert summary.regions == {"fg": (1, 2)}
    pred, ref = arrays["a"]
    spacing = file_spacing(ref_dir / "a.nii.gz")
    assert summary.cases[0].metrics["fg"] == evaluate_case(pred, ref, spacing, regions={"fg": (1, 2)})["fg"]
    ignored = evaluate_folders(pred_dir, ref_dir, ignore_label=2, out=tmp_path / "i", workers=1)
    assert ignored.classes == ("1",) and ignored.ignore_label == 2


def test_missing_predictions_are_listed(folders):
    pred_dir, ref_dir, _ = folders
    (pred_dir / "b.nii.gz").unlink()
    (pred_dir / "c.nii.gz").unlink()
    with pytest.raises(AutosegError, match="2 reference case.*b, c"):
        evaluate_folders(pred_dir, ref_dir, workers=1)


def test_shape_mismatch_names_both_files(folders):
    pred_dir, ref_dir, _ = folders
    write_image(np.zeros((7, 11, 12), np.uint8), GEOMETRY.with_shape((7, 11, 12)), pred_dir / "a.nii.gz")
    with pytest.raises(AutosegError, match=r"pred[/\\]a\.nii\.gz.*ref[/\\]a\.nii\.gz"):
        evaluate_folders(pred_dir, ref_dir, workers=1)


def test_spacing_mismatch_is_an_error(folders):
    pred_dir, ref_dir, arrays = folders
    other = Geometry((2.0, 0.7, 0.8), SHAPE, GEOMETRY.origin_xyz, GEOMETRY.direction_xyz)
    write_image(arrays["a"][0], other, pred_dir / "a.nii.gz")
    with pytest.raises(AutosegError, match="spacing"):
        evaluate_folders(pred_dir, ref_dir, workers=1)


def test_prediction_in_another_orientation_of_the_same_grid(folders, tmp_path):
    pred_dir, ref_dir, arrays = folders
    image = sitk.ReadImage(str(ref_dir / "a.nii.gz"))
    flipped = sitk.DICOMOrient(image, "LAI")  # same voxels, axes flipped in the header and the array
    assert not np.array_equal(sitk.GetArrayFromImage(flipped), arrays["a"][1])
    sitk.WriteImage(flipped, str(pred_dir / "a.nii.gz"))
    summary = evaluate_folders(pred_dir, ref_dir, out=tmp_path / "o", workers=1)
    assert summary.cases[0].metrics["1"].dice == 1.0
    assert summary.cases[0].metrics["2"].hd95_mm == 0.0


def test_png_files_are_evaluated_in_2d(tmp_path):
    geometry = Geometry((999.0 * 0.9, 0.5, 0.9), (1, 17, 19), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), ndim=2)
    ref = np.zeros((1, 17, 19), np.uint8)
    ref[0, 4:12, 5:14] = 1
    pred = np.roll(ref, 2, axis=1)  # two rows down: 1.0 mm
    write_image(ref, geometry, tmp_path / "ref" / "s.png")
    write_image(pred, geometry, tmp_path / "pred" / "s.png")
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", out=tmp_path / "o", workers=1)
    metrics = summary.cases[0].metrics["1"]
    assert metrics == evaluate_case(pred[0], ref[0], (0.5, 0.9))["1"]
    assert metrics.hd95_mm == pytest.approx(1.0)
    assert metrics.volume_ref_mm3 == pytest.approx(8 * 9 * 0.5 * 0.9)  # an area in mm^2 for 2D images
