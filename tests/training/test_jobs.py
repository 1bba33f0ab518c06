"""Placement of (configuration, fold) jobs on devices, tested with a fake device list and fake jobs."""

from __future__ import annotations

import subprocess
import sys
import time

from autoseg.training.jobs import Job, JobSpec, detect_devices, job_command, run_jobs


def test_detect_devices_parses_the_flag():
    assert detect_devices("0,1") == ["cuda:0", "cuda:1"]
    assert detect_devices("cpu") == ["cpu"]
    assert detect_devices("cuda:3") == ["cuda:3"]


def test_one_job_per_device_queue_and_failures(tmp_path):
    starts: dict[Job, tuple[str, float]] = {}

    def launcher(job, device, logfile):
        starts[job] = (device, time.perf_counter())
        code = 3 if job.fold == "2" else 0
        script = f"import time, sys; time.sleep(0.4); print('job {job.fold}'); sys.exit({code})"
        with open(logfile, "ab") as fh:
            return subprocess.Popen([sys.executable, "-c", script], stdout=fh, stderr=subprocess.STDOUT)

    jobs = [Job("3d_fullres", str(f)) for f in range(5)]
    results = run_jobs(tmp_path, jobs, ["cuda:0", "cuda:1"], launcher=launcher, poll_seconds=0.05)
    assert sorted(r.job.fold for r in results) == ["0", "1", "2", "3", "4"]
    failed = [r for r in results if not r.ok]
    assert [r.job.fold for r in failed] == ["2"] and failed[0].returncode == 3
    assert "job 2" in failed[0].log.read_text()
    assert {d for d, _ in starts.values()} == {"cuda:0", "cuda:1"}
    # never more than two jobs at once: the third job starts only after one of the first two ended
    order = sorted(starts.values(), key=lambda item: item[1])
    assert order[2][1] - order[0][1] >= 0.35


def test_a_job_process_runs_the_python_entry_point_with_its_spec(tmp_path):
    spec = JobSpec(str(tmp_path), "2d", "all", ("training.epochs=3",), workers=1)
    cmd = job_command(spec)
    assert cmd[1:3] == ["-m", "autoseg.job"] and JobSpec.from_json(cmd[3]) == spec


def test_multi_gpu_job_takes_several_devices_and_uses_torchrun(tmp_path):
    launched = []

    def launcher(job, device, logfile):
        launched.append((job, device, time.perf_counter()))
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])

    jobs = [Job("3d_fullres", "0", gpus=2), Job("3d_fullres", "1"), Job("3d_fullres", "2")]
    results = run_jobs(tmp_path, jobs, ["cuda:0", "cuda:1", "cuda:2"], launcher=launcher, poll_seconds=0.05)
    assert all(r.ok for r in results)
    assert launched[0][1] == "cuda:0,cuda:1" and launched[1][1] == "cuda:2"
    assert launched[2][2] - launched[0][2] >= 0.25  # the third job waited for free devices
    cmd = job_command(JobSpec(str(tmp_path), "3d_fullres", "0"), gpus=2)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5:8] == ["-m", "autoseg.processes", "autoseg.job"]
