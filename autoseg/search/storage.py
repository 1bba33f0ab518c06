"""Where a study lives, and its bookkeeping: storages, counted trials, dead workers and their retries.

Budgets count finished trials (COMPLETE, PRUNED, FAIL). A trial whose worker died -- found by heartbeats on a
database, by the worker's process id (``host:pid``, recorded on every trial) on a journal file -- is recorded FAIL
and queued again with the same parameters and reports (:func:`retry_trial`); it then counts once, through its
retry. Trials a worker started after the study had its number (``surplus``) and second copies of the enqueued rule
trial (``duplicate``) do not count either. Low-level state changes go through ``study._storage``: Optuna has no
public call to fail another process's trial.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "make_storage",
    "with_driver",
    "describe_storage",
    "retry_trial",
    "trial_counts",
    "claimed",
    "admit",
    "recover",
]

log = logging.getLogger(__name__)

MAX_RETRIES = 2
#: A RUNNING trial without a recorded worker this old (seconds) is taken as orphaned.
ORPHAN_SECONDS = 120


def make_storage(storage: str | None, run_dir: Path, *, heartbeat_seconds: int = 60) -> optuna.storages.BaseStorage:
    """A database URL (``postgresql://``, ``sqlite:///``, ...) with heartbeats, else a journal file path."""
    if storage and "://" in storage:
        options = {
            "engine_kwargs": {"pool_pre_ping": True} if not storage.startswith("sqlite") else None,
            "heartbeat_interval": heartbeat_seconds,
            "grace_period": 3 * heartbeat_seconds,
        }
        return _database(with_driver(storage), options)
    path = Path(storage) if storage else run_dir / "search" / "journal.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _database(url: str, options: dict[str, Any]) -> optuna.storages.RDBStorage:
    """RDBStorage with heartbeats; a second try when workers starting together race to create the tables."""
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                try:
                    return optuna.storages.RDBStorage(url, **options, heartbeat_stale_trial_callback=retry_trial)
                except TypeError:  # Optuna < 4.9 names it failed_trial_callback
                    return optuna.storages.RDBStorage(url, **options, failed_trial_callback=retry_trial)
        except Exception as exc:  # sqlalchemy's IntegrityError/ProgrammingError from a concurrent CREATE TABLE
            if attempt == 2 or "already exists" not in str(exc) and "duplicate key" not in str(exc):
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def with_driver(url: str) -> str:
    """``postgresql://`` with the driver that is installed (SQLAlchemy 2.1 defaults to psycopg 3)."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def describe_storage(storage: str | None, run_dir: Path) -> str:
    """The storage as provenance may show it: a URL without its password, or a path relative to RUN."""
    if storage and "://" in storage:
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", storage)
    path = Path(storage) if storage else run_dir / "search" / "journal.log"
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


def retry_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a dead worker's trial again with its parameters and reports (at most ``MAX_RETRIES`` times)."""
    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    if len(history) > MAX_RETRIES:
        log.warning("trial %d: its worker died %d times; not retried again", trial.number, len(history))
        return
    user = {k: v for k, v in trial.user_attrs.items() if k not in ("worker", "interrupted", "fail_reason")}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={**user, "retry_of": history[0]},
            system_attrs={"failed_trial": history[0], "retry_history": history},
            intermediate_values=trial.intermediate_values,
        )
    )
    log.info("trial %d: its worker died; queued again (resumes in trial_%d/)", trial.number, history[0])


def _excluded(trials: Sequence[FrozenTrial]) -> set[int]:
    """Trials that do not count: retried ones (their retry counts), surplus and duplicate ones."""
    out = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return out | {t.number for t in trials if t.user_attrs.get("surplus") or t.user_attrs.get("duplicate")}


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Counted trials by state: ``complete``, ``pruned``, ``failed``, ``running``, ``waiting``."""
    trials = study.get_trials(deepcopy=False)
    skip = _excluded(trials)
    counts = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}
    key = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }
    for t in trials:
        if t.number not in skip:
            counts[key[t.state]] += 1
    return counts


def claimed(trials: Sequence[FrozenTrial], below: int | None = None) -> int:
    """Counted trials that are finished or running (numbered below ``below`` when given)."""
    skip = _excluded(trials)
    return sum(
        1
        for t in trials
        if t.number not in skip
        and t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
        and (below is None or t.number < below)
    )


def admit(n_trials: int | None):
    def admit(trial: Any) -> str | None:
        study = getattr(trial, "study", None)
        if n_trials is None or study is None:
            return None
        if claimed(study.get_trials(deepcopy=False), below=trial.number) >= n_trials:
            return f"the study already had {n_trials} trials when trial {trial.number} started"
        return None

    return admit


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_worker(t: FrozenTrial, now: datetime.datetime) -> str | None:
    worker = t.user_attrs.get("worker")
    if worker is None:
        started = t.datetime_start or now
        return "no worker recorded" if (now - started).total_seconds() > ORPHAN_SECONDS else None
    host, _, pid = str(worker).rpartition(":")
    if host != socket.gethostname():
        return None
    return None if _process_alive(int(pid)) else f"worker {worker} is gone"


def recover(study: optuna.Study) -> None:
    """Fail the trials of dead workers and queue them again; queue interrupted trials again; drop duplicates."""
    storage = study._storage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # databases with heartbeats (no-op otherwise)
    heartbeat = isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = None if heartbeat else _dead_worker(t, now)
        if reason is None:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", f"interrupted: {reason}")
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                retry_trial(study, storage.get_trial(t._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker was first
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
            retry_trial(study, t)
    _drop_duplicate_rule_trials(study)


def _drop_duplicate_rule_trials(study: optuna.Study) -> None:
    """Two workers starting together may both enqueue the rule trial: keep the first, retire the others."""
    rule = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("rule") and "retry_of" not in t.user_attrs]
    for t in sorted(rule, key=lambda t: t.number)[1:]:
        if t.state == TrialState.WAITING and study._storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
            study._storage.set_trial_user_attr(t._trial_id, "duplicate", True)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
