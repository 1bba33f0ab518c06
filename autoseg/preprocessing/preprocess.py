"""Preprocess cases for a configuration (transpose, crop, normalise, resample) and undo it exactly.

:func:`preprocess_case` works on arrays in memory; :func:`preprocess` runs it over a dataset in parallel and
stores the results (:mod:`autoseg.preprocessing.store`); :func:`revert` maps a prediction in the preprocessed
space (label map, probabilities or logits) back onto the original image grid.

Order of operations: transpose (coarsest axis first), crop to the non-zero box, normalise, resample. Normalising
before resampling keeps the non-zero mask aligned with the voxels it was computed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.data.dataset import Case, DatasetSpec, discover
from autoseg.data.dataset import load_case as load_raw_case
from autoseg.data.geometry import Geometry
from autoseg.data.io import read_header
from autoseg.errors import AutosegError, ConfigError, PreprocessingError
from autoseg.files import files_signature
from autoseg.planning.plans import Configuration, Plans, load_plans
from autoseg.preprocessing.cropping import crop, crop_box, transpose_spatial
from autoseg.preprocessing.normalization import normalize
from autoseg.preprocessing.resampling import (
    axis_orders,
    compute_new_shape,
    lowres_axis,
    resample_image,
    resample_label,
)
from autoseg.preprocessing.store import (
    CaseProperties,
    StoreInfo,
    case_done,
    read_store_info,
    sample_class_locations,
    write_case,
    write_store_info,
)
from autoseg.processes import worker_pool
from autoseg.runfolder import RunFolder, dataset_dir
from autoseg.serialization import to_jsonable

__all__ = [
    "PREPROCESSING_VERSION",
    "target_spacing",
    "plan_hash",
    "preprocess_case",
    "preprocess",
    "revert",
    "label_to_case_grid",
    "probability_orders",
    "estimate_case_bytes",
    "auto_workers",
]

log = logging.getLogger(__name__)

#: Bumped when a change here alters the stored arrays; part of :func:`plan_hash`, so old folders are redone.
PREPROCESSING_VERSION = 1
#: Peak bytes per input voxel and per output voxel (per channel) of reading, preprocessing and writing one case.
#: tracemalloc measured 8 to 12.5 bytes per input + output voxel for preprocess_case + write on real CTs (lung,
#: TotalSegmentator), plus about 10 per input voxel for the arrays as read; 16 + 16 leaves a margin.
_BYTES_PER_INPUT_VOXEL = 16
_BYTES_PER_OUTPUT_VOXEL = 16
#: Memory of an idle worker process (interpreter, numpy, scipy, SimpleITK).
_WORKER_BASE_BYTES = 150 << 20


def _configuration(plans: Plans, name: str) -> Configuration:
    if name not in plans.configurations:
        raise ConfigError(f"plans.json: no configuration {name!r}; valid: {sorted(plans.configurations)}")
    return plans.configurations[name]


def target_spacing(configuration: Configuration, spacing: Sequence[float]) -> tuple[float, float, float]:
    """Spacing after resampling, preprocessed axis order: a 2D configuration keeps the case's slice spacing."""
    if len(configuration.spacing) == len(spacing):
        return tuple(float(s) for s in configuration.spacing)  # type: ignore[return-value]
    if len(configuration.spacing) == len(spacing) - 1:
        return (float(spacing[0]), *(float(s) for s in configuration.spacing))  # type: ignore[return-value]
    raise ConfigError(
        f"plans.json: configuration {configuration.name!r} has spacing {configuration.spacing}; "
        f"expected {len(spacing)} or {len(spacing) - 1} values"
    )


def _hash_fields(plans: Plans, configuration: Configuration) -> dict[str, Any]:
    return to_jsonable(
        {
            "version": PREPROCESSING_VERSION,
            "transpose_forward": plans.transpose_forward,
            "channels": plans.channels,
            "labels": plans.labels,
            "ignore_label": plans.ignore_label,
            "spacing": configuration.spacing,
            "normalization": configuration.normalization,
            "resampling": configuration.resampling,
        }
    )


