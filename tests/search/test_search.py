"""The search on CPU: objective with FixedTrial, a study that writes its best back, failures, resume, PostgreSQL."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoseg.data.synth import make_dataset
from autoseg.errors import ConfigError
from autoseg.fingerprint import extract_fingerprint
from autoseg.planning.planner import make_plans
from autoseg.planning.plans import load_plans
from autoseg.preprocessing.preprocess import preprocess
from autoseg.runfolder import record_dataset
from autoseg.search import search
from autoseg.search.objective import EpochReporter, Objective, TrialSettings
from autoseg.search.space import rule_params
from autoseg.search.storage import describe_storage, trial_counts, with_driver
from autoseg.search.study import PerTrialSeedSampler

TINY = ["training.epochs=2", "training.iterations_per_epoch=2", "training.val_iterations=1"]
FAST = {"config": "2d", "value": "pseudo_dice", "workers": 0, "device": "cpu", "budget_epochs": 1}
ROOT = Path(__file__).resolve().parents[2]
POSTGRES_URL_FILE = Path("/tmp/autoseg-postgres-url")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A preprocessed run of 4 tiny CT cases, planned for a very slow CPU (tiny networks, fast training)."""
    root = tmp_path_factory.mktemp("search")
    data = make_dataset(root / "data", "ct3d", cases=4, test_cases=0, seed=0)
    run = root / "run"
    record_dataset(run, data)
    fp = extract_fingerprint(data, run / "fingerprint.json", workers=1)
    make_plans(fp, device="cpu", check_speed=False, cpu_flops=5e7, overrides=TINY).save(run / "plans.json")
    preprocess(run, data_dir=data, workers=1)
    return run


@pytest.fixture
def run(prepared: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(prepared, out, symlinks=True)
    return out


def _study(run: Path, name: str, storage: str | None = None) -> optuna.Study:
    url = storage or optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run / "search" / "journal.log"))
    )
    return optuna.load_study(study_name=name, storage=url)


def test_objective_runs_with_a_fixed_trial_in_its_own_folder(run):
    plans = load_plans(run)
    settings = TrialSettings(run, run / "search" / "fixed", ("3d_fullres", "2d"), workers=0, device="cpu")
    trial = optuna.trial.FixedTrial(rule_params(plans, "2d"), number=7)
    value = Objective(plans, settings)(trial)
    assert 0.0 <= value <= 1.0
    assert set(trial.user_attrs["dice_per_class"]) == {"organ", "lesion", "bone"}
    assert trial.user_attrs["configuration"] == "2d"
    folder = run / "search" / "fixed" / "trial_7"
    assert (folder / "preprocessed").is_symlink() and (folder / "splits.json").is_symlink()
    assert list(load_plans(folder).configurations) == ["2d"]
    assert (folder / "models" / "2d" / "fold_0" / "validation" / "summary.json").is_file()
    assert not list(folder.rglob("*.pt"))  # checkpoints of finished trials are removed
    assert not (run / "models").exists()  # the real run is untouched


class _PruningTrial:
    def __init__(self):
        self.reports = []

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return True


def test_reporter_stops_a_pruned_trial_but_never_at_its_last_epoch():
    trial = _PruningTrial()
    reporter = EpochReporter(trial, epochs=3)
    assert reporter(0, {"ema_dice": 0.1}) is True and reporter.pruned_at == 1
    last = EpochReporter(trial, epochs=1)
    assert last(0, {"ema_dice": 0.2}) is False and last.pruned_at is None
    assert trial.reports == [(1, 0.1), (1, 0.2)]


