"""Pictures of a study: ``history.png`` (value per trial, best so far) and ``importances.png`` (fANOVA)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import optuna

from autoseg.files import atomic_path

__all__ = ["plot_study"]

log = logging.getLogger(__name__)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_path(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _message(text: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


def plot_study(study: optuna.Study, folder: Path, *, target: str = "validation Dice") -> list[Path]:
    """Write ``folder/history.png`` and ``folder/importances.png``; a picture that cannot be made says why.

    ``target`` names the objective on the axes.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from optuna.visualization import matplotlib as oplt

    folder.mkdir(parents=True, exist_ok=True)
    states = optuna.trial.TrialState
    complete = study.get_trials(deepcopy=False, states=(states.COMPLETE,))
    pruned = study.get_trials(deepcopy=False, states=(states.PRUNED,))
    failed = study.get_trials(deepcopy=False, states=(states.FAIL,))
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = folder / "history.png"
        if complete:
            ax = oplt.plot_optimization_history(study, target_name=target)
            ax.set_title(
                f"{study.study_name}: {len(complete)} complete, {len(pruned)} pruned, {len(failed)} failed trials"
            )
            _save(ax.figure, history)
        else:
            _save(_message("no trial has completed yet"), history)
        written.append(history)
        importances = folder / "importances.png"
        try:
            ax = oplt.plot_param_importances(study, target_name=target)
            _save(ax.figure, importances)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("parameter importances not plotted: %s", exc)
            _save(_message(f"parameter importances need more completed trials ({len(complete)} so far)"), importances)
        written.append(importances)
    return written
