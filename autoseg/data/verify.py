"""Dataset integrity checks: every problem at once, each naming the file and what is wrong."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.data.dataset import Case, DatasetSpec, scan
from autoseg.data.geometry import Geometry
from autoseg.data.io import read_header, read_image, read_label
from autoseg.errors import AutosegError
from autoseg.processes import worker_pool

__all__ = ["VerifyReport", "verify_dataset"]

#: Origin/direction differences between image and label beyond these are reported as warnings.
ORIGIN_TOLERANCE_MM = 1e-3
DIRECTION_TOLERANCE = 1e-4


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_dataset`: ``ok`` when there is no error (warnings are allowed)."""

    root: Path
    n_cases: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    label_values: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _check_case(spec: DatasetSpec, case: Case) -> tuple[list[str], list[str], set[int]]:
    errors: list[str] = []
    warnings: list[str] = []
    image_geometry: Geometry | None = None
    n_channels = 0
    for path in case.images:
        try:
            array, geometry = read_image(path)
        except AutosegError as exc:
            errors.append(str(exc))
            return errors, warnings, set()
        n_channels += array.shape[0]
        if array.size == 0:
            errors.append(f"{path}: image has no voxels")
        elif np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            n_bad = int(np.count_nonzero(~np.isfinite(array)))
            errors.append(f"{path}: {n_bad} NaN/Inf voxel(s); replace them (e.g. by the background value)")
        if image_geometry is None:
            image_geometry = geometry
        else:
            _compare(path, case.images[0], geometry, image_geometry, errors, warnings)
    if image_geometry is not None and n_channels != len(spec.channels):
        errors.append(
            f"{case.images[0]}: case {case.id} has {n_channels} channel(s) but the dataset declares "
            f"{len(spec.channels)} ({', '.join(spec.channels)})"
        )
    values: set[int] = set()
    if case.label is None or image_geometry is None:
        return errors, warnings, values
    try:
        raw_geometry = read_header(case.label)
        label, label_geometry = read_label(case.label, reference=image_geometry)
    except AutosegError as exc:
        errors.append(str(exc))
        return errors, warnings, values
    if not raw_geometry.same_grid(image_geometry) and label_geometry.same_grid(image_geometry):
        warnings.append(
            f"{case.label}: stored in another orientation than {case.images[0].name} (same grid); "
            "it is mapped onto the image grid exactly (axis flip/permutation, no interpolation)"
        )
    else:
        _compare(case.label, case.images[0], label_geometry, image_geometry, errors, warnings)
    values = {int(v) for v in np.unique(label)}
    declared = set(spec.labels.values())
    undeclared = sorted(values - declared)
    if undeclared:
        errors.append(
            f"{case.label}: label value(s) {undeclared} are not declared in dataset.json (declared: {sorted(declared)})"
        )
    if values <= {0} | ({spec.ignore_label} if spec.ignore_label is not None else set()):
        warnings.append(f"{case.label}: no foreground (only background)")
    return errors, warnings, values


def _compare(path: Path, ref_path: Path, geo: Geometry, ref: Geometry, errors: list[str], warnings: list[str]) -> None:
    if geo.shape_zyx != ref.shape_zyx:
        errors.append(f"{path}: shape (z, y, x) {geo.shape_zyx} differs from {ref_path.name} {ref.shape_zyx}")
        return
    if not np.allclose(geo.spacing_zyx, ref.spacing_zyx, rtol=1e-3, atol=1e-4):
        errors.append(
            f"{path}: spacing (z, y, x) {_fmt(geo.spacing_zyx)} mm differs from {ref_path.name} "
            f"{_fmt(ref.spacing_zyx)} mm"
        )
    if not np.allclose(geo.origin_xyz, ref.origin_xyz, atol=ORIGIN_TOLERANCE_MM):
        warnings.append(f"{path}: origin {_fmt(geo.origin_xyz)} differs from {ref_path.name} {_fmt(ref.origin_xyz)}")
    if not np.allclose(geo.direction_xyz, ref.direction_xyz, atol=DIRECTION_TOLERANCE):
        warnings.append(
            f"{path}: direction {_fmt(geo.direction_xyz)} differs from {ref_path.name} {_fmt(ref.direction_xyz)}"
        )


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _check_declaration(spec: DatasetSpec, errors: list[str]) -> None:
    where = spec.root / "dataset.json" if spec.layout in ("nnunet", "msd") else spec.root
    values = sorted(v for v in spec.labels.values() if v != spec.ignore_label)
    if values and values != list(range(len(values))):
        errors.append(
            f"{where}: label values {values} are not consecutive (0, 1, 2, ...); renumber the label files "
            "so that the N classes use 0..N-1"
        )
    if 0 not in values:
        errors.append(f"{where}: no background label 0 declared")
    if spec.ignore_label is not None and values and spec.ignore_label != max(values) + 1:
        errors.append(
            f"{where}: the ignore label must be the highest value ({max(values) + 1}), not {spec.ignore_label}"
        )


def verify_dataset(
    root: Path | str, *, workers: int | None = None, progress: Callable[[int, int], None] | None = None
) -> VerifyReport:
    """Check a dataset folder and return every problem found (it raises only when ``root`` is not a dataset)."""
    root = Path(root)
    spec, problems = scan(root)
    report = VerifyReport(root=root, n_cases=len(spec.cases), notes=list(spec.notes))
    report.errors.extend(problems)
    _check_declaration(spec, report.errors)
    cases = list(spec.cases) + list(spec.test_cases)
    seen: set[int] = set()
    results: dict[str, tuple[list[str], list[str], set[int]]] = {}
    with worker_pool(max(1, min(workers or 2, len(cases) or 1))) as pool:
        futures = {
            pool.submit(_check_case, spec, c): c.id + ("" if i < len(spec.cases) else " (test)")
            for i, c in enumerate(cases)
        }
        for i, fut in enumerate(as_completed(futures)):
            results[futures[fut]] = fut.result()
            if progress:
                progress(i + 1, len(cases))
    for key in sorted(results):
        errors, warnings, values = results[key]
        report.errors.extend(errors)
        report.warnings.extend(warnings)
        seen |= values
    report.label_values = sorted(seen)
    return report
