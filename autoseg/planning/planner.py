"""``autoseg plan``: fingerprint -> plans.json, for the real device and time budget (or an nnU-Net preset).

:func:`make_plans` is pure apart from timing the CPU; :func:`plan_run` reads ``RUN/fingerprint.json`` and writes
``RUN/plans.json`` atomically.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from autoseg.data import labels as label_layout
from autoseg.devices import planned_precision
from autoseg.errors import PlanningError
from autoseg.fingerprint import Fingerprint, load_fingerprint
from autoseg.planning import default, rules
from autoseg.planning.device import describe_device, measure_step_seconds
from autoseg.planning.memory import estimate_flops
from autoseg.planning.overrides import apply_overrides
from autoseg.planning.plans import (
    AugmentationSpec,
    Configuration,
    DeviceSpec,
    NetworkSpec,
    Plans,
    ResamplingSpec,
)
from autoseg.runfolder import RunFolder

__all__ = ["PRESETS", "make_plans", "plan_like", "plan_run"]

log = logging.getLogger(__name__)

PRESETS = ("default", "nnunet", "nnunet-resenc-m", "nnunet-resenc-l")
#: Without --time-budget, a CPU plan gives each (configuration, fold) job this many hours.
CPU_HOURS_PER_JOB = 0.25
#: Fewer training iterations than this per job and a time budget is spent on fewer jobs (see ``_fit_time``).
#: Measured (benchmarks/budget_split.py, MSD Hippocampus, a development split of the training part, 1 h on one
#: core): one model of 2350 iterations beat a 5-fold ensemble of 450 each by 0.033 [0.027, 0.038] Dice, and the
#: single model's curve gained 0.057 from 450 to 1000 iterations but 0.01 from 1000 to 1500, about what an ensemble
#: of folds adds: below 1000 iterations per fold, iterations are worth more than folds.
MIN_JOB_ITERATIONS = 1000
#: Assumed training throughput of a GPU that is not present (bf16, U-Net convolutions): 30 TFLOP/s.
ASSUMED_GPU_FLOPS = 30e12


def _version() -> str:
    from autoseg import __version__

    return __version__


def _throughput(device: DeviceSpec, in_channels: int, n_outputs: int) -> tuple[float, str]:
    if device.kind == "cpu":
        return default.calibrate_cpu(in_channels, n_outputs)
    if torch.cuda.is_available():
        probe = NetworkSpec(
            5, (32, 64, 128, 256, 320), ((3, 3, 3),) * 5, ((1, 1, 1),) + ((2, 2, 2),) * 4, (2,) * 5, (2,) * 4
        )
        seconds = measure_step_seconds(
            probe,
            in_channels,
            n_outputs,
            (64, 128, 128),
            2,
            device="cuda",
            precision=planned_precision("cuda"),
            steps=3,
        )
        rate = estimate_flops(probe, in_channels, n_outputs, (64, 128, 128), 2) / seconds
        return rate, f"this GPU trains at {rate / 1e12:.1f} TFLOP/s (probe U-Net step measured: {seconds:.3f} s)"
    return ASSUMED_GPU_FLOPS, f"GPU not present: assumed {ASSUMED_GPU_FLOPS / 1e12:g} TFLOP/s for time estimates"


def _base_configuration(fp: Fingerprint, norm: rules.Decision, training) -> Configuration:
    placeholder = NetworkSpec(1, (1,), ((3, 3, 3),), ((1, 1, 1),), (1,), ())
    return Configuration(
        name="",
        spacing=(),
        patch_size=(),
        batch_size=1,
        median_image_size=(),
        normalization=norm.value,
        network=placeholder,
        augmentation=AugmentationSpec(()),
        resampling=ResamplingSpec(),
        training=training,
        why=(norm.why,),
    )


def _lowres(fp, spacing, median, n_cases, budget, base, fullres: Configuration) -> Configuration | None:
    """nnU-Net's rule: a coarser stage while the full-resolution patch covers < 25% of the median image."""

    def plan(low_spacing: np.ndarray, low_median: np.ndarray) -> Configuration:
        n_voxels = float(np.prod(low_median)) * n_cases
        return default.plan_configuration("3d_lowres", fp, low_spacing, low_median, n_voxels, budget, base)

    low = rules.plan_lowres(
        np.asarray(spacing, float), np.asarray(median, float), fullres.patch_size, plan, lambda c: c.patch_size
    )
    return None if low is None else low.planned.with_reason(low.need.why, low.worth.why)


