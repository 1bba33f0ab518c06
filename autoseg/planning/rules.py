"""Planning rules shared by every preset: pure functions that return a value and the reason for it.

Each rule takes its constants as keyword arguments whose defaults are nnU-Net v2's published values, so that the
``nnunet`` presets and autoseg's own planner use the same code with different numbers. Spatial inputs are (z, y, x)
unless a docstring says "preprocessed order" (after :func:`transpose_for_spacing`). Every rule returns a
:class:`Decision`: ``value`` plus ``why``, one plain-English sentence that goes into the plan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import numpy as np

from autoseg.errors import PlanningError
from autoseg.fingerprint import ChannelFingerprint
from autoseg.planning.plans import AugmentationSpec, ChannelNormalization, Configuration

__all__ = [
    "Decision",
    "Vector",
    "target_spacing",
    "transpose_for_spacing",
    "resampled_shapes",
    "median_resampled_shape",
    "channel_normalization",
    "initial_patch_size",
    "dataset_fraction_batch_cap",
    "needs_lowres",
    "increase_lowres_spacing",
    "lowres_is_worthwhile",
    "LowRes",
    "plan_lowres",
    "cascade_stage",
    "spacing_2d",
    "augmentation_for_patch",
    "augmentation_device",
    "fmt",
]

T = TypeVar("T")
#: A spatial list: a sequence or a 1D array of numbers.
Vector = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Decision(Generic[T]):
    """A planning decision and the reason for it."""

    value: T
    why: str


def fmt(values: Vector, digits: int = 4) -> str:
    """Format a spatial list for a reason string: ``(5, 0.7988, 0.7988)``."""
    return "(" + ", ".join(f"{float(v):.{digits}g}" for v in values) + ")"


def target_spacing(
    spacings: np.ndarray,
    shapes_after_crop: np.ndarray,
    *,
    anisotropy_threshold: float = 3.0,
    thick_axis_percentile: float = 10.0,
    margin_mm: float = 1e-5,
) -> Decision[tuple[float, ...]]:
    """Full-resolution target spacing: the median spacing, except for the thick axis of thick-slice data.

    Parameters
    ----------
    spacings, shapes_after_crop : (n_cases, 3) arrays
        Per-case spacing (mm) and shape after cropping to the non-zero region, (z, y, x).
    anisotropy_threshold : float
        The coarsest axis is "thick" when its median spacing is more than this many times the next coarsest one
        *and* it has fewer than 1/this as many voxels as the smallest other axis (nnU-Net: 3).
    thick_axis_percentile : float
        Percentile of the thick axis's spacings used instead of its median (nnU-Net: 10).
    margin_mm : float
        When that percentile is finer than the other axes, the thick axis gets their coarsest spacing plus this.

    Returns
    -------
    Decision
        Target spacing (z, y, x) in mm.
    """
    spacings = np.asarray(spacings, dtype=float)
    target = np.percentile(spacings, 50, axis=0)
    sizes = np.percentile(np.asarray(shapes_after_crop, dtype=float), 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    other_spacing = max(target[i] for i in others)
    aniso_spacing = target[worst] > anisotropy_threshold * other_spacing
    aniso_voxels = sizes[worst] * anisotropy_threshold < min(sizes[i] for i in others)
    why = f"median spacing {fmt(target)} mm"
    if aniso_spacing and aniso_voxels:
        thick = np.percentile(spacings[:, worst], thick_axis_percentile)
        if thick < other_spacing:
            thick = max(other_spacing, thick) + margin_mm
        why = (
            f"median spacing {fmt(target)} mm, but axis {worst} has thick slices (its spacing is more than "
            f"{anisotropy_threshold:g}x the others' and it has fewer than 1/{anisotropy_threshold:g} of their "
            f"voxels), so it uses the {thick_axis_percentile:g}th percentile {float(thick):.4g} mm instead of "
            "the median to limit interpolation across slices"
        )
        target[worst] = thick
    elif aniso_spacing:
        why += f"; axis {worst} is coarse but not short in voxels (median size {fmt(sizes)}), so the median is kept"
    return Decision(tuple(float(v) for v in target), why)


def transpose_for_spacing(spacing: Vector) -> Decision[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Axis order for preprocessing: the coarsest axis first, the others in their order (first maximum wins).

    Returns ``(transpose_forward, transpose_backward)``; ``backward`` undoes ``forward``.
    """
    worst = int(np.argmax(np.asarray(spacing)))
    forward = (worst, *[i for i in range(len(spacing)) if i != worst])
    backward = tuple(int(forward.index(i)) for i in range(len(spacing)))
    if forward == tuple(range(len(spacing))):
        why = "axis 0 already has the coarsest spacing: no transpose"
    else:
        why = f"axis {worst} has the coarsest spacing and is moved first (transpose {forward})"
    return Decision((forward, backward), why)


