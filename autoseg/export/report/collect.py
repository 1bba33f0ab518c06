"""What the HTML report shows, read from a run folder: every artifact is optional, and what is missing is said.

Nothing here draws or formats; :mod:`autoseg.export.report.render` turns a :class:`ReportData` into HTML.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from autoseg.errors import AutosegError
from autoseg.evaluation.evaluate import SUMMARY_FORMAT, CaseResult, Summary
from autoseg.evaluation.statistics import paired_bootstrap
from autoseg.fingerprint import Fingerprint, load_fingerprint
from autoseg.inference.selection import Selection, load_selection
from autoseg.planning.plans import Plans, load_plans
from autoseg.runfolder import RunFolder, run_dataset
from autoseg.serialization import load_json

__all__ = ["ClassInterval", "CrossValidation", "WorstCase", "ReportData", "collect_report_data", "class_names"]

log = logging.getLogger(__name__)

#: Cases shown with slice overlays (lowest mean foreground Dice first).
N_WORST = 3

T = TypeVar("T")


@dataclass(frozen=True)
class ClassInterval:
    """Mean Dice of one class over the cases where it is defined, with its percentile bootstrap 95% interval."""

    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class CrossValidation:
    """Out-of-fold results of one candidate (a configuration or an ensemble): per case and class."""

    name: str
    source: str  # where the results were read, for the reader
    cases: tuple[CaseResult, ...]
    classes: tuple[str, ...]
    intervals: dict[str, ClassInterval]  # class key -> Dice interval; "mean" for the per-case foreground mean
    folds_missing: tuple[str, ...] = ()

    def case_dice(self, case: CaseResult) -> float:
        """Mean Dice over the classes defined in ``case`` (NaN when none is)."""
        values = [case.metrics[c].dice for c in self.classes if c in case.metrics]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")


@dataclass(frozen=True)
class WorstCase:
    """A case with low cross-validation Dice, and the files its slice overlay is drawn from."""

    case: str
    candidate: str
    dice: float
    prediction: Path
    reference: Path
    image: Path | None  # first channel of the training image; None when the dataset folder is gone


@dataclass
class ReportData:
    """Everything the report shows; ``None``/empty where the run has not produced it, with ``missing`` saying why."""

    run: Path
    fingerprint: Fingerprint | None = None
    plans: Plans | None = None
    selection: Selection | None = None
    curves: dict[str, dict[str, list[dict]]] = field(default_factory=dict)  # config -> fold -> log.jsonl records
    cross_validation: list[CrossValidation] = field(default_factory=list)
    worst: list[WorstCase] = field(default_factory=list)
    search_images: list[Path] = field(default_factory=list)
    analysis_images: list[Path] = field(default_factory=list)
    analysis_json: dict[str, Any] = field(default_factory=dict)  # file name -> parsed JSON
    missing: dict[str, list[str]] = field(default_factory=dict)  # section id -> what is missing or unreadable

    def note(self, section: str, text: str) -> None:
        self.missing.setdefault(section, []).append(text)


def class_names(plans: Plans | None, fingerprint: Fingerprint | None) -> dict[str, str]:
    """Class key as stored in summaries (label value as str, or region name) -> readable name."""
    labels = plans.labels if plans is not None else fingerprint.labels if fingerprint is not None else {}
    return {str(value): name for name, value in labels.items()}


def _read(data: ReportData, section: str, path: Path, load: Callable[[Path], T], hint: str) -> T | None:
    """``load(path)``, or None with a note for ``section`` when ``path`` is absent (``hint`` says what makes it)
    or unreadable (the error says why)."""
    if not path.is_file():
        data.note(section, f"{path.name} not found in {path.parent}: {hint}")
        return None
    try:
        return load(path)
    except (AutosegError, ValueError, OSError) as exc:
        data.note(section, f"{path}: could not be read ({exc})")
        return None


def _history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _collect_curves(data: ReportData, run: RunFolder) -> None:
    for folder in sorted(run.models.glob("*/fold_*")):
        history = _read(data, "training", folder / "log.jsonl", _history, "the fold has not finished an epoch")
        if history:
            data.curves.setdefault(folder.parent.name, {})[folder.name.removeprefix("fold_")] = history
    if not data.curves and "training" not in data.missing:
        data.note("training", f"no trained fold in {run.models}: run `autoseg train {run.root}`")


def _load_summary(path: Path) -> Summary:
    return load_json(Summary, path, format_version=SUMMARY_FORMAT)


def interval(values: list[float]) -> ClassInterval:
    """Mean and bootstrap 95% interval of the finite ``values`` (NaN when there are none)."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], float)
    if finite.size == 0:
        return ClassInterval(float("nan"), float("nan"), float("nan"), 0)
    mean, low, high = paired_bootstrap(finite, np.zeros_like(finite))
    return ClassInterval(mean, low, high, int(finite.size))


