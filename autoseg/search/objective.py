"""One trial: sample a plan, train one fold at a reduced budget in the trial's own run folder, score it.

A trial never touches ``RUN/models``: it trains in ``RUN/search/<study>/trial_<n>/``, a run folder of its own whose
``fingerprint.json``, ``run.json``, ``splits.json`` and ``preprocessed/`` are links to RUN's and whose
``plans.json`` is the trial's (one configuration). A retried trial (its worker died) reuses the folder of the trial
it retries, so training resumes from that trial's last checkpoint.

The value is the **full-resolution validation Dice** of the fold (mean over foreground classes, without test-time
mirroring): it is what cross-validation and ``autoseg select`` measure, and it is comparable between trials. The
validation pseudo-Dice that the trainer computes on sampled patches is not: its patches are drawn with the trial's
own foreground oversampling and patch size, both of which the search changes. The pseudo-Dice EMA is still what
each epoch reports to the pruner (cheap, and compared only at equal epochs); ``value="pseudo_dice"`` uses it as
the value too when the validation prediction is too expensive.

A trial that raises is recorded FAIL with its reason (user attribute ``fail_reason``); a sampled plan that does
not fit the budget even after repair is *pruned* before training (``infeasible``), so that TPE learns to avoid
that region instead of ignoring it. The trainer knows nothing of Optuna: :class:`EpochReporter` is its
``on_epoch_end`` callback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autoseg.data.labels import foreground_names
from autoseg.errors import AutosegError, PlanningError
from autoseg.planning.plans import NetworkSpec, Plans
from autoseg.runfolder import RunFolder, fold_dir
from autoseg.search.space import Candidate, Limits, sample_candidate
from autoseg.serialization import to_jsonable
from autoseg.training.trainer import TrainOptions, train_fold

__all__ = [
    "TrialSettings",
    "Objective",
    "EpochReporter",
    "SurplusTrial",
    "RUN_LINKS",
    "prepare_trial_dir",
    "trial_epochs",
    "worker_id",
]

log = logging.getLogger(__name__)

#: What a trial folder links to in RUN.
_LAYOUT = RunFolder(".")
RUN_LINKS = tuple(p.name for p in (_LAYOUT.fingerprint, _LAYOUT.run_info, _LAYOUT.splits, _LAYOUT.preprocessed_root))
VALUES = ("validation", "pseudo_dice")


class SurplusTrial(AutosegError):
    """The study already had its number of trials when this one started (another worker was faster)."""


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a study shares.

    ``budget_fraction``: a trial trains this fraction of its configuration's planned epochs (times its own
    ``epochs_scale``), at least one epoch. ``value``: ``validation`` (full-resolution Dice of the fold's validation
    cases) or ``pseudo_dice`` (the trainer's last pseudo-Dice EMA). ``workers``: data-loader processes (None: the
    trainer decides). ``measure_steps``: price training steps by timing them on the device (a few seconds per
    trial) for the training-length cap, instead of by their FLOPs.
    """

    run_dir: Path
    study_dir: Path
    configs: tuple[str, ...]
    fold: int = 0
    budget_fraction: float = 0.25
    device: str = "auto"
    value: str = "validation"
    mirror_mode: str = "none"
    keep_checkpoints: bool = False
    workers: int | None = None
    measure_steps: bool = True


