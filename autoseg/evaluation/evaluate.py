"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Files are paired by case name (the file name without its image ending). Each pair is read with its header
geometry, the prediction mapped onto the reference's orientation when it is stored in another orientation of the
same grid, and compared with :func:`autoseg.evaluation.metrics.evaluate_case`. The result is a :class:`Summary`
written as ``summary.json`` (per case and per class metrics, per-class statistics over cases) and ``summary.csv``
(one row per case and class).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.data.geometry import Geometry
from autoseg.data.io import file_ending, read_label, strip_ending
from autoseg.errors import DatasetError
from autoseg.evaluation.metrics import ClassMetrics, class_metrics, evaluate_case
from autoseg.files import write_text_atomic
from autoseg.processes import worker_pool
from autoseg.serialization import save_json

__all__ = ["SUMMARY_FORMAT", "SUMMARY_METRICS", "MetricStats", "CaseResult", "Summary", "evaluate_folders"]

log = logging.getLogger(__name__)

SUMMARY_FORMAT = 1

#: ClassMetrics fields summarised over cases (the voxel counts tp/fp/fn are kept per case only).
SUMMARY_METRICS = tuple(f.name for f in dataclasses.fields(ClassMetrics) if f.name not in ("tp", "fp", "fn"))


@dataclass(frozen=True)
class MetricStats:
    """One metric of one class over cases; NaN (undefined) values are counted and left out of the statistics."""

    mean: float
    median: float
    std: float  # population standard deviation (ddof=0)
    n_defined: int
    n_undefined: int


@dataclass(frozen=True)
class CaseResult:
    """Metrics of one case: class key (label value as str, or region name) -> metrics."""

    case: str
    prediction: Path
    reference: Path
    metrics: dict[str, ClassMetrics]


@dataclass(frozen=True)
class Summary:
    """Everything ``evaluate_folders`` computed; written as ``summary.json``.

    ``per_class[class][metric]`` summarises a metric over cases; ``foreground_mean[metric]`` is the mean over
    classes (label 0 excluded) of the per-class means.
    """

    pred_dir: Path
    ref_dir: Path
    classes: tuple[str, ...]
    nsd_tolerance_mm: float
    cases: tuple[CaseResult, ...]
    per_class: dict[str, dict[str, MetricStats]]
    foreground_mean: dict[str, float]
    regions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    ignore_label: int | None = None
    format: int = SUMMARY_FORMAT


def _list_images(folder: Path, ending: str | None) -> dict[str, Path]:
    """Case name -> image file in ``folder`` (hidden and non-image files skipped)."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        found = file_ending(path)
        if path.name.startswith(".") or not path.is_file() or not found or (ending and found != ending.lower()):
            continue
        case = strip_ending(path)
        if case in files:
            raise DatasetError(
                f"{folder}: case {case!r} has two files ({files[case].name}, {path.name}); pass file_ending to pick one"
            )
        files[case] = path
    return files


def _pair(
    pred_dir: Path, ref_dir: Path, ending: str | None, only: Sequence[str] | None = None
) -> list[tuple[str, Path, Path]]:
    refs, preds = _list_images(ref_dir, ending), _list_images(pred_dir, ending)
    if only is not None:
        unknown = sorted(set(only) - set(refs))
        if unknown:
            raise DatasetError(f"{ref_dir}: no reference label file for case(s) {unknown[:20]}")
        refs = {case: refs[case] for case in only}
    if not refs:
        raise DatasetError(f"{ref_dir}: no reference label files{f' ending in {ending}' if ending else ''}")
    missing = sorted(set(refs) - set(preds))
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise DatasetError(f"{pred_dir}: no prediction for {len(missing)} reference case(s) in {ref_dir}: {shown}")
    extra = sorted(set(preds) - set(refs))
    if extra:
        log.warning("%s: %d prediction(s) without a reference are ignored: %s", pred_dir, len(extra), extra[:10])
    return [(case, preds[case], refs[case]) for case in sorted(refs)]


def _read_pair(pred_path: Path, ref_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read a pair on the reference grid: (pred, ref, spacing per array axis); 2D files become (Y, X)."""
    ref, ref_geo = read_label(ref_path)
    pred, pred_geo = read_label(pred_path, reference=ref_geo)
    if pred_geo.shape_zyx != ref_geo.shape_zyx or pred_geo.ndim != ref_geo.ndim:
        raise DatasetError(
            f"prediction {pred_path} has shape {pred_geo.shape_zyx} ({pred_geo.ndim}D) but reference {ref_path} has "
            f"{ref_geo.shape_zyx} ({ref_geo.ndim}D); predictions must be on the reference's voxel grid"
        )
    if not np.allclose(pred_geo.spacing_zyx, ref_geo.spacing_zyx, rtol=1e-3):
        raise DatasetError(
            f"prediction {pred_path} has spacing {pred_geo.spacing_zyx} but reference {ref_path} has "
            f"{ref_geo.spacing_zyx}; predictions must be on the reference's voxel grid"
        )
    _warn_if_moved(pred_path, pred_geo, ref_path, ref_geo)
    if ref_geo.is_2d:
        return pred[0], ref[0], tuple(ref_geo.spacing_zyx[1:])
    return pred, ref, tuple(ref_geo.spacing_zyx)


