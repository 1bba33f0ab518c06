"""``autoseg analyze calibration``: are the voxel probabilities calibrated, and does a case score flag poor cases?

Every case (out-of-fold on the cross-validation, or a labelled test folder predicted by every fold) is predicted
uncalibrated (T = 1). Within a band around the structures (reference ∪ prediction dilated by ``band`` voxels, so
that easy background does not dominate) each foreground class's probability is paired with whether the voxel is of
that class; from these pairs come the expected calibration error (ECE, equal-width bins) and the reliability
diagram. One temperature is fitted on the band voxels' logits by minimising the negative log-likelihood (softmax of
logits / T; sigmoid for region outputs). The logits are the log-probabilities of the model's prediction, which are
its logits up to a per-voxel constant for one model on the image grid, so the same T is right for the predictor.
ECE after scaling is cross-fitted: each fold's cases get the T fitted on the other folds' cases.

Each per-case uncertainty score (:mod:`autoseg.inference.uncertainty`) is compared with the case's mean foreground
Dice: Spearman correlation with 1 - Dice, and the area under the risk-coverage curve (AURC) of "flag the most
uncertain cases for review, accept the rest" (risk = mean 1 - Dice of the accepted cases). The lowest AURC wins.

On the cross-validation the temperature and the winning score are stored in ``RUN/calibration.json``, which
``autoseg predict`` applies; a test folder is only measured. Writes ``RUN/analysis/calibration.json``,
``calibration.png`` (reliability diagram) and ``risk_coverage.png``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, optimize, special, stats

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
from autoseg.inference.predictor import Predictor
from autoseg.inference.uncertainty import SCORES, Calibration, flip_volume_cv, load_calibration, save_calibration
from autoseg.planning.plans import Plans, load_plans

__all__ = [
    "expected_calibration_error",
    "fit_temperature",
    "risk_coverage",
    "analyze_calibration",
    "command",
]

log = logging.getLogger(__name__)

#: Band voxels kept per case (a random sample beyond), so that fitting stays fast and large cases do not dominate.
VOXELS_PER_CASE = 50_000
_EPS = 1e-7


def expected_calibration_error(
    probabilities: np.ndarray, targets: np.ndarray, *, bins: int = 15
) -> tuple[float, dict[str, list[float]]]:
    """Expected calibration error of binary predictions, and the reliability diagram's bins.

    Parameters
    ----------
    probabilities : (N,) predicted probabilities of the positive event, in [0, 1].
    targets : (N,) whether the event happened (bool or 0/1).
    bins : equal-width bins over [0, 1].

    Returns
    -------
    (ece, diagram) : ECE = sum over bins of (n_b / N) |mean probability_b - frequency_b|; ``diagram`` holds per
        non-empty bin its ``confidence`` (mean probability), ``frequency`` (observed rate) and ``count``.
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(targets, dtype=np.float64).ravel()
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"probabilities and targets need the same non-zero length; got {p.shape} and {y.shape}")
    which = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    used = count > 0
    n = count[used]
    confidence = np.bincount(which, weights=p, minlength=bins)[used] / n
    frequency = np.bincount(which, weights=y, minlength=bins)[used] / n
    ece = float(np.sum(n * np.abs(confidence - frequency)) / p.size)
    return ece, {"confidence": confidence.tolist(), "frequency": frequency.tolist(), "count": n.tolist()}


def _nll(logits: np.ndarray, targets: np.ndarray, *, regions: bool) -> float:
    """Mean negative log-likelihood: softmax with class-index targets (N,), or sigmoid with (N, K) bool targets."""
    if regions:  # -log sigmoid(x) = log(1 + e^-x); -log(1 - sigmoid(x)) = log(1 + e^x)
        return float(np.mean(np.logaddexp(0.0, np.where(targets, -logits, logits))))
    log_p = special.log_softmax(logits, axis=1)
    return float(-np.mean(log_p[np.arange(len(targets)), targets]))


