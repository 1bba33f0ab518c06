"""The cascade: 3d_lowres -> 3d_cascade_fullres planned, trained on out-of-fold predictions, selected, predicted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.data.io import read_header, read_label
from autoseg.data.synth import make_dataset
from autoseg.errors import TrainingError
from autoseg.fingerprint import extract_fingerprint
from autoseg.fingerprint_import import load_corpus_entry
from autoseg.inference.predict import predict_path
from autoseg.inference.predictor import Predictor
from autoseg.pipeline import run_pipeline
from autoseg.planning.planner import make_plans
from autoseg.planning.plans import load_plans
from autoseg.planning.rules import cascade_stage
from autoseg.preprocessing.preprocess import label_to_case_grid
from autoseg.preprocessing.store import read_case
from autoseg.runfolder import RunFolder, record_dataset
from autoseg.training.cascade import PreviousStageToData, one_hot, prepare_previous_stage
from autoseg.training.splits import load_splits

TINY = ["training.epochs=1", "training.iterations_per_epoch=2", "training.val_iterations=1"]
CORPUS = Path(__file__).resolve().parents[2] / "fingerprints"


def _corpus(name: str):
    fp = load_corpus_entry(CORPUS / f"{name}.json").fingerprint
    assert fp is not None
    return fp


def test_a_large_image_plans_the_cascade_beside_the_low_resolution_stage():
    plans = make_plans(_corpus("Dataset003_Liver"), device="cuda", gpu_memory_gb=24)
    assert {"3d_lowres", "3d_cascade_fullres"} <= set(plans.configurations)
    cascade, full = plans.configurations["3d_cascade_fullres"], plans.configurations["3d_fullres"]
    assert (cascade.previous_stage, cascade.inherits_from) == ("3d_lowres", "3d_fullres")
    assert cascade.data_identifier == full.data_identifier and cascade.network == full.network
    assert plans.input_channels(cascade) == len(plans.channels) + len(plans.foreground_values)
    small = make_plans(_corpus("Dataset004_Hippocampus"), device="cuda", gpu_memory_gb=24)
    assert "3d_cascade_fullres" not in small.configurations  # the patch covers the image: no cascade


def test_previous_stage_labels_become_one_hot_inputs():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 1, 6, 8, 10)).astype(np.float32)
    label = rng.integers(0, 3, size=(2, 1, 6, 8, 10))
    previous = rng.integers(0, 3, size=(2, 1, 6, 8, 10))
    out = PreviousStageToData((1, 2), perturb=False)(data=data, seg=np.concatenate([label, previous], 1))
    assert out["data"].shape == (2, 3, 6, 8, 10) and out["seg"].shape == (2, 1, 6, 8, 10)
    np.testing.assert_array_equal(out["data"][:, :1], data)
    np.testing.assert_array_equal(out["data"][:, 1:], one_hot(previous[:, 0], (1, 2)).swapaxes(0, 1))
    np.testing.assert_array_equal(out["seg"], label)
    np.random.seed(3)  # noqa: NPY002 (the transform draws from the generator the loader seeds per batch)
    blob = np.zeros((4, 1, 12, 16, 16), int)
    blob[:, :, 3:9, 4:12, 4:12] = 1
    perturbed = PreviousStageToData((1,), perturb=True)(
        data=np.zeros((4, 1, 12, 16, 16), np.float32), seg=np.concatenate([blob, blob], 1)
    )
    channels = perturbed["data"][:, 1]
    assert set(np.unique(channels)) <= {0.0, 1.0}
    assert any(not np.array_equal(channels[b], blob[b, 0]) for b in range(4))  # errors were simulated


@pytest.fixture(scope="module")
def cascade_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cascade")
    data = make_dataset(root / "data", "ct3d", cases=4, test_cases=1, seed=7)
    run = root / "run"
    record_dataset(run, data)
    fp = extract_fingerprint(data, run / "fingerprint.json", workers=1)
    plans = make_plans(fp, device="cpu", check_speed=False, cpu_flops=5e7, overrides=TINY)
    full = plans.configurations["3d_fullres"]
    low = dataclasses.replace(
        full, name="3d_lowres", spacing=tuple(2 * s for s in full.spacing), data_identifier="3d_lowres"
    )
    configs = {
        "3d_fullres": full,
        "3d_lowres": low,
        "3d_cascade_fullres": cascade_stage(full, "the cascade under test"),
    }
    dataclasses.replace(plans, configurations=configs).save(run / "plans.json")
    # asked for the cascade alone: its previous stage is preprocessed and cross-validated first
    selection = run_pipeline(data, run, device="cpu", configs=["3d_cascade_fullres"], workers=1, n_folds=2)
    assert selection is not None and selection.configurations == ("3d_cascade_fullres",)
    return data, run


def test_the_cascade_trains_on_out_of_fold_predictions_of_its_previous_stage(cascade_run):
    _, run = cascade_run
    folder = RunFolder(run)
    splits = load_splits(folder.splits)
    for k, fold in enumerate(splits.folds):
        for case in fold.val:
            source = next((folder.validation("3d_lowres", k)).glob(f"{case}.nii.gz"))
            _, _, props = read_case(folder.preprocessed("3d_fullres"), case)
            stored = np.load(folder.models / "3d_cascade_fullres" / "previous_stage" / f"{case}.npy")
            np.testing.assert_array_equal(stored, label_to_case_grid(read_label(source)[0], props))
    state = torch.load(folder.checkpoint("3d_cascade_fullres", 0), map_location="cpu", weights_only=False)
    first = next(v for k, v in state["network"].items() if k.endswith("weight") and v.ndim == 5)
    plans = load_plans(run)
    assert first.shape[1] == 1 + len(plans.foreground_values) == 4  # CT + one-hot of the ct3d example's 3 classes
    summary = json.loads((folder.validation("3d_cascade_fullres", 1) / "summary.json").read_text())
    assert summary["cases"]


def test_the_cascade_predicts_new_images_through_its_previous_stage(cascade_run, tmp_path):
    data, run = cascade_run
    predictor = Predictor(run, device="cpu")
    assert list(predictor.members) == ["3d_cascade_fullres"]
    assert list(predictor.previous["3d_cascade_fullres"].members) == ["3d_lowres"]
    written = predict_path(run, data / "imagesTs", tmp_path / "pred", device="cpu")
    image = next((data / "imagesTs").iterdir())
    assert len(written) == 1 and read_header(written[0]).shape_zyx == read_header(image).shape_zyx


def test_a_cascade_without_its_previous_stage_names_what_to_train(cascade_run, tmp_path):
    _, run = cascade_run
    splits = load_splits(RunFolder(run).splits)
    empty = tmp_path / "run"
    (empty / "models").mkdir(parents=True)
    with pytest.raises(TrainingError, match="3d_lowres.*trained and validated first"):
        prepare_previous_stage(
            empty,
            load_plans(run),
            "3d_cascade_fullres",
            splits.case_ids,
            splits,
            RunFolder(run).preprocessed("3d_fullres"),
        )
