"""``RUN/selection.json``: the configurations, ensemble and postprocessing ``autoseg select`` chose, typed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from autoseg.inference.postprocessing import PostprocessingSpec
from autoseg.runfolder import RunFolder
from autoseg.serialization import load_json

__all__ = ["Selection", "load_selection"]


@dataclass(frozen=True)
class Selection:
    """``selection.json``: what ``autoseg predict`` uses, and the evidence for it."""

    configurations: tuple[str, ...]
    postprocessing: PostprocessingSpec | None
    candidates: dict[str, float]  # candidate -> mean foreground Dice over cases (cross-validation)
    per_class_dice: dict[str, dict[str, float]]  # candidate -> class -> mean Dice
    best: str
    runner_up: str | None = None
    difference_to_runner_up: dict[str, float] = field(default_factory=dict)  # mean, ci_low, ci_high
    postprocessing_dice: dict[str, float] = field(default_factory=dict)  # before / after
    n_cases: int = 0
    format: int = 1


def load_selection(run_dir: Path | str) -> Selection | None:
    """The run's :class:`Selection`, or None when ``autoseg select`` has not written one."""
    path = RunFolder(run_dir).selection
    return load_json(Selection, path, format_version=1) if path.is_file() else None