def plan_hash(plans: Plans, configuration_name: str) -> str:
    """Hash of the plan fields that decide a configuration's preprocessed data (16 hex digits)."""
    fields = _hash_fields(plans, _configuration(plans, configuration_name))
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _check_inputs(image: np.ndarray, label: np.ndarray | None, geometry: Geometry) -> None:
    if image.ndim != 4:
        raise PreprocessingError(f"image has shape {image.shape}; expected (C, Z, Y, X)")
    if tuple(image.shape[1:]) != tuple(geometry.shape_zyx):
        raise PreprocessingError(f"image shape {image.shape[1:]} differs from its geometry {geometry.shape_zyx}")
    if label is not None and tuple(label.shape) != tuple(image.shape[1:]):
        raise PreprocessingError(f"label shape {label.shape} differs from the image's {image.shape[1:]}")
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        bad = int(np.count_nonzero(~np.isfinite(image)))
        raise PreprocessingError(f"image contains {bad} NaN or infinite value(s); fix or remove the case")
    if label is not None and label.size and int(label.min()) < 0:
        raise PreprocessingError(f"label map contains negative values ({int(label.min())}); labels must be >= 0")


def _seg_dtype(max_value: int) -> type:
    if max_value <= 127:
        return np.int8
    if max_value <= 32767:
        return np.int16
    raise PreprocessingError(f"label value {max_value} is above 32767; relabel the dataset")


