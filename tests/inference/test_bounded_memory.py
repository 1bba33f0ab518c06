"""Labels without the full probability map: prediction that only writes labels never holds classes x the whole
image at full resolution, and gives exactly the labels of the path that does (which probabilities and uncertainty
need)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from autoseg.data.io import read_image
from autoseg.inference.predictor import Predictor, _class_probabilities, probabilities_to_labels
from autoseg.planning.plans import load_plans
from autoseg.preprocessing.preprocess import preprocess_case
from autoseg.training.trainer import TrainOptions, train_fold
from tests.training.test_trainer import make_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_tiny_run(tmp_path_factory.mktemp("bounded"), cases=3, epochs=1)
    train_fold(run, "3d_fullres", "all", options=TrainOptions(device="cpu", workers=0))
    return run


def _case(run):
    return read_image(run.parent / "data" / "imagesTr" / "case_001_0000.nii.gz")


def test_labels_only_equal_the_labels_of_the_probability_map(run):
    image, geometry = _case(run)
    predictor = Predictor(run, device="cpu", mirror_mode="single")
    full = predictor.predict(image, geometry, keep_probabilities=True)
    bounded = predictor.predict(image, geometry)
    assert bounded.probabilities is None and full.probabilities is not None
    assert bounded.labels.dtype == full.labels.dtype and np.array_equal(bounded.labels, full.labels)


@pytest.mark.parametrize("regions", [False, True], ids=["softmax", "regions"])
def test_class_by_class_arg_max_of_an_ensemble_of_configurations(run, regions):
    """40 classes, two configurations, random probabilities with ties: the running arg-max (or the region order)
    equals the arg-max of the averaged full map."""
    plans = load_plans(run)
    k = 40
    labels = {"background": 0, **{f"c{i}": i for i in range(1, k)}}
    plans = dataclasses.replace(plans, labels=labels)
    if regions:
        plans = dataclasses.replace(plans, regions={f"r{i}": (i,) for i in range(1, k + 1)})
    image, geometry = _case(run)
    _, _, props = preprocess_case(image, None, geometry, plans, "3d_fullres")
    rng = np.random.default_rng(0)
    means = []
    for _ in range(2):
        p = rng.integers(0, 4, (k, *props.shape_after_resampling)).astype(np.float32)  # many exact ties
        means.append((p / np.maximum(p.sum(0, keepdims=True), 1), props))
    fill = [0.0] * k if regions else [1.0] + [0.0] * (k - 1)
    want = probabilities_to_labels(_class_probabilities(means, list(range(k)), fill), plans)
    got = Predictor._labels_class_by_class(SimpleNamespace(plans=plans), means, fill)
    assert got.shape == geometry.shape_zyx and np.array_equal(got, want)
