"""``autoseg search``: an Optuna study over what the rules cannot decide, resumable and shareable.

The first trial is the rule plan (enqueued), then TPE samples (seeded per trial number, so parallel workers never
draw the same startup points; constant liar for trials still running). Each trial trains one fold at a reduced
budget and a successive-halving (or Hyperband) pruner stops poor ones early. The best trial is written back into
``plans.json`` with its provenance.

Storage: a journal file (``RUN/search/journal.log``) by default; a database URL (``postgresql://...``) lets several
workers, on one or many machines, share one study. A trial that raises is recorded FAIL with its reason and the
study goes on. A trial whose worker died -- detected by heartbeats on a database, by the worker's process id on
the journal file -- is recorded FAIL and retried once more with the same parameters, resuming its training.
Budgets count finished trials (COMPLETE, PRUNED, FAIL); a retried trial counts once, through its retry.

With a cluster executor (``--executor ray|slurm``), this process opens the study (the rule trial enqueued once),
then sends ``search_workers`` workers to the executor, each running :mod:`autoseg.search.worker` (this same search,
in a process of its own, on the shared study) until the study has its trials or the time is up; then it writes
the best back. The study must live where every worker reaches it: PostgreSQL, or the journal file on the shared
run folder (dead workers on other machines are found by heartbeats on a database only).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoseg.errors import ConfigError
from autoseg.planning.plans import Configuration, Plans, load_plans
from autoseg.runfolder import RunFolder
from autoseg.search.objective import Objective, TrialSettings
from autoseg.search.space import build_candidate, limits_for, rule_params, trainable_configurations
from autoseg.search.storage import admit, claimed, describe_storage, make_storage, recover, trial_counts
from autoseg.serialization import from_jsonable, save_json
from autoseg.training.executors import ExecutorOptions

__all__ = ["SearchResult", "search", "open_study", "write_best", "PerTrialSeedSampler", "make_pruner"]

log = logging.getLogger(__name__)

PRUNERS = ("successive_halving", "hyperband", "none")


@dataclass(frozen=True)
class SearchResult:
    """What a search found. ``seconds``: wall time of this call; counts are over the whole study."""

    study_name: str
    storage: str
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    configuration: str | None
    rule_value: float | None
    n_complete: int
    n_pruned: int
    n_failed: int
    seconds: float


class PerTrialSeedSampler(optuna.samplers.BaseSampler):
    """TPE seeded by ``seed + trial number``: reproducible, and parallel workers never share a random stream."""

    def __init__(self, seed: int, **tpe: Any) -> None:
        self.seed, self.tpe = seed, tpe
        self._cache: dict[int, optuna.samplers.TPESampler] = {}

    def _for(self, trial: FrozenTrial) -> optuna.samplers.TPESampler:
        if trial.number not in self._cache:
            self._cache = {trial.number: optuna.samplers.TPESampler(seed=self.seed + trial.number, **self.tpe)}
        return self._cache[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._for(trial).after_trial(study, trial, state, values)


def make_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """Successive halving over epochs (default: with few trials, Hyperband's brackets leave TPE too few each)."""
    min_epochs = max(1, int(round(max_epochs / 4)))
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=max_epochs, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"search pruner {name!r} unknown; choose one of {', '.join(PRUNERS)}")


def open_study(
    run_dir: Path,
    plans: Plans,
    configs: Sequence[str],
    *,
    storage: str | None,
    study_name: str,
    seed: int,
    pruner: str,
    max_epochs: int,
    settings: dict[str, Any],
    heartbeat_seconds: int = 60,
) -> optuna.Study:
    """Create or load the study, check that it was made with the same settings, enqueue the rule trial once."""
    sampler = PerTrialSeedSampler(seed, n_startup_trials=4, multivariate=True, constant_liar=True)
    study = optuna.create_study(
        storage=make_storage(storage, run_dir, heartbeat_seconds=heartbeat_seconds),
        sampler=sampler,
        pruner=make_pruner(pruner, max_epochs),
        study_name=study_name,
        direction="maximize",
        load_if_exists=True,
    )
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", settings)
    elif recorded != settings:
        changed = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
        raise ConfigError(
            f"study {study_name!r} was run with other settings (setting: (then, now) = {changed}); "
            "use the same options or another --study name"
        )
    if not any(t.user_attrs.get("rule") for t in study.get_trials(deepcopy=False)):
        params = rule_params(plans, configs[0])
        if len(configs) == 1:
            params.pop("configuration")
        study.enqueue_trial(params, user_attrs={"rule": True}, skip_if_exists=True)
    return study


