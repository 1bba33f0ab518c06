"""Labels without the full probability map: prediction that only writes labels never holds classes x the whole
image at full resolution, and gives exactly the labels of the path that does (which probabilities and uncertainty
need)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoseg.data.io import read_image
from autoseg.inference import predictor as predictor_module
from autoseg.inference.predictor import Predictor, _class_probabilities, probabilities_to_labels
from autoseg.inference.sliding_window import sliding_window_rows
from autoseg.inference.streaming import labels_from_bands
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


@pytest.mark.parametrize("tile_batch", [1, None])
def test_streamed_labels_equal_the_whole_image_path(run, monkeypatch, tile_batch):
    """Labels only from one configuration are predicted band by band (two members here), and equal the labels of
    the whole probability map exactly."""
    image, geometry = _case(run)
    predictor = Predictor(run, device="cpu", mirror_mode="single", folds=["all", "all"], tile_batch=tile_batch)
    full = predictor.predict(image, geometry, keep_probabilities=True)
    bands = []

    def counted(*args, **kwargs):
        for band in sliding_window_rows(*args, **kwargs):
            bands.append(band[0])
            yield band

    monkeypatch.setattr(predictor_module, "sliding_window_rows", counted)
    monkeypatch.setattr(Predictor, "_labels_class_by_class", lambda *a: pytest.fail("labels only were not streamed"))
    streamed = predictor.predict(image, geometry)
    assert len(bands) >= (4 if tile_batch == 1 else 2)  # two members, several bands each with one tile per batch
    assert streamed.labels.dtype == full.labels.dtype and np.array_equal(streamed.labels, full.labels)
    assert len(np.unique(full.labels)) > 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(2, 40),
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=12),
    order_z=st.integers(0, 1),
    regions=st.booleans(),
)
def test_labels_from_bands_of_any_size_equal_the_class_by_class_labels(run, rows, sizes, order_z, regions):
    """Bands of any size, along an axis that is shrunk or stretched (nearest or linear): the streamed labels equal
    the whole-map class-by-class labels, ties and regions included."""
    plans = load_plans(run)
    k = 6
    plans = dataclasses.replace(plans, labels={"background": 0, **{f"c{i}": i for i in range(1, k)}})
    if regions:
        plans = dataclasses.replace(plans, regions={f"r{i}": (i,) for i in range(1, k + 1)})
    image, geometry = _case(run)
    _, _, props = preprocess_case(image, None, geometry, plans, "3d_fullres")
    props = dataclasses.replace(
        props,
        shape_after_resampling=(rows, *props.shape_after_resampling[1:]),
        resampling=dataclasses.replace(props.resampling, order_z=order_z),
    )
    probs = np.random.default_rng(rows).integers(0, 3, (k, *props.shape_after_resampling)).astype(np.float32)
    fill = [0.0] * k if regions else [1.0] + [0.0] * (k - 1)
    want = Predictor._labels_class_by_class(SimpleNamespace(plans=plans), [(probs, props)], fill)
    edges = np.minimum(np.cumsum([0, *sizes]), rows)
    edges = [*dict.fromkeys([*edges.tolist(), rows])]  # strictly increasing, ending at the last row
    bands = [(a, probs[:, a:b].copy()) for a, b in zip(edges, edges[1:])]
    order = tuple(range(1, k + 1)) if regions else None
    got = labels_from_bands(bands, props, region_order=order, dtype=want.dtype)
    assert np.array_equal(got, want)
