"""nnU-Net v2 compatible presets: the decisions nnU-Net's planners make, reproduced from a fingerprint.

``plan_nnunet(fingerprint, "nnunet")`` follows the default ``ExperimentPlanner`` (plain U-Net, 8 GB target);
``"nnunet-resenc-m"`` and ``"nnunet-resenc-l"`` follow the residual-encoder presets (8 GB and 24 GB). The shared rules
live in :mod:`autoseg.planning.rules` and :mod:`autoseg.planning.topology`; this module adds nnU-Net's memory proxy
(the summed size of all convolution outputs for one sample, compared with a calibrated reference value) and its
loop that shrinks the patch until the proxy fits, then turns spare memory into batch size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from autoseg.errors import PlanningError
from autoseg.fingerprint import Fingerprint
from autoseg.fingerprint_import import NnunetConfigurationDecisions
from autoseg.planning import rules
from autoseg.planning.plans import (
    Configuration,
    DeviceSpec,
    LossSpec,
    NetworkSpec,
    Plans,
    ResamplingSpec,
    TrainingSpec,
)
from autoseg.planning.topology import (
    Topology,
    conv_feature_map_voxels,
    pool_and_conv_props,
    shrink_patch,
    unet_for_topology,
)

__all__ = [
    "NnunetPreset",
    "PRESETS",
    "PLANNER_PRESETS",
    "plan_nnunet",
    "network_for_topology",
    "nnunet_view",
    "compare_with_nnunet",
]

log = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class NnunetPreset:
    """Constants of one nnU-Net planner. ``reference_*`` is the memory proxy that fills ``reference_gb`` of GPU
    memory at batch size ``reference_batch_*``; ``shrink_per_sample`` selects the default planner's test (proxy per
    sample of a batch of two) over the residual planners' test (proxy of one sample)."""

    name: str
    plans_name: str
    planner_class: str
    block: str
    gpu_memory_gb: float
    reference_gb: float
    reference_3d: float
    reference_2d: float
    blocks_encoder: tuple[int, ...]
    blocks_decoder: tuple[int, ...]
    max_dataset_fraction: float
    shrink_per_sample: bool
    reference_batch_2d: int = 12
    reference_batch_3d: int = 2
    base_features: int = 32
    max_features_2d: int = 512
    max_features_3d: int = 320
    min_batch_size: int = 2
    min_feature_map_size: int = 4
    lowres_threshold: float = 0.25
    lowres_spacing_factor: float = 1.03


_NNUNET = NnunetPreset(
    name="nnunet",
    plans_name="nnUNetPlans",
    planner_class="ExperimentPlanner",
    block="plain",
    gpu_memory_gb=8,
    reference_gb=8,
    reference_3d=560e6,
    reference_2d=85e6,
    blocks_encoder=(2,) * 14,
    blocks_decoder=(2,) * 13,
    max_dataset_fraction=0.05,
    shrink_per_sample=True,
)
_RESENC_M = replace(
    _NNUNET,
    name="nnunet-resenc-m",
    plans_name="nnUNetResEncUNetMPlans",
    planner_class="nnUNetPlannerResEncM",
    block="residual",
    reference_3d=680e6,
    reference_2d=135e6,
    blocks_encoder=(1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6),
    blocks_decoder=(1,) * 12,
    max_dataset_fraction=1.0,
    shrink_per_sample=False,
)
_RESENC_L = replace(
    _RESENC_M,
    name="nnunet-resenc-l",
    plans_name="nnUNetResEncUNetLPlans",
    planner_class="nnUNetPlannerResEncL",
    gpu_memory_gb=24,
    reference_gb=24,
    reference_3d=2100e6,
    reference_2d=380e6,
)
PRESETS: dict[str, NnunetPreset] = {p.name: p for p in (_NNUNET, _RESENC_M, _RESENC_L)}

#: nnUNetTrainer's schedule: SGD (Nesterov, momentum 0.99, weight decay 3e-5) from lr 0.01 with poly decay (0.9) over
#: 1000 epochs of 250 iterations, 50 validation iterations, gradient norm clipped at 12.
NNUNET_TRAINING = TrainingSpec(
    epochs=1000,
    iterations_per_epoch=250,
    val_iterations=50,
    optimizer="sgd",
    learning_rate=0.01,
    momentum=0.99,
    nesterov=True,
    weight_decay=3e-5,
    lr_schedule="poly",
    poly_exponent=0.9,
    grad_clip=12.0,
)
#: nnU-Net's default resampling: cubic images, linear one-hot labels, nearest along a separate thick axis (ratio 3).
NNUNET_RESAMPLING = ResamplingSpec(order_image=3, order_label=1, order_z=0, anisotropy_threshold=3.0)
#: nnUNetTrainer's share of patches forced to contain foreground.
NNUNET_FOREGROUND_OVERSAMPLING = 0.33

