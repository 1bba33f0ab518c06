"""What every ``autoseg analyze`` command shares: the labelled cases it runs on, the models that predict them,
``RUN/analysis/<name>.json`` / ``.png`` written atomically, and the ``analyze`` command group.

An analysis runs on the run's cross-validation (each training case predicted by the fold's model that did not
train on it: out-of-fold, as ``autoseg select`` sees them) or, with ``-i IMAGES -l LABELS``, on a labelled test
folder predicted by every trained fold.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoseg.errors import ConfigError, DatasetError
from autoseg.files import atomic_path, write_text_atomic
from autoseg.serialization import to_jsonable

if TYPE_CHECKING:  # the CLI imports this module to build its parser: torch and SimpleITK load when a command runs
    import numpy as np

    from autoseg.data.geometry import Geometry
    from autoseg.inference.predictor import Predictor
    from autoseg.planning.plans import Plans

__all__ = [
    "run_options",
    "ANALYSES",
    "Analysis",
    "AnalysisCase",
    "add_analyze_parser",
    "analysis_cases",
    "analysis_config",
    "analysis_dir",
    "fold_predictors",
    "mean_foreground_dice",
    "read_case",
    "save_figure",
    "write_analysis_json",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisCase:
    """A labelled case to analyse and the fold whose model predicts it (None: every fold, a test case)."""

    id: str
    images: tuple[Path, ...]
    label: Path
    fold: str | None


def analysis_config(run_dir: Path | str, plans: Plans, config: str | None = None) -> str:
    """The configuration to analyse: ``config``, else the first of the selection, else the first trained one."""
    from autoseg.inference.predictor import trained_folds
    from autoseg.inference.selection import load_selection

    run_dir = Path(run_dir)
    if config is not None:
        if config not in plans.configurations:
            raise ConfigError(f"configuration {config!r} not in the plan; available: {', '.join(plans.configurations)}")
        return config
    selection = load_selection(run_dir)
    if selection is not None:
        return selection.configurations[0]
    for name in plans.configurations:
        if trained_folds(run_dir, name):
            return name
    raise ConfigError(f"{run_dir}: no trained configuration (models/<config>/fold_*/checkpoint_final.pt)")


def analysis_cases(
    run_dir: Path | str, config: str, images: Path | None = None, labels: Path | None = None
) -> list[AnalysisCase]:
    """The cases to analyse: cross-validation cases of the trained folds of ``config``, or the test folder's.

    A test folder (``images``) needs ``labels`` holding ``<case><ending>`` for each image case.
    """
    from autoseg.inference.predict import collect_inputs
    from autoseg.inference.predictor import trained_folds
    from autoseg.planning.plans import load_plans
    from autoseg.runfolder import RunFolder, run_dataset
    from autoseg.training.splits import fold_cases, load_splits

    run_dir = Path(run_dir)
    if images is not None:
        if labels is None:
            raise ConfigError(f"{images}: a test folder needs its reference labels too (-l LABELS)")
        plans = load_plans(run_dir)
        out = []
        for case, ending in collect_inputs(images, len(plans.channels)):
            label = Path(labels) / f"{case.id}{ending}"
            if not label.is_file():
                raise DatasetError(f"{label}: reference label of test case {case.id} missing")
            out.append(AnalysisCase(case.id, case.images, label, None))
        return out
    splits = load_splits(RunFolder(run_dir).splits)
    spec = run_dataset(run_dir)
    by_id = {c.id: c for c in spec.cases}
    out = []
    for fold in trained_folds(run_dir, config):
        if fold == "all":
            continue
        for case_id in fold_cases(splits, int(fold))[1]:
            case = by_id[case_id]
            if case.label is not None:
                out.append(AnalysisCase(case_id, case.images, case.label, fold))
    if not out:
        raise ConfigError(
            f"{run_dir}: no cross-validation fold of {config} is trained (a run trained on all cases has no "
            "out-of-fold predictions); analyse a labelled test folder with -i IMAGES -l LABELS"
        )
    return sorted(out, key=lambda c: c.id)


def fold_predictors(
    run_dir: Path | str, config: str, cases: Sequence[AnalysisCase], **options: Any
) -> dict[str | None, Predictor]:
    """One predictor per fold that ``cases`` need (key None: the ensemble of every trained fold); ``options`` go to
    :class:`Predictor` (device, mirror_mode, ...). No postprocessing: analyses look at the models themselves."""
    from autoseg.inference.predictor import Predictor
    from autoseg.planning.plans import load_plans

    plans = load_plans(run_dir)
    out: dict[str | None, Predictor] = {}
    for fold in sorted({c.fold for c in cases}, key=str):
        folds = None if fold is None else [fold]
        out[fold] = Predictor(run_dir, configs=[config], folds=folds, plans=plans, **options)
    return out


def read_case(case: AnalysisCase) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """Image (C, Z, Y, X), its geometry and the reference labels (Z, Y, X) on the image grid."""
    from autoseg.data.io import read_images, read_label

    image, geometry = read_images(case.images)
    reference, _ = read_label(case.label, reference=geometry)
    return image, geometry, reference


def mean_foreground_dice(labels: np.ndarray, reference: np.ndarray, plans: Plans) -> float:
    """Mean Dice over the foreground classes (or regions) of one case, ignore-label voxels left out."""
    import numpy as np

    from autoseg.evaluation.metrics import dice

    keep = reference != plans.ignore_label if plans.ignore_label is not None else np.ones(reference.shape, bool)
    groups = list(plans.regions.values()) if plans.regions else [(v,) for v in plans.foreground_values]
    return float(np.mean([dice(np.isin(labels, g) & keep, np.isin(reference, g) & keep) for g in groups]))


def analysis_dir(run_dir: Path | str) -> Path:
    """``RUN/analysis``."""
    from autoseg.runfolder import RunFolder

    return RunFolder(run_dir).analysis


def write_analysis_json(run_dir: Path | str, name: str, data: Any) -> Path:
    """Write ``RUN/analysis/<name>.json`` atomically (numpy values converted); returns the path."""
    path = analysis_dir(run_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(to_jsonable(data), indent=2, allow_nan=True) + "\n")
    return path


def save_figure(figure: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it; returns ``path``."""
    import matplotlib.pyplot as plt

    try:
        atomic_path(Path(path), lambda tmp: figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    finally:
        plt.close(figure)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# The ``autoseg analyze`` command group. An analysis adds one entry to ANALYSES: its name, one line of help, a
# function adding its own arguments, and "module:function" of its command (imported only when it runs, so the CLI
# starts fast); the command takes the parsed arguments and returns the exit status.


@dataclass(frozen=True)
class Analysis:
    """One ``autoseg analyze NAME`` command."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    command: str  # "module:function", function(args: argparse.Namespace) -> int


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """RUN, an optional labelled test folder, configuration and device: what every analysis takes."""
    p.add_argument("run", type=Path, help="trained run folder")
    p.add_argument("-i", "--images", type=Path, default=None, help="labelled test images (default: cross-validation)")
    p.add_argument("-l", "--labels", type=Path, default=None, help="reference labels of the test images")
    p.add_argument("-c", "--config", default=None, help="configuration (default: the selected one)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--mirror",
        choices=["auto", "all", "single", "none"],
        default="auto",
        help="test-time mirroring, as autoseg predict (auto: all on a GPU, single on a CPU)",
    )


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`add_run_arguments`'s options (all but RUN), as every analysis takes them."""
    return {
        "images": args.images,
        "labels": args.labels,
        "config": args.config,
        "device": args.device,
        "mirror_mode": args.mirror,
    }


def _calibration_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--band", type=int, default=3, metavar="VOXELS", help="band around the structures (default 3)")
    p.add_argument("--bins", type=int, default=15, help="reliability diagram bins (default 15)")
    p.add_argument("--no-store", action="store_true", help="do not store the temperature in RUN/calibration.json")


def _subgroups_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--metadata", type=Path, default=None, help="CSV with a 'case' column and one column per property")
    p.add_argument("--by", default=None, help="metadata column (or image property) that defines the groups")
    p.add_argument("--resamples", type=int, default=10000, help="bootstrap and permutation resamples")
    p.add_argument("--seed", type=int, default=0)


def _robustness_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--cases", type=int, default=None, metavar="N", help="analyse the first N cases only")
    p.add_argument("--perturbations", nargs="+", default=None, help="names (default: all that apply)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3], help="severity levels 1-3 (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random parts of the perturbations")


ANALYSES: tuple[Analysis, ...] = (
    Analysis(
        "calibration",
        "ECE and reliability diagram, temperature scaling (stored for predict), uncertainty scores vs Dice",
        _calibration_arguments,
        "autoseg.analysis.calibration:command",
    ),
    Analysis(
        "subgroups",
        "Dice per subgroup (metadata column or image property) with bootstrap intervals and a permutation test",
        _subgroups_arguments,
        "autoseg.analysis.subgroups:command",
    ),
    Analysis(
        "robustness",
        "Dice under perturbations (noise, blur, intensity, gamma, bias field, resolution, rotation, missing slices)",
        _robustness_arguments,
        "autoseg.analysis.robustness:command",
    ),
)


def _runner(target: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        module, function = target.split(":")
        return getattr(importlib.import_module(module), function)(args)

    return run


def add_analyze_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``analyze`` and its ANALYSES to the ``autoseg`` subparsers ``sub``; returns the ``analyze`` parser."""
    description = "analyses of a trained run; each writes JSON and PNG into RUN/analysis/"
    parser = sub.add_parser("analyze", help=description, description=description, allow_abbrev=False)
    group = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for analysis in ANALYSES:
        p = group.add_parser(analysis.name, help=analysis.help, description=analysis.help, allow_abbrev=False)
        analysis.add_arguments(p)
        p.set_defaults(func=_runner(analysis.command))
    return parser
