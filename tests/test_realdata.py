"""The real datasets of ../shared/realdata: discovered as documented, and a tiny training run on a few cases each.

Skipped with a reason when the folder is absent (a checkout outside the workspace); CI has it. Every dataset is
read through symlinks in ``tmp_path``: nothing is written beside the real files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from autoseg.data.dataset import discover, load_case
from autoseg.data.io import read_header, read_label
from autoseg.fingerprint import extract_fingerprint
from autoseg.inference.predict import predict_path
from autoseg.planning.planner import make_plans
from autoseg.preprocessing.preprocess import preprocess
from autoseg.preprocessing.store import read_case
from autoseg.runfolder import record_dataset
from autoseg.training.trainer import TrainOptions, train_fold

REALDATA = Path(__file__).parents[1].parent / "shared" / "realdata"
TINY = ["training.epochs=1", "training.iterations_per_epoch=2", "training.val_iterations=1"]


@dataclass(frozen=True)
class Real:
    folder: str
    n_cases: int
    n_channels: int
    label_values: tuple[int, ...]
    train_cases: tuple[str, ...]  # a few cases of different sizes for the tiny run
    new_case: str  # predicted by the tiny run's model
    configuration: str


DATASETS = {
    "hippocampus": Real(
        "Dataset004_Hippocampus",
        208,
        1,
        (0, 1, 2),
        ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"),
        "hippocampus_008",
        "3d_fullres",
    ),
    "isbi": Real("isbi2012_em_membrane", 30, 1, (0, 1), ("isbi_00", "isbi_01", "isbi_02", "isbi_03"), "isbi_10", "2d"),
    # RGB PNG of four sizes: 256 x 256, 320 x 256, 347 x 260 and 360 x 360
    "dsb": Real("dsb2018_nuclei", 664, 3, (0, 1), ("dsb_000", "dsb_002", "dsb_011", "dsb_007"), "dsb_005", "2d"),
}


def _real(name: str) -> tuple[Real, Path]:
    real = DATASETS[name]
    root = REALDATA / real.folder
    if not root.is_dir():
        pytest.skip(f"{root} not present (the real datasets live in ../shared/realdata beside the checkout)")
    return real, root


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _subset(real: Real, root: Path, out: Path) -> tuple[Path, Path]:
    """Symlink ``real.train_cases`` into ``out/data`` in the dataset's own layout, and ``real.new_case`` into
    ``out/new`` named as ``autoseg predict`` expects; return both folders."""
    data, new = out / "data", out / "new"
    if (root / "dataset.json").is_file():  # nnU-Net v2 layout
        meta = json.loads((root / "dataset.json").read_text())
        ending = meta["file_ending"]
        for case in real.train_cases:
            _link(root / "imagesTr" / f"{case}_0000{ending}", data / "imagesTr" / f"{case}_0000{ending}")
            _link(root / "labelsTr" / f"{case}{ending}", data / "labelsTr" / f"{case}{ending}")
        (data / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(real.train_cases)}))
        _link(root / "imagesTr" / f"{real.new_case}_0000{ending}", new / f"{real.new_case}_0000{ending}")
    else:  # plain images/ + labels/
        for case in real.train_cases:
            for sub in ("images", "labels"):
                _link(root / sub / f"{case}.png", data / sub / f"{case}.png")
        _link(root / "images" / f"{real.new_case}.png", new / f"{real.new_case}.png")
    return data, new


@pytest.mark.parametrize("name", list(DATASETS))
def test_real_dataset_is_discovered_as_documented(name):
    real, root = _real(name)
    spec = discover(root)
    assert len(spec.cases) == real.n_cases
    assert len(spec.channels) == real.n_channels
    assert spec.label_values == real.label_values
    assert all(case.label is not None and len(case.images) == 1 for case in spec.cases)
    image, label, geometry = load_case(spec, spec.cases[0])
    assert image.shape == (real.n_channels, *geometry.shape_zyx) and label.shape == geometry.shape_zyx


def test_real_rgb_pngs_in_nnunet_layout_with_one_file_per_case(tmp_path):
    # regression: channel_names R, G, B and one RGB <case>_0000.png per case (nnU-Net's NaturalImage2DIO layout)
    # failed with "missing channel file(s) <case>_0001.png, <case>_0002.png"
    real, root = _real("dsb")
    for image in sorted((root / "images").iterdir()):
        _link(image, tmp_path / "imagesTr" / f"{image.stem}_0000.png")
        _link(root / "labels" / image.name, tmp_path / "labelsTr" / image.name)
    meta = {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "nucleus": 1}}
    (tmp_path / "dataset.json").write_text(json.dumps({**meta, "numTraining": real.n_cases, "file_ending": ".png"}))
    spec = discover(tmp_path)
    assert len(spec.cases) == real.n_cases and spec.channels == ("R", "G", "B")
    case = next(c for c in spec.cases if c.id == "dsb_002")
    image, label, geometry = load_case(spec, case)
    assert image.shape == (3, 1, 256, 320) and label.shape == geometry.shape_zyx == (1, 256, 320)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DATASETS))
def test_tiny_training_run_on_real_cases(name, tmp_path):
    real, root = _real(name)
    data, new = _subset(real, root, tmp_path)
    run = tmp_path / "run"
    record_dataset(run, data)
    fingerprint = extract_fingerprint(data, run / "fingerprint.json", workers=1)
    # a fixed tiny CPU throughput: no timing, tiny networks and patches
    plans = make_plans(fingerprint, device="cpu", check_speed=False, cpu_flops=5e7, overrides=TINY)
    plans.save(run / "plans.json")
    assert len(plans.channels) == real.n_channels
    configuration = plans.configurations[real.configuration]
    preprocess(run, configurations=[real.configuration], workers=1)
    for case in real.train_cases:
        image, seg, _ = read_case(run / "preprocessed" / configuration.data_identifier, case)
        assert image.shape[0] == real.n_channels and image.shape[1:] == seg.shape
        assert set(np.unique(seg).tolist()) <= set(real.label_values)

    options = TrainOptions(device="cpu", workers=0, deterministic=True)
    fold = train_fold(run, real.configuration, 0, options=options)
    assert (fold / "checkpoint_final.pt").is_file()
    (record,) = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])

    # predict a case the model has not seen, from a folder named like the training images (RGB PNG for dsb)
    (written,) = predict_path(
        run, new, tmp_path / "pred", configs=[real.configuration], folds=["0"], device="cpu", mirror_mode="none"
    )
    (source,) = new.iterdir()
    labels, geometry = read_label(written)
    assert geometry.shape_zyx == read_header(source).shape_zyx
    assert set(np.unique(labels).tolist()) <= set(real.label_values)