def _cross_validation(
    name: str, source: str, cases: list[CaseResult], missing: tuple[str, ...] = ()
) -> CrossValidation:
    classes = tuple(sorted({c for case in cases for c in case.metrics}, key=lambda k: (not k.isdigit(), len(k), k)))
    cv = CrossValidation(name, source, tuple(sorted(cases, key=lambda c: c.case)), classes, {}, missing)
    for key in classes:
        cv.intervals[key] = interval([case.metrics[key].dice for case in cases if key in case.metrics])
    cv.intervals["mean"] = interval([cv.case_dice(case) for case in cases])
    return cv


def _collect_cross_validation(data: ReportData, run: RunFolder) -> None:
    """Every candidate ``autoseg select`` evaluated (``RUN/selection/<candidate>/summary.json``); without a
    selection, each configuration's fold summaries (``validation/summary.json``) merged, noting missing folds."""
    if data.selection is not None:
        for name in data.selection.candidates:
            path = run.root / "selection" / name / "summary.json"
            summary = _read(data, "cross-validation", path, _load_summary, "run `autoseg select` again")
            if summary is not None:
                data.cross_validation.append(_cross_validation(name, str(path.parent), list(summary.cases)))
        return
    if data.plans is not None and not data.plans.cross_validation:
        data.note("cross-validation", "the plan trains one model on all cases (small time budget): no cross-validation")
        return
    for config_dir in sorted(p for p in run.models.glob("*") if p.is_dir()):
        cases: list[CaseResult] = []
        missing = []
        for fold in sorted(config_dir.glob("fold_[0-9]*")):
            path = fold / "validation" / "summary.json"
            if not path.is_file():
                missing.append(fold.name)
                continue
            summary = _read(data, "cross-validation", path, _load_summary, "")
            cases += list(summary.cases) if summary is not None else []
        if cases:
            source = f"{config_dir}/fold_*/validation/summary.json"
            data.cross_validation.append(_cross_validation(config_dir.name, source, cases, tuple(missing)))
    if not data.cross_validation:
        data.note("cross-validation", "no fold has validation results yet: run `autoseg run` or `autoseg train -f cv`")
    else:
        data.note("cross-validation", f"selection.json not found: run `autoseg select {run.root}` to choose")


def _local(path: Path, folder: Path) -> Path:
    """``path`` (recorded in a summary, perhaps before the run folder moved) as found now: in ``folder`` first."""
    here = folder / path.name
    return here if here.exists() else path


def _collect_worst(data: ReportData, run: RunFolder) -> None:
    """The :data:`N_WORST` cases of the chosen candidate (else the best one) with the lowest mean Dice."""
    if not data.cross_validation:
        data.note("worst-cases", "no cross-validation results yet")
        return
    chosen = data.selection.best if data.selection is not None else None
    cv = next((c for c in data.cross_validation if c.name == chosen), None)
    cv = cv or max(data.cross_validation, key=lambda c: np.nan_to_num(c.intervals["mean"].mean, nan=-1.0))
    try:
        spec = run_dataset(run.root)
        images: dict[str, Path] = {c.id: c.images[0] for c in spec.cases}
    except AutosegError as exc:
        data.note("worst-cases", f"images not shown: {exc}")
        images = {}
    ranked = sorted(cv.cases, key=lambda c: np.nan_to_num(cv.case_dice(c), nan=2.0))
    for case in ranked[:N_WORST]:
        folder = Path(cv.source) if Path(cv.source).is_dir() else case.prediction.parent
        prediction = _local(case.prediction, folder)
        reference = _local(case.reference, run.references)
        if not (prediction.exists() and reference.exists()):
            data.note("worst-cases", f"{case.case}: prediction {prediction} or reference {reference} not found")
            continue
        image = images.get(case.case)
        data.worst.append(WorstCase(case.case, cv.name, cv.case_dice(case), prediction, reference, image))


def _collect_analysis(data: ReportData, run: RunFolder) -> None:
    folder = run.analysis
    data.analysis_images = sorted(folder.glob("*.png"))
    for path in sorted(folder.glob("*.json")):
        parsed = _read(data, "analysis", path, lambda p: json.loads(p.read_text()), "")
        if parsed is not None:
            data.analysis_json[path.name] = parsed
    if not data.analysis_images and not data.analysis_json:
        data.note("analysis", f"no analysis yet ({folder} holds no .json or .png): run `autoseg analyze {run.root}`")


def collect_report_data(run_dir: Path | str) -> ReportData:
    """Read what a run folder holds for the report; never raises for a missing or unreadable artifact."""
    run = RunFolder(run_dir)
    data = ReportData(run=run.root)
    fingerprint_hint = f"run `autoseg fingerprint DATA -o {run.root}`"
    data.fingerprint = _read(data, "fingerprint", run.fingerprint, load_fingerprint, fingerprint_hint)
    data.plans = _read(data, "plan", run.plans, load_plans, f"run `autoseg plan {run.root}`")
    if run.selection.is_file():
        data.selection = _read(data, "cross-validation", run.selection, lambda p: load_selection(p.parent), "")
    data.search_images = [p for p in (run.search / "history.png", run.search / "importances.png") if p.is_file()]
    _collect_curves(data, run)
    _collect_cross_validation(data, run)
    _collect_worst(data, run)
    _collect_analysis(data, run)
    return data
