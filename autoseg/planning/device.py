"""The device a plan is made for: what it is, how much memory it has, and how fast it trains.

Speed is measured, not guessed: :func:`measure_step_seconds` times real training steps (forward, loss, backward,
SGD) of a network at a patch and batch size, on this machine's CPU or GPU. The planner uses it to calibrate its
FLOP-based estimate and to check the plan it made.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence

import torch

from autoseg.errors import PlanningError
from autoseg.planning.plans import DeviceSpec, NetworkSpec

__all__ = ["describe_device", "measure_step_seconds", "GIB"]

log = logging.getLogger(__name__)

GIB = 2**30


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * GIB


def describe_device(device: str = "auto", gpu_memory_gb: float | None = None) -> DeviceSpec:
    """The target device: ``cpu``, ``cuda`` (this machine's GPU) or ``auto``.

    ``gpu_memory_gb`` plans for a GPU of that size whether or not one is present (planning for another machine).
    """
    cores = os.cpu_count() or 1
    if gpu_memory_gb is not None:
        if gpu_memory_gb <= 0:
            raise PlanningError(f"--gpu-memory must be positive, got {gpu_memory_gb}")
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"GPU with {gpu_memory_gb:g} GB"
        return DeviceSpec("cuda", int(gpu_memory_gb * GIB), name, cores)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PlanningError("--device cuda: no CUDA device here; give --gpu-memory GB to plan for another machine")
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        return DeviceSpec("cuda", int(props.total_memory), props.name, cores)
    if device != "cpu":
        raise PlanningError(f"--device {device!r}: choose auto, cpu or cuda")
    return DeviceSpec("cpu", _ram_bytes(), _cpu_name(), cores)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def measure_step_seconds(
    spec: NetworkSpec,
    in_channels: int,
    n_outputs: int,
    patch_size: Sequence[int],
    batch_size: int,
    *,
    device: str = "cpu",
    steps: int = 3,
    precision: str = "fp32",
) -> float:
    """Fastest of ``steps`` timed training steps after one warm-up step: the trainer's step with the plan's network
    and default loss (:func:`autoseg.networks.step.probe_step`).

    The minimum, not the mean: other processes can only slow a step down, so the fastest is the best estimate of
    what the machine does when training has it to itself.
    """
    from autoseg.networks.step import probe_step  # networks import torch.nn; keep planning import-light

    dev = torch.device(device)
    step, _ = probe_step(spec, in_channels, n_outputs, patch_size, batch_size, precision=precision, device=dev)
    times = []
    for i in range(steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:
            times.append(time.perf_counter() - start)
    seconds = min(times)
    log.debug("measured %.3f s per step for patch %s batch %d on %s", seconds, tuple(patch_size), batch_size, device)
    return seconds if math.isfinite(seconds) else float("inf")
