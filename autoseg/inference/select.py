"""``autoseg select``: choose configurations, ensemble and postprocessing on cross-validation.

Every trained configuration's out-of-fold predictions (each case predicted by the fold that did not train on
it) are evaluated; so are ensembles of configurations (probabilities averaged). The best by mean foreground Dice
wins; its paired difference to the runner-up gets a bootstrap 95% interval. Postprocessing (largest connected
component of all foreground, or per class; removal of small components) is tried on the winner's predictions and
kept only when no class gets worse and the mean improves. The result is ``RUN/selection.json``, which
``autoseg predict`` uses by default.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from pathlib import Path

import numpy as np

from autoseg.data.io import file_ending, read_label, write_image
from autoseg.errors import InferenceError
from autoseg.evaluation.evaluate import evaluate_folders
from autoseg.evaluation.metrics import dice
from autoseg.evaluation.statistics import paired_bootstrap
from autoseg.fingerprint import load_fingerprint
from autoseg.inference.postprocessing import PostprocessingSpec, apply_postprocessing
from autoseg.inference.predictor import probabilities_to_labels
from autoseg.inference.selection import Selection
from autoseg.inference.validation import validation_dir
from autoseg.planning.plans import Plans, load_plans
from autoseg.runfolder import RunFolder, reference_labels, run_dataset
from autoseg.serialization import save_json
from autoseg.training.splits import load_splits

__all__ = ["Selection", "select"]

log = logging.getLogger(__name__)


def _cv_predictions(run_dir: Path, config: str, n_folds: int, case_ids: list[str]) -> dict[str, Path] | None:
    """Case -> out-of-fold label file of ``config``, or None when a fold's validation is missing."""
    found: dict[str, Path] = {}
    for fold in range(n_folds):
        folder = validation_dir(run_dir, config, fold)
        if not (folder / "summary.json").is_file():
            return None
        for path in folder.iterdir():
            name = path.name[: len(path.name) - len(file_ending(path))] if file_ending(path) else None
            if name in case_ids:
                found[name] = path
    return found if set(found) == set(case_ids) else None