#: nnU-Net planner class (``experiment_planner_used`` in a plans file) -> preset name.
PLANNER_PRESETS = {p.planner_class: name for name, p in PRESETS.items()}


def network_for_topology(topology: Topology, preset: NnunetPreset) -> NetworkSpec:
    """The preset's U-Net for a topology: features double per stage from 32 up to 320 (3D) or 512 (2D)."""
    cap = preset.max_features_3d if len(topology.patch_size) == 3 else preset.max_features_2d
    if topology.n_stages > len(preset.blocks_encoder):
        raise PlanningError(
            f"{topology.n_stages} stages needed but preset {preset.name} defines at most "
            f"{len(preset.blocks_encoder)}; reduce the patch size"
        )
    return unet_for_topology(
        topology,
        preset.base_features,
        max_features=cap,
        block=preset.block,
        encoder=preset.blocks_encoder,
        decoder=preset.blocks_decoder,
    )


@dataclass(frozen=True)
class _Job:
    """What every configuration of one plan shares."""

    fingerprint: Fingerprint
    preset: NnunetPreset
    gpu_memory_gb: float
    n_outputs: int  # entries of nnU-Net's dataset.json "labels": the output count its planner feeds the proxy

    def reference(self, dim: int) -> tuple[float, int]:
        """Proxy value that fills the GPU memory target, and the batch size it was calibrated at."""
        p = self.preset
        value = (p.reference_3d if dim == 3 else p.reference_2d) * (self.gpu_memory_gb / p.reference_gb)
        return value, p.reference_batch_3d if dim == 3 else p.reference_batch_2d


@dataclass(frozen=True)
class _Planned:
    topology: Topology
    network: NetworkSpec
    estimate: int
    batch_size: int
    why: tuple[str, ...]


def _label_keys(fp: Fingerprint) -> int:
    if fp.regions:
        return len(fp.regions) + int(0 in fp.labels.values()) + int(fp.ignore_label is not None)
    return len(fp.labels)


def _fit(spacing: rules.Vector, patch: rules.Vector, job: _Job) -> tuple[Topology, NetworkSpec, int]:
    topo = pool_and_conv_props(spacing, patch, min_feature_map_size=job.preset.min_feature_map_size)
    net = network_for_topology(topo, job.preset)
    return topo, net, conv_feature_map_voxels(net, topo.patch_size, job.n_outputs)


def _plan_patch_and_batch(spacing: rules.Vector, median_shape: rules.Vector, n_voxels: float, job: _Job) -> _Planned:
    """nnU-Net's patch and batch: start large, shrink the patch until the proxy fits, spend the rest on batch."""
    p, start = job.preset, rules.initial_patch_size(spacing, median_shape)
    reference, ref_bs = job.reference(len(spacing))

    def fits(topo: Topology) -> bool:
        estimate = _fit(spacing, topo.patch_size, job)[2]
        return (estimate / ref_bs * 2 if p.shrink_per_sample else estimate) <= reference

    first_patch = _fit(spacing, start.value, job)[0].patch_size
    shrunk = shrink_patch(
        start.value,
        median_shape,
        lambda patch: pool_and_conv_props(spacing, patch, min_feature_map_size=p.min_feature_map_size),
        fits,
        step="next",
        ties="last",
        min_edge=1,
    )
    if shrunk is None:
        raise PlanningError(f"no patch fits {job.gpu_memory_gb:g} GB with preset {p.name}; raise the GPU memory")
    topo, net, estimate = _fit(spacing, shrunk[0].patch_size, job)
    steps = shrunk[1]
    by_memory = round((reference / estimate) * ref_bs)
    cap = rules.dataset_fraction_batch_cap(n_voxels, topo.patch_size, max_fraction=p.max_dataset_fraction)
    batch = int(max(min(by_memory, cap.value), p.min_batch_size))
    why = [
        start.why,
        f"topology: {topo.n_stages} stages, poolings per axis {topo.pools_per_axis}, patch padded to "
        f"a multiple of {topo.divisor}: {first_patch}",
    ]
    if steps:
        why.append(
            f"patch shrunk in {steps} steps (largest axis relative to the median image first) to "
            f"{topo.patch_size} so that the memory proxy fits the {job.gpu_memory_gb:g} GB target"
        )
    why.append(
        f"memory proxy {estimate:,} feature-map voxels per sample against the reference {reference:,.0f} "
        f"(batch {ref_bs}): memory allows batch {by_memory}; {cap.why}; minimum {p.min_batch_size}: "
        f"batch size {batch}"
    )
    return _Planned(topo, net, estimate, batch, tuple(why))