def worker_id() -> str:
    """``host:pid`` of this process, recorded on every trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def trial_epochs(candidate: Candidate, rule_epochs: int, fraction: float) -> int:
    """Epochs of a trial: ``fraction`` of the rule plan's epochs, scaled by the candidate's training length."""
    return max(1, int(round(fraction * rule_epochs * candidate.epochs_scale)))


def prepare_trial_dir(run_dir: Path, folder: Path, plans: Plans, *, fresh: bool) -> Path:
    """Make ``folder`` a run folder of its own that shares RUN's data; write the trial's ``plans.json``.

    ``fresh`` removes what an earlier trial of the same number left (a study started again from scratch).
    ``RUN/splits.json`` is made first when missing, so that trials and the final training share the folds.
    """
    if not RunFolder(run_dir).splits.is_file():  # the trial and the final training must share the folds
        from autoseg.preprocessing.store import list_cases
        from autoseg.training.splits import load_or_make_splits

        name = next(iter(plans.configurations))
        folder_data = RunFolder(run_dir).preprocessed(plans.configurations[name].data_identifier or name)
        load_or_make_splits(run_dir, list_cases(folder_data))
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in RUN_LINKS:
        target, link = run_dir / name, folder / name
        if not target.exists() or link.is_symlink() or link.exists():
            continue
        link.symlink_to(os.path.relpath(target.resolve(), folder.resolve()), target_is_directory=target.is_dir())
    plans.save(RunFolder(folder).plans)
    return folder


class EpochReporter:
    """The trainer's ``on_epoch_end`` for a trial: report the pseudo-Dice EMA after each epoch, stop when pruned.

    The last of ``epochs`` is reported but never pruned: the training is done by then, so it is evaluated.
    """

    def __init__(self, trial: Any, epochs: int) -> None:
        self.trial, self.epochs = trial, epochs
        self.pruned_at: int | None = None

    def __call__(self, epoch: int, record: dict) -> bool:
        step = epoch + 1
        self.trial.report(float(record["ema_dice"]), step)
        if step < self.epochs and self.trial.should_prune():
            self.pruned_at = step
            return True
        return False


def _remove_checkpoints(folder: Path) -> None:
    for path in folder.glob("models/*/fold_*/checkpoint_*.pt"):
        path.unlink(missing_ok=True)


class Objective:
    """``objective(trial) -> float``: the study's objective (also runs with ``optuna.trial.FixedTrial``).

    ``admit(trial)`` (optional) returns a reason to skip a trial the study no longer needs.
    """

    def __init__(
        self,
        plans: Plans,
        settings: TrialSettings,
        *,
        limits: Limits | None = None,
        admit: Callable[[Any], str | None] | None = None,
    ) -> None:
        if settings.value not in VALUES:
            raise AutosegError(f"search value {settings.value!r} unknown; choose one of {', '.join(VALUES)}")
        self.plans, self.settings, self.limits, self.admit = plans, settings, limits, admit
        self._seconds: dict[tuple, float] = {}

    def step_seconds(self, network: NetworkSpec, patch: Sequence[int], batch: int) -> float:
        """Measured seconds of one training step on the trial device (cached: the rule's is timed once)."""
        key = (network, tuple(patch), batch)
        if key not in self._seconds:
            from autoseg.devices import planned_precision, resolve_device
            from autoseg.planning.device import measure_step_seconds

            device = resolve_device(self.settings.device)
            precision = planned_precision(device.type)
            n_in, n_out = len(self.plans.channels), self.plans.n_outputs
            self._seconds[key] = measure_step_seconds(
                network, n_in, n_out, patch, batch, device=str(device), precision=precision, steps=3
            )
        return self._seconds[key]

    def __call__(self, trial: Any) -> float:
        try:
            return self._run(trial)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        finally:
            _release_gpu_memory()

    def _run(self, trial: Any) -> float:
        s = self.settings
        trial.set_user_attr("worker", worker_id())
        reason = self.admit(trial) if self.admit else None
        if reason:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(reason)
        try:
            cost = self.step_seconds if s.measure_steps else None
            candidate = sample_candidate(trial, self.plans, configs=s.configs, limits=self.limits, step_cost=cost)
        except PlanningError as exc:  # outside the budget: pruned (not failed), so that TPE learns to avoid it
            trial.set_user_attr("infeasible", str(exc))
            raise optuna.TrialPruned(f"infeasible: {exc}") from None
        rule_epochs = self.plans.configurations[candidate.name].training.epochs
        epochs = trial_epochs(candidate, rule_epochs, s.budget_fraction)
        trial_plans = _with_epochs(candidate, epochs, trial.number)
        trial.set_user_attr("configuration", candidate.name)
        trial.set_user_attr("plan", to_jsonable(candidate.configuration))  # what write_best puts in plans.json
        trial.set_user_attr("effective", {**candidate.effective, "trial_epochs": epochs})
        if candidate.notes:
            trial.set_user_attr("repairs", list(candidate.notes))
        origin = int(trial.user_attrs.get("retry_of", trial.number))
        folder = prepare_trial_dir(
            s.run_dir, s.study_dir / f"trial_{origin}", trial_plans, fresh=origin == trial.number
        )
        log.info(
            "trial %d: %s, patch %s, batch %d, features %s, %s, lr %.2g, %d epochs (%s)",
            trial.number,
            candidate.name,
            candidate.effective["patch_size"],
            candidate.effective["batch_size"],
            candidate.effective["features_per_stage"],
            candidate.configuration.loss.name,
            candidate.configuration.training.learning_rate,
            epochs,
            folder,
        )
        start = time.perf_counter()
        reporter = EpochReporter(trial, epochs)
        options = TrainOptions(device=s.device, workers=s.workers)
        train_fold(folder, candidate.name, s.fold, plans=trial_plans, options=options, on_epoch_end=reporter)
        trial.set_user_attr("train_seconds", round(time.perf_counter() - start, 2))
        if reporter.pruned_at is not None:
            if not s.keep_checkpoints:
                _remove_checkpoints(folder)
            raise optuna.TrialPruned(f"pruned after epoch {reporter.pruned_at} of {epochs}")
        value, per_class = self._score(folder, trial_plans, candidate.name)
        trial.set_user_attr("dice_per_class", per_class)
        if not s.keep_checkpoints:
            _remove_checkpoints(folder)
        return value

    def _score(self, folder: Path, plans: Plans, name: str) -> tuple[float, dict[str, float]]:
        s = self.settings
        if s.value == "pseudo_dice":
            lines = (fold_dir(folder, name, s.fold) / "log.jsonl").read_text().splitlines()
            last = json.loads(lines[-1])
            classes = list(plans.regions) or list(foreground_names(plans.labels, plans.ignore_label))
            return float(last["ema_dice"]), {c: d for c, d in zip(classes, last["val_dice"]) if d is not None}
        from autoseg.inference.validation import predict_validation

        summary = predict_validation(folder, plans, name, s.fold, device=s.device, mirror_mode=s.mirror_mode)
        if summary is None:
            raise AutosegError(f"fold {s.fold} has no validation cases: the search needs a fold with some (--fold)")
        names = {str(v): k for k, v in plans.labels.items()}
        per_class = {names.get(k, k): float(v["dice"].mean) for k, v in summary.per_class.items()}
        return float(summary.foreground_mean["dice"]), per_class


def _with_epochs(candidate: Candidate, epochs: int, number: int) -> Plans:
    c = candidate.configuration
    c = dataclasses.replace(c, training=dataclasses.replace(c.training, epochs=epochs)).with_reason(
        f"search trial {number}: {epochs} epochs at a reduced budget ({c.training.epochs} at full length)"
    )
    return dataclasses.replace(candidate.plans, configurations={candidate.name: c})


def _release_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
