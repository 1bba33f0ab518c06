"""Regression test for "SIGTERM to `autoseg train` left its data-loader worker running forever".

Every process autoseg starts must end when its parent ends, however the parent ends. These tests start real
process trees (``autoseg train`` with loader workers; the job runner with a training job and its workers;
torchrun with a rank), wait until the deepest child exists, send a real signal to the top process, and check by
process id (``/proc``) that no descendant survives. Linux only (``/proc/<pid>/task/*/children``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autoseg.processes import tethered_command
from autoseg.training.checkpoint import load_checkpoint
from tests.training.test_trainer import make_tiny_run

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").exists() or sys.platform != "linux", reason="reads the process tree from /proc"
)

SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGKILL]


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(p) for p in (task / "children").read_text().split())
        except OSError:  # the task ended meanwhile
            pass
    return found


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in _children(todo.pop()) - found:
            found.add(child)
            todo.append(child)
    return found


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (an ended process whose new parent, here PID 1, may never reap it)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _start(cmd: list[str], cwd: Path, *, path: tuple[Path, ...] = ()) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, path), env.get("PYTHONPATH", "")])
    with open(cwd / "output.log", "wb") as output:  # a file, not a pipe that could fill and block the process
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            # Python ignores Ctrl-C if its parent did (background shells): give it the default, as a terminal does
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def _kill_and_check(proc: subprocess.Popen, deepest: int, sig: signal.Signals) -> int:
    """Wait until ``proc`` has descendants ``deepest`` levels down, send ``sig``, check that all of them end.

    Returns the exit status of ``proc``.
    """

    def depth_reached() -> bool:
        level = {proc.pid}
        for _ in range(deepest):
            level = set().union(*(_children(p) for p in level))
        return bool(level)

    seen: dict[int, str] = {}  # pid -> start time, to never kill a later process that reused a pid
    try:
        # seconds on an idle machine; the limit is for one starved by other work (within pytest's timeout of 600 s)
        if not _wait_until(lambda: depth_reached() or proc.poll() is not None, 240):
            pytest.fail("the process tree never reached its workers")
        if proc.poll() is not None:
            pytest.fail(f"exit status {proc.returncode} before the signal (see output.log in the test's folder)")
        tree = _descendants(proc.pid)
        seen.update({p: stat[1] for p in tree if (stat := _stat(p))})
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        assert _wait_until(lambda: not any(_alive(p) for p in tree), 20), (
            f"survived {sig.name}: {sorted(p for p in tree if _alive(p))}"
        )
        return code
    finally:  # never leave a test's processes behind, whatever failed
        seen.update({p: stat[1] for p in _descendants(proc.pid) if (stat := _stat(p))})
        proc.kill()
        for pid, started in seen.items():
            if (stat := _stat(pid)) is not None and stat[1] == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("orphans"), cases=4, epochs=10_000)


def _check_checkpoints(folder: Path, clean: bool) -> None:
    """An interrupted fold resumes: its latest checkpoint (if any) loads; a clean stop leaves no temporary file."""
    if (folder / "checkpoint_latest.pt").exists():
        assert load_checkpoint(folder / "checkpoint_latest.pt")["epoch"] >= 1
    if clean:
        assert not [p.name for p in folder.glob(".*tmp*")]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_autoseg_train_leaves_no_loader_worker(run_dir, tmp_path, sig):
    cmd = [sys.executable, "-m", "autoseg.cli", "train", str(run_dir), "-c", "3d_fullres", "-f", "0"]
    proc = _start(cmd + ["--device", "cpu", "--workers", "1"], tmp_path)
    code = _kill_and_check(proc, deepest=1, sig=sig)
    output = (tmp_path / "output.log").read_text(errors="replace")
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:  # stopped cleanly, as Ctrl-C does
        assert code == (143 if sig == signal.SIGTERM else 130), output[-3000:]
        assert "interrupted" in output
    _check_checkpoints(run_dir / "models" / "3d_fullres" / "fold_0", clean=sig != signal.SIGKILL)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_job_runner_leaves_no_job_or_worker(run_dir, tmp_path, sig):
    script = textwrap.dedent(f"""
        from autoseg.training.jobs import Job, run_jobs
        run_jobs({str(run_dir)!r}, [Job("3d_fullres", "1")], ["cpu"], workers=1, poll_seconds=0.1)
    """)
    proc = _start([sys.executable, "-c", script], tmp_path)
    code = _kill_and_check(proc, deepest=2, sig=sig)  # runner -> job -> loader worker
    assert code != 0
    log = (run_dir / "models" / "3d_fullres" / "fold_1" / "job.log").read_text(errors="replace")
    if sig != signal.SIGKILL:  # the runner stopped the job, which stopped cleanly
        assert "interrupted" in log, log[-3000:]
    _check_checkpoints(run_dir / "models" / "3d_fullres" / "fold_1", clean=sig != signal.SIGKILL)


def test_torchrun_rank_ends_with_torchrun(tmp_path):
    """Ranks run in their own sessions (torchrun's choice): only the tether ends them when torchrun is killed.

    torchrun runs as the job runner starts it (through autoseg.processes, which names it as its ranks' parent).
    """
    (tmp_path / "sleeper.py").write_text("import time\ntime.sleep(120)\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd = tethered_command([*torchrun, "-m", "autoseg.processes", "sleeper"], os.getpid())
    proc = _start(cmd, tmp_path, path=(tmp_path,))
    _kill_and_check(proc, deepest=1, sig=signal.SIGKILL)


def test_fallback_watchdog_without_prctl(tmp_path):
    """Where prctl is missing (macOS), the parent-pid watchdog thread alone ends the child."""
    script = textwrap.dedent("""
        import os, signal, time
        from autoseg.processes import die_with_parent
        parent = os.getpid()
        if os.fork() == 0:
            die_with_parent(parent, sig=signal.SIGKILL, poll_seconds=0.05, use_prctl=False)
            time.sleep(60)
            os._exit(0)
        time.sleep(60)
    """)
    proc = _start([sys.executable, "-c", script], tmp_path)
    _kill_and_check(proc, deepest=1, sig=signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_pool_workers_end_with_their_parent(tmp_path, sig):
    """The pools of fingerprint, preprocessing, verification and evaluation (``worker_pool``): a parent killed with
    SIGKILL, or ended by SIGTERM without cleanup, takes its pool's workers with it."""
    script = textwrap.dedent("""
        import time
        from autoseg.processes import worker_pool
        pool = worker_pool(2)
        futures = [pool.submit(time.sleep, 120) for _ in range(2)]
        time.sleep(120)
    """)
    proc = _start([sys.executable, "-c", script], tmp_path)
    _kill_and_check(proc, deepest=1, sig=sig)
