"""Shared fixtures: tiny anisotropic, non-cubic volumes and the real scans of ../shared/data.

In CI (``CI=true``) a test may not skip for want of something CI provides (the ``../shared`` folders, the
PostgreSQL server that ``.ci/postgres`` starts, the reference packages of the dev extras): such a skip is reported
as a failure, so nothing CI is meant to check is silently left out. A clone outside the workspace still skips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from autoseg.data.geometry import Geometry
from autoseg.data.io import write_image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"


#: Plan overrides that make training a few iterations long (end-to-end tests).
TINY = ["training.epochs=1", "training.iterations_per_epoch=3", "training.val_iterations=1"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, run folder): a tiny synthetic CT dataset (5 training, 2 test cases) run end to end on CPU with two
    configurations (3d_fullres, 2d), five folds each, a 2-trial search and selection. Shared by the session: tests
    must not change it (copy what they modify)."""
    from autoseg.data.synth import make_dataset
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.pipeline import run_pipeline
    from autoseg.planning.planner import make_plans
    from autoseg.runfolder import record_dataset

    root = tmp_path_factory.mktemp("e2e")
    data = make_dataset(root / "data", "ct3d", cases=5, test_cases=2, seed=5)
    run = root / "run"
    record_dataset(run, data)
    fp = extract_fingerprint(data, run / "fingerprint.json", workers=1)
    # a tiny CPU budget (0.05 GFLOP/s) makes the planner choose tiny networks and patches: fast, and exercised
    plans = make_plans(fp, device="cpu", check_speed=False, cpu_flops=5e7, overrides=TINY)
    plans.save(run / "plans.json")
    selection = run_pipeline(data, run, device="cpu", configs=["3d_fullres", "2d"], workers=1, search_trials=2)
    assert selection is not None
    return data, run


#: Substrings of skip reasons for what CI provides.
CI_PROVIDES = (
    "../shared",
    "PostgreSQL",
    "could not import 'medpy",
    "could not import 'surface_distance",
    "could not import 'playwright",
    "chromium not installed",
    "of the onnx extra",
    "could not import 'captum",
    "could not import 'torchio",
    "could not import 'highdicom",
    "could not import 'ray",
    "could not import 'submitit",
)


def ci_must_run(reason: str) -> bool:
    """True when this skip reason names something CI provides and the run is CI's."""
    return os.environ.get("CI") == "true" and any(key in reason for key in CI_PROVIDES)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is available (the GPU machines), and say so when skipped."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if ci_must_run(reason):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, but CI provides what it needs: {reason}"


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, skipping the test with a reason when it is absent (clone outside the workspace)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (real scans live in ../shared/data beside the checkout)")
    return path


def tiny_geometry(shape=(7, 11, 13), spacing=(3.0, 0.7, 0.8), origin=(10.0, -20.0, 5.5)) -> Geometry:
    return Geometry(
        tuple(map(float, spacing)),
        tuple(shape),
        tuple(map(float, origin)),
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        3,
    )


def write_nnunet_dataset(
    root: Path,
    n_cases: int = 3,
    channels=("CT",),
    labels=None,
    shape=(7, 11, 13),
    seed: int = 0,
    ending: str = ".nii.gz",
) -> Path:
    """A tiny nnU-Net v2 dataset: a box of foreground per case, values 0..len(labels)-1."""
    labels = labels or {"background": 0, "a": 1, "b": 2}
    rng = np.random.default_rng(seed)
    geometry = tiny_geometry(shape)
    for i in range(n_cases):
        label = np.zeros(shape, np.uint8)
        label[2:5, 3:8, 4:10] = 1
        label[3, 5, 6] = 2 if len(labels) > 2 else 1
        for c in range(len(channels)):
            image = rng.normal(100 * (c + 1), 10, shape).astype(np.float32) + 50 * label
            write_image(image, geometry, root / "imagesTr" / f"case_{i:02d}_{c:04d}{ending}")
        write_image(label, geometry, root / "labelsTr" / f"case_{i:02d}{ending}")
    meta = {
        "channel_names": {str(c): n for c, n in enumerate(channels)},
        "labels": labels,
        "numTraining": n_cases,
        "file_ending": ending,
        "name": "tiny",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_nnunet_dataset(tmp_path / "data")