def _plan_configurations(
    fp: Fingerprint,
    target: np.ndarray,
    median: np.ndarray,
    budget: default.Budget,
    base: Configuration,
    spacing_why: str,
    transpose_why: str,
) -> dict[str, Configuration]:
    configs: dict[str, Configuration] = {}
    n = fp.n_cases
    if fp.dim == 3:
        full = default.plan_configuration("3d_fullres", fp, target, median, float(np.prod(median)) * n, budget, base)
        configs["3d_fullres"] = full.with_reason(spacing_why, transpose_why)
        low = _lowres(fp, target, median, n, budget, base, full)
        if low is not None:
            configs["3d_lowres"] = low
            configs["3d_cascade_fullres"] = rules.cascade_stage(
                configs["3d_fullres"],
                "3d_cascade_fullres: planned with 3d_lowres; full resolution with the low-resolution prediction "
                "(one-hot, out of fold for training cases) as extra input channels, where the full-resolution patch "
                "sees too little of the image",
            )
    s2d = rules.spacing_2d(target)
    configs["2d"] = default.plan_configuration(
        "2d", fp, s2d.value, median[1:], float(np.prod(median)) * n, budget, base
    ).with_reason(s2d.why)
    return configs


def make_plans(
    fingerprint: Fingerprint,
    *,
    preset: str = "default",
    device: str = "auto",
    gpu_memory_gb: float | None = None,
    time_budget_hours: float | None = None,
    n_folds: int = 5,
    overrides: Sequence[str] = (),
    check_speed: bool = True,
    cpu_flops: float | None = None,
    cross_validation: bool | None = None,
    like: Plans | None = None,
) -> Plans:
    """Plan from a fingerprint. See the module docstring of :mod:`autoseg.planning.default` for the rules.

    ``like``: another run's plan whose configurations this one copies (:func:`plan_like`), so that its weights fit.

    ``cross_validation`` None lets the time budget decide between cross-validation and one model trained on all
    cases (:func:`_fit_time`); True or False forces it (False also plans the primary configuration only).

    ``check_speed`` times the planned CPU networks for real (and re-plans when they are off the estimate);
    ``cpu_flops`` gives the CPU's training throughput instead of measuring it (planning for another CPU, tests).
    """
    if like is not None:
        own = make_plans(
            fingerprint,
            preset=preset,
            device=device,
            gpu_memory_gb=gpu_memory_gb,
            time_budget_hours=time_budget_hours,
            n_folds=n_folds,
            check_speed=check_speed,
            cpu_flops=cpu_flops,
            cross_validation=cross_validation,
        )
        return apply_overrides(plan_like(own, like), overrides)
    if preset not in PRESETS:
        raise PlanningError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset != "default":
        from autoseg.planning.nnunet import plan_nnunet

        plans = plan_nnunet(fingerprint, preset, gpu_memory_gb=gpu_memory_gb)
        preset_why = (
            "augmentation in the CPU data loader, as nnU-Net does (--set augmentation.device=gpu moves it to the GPU)"
        )
        plans = _place_augmentation(
            dataclasses.replace(plans, autoseg_version=_version()), rules.Decision("cpu", preset_why)
        )
        if cross_validation is not None:
            plans = dataclasses.replace(plans, cross_validation=cross_validation)
        return apply_overrides(plans, overrides)
    fp = fingerprint
    dev = describe_device(device, gpu_memory_gb)
    n_outputs = label_layout.n_outputs(fp.labels, fp.regions, fp.ignore_label)
    if cpu_flops is not None and dev.kind == "cpu":
        rate, rate_why = cpu_flops, f"CPU throughput given: {cpu_flops / 1e9:g} GFLOP/s"
    else:
        rate, rate_why = _throughput(dev, len(fp.channels), n_outputs)
    budget = default.Budget(dev, rate, n_outputs, len(fp.channels))
    spacing = rules.target_spacing(fp.spacings, fp.shapes_after_crop)
    transpose = rules.transpose_for_spacing(spacing.value)
    (forward, backward), transpose_why = transpose.value, transpose.why
    target = np.asarray(spacing.value)[list(forward)]
    median = rules.median_resampled_shape(fp.spacings, fp.shapes_after_crop, spacing.value)[list(forward)]
    norm = rules.channel_normalization(fp.channels, fp.median_relative_size_after_cropping)
    base = _base_configuration(fp, norm, default.default_training(budget))
    why = [
        f"planned by autoseg's default planner for {dev.kind} ({dev.name}, {dev.memory_bytes / 2**30:.1f} GB)",
        rate_why,
    ]
    for attempt in range(3):
        configs = _plan_configurations(fp, target, median, budget, base, spacing.why, transpose_why)
        if not (budget.is_cpu and check_speed):
            measured = {}
            break
        # the cascade stage runs 3d_fullres's network (a few more input channels): timed once
        measured = {n: default.check_cpu_speed(c, budget) for n, c in configs.items() if not c.previous_stage}
        measured |= {n: measured[c.inherits_from] for n, c in configs.items() if c.previous_stage and c.inherits_from}
        ratios = [measured[n][0] / budget.seconds(c.network, c.patch_size, c.batch_size) for n, c in configs.items()]
        ratio = float(np.median(ratios))
        if 0.85 <= ratio <= 1.15 or attempt == 2:
            break
        budget = dataclasses.replace(budget, flops_per_second=budget.flops_per_second / ratio)
        why.append(
            f"measured steps took {ratio:.2f}x the estimate: throughput re-calibrated to "
            f"{budget.flops_per_second / 1e9:.1f} GFLOP/s and the configurations re-planned"
        )
    configs = {n: c.with_reason(measured[n][1]) if n in measured else c for n, c in configs.items()}
    seconds = {
        n: measured[n][0] if n in measured else budget.seconds(c.network, c.patch_size, c.batch_size)
        for n, c in configs.items()
    }
    configs, cross_validation = _fit_time(configs, seconds, budget, time_budget_hours, n_folds, why, cross_validation)
    plans = Plans.for_dataset(
        fp,
        forward=forward,
        backward=backward,
        configurations=configs,
        planner="autoseg-default",
        device=dataclasses.replace(dev, flops_per_second=budget.flops_per_second),
        time_budget_hours=time_budget_hours,
        cross_validation=cross_validation,
        why=tuple(why),
        autoseg_version=_version(),
    )
    return apply_overrides(_place_augmentation(plans, rules.augmentation_device(plans.device.kind)), overrides)