def fit_temperature(logits: np.ndarray, targets: np.ndarray, *, regions: bool = False) -> float:
    """The temperature T > 0 minimising the NLL of ``logits / T`` (one scalar for every class and voxel).

    ``logits`` (N, K); ``targets`` (N,) class indices for softmax outputs, or (N, K) bool for sigmoid (region)
    outputs. Brent's method on log T in [-5, 5] (T between 0.007 and 148).
    """
    logits = np.asarray(logits, dtype=np.float64)
    result = optimize.minimize_scalar(
        lambda log_t: _nll(logits / np.exp(log_t), targets, regions=regions), bounds=(-5.0, 5.0), method="bounded"
    )
    return float(np.exp(result.x))


def risk_coverage(scores: np.ndarray, dice_values: np.ndarray) -> dict[str, float | list[float]]:
    """How well ``scores`` (higher = less trustworthy) rank cases by their Dice.

    Cases are accepted from the lowest score up; at coverage k / n the risk is the mean 1 - Dice of the k accepted
    cases. Returns ``aurc`` (mean risk over k = 1..n), ``aurc_optimal`` (the same with cases ordered by their true
    Dice), ``spearman`` and its ``p_value`` (rank correlation of score with 1 - Dice; NaN when either is constant),
    and the curves (``coverage``, ``risk``, ``risk_optimal``).
    """
    s = np.asarray(scores, dtype=np.float64)
    risk = 1.0 - np.asarray(dice_values, dtype=np.float64)
    n = np.arange(1, len(risk) + 1)
    curve = np.cumsum(risk[np.argsort(s, kind="stable")]) / n
    optimal = np.cumsum(np.sort(risk)) / n
    constant = np.ptp(s) == 0 or np.ptp(risk) == 0
    rho, p = (np.nan, np.nan) if constant or len(s) < 3 else stats.spearmanr(s, risk)
    return {
        "aurc": float(curve.mean()),
        "aurc_optimal": float(optimal.mean()),
        "spearman": float(rho),
        "p_value": float(p),
        "coverage": (n / len(risk)).tolist(),
        "risk": curve.tolist(),
        "risk_optimal": optimal.tolist(),
    }


@dataclass
class _CaseData:
    id: str
    group: str  # fold (cross-validation) or a case-index bucket: the unit of cross-fitting
    dice: float
    scores: dict[str, float]
    logits: np.ndarray  # (n, K) band voxels
    targets: np.ndarray  # (n,) class index, or (n, K) bool for regions


