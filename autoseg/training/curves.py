"""Training curve: losses and validation pseudo-Dice per epoch, as a PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from autoseg.files import atomic_path

__all__ = ["plot_training_curves"]


def plot_training_curves(history: Sequence[dict], path: Path) -> None:
    """Plot train/validation loss (left axis) and pseudo-Dice with its EMA (right axis) against the epoch; a history
    without validation (pretraining) plots the training loss alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(epochs, [h["train_loss"] for h in history], color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    lines: tuple[list, list] = ([], [])
    if all("val_loss" in h for h in history):
        ax.plot(epochs, [h["val_loss"] for h in history], color="tab:red", label="validation loss")
        ax2 = ax.twinx()
        ax2.plot(epochs, [h["mean_fg_dice"] for h in history], color="tab:green", ls=":", label="pseudo-Dice")
        ax2.plot(epochs, [h["ema_dice"] for h in history], color="tab:green", label="pseudo-Dice (EMA)")
        ax2.set_ylabel("Dice")
        ax2.set_ylim(0, 1)
        lines = ax2.get_legend_handles_labels()
    own = ax.get_legend_handles_labels()
    ax.legend(own[0] + lines[0], own[1] + lines[1], loc="center right", fontsize=8)
    fig.tight_layout()
    atomic_path(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
