"""Placing (configuration, fold) training jobs on this machine's devices.

One job per GPU at a time, queued when there are more jobs than GPUs; a single CPU "device" when there is no
GPU. Each job runs ``autoseg train`` in its own process (so a crash or an out-of-memory error ends that job only)
with its output in ``RUN/models/<config>/fold_<k>/job.log``; failed jobs are reported with the tail of their log.
Jobs that need several GPUs (``training.gpus_per_job`` > 1 in a future plan) would be launched with torchrun.
Across machines use an existing launcher (torchrun, SLURM, Ray); this is not a cluster scheduler.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from autoseg.training.trainer import fold_dir

__all__ = ["Job", "JobResult", "detect_devices", "train_command", "run_jobs"]

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


def train_command(run_dir: Path, job: Job, overrides: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
    """The ``autoseg train`` command line for one job (device given through the environment; torchrun for DDP)."""
    python = [sys.executable]
    if job.gpus > 1:
        python += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.gpus}"]
    cmd = python + ["-m", "autoseg.cli", "train", str(run_dir), "-c", job.config, "-f", job.fold]
    cmd += ["--device", "auto", "--no-jobs"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + list(extra)


Launcher = Callable[[Job, str, Path], subprocess.Popen]


def _default_launcher(run_dir: Path, overrides: Sequence[str], extra: Sequence[str]) -> Launcher:
    def launch(job: Job, device: str, logfile: Path) -> subprocess.Popen:
        env = dict(os.environ)
        gpus = [d.split(":", 1)[1] if ":" in d else "0" for d in device.split(",") if d.startswith("cuda")]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        handle = open(logfile, "ab")
        try:
            return subprocess.Popen(
                train_command(run_dir, job, overrides, extra), stdout=handle, stderr=subprocess.STDOUT, env=env
            )
        finally:
            handle.close()

    return launch


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_jobs(
    run_dir: Path | str,
    jobs: Sequence[Job],
    devices: Sequence[str],
    *,
    overrides: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    launcher: Launcher | None = None,
    poll_seconds: float = 0.5,
) -> list[JobResult]:
    """Run ``jobs`` over ``devices``, one job per device at a time; return every job's result (failures too)."""
    run_dir = Path(run_dir)
    launch = launcher or _default_launcher(run_dir, overrides, extra_args)
    queue = list(jobs)
    free = list(devices)
    running: dict[str, tuple[Job, subprocess.Popen, float, Path]] = {}
    results: list[JobResult] = []
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