def _configuration(
    name: str,
    planned: _Planned,
    spacing: rules.Vector,
    median_shape: rules.Vector,
    job: _Job,
    batch_dice: bool,
    dice_why: str,
) -> Configuration:
    p, fp = job.preset, job.fingerprint
    norm = rules.channel_normalization(fp.channels, fp.median_relative_size_after_cropping)
    aug = rules.augmentation_for_patch(planned.topology.patch_size)
    ref_value = p.reference_3d if len(spacing) == 3 else p.reference_2d
    ref_bs = job.reference(len(spacing))[1]
    memory = planned.estimate / ref_value * p.reference_gb * GIB * planned.batch_size / ref_bs
    shared = name in ("2d", "3d_fullres") and p.block == "residual"  # ResEnc reuses nnUNetPlans' data
    why = (
        f"nnU-Net {p.planner_class} rules ({p.name}, {job.gpu_memory_gb:g} GB target)",
        *planned.why,
        norm.why,
        aug.why,
        dice_why,
        f"estimated memory {memory / GIB:.2f} GiB from nnU-Net's calibration of the proxy "
        f"({ref_value:.3g} voxels ~ {p.reference_gb:g} GB at batch {ref_bs})",
    )
    return Configuration(
        name=name,
        spacing=tuple(float(s) for s in spacing),
        batch_size=planned.batch_size,
        patch_size=tuple(int(v) for v in planned.topology.patch_size),
        median_image_size=tuple(float(m) for m in median_shape),
        normalization=norm.value,
        network=planned.network,
        augmentation=aug.value,
        loss=LossSpec(name="dice_ce", batch_dice=batch_dice),  # region datasets: the loss uses sigmoid + BCE
        resampling=NNUNET_RESAMPLING,
        training=NNUNET_TRAINING,
        foreground_oversampling=NNUNET_FOREGROUND_OVERSAMPLING,
        data_identifier=f"{'nnUNetPlans' if shared else p.plans_name}_{name}",
        estimated_memory_bytes=int(memory),
        why=why,
    )


def _lowres(fullres: _Planned, spacing: np.ndarray, median: np.ndarray, job: _Job) -> Configuration | None:
    """nnU-Net's low-resolution stage (:func:`rules.plan_lowres`), the median image rounded at each spacing."""
    p = job.preset

    def plan(low_spacing: np.ndarray, scaled: np.ndarray) -> _Planned:
        n_voxels = float(np.prod(scaled, dtype=np.float64)) * job.fingerprint.n_cases
        return _plan_patch_and_batch(low_spacing, tuple(float(round(v)) for v in scaled), n_voxels, job)

    low = rules.plan_lowres(
        spacing,
        median,
        fullres.topology.patch_size,
        plan,
        lambda planned: planned.topology.patch_size,
        threshold=p.lowres_threshold,
        factor=p.lowres_spacing_factor,
    )
    if low is None:
        return None
    low_median = tuple(float(round(v)) for v in low.median_shape)
    why = f"spacing coarsened to {rules.fmt(low.spacing)} mm; {low.worth.why}"
    return _configuration(
        "3d_lowres", low.planned, low.spacing, low_median, job, False, "per-sample Dice for the low-resolution stage"
    ).with_reason(why)


