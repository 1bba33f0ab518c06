"""Plan types: what to train, as frozen dataclasses that round-trip ``plans.json``.

Spatial lists inside a :class:`Configuration` are in the *preprocessed* axis order: the plan's
``transpose_forward`` is applied to (z, y, x) arrays first, so that the coarsest axis comes first. A 2D
configuration's spatial lists have two entries (the in-plane axes); its slices keep their own spacing.

Every configuration carries ``why``: the reasons for its decisions, in plain words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autoseg.data.labels import foreground_values, n_outputs
from autoseg.errors import ConfigError
from autoseg.networks.spec import GRAD_CLIP, LossSpec, NetworkSpec
from autoseg.runfolder import RunFolder
from autoseg.serialization import load_json, save_json

if TYPE_CHECKING:
    from autoseg.fingerprint import Fingerprint

__all__ = [
    "FORMAT",
    "AUGMENTATION_DEVICES",
    "NetworkSpec",
    "ChannelNormalization",
    "ResamplingSpec",
    "LossSpec",
    "AugmentationSpec",
    "TrainingSpec",
    "Configuration",
    "DeviceSpec",
    "Plans",
    "load_plans",
]

FORMAT = 1
#: Where augmentation runs: the CPU data loader, or whole batches on the training device.
AUGMENTATION_DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class ChannelNormalization:
    """How one input channel is normalised.

    ``scheme``: ``ct`` (clip to ``clip`` then subtract ``mean`` and divide by ``std``, dataset statistics of the
    foreground), ``zscore`` (per image; only inside the non-zero mask when ``use_mask``), ``rescale`` (per image
    to [0, 1]), ``rgb`` (8-bit colour divided by 255) or ``none``.
    """

    scheme: str
    use_mask: bool = False
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class ResamplingSpec:
    """Interpolation orders for resampling to the target spacing.

    Images use ``order_image`` (3: cubic). Label maps are resampled per label with ``order_label`` on one-hot
    masks (1: linear, then arg-max), which never invents a label value. When a case's spacing is anisotropic
    (coarsest / finest > ``anisotropy_threshold``), the coarse axis is resampled separately with ``order_z``
    (0: nearest) so that thick slices are not blurred into each other.
    """

    order_image: int = 3
    order_label: int = 1
    order_z: int = 0
    anisotropy_threshold: float = 3.0


@dataclass(frozen=True)
class AugmentationSpec:
    """Spatial and intensity augmentation. Angles in degrees; probabilities per sample.

    ``strength`` scales every range and probability (1.0 = the defaults); the search tunes it. ``device`` says
    where it runs: ``cpu`` in the data loader's worker processes, or ``gpu``: the loader only crops and the trainer
    augments whole batches on the training device (:mod:`autoseg.training.batch_augmentation`).
    """

    mirror_axes: tuple[int, ...]
    dummy_2d: bool = False
    rotation_deg: float = 30.0
    p_rotation: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_scale: float = 0.2
    elastic: bool = False
    p_elastic: float = 0.2
    p_noise: float = 0.1
    p_blur: float = 0.2
    p_brightness: float = 0.15
    p_contrast: float = 0.15
    p_low_resolution: float = 0.25
    p_gamma: float = 0.3
    strength: float = 1.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.device not in AUGMENTATION_DEVICES:
            raise ConfigError(
                f"augmentation.device {self.device!r} unknown; choose {' or '.join(AUGMENTATION_DEVICES)}"
            )


@dataclass(frozen=True)
class TrainingSpec:
    """Optimiser and schedule. ``precision`` is ``auto`` (bf16/fp16 on CUDA, fp32 on CPU), ``fp32``, ``fp16`` or
    ``bf16``."""

    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    lr_schedule: str = "poly"
    poly_exponent: float = 0.9
    grad_clip: float = GRAD_CLIP
    precision: str = "auto"
    seed: int = 12345
    gpus_per_job: int = 1  # > 1: one job data-parallel (DDP, torchrun) over this many GPUs
    #: start from another run's weights: ``RUN[:CONFIG[:FOLD]]`` or a checkpoint file (autoseg.training.transfer)
    init_from: str | None = None
    #: epochs of linear learning-rate warm-up from lr / (warmup_epochs + 1) (fine-tuning a transferred network)
    warmup_epochs: int = 0
    #: wall-clock hours this job may train; when its measured epochs would not fit, the trainer trains fewer epochs,
    #: the learning rate still decaying to its end (:func:`autoseg.training.trainer.fit_epochs`). None: no limit
    time_limit_hours: float | None = None


@dataclass(frozen=True)
class Configuration:
    """One trainable configuration (``2d``, ``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres``)."""

    name: str
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    median_image_size: tuple[float, ...]
    normalization: tuple[ChannelNormalization, ...]
    network: NetworkSpec
    augmentation: AugmentationSpec
    resampling: ResamplingSpec = field(default_factory=ResamplingSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    foreground_oversampling: float = 0.33
    data_identifier: str = ""
    previous_stage: str | None = None
    inherits_from: str | None = None
    estimated_memory_bytes: int = 0
    why: tuple[str, ...] = ()

    @property
    def ndim(self) -> int:
        return len(self.patch_size)

    def with_reason(self, *reasons: str) -> Configuration:
        return replace(self, why=self.why + tuple(reasons))


@dataclass(frozen=True)
class DeviceSpec:
    """What the plan was made for: ``cpu`` or ``cuda``, the memory budget per job in bytes and CPU cores.

    ``flops_per_second``: the training throughput the planner measured (CPU) or assumed (GPU) and sized the
    networks and epochs with; None for plans made without one (the nnU-Net presets).
    """

    kind: str
    memory_bytes: int
    name: str = ""
    cpu_cores: int = 1
    flops_per_second: float | None = None


@dataclass(frozen=True)
class Plans:
    """``plans.json``."""

    dataset_name: str
    planner: str
    device: DeviceSpec
    channels: tuple[str, ...]
    labels: dict[str, int]
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    original_median_spacing: tuple[float, ...]
    original_median_shape: tuple[float, ...]
    configurations: dict[str, Configuration]
    regions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    region_class_order: tuple[int, ...] = ()
    ignore_label: int | None = None
    file_ending: str = ".nii.gz"
    time_budget_hours: float | None = None
    #: False when the time budget only allows one model trained on all cases (fold ``all``), no cross-validation.
    cross_validation: bool = True
    why: tuple[str, ...] = ()
    search: dict[str, Any] | None = None
    autoseg_version: str = ""
    format: int = FORMAT

    @property
    def n_outputs(self) -> int:
        """Network output channels: one per region, or one per label value (background included)."""
        return n_outputs(self.labels, self.regions, self.ignore_label)

    @property
    def foreground_values(self) -> tuple[int, ...]:
        """Label values of the classes to segment (background and the ignore label excluded)."""
        return foreground_values(self.labels, self.ignore_label)

    def input_channels(self, c: Configuration) -> int:
        """Network input channels of configuration ``c``: the image channels, plus one per foreground class for a
        cascade stage (the previous stage's prediction, one-hot)."""
        extra = len(self.foreground_values) if c.previous_stage else 0
        return len(self.channels) + extra

    def save(self, path: Path) -> None:
        save_json(self, path)

    @classmethod
    def for_dataset(
        cls,
        fp: Fingerprint,
        *,
        forward: Sequence[int],
        backward: Sequence[int],
        configurations: dict[str, Configuration],
        **fields: Any,
    ) -> Plans:
        """Plans of the dataset ``fp`` describes: what every planner copies from the fingerprint, plus ``fields``."""
        return cls(
            dataset_name=fp.dataset_name,
            channels=tuple(c.name for c in fp.channels),
            labels=dict(fp.labels),
            transpose_forward=tuple(forward),
            transpose_backward=tuple(backward),
            original_median_spacing=tuple(float(v) for v in np.asarray(fp.median_spacing)[list(forward)]),
            original_median_shape=tuple(float(v) for v in np.asarray(fp.median_shape_after_crop)[list(forward)]),
            configurations=configurations,
            regions=dict(fp.regions),
            region_class_order=fp.region_class_order,
            ignore_label=fp.ignore_label,
            file_ending=fp.file_ending,
            **fields,
        )


def load_plans(path: Path | str) -> Plans:
    """Read ``plans.json`` (a run folder is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = RunFolder(path).plans
    return load_json(Plans, path, format_version=FORMAT)
