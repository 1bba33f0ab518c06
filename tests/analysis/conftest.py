"""A tiny trained run whose model has learned something (organ Dice about 0.5 after 50 iterations), shared by the
analysis tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoseg.planning.overrides import apply_overrides
from autoseg.planning.plans import load_plans
from autoseg.training.trainer import TrainOptions, train_fold
from tests.training.test_trainer import make_tiny_run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """RUN with fold ``all`` of :func:`~tests.training.test_trainer.tiny_plans` trained for 10 x 5 iterations on 4
    synthetic CT cases (the dataset is RUN/../data)."""
    run = make_tiny_run(tmp_path_factory.mktemp("analysis"), cases=4, epochs=10)
    apply_overrides(load_plans(run), ["training.iterations_per_epoch=5"]).save(run / "plans.json")
    train_fold(run, "3d_fullres", "all", options=TrainOptions(device="cpu", workers=0, deterministic=True))
    return run
