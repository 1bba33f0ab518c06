"""Dataset fingerprint: keys other tools rely on, correctness on known truth, caching, real scans."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.data.synth import make_dataset
from autoseg.fingerprint import extract_fingerprint, load_fingerprint, nonzero_bbox
from tests.conftest import shared_data, write_nnunet_dataset


def test_nonzero_bbox():
    image = np.zeros((2, 7, 11, 13))
    image[1, 2:4, 3, 5:9] = 1
    image[0, 5, 1, 6] = -3
    assert nonzero_bbox(image) == ((2, 6), (1, 4), (5, 9))
    assert nonzero_bbox(np.zeros((1, 3, 4, 5))) == ((0, 3), (0, 4), (0, 5))


def test_fingerprint_keys_and_values(tiny_dataset, tmp_path):
    fp = extract_fingerprint(tiny_dataset, tmp_path / "run" / "fingerprint.json", workers=1)
    data = json.loads((tmp_path / "run" / "fingerprint.json").read_text())
    for key in (
        "cases",
        "channels",
        "classes",
        "n_cases",
        "median_spacing",
        "median_shape_after_crop",
        "median_relative_size_after_cropping",
        "format",
    ):
        assert key in data
    case = data["cases"][0]
    for key in ("id", "spacing", "shape", "shape_after_crop", "class_voxels", "n_components", "component_volumes_mm3"):
        assert key in case
    fi = data["channels"][0]["foreground_intensity"]
    for key in ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5"):
        assert key in fi
    for key in (
        "label",
        "name",
        "voxel_fraction",
        "present_fraction",
        "median_object_volume_mm3",
        "object_volume_mm3_p10",
        "object_volume_mm3_p90",
        "median_components_per_case",
    ):
        assert key in data["classes"][0]
    # truth of write_nnunet_dataset: a 3x5x6 box of label 1 with one voxel of label 2 inside
    assert fp.cases[0].class_voxels == {"1": 89, "2": 1}
    assert fp.cases[0].n_components == {"1": 1, "2": 1}
    voxel = 3.0 * 0.7 * 0.8
    assert fp.classes[0].median_object_volume_mm3 == pytest.approx(89 * voxel, rel=1e-5)
    assert fp.classes[1].voxel_fraction == pytest.approx(1 / 90)
    assert fp.classes[1].present_fraction == 1.0
    assert fp.median_spacing == pytest.approx((3.0, 0.7, 0.8))
    assert fp.channels[0].normalization_hint == "ct"
    assert fp.dim == 3 and fp.n_cases == 3
    assert load_fingerprint(tmp_path / "run") == fp


def test_foreground_statistics_match_pooled_truth(tmp_path):
    data = make_dataset(tmp_path / "d", "ct3d", cases=3, test_cases=0, seed=1)
    fp = extract_fingerprint(data, workers=1, n_samples_total=3_000_000)
    from autoseg.data.dataset import discover, load_case

    spec = discover(data)
    pooled = []
    for case in spec.cases:
        image, label, _ = load_case(spec, case)
        fg = image[0][label > 0]
        pooled.append(np.random.default_rng(0).choice(fg, 1_000_000))  # equal weight per case, as the fingerprint
    pooled = np.concatenate(pooled)
    stats = fp.channels[0].foreground_intensity
    assert stats.percentile_99_5 == pytest.approx(np.percentile(pooled, 99.5), rel=0.01)
    assert stats.median == pytest.approx(np.median(pooled), rel=0.01)
    assert stats.mean == pytest.approx(pooled.mean(), rel=0.01)


def test_parallel_equals_serial_and_cache_skips(tmp_path):
    data = write_nnunet_dataset(tmp_path / "d", n_cases=4)
    serial = extract_fingerprint(data, workers=1)
    out = tmp_path / "run" / "fingerprint.json"
    parallel = extract_fingerprint(data, out, workers=2)
    assert serial == parallel
    mtime = os.stat(out).st_mtime_ns
    assert extract_fingerprint(data, out, workers=2) == parallel
    assert os.stat(out).st_mtime_ns == mtime  # unchanged inputs: nothing rewritten
    label = data / "labelsTr" / "case_00.nii.gz"
    os.utime(label, ns=(mtime + 10**9, mtime + 10**9))
    extract_fingerprint(data, out, workers=1)
    assert os.stat(out).st_mtime_ns != mtime  # a changed input invalidates the cache


def test_2d_dataset(tmp_path):
    data = make_dataset(tmp_path / "d", "2d", cases=3, test_cases=0)
    fp = extract_fingerprint(data, workers=1)
    assert fp.dim == 2 and fp.median_spacing[1:] == (1.0, 1.0)
    assert [c.name for c in fp.classes] == ["cell", "spot"]
    assert fp.classes[1].median_object_volume_mm3 < fp.classes[0].median_object_volume_mm3


def test_mr_dataset_crops_zero_background(tmp_path):
    data = make_dataset(tmp_path / "d", "mr3d", cases=2, test_cases=0)
    fp = extract_fingerprint(data, workers=1)
    assert [c.normalization_hint for c in fp.channels] == ["zscore", "zscore"]
    assert fp.median_relative_size_after_cropping < 1.0


def test_cli_fingerprint(tiny_dataset, tmp_path, capsys):
    assert main(["fingerprint", str(tiny_dataset), "-o", str(tmp_path / "run"), "-j", "1"]) == 0
    assert "3 cases" in capsys.readouterr().out
    assert (tmp_path / "run" / "fingerprint.json").is_file()


def test_real_scans_fingerprinted(tmp_path):
    fp = extract_fingerprint(shared_data("pyradiomics"), workers=2)
    assert fp.n_cases == 5 and len(fp.classes) == 1
    lesion = fp.classes[0]
    assert lesion.present_fraction == 1.0 and lesion.median_object_volume_mm3 > 0
    voxels = sorted(sum(c.class_voxels.values()) for c in fp.cases)
    assert voxels[0] >= 143 and voxels[-1] <= 24_644  # the lesion sizes stated in ../shared/data/README.md
    src = shared_data("totalseg_mr")
    (tmp_path / "mr").mkdir()
    (tmp_path / "mr" / "mr_image.nii.gz").symlink_to(src / "example_mr_sm.nii.gz")
    (tmp_path / "mr" / "mr_label.nii.gz").symlink_to(src / "example_seg_mr.nii.gz")
    fp = extract_fingerprint(tmp_path / "mr", workers=1)
    assert fp.median_spacing == pytest.approx((3.0, 3.0, 3.0))
    assert len(fp.classes) >= 10
