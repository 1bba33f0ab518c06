"""``autoseg analyze subgroups``: for whom does the model fail? Dice per subgroup, with intervals and a test.

Cases are the run's cross-validation cases (their out-of-fold Dice, from each fold's ``validation/summary.json``) or
a labelled test folder (predicted by every fold). Groups come from a column of a metadata CSV (``--metadata`` with a
``case`` column, ``--by COLUMN``) or, without metadata, from image properties: coarsest spacing, voxel count and
intensity range (first channel, 0.5-99.5 percentiles) in quartiles, and the scanner fields of the headers where
present (DICOM Manufacturer / ManufacturerModelName, NIfTI description). Numeric columns are split into quartiles;
other columns give one group per value.

Per group: mean Dice with a percentile bootstrap interval (:func:`autoseg.evaluation.statistics.bootstrap_mean`).
Between groups: a permutation test (``scipy.stats.permutation_test``) of the between-group sum of squares
(sum of n_g (mean_g - mean)^2, which for two groups is the difference of means). The worst group is compared with
the rest: difference of means, its bootstrap interval (``scipy.stats.bootstrap``) and a two-sided permutation
p-value. Writes ``RUN/analysis/subgroups.json`` and ``subgroups.png``.
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np
from scipy import stats

from autoseg.analysis.common import (
    AnalysisCase,
    analysis_cases,
    analysis_config,
    analysis_dir,
    fold_predictors,
    mean_foreground_dice,
    read_case,
    run_options,
    save_figure,
    write_analysis_json,
)
from autoseg.data.io import read_images, read_scanner_fields
from autoseg.errors import ConfigError
from autoseg.evaluation.evaluate import Summary
from autoseg.evaluation.statistics import bootstrap_mean
from autoseg.planning.plans import Plans, load_plans
from autoseg.runfolder import RunFolder
from autoseg.serialization import load_json

__all__ = ["group_difference_test", "quartile_groups", "compare_groups", "analyze_subgroups", "command"]

log = logging.getLogger(__name__)


def _between_groups(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sum over groups of n_g (mean_g - grand mean)^2 (vectorised along ``axis`` for scipy's resampling)."""
    grand = np.concatenate(samples, axis=axis).mean(axis=axis)
    return sum(s.shape[axis] * (s.mean(axis=axis) - grand) ** 2 for s in samples)


