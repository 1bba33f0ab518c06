"""Where (configuration, fold) jobs and search workers run: this machine, a Ray cluster, or SLURM.

An executor takes :class:`~autoseg.training.jobs.Task` s (a Python command line, its log and its run folder) and
gives back their :class:`~autoseg.training.jobs.TaskResult` s: ``submit`` returns a handle, ``wait`` the results.
The engine does the scheduling (resources, queues, retries); autoseg only submits and waits.

- ``local``: :func:`~autoseg.training.jobs.run_tasks`, one task per device of this machine (today's job runner).
- ``ray``: one Ray task per job (:mod:`autoseg.training.executor_ray`), retried when its worker dies.
- ``slurm``: one SLURM job per task through submitit (:mod:`autoseg.training.executor_slurm`), requeued when it
  is preempted or runs out of time.

On a worker, each task runs :func:`run_task`: the command as a child process tied to the worker process
(:mod:`autoseg.processes`), its output appended to the task's log in the run folder, so that results land in the
run folder exactly as with the local executor. A job killed half-way resumes from its latest checkpoint when it
runs again. The run folder (and the dataset folder, read for the validation cases) must be on a filesystem every
worker shares: :func:`check_shared_folder` checks that the run folder can be written before anything is
submitted, and every remote task checks that its worker sees it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.errors import ConfigError
from autoseg.files import write_text_atomic
from autoseg.processes import tethered_command
from autoseg.runfolder import RunFolder
from autoseg.training.jobs import Task, TaskResult, detect_devices, report_result, run_tasks

__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorOptions",
    "LocalExecutor",
    "check_shared_folder",
    "make_executor",
    "run_task",
]

EXECUTORS = ("local", "ray", "slurm")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ExecutorOptions:
    """Which executor, and its settings (the CLI's ``--executor`` options).

    ``ray_address``: a running cluster (``ray://host:10001`` or ``host:6379``); None: ``RAY_ADDRESS``, else a Ray
    instance on this machine. ``cpus_per_task``: CPUs a job reserves (Ray, SLURM). ``max_retries``: how often Ray
    runs a job again whose worker died, how often SLURM requeues one that timed out or was preempted.
    ``slurm_cluster``: None (SLURM), or submitit's ``"local"`` / ``"debug"`` to run the same jobs on this machine.
    """

    name: str = "local"
    ray_address: str | None = None
    cpus_per_task: int = 1
    max_retries: int = 3
    slurm_partition: str | None = None
    slurm_time_minutes: int = 24 * 60
    slurm_cluster: str | None = None

    def __post_init__(self) -> None:
        if self.name not in EXECUTORS:
            raise ConfigError(f"--executor {self.name!r}: unknown; choose one of {', '.join(EXECUTORS)}")
        if self.cpus_per_task < 1 or self.max_retries < 0 or self.slurm_time_minutes < 1:
            raise ConfigError(
                f"executor options: --cpus-per-job {self.cpus_per_task} must be >= 1, retries {self.max_retries} "
                f">= 0, --slurm-time {self.slurm_time_minutes} minutes >= 1"
            )


class Executor(ABC):
    """Runs tasks somewhere; ``run(tasks)`` is ``wait([submit(t) for t in tasks])``."""

    name: str

    @abstractmethod
    def submit(self, task: Task) -> Any:
        """Start (or queue) ``task``; returns a handle for :meth:`wait`."""

    @abstractmethod
    def wait(self, handles: Sequence[Any], progress: Progress | None = None) -> list[TaskResult]:
        """Wait for every handle's task; returns their results (failures too) as they end.

        ``progress(done, total)`` is called as tasks end."""

    def run(self, tasks: Sequence[Task], progress: Progress | None = None) -> list[TaskResult]:
        """Submit ``tasks`` and wait for all of them."""
        return self.wait([self.submit(task) for task in tasks], progress)

    def close(self) -> None:
        """Release what the executor started (a Ray instance of its own); nothing by default."""
        return None


class LocalExecutor(Executor):
    """This machine: tasks wait for a free device and run one per device (:func:`run_tasks`) when waited for."""

    name = "local"

    def __init__(self, devices: Sequence[str] | None = None) -> None:
        self.devices = list(devices or detect_devices())

    def submit(self, task: Task) -> Task:
        return task

    def wait(self, handles: Sequence[Task], progress: Progress | None = None) -> list[TaskResult]:
        return run_tasks(handles, self.devices, progress=progress)


def make_executor(options: ExecutorOptions, run_dir: Path | str, *, devices: str | None = None) -> Executor:
    """The executor ``options`` name, for jobs of the run folder ``run_dir`` (checked writable for a cluster).

    ``devices``: this machine's devices for the local executor (``"0,1"``, ``"cpu"``; default: all visible)."""
    if options.name == "local":
        return LocalExecutor(detect_devices(devices))
    check_shared_folder(run_dir, options.name)
    if options.name == "ray":
        from autoseg.training.executor_ray import RayExecutor

        return RayExecutor(options.ray_address, cpus_per_task=options.cpus_per_task, max_retries=options.max_retries)
    from autoseg.training.executor_slurm import SlurmExecutor

    return SlurmExecutor(
        RunFolder(run_dir).cluster / "submitit",
        cluster=options.slurm_cluster,
        partition=options.slurm_partition,
        time_minutes=options.slurm_time_minutes,
        cpus_per_task=options.cpus_per_task,
        max_retries=options.max_retries,
    )


def check_shared_folder(run_dir: Path | str, executor: str) -> None:
    """Raise a clear error unless this process can write into ``run_dir`` (which cluster workers must share)."""
    probe = Path(run_dir) / f".write-check-{socket.gethostname()}-{os.getpid()}"
    try:
        write_text_atomic(probe, "autoseg\n")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{run_dir}: cannot write into the run folder ({exc}); with --executor {executor} it must be a writable "
            "folder on a filesystem every worker shares (NFS, Lustre, ...), with the dataset folder"
        ) from None


class WorkerError(RuntimeError):
    """A remote worker cannot run a task (it does not see the run folder)."""


def run_task(argv: Sequence[str], log: str, folder: str | None = None) -> tuple[int, str]:
    """On a worker: run ``python *argv`` (this interpreter) as a child tied to this process, its output appended
    to ``log``; returns (exit status, host). Raises :class:`WorkerError` when the worker does not see ``folder``.
    """
    host = socket.gethostname()
    if folder is not None and not Path(folder).is_dir():
        raise WorkerError(
            f"{folder}: the run folder is not visible on worker {host}; put it on a filesystem every worker shares"
        )
    path = Path(log)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        done = subprocess.run(
            tethered_command([sys.executable, *argv], os.getpid()), stdout=handle, stderr=subprocess.STDOUT
        )
    return done.returncode, host


def failed_result(task: Task, where: str, seconds: float, reason: str) -> TaskResult:
    """The result of a task the engine could not run to an exit status (exit 1), with ``reason`` in its log."""
    try:
        with open(task.log, "a") as handle:
            handle.write(f"\nautoseg: {task.name} failed on {where}: {reason}\n")
    except OSError:
        pass
    return TaskResult(task, where, 1, round(seconds, 1))


def finished(results: list[TaskResult], result: TaskResult, total: int, progress: Progress | None) -> None:
    """Record ``result``: log it, append it, call ``progress``."""
    report_result(result)
    results.append(result)
    if progress is not None:
        progress(len(results), total)
