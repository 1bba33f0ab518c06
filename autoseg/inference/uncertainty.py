"""A run's calibration (``RUN/calibration.json``) and the per-case uncertainty score that needs extra passes.

``autoseg analyze calibration`` fits one temperature per configuration on the cross-validation logits and
measures which per-case score best flags the cases with low Dice; it stores both here. The predictor divides each
member's logits by its configuration's temperature before the softmax (or sigmoid), and ``predict --uncertainty``
reports the chosen score as ``uncertainty`` beside the others.

Scores (higher = less trustworthy):

- ``mean_entropy_foreground``: mean normalised entropy over the predicted foreground (:func:`uncertainty_maps`);
- ``mean_disagreement_foreground``: share of ensemble members whose label differs, over any member's foreground;
- ``flip_volume_cv``: coefficient of variation of the predicted foreground volume over the image as given and
  flipped along each axis (one prediction each, without test-time mirroring).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.data.geometry import Geometry
from autoseg.errors import ConfigError
from autoseg.runfolder import RunFolder
from autoseg.serialization import load_json, save_json

__all__ = [
    "Calibration",
    "SCORES",
    "DEFAULT_SCORE",
    "load_calibration",
    "save_calibration",
    "flip_volume_cv",
    "uncertainty_maps",
]

SCORES = ("mean_entropy_foreground", "mean_disagreement_foreground", "flip_volume_cv")
DEFAULT_SCORE = "mean_entropy_foreground"


@dataclass(frozen=True)
class Calibration:
    """Temperatures by configuration (logits / T before the softmax) and the run's default uncertainty score."""

    temperatures: dict[str, float] = field(default_factory=dict)
    uncertainty_score: str = DEFAULT_SCORE
    format: int = 1

    def __post_init__(self) -> None:
        bad = {c: t for c, t in self.temperatures.items() if not (np.isfinite(t) and t > 0)}
        if bad:
            raise ConfigError(f"calibration: temperatures must be finite and > 0; got {bad}")
        if self.uncertainty_score not in SCORES:
            raise ConfigError(f"calibration: unknown uncertainty_score {self.uncertainty_score!r}; one of {SCORES}")


def load_calibration(run_dir: Path | str) -> Calibration:
    """``RUN/calibration.json``, or the identity (T = 1, entropy) when the run has none."""
    path = RunFolder(run_dir).calibration
    return load_json(Calibration, path, format_version=1) if path.is_file() else Calibration()


def save_calibration(run_dir: Path | str, calibration: Calibration) -> Path:
    path = RunFolder(run_dir).calibration
    save_json(calibration, path)
    return path


def flip_volume_cv(predictor, image: np.ndarray, geometry: Geometry) -> float:
    """Coefficient of variation (std / mean) of the predicted foreground voxel count over the image as given and
    flipped along each spatial axis longer than one voxel; 0 when nothing is predicted.

    ``predictor`` is a :class:`~autoseg.inference.predictor.Predictor`; its test-time mirroring is switched off for
    these passes, so each flip is one independent look at the image.
    """
    axes = [a for a in range(1, image.ndim) if image.shape[a] > 1]
    mode, predictor.mirror_mode = predictor.mirror_mode, "none"
    try:
        volumes = [int(np.count_nonzero(predictor.predict(image, geometry).labels))]
        for axis in axes:
            flipped = np.ascontiguousarray(np.flip(image, axis))
            volumes.append(int(np.count_nonzero(predictor.predict(flipped, geometry).labels)))
    finally:
        predictor.mirror_mode = mode
    mean = float(np.mean(volumes))
    return float(np.std(volumes) / mean) if mean > 0 else 0.0


def uncertainty_maps(
    probs: np.ndarray, labels: np.ndarray, member_maps: list[np.ndarray], regions: bool
) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
    """Normalised entropy map (0..1), the share of members that disagree with ``labels`` per voxel (None without
    member maps), and the per-case scores: mean entropy, over the foreground too, and mean disagreement over
    the voxels any member or the ensemble calls foreground."""
    eps = 1e-7
    if regions:  # independent binary entropies, averaged over regions
        p = np.clip(probs, eps, 1 - eps)
        entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p)).mean(0) / np.log(2)
    else:
        entropy = -(probs * np.log(np.clip(probs, eps, 1))).sum(0) / np.log(probs.shape[0])
    entropy = entropy.astype(np.float32)
    foreground = labels > 0
    scores = {
        "mean_entropy": float(entropy.mean()),
        "mean_entropy_foreground": float(entropy[foreground].mean()) if foreground.any() else 0.0,
    }
    disagreement = None
    if member_maps:
        disagreement = np.mean([m != labels for m in member_maps], axis=0).astype(np.float32)
        region = foreground | np.any([m > 0 for m in member_maps], axis=0)
        scores["mean_disagreement_foreground"] = float(disagreement[region].mean()) if region.any() else 0.0
    return entropy, disagreement, scores
