"""Perturbations change the image as specified and keep its geometry; ``autoseg analyze robustness`` writes the
table and the curves."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg.analysis.perturbations import PERTURBATIONS, apply_perturbation
from autoseg.errors import ConfigError

pytest.importorskip("torchio")  # the analysis extra

SPACING = (3.0, 0.7, 0.8)
SHAPE = (10, 20, 30)


def _volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (1, 10, 20, 30) CT-like image: noise around -500 HU plus 600 HU inside an elongated box, and its label."""
    label = np.zeros(SHAPE, np.uint8)
    label[3:8, 8:12, 4:26] = 1
    image = np.random.default_rng(seed).normal(-500, 50, (1, *SHAPE)).astype(np.float32) + 600.0 * label
    return image, label


@pytest.mark.parametrize("name", list(PERTURBATIONS))
@pytest.mark.parametrize("level", [1, 3])
def test_perturbation_keeps_shape_changes_the_image_and_is_seeded(name, level):
    image, label = _volume()
    before = image.copy()
    out, out_label = apply_perturbation(name, image, SPACING, level, label=label, seed=3)
    assert out.shape == image.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert np.array_equal(image, before)  # the input is not modified
    assert not np.allclose(out, image)
    assert out_label is not None and out_label.shape == label.shape and out_label.dtype == label.dtype
    if not PERTURBATIONS[name].moves_voxels:
        assert out_label is label
    again, _ = apply_perturbation(name, image, SPACING, level, label=label, seed=3)
    assert np.array_equal(out, again)


def test_severities_grow():
    image, label = _volume()
    for name in PERTURBATIONS:
        change = [np.abs(apply_perturbation(name, image, SPACING, lv, seed=1)[0] - image).mean() for lv in (1, 2, 3)]
        assert change[0] < change[1] < change[2], name


def test_noise_has_the_specified_std():
    image, _ = _volume()
    out, _ = apply_perturbation("noise", image, SPACING, 2, seed=0)
    assert np.std(out - image) == pytest.approx(PERTURBATIONS["noise"].values[1] * image.std(), rel=0.02)


def test_blur_is_a_gaussian_in_mm():
    from scipy.ndimage import gaussian_filter

    image, _ = _volume()
    out, _ = apply_perturbation("blur", image, SPACING, 2, seed=0)
    sigma_mm = PERTURBATIONS["blur"].values[1] * min(SPACING)
    want = gaussian_filter(image[0].astype(np.float64), [sigma_mm / s for s in SPACING])
    inner = (slice(2, -2), slice(4, -4), slice(4, -4))  # away from the borders, whose padding may differ
    np.testing.assert_allclose(out[0][inner], want[inner], atol=1.0)


def test_intensity_and_gamma_follow_their_formulas():
    image, _ = _volume()
    v = PERTURBATIONS["intensity"].values[0]
    out, _ = apply_perturbation("intensity", image, SPACING, 1)
    np.testing.assert_allclose(out, image * (1 + v) + v * image.std(), rtol=1e-5, atol=1e-2)
    g = PERTURBATIONS["gamma"].values[2]
    out, _ = apply_perturbation("gamma", image, SPACING, 3)
    low, high = image.min(), image.max()
    np.testing.assert_allclose(out, low + (high - low) * ((image - low) / (high - low)) ** g, rtol=1e-5, atol=1e-2)
    assert out.min() == pytest.approx(low) and out.max() == pytest.approx(high)


def test_bias_field_is_smooth_multiplicative_and_bounded():
    image, _ = _volume()
    out, _ = apply_perturbation("bias_field", image, SPACING, 3, seed=0)
    low = image.min()
    field = (out - low)[image > low] / (image - low)[image > low]
    assert field.min() > 0 and field.std() > 0.01  # a real field, not a constant
    flat = np.full_like(image, 2.0)  # no intensity above the minimum: nothing to scale
    assert np.array_equal(apply_perturbation("bias_field", flat, SPACING, 3, seed=0)[0], flat)


def test_lowres_keeps_smooth_images_and_removes_fine_detail():
    image, _ = _volume()
    out, _ = apply_perturbation("lowres", image, SPACING, 3, seed=0)
    flat = np.full_like(image, 7.0)
    np.testing.assert_allclose(apply_perturbation("lowres", flat, SPACING, 3)[0], flat, atol=1e-4)
    detail = np.abs(np.diff(image, axis=3)).mean()
    assert np.abs(np.diff(out, axis=3)).mean() < 0.7 * detail


def _angle_deg(mask: np.ndarray) -> float:
    """Orientation of a mask's long axis in the (y, x) plane, in mm (second moments)."""
    y, x = np.nonzero(mask.any(axis=0))
    y, x = y * SPACING[1], x * SPACING[2]
    cov = np.cov(np.stack([y - y.mean(), x - x.mean()]))
    vals, vecs = np.linalg.eigh(cov)
    vy, vx = vecs[:, -1]
    return float(np.degrees(np.arctan2(vy, vx)) % 180)


