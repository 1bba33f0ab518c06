"""``--executor slurm``: each task is a SLURM job submitted through submitit, running
:func:`~autoseg.training.executors.run_task` on the node.

A job asks for the task's GPUs (``gpus_per_node``; one node), ``cpus_per_task`` CPUs, ``time_minutes`` and the
partition. submitit writes its job scripts, pickles and SLURM logs under ``RUN/cluster/submitit/``. When SLURM
preempts a job or its time runs out, submitit requeues it (up to ``max_retries`` times) and the job resumes from
its latest checkpoint. submitit's ``cluster="local"`` (processes on this machine) and ``"debug"`` (in this
process) run the same jobs without SLURM, for tests. Other ``sbatch`` options (account, QOS) come from SLURM's
own ``SBATCH_*`` environment variables.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from autoseg.errors import ConfigError
from autoseg.processes import sigterm_raises
from autoseg.training.executors import Executor, Progress, failed_result, finished, run_task
from autoseg.training.jobs import Task, TaskResult

__all__ = ["SlurmExecutor", "SlurmTask"]

log = logging.getLogger(__name__)


class SlurmTask(submitit.helpers.Checkpointable):
    """:func:`run_task` as a submitit callable that is requeued (same arguments) on preemption or timeout."""

    def __call__(self, argv: Sequence[str], log_path: str, folder: str | None) -> tuple[int, str]:
        return run_task(argv, log_path, folder)


@dataclass(frozen=True)
class _Handle:
    task: Task
    job: Any  # submitit.Job
    start: float


class SlurmExecutor(Executor):
    """Jobs as SLURM jobs through submitit's AutoExecutor (see the module docstring)."""

    name = "slurm"

    def __init__(
        self,
        folder: Path,
        *,
        cluster: str | None = None,  # None: SLURM; "local" / "debug": submitit's executors on this machine
        partition: str | None = None,
        time_minutes: int = 24 * 60,
        cpus_per_task: int = 1,
        max_retries: int = 3,
        poll_seconds: float = 2.0,
    ) -> None:
        try:
            self._executor = submitit.AutoExecutor(
                folder=folder, cluster=cluster or "slurm", slurm_max_num_timeout=max_retries
            )
        except RuntimeError as exc:  # no srun/sbatch here
            raise ConfigError(f"--executor slurm: {exc} (run autoseg on a SLURM login node)") from None
        self.partition, self.time_minutes, self.cpus_per_task = partition, time_minutes, cpus_per_task
        self.poll_seconds = poll_seconds

    def submit(self, task: Task) -> _Handle:
        self._executor.update_parameters(
            name=task.name.replace(" ", "_"),
            timeout_min=self.time_minutes,
            cpus_per_task=self.cpus_per_task,
            gpus_per_node=task.gpus,
            nodes=1,
            tasks_per_node=1,
            slurm_partition=self.partition,
        )
        folder = str(task.folder) if task.folder is not None else None
        job = self._executor.submit(SlurmTask(), list(task.argv), str(task.log), folder)
        log.info("submitted %s as %s job %s", task.name, self._executor.cluster, job.job_id)
        return _Handle(task, job, time.perf_counter())

    def wait(self, handles: Sequence[_Handle], progress: Progress | None = None) -> list[TaskResult]:
        pending = list(handles)
        results: list[TaskResult] = []
        with sigterm_raises():
            try:
                while pending:
                    for h in [h for h in pending if h.job.done()]:
                        pending.remove(h)
                        finished(results, self._result(h), len(handles), progress)
                    if pending:
                        time.sleep(self.poll_seconds)
            finally:
                for h in pending:  # stopped early: cancel the jobs still queued or running
                    h.job.cancel(check=False)
        return results

    def _result(self, handle: _Handle) -> TaskResult:
        seconds = time.perf_counter() - handle.start
        where = f"{self._executor.cluster} job {handle.job.job_id}"
        try:
            code, host = handle.job.result()
        except Exception as exc:  # submitit's FailedJobError / UncompletedJobError, with the job's stderr
            return failed_result(handle.task, where, seconds, str(exc).strip().splitlines()[0])
        return TaskResult(handle.task, f"{where} on {host}", code, round(seconds, 1))
