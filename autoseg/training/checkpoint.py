"""Checkpoints: atomic, loadable with ``torch.load(weights_only=True)``, carrying the configuration that made them.

A checkpoint holds only tensors, numbers, strings, lists and dicts: model and optimizer state, the gradient
scaler, RNG states, the epoch, the training history and the configuration as JSON text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from autoseg.errors import TrainingError
from autoseg.files import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (readers see the old or the complete new checkpoint)."""
    atomic_path(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (no arbitrary pickles)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # a truncated or foreign file
        raise TrainingError(f"{path}: cannot read checkpoint ({exc})") from None


def config_from_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """The configuration (as parsed JSON) a checkpoint was trained with."""
    return json.loads(state["configuration"])