def resampled_shapes(spacings: np.ndarray, shapes: np.ndarray, target: Vector) -> np.ndarray:
    """Per-case shape after resampling to ``target``: ``round(spacing / target * shape)`` per axis (half to even)."""
    new = np.asarray(target, dtype=float)
    return np.array(
        [[int(round(s / t * n)) for s, t, n in zip(sp, new, sh)] for sp, sh in zip(spacings, shapes)], dtype=float
    )


def median_resampled_shape(spacings: np.ndarray, shapes: np.ndarray, target: Vector) -> np.ndarray:
    """Median over cases of :func:`resampled_shapes` (may be non-integer for an even number of cases)."""
    return np.median(resampled_shapes(spacings, shapes, target), axis=0)


def channel_normalization(
    channels: Sequence[ChannelFingerprint],
    median_relative_size_after_cropping: float,
    *,
    mask_threshold: float = 0.75,
) -> Decision[tuple[ChannelNormalization, ...]]:
    """Normalisation per channel from the channel's hint (its name) and the dataset's foreground statistics.

    ``ct``: clip to the dataset's foreground 0.5 / 99.5 percentiles, then subtract its foreground mean and divide by
    its standard deviation. ``rgb``: divided by 255. ``zscore``: per image; inside the non-zero mask only when
    cropping to the non-zero region shrank the median image to less than ``mask_threshold`` of its size (nnU-Net:
    3/4), because then the zeros around the object are padding, not signal. ``rescale``, ``rgb`` and ``none`` never
    use the mask.
    """
    use_mask = median_relative_size_after_cropping < mask_threshold
    out, notes = [], []
    for c in channels:
        scheme = c.normalization_hint
        if scheme == "ct":
            stats = c.foreground_intensity
            if stats is None:
                raise PlanningError(
                    f"fingerprint: channel {c.name!r} is CT but has no foreground intensity "
                    "statistics; re-run `autoseg fingerprint` on a dataset with labelled foreground"
                )
            out.append(
                ChannelNormalization("ct", False, (stats.percentile_00_5, stats.percentile_99_5), stats.mean, stats.std)
            )
            notes.append(
                f"{c.name}: ct (clip {stats.percentile_00_5:.4g}..{stats.percentile_99_5:.4g}, "
                f"mean {stats.mean:.4g}, std {stats.std:.4g})"
            )
        elif scheme == "zscore":
            out.append(ChannelNormalization("zscore", use_mask))
            notes.append(f"{c.name}: zscore" + (" inside the non-zero mask" if use_mask else ""))
        elif scheme in ("rescale", "rgb", "none"):
            out.append(ChannelNormalization(scheme, False))
            notes.append(f"{c.name}: {scheme}")
        else:
            raise PlanningError(
                f"fingerprint: channel {c.name!r} has normalization hint {scheme!r}; "
                "expected one of ct, zscore, rescale, rgb, none"
            )
    crop = (
        f"cropping to the non-zero region kept {median_relative_size_after_cropping:.0%} of the median image "
        f"({'<' if use_mask else '>='} {mask_threshold:.0%})"
    )
    return Decision(tuple(out), "normalisation: " + "; ".join(notes) + f"; {crop}")