def test_study_writes_the_best_back_and_records_a_failed_trial(run, monkeypatch):
    import autoseg.search.objective as objective

    calls = []
    real = objective.train_fold

    def failing_second(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(objective, "train_fold", failing_second)
    result = search(run, trials=3, study_name="s3", config="2d", workers=0, device="cpu")
    assert result.n_complete + result.n_pruned + result.n_failed == 3
    assert result.n_failed >= 1 and result.rule_value is not None
    trials = _study(run, "s3").get_trials()
    assert trials[0].params == {k: v for k, v in rule_params(load_plans(run), "2d").items() if k != "configuration"}
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert "CUDA out of memory (simulated)" in failed[0].user_attrs["fail_reason"]
    plans = load_plans(run)
    assert plans.search["study"] == "s3" and plans.search["trial"] == result.best_trial
    assert plans.search["value"] == pytest.approx(result.best_value)
    assert plans.search["n_failed"] == result.n_failed
    assert "from the search" in plans.configurations["2d"].why[-1]
    assert (
        plans.configurations["3d_fullres"]
        == load_plans(run / "search" / "rule_plans.json").configurations["3d_fullres"]
    )
    assert (run / "search" / "history.png").stat().st_size > 1000
    assert (run / "search" / "importances.png").stat().st_size > 1000
    again = search(run, trials=3, study_name="s3", config="2d", workers=0, device="cpu")
    assert len(_study(run, "s3").get_trials()) == 3 and again.best_trial == result.best_trial  # nothing left to do


WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import autoseg.search.objective as objective

    run, marker, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    hang_at, kwargs = int(sys.argv[4]), json.loads(sys.argv[5])
    calls, real = [], objective.train_fold

    def train_fold(folder, *args, **kw):
        calls.append(folder)
        if len(calls) == hang_at:
            marker.write_text(str(folder))
            time.sleep(600)
        return real(folder, *args, **kw)

    objective.train_fold = train_fold
    from autoseg.search import search

    marker.with_suffix(".ready").touch()
    while not go.exists():
        time.sleep(0.05)
    search(run, **kwargs)
    """
)


def _worker(tmp_path: Path, run: Path, kwargs: dict, *, hang_at: int = 0, tag: str = "w") -> tuple:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    marker, go = tmp_path / f"{tag}.hang", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(script), str(run), str(marker), str(go), str(hang_at), json.dumps(kwargs)]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), marker


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.time() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.stderr.read().decode()[-3000:]}")
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.1)


def test_a_killed_search_resumes_without_losing_or_duplicating_trials(run, tmp_path):
    kwargs = {**FAST, "trials": 3, "study_name": "resume"}
    proc, marker = _worker(tmp_path, run, kwargs, hang_at=2)
    (tmp_path / "go").touch()
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = Path(marker.read_text()).name
    result = search(run, **kwargs)
    trials = _study(run, "resume").get_trials()
    counts = trial_counts(_study(run, "resume"))
    assert counts["complete"] + counts["pruned"] + counts["failed"] == 3
    assert counts["running"] == counts["waiting"] == 0
    interrupted = [t for t in trials if t.user_attrs.get("fail_reason", "").startswith("interrupted")]
    assert len(interrupted) == 1 and f"trial_{interrupted[0].number}" == killed
    retries = [t for t in trials if t.user_attrs.get("retry_of") == interrupted[0].number]
    assert len(retries) == 1 and retries[0].params == interrupted[0].params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert not (run / "search" / "resume" / f"trial_{retries[0].number}").exists()  # resumed in the killed one's
    assert sum(1 for t in trials if t.user_attrs.get("rule")) == 1
    assert result.n_complete + result.n_pruned + result.n_failed == 3


def _postgres_url() -> str:
    if not POSTGRES_URL_FILE.is_file():
        pytest.skip(f"no PostgreSQL server ({POSTGRES_URL_FILE} missing; .ci/postgres starts one)")
    url = POSTGRES_URL_FILE.read_text().strip()
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(with_driver(url)).connect():
            pass
    except Exception as exc:  # driver missing or server down
        pytest.skip(f"PostgreSQL at {url} not reachable: {exc}")
    return url


@pytest.mark.postgres
def test_two_workers_share_one_study_on_postgresql(run, tmp_path):
    url, name = _postgres_url(), f"two-workers-{uuid.uuid4().hex[:8]}"
    runs = [run, tmp_path / "run_b"]
    shutil.copytree(run, runs[1], symlinks=True)  # the second "machine"
    kwargs = {**FAST, "trials": 4, "storage": url, "study_name": name}
    procs = [_worker(tmp_path, r, kwargs, tag=f"w{i}")[0] for i, r in enumerate(runs)]
    while len(list(tmp_path.glob("*.ready"))) < 2:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    study = optuna.load_study(study_name=name, storage=with_driver(url))
    counts = trial_counts(study)
    assert counts["complete"] + counts["pruned"] + counts["failed"] == 4
    assert counts["running"] == counts["waiting"] == 0
    counted = [t for t in study.get_trials() if not t.user_attrs.get("duplicate") and not t.user_attrs.get("surplus")]
    assert len({json.dumps(t.params, sort_keys=True) for t in counted}) == len(counted) == 4
    assert len({t.user_attrs["worker"] for t in counted}) == 2  # both workers ran trials
    assert sum(1 for t in counted if t.user_attrs.get("rule")) == 1
    for r in runs:
        assert load_plans(r).search["study"] == name


@pytest.mark.postgres
def test_heartbeats_fail_and_retry_a_killed_workers_trial(run, tmp_path):
    url, name = _postgres_url(), f"heartbeat-{uuid.uuid4().hex[:8]}"
    kwargs = {**FAST, "trials": 1, "storage": url, "study_name": name, "heartbeat_seconds": 1}
    proc, marker = _worker(tmp_path, run, kwargs, hang_at=1)
    (tmp_path / "go").touch()
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(4)  # past the grace period (3 heartbeats)
    search(run, **kwargs)
    study = optuna.load_study(study_name=name, storage=with_driver(url))
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs.get("rule")
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].params == trials[0].params and retry[0].state == TrialState.COMPLETE
    counts = trial_counts(study)
    assert counts == {"complete": 1, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}  # the retry counts


def test_sampler_is_seeded_per_trial_number():
    def draws(seed: int) -> list[float]:
        study = optuna.create_study(sampler=PerTrialSeedSampler(seed, n_startup_trials=4), direction="maximize")
        out = []
        for _ in range(3):
            trial = study.ask()
            out.append(trial.suggest_float("x", 0.0, 1.0))
            study.tell(trial, out[-1])
        return out

    first = draws(0)
    assert first == draws(0) and len(set(first)) == 3  # reproducible, and each trial number its own stream
    assert first != draws(1)


def test_storage_description_hides_the_password(tmp_path):
    assert describe_storage("postgresql://me:secret@db:5432/x", tmp_path) == "postgresql://me:***@db:5432/x"
    assert describe_storage(None, tmp_path) == "search/journal.log"


def test_a_plan_made_again_after_a_search_is_not_mixed_with_the_old_study(run):
    search(run, trials=1, study_name="once", **{**FAST, "value": "pseudo_dice"})
    plans = load_plans(run)
    assert plans.search is not None
    replanned = dataclasses.replace(plans, search=None, why=plans.why + ("planned again",))
    replanned.save(run / "plans.json")
    with pytest.raises(ConfigError, match="planned again since the last search"):
        search(run, trials=1, study_name="once", **FAST)


def test_cli_search_writes_the_best_plan_that_train_then_reads(run, capsys):
    from autoseg.cli import main
    from autoseg.runfolder import fold_dir
    from autoseg.training.checkpoint import config_from_checkpoint, load_checkpoint
    from autoseg.training.trainer import TrainOptions, train_fold

    args = ["search", str(run), "--trials", "2", "--config", "2d", "--budget-epochs", "1", "-j", "0"]
    assert main([*args, "--device", "cpu", "--study", "cli"]) == 0
    out = capsys.readouterr().out
    assert "study cli" in out and "best parameters written to" in out
    plans = load_plans(run)
    best = _study(run, "cli").best_trial
    assert plans.search["trial"] == best.number
    assert best.user_attrs["plan"]["patch_size"] == list(plans.configurations["2d"].patch_size)
    options = TrainOptions(device="cpu", workers=0, stop_after_epochs=1)
    train_fold(run, "2d", 0, options=options)  # `autoseg train` reads RUN/plans.json: the searched plan
    trained = config_from_checkpoint(load_checkpoint(fold_dir(run, "2d", 0) / "checkpoint_latest.pt"))
    assert trained["patch_size"] == best.user_attrs["plan"]["patch_size"]
    assert trained["training"]["learning_rate"] == pytest.approx(best.user_attrs["plan"]["training"]["learning_rate"])


def test_cli_search_needs_a_budget(run, capsys):
    from autoseg.cli import main

    with pytest.raises(SystemExit):
        main(["search", str(run)])
    assert "--trials" in capsys.readouterr().err
