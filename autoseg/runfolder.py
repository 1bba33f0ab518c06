"""The run folder's bookkeeping: which dataset it was made from, and references for evaluation.

``RUN/run.json`` records the dataset folder (absolute path) when the fingerprint is made; later stages that
need the original images (preprocessing, validation at full resolution, selection) read it from there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from autoseg.data.dataset import DatasetSpec, discover
from autoseg.data.io import file_ending
from autoseg.errors import ConfigError
from autoseg.files import write_text_atomic

__all__ = ["record_dataset", "dataset_dir", "run_dataset", "reference_labels"]


def record_dataset(run_dir: Path | str, data_dir: Path | str) -> None:
    """Remember in ``RUN/run.json`` which dataset folder this run is made from."""
    path = Path(run_dir) / "run.json"
    info = json.loads(path.read_text()) if path.is_file() else {"format": 1}
    info["data_dir"] = str(Path(data_dir).resolve())
    write_text_atomic(path, json.dumps(info, indent=2) + "\n")


def dataset_dir(run_dir: Path | str) -> Path:
    """The dataset folder recorded in ``RUN/run.json``."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise ConfigError(f"{path}: missing; run `autoseg fingerprint DATA -o {run_dir}` first (it records DATA)")
    data = Path(json.loads(path.read_text())["data_dir"])
    if not data.is_dir():
        raise ConfigError(
            f"{path}: the recorded dataset folder {data} no longer exists; record the new location "
            f"with `autoseg fingerprint NEW_DATA -o {run_dir}`"
        )
    return data


def run_dataset(run_dir: Path | str) -> DatasetSpec:
    return discover(dataset_dir(run_dir))


def reference_labels(run_dir: Path | str, spec: DatasetSpec) -> Path:
    """``RUN/references/<case><ending>``: links to the training label files under the names predictions get."""
    folder = Path(run_dir) / "references"
    folder.mkdir(parents=True, exist_ok=True)
    for case in spec.cases:
        if case.label is None:
            continue
        link = folder / f"{case.id}{file_ending(case.label) or '.nii.gz'}"
        if link.exists() or link.is_symlink():
            continue
        try:
            os.symlink(case.label.resolve(), link)
        except OSError:
            shutil.copy(case.label, link)
    return folder
