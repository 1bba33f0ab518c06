"""``autoseg analyze robustness``: Dice under controlled perturbations of the input, at several severities.

Each case is predicted as given (the reference) and once per perturbation and severity
(:mod:`autoseg.analysis.perturbations`), the perturbation applied to the image in its own geometry before
prediction. Geometry-changing perturbations (rotation) transform the reference label map with the image, so every
Dice compares aligned maps. Cases are those of :func:`autoseg.analysis.common.analysis_cases`: the run's
cross-validation (each case predicted by the fold model that did not train on it), or a labelled test folder
(``-i IMAGES -l LABELS``, predicted by every trained fold); one configuration, no postprocessing. Writes
``RUN/analysis/robustness.json`` (the table, per class and per case, and which perturbation hurts most) and
``RUN/analysis/robustness.png`` (mean Dice against severity, one curve per perturbation, the unperturbed Dice as a
reference line).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from autoseg.analysis.common import (
    analysis_cases,
    analysis_config,
    analysis_dir,
    fold_predictors,
    read_case,
    run_options,
    save_figure,
    write_analysis_json,
)
from autoseg.analysis.perturbations import Perturbation, apply_perturbation, perturbations_for
from autoseg.evaluation.metrics import dice
from autoseg.planning.plans import Plans, load_plans

__all__ = ["class_dice", "command", "plot_robustness", "robustness_analysis", "robustness_rows"]

log = logging.getLogger(__name__)

FORMAT = 1


def class_dice(pred: np.ndarray, ref: np.ndarray, plans: Plans) -> dict[str, float]:
    """Dice per class (label value, or region name for region-based plans); NaN where both maps lack the class.
    Reference voxels of the ignore label are left out."""
    keep = None if plans.ignore_label is None else ref != plans.ignore_label
    classes = plans.regions or {str(v): (v,) for v in plans.foreground_values}
    out = {}
    for name, values in classes.items():
        p, r = np.isin(pred, values), np.isin(ref, values)
        if keep is not None:
            p, r = p & keep, r & keep
        out[name] = dice(p, r) if p.any() or r.any() else float("nan")
    return out


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _summary(per_case: dict[str, dict[str, float]]) -> dict:
    """Mean Dice over cases (of each case's mean over classes) and per class."""
    classes = sorted({c for d in per_case.values() for c in d})
    return {
        "mean_dice": _mean([_mean(list(d.values())) for d in per_case.values()]),
        "per_class": {c: _mean([d.get(c, float("nan")) for d in per_case.values()]) for c in classes},
        "per_case": {case: _mean(list(d.values())) for case, d in per_case.items()},
    }


def robustness_analysis(
    run_dir: Path | str,
    *,
    images: Path | None = None,
    labels: Path | None = None,
    config: str | None = None,
    n_cases: int | None = None,
    perturbations: Sequence[str] | None = None,
    levels: Sequence[int] = (1, 2, 3),
    device: str = "auto",
    mirror_mode: str = "auto",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Predict each case unperturbed and under every perturbation and severity; write the table and the curves.

    Parameters
    ----------
    images, labels : a labelled test folder; default the run's cross-validation (out-of-fold predictions).
    config : the configuration analysed (default: the first selected one).
    n_cases : analyse the first ``n_cases`` cases only (by case id).
    perturbations : names from :data:`~autoseg.analysis.perturbations.PERTURBATIONS` (default: all that apply).
    levels : severity levels, 1-based (1 mildest).

    Returns
    -------
    The table written to ``RUN/analysis/robustness.json``: ``reference`` (unperturbed mean Dice, per class and per
    case), ``perturbations`` (per name and level: the value, mean Dice, its drop from the reference, per class and
    per case) and ``most_harmful`` (the largest drop at the highest severity analysed).
    """
    run_dir = Path(run_dir)
    plans = load_plans(run_dir)
    config = analysis_config(run_dir, plans, config)
    cases = analysis_cases(run_dir, config, images, labels)[: n_cases or None]
    chosen = perturbations_for(perturbations, is_2d=_planar(plans))
    predictors = fold_predictors(run_dir, config, cases, device=device, mirror_mode=mirror_mode)
    reference: dict[str, dict[str, float]] = {}
    results: dict[tuple[str, int], dict[str, dict[str, float]]] = {}
    total, done = len(cases) * (1 + len(chosen) * len(levels)), 0
    for i, case in enumerate(cases):
        predictor = predictors[case.fold]
        image, geometry, label = read_case(case)
        reference[case.id] = class_dice(predictor.predict(image, geometry).labels, label, plans)
        for p in chosen:
            for level in levels:
                moved, ref = apply_perturbation(
                    p.name,
                    image,
                    geometry.spacing_zyx,
                    level,
                    label=label,
                    seed=seed + 1000 * i + level,
                    value_range=_value_range(plans, config),
                )
                assert ref is not None
                prediction = predictor.predict(moved, geometry).labels
                results.setdefault((p.name, level), {})[case.id] = class_dice(prediction, ref, plans)
                done += 1
                if progress:
                    progress(done, total)
        log.info("robustness: case %s done (%d/%d)", case.id, i + 1, len(cases))
    table = _table(reference, results, chosen, levels, config=config, seed=seed, mirror_mode=mirror_mode)
    table["source"] = "labelled test folder" if images is not None else "cross-validation (out-of-fold)"
    write_analysis_json(run_dir, "robustness", table)
    plot_robustness(table, analysis_dir(run_dir) / "robustness.png")
    return table


def _planar(plans: Plans) -> bool:
    """True for a run trained on 2D images (no missing slices to simulate)."""
    return min(plans.original_median_shape) <= 1


def _table(reference, results, chosen: list[Perturbation], levels, **facts) -> dict:
    base = _summary(reference)
    rows: dict[str, dict] = {}
    for p in chosen:
        rows[p.name] = {"parameter": p.parameter, "moves_voxels": p.moves_voxels, "levels": []}
        for level in levels:
            summary = _summary(results[(p.name, level)])
            drop = base["mean_dice"] - summary["mean_dice"]
            rows[p.name]["levels"].append({"level": level, "value": p.values[level - 1], "drop": drop, **summary})
    worst = max(rows, key=lambda n: rows[n]["levels"][-1]["drop"]) if rows else None
    return {
        "format": FORMAT,
        **facts,
        "cases": sorted(reference),
        "reference": base,
        "perturbations": rows,
        "most_harmful": None
        if worst is None
        else {
            "name": worst,
            "level": rows[worst]["levels"][-1]["level"],
            "drop": rows[worst]["levels"][-1]["drop"],
            "mean_drop_over_levels": _mean([r["drop"] for r in rows[worst]["levels"]]),
        },
    }


def plot_robustness(table: dict, path: Path) -> None:
    """Mean Dice against severity level, one curve per perturbation; the unperturbed Dice as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    base = table["reference"]["mean_dice"]
    for name, row in table["perturbations"].items():  # each curve starts at the unperturbed Dice (level 0)
        levels = [0] + [r["level"] for r in row["levels"]]
        ax.plot(levels, [base] + [r["mean_dice"] for r in row["levels"]], marker="o", label=name)
    ax.axhline(base, color="black", ls="--", lw=1, label="unperturbed")
    worst = table["most_harmful"]
    title = f"{len(table['cases'])} case(s)" + (f"; hurts most: {worst['name']}" if worst else "")
    ax.set(xlabel="severity level (0: unperturbed)", ylabel="mean foreground Dice", title=title)
    ax.set_xticks([0, *sorted({r["level"] for row in table["perturbations"].values() for r in row["levels"]})])
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path)


def _value_range(plans: Plans, config: str) -> tuple[float, float] | None:
    """8-bit colour channels hold 0..255: perturbed colour images are clipped there (the rgb scheme refuses more)."""
    schemes = {n.scheme for n in plans.configurations[config].normalization}
    return (0.0, 255.0) if schemes == {"rgb"} else None


def robustness_rows(table: dict) -> list[str]:
    """The table as text lines (one per perturbation: mean Dice per level and the drop at the highest)."""
    lines = [f"unperturbed: mean Dice {table['reference']['mean_dice']:.3f} over {len(table['cases'])} case(s)"]
    for name, row in table["perturbations"].items():
        levels = "  ".join(f"L{r['level']}={r['mean_dice']:.3f}" for r in row["levels"])
        lines.append(f"{name:15s} {levels}  (drop at L{row['levels'][-1]['level']}: {row['levels'][-1]['drop']:+.3f})")
    if table["most_harmful"]:
        lines.append(f"hurts most: {table['most_harmful']['name']}")
    return lines


def command(args: argparse.Namespace) -> int:
    """``autoseg analyze robustness``: run :func:`robustness_analysis` and print the table."""
    import sys

    from tqdm import tqdm

    with tqdm(desc="robustness", unit="prediction", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        table = robustness_analysis(
            args.run,
            n_cases=args.cases,
            perturbations=args.perturbations,
            levels=args.levels,
            seed=args.seed,
            progress=progress,
            **run_options(args),
        )
    print("\n".join(robustness_rows(table)))
    print(f"wrote {analysis_dir(args.run) / 'robustness.json'} and robustness.png")
    return 0
