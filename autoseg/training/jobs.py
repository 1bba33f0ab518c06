"""Placing (configuration, fold) training jobs on this machine's devices.

One job per GPU at a time, queued when there are more jobs than GPUs; a single CPU "device" when there is no
GPU. Each job runs ``autoseg train`` in its own process (so a crash or an out-of-memory error ends that job only)
with its output in ``RUN/models/<config>/fold_<k>/job.log``; failed jobs are reported with the tail of their log.
Jobs that need several GPUs (``training.gpus_per_job`` > 1) are launched with torchrun. A job is a :class:`Task`:
a Python command line (without the interpreter) and its log, so that the same task runs here (:func:`run_tasks`)
or on a cluster through an existing engine (:mod:`autoseg.training.executors`: Ray, SLURM); this is not a
cluster scheduler.

Jobs end with the job runner however it ends. Each job runs through :mod:`autoseg.processes`, which kills it when
the runner's process is gone (SIGKILL included), as torchrun's ranks are killed when torchrun is; each job has its
own process group, which the runner signals (SIGTERM, then SIGKILL) when it stops early: on SIGTERM or Ctrl-C
(both raise KeyboardInterrupt here) or an error. A stopped job resumes from its last checkpoint next time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from autoseg.processes import sigterm_raises, tethered_command
from autoseg.runfolder import fold_dir

__all__ = [
    "Job",
    "JobResult",
    "JobSpec",
    "Task",
    "TaskResult",
    "detect_devices",
    "job_command",
    "job_task",
    "run_jobs",
    "run_tasks",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    config: str
    fold: str
    gpus: int = 1  # > 1: data-parallel over this many devices, launched with torchrun


@dataclass(frozen=True)
class JobResult:
    job: Job
    device: str
    returncode: int
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True)
class Task:
    """One process to run on some machine: ``python *argv`` with that machine's interpreter, its output appended
    to ``log``. ``gpus``: the GPUs it needs (0: none; here a task takes at least one device, "cpu" included);
    ``folder``: the run folder it works in, which a remote worker must see (a shared filesystem)."""

    name: str
    argv: tuple[str, ...]
    log: Path
    gpus: int = 1
    folder: Path | None = None


@dataclass(frozen=True)
class TaskResult:
    task: Task
    where: str  # the device(s) here, or the executor's worker / job id
    returncode: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def detect_devices(requested: str | None = None) -> list[str]:
    """``"0,1"`` -> ["cuda:0", "cuda:1"]; ``"cpu"`` -> ["cpu"]; None -> every visible GPU, else ["cpu"]."""
    if requested:
        if requested.strip() == "cpu":
            return ["cpu"]
        return [
            f"cuda:{d.strip()}" if not d.strip().startswith(("cuda", "cpu")) else d.strip()
            for d in requested.split(",")
            if d.strip()
        ]
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


@dataclass(frozen=True)
class JobSpec:
    """What one job trains and how."""

    run_dir: str
    config: str
    fold: str
    overrides: tuple[str, ...] = ()
    device: str = "auto"
    workers: int | None = None
    validate: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        data = json.loads(text)
        return cls(**{**data, "overrides": tuple(data.get("overrides", ()))})


def job_command(spec: JobSpec, gpus: int = 1) -> list[str]:
    """The process of one job: the Python entry point :mod:`autoseg.job` with ``spec`` (its device comes from the
    environment); torchrun for a job on several GPUs, each rank through :mod:`autoseg.processes`, so that it ends
    when torchrun does."""
    if gpus > 1:
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        return [sys.executable, *torchrun, "-m", "autoseg.processes", "autoseg.job", spec.to_json()]
    return [sys.executable, "-m", "autoseg.job", spec.to_json()]


def job_task(spec: JobSpec, gpus: int = 1) -> Task:
    """The task of one job: :func:`job_command` without the interpreter, logged to its fold's ``job.log``;
    ``gpus`` 0 for a CPU job (one process, like 1)."""
    log = fold_dir(spec.run_dir, spec.config, spec.fold) / "job.log"
    argv = tuple(job_command(spec, max(gpus, 1))[1:])
    return Task(f"{spec.config} fold {spec.fold}", argv, log, gpus, Path(spec.run_dir))


Launcher = Callable[[Job, str, Path], subprocess.Popen]
TaskLauncher = Callable[[Task, str], subprocess.Popen]


def _launch(task: Task, device: str) -> subprocess.Popen:
    """Start ``task`` on ``device`` (``cuda:0,cuda:1`` or ``cpu``), tied to this process, in its own group."""
    env = dict(os.environ)
    gpus = [d.split(":", 1)[1] if ":" in d else "0" for d in device.split(",") if d.startswith("cuda")]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    task.log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(task.log, "ab")
    try:
        return subprocess.Popen(
            tethered_command([sys.executable, *task.argv], os.getpid()),
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            process_group=0,  # the job and its loader workers: one group to signal
        )
    finally:
        handle.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _signal_job(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to a job's process group when it leads one (the default launcher), else to the job alone."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _stop_jobs(procs: Sequence[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM every running job, which saves nothing half-written and stops its workers; SIGKILL it after the grace."""
    alive = [p for p in procs if p.poll() is None]
    if not alive:
        return
    log.warning("stopping %d running job(s); run the same command again to resume them", len(alive))
    for proc in alive:
        _signal_job(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for proc in alive:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_job(proc, signal.SIGKILL)
            proc.wait()


def run_jobs(
    run_dir: Path | str,
    jobs: Sequence[Job],
    devices: Sequence[str],
    *,
    overrides: Sequence[str] = (),
    workers: int | None = None,
    validate: bool = True,
    launcher: Launcher | None = None,
    poll_seconds: float = 0.5,
    stop_seconds: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[JobResult]:
    """Run ``jobs`` over ``devices``, one job per device at a time; return every job's result (failures too).

    ``progress(done, total)`` is called as jobs end. ``launcher(job, device, logfile)`` replaces the job process
    (tests). See :func:`run_tasks` for stopping early.
    """
    run_dir = Path(run_dir)
    fitted = [dataclasses.replace(job, gpus=min(job.gpus, len(devices))) for job in jobs]
    settings = (tuple(overrides), "auto", workers, validate)
    tasks = {job_task(JobSpec(str(run_dir), job.config, job.fold, *settings), job.gpus): job for job in fitted}
    launch: TaskLauncher | None = None
    if launcher is not None:
        user = launcher

        def launch(task: Task, device: str) -> subprocess.Popen:
            task.log.parent.mkdir(parents=True, exist_ok=True)
            return user(tasks[task], device, task.log)

    results = run_tasks(
        list(tasks), devices, launcher=launch, poll_seconds=poll_seconds, stop_seconds=stop_seconds, progress=progress
    )
    return [JobResult(tasks[r.task], r.where, r.returncode, r.seconds, r.task.log) for r in results]


def run_tasks(
    tasks: Sequence[Task],
    devices: Sequence[str],
    *,
    launcher: TaskLauncher | None = None,
    poll_seconds: float = 0.5,
    stop_seconds: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[TaskResult]:
    """Run ``tasks`` on this machine over ``devices``, one task per device at a time (a task of ``gpus`` > 1 takes
    that many); return every task's result (failures too). ``progress(done, total)`` is called as tasks end.

    Stopped early (SIGTERM, Ctrl-C, an error), it stops the running tasks (``stop_seconds`` to end cleanly, then
    killed) before raising.
    """
    running: dict[str, tuple[Task, subprocess.Popen, float]] = {}
    with sigterm_raises():
        try:
            return _place(list(tasks), list(devices), launcher or _launch, running, poll_seconds, progress)
        finally:
            _stop_jobs([proc for _, proc, _ in running.values()], stop_seconds)


def _place(
    queue: list[Task],
    devices: list[str],
    launch: TaskLauncher,
    running: dict[str, tuple[Task, subprocess.Popen, float]],
    poll_seconds: float,
    progress: Callable[[int, int], None] | None = None,
) -> list[TaskResult]:
    free = list(devices)
    results: list[TaskResult] = []
    total = len(queue)
    while queue or running:
        while queue and len(free) >= min(max(queue[0].gpus, 1), len(devices)):
            task = queue.pop(0)
            take = min(max(task.gpus, 1), len(devices))
            device, free = ",".join(free[:take]), free[take:]
            log.info("start %s on %s (log: %s)", task.name, device, task.log)
            running[device] = (task, launch(task, device), time.perf_counter())
        for device in list(running):
            task, proc, start = running[device]
            code = proc.poll()
            if code is None:
                continue
            del running[device]
            free.extend(device.split(","))
            result = TaskResult(task, device, code, round(time.perf_counter() - start, 1))
            results.append(result)
            if progress is not None:
                progress(len(results), total)
            report_result(result)
        if running:
            time.sleep(poll_seconds)
    return results


def report_result(result: TaskResult) -> None:
    """Log a task's end; a failure with the tail of its log."""
    task = result.task
    if result.ok:
        log.info("done %s on %s in %.0f s", task.name, result.where, result.seconds)
    else:
        log.error(
            "FAILED %s on %s (exit %d); last lines of %s:\n%s",
            task.name,
            result.where,
            result.returncode,
            task.log,
            _tail(task.log),
        )
