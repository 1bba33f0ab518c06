"""Fingerprints and plan decisions made by other tools, read into autoseg's types.

* :func:`import_nnunet_fingerprint`: nnU-Net v2's ``dataset_fingerprint.json`` + ``dataset.json`` -> Fingerprint.
  nnU-Net stores spacings and shapes in array (z, y, x) order already; it has no case ids, full shapes, crop boxes,
  class balance or object sizes, so those are ``None`` and listed in ``Fingerprint.unknown``.
* :func:`import_monai_datastats`: MONAI Auto3DSeg ``datastats_by_case.yaml`` -> Fingerprint ((x, y, z) reversed;
  needs PyYAML, an optional dependency).
* :func:`read_nnunet_plans`: the decisions in an nnU-Net v2 plans file (current layout with ``architecture`` and
  the v2.0-2.2 layout with ``UNet_class_name`` and flat pool/conv lists) as :class:`NnunetPlansDecisions`.
* :class:`CorpusEntry`: one file of the project's ``fingerprints/`` corpus (see fingerprints/README.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.data.dataset import _parse_labels
from autoseg.errors import ConfigError
from autoseg.fingerprint import (
    CaseFingerprint,
    ChannelFingerprint,
    ClassFingerprint,
    Fingerprint,
    IntensityStats,
    normalization_hint,
)
from autoseg.serialization import load_json

__all__ = [
    "NNUNET_UNKNOWN",
    "import_nnunet_fingerprint",
    "import_monai_datastats",
    "NnunetConfigurationDecisions",
    "NnunetPlansDecisions",
    "read_nnunet_plans",
    "fingerprint_from_plans",
    "ReferenceSource",
    "CorpusEntry",
    "load_corpus_entry",
]

log = logging.getLogger(__name__)

#: Fingerprint fields an nnU-Net fingerprint does not provide.
_CASE_FACTS = ("cases.shape", "cases.crop_bbox", "cases.class_voxels", "cases.n_components")
_OBJECT_FACTS: tuple[str, ...] = ("cases.component_volumes_mm3", "classes.median_object_volume_mm3")
_OBJECT_FACTS += (
    "classes.object_volume_mm3_p10",
    "classes.object_volume_mm3_p90",
    "classes.median_components_per_case",
    "classes.image_fraction",
    "classes.typical_object_volume_mm3",
)
_BALANCE_FACTS = ("classes.voxel_fraction", "classes.present_fraction")
NNUNET_UNKNOWN = ("cases.id", *_CASE_FACTS, *_OBJECT_FACTS, *_BALANCE_FACTS)
MONAI_UNKNOWN = ("cases.id", "cases.crop_bbox", "cases.class_voxels", "cases.n_components", *_OBJECT_FACTS)
CORPUS_FORMAT = 1
_FINGERPRINT_KEYS: tuple[str, ...] = ("spacings", "shapes_after_crop", "median_relative_size_after_cropping")
_FINGERPRINT_KEYS += ("foreground_intensity_properties_per_channel",)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _require(data: dict[str, Any], keys: tuple[str, ...], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {missing}; is this an nnU-Net v2 {what}?")


def _float3(values: Any) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])


def _int3(values: Any) -> tuple[int, int, int]:
    return int(values[0]), int(values[1]), int(values[2])


def _intensity(props: dict[str, Any], std_key: str = "std") -> IntensityStats:
    names = ("mean", "median", "min", "max", "percentile_00_5", "percentile_99_5")
    return IntensityStats(std=float(props[std_key]), **{k: float(props[k]) for k in names})


def _channel_names(meta: dict[str, Any], path: Path) -> tuple[str, ...]:
    names = meta.get("channel_names", meta.get("modality"))
    if not isinstance(names, dict) or not names:
        raise ConfigError(f"{path}: needs 'channel_names' (nnU-Net v2) or 'modality' (v1) mapping index -> name")
    return tuple(str(names[k]) for k in sorted(names, key=int))


def _classes(labels: dict[str, int], ignore: int | None) -> tuple[ClassFingerprint, ...]:
    return tuple(
        ClassFingerprint(label=v, name=n)
        for n, v in sorted(labels.items(), key=lambda kv: kv[1])
        if v != 0 and v != ignore
    )


def import_nnunet_fingerprint(
    fingerprint_json: Path, dataset_json: Path, *, dataset_name: str | None = None
) -> Fingerprint:
    """Convert nnU-Net v2's ``dataset_fingerprint.json`` (+ its ``dataset.json``) into a :class:`Fingerprint`.

    Parameters
    ----------
    fingerprint_json : Path
        nnU-Net's fingerprint (spacings and shapes after cropping per case, in (z, y, x) order).
    dataset_json : Path
        The dataset's ``dataset.json``: channel names, labels (regions and ignore label included), file ending.
    dataset_name : str, optional
        Default: the name of the folder holding the fingerprint (nnU-Net's ``DatasetXXX_Name``).

    Returns
    -------
    Fingerprint
        Case ids are ``case_0000``... in the fingerprint's order; fields nnU-Net lacks are None and named in
        ``unknown``; ``source`` is ``nnunet:<fingerprint_json>``.
    """
    fingerprint_json, dataset_json = Path(fingerprint_json), Path(dataset_json)
    raw = _read_json(fingerprint_json)
    _require(raw, _FINGERPRINT_KEYS, fingerprint_json, "dataset_fingerprint.json")
    meta = _read_json(dataset_json)
    _require(meta, ("labels",), dataset_json, "dataset.json")
    channels = _channel_names(meta, dataset_json)
    spacings = np.asarray(raw["spacings"], dtype=float)
    shapes = np.asarray(raw["shapes_after_crop"], dtype=int)
    if spacings.ndim != 2 or spacings.shape[1] != 3 or shapes.shape != spacings.shape or not len(spacings):
        raise ConfigError(
            f"{fingerprint_json}: 'spacings' and 'shapes_after_crop' must be equally long lists of "
            f"3 numbers (got {spacings.shape} and {shapes.shape})"
        )
    n_training = meta.get("numTraining")
    if n_training is not None and n_training != len(spacings):
        log.warning("%s: numTraining is %s but the fingerprint has %d cases", dataset_json, n_training, len(spacings))
    props = raw["foreground_intensity_properties_per_channel"]
    channel_fps = tuple(
        ChannelFingerprint(name, normalization_hint(name), _intensity(props[str(i)]) if str(i) in props else None)
        for i, name in enumerate(channels)
    )
    labels, regions, ignore = _parse_labels(meta["labels"], dataset_json)
    cases = tuple(
        CaseFingerprint(id=f"case_{i:04d}", spacing=_float3(sp), shape_after_crop=_int3(sh))
        for i, (sp, sh) in enumerate(zip(spacings, shapes))
    )
    return Fingerprint(
        dataset_name=dataset_name or fingerprint_json.resolve().parent.name,
        dim=2 if bool(np.all(shapes[:, 0] == 1)) else 3,
        n_cases=len(cases),
        labels=labels,
        channels=channel_fps,
        classes=_classes(labels, ignore),
        cases=cases,
        median_spacing=_float3(np.median(spacings, axis=0)),
        median_shape_after_crop=_float3(np.median(shapes, axis=0)),
        median_relative_size_after_cropping=float(raw["median_relative_size_after_cropping"]),
        regions=regions,
        region_class_order=tuple(int(v) for v in meta.get("regions_class_order", ())),
        ignore_label=ignore,
        file_ending=str(meta.get("file_ending", ".nii.gz")),
        source=f"nnunet:{fingerprint_json}",
        unknown=NNUNET_UNKNOWN,
    )


def import_monai_datastats(
    datastats_by_case: Path, *, channel_names: tuple[str, ...], dataset_name: str | None = None
) -> Fingerprint:
    """Convert MONAI Auto3DSeg ``datastats_by_case.yaml`` into a :class:`Fingerprint` (needs PyYAML).

    MONAI lists spacings and shapes in (x, y, z) order; they are reversed here. ``shape_after_crop`` is MONAI's
    ``cropped_shape`` (its own foreground crop, which may differ from nnU-Net's non-zero crop). Foreground intensity
    statistics are MONAI's dataset summary (averages of per-case statistics, not pooled percentiles). Class balance
    comes from MONAI's per-case ``foreground_percentage``; object sizes, crop boxes and case ids are unknown.
    """
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{datastats_by_case}: reading MONAI datastats needs PyYAML (pip install pyyaml)") from None
    path = Path(datastats_by_case)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "stats_by_cases" not in data:
        raise ConfigError(f"{path}: no 'stats_by_cases'; give MONAI's datastats_by_case.yaml, not the summary")
    by_case = data["stats_by_cases"]
    cases, rel, voxels = [], [], []
    for i, c in enumerate(by_case):
        stats = c["image_stats"]
        spacing = _float3(stats["spacing"][::-1])
        shape, cropped = _int3(stats["shape"][0][::-1]), _int3(stats["cropped_shape"][0][::-1])
        cases.append(CaseFingerprint(id=f"case_{i:04d}", spacing=spacing, shape_after_crop=cropped, shape=shape))
        rel.append(np.prod(cropped, dtype=float) / np.prod(shape, dtype=float))
        per_label = c.get("label_stats", {})
        fractions = [lab.get("foreground_percentage", 0.0) for lab in per_label.get("label", [])]
        voxels.append(dict(zip(per_label.get("labels", []), fractions)))
    values = sorted({int(v) for d in voxels for v in d} | {0})
    labels = {("background" if v == 0 else f"label_{v}"): v for v in values}
    stats = _intensity(data["stats_summary"]["image_foreground_stats"]["intensity"], std_key="stdev")
    total = sum(sum(d.get(v, 0.0) for v in values if v) for d in voxels) or 1.0
    classes = tuple(
        ClassFingerprint(
            label=v,
            name=f"label_{v}",
            voxel_fraction=sum(d.get(v, 0.0) for d in voxels) / total,
            present_fraction=float(np.mean([d.get(v, 0.0) > 0 for d in voxels])),
        )
        for v in values
        if v
    )
    spacings = np.array([c.spacing for c in cases])
    shapes = np.array([c.shape_after_crop for c in cases], dtype=float)
    return Fingerprint(
        dataset_name=dataset_name or path.resolve().parent.name,
        dim=3,
        n_cases=len(cases),
        labels=labels,
        channels=tuple(ChannelFingerprint(n, normalization_hint(n), stats) for n in channel_names),
        classes=classes,
        cases=tuple(cases),
        median_spacing=_float3(np.median(spacings, axis=0)),
        median_shape_after_crop=_float3(np.median(shapes, axis=0)),
        median_relative_size_after_cropping=float(np.median(rel)),
        source=f"monai:{path}",
        unknown=MONAI_UNKNOWN,
    )


@dataclass(frozen=True)
class NnunetConfigurationDecisions:
    """What one nnU-Net configuration decided. Fields a configuration does not set (one that only inherits and
    overrides, like ``3d_cascade_fullres``) are None. Spatial lists are in nnU-Net's preprocessed order.

    ``n_conv_per_stage`` is ``n_blocks_per_stage`` for residual encoders. ``features_per_stage`` of the v2.0-2.2
    layout is derived from its ``UNet_base_num_features`` and ``unet_max_num_features``. ``other`` keeps keys that
    are not decisions this project compares (for example a stray ``UNet_base_num_features`` in a current layout).
    """

    data_identifier: str | None = None
    spacing: tuple[float, ...] | None = None
    patch_size: tuple[int, ...] | None = None
    batch_size: int | None = None
    median_image_size: tuple[float, ...] | None = None
    normalization_schemes: tuple[str, ...] | None = None
    use_mask_for_norm: tuple[bool, ...] | None = None
    batch_dice: bool | None = None
    network_class: str | None = None
    n_stages: int | None = None
    strides: tuple[tuple[int, ...], ...] | None = None
    kernel_sizes: tuple[tuple[int, ...], ...] | None = None
    features_per_stage: tuple[int, ...] | None = None
    n_conv_per_stage: tuple[int, ...] | None = None
    n_conv_per_stage_decoder: tuple[int, ...] | None = None
    previous_stage: str | None = None
    next_stage: str | None = None
    inherits_from: str | None = None
    other: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NnunetPlansDecisions:
    """The decisions of one nnU-Net plans file."""

    plans_file: str
    plans_name: str
    planner: str
    layout: str  # "current" (architecture dict) or "legacy" (v2.0-2.2: UNet_class_name, flat lists)
    dataset_name: str
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    original_median_spacing_after_transp: tuple[float, ...]
    original_median_shape_after_transp: tuple[float, ...]
    configurations: dict[str, NnunetConfigurationDecisions]


_COMMON = set("data_identifier batch_size patch_size median_image_size_in_voxels spacing normalization_schemes".split())
_COMMON |= set("use_mask_for_norm batch_dice previous_stage next_stage inherits_from".split())
_IGNORED = {"preprocessor_name", *(f"resampling_fn_{k}" for k in ("data", "seg", "probabilities"))}
_IGNORED |= {f"resampling_fn_{k}_kwargs" for k in ("data", "seg", "probabilities")}
_LEGACY = set("UNet_class_name UNet_base_num_features n_conv_per_stage_encoder n_conv_per_stage_decoder".split())
_LEGACY |= set("num_pool_per_axis pool_op_kernel_sizes conv_kernel_sizes unet_max_num_features".split())


def _tuples(value: Any) -> tuple[tuple[int, ...], ...] | None:
    return None if value is None else tuple(tuple(int(v) for v in row) for row in value)


def _architecture(cfg: dict[str, Any]) -> dict[str, Any]:
    if "architecture" in cfg:
        arch = cfg["architecture"]
        kw = arch["arch_kwargs"]
        return {
            "network_class": arch["network_class_name"].rsplit(".", 1)[-1],
            "n_stages": int(kw["n_stages"]),
            "strides": _tuples(kw["strides"]),
            "kernel_sizes": _tuples(kw["kernel_sizes"]),
            "features_per_stage": tuple(int(v) for v in kw["features_per_stage"]),
            "n_conv_per_stage": tuple(int(v) for v in kw.get("n_conv_per_stage", kw.get("n_blocks_per_stage", ()))),
            "n_conv_per_stage_decoder": tuple(int(v) for v in kw["n_conv_per_stage_decoder"]),
        }
    if "UNet_class_name" in cfg:
        strides = _tuples(cfg["pool_op_kernel_sizes"])
        n = len(strides or ())
        base, cap = int(cfg["UNet_base_num_features"]), int(cfg["unet_max_num_features"])
        return {
            "network_class": cfg["UNet_class_name"],
            "n_stages": n,
            "strides": strides,
            "kernel_sizes": _tuples(cfg["conv_kernel_sizes"]),
            "features_per_stage": tuple(min(cap, base * 2**i) for i in range(n)),
            "n_conv_per_stage": tuple(int(v) for v in cfg["n_conv_per_stage_encoder"]),
            "n_conv_per_stage_decoder": tuple(int(v) for v in cfg["n_conv_per_stage_decoder"]),
        }
    return {}


def _configuration(cfg: dict[str, Any]) -> NnunetConfigurationDecisions:
    arch = _architecture(cfg)
    known = _COMMON | _IGNORED | {"architecture"} | (_LEGACY if "UNet_class_name" in cfg else set())
    other = {k: v for k, v in cfg.items() if k not in known}
    seq = lambda key, cast: tuple(cast(v) for v in cfg[key]) if key in cfg else None  # noqa: E731
    return NnunetConfigurationDecisions(
        data_identifier=cfg.get("data_identifier"),
        spacing=seq("spacing", float),
        patch_size=seq("patch_size", int),
        batch_size=cfg.get("batch_size"),
        median_image_size=seq("median_image_size_in_voxels", float),
        normalization_schemes=seq("normalization_schemes", str),
        use_mask_for_norm=seq("use_mask_for_norm", bool),
        batch_dice=cfg.get("batch_dice"),
        previous_stage=cfg.get("previous_stage"),
        next_stage=cfg.get("next_stage"),
        inherits_from=cfg.get("inherits_from"),
        other=other,
        **arch,
    )


def read_nnunet_plans(path: Path, *, name: str | None = None) -> NnunetPlansDecisions:
    """Read the decisions of an nnU-Net v2 plans file (current or v2.0-2.2 layout).

    ``name`` is recorded as ``plans_file`` (default: the file name).
    """
    path = Path(path)
    plans = _read_json(path)
    _require(plans, ("configurations", "transpose_forward"), path, "plans file")
    configs = {k: _configuration(v) for k, v in plans["configurations"].items()}
    legacy = any("UNet_class_name" in v for v in plans["configurations"].values())
    return NnunetPlansDecisions(
        plans_file=name or path.name,
        plans_name=str(plans.get("plans_name", "")),
        planner=str(plans.get("experiment_planner_used", "")),
        layout="legacy" if legacy else "current",
        dataset_name=str(plans.get("dataset_name", "")),
        transpose_forward=tuple(int(v) for v in plans["transpose_forward"]),
        transpose_backward=tuple(int(v) for v in plans["transpose_backward"]),
        original_median_spacing_after_transp=tuple(float(v) for v in plans["original_median_spacing_after_transp"]),
        original_median_shape_after_transp=tuple(float(v) for v in plans["original_median_shape_after_transp"]),
        configurations=configs,
    )


def fingerprint_from_plans(
    decisions: NnunetPlansDecisions, *, n_cases: int, n_labels: int, dataset_name: str | None = None
) -> Fingerprint:
    """A stand-in fingerprint for plans without one: ``n_cases`` cases, all at the plans' median spacing and shape.

    Enough to re-derive a plan that depends only on medians (nnU-Net's 2D configuration of a 2D dataset), never a
    description of the data: ``source`` says ``nnunet-plans:`` and every per-case fact is listed in ``unknown``.
    Channels are named ``channel_<i>`` with the normalisation the plans chose (CT statistics are not in decisions,
    so CT channels are not supported).
    """
    any_config = next(c for c in decisions.configurations.values() if c.normalization_schemes is not None)
    schemes = {
        "ZScoreNormalization": "zscore",
        "NoNormalization": "none",
        "RescaleTo01Normalization": "rescale",
        "RGBTo01Normalization": "rgb",
    }
    names = any_config.normalization_schemes or ()
    if any(n not in schemes for n in names):
        raise ConfigError(f"{decisions.plans_file}: normalisation {list(names)} needs dataset statistics")
    spacing = _float3(decisions.original_median_spacing_after_transp)
    shape = _int3([round(v) for v in decisions.original_median_shape_after_transp])
    labels = {"background": 0, **{f"label_{v}": v for v in range(1, n_labels)}}
    return Fingerprint(
        dataset_name=dataset_name or decisions.dataset_name,
        dim=2 if shape[0] == 1 else 3,
        n_cases=n_cases,
        labels=labels,
        channels=tuple(ChannelFingerprint(f"channel_{i}", schemes[n], None) for i, n in enumerate(names)),
        classes=_classes(labels, None),
        cases=tuple(CaseFingerprint(f"case_{i:04d}", spacing, shape) for i in range(n_cases)),
        median_spacing=spacing,
        median_shape_after_crop=_float3(shape),
        median_relative_size_after_cropping=0.5 if any(any_config.use_mask_for_norm or ()) else 1.0,
        source=f"nnunet-plans:{decisions.plans_file}",
        unknown=NNUNET_UNKNOWN
        + (
            "cases.spacing",
            "cases.shape_after_crop",
            "channels.name",
            "channels.foreground_intensity",
            "labels",
            "median_relative_size_after_cropping",
        ),
    )


@dataclass(frozen=True)
class ReferenceSource:
    """Where reference files came from (a public repository at a commit). ``files`` maps local name -> path there."""

    repository: str
    commit: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    notes: str = ""


@dataclass(frozen=True)
class CorpusEntry:
    """One ``fingerprints/<name>.json``: a real dataset's fingerprint and the decisions nnU-Net made from it.

    ``nnunet_decisions`` maps a preset (``nnunet``, ``nnunet-resenc-m``, ``nnunet-resenc-l``) to its plans.
    ``caveats`` holds flags such as ``batch_size_edited_by_hand`` and ``hand_edited`` (``"preset/configuration"``
    -> fields a person changed, which a planner cannot reproduce) plus free-text ``notes``.
    """

    name: str
    source: tuple[ReferenceSource, ...]
    fingerprint: Fingerprint | None
    nnunet_decisions: dict[str, NnunetPlansDecisions]
    caveats: dict[str, Any] = field(default_factory=dict)
    format: int = CORPUS_FORMAT


def load_corpus_entry(path: Path | str) -> CorpusEntry:
    """Read one file of the ``fingerprints/`` corpus."""
    return load_json(CorpusEntry, Path(path), format_version=CORPUS_FORMAT)
