"""Full-resolution prediction of a fold's validation cases after training, and their metrics.

Writes ``RUN/models/<config>/fold_<k>/validation/<case><ending>`` (label maps in the original geometry),
``<case>.npz`` (float16 probabilities, for ensembling configurations in ``autoseg select``) and
``summary.json``/``summary.csv`` from :func:`autoseg.evaluation.evaluate_folders`.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np

from autoseg.data.dataset import load_case
from autoseg.data.geometry import Geometry
from autoseg.data.io import file_ending, read_label, write_image
from autoseg.errors import InferenceError
from autoseg.evaluation.evaluate import Summary, evaluate_folders
from autoseg.files import atomic_path
from autoseg.inference.predictor import Predictor
from autoseg.planning.plans import Plans
from autoseg.runfolder import RunFolder, fold_dir, reference_labels, run_dataset
from autoseg.training.cascade import prediction_file
from autoseg.training.splits import fold_cases, load_splits

__all__ = ["predict_validation", "validation_dir"]

log = logging.getLogger(__name__)

#: Mirroring used for validation predictions; ``autoseg predict`` uses the same default.
VALIDATION_MIRROR_MODE = "auto"


def validation_dir(run_dir: Path | str, config: str, fold: int | str) -> Path:
    return fold_dir(run_dir, config, fold) / "validation"


def _previous_stage(
    run_dir: Path, plans: Plans, config: str, fold: int | str, case_id: str, geometry: Geometry
) -> np.ndarray | None:
    """For a cascade stage: the previous stage's prediction of the case by the same fold (out of fold)."""
    stage = plans.configurations[config].previous_stage
    if not stage:
        return None
    path = prediction_file(validation_dir(run_dir, stage, fold), case_id)
    if path is None:
        raise InferenceError(
            f"{validation_dir(run_dir, stage, fold)}: no prediction of {case_id!r}; validate fold {fold} of {stage} "
            f"before {config}"
        )
    return read_label(path, reference=geometry)[0]


def predict_validation(
    run_dir: Path | str,
    plans: Plans,
    config: str,
    fold: int | str,
    *,
    device: str = "auto",
    mirror_mode: str = VALIDATION_MIRROR_MODE,
) -> Summary | None:
    """Predict and evaluate the validation cases of ``fold`` with that fold's final model."""
    run_dir = Path(run_dir)
    spec = run_dataset(run_dir)
    _, val_ids = fold_cases(load_splits(RunFolder(run_dir).splits), int(fold))
    if not val_ids:
        return None
    out = validation_dir(run_dir, config, fold)
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(
        run_dir, configs=[config], folds=[str(fold)], device=device, plans=plans, mirror_mode=mirror_mode
    )
    cases = {c.id: c for c in spec.cases}
    keep_probabilities = len(plans.configurations) > 1
    for i, case_id in enumerate(val_ids):
        case = cases[case_id]
        ending = file_ending(case.label) if case.label is not None else ".nii.gz"
        target = out / f"{case_id}{ending or '.nii.gz'}"
        if target.is_file() and (not keep_probabilities or (out / f"{case_id}.npz").is_file()):
            continue
        image, _, geometry = load_case(spec, case)
        previous = _previous_stage(run_dir, plans, config, fold, case_id, geometry)
        prediction = predictor.predict(image, geometry, keep_probabilities=keep_probabilities, previous_stage=previous)
        if keep_probabilities:
            assert prediction.probabilities is not None
            probs = prediction.probabilities.astype(np.float16)
            atomic_path(out / f"{case_id}.npz", partial(np.savez_compressed, probabilities=probs))
        write_image(prediction.labels, geometry, target)
        log.info("validation %s fold %s: %d/%d %s", config, fold, i + 1, len(val_ids), case_id)
    references = reference_labels(run_dir, spec)
    summary = evaluate_folders(
        out,
        references,
        labels=list(spec.foreground_values) if not spec.regions else None,
        regions=spec.regions or None,
        ignore_label=spec.ignore_label,
        out=out,
        workers=1,
        only_cases=list(val_ids),
    )
    dice = summary.foreground_mean.get("dice")
    log.info("validation %s fold %s: mean foreground Dice %.4f over %d cases", config, fold, dice or 0.0, len(val_ids))
    return summary