def initial_patch_size(
    spacing: Vector,
    median_shape: Vector,
    *,
    volume_3d: float = 256**3,
    area_2d: float = 2048**2,
) -> Decision[np.ndarray]:
    """Starting patch: isotropic in mm, as large as ``volume_3d`` (``area_2d``) voxels, clipped to the median shape.

    The planner then shrinks it until the network fits the memory budget. Entries may be non-integer when the median
    shape is.
    """
    tmp = 1 / np.asarray(spacing, dtype=float)
    if len(spacing) == 3:
        start = [round(i) for i in tmp * (volume_3d / np.prod(tmp)) ** (1 / 3)]
    elif len(spacing) == 2:
        start = [round(i) for i in tmp * (area_2d / np.prod(tmp)) ** (1 / 2)]
    else:
        raise PlanningError(f"spacing {tuple(spacing)}: only 2D and 3D configurations can be planned")
    clipped = np.array([min(i, j) for i, j in zip(start, median_shape)])
    why = (
        f"initial patch {fmt(start)} (same extent in mm on every axis), clipped to the median image "
        f"{fmt(median_shape)}: {fmt(clipped)}"
    )
    return Decision(clipped, why)


def dataset_fraction_batch_cap(
    n_voxels_dataset: float, patch_size: Sequence[int], *, max_fraction: float = 0.05
) -> Decision[int]:
    """Largest batch that shows at most ``max_fraction`` of all voxels in one step (an overfitting guard)."""
    cap = int(round(n_voxels_dataset * max_fraction / np.prod(patch_size, dtype=np.float64)))
    return Decision(cap, f"a batch may hold at most {max_fraction:g} of the dataset's voxels: at most {cap} patches")


def needs_lowres(patch_size: Sequence[int], median_n_voxels: float, *, threshold: float = 0.25) -> Decision[bool]:
    """A low-resolution stage is needed while the patch covers less than ``threshold`` of the median image.

    ``median_n_voxels`` is the number of voxels of the median image at the spacing the patch was planned for.
    """
    covered = float(np.prod(patch_size, dtype=np.float64) / median_n_voxels)
    need = covered < threshold
    why = f"the patch covers {covered:.3g} of the median image ({'<' if need else '>='} {threshold:g}): " + (
        "a low-resolution stage is needed" if need else "no (further) low-resolution stage is needed"
    )
    return Decision(need, why)


def increase_lowres_spacing(spacing: np.ndarray, *, factor: float = 1.03, anisotropy_ratio: float = 2.0) -> np.ndarray:
    """One step of the low-resolution spacing search: coarsen the fine axes first, then all axes.

    Axes more than ``anisotropy_ratio`` times finer than the coarsest are multiplied by ``factor``; once none is,
    every axis is. Returns a new array.
    """
    spacing = np.array(spacing, dtype=float)
    coarsest = max(spacing)
    fine = (coarsest / spacing) > anisotropy_ratio
    if np.any(fine):
        spacing[fine] *= factor
    else:
        spacing *= factor
    return spacing


def lowres_is_worthwhile(
    fullres_median_shape: Vector, lowres_median_voxels: float, *, min_ratio: float = 2.0
) -> Decision[bool]:
    """Keep a low-resolution stage only when its images have at least ``min_ratio`` times fewer voxels."""
    ratio = float(np.prod(fullres_median_shape, dtype=np.float64) / lowres_median_voxels)
    keep = ratio >= min_ratio
    why = f"low-resolution images are {ratio:.3g}x smaller than full resolution " + (
        "(enough to be worth a cascade)" if keep else f"(< {min_ratio:g}x: the low-resolution stage is dropped)"
    )
    return Decision(keep, why)


@dataclass(frozen=True)
class LowRes(Generic[T]):
    """A low-resolution stage: what the caller planned at ``spacing``, the median image there (not rounded)."""

    planned: T
    spacing: np.ndarray
    median_shape: np.ndarray
    need: Decision[bool]
    worth: Decision[bool]


