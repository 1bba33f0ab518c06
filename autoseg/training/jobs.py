"""Placing (configuration, fold) training jobs on this machine's devices.

One job per GPU at a time, queued when there are more jobs than GPUs; a single CPU "device" when there is no
GPU. Each job runs ``autoseg train`` in its own process (so a crash or an out-of-memory error ends that job only)
with its output in ``RUN/models/<config>/fold_<k>/job.log``; failed jobs are reported with the tail of their log.
Jobs that need several GPUs (``training.gpus_per_job`` > 1 in a future plan) would be launched with torchrun.
Across machines use an existing launcher (torchrun, SLURM, Ray); this is not a cluster scheduler.

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

__all__ = ["Job", "JobResult", "JobSpec", "detect_devices", "job_command", "run_jobs"]

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


Launcher = Callable[[Job, str, Path], subprocess.Popen]


def _default_launcher(run_dir: Path, overrides: Sequence[str], workers: int | None, validate: bool) -> Launcher:
    def spec(job: Job) -> JobSpec:
        return JobSpec(str(run_dir), job.config, job.fold, tuple(overrides), "auto", workers, validate)

    def launch(job: Job, device: str, logfile: Path) -> subprocess.Popen:
        env = dict(os.environ)
        gpus = [d.split(":", 1)[1] if ":" in d else "0" for d in device.split(",") if d.startswith("cuda")]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        handle = open(logfile, "ab")
        try:
            return subprocess.Popen(
                tethered_command(job_command(spec(job), job.gpus), os.getpid()),
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,  # the job and its loader workers: one group to signal
            )
        finally:
            handle.close()

    return launch


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

    ``progress(done, total)`` is called as jobs end.

    Stopped early (SIGTERM, Ctrl-C, an error), it stops the running jobs (``stop_seconds`` to end cleanly, then
    killed) before raising.
    """
    run_dir = Path(run_dir)
    launch = launcher or _default_launcher(run_dir, overrides, workers, validate)
    running: dict[str, tuple[Job, subprocess.Popen, float, Path]] = {}
    with sigterm_raises():
        try:
            return _place(run_dir, list(jobs), list(devices), launch, running, poll_seconds, progress)
        finally:
            _stop_jobs([proc for _, proc, _, _ in running.values()], stop_seconds)


def _place(
    run_dir: Path,
    queue: list[Job],
    devices: list[str],
    launch: Launcher,
    running: dict[str, tuple[Job, subprocess.Popen, float, Path]],
    poll_seconds: float,
    progress: Callable[[int, int], None] | None = None,
) -> list[JobResult]:
    free = list(devices)
    results: list[JobResult] = []
    total = len(queue)
    while queue or running:
        while queue and len(free) >= min(queue[0].gpus, len(devices)):
            job = queue.pop(0)
            take = min(job.gpus, len(devices))
            job = dataclasses.replace(job, gpus=take) if take != job.gpus else job
            device, free = ",".join(free[:take]), free[take:]
            logfile = fold_dir(run_dir, job.config, job.fold) / "job.log"
            logfile.parent.mkdir(parents=True, exist_ok=True)
            log.info("start %s fold %s on %s (log: %s)", job.config, job.fold, device, logfile)
            running[device] = (job, launch(job, device, logfile), time.perf_counter(), logfile)
        for device in list(running):
            job, proc, start, logfile = running[device]
            code = proc.poll()
            if code is None:
                continue
            del running[device]
            free.extend(device.split(","))
            result = JobResult(job, device, code, round(time.perf_counter() - start, 1), logfile)
            results.append(result)
            if progress is not None:
                progress(len(results), total)
            if result.ok:
                log.info("done %s fold %s on %s in %.0f s", job.config, job.fold, device, result.seconds)
            else:
                log.error(
                    "FAILED %s fold %s on %s (exit %d); last lines of %s:\n%s",
                    job.config,
                    job.fold,
                    device,
                    code,
                    logfile,
                    _tail(logfile),
                )
        if running:
            time.sleep(poll_seconds)
    return results
