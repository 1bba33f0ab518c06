"""``--executor ray``: each task is a Ray task running :func:`~autoseg.training.executors.run_task` on a worker.

``ray.init(address)`` joins a running cluster (``--ray-address``, else ``RAY_ADDRESS``) or, with neither, starts
a Ray instance on this machine. A task reserves ``num_gpus`` (the job's GPUs; 0 for a CPU plan) and
``cpus_per_task`` CPUs, so Ray places one job per GPU and queues the rest. Ray runs a task again, up to
``max_retries`` times, when its worker process or node dies; :func:`ray_task` also asks for a retry when the job
process itself was killed by a signal (the out-of-memory killer, an operator). A retried job resumes from its
latest checkpoint. Stopped early (Ctrl-C, SIGTERM), the driver cancels its tasks, which ends their jobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from autoseg.processes import sigterm_raises
from autoseg.training.executors import Executor, Progress, failed_result, finished, run_task
from autoseg.training.jobs import Task, TaskResult

__all__ = ["JobKilled", "RayExecutor", "ray_task"]

log = logging.getLogger(__name__)


class JobKilled(RuntimeError):
    """The job process was killed by a signal: Ray runs the task again."""


def ray_task(argv: Sequence[str], log_path: str, folder: str | None) -> tuple[int, str]:
    """The Ray task: :func:`run_task`, raising :class:`JobKilled` (retried) when the job died of a signal."""
    code, host = run_task(argv, log_path, folder)
    if code < 0:
        raise JobKilled(f"the job process on {host} was killed by signal {-code}")
    return code, host


@dataclass(frozen=True)
class _Handle:
    task: Task
    ref: Any  # ray.ObjectRef
    start: float


class RayExecutor(Executor):
    """Jobs as Ray tasks on a Ray cluster (see the module docstring)."""

    name = "ray"

    def __init__(self, address: str | None = None, *, cpus_per_task: int = 1, max_retries: int = 3) -> None:
        self._own = not ray.is_initialized()
        if self._own:
            ray.init(address=address, log_to_driver=False)
        self.cpus_per_task, self.max_retries = cpus_per_task, max_retries
        self._remote = ray.remote(ray_task)

    def submit(self, task: Task) -> _Handle:
        options = self._remote.options(
            name=task.name,
            num_cpus=self.cpus_per_task,
            num_gpus=task.gpus,
            max_retries=self.max_retries,
            retry_exceptions=[JobKilled],
        )
        folder = str(task.folder) if task.folder is not None else None
        ref = options.remote(list(task.argv), str(task.log), folder)
        log.info("submitted %s to Ray (%d GPU, %d CPU)", task.name, task.gpus, self.cpus_per_task)
        return _Handle(task, ref, time.perf_counter())

    def wait(self, handles: Sequence[_Handle], progress: Progress | None = None) -> list[TaskResult]:
        pending = {h.ref: h for h in handles}
        results: list[TaskResult] = []
        with sigterm_raises():
            try:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    for ref in done:
                        h = pending.pop(ref)
                        finished(results, self._result(h), len(handles), progress)
            finally:
                for ref in pending:  # stopped early: end the jobs still queued or running
                    ray.cancel(ref, force=True)
        return results

    def _result(self, handle: _Handle) -> TaskResult:
        seconds = time.perf_counter() - handle.start
        try:
            code, host = ray.get(handle.ref)
        except ray.exceptions.RayError as exc:  # the task raised, or its worker died once too often
            return failed_result(handle.task, "ray", seconds, str(exc).strip().splitlines()[-1])
        return TaskResult(handle.task, f"ray worker on {host}", code, round(seconds, 1))

    def close(self) -> None:
        if self._own and ray.is_initialized():
            ray.shutdown()