def preprocess_case(
    image: np.ndarray,
    label: np.ndarray | None,
    geometry: Geometry,
    plans: Plans,
    configuration_name: str,
    *,
    case_id: str = "",
) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Preprocess one case in memory; inputs are not modified.

    Parameters
    ----------
    image : (C, Z, Y, X) array as read (:func:`autoseg.data.dataset.load_case`).
    label : (Z, Y, X) non-negative integer label map on the image grid, or None (cases to predict).
    geometry : the image's geometry.

    Returns
    -------
    data : (C, Z', Y', X') float32 in the preprocessed axis order.
    seg : (1, Z', Y', X') int8 (int16 for values above 127), or None without a label.
    props : :class:`CaseProperties` for :func:`revert` (``class_locations`` and the hashes are left empty).
    """
    config = _configuration(plans, configuration_name)
    _check_inputs(image, label, geometry)
    forward = tuple(int(a) for a in plans.transpose_forward)
    spacing = tuple(float(geometry.spacing_zyx[a]) for a in forward)
    image_t = transpose_spatial(image, forward)
    box = crop_box(image_t)
    data = normalize(crop(image_t, box), config.normalization)
    target = target_spacing(config, spacing)
    new_shape = compute_new_shape(data.shape[1:], spacing, target)
    spec = config.resampling
    separate = lowres_axis(spacing, target, spec.anisotropy_threshold)
    data = resample_image(
        data, new_shape, orders=axis_orders(3, spec.order_image, spec.order_z, separate), separate=separate
    )
    props = CaseProperties(
        case_id=case_id,
        geometry=geometry,
        transpose_forward=forward,  # type: ignore[arg-type]
        transpose_backward=tuple(int(a) for a in np.argsort(forward)),  # type: ignore[arg-type]
        original_spacing=spacing,  # type: ignore[arg-type]
        shape_before_crop=tuple(image_t.shape[1:]),  # type: ignore[arg-type]
        crop_bbox=box,
        shape_after_crop=tuple(b - a for a, b in box),  # type: ignore[arg-type]
        spacing=target,
        shape_after_resampling=new_shape,  # type: ignore[arg-type]
        resampling=spec,
    )
    seg = None if label is None else label_to_case_grid(label, props)[None]
    return data, seg, props


def label_to_case_grid(label: np.ndarray, properties: CaseProperties) -> np.ndarray:
    """A (Z, Y, X) label map on a case's original grid, mapped onto its preprocessed grid as training labels are
    (transposed, cropped to the case's box, resampled per label): int8 (int16 above 127), shape
    ``properties.shape_after_resampling``. Used for the case's own label and for a previous cascade stage's
    prediction, so both sit voxel for voxel on the image data."""
    p, spec = properties, properties.resampling
    if tuple(label.shape) != tuple(p.geometry.shape_zyx):
        raise PreprocessingError(f"label shape {label.shape} differs from case {p.case_id!r}'s {p.geometry.shape_zyx}")
    separate = lowres_axis(p.original_spacing, p.spacing, spec.anisotropy_threshold)
    cropped = np.ascontiguousarray(crop(np.asarray(label).transpose(p.transpose_forward), p.crop_bbox))
    orders = axis_orders(3, spec.order_label, spec.order_z, separate)
    resampled = resample_label(cropped, tuple(p.shape_after_resampling), orders=orders)
    return resampled.astype(_seg_dtype(int(resampled.max(initial=0))))


def probability_orders(properties: CaseProperties) -> tuple[tuple[int, ...], int | None]:
    """Interpolation order per axis and the separately resampled axis with which :func:`revert` maps
    probabilities back to the original grid."""
    spec = properties.resampling
    separate = lowres_axis(properties.spacing, properties.original_spacing, spec.anisotropy_threshold)
    return axis_orders(3, 1, spec.order_z, separate), separate


def revert(
    array: np.ndarray,
    properties: CaseProperties,
    *,
    is_label: bool,
    order: int | None = None,
    fill: Sequence[float] | None = None,
) -> np.ndarray:
    """Map an array in the preprocessed space back onto the original image grid.

    Parameters
    ----------
    array : label map (Z', Y', X') or (1, Z', Y', X'), or (C, Z', Y', X') probabilities / logits, with the spatial
        shape ``properties.shape_after_resampling``.
    properties : the case's :class:`CaseProperties`.
    is_label : label maps are resampled per label (order 0 or 1) and padded with 0; probabilities are resampled
        as images and padded with background (channel 0) = 1, other channels 0.
    order : in-plane interpolation order; default ``resampling.order_label`` for labels, 1 for probabilities.
        The coarse axis of an anisotropic case uses ``resampling.order_z``.
    fill : probabilities only: the value of each channel outside the crop box (default background 1, others 0;
        sigmoid region outputs want all 0).

    Returns
    -------
    (Z, Y, X) label map of ``array``'s dtype, or (C, Z, Y, X) float32, on the grid of ``properties.geometry``:
    ``write_image(result, properties.geometry, path)`` reproduces the input's spacing, origin and direction.
    """
    p, spec = properties, properties.resampling
    if is_label and array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"a label map has one channel; got shape {array.shape}")
        array = array[0]
    if tuple(array.shape[-3:]) != tuple(p.shape_after_resampling) or array.ndim != (3 if is_label else 4):
        raise ValueError(
            f"array of shape {array.shape} does not match case {p.case_id!r}: expected "
            f"{'' if is_label else '(C, '}{tuple(p.shape_after_resampling)} (preprocessed order)"
        )
    if tuple(np.argsort(p.transpose_forward)) != tuple(p.transpose_backward):
        raise ValueError(f"transpose_backward {p.transpose_backward} is not the inverse of {p.transpose_forward}")
    if tuple(p.shape_before_crop[a] for a in p.transpose_backward) != tuple(p.geometry.shape_zyx):
        raise PreprocessingError(
            f"case {p.case_id!r}: shape before cropping {p.shape_before_crop} does not transpose back to the "
            f"original {p.geometry.shape_zyx}; the properties are inconsistent"
        )
    separate = lowres_axis(p.spacing, p.original_spacing, spec.anisotropy_threshold)
    box = tuple(slice(a, b) for a, b in p.crop_bbox)
    # the result is allocated in the original axis order and filled through a transposed view: no extra copies
    if is_label:
        orders = axis_orders(3, spec.order_label if order is None else order, spec.order_z, separate)
        label = np.zeros(p.geometry.shape_zyx, array.dtype)
        transpose_spatial(label, p.transpose_forward)[box] = resample_label(
            np.ascontiguousarray(array), p.shape_after_crop, orders=orders
        )
        return label
    orders = axis_orders(3, 1 if order is None else order, spec.order_z, separate)
    clip = max(orders) > 1  # a linear interpolation stays within its inputs: only spline overshoot needs clipping
    out = np.zeros((array.shape[0], *p.geometry.shape_zyx), np.float32)
    view = transpose_spatial(out, p.transpose_forward)
    for c, value in enumerate([1.0] + [0.0] * (array.shape[0] - 1) if fill is None else fill):
        if value:
            view[c] = value  # outside the crop box
    for c in range(array.shape[0]):
        view[c][box] = resample_image(
            array[c : c + 1], p.shape_after_crop, orders=orders, separate=separate, clip=clip
        )[0]
    return out


# --- a dataset, in parallel --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """Where one configuration's cases go."""

    configuration: str
    folder: Path
    plan_hash: str


def _targets(run_dir: Path, plans: Plans, configurations: Sequence[str] | None) -> list[_Target]:
    names = list(configurations) if configurations is not None else list(plans.configurations)
    by_folder: dict[Path, _Target] = {}
    for name in names:
        config = _configuration(plans, name)
        folder = RunFolder(run_dir).preprocessed(config.data_identifier or name)
        target = _Target(name, folder, plan_hash(plans, name))
        other = by_folder.get(folder)
        if other is not None and other.plan_hash != target.plan_hash:
            raise PreprocessingError(
                f"plans.json: configurations {other.configuration!r} and {name!r} share data_identifier "
                f"{folder.name!r} but preprocess differently (spacing, normalization or resampling); give them "
                "different data_identifier values"
            )
        by_folder.setdefault(folder, target)
    return list(by_folder.values())


def _case_signature(case: Case) -> str:
    return files_signature([*case.images, *([case.label] if case.label is not None else [])])


def _foreground_classes(plans: Plans) -> list[int]:
    return list(plans.foreground_values)


def _run_case(spec: DatasetSpec, case: Case, plans: Plans, targets: list[_Target], signature: str) -> str:
    """Preprocess and store one case for every target; any failure becomes a PreprocessingError naming the case."""
    try:
        image, label, geometry = load_raw_case(spec, case)
        for target in targets:
            data, seg, props = preprocess_case(image, label, geometry, plans, target.configuration, case_id=case.id)
            locations = sample_class_locations(seg[0], _foreground_classes(plans)) if seg is not None else {}
            props = replace(
                props,
                class_locations={str(k): len(v) for k, v in locations.items()},
                plan_hash=target.plan_hash,
                source_signature=signature,
            )
            write_case(target.folder, case.id, data, seg, props, locations)
            del data, seg
    except MemoryError:
        raise PreprocessingError(
            f"case {case.id!r} ({case.images[0]}): out of memory; run with fewer workers (-j)"
        ) from None
    except AutosegError as exc:
        raise PreprocessingError(f"case {case.id!r} ({case.images[0]}): {exc}") from None
    except Exception as exc:  # any library error: name the case, keep the reason
        raise PreprocessingError(f"case {case.id!r} ({case.images[0]}): {type(exc).__name__}: {exc}") from None
    return case.id


def estimate_case_bytes(voxels: int, channels: int, zoom: float) -> int:
    """Peak memory of preprocessing one case of ``voxels`` voxels and ``channels`` channels whose voxel count
    grows by ``zoom`` (product of current / target spacing) when resampled."""
    per_channel = _BYTES_PER_INPUT_VOXEL + _BYTES_PER_OUTPUT_VOXEL * max(zoom, 1e-3)
    return int(voxels * max(channels, 1) * per_channel) + _WORKER_BASE_BYTES


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _largest_case(run_dir: Path, spec: DatasetSpec) -> tuple[int, tuple[float, float, float]]:
    """Voxel count and spacing (z, y, x) of the largest case: from fingerprint.json, else from file headers."""
    try:
        from autoseg.fingerprint import load_fingerprint

        cases = load_fingerprint(run_dir).cases
        sizes = [(int(np.prod(c.shape or c.shape_after_crop)), c.spacing) for c in cases]
    except AutosegError:
        sizes = []
        for case in spec.cases:
            geometry = read_header(case.images[0])
            sizes.append((int(np.prod(geometry.shape_zyx)), geometry.spacing_zyx))
    return max(sizes, default=(1, (1.0, 1.0, 1.0)), key=lambda s: s[0])


def auto_workers(run_dir: Path, spec: DatasetSpec, plans: Plans, configurations: Sequence[str]) -> int:
    """Worker processes that fit: at most one per core and per case, and as many largest cases as fit in 80% of
    the available memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    voxels, spacing = _largest_case(run_dir, spec)
    forward = plans.transpose_forward
    spacing_t = [spacing[a] for a in forward]
    zoom = max(
        float(np.prod(np.divide(spacing_t, target_spacing(_configuration(plans, n), spacing_t))))
        for n in configurations
    )
    per_case = estimate_case_bytes(voxels, len(spec.channels), zoom)
    fit = int(0.8 * _available_memory() // per_case)
    workers = max(1, min(cores, len(spec.cases), fit))
    log.info("largest case: %d voxels, about %.2f GiB to preprocess; %d worker(s)", voxels, per_case / 2**30, workers)
    return workers


def _prepare_folders(plans: Plans, targets: list[_Target]) -> None:
    for target in targets:
        old = read_store_info(target.folder) if (target.folder / "preprocessing.json").is_file() else None
        if old is not None and old.plan_hash == target.plan_hash:
            continue
        if old is not None:
            log.info("%s was made with another plan (%s); its cases will be redone", target.folder, old.plan_hash)
        names = tuple(n for n, c in plans.configurations.items() if (c.data_identifier or n) == target.folder.name)
        fields = _hash_fields(plans, _configuration(plans, target.configuration))
        write_store_info(target.folder, StoreInfo(target.plan_hash, names, fields))


def preprocess(
    run_dir: Path | str,
    *,
    configurations: Sequence[str] | None = None,
    workers: int | None = None,
    data_dir: Path | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Preprocess the training cases of ``data_dir`` for the configurations of ``RUN/plans.json``.

    ``data_dir`` defaults to the dataset folder recorded in ``RUN/run.json`` (:func:`autoseg.runfolder.dataset_dir`).
    Writes ``RUN/preprocessed/<data_identifier>/`` (configurations sharing an identifier are done once). Cases
    already stored with the same plan hash and unchanged input files are skipped, so a killed run resumes.
    ``progress(done, total)`` is called after each case. Raises PreprocessingError naming the first case that
    fails; cases finished before stay valid.

    Returns
    -------
    The ids of the cases preprocessed by this call (skipped ones excluded), sorted.
    """
    run_dir = Path(run_dir)
    plans = load_plans(run_dir)
    spec = discover(data_dir if data_dir is not None else dataset_dir(run_dir))
    targets = _targets(run_dir, plans, configurations)
    _prepare_folders(plans, targets)
    jobs: list[tuple[Case, list[_Target], str]] = []
    for case in spec.cases:
        signature = _case_signature(case)
        todo = [t for t in targets if not case_done(t.folder, case.id, t.plan_hash, signature)]
        if todo:
            jobs.append((case, todo, signature))
    log.info("%d of %d case(s) to preprocess for %s", len(jobs), len(spec.cases), [t.folder.name for t in targets])
    if not jobs:
        return []
    names = [t.configuration for t in targets]
    n_workers = workers or auto_workers(run_dir, spec, plans, names)
    done: list[str] = []
    if n_workers == 1 or len(jobs) == 1:
        for case, todo, signature in jobs:
            done.append(_run_case(spec, case, plans, todo, signature))
            if progress:
                progress(len(done), len(jobs))
        return sorted(done)
    with worker_pool(min(n_workers, len(jobs))) as pool:
        futures = {pool.submit(_run_case, spec, case, plans, todo, sig): case.id for case, todo, sig in jobs}
        try:
            for future in as_completed(futures):
                done.append(future.result())
                if progress:
                    progress(len(done), len(jobs))
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            running = sorted(set(futures.values()) - set(done))
            raise PreprocessingError(
                f"a worker process died (out of memory?) while preprocessing one of "
                f"{running[:10]}; run with fewer workers (-j)"
            ) from None
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return sorted(done)