def _place_augmentation(plans: Plans, where: rules.Decision[str]) -> Plans:
    """Every configuration augments ``where.value``, with the reason."""
    configs = {
        n: dataclasses.replace(c, augmentation=dataclasses.replace(c.augmentation, device=where.value)).with_reason(
            where.why
        )
        for n, c in plans.configurations.items()
    }
    return dataclasses.replace(plans, configurations=configs)


def _fit_time(
    configs: dict[str, Configuration],
    seconds: dict[str, float],
    budget: default.Budget,
    hours: float | None,
    n_folds: int,
    why: list[str],
    policy: bool | None = None,
) -> tuple[dict[str, Configuration], bool]:
    """Set every configuration's epochs so that all (configuration, fold) jobs fit the time budget.

    A ``--time-budget`` too small for every job to train ``MIN_JOB_ITERATIONS`` is spent on fewer jobs: first on
    the primary configuration alone (:func:`primary_configuration`), then on one model trained on all cases instead
    of a cross-validation (returned False: there is nothing to select from, and the model gets n_folds times the
    training). Without a budget a CPU plan gives every job ``CPU_HOURS_PER_JOB`` and keeps the cross-validation.
    ``policy`` True or False forces cross-validation or one model on the primary configuration.
    Returns the configurations and whether the plan cross-validates.
    """
    if policy is False:
        keep = primary_configuration(configs)
        why.append(f"one model trained on all cases (asked for): {keep} only, no cross-validation, no selection")
        configs, n_folds = {keep: configs[keep]}, 1
    n_jobs = len(configs) * n_folds
    cross_validation = policy is not False
    fewer_jobs = hours is not None  # without a budget: the standard workflow, every configuration x fold
    if hours is None and budget.is_cpu:
        hours = CPU_HOURS_PER_JOB * n_jobs
        why.append(f"no --time-budget: {CPU_HOURS_PER_JOB:g} h per training job on a CPU ({hours:g} h in all)")
    if hours is None:
        return configs, cross_validation

    def iterations(names: Sequence[str], jobs: int) -> int:
        return min(
            _epochs(configs[n], seconds[n], hours, jobs, cross_validation)[0] * configs[n].training.iterations_per_epoch
            for n in names
        )

    if fewer_jobs and len(configs) > 1 and iterations(list(configs), n_jobs) < MIN_JOB_ITERATIONS:
        keep = primary_configuration(configs)
        why.append(
            f"time budget {hours:g} h: {len(configs)} configurations x {n_folds} folds would train fewer than "
            f"{MIN_JOB_ITERATIONS} iterations each; only {keep} is planned (a larger --time-budget plans all)"
        )
        configs, n_jobs = {keep: configs[keep]}, n_folds
    if fewer_jobs and policy is None and n_folds > 1 and iterations(list(configs), n_jobs) < MIN_JOB_ITERATIONS:
        why.append(
            f"time budget {hours:g} h: {n_folds} cross-validation folds would train fewer than {MIN_JOB_ITERATIONS} "
            "iterations each; one model is trained on all cases instead (no cross-validation, no selection; "
            "a larger --time-budget cross-validates)"
        )
        keep = primary_configuration(configs)
        configs, cross_validation, n_jobs = {keep: configs[keep]}, False, 1
    out = {}
    for name, c in configs.items():
        epochs, reason = _epochs(c, seconds[name], hours, n_jobs, cross_validation)
        training = dataclasses.replace(c.training, epochs=epochs)
        if fewer_jobs:  # the user's own deadline: each job keeps to its share even where steps run slower
            reserve = default.RESERVE_CROSS_VALIDATION if cross_validation else default.RESERVE_ONE_MODEL
            limit = round((1 - reserve) * hours / n_jobs, 4)
            training = dataclasses.replace(training, time_limit_hours=limit)
            reason += (
                f"; each job trains at most {limit:g} h: the trainer trains fewer epochs (learning rate still "
                "decayed to its end) when its measured epochs run slower than planned"
            )
        out[name] = dataclasses.replace(c, training=training).with_reason(reason)
    return out, cross_validation


