"""The run folder: where every stage's output lives (:class:`RunFolder`), and its bookkeeping.

Layout (every path in the package comes from :class:`RunFolder`)::

    RUN/run.json                  the dataset folder the run was made from
    RUN/fingerprint.json          autoseg fingerprint
    RUN/plans.json                autoseg plan [search]
    RUN/splits.json               the cross-validation folds
    RUN/preprocessed/<data id>/   autoseg preprocess (one folder per data identifier)
    RUN/models/<config>/fold_<k>/ autoseg train: checkpoints, log, curve, validation/ (out-of-fold predictions)
    RUN/selection.json            autoseg select
    RUN/references/               links to the training labels under the names predictions get
    RUN/search/                   autoseg search: study and trial folders
    RUN/analysis/                 autoseg analyze: *.json summaries and *.png figures
    RUN/report.html               autoseg report (written by autoseg run at the end)
    RUN/calibration.json          autoseg analyze calibration: temperature and uncertainty score predict uses
    RUN/cluster/                  the cluster executor's own files (submitit's job scripts and logs)

A model bundle (``autoseg export``) unpacks to a run folder with plans.json, selection.json, the exported folds'
weights, ``training_data.json`` (the fingerprint's dataset-level summary) and ``manifest.json``.

``RUN/run.json`` records the dataset folder (absolute path) when the fingerprint is made; later stages that
need the original images (preprocessing, validation at full resolution, selection) read it from there.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from autoseg.data.dataset import DatasetSpec, discover
from autoseg.data.io import file_ending
from autoseg.errors import ConfigError
from autoseg.files import write_text_atomic

__all__ = ["RunFolder", "fold_dir", "record_dataset", "dataset_dir", "run_dataset", "reference_labels"]


@dataclass(frozen=True)
class RunFolder:
    """The paths of a run folder (nothing is created or read here)."""

    root: Path

    def __init__(self, root: Path | str | RunFolder):
        object.__setattr__(self, "root", Path(root.root if isinstance(root, RunFolder) else root))

    @property
    def run_info(self) -> Path:
        return self.root / "run.json"

    @property
    def fingerprint(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def data_summary(self) -> Path:
        """``training_data.json``: the training data's :class:`~autoseg.fingerprint.DataSummary` (model bundles,
        which carry no fingerprint)."""
        return self.root / "training_data.json"

    @property
    def plans(self) -> Path:
        return self.root / "plans.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def selection(self) -> Path:
        return self.root / "selection.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def references(self) -> Path:
        return self.root / "references"

    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def analysis(self) -> Path:
        """``analysis/``: ``autoseg analyze``'s results (``*.json`` summaries and ``*.png`` figures)."""
        return self.root / "analysis"

    @property
    def calibration(self) -> Path:
        """``calibration.json``: the temperature and uncertainty score ``autoseg analyze calibration`` chose."""
        return self.root / "calibration.json"

    @property
    def cluster(self) -> Path:
        """The cluster executor's own files (``--executor slurm``: submitit's job scripts, pickles and logs)."""
        return self.root / "cluster"

    @property
    def preprocessed_root(self) -> Path:
        return self.root / "preprocessed"

    def preprocessed(self, data_identifier: str) -> Path:
        """``preprocessed/<data identifier>`` (a configuration's ``data_identifier``, or its name when unset)."""
        return self.preprocessed_root / data_identifier

    @property
    def models(self) -> Path:
        return self.root / "models"

    def fold(self, config: str, fold: int | str) -> Path:
        return self.models / config / f"fold_{fold}"

    def checkpoint(self, config: str, fold: int | str, which: str = "final") -> Path:
        """``checkpoint_<which>.pt`` of a fold: ``final``, ``latest`` or ``best``."""
        return self.fold(config, fold) / f"checkpoint_{which}.pt"

    def onnx_network(self, config: str, fold: int | str) -> Path:
        """``network.onnx``: the fold's final network exported for onnxruntime (``autoseg export --onnx``)."""
        return self.fold(config, fold) / "network.onnx"

    def validation(self, config: str, fold: int | str) -> Path:
        """The fold's out-of-fold predictions and their ``summary.json``."""
        return self.fold(config, fold) / "validation"


def fold_dir(run_dir: Path | str, config: str, fold: int | str) -> Path:
    """``RUN/models/<config>/fold_<fold>``."""
    return RunFolder(run_dir).fold(config, fold)


def record_dataset(run_dir: Path | str, data_dir: Path | str) -> None:
    """Remember in ``RUN/run.json`` which dataset folder this run is made from."""
    path = RunFolder(run_dir).run_info
    info = json.loads(path.read_text()) if path.is_file() else {"format": 1}
    info["data_dir"] = str(Path(data_dir).resolve())
    write_text_atomic(path, json.dumps(info, indent=2) + "\n")


def dataset_dir(run_dir: Path | str) -> Path:
    """The dataset folder recorded in ``RUN/run.json``."""
    path = RunFolder(run_dir).run_info
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
    folder = RunFolder(run_dir).references
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
