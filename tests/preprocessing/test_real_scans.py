"""Real scans of ../shared/data (NRRD pairs, MR NIfTI, DICOM series) through preprocess_case + revert + write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoseg.data.dataset import discover, load_case
from autoseg.data.geometry import Geometry
from autoseg.data.io import read_image, read_label, write_image
from autoseg.planning.plans import ChannelNormalization
from autoseg.preprocessing import preprocess_case, revert
from tests.conftest import shared_data
from tests.preprocessing.test_plans_fixture import make_configuration, make_plans

ZSCORE_MASKED = ChannelNormalization("zscore", use_mask=True)


def _round_trip(
    image: np.ndarray, label: np.ndarray, geometry: Geometry, spacing, norm, tmp: Path, ending: str
) -> tuple[np.ndarray, Geometry, np.ndarray]:
    values = sorted(int(v) for v in np.unique(label))
    plans = make_plans(
        [make_configuration("3d", spacing, [norm])],
        channels=("x",),
        labels={f"l{v}": v for v in values},
        transpose_forward=(0, 1, 2),
    )
    data, seg, props = preprocess_case(image, label, geometry, plans, "3d", case_id="real")
    assert np.all(np.isfinite(data))
    back = revert(seg, props, is_label=True)
    assert back.shape == label.shape
    write_image(back, props.geometry, tmp / f"pred{ending}")
    written, written_geometry = read_label(tmp / f"pred{ending}")
    assert np.array_equal(written, back)
    return back, written_geometry, seg


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.sum(a & b)) / max(1, int(a.sum() + b.sum()))


@pytest.mark.parametrize("case_id", ["brain1", "brain2", "breast1", "lung1", "lung2"])
def test_pyradiomics_nrrd_pairs(case_id: str, tmp_path: Path) -> None:
    spec = discover(shared_data("pyradiomics"))
    case = next(c for c in spec.cases if c.id == case_id)
    image, label, geometry = load_case(spec, case)
    back, written_geometry, _ = _round_trip(image, label, geometry, (3.0, 0.9, 0.9), ZSCORE_MASKED, tmp_path, ".nrrd")
    assert written_geometry == geometry  # NRRD keeps double precision: exactly the input's geometry
    assert _dice(back > 0, label > 0) > 0.75  # breast1's lesion has 143 voxels; its thin slices are thinned out


def test_totalsegmentator_mr_nifti_with_23_classes(tmp_path: Path) -> None:
    folder = shared_data("totalseg_mr")
    image, geometry = read_image(folder / "example_mr_sm.nii.gz")
    label, _ = read_label(folder / "example_seg_mr.nii.gz", reference=geometry)
    back, written_geometry, seg = _round_trip(
        image.astype(np.float32), label, geometry, (2.5, 1.2, 1.2), ChannelNormalization("zscore"), tmp_path, ".nii.gz"
    )
    assert written_geometry == geometry
    before, after = set(np.unique(label).tolist()), set(np.unique(back).tolist())
    assert after <= before
    assert len(after) >= 0.9 * len(before)
    assert np.mean(back == label) > 0.97


def test_dicom_series_with_a_flipped_nifti_label(tmp_path: Path) -> None:
    folder = shared_data("totalseg_dicom")
    image, geometry = read_image(folder / "example_ct_dicom")
    label, _ = read_label(folder / "example_seg_dicom.nii.gz", reference=geometry)
    norm = ChannelNormalization("ct", clip=(-1000.0, 1500.0), mean=50.0, std=300.0)
    back, written_geometry, seg = _round_trip(
        image.astype(np.float32), label, geometry, (2.5, 1.5, 1.5), norm, tmp_path, ".nii.gz"
    )
    # NIfTI stores spacing and origin in single precision: the same grid to float32 accuracy
    assert written_geometry.shape_zyx == geometry.shape_zyx
    assert np.allclose(written_geometry.spacing_zyx, geometry.spacing_zyx, rtol=1e-6)
    assert np.allclose(written_geometry.origin_xyz, geometry.origin_xyz, rtol=1e-6, atol=1e-4)
    assert written_geometry.direction_xyz == geometry.direction_xyz
    assert set(np.unique(back).tolist()) <= set(np.unique(label).tolist())
    assert np.mean(back == label) > 0.97
