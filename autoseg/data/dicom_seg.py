"""DICOM-SEG: a label map predicted for a DICOM series, written as a Segmentation object that references the
series, and read back into the series' geometry (highdicom; ``pip install 'autoseg[dicom]'``).

A label array is (Z, Y, X) in the geometry SimpleITK read the series in (:func:`autoseg.data.io.read_image`).
Slice ``k`` is matched to the source instance whose ImagePositionPatient lies ``k`` slices from the origin along
the slice normal, never by file name or file order, and every instance must fall on the grid (orientation,
in-plane origin, whole slice index), or the series is refused with the file at fault named.

Each foreground class is one segment (segment numbers 1..N in label value order, named after the class). Its
segmented property type is the SNOMED CT code of that name in the DICOM segmentation property type groups
(CID 7191-7198, e.g. ``liver`` -> 10200004 Liver, category Anatomical Structure), found by exact name, and
otherwise the generic Tissue/Tissue (SCT 85756007) that 3D Slicer gives a new segment. The segmentation is
BINARY and holds only non-empty frames (highdicom's default, as dcmqi writes them): OHIF, 3D Slicer and
highdicom read sparse segmentations, and an all-frames object is segments x slices frames, mostly zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.data.geometry import Geometry
from autoseg.data.io import dicom_series_files, read_header
from autoseg.data.labels import foreground_names, foreground_values
from autoseg.errors import AutosegError, DatasetError
from autoseg.files import atomic_path

__all__ = ["read_dicom_seg", "require_highdicom", "segment_codes", "source_instances", "write_dicom_seg"]

log = logging.getLogger(__name__)

#: An instance whose position is further than this (in voxels) from a grid position is refused.
POSITION_TOLERANCE_VOXELS = 0.1
#: Segmentation property type groups (PS3.16) and the category (CID 7150) of the types each holds.
_TYPE_GROUPS = {
    7192: "AnatomicalStructure",
    7194: "MorphologicallyAbnormalStructure",
    7191: "Tissue",
    7197: "BodySubstance",
    7193: "PhysicalObject",
    7195: "Function",
    7196: "SpatialAndRelationalConcept",
    7198: "Substance",
}


def require_highdicom() -> Any:
    """The highdicom module; AutosegError saying how to install it when it is missing."""
    try:
        import highdicom
    except ImportError:
        raise AutosegError(
            "DICOM-SEG needs highdicom: pip install 'autoseg[dicom]' (or write NIfTI: --output-format nifti)"
        ) from None
    return highdicom


def segment_codes(name: str) -> tuple[Any, Any]:
    """(segmented property category, segmented property type) for a class name, as pydicom ``Code`` values.

    ``liver`` and ``Urinary bladder`` find their SNOMED CT codes by exact name (words joined in CamelCase) in the
    segmentation property type groups; any other name gets the generic Tissue/Tissue (SCT 85756007).
    """
    from pydicom.sr.codedict import codes

    keyword = "".join(word[:1].upper() + word[1:] for word in name.replace("-", " ").replace("_", " ").split())
    for cid, category in _TYPE_GROUPS.items():
        group = getattr(codes, f"cid{cid}")
        if keyword in group.concepts:
            return getattr(codes.cid7150, category), getattr(group, keyword)
    return codes.cid7150.Tissue, codes.cid7150.Tissue


def source_instances(series: Path | str, geometry: Geometry) -> list[Any]:
    """The series' instance headers (pydicom datasets), ordered so that item ``k`` is array slice ``k``.

    Matched by position: ImagePositionPatient, projected on ``geometry``'s axes, must be (0, 0, k) voxels from
    its origin, and ImageOrientationPatient must be its x and y axes. SOP Instance/Class UIDs missing from an
    instance (some anonymisers blank them) are taken from its file meta header, where they are repeated.

    Raises DatasetError naming the file for an instance off the grid, a multi-frame instance, a missing Frame of
    Reference, and for slices that are missing or held twice.
    """
    require_highdicom()  # which brings pydicom
    import pydicom

    series = Path(series)
    direction = np.asarray(geometry.direction_xyz, float).reshape(3, 3)  # column j: direction of array axis j
    spacing_xyz = np.asarray(geometry.spacing_zyx[::-1], float)
    by_slice: dict[int, Any] = {}
    for path in dicom_series_files(series):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise DatasetError(f"{path}: a multi-frame instance; DICOM-SEG output supports single-frame series")
        if not ds.get("FrameOfReferenceUID"):
            raise DatasetError(f"{path}: no FrameOfReferenceUID, so a DICOM-SEG cannot be placed on it")
        for key in ("SOPInstanceUID", "SOPClassUID"):
            if not ds.get(key):
                if not ds.file_meta.get(f"MediaStorage{key}"):
                    raise DatasetError(f"{path}: no {key}, in the data set or its file meta header")
                setattr(ds, key, ds.file_meta.get(f"MediaStorage{key}"))
        orientation = np.asarray(ds.ImageOrientationPatient, float).reshape(2, 3)
        if not np.allclose(orientation, direction[:, :2].T, atol=1e-4):
            raise DatasetError(f"{path}: orientation {orientation.ravel().tolist()} is not the series' axes")
        if (int(ds.Rows), int(ds.Columns)) != tuple(geometry.shape_zyx[1:]):
            raise DatasetError(f"{path}: {ds.Rows} x {ds.Columns} pixels, the series has {geometry.shape_zyx[1:]}")
        offset = np.asarray(ds.ImagePositionPatient, float) - np.asarray(geometry.origin_xyz, float)
        index = direction.T @ offset / spacing_xyz  # voxels along x, y, z
        k = int(np.rint(index[2]))
        if np.abs(index - [0, 0, k]).max() > POSITION_TOLERANCE_VOXELS or not 0 <= k < geometry.shape_zyx[0]:
            position = [float(v) for v in ds.ImagePositionPatient]
            raise DatasetError(
                f"{path}: position {position} mm is {np.round(index, 2).tolist()} voxels (x, y, z) from the series' "
                "origin, not on a slice of its grid"
            )
        if k in by_slice:
            raise DatasetError(f"{path}: slice {k} is also held by {by_slice[k].filename}")
        ds.filename = str(path)
        by_slice[k] = ds
    missing = sorted(set(range(geometry.shape_zyx[0])) - set(by_slice))
    if missing:
        raise DatasetError(f"{series}: no instance for slice(s) {missing[:10]} of {geometry.shape_zyx[0]}")
    ordered = [by_slice[k] for k in range(geometry.shape_zyx[0])]
    _fill_series_uids(series, ordered)
    return ordered


def _fill_series_uids(series: Path, instances: Sequence[Any]) -> None:
    """Blank Study/Series Instance UIDs (anonymised series) get UIDs derived from the instances' UIDs, the same
    on every run, so that the SEG can be written; a PACS will not file it with the original study."""
    from pydicom.uid import generate_uid

    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        if all(ds.get(key) for ds in instances):
            continue
        uid = generate_uid(entropy_srcs=[key, *(str(ds.SOPInstanceUID) for ds in instances)])  # pydicom's root
        log.warning("%s: the series has no %s (anonymised?); the DICOM-SEG refers to a derived one", series, key)
        for ds in instances:
            setattr(ds, key, uid)


def write_dicom_seg(
    prediction: np.ndarray,
    sources: Sequence[Any],
    path: Path | str,
    *,
    label_values: Mapping[str, int],
    ignore_label: int | None = None,
    version: str = "unknown",
) -> None:
    """Write a (Z, Y, X) label map as a BINARY DICOM-SEG object referencing ``sources``, atomically.

    Parameters
    ----------
    prediction : (Z, Y, X) integer labels, slice ``k`` on ``sources[k]`` (see :func:`source_instances`).
    sources : the series' instance headers in array order.
    label_values : class name -> label value (dataset.json ``labels``); one segment per foreground class,
        numbered 1..N in label value order, even when the class is absent from ``prediction``.
    version : autoseg's version, recorded as the algorithm's and the software's.
    """
    hd = require_highdicom()
    from pydicom.sr.codedict import codes

    values = foreground_values(label_values, ignore_label)
    names = foreground_names(label_values, ignore_label)
    unknown = sorted(set(np.unique(prediction).tolist()) - {0, *values})
    if unknown:
        raise ValueError(f"label value(s) {unknown[:10]} are not among the classes {dict(zip(names, values))}")
    if prediction.shape[0] != len(sources):
        raise ValueError(f"{prediction.shape[0]} slices but {len(sources)} source instances")
    lookup = np.zeros(max(values, default=0) + 1, np.uint8 if len(values) < 256 else np.uint16)
    lookup[list(values)] = np.arange(1, len(values) + 1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="autoseg", family=codes.cid7162.ArtificialIntelligence, version=version
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, (name, (category, kind)) in enumerate(zip(names, map(segment_codes, names)), start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=lookup[prediction],  # a label map of segment numbers: highdicom splits it into binary segments
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="autoseg",
        manufacturer_model_name="autoseg",
        software_versions=version,
        device_serial_number="none",
        content_label="AUTOSEG",
        content_description="autoseg prediction",
        series_description="autoseg segmentation",
        omit_empty_frames=True,
    )
    atomic_path(Path(path), lambda tmp: seg.save_as(tmp))


def read_dicom_seg(
    path: Path | str, series: Path | str, *, label_values: Mapping[str, int] | None = None
) -> tuple[np.ndarray, Geometry]:
    """Read a DICOM-SEG of ``series`` as a (Z, Y, X) label map in the series' geometry (as read by SimpleITK).

    Frames are placed through the source instances they reference, each at its position in the series. Segment
    ``n`` becomes ``label_values[its label]`` when ``label_values`` (class name -> value) is given, else ``n``.
    Raises DatasetError when the file is not a segmentation of ``series`` or a segment label is not a class.
    """
    hd = require_highdicom()
    path, series = Path(path), Path(series)
    from pydicom.errors import InvalidDicomError

    try:
        seg = hd.seg.segread(path)
    except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
        raise DatasetError(f"{path}: not a readable DICOM Segmentation ({exc})") from None
    lookup = np.arange(max(seg.segment_numbers, default=0) + 1)
    if label_values is not None:
        for number in seg.segment_numbers:
            name = seg.get_segment_description(number).segment_label
            if name not in label_values:
                classes = sorted(label_values)
                raise DatasetError(f"{path}: segment {number} '{name}' is not one of the classes {classes}")
            lookup[number] = label_values[name]
    geometry = read_header(series)
    sources = source_instances(series, geometry)
    if seg.FrameOfReferenceUID != sources[0].FrameOfReferenceUID:
        raise DatasetError(f"{path}: its Frame of Reference is not that of {series}")
    try:
        pixels = seg.get_pixels_by_source_instance(
            [str(ds.SOPInstanceUID) for ds in sources], combine_segments=True, dtype=np.uint16
        )
    except (ValueError, KeyError, RuntimeError) as exc:
        raise DatasetError(f"{path}: does not segment the instances of {series} ({exc})") from None
    labels = lookup[pixels]
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.int32), geometry