def _band_voxels(
    probabilities: np.ndarray, labels: np.ndarray, reference: np.ndarray, plans: Plans, band: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (n, K) and targets of the voxels within ``band`` voxels of the reference or the prediction."""
    mask = (reference > 0) | (labels > 0)
    if plans.ignore_label is not None:
        mask &= reference != plans.ignore_label
    if band > 0 and mask.any():
        mask = ndimage.binary_dilation(mask, iterations=band)
    if plans.ignore_label is not None:
        mask &= reference != plans.ignore_label
    index = np.flatnonzero(mask)
    if index.size > VOXELS_PER_CASE:
        index = np.sort(np.random.default_rng(seed).choice(index, VOXELS_PER_CASE, replace=False))
    p = np.clip(probabilities.reshape(len(probabilities), -1)[:, index].T.astype(np.float64), _EPS, 1 - _EPS)
    ref = reference.ravel()[index]
    if plans.regions:
        return special.logit(p), np.stack([np.isin(ref, g) for g in plans.regions.values()], axis=1)
    classes = np.zeros(int(max(ref.max(initial=0), *plans.foreground_values)) + 1, np.int64)
    classes[list(plans.foreground_values)] = np.arange(1, len(plans.foreground_values) + 1)
    return np.log(p), classes[ref]


def _probability_pairs(logits: np.ndarray, targets: np.ndarray, temperature: float, regions: bool):
    """Foreground channels' probabilities after ``logits / temperature`` and their binary targets, flattened."""
    if regions:
        return special.expit(logits / temperature).ravel(), targets.ravel()
    p = special.softmax(logits / temperature, axis=1)[:, 1:]
    onehot = targets[:, None] == np.arange(1, logits.shape[1])[None, :]
    return p.ravel(), onehot.ravel()


def _collect(
    run_dir: Path, plans: Plans, config: str, cases: list[AnalysisCase], *, band: int, device: str, mirror_mode: str
) -> list[_CaseData]:
    """Predict every case uncalibrated and gather its Dice, uncertainty scores and band voxels."""
    models = fold_predictors(run_dir, config, cases, device=device, mirror_mode=mirror_mode, temperatures={})
    ensemble = Predictor(run_dir, configs=[config], plans=plans, device=device, mirror_mode="none", temperatures={})
    out = []
    for i, case in enumerate(cases):
        image, geometry, reference = read_case(case)
        model = models[case.fold]
        prediction = model.predict(image, geometry, keep_probabilities=True, uncertainty=True)
        assert prediction.probabilities is not None
        scores = {"mean_entropy_foreground": prediction.scores["mean_entropy_foreground"]}
        if len(ensemble.members[config]) > 1:
            members = prediction if case.fold is None else ensemble.predict(image, geometry, uncertainty=True)
            scores["mean_disagreement_foreground"] = members.scores["mean_disagreement_foreground"]
        scores["flip_volume_cv"] = flip_volume_cv(model, image, geometry)
        logits, targets = _band_voxels(prediction.probabilities, prediction.labels, reference, plans, band, seed=i)
        group = case.fold if case.fold is not None else str(i % 5)
        case_dice = mean_foreground_dice(prediction.labels, reference, plans)
        out.append(_CaseData(case.id, group, case_dice, scores, logits, targets))
        log.info("calibration: %d/%d %s Dice %.4f", i + 1, len(cases), case.id, out[-1].dice)
    return out


def _stack(data: list[_CaseData]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([d.logits for d in data]), np.concatenate([d.targets for d in data])


def _cross_fitted_pairs(data: list[_CaseData], regions: bool) -> tuple[np.ndarray, np.ndarray]:
    """Probability pairs with each group's voxels scaled by the T fitted on the other groups (all, if one)."""
    ps, ys = [], []
    for g in sorted({d.group for d in data}):
        t = fit_temperature(*_stack([d for d in data if d.group != g] or data), regions=regions)
        p, y = _probability_pairs(*_stack([d for d in data if d.group == g]), t, regions)
        ps.append(p)
        ys.append(y)
    return np.concatenate(ps), np.concatenate(ys)


def _reliability_figure(diagrams: dict[str, dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    for (name, d), marker in zip(diagrams.items(), "os^"):
        ax.plot(d["confidence"], d["frequency"], marker=marker, markersize=4, label=name)
    ax.set(xlabel="predicted probability (foreground class)", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _risk_figure(rankings: dict[str, dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for name, r in rankings.items():
        ax.plot(r["coverage"], r["risk"], marker=".", label=f"{name} (AURC {r['aurc']:.3f})")
    first = next(iter(rankings.values()))
    ax.plot(first["coverage"], first["risk_optimal"], color="0.6", linestyle="--", label="oracle (true Dice)")
    ax.set(xlabel="coverage (cases accepted without review)", ylabel="risk (mean 1 - Dice of accepted)")
    ax.legend(fontsize=7)
    return fig


def _best_score(rankings: dict[str, dict]) -> str:
    """The score with the lowest AURC (ties: the higher Spearman correlation)."""
    return min(rankings, key=lambda k: (rankings[k]["aurc"], -np.nan_to_num(rankings[k]["spearman"], nan=-2.0)))


def analyze_calibration(
    run_dir: Path | str,
    *,
    images: Path | None = None,
    labels: Path | None = None,
    config: str | None = None,
    band: int = 3,
    bins: int = 15,
    device: str = "auto",
    mirror_mode: str = "auto",
    store: bool = True,
) -> dict:
    """Measure calibration and uncertainty scores of a run (see the module docstring); returns the report written
    to ``RUN/analysis/calibration.json``. On the cross-validation, ``store`` writes ``RUN/calibration.json``.
    ``mirror_mode`` is the test-time mirroring of the evaluated predictions (as ``autoseg predict --mirror``)."""
    run_dir = Path(run_dir)
    plans = load_plans(run_dir)
    config = analysis_config(run_dir, plans, config)
    cases = analysis_cases(run_dir, config, images, labels)
    data = _collect(run_dir, plans, config, cases, band=band, device=device, mirror_mode=mirror_mode)
    regions = bool(plans.regions)
    logits, targets = _stack(data)
    temperature = fit_temperature(logits, targets, regions=regions)
    ece_before, before = expected_calibration_error(*_probability_pairs(logits, targets, 1.0, regions), bins=bins)
    ece_after, after = expected_calibration_error(*_cross_fitted_pairs(data, regions), bins=bins)
    dice_values = np.array([d.dice for d in data])
    rankings = {
        name: risk_coverage(np.array([d.scores[name] for d in data]), dice_values)
        for name in SCORES
        if all(name in d.scores for d in data)
    }
    best = _best_score(rankings)
    source = "cross-validation" if images is None else f"test folder {images}"
    report = {
        "format": 1,
        "configuration": config,
        "source": source,
        "band_voxels": band,
        "n_cases": len(data),
        "n_voxels": int(len(logits)),
        "temperature": temperature,
        "ece_before": ece_before,
        "ece_after": ece_after,
        "nll_before": _nll(logits, targets, regions=regions),
        "nll_after": _nll(logits / temperature, targets, regions=regions),
        "reliability": {"before": before, "after": after},
        "scores": rankings,
        "best_score": best,
        "cases": [{"case": d.id, "group": d.group, "dice": d.dice, **d.scores} for d in data],
    }
    if store and images is None:
        previous = load_calibration(run_dir)
        temperatures = {**previous.temperatures, config: temperature}
        report["stored"] = str(save_calibration(run_dir, Calibration(temperatures, best)))
    write_analysis_json(run_dir, "calibration", report)
    title = f"{config}, {source}: ECE {ece_before:.4f} -> {ece_after:.4f} (T = {temperature:.2f})"
    diagrams = {f"before (ECE {ece_before:.3f})": before, f"after T = {temperature:.2f} (ECE {ece_after:.3f})": after}
    save_figure(_reliability_figure(diagrams, title), analysis_dir(run_dir) / "calibration.png")
    save_figure(_risk_figure(rankings), analysis_dir(run_dir) / "risk_coverage.png")
    return report


def command(args: argparse.Namespace) -> int:
    """``autoseg analyze calibration``."""
    report = analyze_calibration(
        args.run,
        band=args.band,
        bins=args.bins,
        store=not args.no_store,
        **run_options(args),
    )
    print(
        f"{report['configuration']} on {report['source']} ({report['n_cases']} cases, "
        f"{report['n_voxels']} band voxels): ECE {report['ece_before']:.4f} -> {report['ece_after']:.4f} with "
        f"T = {report['temperature']:.3f} (NLL {report['nll_before']:.4f} -> {report['nll_after']:.4f})"
    )
    for name, r in report["scores"].items():
        print(
            f"  {name}: Spearman {r['spearman']:+.3f} (p {r['p_value']:.3g}), AURC {r['aurc']:.4f} "
            f"(oracle {r['aurc_optimal']:.4f})"
        )
    stored = f"; stored in {report['stored']}" if "stored" in report else ""
    print(f"best uncertainty score: {report['best_score']}{stored}")
    print(f"report and figures in {analysis_dir(args.run)}")
    return 0
