"""Jobs on a cluster executor: a local Ray cluster (two worker processes) and submitit's local executor run a tiny
run's (configuration, fold) jobs once each, a job whose Ray worker is killed mid-run is retried and resumes, and
the run folder ends exactly as with the local executor (same files, same weights); search workers on Ray share
one study."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.storages.journal import JournalFileBackend

from autoseg.cli import build_parser
from autoseg.commands import executor_options as _executor
from autoseg.errors import ConfigError
from autoseg.pipeline import train_jobs
from autoseg.planning.plans import load_plans
from autoseg.search import search
from autoseg.training.checkpoint import load_checkpoint
from autoseg.training.executors import EXECUTORS, ExecutorOptions, check_shared_folder, make_executor
from autoseg.training.trainer import TrainOptions
from tests.training.test_trainer import make_tiny_run

FOLDS = ["0", "1"]
EPOCHS = 10


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A preprocessed tiny run (no model trained yet)."""
    os.environ["OMP_NUM_THREADS"] = "1"  # job processes (local, Ray and submitit alike) compute the same sums
    return make_tiny_run(tmp_path_factory.mktemp("executors"), cases=5, epochs=EPOCHS)


def _copy(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest, symlinks=True, ignore=shutil.ignore_patterns("models"))
    return dest


def _train(run: Path, executor: ExecutorOptions | None) -> None:
    options = TrainOptions(device="cpu", workers=0)
    train_jobs(
        run, load_plans(run), ["3d_fullres"], FOLDS, devices="cpu", in_process=False, options=options, executor=executor
    )


@pytest.fixture(scope="module")
def local_run(prepared) -> Path:
    """The reference: the same jobs with the local executor (one job process at a time)."""
    run = _copy(prepared, prepared.parent / "local")
    _train(run, None)
    return run


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in (run / "models").rglob("*") if p.is_file())


def _attempts(run: Path, fold: str) -> int:
    """How often the job of ``fold`` started training (the trainer's line in the job's log)."""
    text = (run / "models" / "3d_fullres" / f"fold_{fold}" / "job.log").read_text()
    return len(re.findall(rf"training 3d_fullres fold {fold} on", text))


def _same_as_local(run: Path, local: Path) -> None:
    assert _files(run) == _files(local)
    for fold in FOLDS:
        folder = Path("models") / "3d_fullres" / f"fold_{fold}"
        a = load_checkpoint(run / folder / "checkpoint_final.pt")["network"]
        b = load_checkpoint(local / folder / "checkpoint_final.pt")["network"]
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        assert (run / folder / "validation" / "summary.json").is_file()


def _job_pid(run: Path, fold: str) -> int | None:
    """The process of ``fold``'s job in ``run`` (``python -m autoseg.processes ... autoseg.job SPEC``)."""
    for entry in Path("/proc").iterdir():
        try:
            spec = (entry / "cmdline").read_bytes().split(b"\0")[-2] if entry.name.isdigit() else b""
        except (OSError, IndexError):
            continue
        if spec.startswith(b"{") and f'"run_dir": "{run}"'.encode() in spec and f'"fold": "{fold}"'.encode() in spec:
            return int(entry.name)
    return None