def _warn_if_moved(pred_path: Path, pred_geo: Geometry, ref_path: Path, ref_geo: Geometry) -> None:
    if not pred_geo.same_grid(ref_geo, atol=1e-2 * min(ref_geo.spacing_zyx)):
        log.warning("%s: origin/direction differ from %s; comparing voxel by voxel anyway", pred_path, ref_path)


def _present(label_map: np.ndarray) -> set[int]:
    """Label values present in ``label_map`` (a bincount when values are small, else np.unique)."""
    if label_map.size and label_map.dtype.itemsize <= 4 and 0 <= label_map.min() and label_map.max() < 1 << 20:
        return {int(v) for v in np.flatnonzero(np.bincount(label_map.ravel()))}
    return {int(v) for v in np.unique(label_map)}


def _evaluate_pair(
    pred_path: Path,
    ref_path: Path,
    labels: tuple[int, ...] | None,
    regions: dict[str, tuple[int, ...]],
    ignore_label: int | None,
    tolerance_mm: float,
) -> tuple[dict[str, ClassMetrics], set[int]]:
    """Metrics of one case and the label values its reference holds (runs in a worker process)."""
    pred, ref, spacing = _read_pair(pred_path, ref_path)
    ref_values = _present(ref)
    if labels is None and not regions:  # every label present here; the caller completes the set across cases
        labels = tuple(sorted((ref_values | _present(pred)) - {0, ignore_label}))
    metrics = evaluate_case(
        pred,
        ref,
        spacing,
        labels=labels or (),
        regions=regions,
        ignore_label=ignore_label,
        nsd_tolerance_mm=tolerance_mm,
    )
    log.info("evaluated %s", pred_path.name)
    return metrics, ref_values


def _stats(values: Sequence[float]) -> MetricStats:
    arr = np.asarray(values, dtype=np.float64)
    ok = arr[np.isfinite(arr)]
    if ok.size == 0:
        return MetricStats(math.nan, math.nan, math.nan, 0, int(arr.size))
    return MetricStats(float(ok.mean()), float(np.median(ok)), float(ok.std()), int(ok.size), int(arr.size - ok.size))


def _summarise(cases: Sequence[CaseResult], classes: Sequence[str]) -> tuple[dict, dict[str, float]]:
    per_class = {
        name: {m: _stats([getattr(c.metrics[name], m) for c in cases]) for m in SUMMARY_METRICS} for name in classes
    }
    foreground = [name for name in classes if name != "0"]
    means = {}
    for m in SUMMARY_METRICS:
        values = np.asarray([per_class[name][m].mean for name in foreground], dtype=np.float64)
        values = values[np.isfinite(values)]
        means[m] = float(values.mean()) if values.size else math.nan
    return per_class, means


