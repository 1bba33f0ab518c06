"""autoseg's own planner: nnU-Net's shared rules, sized for the real device and time budget.

- GPU: the patch starts as large as the median image allows and shrinks until the *memory model in bytes*
  (:mod:`autoseg.planning.memory`) fits the budget at batch 2; what is left goes to the batch. With 16 GB or more
  the encoder uses residual blocks (nnU-Net's ResEnc presets beat the plain U-Net at equal data).
- CPU: the limit is time, not memory. Each width candidate gets the largest patch whose training step fits the
  target (<= 1.5 s in 3D, <= 0.6 s in 2D, from a measured step of a probe network), and the widest network whose
  patch still covers a quarter of the median image wins. The chosen plan is then timed for real.
- Class balance sets the foreground oversampling and the loss; the time budget sets the number of epochs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from autoseg.devices import planned_precision
from autoseg.errors import PlanningError
from autoseg.fingerprint import Fingerprint
from autoseg.planning import rules
from autoseg.planning.device import GIB, measure_step_seconds
from autoseg.planning.memory import estimate_flops, estimate_training_memory
from autoseg.planning.plans import Configuration, DeviceSpec, LossSpec, NetworkSpec, TrainingSpec
from autoseg.planning.topology import Topology, pool_and_conv_props, shrink_patch, unet_for_topology

__all__ = ["Budget", "plan_configuration", "class_balance", "epochs_for_budget", "CPU_SECONDS_PER_ITERATION"]

#: Target seconds per training iteration on a CPU (3D, 2D).
CPU_SECONDS_PER_ITERATION = {3: 1.5, 2: 0.6}
#: Share of the GPU memory the planner fills (the rest is CUDA context, allocator slack and other processes).
GPU_MEMORY_FILL = 0.85
#: On a CPU the patch should cover at least this share of the median image before width is increased.
CPU_MIN_COVERAGE = 0.25
CPU_WIDTHS = (32, 24, 16, 12, 8)
#: Largest batch the planner uses (3D, 2D): beyond it a step gains little per sample at a fixed learning rate.
MAX_BATCH = {3: 16, 2: 64}


@dataclass(frozen=True)
class Budget:
    """What one training step may cost on the target device."""

    device: DeviceSpec
    flops_per_second: float  # measured (CPU) or assumed (GPU) training throughput
    n_outputs: int
    in_channels: int

    @property
    def is_cpu(self) -> bool:
        return self.device.kind == "cpu"

    @property
    def precision(self) -> str:
        return planned_precision(self.device.kind)

    def memory_limit(self) -> int:
        return int(self.device.memory_bytes * (0.5 if self.is_cpu else GPU_MEMORY_FILL))

    def seconds(self, net: NetworkSpec, patch: Sequence[int], batch: int) -> float:
        return estimate_flops(net, self.in_channels, self.n_outputs, patch, batch) / self.flops_per_second

    def memory(self, net: NetworkSpec, patch: Sequence[int], batch: int) -> int:
        return estimate_training_memory(
            net, self.in_channels, self.n_outputs, patch, batch, precision=self.precision, device=self.device.kind
        ).total_bytes

    def fits(self, net: NetworkSpec, patch: Sequence[int], batch: int) -> bool:
        if self.memory(net, patch, batch) > self.memory_limit():
            return False
        return not self.is_cpu or self.seconds(net, patch, batch) <= CPU_SECONDS_PER_ITERATION[len(patch)]


def _shrink(
    spacing: rules.Vector,
    median: rules.Vector,
    start: rules.Vector,
    budget: Budget,
    make: Callable[[Topology], NetworkSpec],
) -> tuple[Topology, int] | None:
    """The largest patch whose network ``make`` builds fits the budget at batch 2 (ties: the last axis shrinks)."""
    return shrink_patch(
        start,
        median,
        lambda patch: pool_and_conv_props(spacing, patch),
        lambda t: budget.fits(make(t), t.patch_size, 2),
    )


def _grow_batch(net: NetworkSpec, patch: Sequence[int], budget: Budget, n_voxels: float) -> int:
    """Largest batch (from 2) that fits the budget, at most MAX_BATCH and the 5%-of-the-dataset cap."""
    limit = min(rules.dataset_fraction_batch_cap(n_voxels, patch).value, MAX_BATCH[len(patch)])
    batch = 2
    while batch < limit and budget.fits(net, patch, batch + 1):
        batch += 1
    return batch


def _coverage(patch: Sequence[int], median: rules.Vector) -> float:
    return float(np.prod([min(1.0, p / m) for p, m in zip(patch, median)]))


def plan_patch(
    spacing: rules.Vector, median: rules.Vector, n_voxels: float, budget: Budget
) -> tuple[NetworkSpec, tuple[int, ...], int, list[str]]:
    """Network, patch and batch for one configuration at ``spacing`` (preprocessed order)."""
    ndim = len(spacing)
    start = rules.initial_patch_size(spacing, median)
    why = [start.why]
    max_features = 320 if ndim == 3 else 512
    if budget.is_cpu:
        target = CPU_SECONDS_PER_ITERATION[ndim]
        options = []
        for base in CPU_WIDTHS:

            def make(t, base=base):
                return unet_for_topology(t, base, block="plain", max_features=min(max_features, 8 * base))

            shrunk = _shrink(spacing, median, start.value, budget, make)
            if shrunk is not None:
                options.append((base, shrunk[0], make(shrunk[0]), shrunk[1]))
        if not options:
            raise PlanningError("no network fits the CPU time target even at width 8; the images are too large")
        chosen = next((o for o in options if _coverage(o[1].patch_size, median) >= CPU_MIN_COVERAGE), options[-1])
        base, topo, net, steps = chosen
        batch = _grow_batch(net, topo.patch_size, budget, n_voxels) if steps == 0 else 2
        seconds = budget.seconds(net, topo.patch_size, batch)
        why.append(
            f"CPU: each width {list(CPU_WIDTHS)} got the largest patch whose step is estimated under {target:g} s;"
            f" width {base} is the widest whose patch {list(topo.patch_size)} covers >= {CPU_MIN_COVERAGE:.0%} "
            f"of the median image (or the narrowest): {_coverage(topo.patch_size, median):.0%} covered"
            + (
                f"; the patch covers the median image, so the time left goes to the batch: {batch}"
                if steps == 0
                else ""
            )
            + f"; estimated {seconds:.2f} s per iteration"
        )
        return net, tuple(topo.patch_size), batch, why
    block = "residual" if budget.device.memory_bytes >= 16 * GIB else "plain"
    why.append(
        f"{budget.device.memory_bytes / GIB:.0f} GB GPU: {'residual' if block == 'residual' else 'plain'} "
        f"encoder blocks"
        + (
            " (as nnU-Net's ResEnc presets, better at equal data)"
            if block == "residual"
            else " (residual encoders need 16 GB or more)"
        )
    )

    def make_gpu(t):
        return unet_for_topology(t, 32, block=block, max_features=max_features)

    shrunk = _shrink(spacing, median, start.value, budget, make_gpu)
    if shrunk is None:
        raise PlanningError(f"no patch fits {budget.device.memory_bytes / GIB:.1f} GB; give more --gpu-memory")
    topo, steps = shrunk
    net = make_gpu(topo)
    cap = rules.dataset_fraction_batch_cap(n_voxels, topo.patch_size)
    batch = 2
    if steps == 0:  # the patch covers the median image: spend the remaining memory on the batch
        batch = _grow_batch(net, topo.patch_size, budget, n_voxels)
    limit = budget.memory_limit() / GIB
    how = f"shrunk in {steps} steps" if steps else "the median image"
    why.append(
        f"patch {list(topo.patch_size)} ({how}), "
        f"batch {batch}: estimated {budget.memory(net, topo.patch_size, batch) / GIB:.2f} GB of the "
        f"{limit:.1f} GB budget"
        + (f"; {cap.why}; at most {MAX_BATCH[ndim]} per step" if steps == 0 else "; the patch is the binding limit")
    )
    return net, tuple(topo.patch_size), batch, why


def class_balance(
    fp: Fingerprint, patch: Sequence[int], spacing: rules.Vector, ndim: int
) -> tuple[LossSpec, float, list[str]]:
    """Loss and foreground oversampling from the class balance (nnU-Net fixes both: Dice+CE, 0.33)."""
    batch_dice = ndim == 2
    known = [c for c in fp.classes if c.voxel_fraction is not None]
    if not known:
        return (
            LossSpec("dice_ce", batch_dice),
            0.33,
            ["class balance unknown (imported fingerprint): Dice + CE, oversampling 0.33 as nnU-Net"],
        )
    patch_mm3 = float(np.prod(patch) * np.prod(spacing))

    def object_mm3(c):  # the object a typical voxel of the class lies in (older fingerprints: the median object)
        return c.typical_object_volume_mm3 if c.typical_object_volume_mm3 is not None else c.median_object_volume_mm3

    tiny = [
        c
        for c in known
        if (c.voxel_fraction or 0) < 0.01 or (object_mm3(c) is not None and object_mm3(c) < 0.01 * patch_mm3)
    ]
    rare = [c for c in known if c.present_fraction is not None and c.present_fraction < 0.5]
    oversampling, loss, why = 0.33, LossSpec("dice_ce", batch_dice), []
    if tiny:
        oversampling = 0.5
        loss = LossSpec("dice_topk", batch_dice, {"k": 10.0})
        why.append(
            f"class(es) {', '.join(c.name for c in tiny)} are tiny (< 1% of the foreground, or half of their "
            "voxels lie in objects < 1% of the patch): Dice + TopK-10% cross-entropy, so the hardest voxels "
            "drive the gradient, and half the patches are forced to contain foreground"
        )
    if rare:
        oversampling = 0.66
        loss = dataclasses.replace(loss, batch_dice=True)
        why.append(
            f"class(es) {', '.join(c.name for c in rare)} appear in under half the cases: two thirds of the "
            "patches are forced to contain foreground, and Dice is computed over the batch"
        )
    if not why:
        why.append(
            "classes are balanced (each >= 1% of the foreground, present in most cases): Dice + CE, "
            "one third of the patches forced to contain foreground (nnU-Net's defaults)"
        )
    return loss, oversampling, why


#: Share of a time budget kept for what is not training iterations: the validation cases of each fold (predicted
#: at full resolution after training), start-up, selection.
RESERVE_CROSS_VALIDATION = 0.2
#: The same for one model trained on all cases: start-up only (measured: 35 s of a 1 h Hippocampus run).
RESERVE_ONE_MODEL = 0.05


def epochs_for_budget(
    seconds_per_iteration: float,
    hours: float,
    n_jobs: int,
    *,
    iterations: int,
    val_iterations: int,
    reserve: float = RESERVE_CROSS_VALIDATION,
) -> tuple[int, str]:
    """Epochs so that ``n_jobs`` trainings fit ``hours``, ``reserve`` of it kept for everything but iterations."""
    per_epoch = seconds_per_iteration * (iterations + val_iterations / 3)
    epochs = max(1, int((1 - reserve) * hours * 3600 / n_jobs / per_epoch))
    return epochs, (
        f"time budget {hours:g} h for {n_jobs} training jobs at an estimated {seconds_per_iteration:.2f} s "
        f"per iteration: {epochs} epochs of {iterations} iterations ({reserve:.0%} of the budget kept for "
        "validation and start-up)"
    )


def plan_configuration(
    name: str,
    fp: Fingerprint,
    spacing: rules.Vector,
    median: rules.Vector,
    n_voxels: float,
    budget: Budget,
    base: Configuration,
) -> Configuration:
    """A full configuration: topology, patch and batch for the budget, then the class-balance rules."""
    net, patch, batch, why = plan_patch(spacing, median, n_voxels, budget)
    aug = rules.augmentation_for_patch(patch)
    loss, oversampling, balance_why = class_balance(fp, patch, spacing, len(patch))
    estimate = budget.memory(net, patch, batch)
    return dataclasses.replace(
        base,
        name=name,
        spacing=tuple(float(s) for s in spacing),
        patch_size=patch,
        batch_size=batch,
        median_image_size=tuple(float(m) for m in median),
        network=net,
        augmentation=aug.value,
        loss=loss,
        foreground_oversampling=oversampling,
        estimated_memory_bytes=int(estimate),
        data_identifier=name,
        why=base.why + tuple(why) + (aug.why,) + tuple(balance_why),
    )


def calibrate_cpu(in_channels: int, n_outputs: int) -> tuple[float, str]:
    """Measured training throughput of this CPU (FLOP/s) from a probe U-Net step."""
    topo = pool_and_conv_props((3.0, 1.0, 1.0), (16, 64, 64))
    probe = unet_for_topology(topo, 16, block="plain", max_features=128)
    seconds = measure_step_seconds(probe, in_channels, n_outputs, topo.patch_size, 2)
    flops = estimate_flops(probe, in_channels, n_outputs, topo.patch_size, 2)
    rate = flops / seconds
    return rate, f"this CPU trains at {rate / 1e9:.1f} GFLOP/s (probe U-Net step measured: {seconds:.2f} s)"


def check_cpu_speed(c: Configuration, budget: Budget) -> tuple[float, str]:
    """Time the planned network for real; return measured seconds per iteration and a reason."""
    seconds = measure_step_seconds(c.network, budget.in_channels, budget.n_outputs, c.patch_size, c.batch_size)
    target = CPU_SECONDS_PER_ITERATION[c.ndim]
    verdict = "within" if seconds <= target * 1.15 else "ABOVE"
    return (
        seconds,
        f"measured {seconds:.2f} s per training step at this patch and batch ({verdict} the {target:g} s target)",
    )


def default_training(budget: Budget) -> TrainingSpec:
    if budget.is_cpu:
        return TrainingSpec(epochs=20, iterations_per_epoch=50, val_iterations=5)
    return TrainingSpec()
