"""The built-in example: a synthetic CT dataset through the whole pipeline on this machine, then test Dice.

``autoseg example [OUT]`` writes ``OUT/data`` (10 training and 4 held-out cases), runs ``autoseg run`` into
``OUT/run`` with a small time budget and 3-fold cross-validation (so that each fold trains a little longer),
predicts the held-out cases into ``OUT/predictions`` and prints their Dice against the known truth.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from autoseg.data.synth import KINDS, make_dataset
from autoseg.evaluation.evaluate import evaluate_folders
from autoseg.inference.predict import predict_path
from autoseg.pipeline import run_pipeline

__all__ = ["run_example"]

log = logging.getLogger(__name__)


def run_example(
    out: Path | str = "example",
    *,
    time_budget_hours: float = 0.1,
    cases: int = 10,
    test_cases: int = 4,
    n_folds: int = 3,
    device: str = "auto",
) -> dict[str, float]:
    """Run the example; returns the mean test Dice per class name."""
    out = Path(out)
    start = time.perf_counter()
    data = out / "data"
    if not (data / "dataset.json").is_file():
        make_dataset(data, "ct3d", cases, test_cases=test_cases, seed=0)
    print(f"[{time.perf_counter() - start:6.0f} s] synthetic CT dataset: {data} ({cases} training, {test_cases} test)")
    selection = run_pipeline(data, out / "run", device=device, time_budget_hours=time_budget_hours, n_folds=n_folds)
    if selection is None:  # the budget allowed one model on all cases only
        print(f"[{time.perf_counter() - start:6.0f} s] trained one model on all cases (no cross-validation)")
    else:
        print(
            f"[{time.perf_counter() - start:6.0f} s] trained and selected: {selection.best} "
            f"(cross-validation Dice {selection.candidates[selection.best]:.3f})"
        )
    predict_path(out / "run", data / "imagesTs", out / "predictions", device=device)
    summary = evaluate_folders(out / "predictions", data / "labelsTs", workers=1)
    names = {str(v): k for k, v in KINDS["ct3d"].labels.items()}
    result = {names.get(k, k): float(v["dice"].mean) for k, v in summary.per_class.items()}
    print(
        f"[{time.perf_counter() - start:6.0f} s] test Dice on {test_cases} held-out cases: "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.items())
        + f"; mean {summary.foreground_mean['dice']:.3f}"
    )
    return result
