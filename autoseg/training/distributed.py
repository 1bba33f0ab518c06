"""Data-parallel training of one job on several devices (DDP), launched by ``torchrun``.

``torchrun --nproc_per_node K -m autoseg.processes autoseg.job SPEC`` starts K processes (see
:func:`autoseg.training.jobs.job_command`); each reads its rank from the environment torchrun sets. Each rank
draws its own batches (seed offset by the rank) of ``ceil(batch / K)`` samples, gradients are averaged by DDP,
and rank 0 alone writes checkpoints and logs, and predicts the validation cases after training
(:func:`autoseg.pipeline.train_and_validate`). The job placer (:mod:`autoseg.training.jobs`) launches this when
a plan asks for ``training.gpus_per_job`` > 1.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "from_environment", "is_main_process"]


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if requested.type == "cuda" else requested

    def local_batch(self, batch_size: int) -> int:
        return max(1, math.ceil(batch_size / self.world_size))

    def wrap(self, network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        # the lowest deep-supervision head has weight 0 in the loss: its parameters get no gradient
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(network, device_ids=ids, find_unused_parameters=True)

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (a picklable object; every rank must call this together)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Tear the process group down on every rank together: a rank that exits while rank 0 still validates
        aborted at exit (gloo threads still joinable), killing the job."""
        if dist.is_initialized():
            gc.collect()  # wrapped networks dropped by the caller: their pending gloo work goes with them
            dist.barrier()
            dist.destroy_process_group()


def is_main_process() -> bool:
    """True outside DDP and on rank 0: the process that writes what a job leaves behind."""
    return int(os.environ.get("RANK", "0")) == 0


def from_environment(device: torch.device) -> DistributedContext | None:
    """The context torchrun describes in the environment, with the process group started; None when not DDP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    context = DistributedContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group(backend=backend)
    return context
