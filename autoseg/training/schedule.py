"""Optimiser, learning-rate schedule, and the training length that fits a job's time limit.

The schedule runs over ``training.epochs``. With ``training.time_limit_hours`` (set by the planner from the user's
``--time-budget``) the trainer calls :func:`fit_epochs` after every epoch: when the epochs measured so far say the
remaining ones would overrun the limit, the job trains fewer epochs and the schedule is stretched over those, so
the learning rate still decays to its end and the job still writes its final checkpoint (a job stopped from
outside at a deadline keeps a model trained at a high learning rate, and no final checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from autoseg.errors import TrainingError
from autoseg.planning.plans import Configuration, TrainingSpec

__all__ = ["build_optimizer", "fit_epochs", "learning_rate"]


def build_optimizer(configuration: Configuration, params) -> torch.optim.Optimizer:
    """The configuration's optimiser (``training.optimizer``: sgd with Nesterov momentum, or adamw)."""
    t = configuration.training
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=t.learning_rate, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay
        )
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    raise TrainingError(f"training.optimizer {t.optimizer!r} unknown; choose sgd or adamw")


def learning_rate(configuration: Configuration, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based) over ``training.epochs``, after any linear warm-up."""
    t = configuration.training
    if epoch < t.warmup_epochs:
        return _scheduled(t, epoch) * (epoch + 1) / (t.warmup_epochs + 1)
    return _scheduled(t, epoch)


def _scheduled(t: TrainingSpec, epoch: int) -> float:
    if t.lr_schedule == "poly":
        return t.learning_rate * (1 - epoch / t.epochs) ** t.poly_exponent
    if t.lr_schedule == "cosine":
        return 0.5 * t.learning_rate * (1 + math.cos(math.pi * epoch / t.epochs))
    if t.lr_schedule == "constant":
        return t.learning_rate
    raise TrainingError(f"training.lr_schedule {t.lr_schedule!r} unknown; choose poly, cosine or constant")


def fit_epochs(t: TrainingSpec, elapsed: Sequence[float], *, recent: int = 3) -> tuple[int, str | None]:
    """Epochs to train so that the job ends within ``t.time_limit_hours``, and why (None when unchanged).

    ``elapsed[k]``: the job's wall-clock seconds when epoch ``k`` was finished (checkpoint written), over every
    run of the job. The next epochs are priced at the mean of the last ``recent`` epochs. Never more than
    ``t.epochs`` and never fewer than the epochs already done.
    """
    done = len(elapsed)
    if t.time_limit_hours is None or done == 0 or done >= t.epochs:
        return t.epochs, None
    window = [0.0, *elapsed][-(recent + 1) :]
    per_epoch = (window[-1] - window[0]) / (len(window) - 1)
    left = t.time_limit_hours * 3600 - elapsed[-1]
    fits = done + max(0, int(left // per_epoch)) if per_epoch > 0 else t.epochs
    if fits >= t.epochs:
        return t.epochs, None
    return fits, (
        f"time limit {t.time_limit_hours:g} h: {fits} of {t.epochs} epochs fit at {per_epoch:.1f} s per epoch; "
        "the learning rate now decays to its end over those"
    )