def write_best(run_dir: Path, rule: Plans, study: optuna.Study, provenance: dict[str, Any]) -> Plans | None:
    """Write the best trial's configuration into ``RUN/plans.json`` (atomically); None without a finished trial.

    The configuration is the one the trial trained (recorded on the trial, so any worker can write it back), at
    full length; the other configurations stay as the rules made them.
    """
    try:
        best = study.best_trial
    except ValueError:
        return None
    name = best.user_attrs.get("configuration") or best.params.get("configuration") or provenance["configs"][0]
    recorded = best.user_attrs.get("plan")
    if recorded is not None:
        configuration = from_jsonable(Configuration, recorded, where=f"trial {best.number}")
    else:
        configuration = build_candidate(rule, {**rule_params(rule, name), **best.params}, config=name).configuration
    epochs = best.user_attrs.get("effective", {}).get("trial_epochs")
    line = (
        f"from the search (study {study.study_name!r}, trial {best.number}: {provenance['objective']} "
        f"{best.value:.4f} on fold {provenance['fold']} after {epochs} epochs): "
        + ", ".join(f"{k} {_short(v)}" for k, v in best.params.items() if k != "configuration")
    )
    search = {
        **provenance,
        "trial": best.number,
        "value": best.value,
        "configuration": name,
        "params": best.params,
        "effective": best.user_attrs.get("effective", {}),
        "dice_per_class": {k: v for k, v in best.user_attrs.get("dice_per_class", {}).items() if math.isfinite(v)},
        "budget_epochs": epochs,
    }
    configurations = {**rule.configurations, name: configuration.with_reason(line)}
    plans = dataclasses.replace(rule, configurations=configurations, search=search)
    plans.save(RunFolder(run_dir).plans)
    return plans


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _rule_plans(run_dir: Path) -> Plans:
    """The rule plan the search starts from: kept in ``RUN/search/rule_plans.json`` once plans.json is rewritten."""
    kept = run_dir / "search" / "rule_plans.json"
    plans = load_plans(run_dir)
    if kept.is_file():
        rule = load_plans(kept)
        if plans.search is None and rule != plans:
            raise ConfigError(
                f"{run_dir / 'plans.json'} was planned again since the last search ({kept} differs): delete "
                f"{run_dir / 'search'} to start a new search, or restore the plan"
            )
        return rule
    if plans.search is not None:
        raise ConfigError(f"{run_dir / 'plans.json'} comes from a search but {kept} is missing; plan again")
    save_json(plans, kept)
    return plans


def default_budget_epochs(rule_epochs: int) -> int:
    """Epochs of a trial when not given: a quarter of the plan's, at least 3 (at most the plan's)."""
    return min(rule_epochs, max(3, int(round(rule_epochs / 4))))


def _configs(plans: Plans, config: str | Sequence[str] | None) -> tuple[str, ...]:
    names = trainable_configurations(plans)
    if config is None:
        return names
    wanted = (config,) if isinstance(config, str) else tuple(config)
    if not wanted:
        raise ConfigError(f"search: no configuration to search; choose among {names}")
    for name in wanted:
        if name not in names:
            raise ConfigError(f"--config {name!r}: not a trainable configuration of the plan; choose one of {names}")
    return wanted


def _check_data(run_dir: Path, plans: Plans, configs: Sequence[str], fold: int) -> None:
    from autoseg.preprocessing.store import list_cases
    from autoseg.training.splits import load_or_make_splits

    cases = []
    for name in configs:
        folder = RunFolder(run_dir).preprocessed(plans.configurations[name].data_identifier or name)
        cases = list_cases(folder) if folder.is_dir() else []
        if not cases:
            raise ConfigError(f"{folder}: no preprocessed cases for {name}; run `autoseg preprocess {run_dir}` first")
    splits = load_or_make_splits(run_dir, cases)
    if not 0 <= fold < splits.n_folds:
        raise ConfigError(f"--fold {fold}: {run_dir / 'splits.json'} has folds 0 to {splits.n_folds - 1}")


def _limits(plans: Plans, configs: Sequence[str]):
    limits = limits_for(plans)
    if limits.knows_speed or not limits.budget.is_cpu:
        return limits
    from autoseg.planning.device import measure_step_seconds
    from autoseg.planning.memory import estimate_flops

    c = plans.configurations[configs[0]]
    n_in, n_out = len(plans.channels), plans.n_outputs
    seconds = measure_step_seconds(c.network, n_in, n_out, c.patch_size, c.batch_size)
    return limits_for(plans, estimate_flops(c.network, n_in, n_out, c.patch_size, c.batch_size) / seconds)


