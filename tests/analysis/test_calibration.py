"""Calibration: ECE, temperature scaling, ranking of uncertainty scores; the command on a tiny trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import special

from autoseg.analysis.calibration import expected_calibration_error, fit_temperature, risk_coverage
from autoseg.cli import main
from autoseg.data.io import read_images
from autoseg.inference.predictor import Predictor
from autoseg.inference.uncertainty import Calibration, load_calibration, save_calibration


def test_ece_by_hand():
    ece, diagram = expected_calibration_error([0.1, 0.2, 0.8, 0.9], [0, 1, 1, 1], bins=2)
    # bin [0, .5): mean 0.15, frequency 0.5; bin [.5, 1]: mean 0.85, frequency 1.0
    assert ece == pytest.approx((2 * 0.35 + 2 * 0.15) / 4)
    assert diagram["count"] == [2, 2] and diagram["confidence"] == pytest.approx([0.15, 0.85])


def test_ece_of_a_calibrated_predictor_is_near_zero_and_of_an_overconfident_one_is_not():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    outcome = rng.random(p.size) < p  # happens with exactly the predicted probability
    assert expected_calibration_error(p, outcome)[0] < 0.01
    overconfident = special.expit(3 * special.logit(p))  # pushed towards 0 and 1
    assert expected_calibration_error(overconfident, outcome)[0] > 0.1


@pytest.mark.parametrize("regions", [False, True])
def test_temperature_fit_recovers_a_known_temperature(regions):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 4, size=(20_000, 3))
    true_t = 2.5
    if regions:  # independent sigmoid outputs
        targets = rng.random(logits.shape) < special.expit(logits / true_t)
    else:
        p = special.softmax(logits / true_t, axis=1)
        targets = (rng.random((len(p), 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    assert fit_temperature(logits, targets, regions=regions) == pytest.approx(true_t, rel=0.06)


def test_risk_coverage_of_known_rankings():
    dice = np.array([0.9, 0.2, 0.8, 0.5])
    perfect = risk_coverage(1 - dice, dice)
    # risks accepted in order 0.1, 0.2, 0.5, 0.8: running means 0.1, 0.15, 0.2667, 0.4
    assert perfect["aurc"] == pytest.approx((0.1 + 0.15 + 0.8 / 3 + 0.4) / 4)
    assert perfect["aurc"] == pytest.approx(perfect["aurc_optimal"]) and perfect["spearman"] == pytest.approx(1)
    reversed_ = risk_coverage(dice, dice)
    assert reversed_["spearman"] == pytest.approx(-1) and reversed_["aurc"] > perfect["aurc"]
    assert np.isnan(risk_coverage(np.zeros(4), dice)["spearman"])  # a constant score ranks nothing


def test_predictor_applies_the_stored_temperature(small_run):
    data, copy = small_run("2d", ("0",))
    image, geometry = read_images([data / "imagesTs" / "case_005_0000.nii.gz"])
    plain = Predictor(copy, configs=["2d"], device="cpu", mirror_mode="none").predict(
        image, geometry, keep_probabilities=True
    )
    save_calibration(copy, Calibration({"2d": 3.0}))
    scaled = Predictor(copy, configs=["2d"], device="cpu", mirror_mode="none").predict(
        image, geometry, keep_probabilities=True
    )
    assert not np.allclose(plain.probabilities, scaled.probabilities, atol=1e-3)
    assert scaled.probabilities.max() < plain.probabilities.max()  # softer
    # a scalar temperature keeps each voxel's arg-max; only the resampling of the probabilities back onto the
    # image grid (interpolating between voxels) can move a label at a boundary
    assert np.mean(plain.labels != scaled.labels) < 0.03


def test_analyze_calibration_writes_its_report_and_stores_what_predict_uses(small_run, tmp_path):
    data, copy = small_run("2d", ("0",))
    assert main(["analyze", "calibration", str(copy), "-c", "2d", "--mirror", "none", "--device", "cpu"]) == 0
    report = json.loads((copy / "analysis" / "calibration.json").read_text())
    assert report["n_cases"] == 1 and report["temperature"] > 0
    assert 0 <= report["ece_before"] <= 1 and 0 <= report["ece_after"] <= 1
    assert set(report["scores"]) == {"mean_entropy_foreground", "flip_volume_cv"}  # disagreement needs >1 model
    assert report["best_score"] in report["scores"]
    assert (copy / "analysis" / "calibration.png").stat().st_size > 0
    assert (copy / "analysis" / "risk_coverage.png").stat().st_size > 0
    stored = load_calibration(copy)
    assert stored.temperatures == {"2d": pytest.approx(report["temperature"])}
    assert stored.uncertainty_score == report["best_score"]
    out = tmp_path / "pred"
    args = ["predict", "-m", str(copy), "-i", str(data / "imagesTs" / "case_005_0000.nii.gz"), "-o", str(out)]
    assert main([*args, "--uncertainty", "--no-tta", "--device", "cpu"]) == 0
    scores = json.loads((out / "uncertainty.json").read_text())["case_005"]
    assert scores["uncertainty"] == scores[report["best_score"]]
