"""The cascade's second stage: the previous (low-resolution) stage's prediction as extra input channels.

A cascade stage (``previous_stage`` set in its configuration, e.g. ``3d_cascade_fullres`` after ``3d_lowres``) sees
the image plus the previous stage's label map, one-hot over the foreground classes. For training cases that label map
must be the previous stage's *out-of-fold* prediction (the fold in which the case was a validation case), or the
second stage would learn from predictions better than any it meets on new images. :func:`prepare_previous_stage`
maps those out-of-fold predictions (``RUN/models/3d_lowres/fold_k/validation/<case>``, on the original grid) onto
the stage's preprocessed grid, once, into ``RUN/models/<config>/previous_stage/<case>.npy``.

During training, the previous stage's labels go through the spatial augmentation with the label map (nearest
neighbour), then :class:`PreviousStageToData` makes them one-hot input channels, with random morphological
errors (dilation, erosion, opening, closing; and removed connected components), as nnU-Net does, so that the
second stage learns to correct the first rather than copy it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform
from scipy import ndimage
from skimage.morphology import ball, disk

from autoseg.data.io import file_ending, read_label, strip_ending
from autoseg.errors import TrainingError
from autoseg.files import atomic_path
from autoseg.planning.plans import Plans
from autoseg.preprocessing.preprocess import label_to_case_grid
from autoseg.preprocessing.store import read_properties
from autoseg.runfolder import RunFolder
from autoseg.training.splits import Splits

__all__ = [
    "P_MORPHOLOGY",
    "PreviousStageToData",
    "one_hot",
    "prediction_file",
    "prepare_previous_stage",
    "previous_stage_folder",
]

log = logging.getLogger(__name__)

#: Chance per sample of a random morphological error on each one-hot channel, and of removing connected components
#: (nnU-Net's cascade uses 0.4 and 0.2, structuring elements of radius 1 to 8 and components under 15% of the patch).
P_MORPHOLOGY, P_REMOVE_COMPONENT = 0.4, 0.2
MAX_RADIUS, MAX_COMPONENT_FRACTION = 8, 0.15


def one_hot(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """(len(values), *labels.shape) float32: 1 where ``labels`` equals each value."""
    return np.stack([labels == v for v in values]).astype(np.float32) if values else np.zeros((0, *labels.shape))


def _perturb(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random morphological error and/or removed components on a binary mask (a new array)."""
    if rng.random() < P_MORPHOLOGY and mask.any():
        op = (ndimage.binary_dilation, ndimage.binary_erosion, ndimage.binary_opening, ndimage.binary_closing)[
            int(rng.integers(4))
        ]
        radius = int(rng.integers(1, MAX_RADIUS + 1))
        mask = op(mask, structure=ball(radius) if mask.ndim == 3 else disk(radius))
    if rng.random() < P_REMOVE_COMPONENT and mask.any():
        components, n = ndimage.label(mask)
        sizes = np.bincount(components.ravel())[1:]
        small = np.flatnonzero(sizes < MAX_COMPONENT_FRACTION * mask.size) + 1
        if small.size:
            mask = mask & (components != small[int(rng.integers(small.size))])
    return mask


class PreviousStageToData(AbstractTransform):
    """Move channel 1 of ``seg`` (the previous stage's labels, (B, 2, *patch)) into ``data`` as one-hot channels of
    ``values``, perturbed at random when ``perturb`` (training; not for validation patches)."""

    def __init__(self, values: Sequence[int], *, perturb: bool):
        self.values, self.perturb = tuple(values), perturb

    def __call__(self, **d):
        seg = d["seg"]
        if seg.shape[1] != 2:
            raise TrainingError(f"a cascade batch has 2 label channels (label, previous stage); got {seg.shape[1]}")
        channels = one_hot(seg[:, 1], self.values).swapaxes(0, 1)  # (B, K, *patch)
        if self.perturb:
            rng = np.random.default_rng(np.random.randint(2**31))  # noqa: NPY002 (seeded per batch by the loader)
            for b in range(channels.shape[0]):
                for k in range(channels.shape[1]):
                    channels[b, k] = _perturb(channels[b, k] > 0, rng)
        d["data"] = np.concatenate([d["data"], channels.astype(d["data"].dtype)], axis=1)
        d["seg"] = seg[:, :1]
        return d


def previous_stage_folder(run_dir: Path | str, config: str) -> Path:
    """``RUN/models/<config>/previous_stage``: the previous stage's out-of-fold labels on ``config``'s grid."""
    return RunFolder(run_dir).models / config / "previous_stage"


def _validation_fold(splits: Splits) -> dict[str, int]:
    return {case: k for k, fold in enumerate(splits.folds) for case in fold.val}


def prediction_file(folder: Path, case_id: str) -> Path | None:
    """``folder/<case_id><ending>``, the label map a validation wrote (not its ``.npz`` probabilities)."""
    found = [p for p in folder.glob(f"{case_id}.*") if file_ending(p) and strip_ending(p) == case_id]
    return found[0] if found else None


def prepare_previous_stage(
    run_dir: Path | str, plans: Plans, config: str, case_ids: Sequence[str], splits: Splits, data_folder: Path
) -> Path:
    """Write the previous stage's out-of-fold prediction of each case onto ``config``'s preprocessed grid.

    A case is redone when its source prediction is newer than the stored map. Raises TrainingError naming the case
    and the fold when the previous stage has not predicted it (its folds are not all trained and validated).
    """
    c = plans.configurations[config]
    assert c.previous_stage is not None
    out = previous_stage_folder(run_dir, config)
    out.mkdir(parents=True, exist_ok=True)
    fold_of = _validation_fold(splits)
    for case_id in case_ids:
        if case_id not in fold_of:
            raise TrainingError(f"case {case_id!r} is in no validation fold of {RunFolder(run_dir).splits}")
        folder = RunFolder(run_dir).validation(c.previous_stage, fold_of[case_id])
        source = prediction_file(folder, case_id)
        if source is None:
            raise TrainingError(
                f"{folder}: no out-of-fold prediction of case {case_id!r} by {c.previous_stage}; the cascade stage "
                f"{config} needs every fold of {c.previous_stage} trained and validated first "
                f"(`autoseg train RUN -c {c.previous_stage}`)"
            )
        target = out / f"{case_id}.npy"
        if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        labels, _ = read_label(source)
        grid = label_to_case_grid(labels, read_properties(data_folder, case_id))
        atomic_path(target, partial(np.save, arr=grid))
    log.info("%s: out-of-fold predictions of %s ready for %d case(s)", config, c.previous_stage, len(case_ids))
    return out