def _kill_worker_mid_run(run: Path, fold: str, killed: list[int]) -> None:
    """SIGKILL the Ray worker running ``fold``'s job once its first epoch is checkpointed, before its last."""
    folder = run / "models" / "3d_fullres" / f"fold_{fold}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if (folder / "checkpoint_latest.pt").is_file() and not (folder / "checkpoint_final.pt").exists():
            pid = _job_pid(run, fold)
            if pid is not None:
                worker = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                assert (Path("/proc") / str(worker) / "cmdline").read_bytes().startswith(b"ray::")
                os.kill(worker, signal.SIGKILL)
                killed.append(worker)
                return
        time.sleep(0.01)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of two worker processes (one CPU each)."""
    ray = pytest.importorskip("ray")
    niceness = os.environ.get("RAY_worker_niceness")
    os.environ["RAY_worker_niceness"] = "0"  # Ray's default (15) starves the jobs on a busy machine
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if niceness is None:
        del os.environ["RAY_worker_niceness"]
    else:
        os.environ["RAY_worker_niceness"] = niceness


@pytest.mark.timeout(300)
def test_ray_runs_each_job_once_retries_a_killed_worker_and_matches_local(prepared, local_run, ray_cluster, tmp_path):
    run = _copy(prepared, tmp_path / "run")
    killed: list[int] = []
    killer = threading.Thread(target=_kill_worker_mid_run, args=(run, "0", killed))
    killer.start()
    _train(run, ExecutorOptions("ray", max_retries=2))
    killer.join()
    assert killed, "the test did not kill fold 0's worker mid-run"
    assert _attempts(run, "1") == 1 and _attempts(run, "0") == 2  # once each; the killed one retried once
    log0 = (run / "models" / "3d_fullres" / "fold_0" / "job.log").read_text()
    assert re.search(r"resuming 3d_fullres fold 0 at epoch [1-9]", log0)  # resumed, not restarted
    _same_as_local(run, local_run)


@pytest.mark.timeout(300)
def test_submitit_local_executor_runs_the_same_jobs(prepared, local_run, tmp_path):
    pytest.importorskip("submitit")
    run = _copy(prepared, tmp_path / "run")
    _train(run, ExecutorOptions("slurm", slurm_cluster="local", cpus_per_task=1))
    assert [_attempts(run, f) for f in FOLDS] == [1, 1]
    assert (run / "cluster" / "submitit").is_dir()  # submitit's own files, beside the results
    _same_as_local(run, local_run)


@pytest.mark.timeout(300)
def test_search_workers_run_on_ray_and_share_one_study(prepared, ray_cluster, tmp_path):
    run = _copy(prepared, tmp_path / "run")
    result = search(
        run,
        trials=2,
        study_name="cluster",
        config="3d_fullres",
        value="pseudo_dice",
        budget_epochs=1,
        workers=0,
        device="cpu",
        measure_steps=False,
        executor=ExecutorOptions("ray"),
        search_workers=2,
    )
    assert (result.n_complete, result.n_pruned, result.n_failed) in [(2, 0, 0), (1, 1, 0)]
    assert [p.name for p in sorted((run / "search" / "cluster").glob("worker_*.log"))] == [
        "worker_0.log",
        "worker_1.log",
    ]
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(run / "search" / "journal.log")))
    trials = optuna.load_study(study_name="cluster", storage=storage).get_trials()
    here = f"{socket.gethostname()}:{os.getpid()}"
    assert trials and all(t.user_attrs["worker"] != here for t in trials)  # the workers ran them, not this process
    assert load_plans(run).search["study"] == "cluster"


def test_cli_executor_options():
    args = build_parser().parse_args(
        ["train", "RUN", "--executor", "slurm", "--slurm-partition", "gpu", "--slurm-time", "90", "--cpus-per-job", "8"]
    )
    assert _executor(args) == ExecutorOptions("slurm", cpus_per_task=8, slurm_partition="gpu", slurm_time_minutes=90)
    for name in EXECUTORS:  # the CLI offers every executor there is
        assert build_parser().parse_args(["run", "DATA", "-o", "RUN", "--executor", name]).executor == name
    with pytest.raises(ConfigError, match="unknown"):
        ExecutorOptions("kubernetes")


def test_slurm_without_slurm_is_refused_not_run_here(tmp_path):
    pytest.importorskip("submitit")
    if shutil.which("srun"):
        pytest.skip("this machine is a SLURM node")
    with pytest.raises(ConfigError, match="SLURM"):
        make_executor(ExecutorOptions("slurm"), tmp_path)


def test_a_run_folder_that_cannot_be_written_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="every worker shares"):
        check_shared_folder(tmp_path / "file" / "run", "ray")