def search(
    run_dir: Path | str,
    *,
    trials: int | None = None,
    time_budget_hours: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    config: str | Sequence[str] | None = None,
    seed: int = 0,
    fold: int = 0,
    budget_epochs: int | None = None,
    device: str = "auto",
    pruner: str = "successive_halving",
    value: str = "validation",
    heartbeat_seconds: int = 60,
    workers: int | None = None,
    measure_steps: bool = True,
    executor: ExecutorOptions | None = None,
    search_workers: int = 2,
) -> SearchResult:
    """Search until the study has ``trials`` finished trials, or for ``time_budget_hours``; write the best back.

    ``config`` restricts the search to one configuration, or to several among which it chooses (default: all the
    plan's trainable configurations compete).
    ``budget_epochs``: epochs of a trial of the first configuration at the rule's training length (default: a
    quarter of the plan's, at least 3); other configurations get the same share of their planned epochs.
    ``storage``: a database URL shared by several workers, or a journal file (default ``RUN/search/journal.log``).
    ``pruner``: ``successive_halving``, ``hyperband`` or ``none``; ``value``: ``validation`` or ``pseudo_dice`` (see
    :mod:`autoseg.search.objective`); ``workers``: data-loader processes per trial (None: the trainer decides);
    ``measure_steps``: time a few training steps of each sampled plan to cap its training length (else FLOPs).
    ``executor``: a cluster executor (Ray, SLURM) runs ``search_workers`` workers on the shared study instead of
    this process. Running it again resumes the study. See the module docstring for failures and retries.
    """
    run_dir = Path(run_dir)
    if not trials and not time_budget_hours:
        raise ConfigError("search: give a number of trials (--trials N) or a time budget (--time-budget HOURS)")
    start = time.perf_counter()
    rule = _rule_plans(run_dir)
    configs = _configs(rule, config)
    _check_data(run_dir, rule, configs, fold)
    reference = rule.configurations[configs[0]].training.epochs
    fraction = (budget_epochs or default_budget_epochs(reference)) / reference
    max_epochs = max(int(round(fraction * rule.configurations[n].training.epochs * 2)) for n in configs)
    name = study_name or f"autoseg-{rule.dataset_name}"
    settings = {"configs": list(configs), "fold": fold, "budget_fraction": round(fraction, 6), "value": value}
    study = open_study(
        run_dir,
        rule,
        configs,
        storage=storage,
        study_name=name,
        seed=seed,
        pruner=pruner,
        max_epochs=max(1, max_epochs),
        settings=settings,
        heartbeat_seconds=heartbeat_seconds,
    )
    folder = run_dir / "search" / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    if executor is not None and executor.name != "local":
        worker = {
            "trials": trials,
            "time_budget_hours": time_budget_hours,
            "storage": storage,
            "study_name": name,
            "config": list(configs),
            "seed": seed,
            "fold": fold,
            "budget_epochs": budget_epochs,
            "device": device,
            "pruner": pruner,
            "value": value,
            "heartbeat_seconds": heartbeat_seconds,
            "workers": workers,
            "measure_steps": measure_steps,
        }
        from autoseg.search.worker import run_workers

        run_workers(run_dir, rule, folder, executor, search_workers, worker, start)
        return _finish(run_dir, rule, study, settings, storage, start)
    trial_settings = TrialSettings(
        run_dir, folder, configs, fold, fraction, device, value, workers=workers, measure_steps=measure_steps
    )
    objective = Objective(rule, trial_settings, limits=_limits(rule, configs), admit=admit(trials))
    deadline = start + time_budget_hours * 3600 if time_budget_hours else None
    while True:
        recover(study)
        if trials is not None and claimed(study.get_trials(deepcopy=False)) >= trials:
            break
        if deadline is not None and time.perf_counter() >= deadline:
            break
        study.optimize(objective, n_trials=1, catch=(Exception,))
    return _finish(run_dir, rule, study, settings, storage, start)


def _finish(
    run_dir: Path, rule: Plans, study: optuna.Study, settings: dict[str, Any], storage: str | None, start: float
) -> SearchResult:
    from autoseg.search.plots import plot_study

    counts = trial_counts(study)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rule_value = next((t.value for t in trials if t.user_attrs.get("rule")), None)
    validation = settings["value"] == "validation"
    plot_study(study, run_dir / "search", target="validation Dice" if validation else "pseudo-Dice EMA")
    provenance = {
        "study": study.study_name,
        "storage": describe_storage(storage, run_dir),
        "objective": "validation_dice" if validation else "pseudo_dice_ema",
        **settings,
        "rule_value": rule_value,
        "n_complete": counts["complete"],
        "n_pruned": counts["pruned"],
        "n_failed": counts["failed"],
    }
    best = write_best(run_dir, rule, study, provenance)
    found = best.search if best is not None and best.search else {}
    result = SearchResult(
        study_name=study.study_name,
        storage=provenance["storage"],
        best_value=found.get("value"),
        best_params=dict(found.get("params", {})),
        best_trial=found.get("trial"),
        configuration=found.get("configuration"),
        rule_value=rule_value,
        n_complete=counts["complete"],
        n_pruned=counts["pruned"],
        n_failed=counts["failed"],
        seconds=round(time.perf_counter() - start, 2),
    )
    if best is None:
        log.warning("search %s: no trial finished; plans.json is unchanged", study.study_name)
    else:
        log.info("search %s: %s; %s updated", study.study_name, result, RunFolder(run_dir).plans)
    return result