def _epochs(c: Configuration, seconds: float, hours: float, n_jobs: int, cross_validation: bool) -> tuple[int, str]:
    t = c.training
    return default.epochs_for_budget(
        seconds,
        hours,
        n_jobs,
        iterations=t.iterations_per_epoch,
        val_iterations=t.val_iterations,
        reserve=default.RESERVE_CROSS_VALIDATION if cross_validation else default.RESERVE_ONE_MODEL,
    )


def plan_like(plans: Plans, source: Plans) -> Plans:
    """``plans`` with the topology of ``source`` (nnU-Net's "plan like"): every configuration both have takes the
    source's spacing, patch, batch and network, and the plan its axis order, so the source's weights fit; channels,
    labels, normalisation, loss and schedule stay this dataset's. Configurations the source lacks are dropped."""
    configs = {}
    for name, c in plans.configurations.items():
        theirs = source.configurations.get(name)
        if theirs is None:
            continue
        configs[name] = dataclasses.replace(
            c,
            spacing=theirs.spacing,
            patch_size=theirs.patch_size,
            batch_size=theirs.batch_size,
            network=theirs.network,
            median_image_size=c.median_image_size,
        ).with_reason(f"planned like {source.dataset_name}: its spacing, patch, batch and network, so its weights fit")
    if not configs:
        raise PlanningError(
            f"plan like {source.dataset_name}: no configuration in common ({list(source.configurations)} vs "
            f"{list(plans.configurations)})"
        )
    return dataclasses.replace(
        plans,
        configurations=configs,
        transpose_forward=source.transpose_forward,
        transpose_backward=source.transpose_backward,
        why=(*plans.why, f"planned like {source.dataset_name} ({source.planner})"),
    )


def primary_configuration(configs: dict[str, Configuration]) -> str:
    """The configuration a small budget goes to: 3D at full resolution when planned (nnU-Net's most frequent
    winner), else 2D, else the first."""
    return next((n for n in ("3d_fullres", "2d") if n in configs), next(iter(configs)))


def plan_run(run_dir: Path | str, **kwargs) -> Plans:
    """Plan from ``RUN/fingerprint.json`` and write ``RUN/plans.json``; keyword arguments as :func:`make_plans`."""
    run_dir = Path(run_dir)
    plans = make_plans(load_fingerprint(run_dir), **kwargs)
    plans.save(RunFolder(run_dir).plans)
    for name, c in plans.configurations.items():
        log.info(
            "%s: spacing %s, patch %s, batch %d, %d stages, features %s, %d epochs",
            name,
            [round(s, 3) for s in c.spacing],
            list(c.patch_size),
            c.batch_size,
            c.network.n_stages,
            list(c.network.features_per_stage),
            c.training.epochs,
        )
    return plans