def _link_folder(folder: Path, files: dict[str, Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for case, path in files.items():
        link = folder / f"{case}{file_ending(path)}"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(path.resolve(), link)
    return folder


def _ensemble(
    run_dir: Path, plans: Plans, configs: tuple[str, ...], members: dict[str, dict[str, Path]], folder: Path
) -> dict[str, Path]:
    """Average the configurations' stored probabilities per case, write the arg-max label maps."""
    out: dict[str, Path] = {}
    folder.mkdir(parents=True, exist_ok=True)
    for case, path in members[configs[0]].items():
        target = folder / path.name
        out[case] = target
        if target.is_file():
            continue
        probs = None
        for config in configs:
            npz = members[config][case].with_name(f"{case}.npz")
            if not npz.is_file():
                raise InferenceError(
                    f"{npz}: probabilities missing; they are written when the plan has several configurations"
                )
            p = np.load(npz)["probabilities"].astype(np.float32)
            probs = p if probs is None else probs + p
        assert probs is not None  # configs is never empty
        _, geometry = read_label(path)
        write_image(probabilities_to_labels(probs / len(configs), plans), geometry, target)
    return out


def _per_case_dice(summary) -> dict[str, float]:
    return {c.case: float(np.nanmean([m.dice for m in c.metrics.values()])) for c in summary.cases}


def _postprocessing_candidates(plans: Plans, fingerprint) -> list[PostprocessingSpec]:
    classes = plans.foreground_values
    specs = [PostprocessingSpec(keep_largest_foreground=True)]
    specs += [PostprocessingSpec(keep_largest_classes=(v,)) for v in classes]
    for cls in fingerprint.classes if fingerprint is not None else ():
        if cls.object_volume_mm3_p10:
            specs.append(PostprocessingSpec(min_component_mm3={str(cls.label): 0.25 * cls.object_volume_mm3_p10}))
    return specs


def _choose_postprocessing(
    files: dict[str, Path], refs: Path, plans: Plans, fingerprint
) -> tuple[PostprocessingSpec | None, dict[str, float]]:
    """Greedy: accept each candidate that improves the mean Dice without lowering any class's mean Dice."""
    if plans.regions:
        return None, {}
    classes = plans.foreground_values
    cases = []
    for case, path in files.items():
        pred, geometry = read_label(path)
        ref_path = next(refs.glob(f"{case}.*"))
        ref, _ = read_label(ref_path, reference=geometry)
        cases.append((pred, ref, geometry.voxel_volume_mm3))

    def table(spec: PostprocessingSpec) -> np.ndarray:
        rows = []
        for pred, ref, voxel in cases:
            out = apply_postprocessing(pred, spec, voxel) if not spec.is_identity else pred
            rows.append([dice(out == v, ref == v) for v in classes])
        return np.nanmean(np.array(rows, float), axis=0)

    current, chosen = table(PostprocessingSpec()), PostprocessingSpec()
    before = float(np.mean(current))
    for candidate in _postprocessing_candidates(plans, fingerprint):
        merged = dataclasses.replace(
            chosen,
            keep_largest_foreground=chosen.keep_largest_foreground or candidate.keep_largest_foreground,
            keep_largest_classes=tuple(sorted(set(chosen.keep_largest_classes) | set(candidate.keep_largest_classes))),
            min_component_mm3={**chosen.min_component_mm3, **candidate.min_component_mm3},
        )
        scores = table(merged)
        if np.all(scores >= current - 1e-9) and scores.mean() > current.mean() + 1e-5:
            chosen, current = merged, scores
            log.info("postprocessing accepted: %s (mean Dice %.4f)", candidate, scores.mean())
    result = None if chosen.is_identity else chosen
    return result, {"before": before, "after": float(np.mean(current))}


def select(run_dir: Path | str, *, configurations: list[str] | None = None) -> Selection | None:
    """Evaluate every trained configuration and their ensembles on cross-validation; write ``selection.json``.

    None when the plan trains one model on all cases (``plans.cross_validation`` false): nothing to select from.
    """
    run_dir = Path(run_dir)
    plans = load_plans(run_dir)
    if not plans.cross_validation:
        log.warning("%s: the plan trains one model on all cases (no cross-validation): nothing to select", run_dir)
        return None
    spec = run_dataset(run_dir)
    splits = load_splits(RunFolder(run_dir).splits)
    case_ids = list(splits.case_ids)
    refs = reference_labels(run_dir, spec)
    members = {}
    for config in configurations or list(plans.configurations):
        files = _cv_predictions(run_dir, config, splits.n_folds, case_ids)
        if files is not None:
            members[config] = files
        else:
            log.info("%s: not every fold has validation predictions; left out of the selection", config)
    if not members:
        raise InferenceError(
            f"{run_dir}: no configuration has cross-validation predictions for all "
            f"{splits.n_folds} folds; train them first (`autoseg train {run_dir} -f cv`)"
        )
    candidates: dict[tuple[str, ...], dict[str, Path]] = {(c,): f for c, f in members.items()}
    for r in range(2, len(members) + 1):
        for combo in itertools.combinations(sorted(members), r):
            name = "+".join(combo)
            candidates[combo] = _ensemble(run_dir, plans, combo, members, run_dir / "selection" / name)
    scores, per_case, per_class = {}, {}, {}
    for combo, files in candidates.items():
        name = "+".join(combo)
        folder = _link_folder(run_dir / "selection" / name, files) if len(combo) == 1 else run_dir / "selection" / name
        summary = evaluate_folders(
            folder,
            refs,
            regions=plans.regions or None,
            ignore_label=plans.ignore_label,
            labels=None if plans.regions else list(plans.foreground_values),
            workers=1,
            only_cases=case_ids,
        )
        scores[name] = float(summary.foreground_mean.get("dice", 0.0))
        per_case[name] = _per_case_dice(summary)
        per_class[name] = {k: float(v["dice"].mean) for k, v in summary.per_class.items()}
        log.info("candidate %s: mean foreground Dice %.4f", name, scores[name])
    ranked = sorted(scores, key=scores.__getitem__, reverse=True)
    best = ranked[0]
    difference = {}
    if len(ranked) > 1:
        a = np.array([per_case[best][c] for c in case_ids])
        b = np.array([per_case[ranked[1]][c] for c in case_ids])
        mean, low, high = paired_bootstrap(a, b)
        difference = {"mean": float(mean), "ci_low": float(low), "ci_high": float(high)}
    try:
        fingerprint = load_fingerprint(run_dir)
    except Exception:  # an imported or missing fingerprint only disables the size-based candidates
        fingerprint = None
    best_combo = tuple(best.split("+"))
    postprocessing, pp_scores = _choose_postprocessing(candidates[best_combo], refs, plans, fingerprint)
    selection = Selection(
        configurations=best_combo,
        postprocessing=postprocessing,
        candidates=scores,
        per_class_dice=per_class,
        best=best,
        runner_up=ranked[1] if len(ranked) > 1 else None,
        difference_to_runner_up=difference,
        postprocessing_dice=pp_scores,
        n_cases=len(case_ids),
    )
    save_json(selection, RunFolder(run_dir).selection)
    return selection