def _csv_text(cases: Sequence[CaseResult], classes: Sequence[str]) -> str:
    names = [f.name for f in dataclasses.fields(ClassMetrics)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "class", *names])
    for case in cases:
        for name in classes:
            metrics = case.metrics[name]
            writer.writerow([case.case, name, *(repr(getattr(metrics, n)) for n in names)])
    return buffer.getvalue()


def _map(jobs: list[tuple], workers: int | None) -> list[tuple[dict[str, ClassMetrics], set[int]]]:
    workers = min(os.cpu_count() or 1, len(jobs)) if workers is None else workers
    if workers <= 1 or len(jobs) == 1:
        return [_evaluate_pair(*job) for job in jobs]
    with worker_pool(workers) as pool:
        return list(pool.map(_evaluate_pair, *zip(*jobs)))


def evaluate_folders(
    pred_dir: Path | str,
    ref_dir: Path | str,
    *,
    labels: Sequence[int] | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
    ignore_label: int | None = None,
    nsd_tolerance_mm: float = 1.0,
    out: Path | str | None = None,
    workers: int | None = None,
    file_ending: str | None = None,
    only_cases: Sequence[str] | None = None,
) -> Summary:
    """Compare every reference label file in ``ref_dir`` with the prediction of the same name in ``pred_dir``.

    Parameters
    ----------
    pred_dir, ref_dir : folders of label images (NIfTI, NRRD, MHA, PNG, TIFF, ...), paired by case name.
    labels : label values to evaluate; by default every non-zero value found in the references (the ignore label
        excluded), or none when ``regions`` is given.
    regions : region name -> label values it unites, each evaluated as one class.
    ignore_label : reference voxels with this value count for no metric.
    nsd_tolerance_mm : tolerance of the normalised surface distance.
    out : folder for ``summary.json`` and ``summary.csv``; by default ``pred_dir``.
    workers : processes computing cases in parallel; default: one per CPU; 0 or 1 computes in this process.
    file_ending : only pair files with this ending (e.g. ``".nii.gz"``); by default any image ending.
    only_cases : evaluate only these reference cases (e.g. the validation cases of one fold).

    Raises
    ------
    DatasetError : a reference has no prediction, a pair is not on the same grid, or a file cannot be read.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    pairs = _pair(pred_dir, ref_dir, file_ending, only_cases)
    region_map = {name: tuple(int(v) for v in values) for name, values in (regions or {}).items()}
    fixed = None if labels is None else tuple(int(v) for v in labels)
    jobs = [(pred, ref, fixed, region_map, ignore_label, nsd_tolerance_mm) for _, pred, ref in pairs]
    results = _map(jobs, workers)
    if fixed is None and not region_map:
        fixed = tuple(sorted(set().union(*(values for _, values in results)) - {0, ignore_label}))
    classes = tuple([str(v) for v in fixed or ()] + list(region_map))
    empty = class_metrics(np.zeros((1, 1), bool), np.zeros((1, 1), bool), (1.0, 1.0))
    cases = tuple(
        CaseResult(case, pred, ref, {name: metrics.get(name, empty) for name in classes})
        for (case, pred, ref), (metrics, _) in zip(pairs, results)
    )
    per_class, foreground_mean = _summarise(cases, classes)
    summary = Summary(
        pred_dir, ref_dir, classes, float(nsd_tolerance_mm), cases, per_class, foreground_mean, region_map, ignore_label
    )
    out_dir = pred_dir if out is None else Path(out)
    save_json(summary, out_dir / "summary.json")
    write_text_atomic(out_dir / "summary.csv", _csv_text(cases, classes))
    log.info(
        "evaluated %d cases, %d classes; mean foreground Dice %.4f",
        len(cases),
        len(classes),
        foreground_mean.get("dice", math.nan),
    )
    return summary
