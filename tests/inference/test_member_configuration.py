"""Ensemble members are rebuilt from the configuration stored with their checkpoint, not from plans.json.

Regression: a fold trained with ``autoseg train --set 3d_fullres.network.features_per_stage=...`` was rebuilt at
prediction time from plans.json's network, and loading its weights failed with a state-dict size mismatch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from autoseg.cli import main
from autoseg.data.io import read_header, read_label
from autoseg.data.synth import make_dataset
from autoseg.errors import InferenceError
from autoseg.fingerprint import extract_fingerprint
from autoseg.inference.predict import predict_path
from autoseg.inference.predictor import Predictor
from autoseg.networks.builder import build_network
from autoseg.planning.plans import load_plans
from autoseg.preprocessing.preprocess import preprocess
from autoseg.runfolder import record_dataset
from autoseg.training.checkpoint import load_checkpoint, save_checkpoint
from tests.training.test_trainer import tiny_plans

OVERRIDES = [
    "3d_fullres.network.features_per_stage=[2,6,10]",  # plans.json: (4, 8, 16)
    "3d_fullres.patch_size=[4,16,16]",  # plans.json: (4, 12, 12)
    "3d_fullres.augmentation.mirror_axes=[2]",  # plans.json: (1, 2)
    "training.iterations_per_epoch=1",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny run whose fold 0 was trained by ``autoseg train --set`` with a different network and patch."""
    root = tmp_path_factory.mktemp("member")
    data = make_dataset(root / "data", "ct3d", cases=5, test_cases=1, seed=11)
    run = root / "run"
    fp = extract_fingerprint(data, run / "fingerprint.json", workers=1)
    record_dataset(run, data)
    tiny_plans(fp, epochs=1).save(run / "plans.json")
    preprocess(run, data_dir=data, workers=1)
    args = ["train", str(run), "-c", "3d_fullres", "-f", "0", "--devices", "cpu", "-j", "0"]
    assert main([*args, *(item for o in OVERRIDES for item in ("--set", o))]) == 0
    return data, run


def test_fold_folder_records_the_overrides(trained):
    _, run = trained
    fold = run / "models" / "3d_fullres" / "fold_0"
    configuration = json.loads((fold / "configuration.json").read_text())
    assert configuration["network"]["features_per_stage"] == [2, 6, 10]
    assert configuration["patch_size"] == [4, 16, 16]
    assert any("network.features_per_stage" in reason and "--set" in reason for reason in configuration["why"])
    state = load_checkpoint(fold / "checkpoint_final.pt")
    assert state["overrides"] == OVERRIDES
    assert json.loads(state["configuration"]) == configuration
    # plans.json itself is unchanged: the override belongs to the fold
    assert load_plans(run).configurations["3d_fullres"].network.features_per_stage == (4, 8, 16)


def test_network_override_of_train_set_is_used_at_prediction(trained, tmp_path):
    data, run = trained
    assert (run / "models" / "3d_fullres" / "fold_0" / "validation" / "summary.json").is_file()
    predictor = Predictor(run, configs=["3d_fullres"], folds=["0"], device="cpu", mirror_mode="single")
    (member,) = predictor.members["3d_fullres"]
    assert member.configuration.network.features_per_stage == (2, 6, 10)
    assert member.configuration.patch_size == (4, 16, 16)
    assert member.configuration.augmentation.mirror_axes == (2,)
    written = predict_path(run, data / "imagesTs", tmp_path, device="cpu", configs=["3d_fullres"], folds=["0"])
    assert [p.name for p in written] == ["case_005.nii.gz"]
    labels, geometry = read_label(written[0])
    assert geometry.same_grid(read_header(data / "imagesTs" / "case_005_0000.nii.gz"), atol=1e-6)
    assert set(labels.ravel().tolist()) <= {0, 1, 2, 3}


def test_old_checkpoint_without_configuration_falls_back_to_plans_with_a_warning(trained, tmp_path, caplog):
    _, run = trained
    state = load_checkpoint(run / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt")
    del state["configuration"], state["overrides"]
    old = tmp_path / "old"
    old.mkdir()
    for name in ("plans.json", "fingerprint.json"):
        (old / name).write_bytes((run / name).read_bytes())
    checkpoint = old / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt"
    checkpoint.parent.mkdir(parents=True)
    save_checkpoint(checkpoint, state)
    with caplog.at_level(logging.WARNING, logger="autoseg"):
        # plans.json's network is not the one these weights were trained with: a clear error, not a silent misfit
        with pytest.raises(InferenceError, match="weights do not fit the network"):
            Predictor(old, configs=["3d_fullres"], device="cpu")
    assert "does not record its configuration" in caplog.text
    # an old checkpoint whose network matches plans.json loads as before
    plans = load_plans(run)
    c = plans.configurations["3d_fullres"]
    state["network"] = build_network(c.network, len(plans.channels), plans.n_outputs).state_dict()
    save_checkpoint(checkpoint, state)
    (member,) = Predictor(old, configs=["3d_fullres"], device="cpu").members["3d_fullres"]
    assert member.configuration == c
