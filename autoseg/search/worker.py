"""One search worker in a process of its own: ``python -m autoseg.search.worker ARGUMENTS``.

A cluster executor (:mod:`autoseg.training.executors`) runs this on its workers for ``autoseg search --executor
ray|slurm``: ``ARGUMENTS`` is a JSON object of :func:`autoseg.search.search`'s arguments (``run_dir`` included),
the same for every worker; each worker runs trials of the shared study until it has its trials or the time is up.
:func:`run_workers` sends them to the executor.
The exit status follows :func:`autoseg.processes.command_status`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autoseg.errors import ConfigError
from autoseg.planning.plans import Plans
from autoseg.training.executors import ExecutorOptions, make_executor
from autoseg.training.jobs import Task

__all__ = ["main", "run_workers"]

log = logging.getLogger(__name__)


def run_workers(
    run_dir: Path,
    rule: Plans,
    folder: Path,
    executor: ExecutorOptions,
    n: int,
    arguments: dict[str, Any],
    start: float,
) -> None:
    """Run ``n`` search workers (:mod:`autoseg.search.worker` with ``arguments``) on the cluster ``executor``."""
    if n < 1:
        raise ConfigError(f"--search-workers {n}: give at least 1")
    if arguments["time_budget_hours"]:  # the workers get what is left of the budget
        left = arguments["time_budget_hours"] - (time.perf_counter() - start) / 3600
        arguments = {**arguments, "time_budget_hours": max(left, 1e-6)}
    storage = arguments["storage"]
    if storage and "://" not in storage:  # a journal file: the same file from wherever a worker starts
        arguments = {**arguments, "storage": str(Path(storage).resolve())}
    run_dir, folder = run_dir.resolve(), folder.resolve()
    argv = ("-m", "autoseg.search.worker", json.dumps({"run_dir": str(run_dir), **arguments}))
    gpus = 1 if rule.device.kind == "cuda" else 0
    tasks = [Task(f"search worker {i}", argv, folder / f"worker_{i}.log", gpus, run_dir) for i in range(n)]
    runner = make_executor(executor, run_dir)
    try:
        results = runner.run(tasks)
    finally:
        runner.close()
    failed = [r for r in results if not r.ok]
    if failed:
        logs = ", ".join(str(r.task.log) for r in failed)
        log.error("%d of %d search worker(s) failed: see %s", len(failed), n, logs)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m autoseg.search.worker ARGUMENTS``; returns the exit status."""
    from autoseg.processes import command_status
    from autoseg.search.study import search

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m autoseg.search.worker ARGUMENTS_JSON", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    arguments = json.loads(args[0])
    run_dir = arguments.pop("run_dir")

    def work() -> int:
        search(run_dir, **arguments)
        return 0

    return command_status(work)


if __name__ == "__main__":
    sys.exit(main())