def plan_nnunet(fingerprint: Fingerprint, preset: str = "nnunet", *, gpu_memory_gb: float | None = None) -> Plans:
    """Plan like nnU-Net v2's planner named by ``preset`` ("nnunet", "nnunet-resenc-m", "nnunet-resenc-l").

    Parameters
    ----------
    fingerprint : Fingerprint
        Needs per-case spacings and shapes after cropping, channel names (and foreground statistics for CT), the
        median relative size after cropping, labels and the number of cases.
    preset : str
        The nnU-Net planner to reproduce.
    gpu_memory_gb : float, optional
        GPU memory target; default the preset's own (8, 8, 24 GB).

    Returns
    -------
    Plans
        Configurations ``2d``, ``3d_fullres`` and, where nnU-Net makes them, ``3d_lowres`` and
        ``3d_cascade_fullres``. ``original_median_spacing`` / ``original_median_shape`` are in the preprocessed
        (transposed) axis order, as in nnU-Net's plans.
    """
    if preset not in PRESETS:
        raise PlanningError(f"unknown preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
    if not fingerprint.cases:
        raise PlanningError(f"fingerprint of {fingerprint.dataset_name}: no cases; re-run `autoseg fingerprint`")
    p = PRESETS[preset]
    job = _Job(
        fingerprint, p, float(p.gpu_memory_gb if gpu_memory_gb is None else gpu_memory_gb), _label_keys(fingerprint)
    )
    spacings, shapes = fingerprint.spacings, fingerprint.shapes_after_crop
    target = rules.target_spacing(spacings, shapes)
    transpose = rules.transpose_for_spacing(target.value)
    forward, backward = (list(t) for t in transpose.value)
    spacing_t = np.array(target.value)[forward]
    median_t = rules.median_resampled_shape(spacings, shapes, target.value)[forward]
    n_voxels = float(np.prod(median_t, dtype=np.float64) * fingerprint.n_cases)
    flat = rules.spacing_2d(spacing_t)
    configs = {
        "2d": _configuration(
            "2d",
            _plan_patch_and_batch(flat.value, median_t[1:], n_voxels, job),
            flat.value,
            median_t[1:],
            job,
            True,
            "batch Dice (over the whole batch) for 2D",
        ).with_reason(flat.why)
    }
    if median_t[0] != 1:  # a 3D dataset
        fullres = _plan_patch_and_batch(spacing_t, median_t, n_voxels, job)
        lowres = _lowres(fullres, spacing_t, median_t, job)
        if lowres is not None:
            configs["3d_lowres"] = lowres
        dice_why = "batch Dice at full resolution when a cascade exists" if lowres else "per-sample Dice (no cascade)"
        need = rules.needs_lowres(fullres.topology.patch_size, float(np.prod(median_t, dtype=np.float64)))
        full = _configuration("3d_fullres", fullres, spacing_t, median_t, job, lowres is not None, dice_why)
        configs["3d_fullres"] = full.with_reason(target.why, need.why)
        if lowres is not None:
            configs["3d_cascade_fullres"] = rules.cascade_stage(
                configs["3d_fullres"],
                "second cascade stage: full resolution, with the low-resolution prediction as extra input",
            )
    return Plans.for_dataset(
        fingerprint,
        forward=forward,
        backward=backward,
        configurations=configs,
        planner=p.name,
        device=DeviceSpec(
            kind="cuda",
            memory_bytes=int(job.gpu_memory_gb * GIB),
            name=f"nnU-Net {p.name} target ({job.gpu_memory_gb:g} GB)",
        ),
        why=(target.why, transpose.why, f"reproduces nnU-Net v2's {p.planner_class} ({p.plans_name})"),
    )


_SCHEMES = {
    "CTNormalization": "ct",
    "ZScoreNormalization": "zscore",
    "NoNormalization": "none",
    "RescaleTo01Normalization": "rescale",
    "RGBTo01Normalization": "rgb",
}
_NETWORKS = {"plain": "PlainConvUNet", "residual": "ResidualEncoderUNet"}


def nnunet_view(config: Configuration) -> dict[str, Any]:
    """A configuration's decisions in the terms of :class:`NnunetConfigurationDecisions` (nnU-Net's names)."""
    schemes = {v: k for k, v in reversed(list(_SCHEMES.items()))}
    net = config.network
    return {
        "spacing": tuple(config.spacing),
        "patch_size": tuple(config.patch_size),
        "batch_size": config.batch_size,
        "median_image_size": tuple(config.median_image_size),
        "normalization_schemes": tuple(schemes[n.scheme] for n in config.normalization),
        "use_mask_for_norm": tuple(n.use_mask for n in config.normalization),
        "batch_dice": config.loss.batch_dice,
        "network_class": _NETWORKS.get(net.block, net.block),
        "n_stages": net.n_stages,
        "strides": net.strides,
        "kernel_sizes": net.kernel_sizes,
        "features_per_stage": net.features_per_stage,
        "n_conv_per_stage": net.n_conv_per_stage,
        "n_conv_per_stage_decoder": net.n_conv_per_stage_decoder,
        "previous_stage": config.previous_stage,
        "inherits_from": config.inherits_from,
    }


def compare_with_nnunet(config: Configuration, theirs: NnunetConfigurationDecisions) -> dict[str, tuple[Any, Any]]:
    """Fields where ``config`` differs from nnU-Net's decision: name -> (ours, theirs).

    Only fields nnU-Net's file sets are compared (an inheriting configuration sets few). Normalisation schemes are
    compared by meaning (nnU-Net's class names mapped to ours).
    """
    ours = nnunet_view(config)
    out = {}
    for key, mine in ours.items():
        value = getattr(theirs, key)
        if value is None:
            continue
        if key == "normalization_schemes":
            same = tuple(_SCHEMES.get(v, "zscore") for v in value) == tuple(n.scheme for n in config.normalization)
        else:
            same = mine == value
        if not same:
            out[key] = (mine, value)
    return out