def plan_lowres(
    spacing: np.ndarray,
    median_shape: np.ndarray,
    fullres_patch: Sequence[int],
    plan: Callable[[np.ndarray, np.ndarray], T],
    patch_of: Callable[[T], Sequence[int]],
    *,
    threshold: float = 0.25,
    factor: float = 1.03,
) -> LowRes[T] | None:
    """nnU-Net's low-resolution stage, the one loop of every planner.

    While the full-resolution patch covers less than ``threshold`` of the median image, coarsen the spacing in
    ``factor`` steps (:func:`increase_lowres_spacing`) and ``plan(spacing, median_shape)`` a configuration there until
    its patch (``patch_of``) covers ``threshold``. None when no stage is needed or its images would not be at least
    twice smaller (:func:`lowres_is_worthwhile`).
    """
    full_voxels = float(np.prod(median_shape, dtype=np.float64))
    need = needs_lowres(fullres_patch, full_voxels, threshold=threshold)
    if not need.value:
        return None
    low = np.asarray(spacing, dtype=float)
    while True:
        low = increase_lowres_spacing(low, factor=factor)
        scaled = np.asarray(spacing, dtype=float) / low * np.asarray(median_shape, dtype=float)
        planned = plan(low, scaled)
        if not needs_lowres(patch_of(planned), float(np.prod(scaled, dtype=np.float64)), threshold=threshold).value:
            break
    worth = lowres_is_worthwhile(median_shape, float(np.prod(scaled, dtype=np.float64)))
    return LowRes(planned, low, scaled, need, worth) if worth.value else None


def spacing_2d(spacing_preprocessed: Vector) -> Decision[tuple[float, ...]]:
    """2D configuration spacing: the in-plane axes (all but the first, coarsest, axis in preprocessed order)."""
    value = tuple(float(s) for s in spacing_preprocessed[1:])
    return Decision(value, f"2D slices are cut across the coarsest axis; in-plane spacing {fmt(value)} mm")


def augmentation_for_patch(
    patch_size: Sequence[int], *, anisotropy_threshold: float = 3.0
) -> Decision[AugmentationSpec]:
    """nnU-Net trainer's rule for mirroring, rotation and "dummy 2D" augmentation from the patch shape.

    3D: mirror every axis; when the patch is more than ``anisotropy_threshold`` times longer in-plane than along the
    first axis, augment slice-wise in 2D with full in-plane rotation, else rotate up to 30 degrees. 2D: mirror both
    axes; rotate fully unless the patch is elongated (aspect ratio above 1.5: 15 degrees).
    """
    dim = len(patch_size)
    if dim == 3:
        dummy = max(patch_size) / patch_size[0] > anisotropy_threshold
        rotation = 180.0 if dummy else 30.0
        why = (
            (
                "patch is flat (" + "x".join(map(str, patch_size)) + "): spatial augmentation per slice (dummy 2D), "
                "full in-plane rotation"
            )
            if dummy
            else "3D spatial augmentation, rotation up to 30 degrees"
        )
    elif dim == 2:
        dummy = False
        rotation = 15.0 if max(patch_size) / min(patch_size) > 1.5 else 180.0
        why = f"2D augmentation, rotation up to {rotation:g} degrees"
    else:
        raise PlanningError(f"patch size {tuple(patch_size)}: only 2D and 3D patches can be augmented")
    spec = AugmentationSpec(mirror_axes=tuple(range(dim)), dummy_2d=bool(dummy), rotation_deg=rotation)
    return Decision(spec, why + "; mirroring on every axis")


def augmentation_device(device_kind: str) -> Decision[str]:
    """Where to augment: on the GPU for a CUDA plan (whole batches on the device), else in the CPU data loader.

    A GPU trains faster than a few CPU cores can augment 3D patches (nnU-Net issue #3063: 40% busy on an A100 with
    8 cores, 86% with augmentation on the GPU); on a CPU the loader's worker processes run beside the training.
    """
    if device_kind == "cuda":
        return Decision(
            "gpu",
            "augmentation on the GPU (whole batches, per-sample parameters): CPU loader workers only crop, so a "
            "fast GPU is not left waiting for them",
        )
    return Decision("cpu", "augmentation in the CPU data loader's worker processes, beside the training")


def cascade_stage(fullres: Configuration, why: str) -> Configuration:
    """The cascade's second stage, ``3d_cascade_fullres``: ``fullres`` (same data, network, patch and schedule)
    taking the low-resolution stage's prediction, one-hot, as extra input channels; ``why`` says so in the plan."""
    return replace(
        fullres,
        name="3d_cascade_fullres",
        previous_stage="3d_lowres",
        inherits_from="3d_fullres",
        data_identifier=fullres.data_identifier or fullres.name,
    ).with_reason(why)