def test_rotation_turns_image_and_reference_together_by_the_angle():
    image, label = _volume()
    out, rotated = apply_perturbation("rotation", image, SPACING, 3, label=label)
    assert rotated is not None
    turned = abs((_angle_deg(rotated) - _angle_deg(label) + 90) % 180 - 90)
    assert turned == pytest.approx(PERTURBATIONS["rotation"].values[2], abs=2.0)
    assert abs(int(rotated.sum()) - int(label.sum())) < 0.1 * label.sum()  # area kept
    bright = out[0] > -200  # the rotated image's bright box is where the rotated reference says
    assert (bright == (rotated > 0)).mean() > 0.97


def test_missing_slices_lose_whole_slices_of_the_coarsest_axis():
    image, _ = _volume()
    out, _ = apply_perturbation("missing_slices", image, SPACING, 3, seed=0)
    lost = [z for z in range(SHAPE[0]) if not np.array_equal(out[:, z], image[:, z])]
    assert len(lost) == round(PERTURBATIONS["missing_slices"].values[2] * SHAPE[0])
    assert all((out[:, z] == image.min()).all() for z in lost)
    with pytest.raises(ConfigError, match="3D images only"):
        apply_perturbation("missing_slices", image[:, :1], SPACING, 1)


def test_2d_images_keep_their_single_slice():
    image, label = _volume()
    for name, p in PERTURBATIONS.items():
        if p.only_3d:
            continue
        out, out_label = apply_perturbation(name, image[:, 4:5], (999.0, 0.7, 0.8), 2, label=label[4:5])
        assert out.shape == (1, 1, *SHAPE[1:]) and out_label is not None and out_label.shape == (1, *SHAPE[1:])
        assert not np.allclose(out, image[:, 4:5]), name


def test_8_bit_colour_saturates_instead_of_leaving_its_range():
    """DSB2018's RGB images: noise and intensity shifts may not leave 0..255, which the rgb normalisation refuses."""
    rgb = np.random.default_rng(0).integers(0, 256, (3, 1, 40, 50)).astype(np.float32)
    for name in ("noise", "intensity", "bias_field"):
        out, _ = apply_perturbation(name, rgb, (1.0, 1.0, 1.0), 3, value_range=(0.0, 255.0))
        assert out.min() >= 0 and out.max() <= 255 and not np.array_equal(out, rgb), name
    free, _ = apply_perturbation("noise", rgb, (1.0, 1.0, 1.0), 3)
    assert free.min() < 0 or free.max() > 255  # without the range, it would leave it


def test_unknown_perturbation_and_level_are_refused():
    image, _ = _volume()
    with pytest.raises(ConfigError, match="unknown perturbation.*noise"):
        apply_perturbation("snow", image, SPACING, 1)
    with pytest.raises(ConfigError, match="level 4"):
        apply_perturbation("noise", image, SPACING, 4)


def test_analyze_robustness_writes_table_and_curves(trained_run, capsys):
    from autoseg.analysis.robustness import class_dice
    from autoseg.cli import main
    from autoseg.data.io import read_image, read_label
    from autoseg.inference.predictor import Predictor
    from autoseg.planning.plans import load_plans

    data = trained_run.parent / "data"
    args = ["analyze", "robustness", str(trained_run), "-i", str(data / "imagesTr"), "-l", str(data / "labelsTr")]
    assert main([*args, "--cases", "1", "--levels", "3", "--mirror", "none", "--device", "cpu"]) == 0
    table = json.loads((trained_run / "analysis" / "robustness.json").read_text())
    assert (trained_run / "analysis" / "robustness.png").stat().st_size > 1000
    assert table["cases"] == ["case_000"] and set(table["perturbations"]) == set(PERTURBATIONS)
    image, geometry = read_image(data / "imagesTr" / "case_000_0000.nii.gz")
    label, _ = read_label(data / "labelsTr" / "case_000.nii.gz")
    plain = Predictor(trained_run, device="cpu", mirror_mode="none").predict(image, geometry).labels
    organ = class_dice(plain, label, load_plans(trained_run))["1"]
    assert organ > 0.3  # the model has learned something
    assert table["reference"]["per_class"]["1"] == pytest.approx(organ)
    drops = {name: row["levels"][0]["drop"] for name, row in table["perturbations"].items()}
    for row in table["perturbations"].values():
        (only,) = row["levels"]
        assert only["level"] == 3 and only["drop"] == pytest.approx(table["reference"]["mean_dice"] - only["mean_dice"])
    assert table["most_harmful"]["name"] == max(drops, key=lambda n: drops[n])
    out = capsys.readouterr().out
    assert "hurts most: " + table["most_harmful"]["name"] in out and "unperturbed: mean Dice" in out
