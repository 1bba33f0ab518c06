"""Benchmark helpers: run a command, measure wall time and the peak memory of its whole process tree."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from autoseg.processes import tethered_command

RESULTS = Path(__file__).resolve().parent / "results"
AUTOSEG = [sys.executable, "-m", "autoseg.cli"]
NNUNET_PYTHON = os.environ.get("NNUNET_PYTHON", "/work/nnunet-venv/bin/python")


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd``; return wall seconds and the peak summed RSS of the process tree (polled every 20 ms)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(_rss(p) for p in _tree(proc.pid)))
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    done.set()
    thread.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}")
    return {"wall_s": round(wall, 3), "peak_rss_mib": round(peak / 2**20, 1), "output_tail": output[-1500:]}


#: Seeds below this are development data (tests, the example, earlier benchmark runs); evaluation draws above it.
FIRST_EVALUATION_SEED = 1000


def evaluation_seed(given: int | None) -> tuple[int, str]:
    """The synthetic-data seed of an evaluation run and where it came from.

    Without ``--seed`` every run draws a fresh seed (never one that tuned a rule: those are all below
    :data:`FIRST_EVALUATION_SEED`); a given seed reproduces an earlier run.
    """
    if given is not None:
        return given, "given (reproduces a run; development data if below 1000)"
    import secrets

    return FIRST_EVALUATION_SEED + secrets.randbelow(2**31 - FIRST_EVALUATION_SEED), "fresh (drawn for this run)"


def run_autoseg(args: list[str], log: Path, threads: int) -> float:
    """``autoseg ARGS`` with ``threads`` torch threads, its output to ``log``; returns wall seconds, exits on a
    failure (naming the log)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as fh:
        command = tethered_command([*AUTOSEG, *args], os.getpid())  # ends when this script is killed
        done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"autoseg {' '.join(args)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def git_commit() -> str:
    """The commit this code is at, with "+uncommitted changes in autoseg/" when the package differs from it."""
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "autoseg"], capture_output=True, text=True, cwd=root)
    return commit + ("+uncommitted changes in autoseg/" if dirty.stdout.strip() else "")


def machine() -> dict:
    """Facts about the machine for the results file."""
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()}


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def add_run(name: str, header: dict, group: str, key: str, entry: dict, *, folder: Path = RESULTS) -> Path:
    """Add ``entry`` as ``runs[group][key]`` of ``results/<name>.json``, keeping every run already there.

    ``header`` says what the file holds (e.g. the dataset); a new file starts with it and an existing file must have
    the same, else ValueError (use another name). An entry already under ``group``/``key`` is replaced, with a notice.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    data = json.loads(path.read_text()) if path.is_file() else {**header, "runs": {}}
    differs = {k: (data.get(k), v) for k, v in header.items() if data.get(k) != v}
    if differs:
        raise ValueError(f"{path} holds other results ({differs}); pass another results name")
    runs = data["runs"].setdefault(group, {})
    if key in runs:
        print(f"{path}: replacing the run {group}/{key}", file=sys.stderr)
    runs[key] = entry
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))