def group_difference_test(groups: list[np.ndarray], *, n_resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Permutation test that the groups' values come from one distribution: ``(statistic, p_value)``.

    The statistic is the between-group sum of squares; cases are reassigned to groups of the same sizes at random
    (``scipy.stats.permutation_test``, exact when there are fewer arrangements than ``n_resamples``). Groups of
    fewer than two cases are left out; NaN when fewer than two groups remain.
    """
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g) >= 2]
    if len(groups) < 2:
        return float("nan"), float("nan")
    result = stats.permutation_test(
        groups,
        _between_groups,
        permutation_type="independent",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="greater",
        rng=np.random.default_rng(seed),
    )
    return float(result.statistic), float(result.pvalue)


def quartile_groups(values: dict[str, float]) -> dict[str, str]:
    """Case -> ``Q1`` .. ``Q4`` (with its value range) by the quartiles of ``values``; fewer groups where values tie."""
    v = np.array(list(values.values()), dtype=np.float64)
    edges = np.unique(np.quantile(v, [0.25, 0.5, 0.75]))
    which = np.searchsorted(edges, v, side="left")
    names = {}
    for q in np.unique(which):
        members = v[which == q]
        names[q] = f"Q{q + 1} [{members.min():.4g}, {members.max():.4g}]"
    return {case: names[q] for case, q in zip(values, which)}


def _difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return a.mean(axis=axis) - b.mean(axis=axis)


def compare_groups(dice: dict[str, float], groups: dict[str, str], *, n_resamples: int = 10000, seed: int = 0) -> dict:
    """Per-group mean Dice with bootstrap intervals, the permutation test between groups and the worst group vs the
    rest (see the module docstring). ``dice`` and ``groups`` are keyed by case; cases without a group are left out."""
    by_group: dict[str, list[float]] = {}
    for case, group in groups.items():
        if case in dice and np.isfinite(dice[case]):
            by_group.setdefault(group, []).append(dice[case])
    table = {}
    for name, values in sorted(by_group.items()):
        mean, low, high = bootstrap_mean(values, n_resamples=n_resamples, seed=seed)
        table[name] = {"n": len(values), "mean_dice": mean, "ci_low": low, "ci_high": high}
    statistic, p = group_difference_test([np.array(v) for v in by_group.values()], n_resamples=n_resamples, seed=seed)
    out: dict = {"groups": table, "statistic": statistic, "p_value": p}
    if len(by_group) >= 2:
        worst = min(table, key=lambda g: table[g]["mean_dice"])
        a = np.array(by_group[worst])
        b = np.concatenate([v for g, v in by_group.items() if g != worst])
        comparison = {"group": worst, "difference": float(_difference(a, b))}
        if min(len(a), len(b)) >= 2:
            rng = np.random.default_rng(seed)
            ci = stats.bootstrap((a, b), _difference, n_resamples=n_resamples, method="percentile", rng=rng)
            test = stats.permutation_test((a, b), _difference, n_resamples=n_resamples, rng=rng, vectorized=True)
            comparison |= {
                "ci_low": float(ci.confidence_interval.low),
                "ci_high": float(ci.confidence_interval.high),
                "p_value": float(test.pvalue),
            }
        out["worst_vs_rest"] = comparison
    return out


def read_metadata(path: Path, column: str) -> dict[str, str]:
    """Case -> value of ``column`` from a CSV whose ``case`` column (else its first column) names the cases."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ConfigError(f"{path}: no rows; expected a header line and one row per case")
    key = "case" if "case" in rows[0] else next(iter(rows[0]))
    if column not in rows[0]:
        raise ConfigError(f"{path}: no column {column!r}; columns: {', '.join(rows[0])}")
    return {row[key]: row[column] for row in rows if row[column] not in ("", None)}


def _group(values: dict[str, str]) -> dict[str, str]:
    """Quartiles of a numeric column, else one group per value."""
    try:
        numbers = {case: float(v) for case, v in values.items()}
    except ValueError:
        return dict(values)
    return quartile_groups(numbers)


def image_properties(case: AnalysisCase) -> dict[str, float | str]:
    """Coarsest spacing (mm; in-plane for 2D images), voxel count, intensity range and scanner fields of a case."""
    image, geometry = read_images(case.images)
    spacing = geometry.spacing_zyx[1:] if geometry.is_2d else geometry.spacing_zyx
    low, high = np.percentile(image[0], [0.5, 99.5])
    props: dict[str, float | str] = {
        "spacing_mm": float(max(spacing)),
        "size_voxels": float(np.prod(geometry.shape_zyx)),
        "intensity_range": float(high - low),
    }
    return props | read_scanner_fields(case.images[0])


def _cv_dice(run_dir: Path, config: str, cases: list[AnalysisCase]) -> dict[str, float]:
    """Out-of-fold mean foreground Dice per case from the folds' validation summaries."""
    out: dict[str, float] = {}
    for fold in sorted({c.fold for c in cases}, key=str):
        path = RunFolder(run_dir).validation(config, str(fold)) / "summary.json"
        if not path.is_file():
            raise ConfigError(f"{path}: missing; the fold's validation is written by `autoseg train` (rerun it)")
        for c in load_json(Summary, path).cases:
            out[c.case] = float(np.nanmean([m.dice for m in c.metrics.values()]))
    return out


def _test_dice(run_dir: Path, plans: Plans, config: str, cases: list[AnalysisCase], **options) -> dict[str, float]:
    """Mean foreground Dice per test case, predicted by every fold (``options`` go to the predictor)."""
    predictor = fold_predictors(run_dir, config, cases, **options)[None]
    out = {}
    for case in cases:
        image, geometry, reference = read_case(case)
        out[case.id] = mean_foreground_dice(predictor.predict(image, geometry).labels, reference, plans)
    return out


def _figure(analyses: dict[str, dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analyses = {k: v for k, v in analyses.items() if len(v["groups"]) > 1} or analyses  # one group shows nothing
    fig, axes = plt.subplots(1, len(analyses), figsize=(3.6 * len(analyses), 3.4), squeeze=False)
    for ax, (name, result) in zip(axes[0], analyses.items()):
        table = result["groups"]
        means = np.array([g["mean_dice"] for g in table.values()])
        errors = np.array([[g["mean_dice"] - g["ci_low"], g["ci_high"] - g["mean_dice"]] for g in table.values()]).T
        ax.errorbar(range(len(table)), means, yerr=errors, fmt="o", capsize=3)
        ax.set_xticks(range(len(table)), [f"{g}\n(n={t['n']})" for g, t in table.items()], fontsize=6, rotation=30)
        ax.set(ylabel="mean Dice (95% CI)")
        ax.set_title(f"{name}: permutation p = {result['p_value']:.3g}", fontsize=8)
    fig.tight_layout()
    return fig


def analyze_subgroups(
    run_dir: Path | str,
    *,
    metadata: Path | None = None,
    by: str | None = None,
    images: Path | None = None,
    labels: Path | None = None,
    config: str | None = None,
    device: str = "auto",
    mirror_mode: str = "auto",
    n_resamples: int = 10000,
    seed: int = 0,
) -> dict:
    """Compare Dice between subgroups of a run's cases (see the module docstring); returns the report written to
    ``RUN/analysis/subgroups.json``. ``by`` names a metadata column, or (without metadata) one image property."""
    run_dir = Path(run_dir)
    if metadata is not None and by is None:
        raise ConfigError(f"{metadata}: say which column defines the groups (--by COLUMN)")
    plans = load_plans(run_dir)
    config = analysis_config(run_dir, plans, config)
    cases = analysis_cases(run_dir, config, images, labels)
    if images is None:
        dice = _cv_dice(run_dir, config, cases)
    else:
        dice = _test_dice(run_dir, plans, config, cases, device=device, mirror_mode=mirror_mode)
    if metadata is not None:
        assert by is not None
        columns = {by: read_metadata(metadata, by)}
        missing = sorted(set(dice) - set(columns[by]))
        if len(missing) == len(dice):
            raise ConfigError(
                f"{metadata}: no row names a case of this run (cases: {', '.join(sorted(dice)[:5])}, ...)"
            )
        if missing:
            log.warning("%s: no %s for %d case(s), left out: %s", metadata, by, len(missing), ", ".join(missing))
    else:
        properties = {case.id: image_properties(case) for case in cases}
        names = sorted({k for p in properties.values() for k in p})
        if by is not None and by not in names:
            raise ConfigError(f"image property {by!r} unknown; available: {', '.join(names)} (or give --metadata)")
        columns = {
            name: {case: str(p[name]) for case, p in properties.items() if name in p}
            for name in ([by] if by else names)
        }
    analyses = {
        name: compare_groups(dice, _group(values), n_resamples=n_resamples, seed=seed) | {"column": name}
        for name, values in columns.items()
    }
    report = {
        "format": 1,
        "configuration": config,
        "source": "cross-validation" if images is None else f"test folder {images}",
        "metadata": str(metadata) if metadata else None,
        "n_cases": len(dice),
        "dice": dice,
        "analyses": analyses,
    }
    write_analysis_json(run_dir, "subgroups", report)
    save_figure(_figure(analyses), analysis_dir(run_dir) / "subgroups.png")
    return report


def command(args: argparse.Namespace) -> int:
    """``autoseg analyze subgroups``."""
    report = analyze_subgroups(
        args.run,
        metadata=args.metadata,
        by=args.by,
        n_resamples=args.resamples,
        seed=args.seed,
        **run_options(args),
    )
    print(f"{report['configuration']} on {report['source']}: {report['n_cases']} cases")
    for name, result in report["analyses"].items():
        print(f"{name}: permutation p = {result['p_value']:.3g}")
        for group, g in result["groups"].items():
            print(f"  {group}: Dice {g['mean_dice']:.4f} [{g['ci_low']:.4f}, {g['ci_high']:.4f}] (n={g['n']})")
        worst = result.get("worst_vs_rest")
        if worst and "ci_low" in worst:
            print(
                f"  worst {worst['group']} vs rest: {worst['difference']:+.4f} "
                f"[{worst['ci_low']:+.4f}, {worst['ci_high']:+.4f}], p = {worst['p_value']:.3g}"
            )
    print(f"report and figure in {analysis_dir(args.run)}")
    return 0
