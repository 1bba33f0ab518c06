"""One (configuration, fold) training job in a process of its own: ``python -m autoseg.job SPEC``.

The job runner (:mod:`autoseg.training.jobs`) starts this module for every job it places on a device, directly
or under ``torchrun`` for a job that spans several GPUs (each rank then runs it through
:mod:`autoseg.processes`, so that it ends when torchrun does). ``SPEC`` is a
:class:`~autoseg.training.jobs.JobSpec` as JSON: a Python entry point with typed arguments, not a command line
of the user-facing CLI. The job is :func:`autoseg.pipeline.train_and_validate`; its exit status follows
:func:`autoseg.processes.command_status` (0, 1 on an error, 130/143 when interrupted).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from autoseg.training.jobs import JobSpec

__all__ = ["main", "run"]


def run(spec: JobSpec) -> int:
    """Train and validate the job's fold in this process."""
    from autoseg.pipeline import train_and_validate
    from autoseg.planning.plans import load_plans
    from autoseg.training.trainer import TrainOptions

    train_and_validate(
        spec.run_dir,
        spec.config,
        spec.fold,
        plans=load_plans(spec.run_dir),
        overrides=spec.overrides,
        options=TrainOptions(device=spec.device, workers=spec.workers),
        validate=spec.validate,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m autoseg.job SPEC``; returns the exit status."""
    from autoseg.processes import command_status

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m autoseg.job SPEC_JSON", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    status = command_status(lambda: run(JobSpec.from_json(args[0])))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a DDP rank: gloo's threads may still hold tensors, and tearing the interpreter down under them
        # aborts the process (SIGABRT), which torchrun reports as a failed job. Everything is written.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
