"""Synthetic datasets: reproducible per seed, and the hard kind is oblique with overlapping intensities."""

from __future__ import annotations

import numpy as np

from autoseg.data.dataset import discover, load_case
from autoseg.data.synth import KINDS, make_dataset


def test_same_seed_same_files_and_kinds_do_not_share_seeds(tmp_path):
    a = make_dataset(tmp_path / "a", "ct3d", 1, test_cases=0, seed=3)
    b = make_dataset(tmp_path / "b", "ct3d", 1, test_cases=0, seed=3)
    c = make_dataset(tmp_path / "c", "ct3d", 1, test_cases=0, seed=4)
    name = "imagesTr/case_000_0000.nii.gz"
    assert (a / name).read_bytes() == (b / name).read_bytes() != (c / name).read_bytes()


def test_hard_ct_is_oblique_with_overlapping_classes(tmp_path):
    data = make_dataset(tmp_path / "d", "ct3d_hard", 3, test_cases=0, seed=5)
    spec = discover(data)
    assert spec.labels == KINDS["ct3d_hard"].labels
    angles, overlaps = [], []
    for case in spec.cases:
        image, label, geometry = load_case(spec, case)
        direction = np.asarray(geometry.direction_xyz).reshape(3, 3)
        assert np.allclose(direction @ direction.T, np.eye(3), atol=1e-6)  # a rotation
        angles.append(np.degrees(np.arccos(np.clip((np.trace(direction) - 1) / 2, -1, 1))))
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}, case.id
        hu = image[0]
        organ, lesion, cyst = (hu[label == v] for v in (1, 2, 4))
        # the classes overlap in intensity: a threshold cannot separate lesion from organ
        overlaps.append(np.percentile(lesion, 90) > np.percentile(organ, 25))
        assert cyst.size < lesion.size * 3 and cyst.mean() < lesion.mean()
    assert max(angles) > 2.0  # at least one scan is visibly tilted
    assert all(overlaps)


def test_context_ct_needs_the_whole_image_to_tell_the_two_organs_apart(tmp_path):
    """Both organs look alike; which is which follows the heart's side, far from them (and it varies by case)."""
    data = make_dataset(tmp_path / "d", "ct3d_context", 4, test_cases=0, seed=0)
    spec = discover(data)
    sides = []
    for case in spec.cases:
        image, label, _ = load_case(spec, case)
        assert set(np.unique(label)) == {0, 1, 2, 3}, case.id
        hu = image[0]
        same, other = hu[label == 1], hu[label == 2]
        assert abs(np.median(same) - np.median(other)) < 10  # alike: intensity cannot separate them
        x = {v: np.nonzero(label == v)[-1].mean() - label.shape[-1] / 2 for v in (1, 2, 3)}
        assert np.sign(x[1]) == np.sign(x[3]) == -np.sign(x[2]), case.id  # the heart-side organ is class 1
        z_gap = np.nonzero(label == 3)[0].min() - np.nonzero(label == 1)[0].max()
        assert z_gap * 2.0 > 15, case.id  # more than 1.5 cm of slices between the heart and the organ
        sides.append(np.sign(x[3]))
    assert len(set(sides)) == 2  # the heart lies left in some cases, right in others


def test_the_synth_command_offers_every_kind():
    from autoseg.cli import build_parser

    for kind in KINDS:
        assert build_parser().parse_args(["synth", "out", "--kind", kind]).kind == kind
