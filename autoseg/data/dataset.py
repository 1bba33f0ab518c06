"""Dataset discovery: nnU-Net v2 layout, Medical Segmentation Decathlon layout, and plain folders of pairs.

:func:`scan` understands a folder and lists what is wrong with its file set (missing channels or labels, extra
labels); :func:`discover` does the same but raises when anything is wrong. Reading voxels is left to
:func:`load_case` and to :mod:`autoseg.data.verify`.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from autoseg.data.geometry import Geometry
from autoseg.data.io import (
    IMAGE_ENDINGS,
    file_ending,
    is_dicom_series,
    read_channel_count,
    read_image,
    read_images,
    read_label,
    strip_ending,
)
from autoseg.data.labels import foreground_values
from autoseg.errors import DatasetError, ImageReadError

__all__ = ["Case", "DatasetSpec", "scan", "discover", "load_case", "is_ct_channel", "channel_files"]

log = logging.getLogger(__name__)

Layout = Literal["nnunet", "msd", "pairs", "folders"]


@dataclass(frozen=True)
class Case:
    """One training or test case: its channel files (or one multi-channel file) and label file."""

    id: str
    images: tuple[Path, ...]
    label: Path | None = None
    group: str | None = None  # patient key: cases of one group stay in one cross-validation fold


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset folder holds.

    ``labels`` maps names to the integer values stored in label files (background included). Region-based
    datasets (nnU-Net's overlapping regions) also fill ``regions`` (name -> label values the region unites) and
    ``region_class_order``. ``notes`` records what was inferred rather than read from a dataset.json.
    """

    name: str
    root: Path
    layout: Layout
    channels: tuple[str, ...]
    labels: dict[str, int]
    file_ending: str
    cases: tuple[Case, ...]
    test_cases: tuple[Case, ...] = ()
    regions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    region_class_order: tuple[int, ...] = ()
    ignore_label: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def label_values(self) -> tuple[int, ...]:
        """Sorted label values that may occur, the ignore label excluded."""
        return tuple(sorted(v for v in self.labels.values() if v != self.ignore_label))

    @property
    def foreground_values(self) -> tuple[int, ...]:
        """Label values of the classes to segment (background and the ignore label excluded)."""
        return foreground_values(self.labels, self.ignore_label)

    def label_name(self, value: int) -> str:
        for name, v in self.labels.items():
            if v == value:
                return name
        return f"label_{value}"


def is_ct_channel(name: str) -> bool:
    """True when a channel name says CT (nnU-Net convention: 'CT', case-insensitive)."""
    return name.strip().lower() in ("ct", "ct_hu", "hu")


_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def channel_files(case_id: str, files: Mapping[int, Path], n_channels: int, *, expected: str = "") -> tuple[Path, ...]:
    """The image files of one case in channel order, from its ``<case>_XXXX`` files keyed by channel number.

    A file usually holds one channel. As nnU-Net v2's natural-image reader allows, one file may also hold several
    (RGB PNG, multi-channel TIFF): when only files ``_0000`` .. ``_000k`` of the ``n_channels`` are present, their
    channel counts are read from the file headers and the files are accepted when the counts add up to
    ``n_channels``. Files numbered ``n_channels`` or higher are left to the caller.

    Parameters
    ----------
    case_id : the case, for messages.
    files : channel number -> file (or DICOM folder).
    n_channels : channels the dataset declares or the model expects.
    expected : who expects them, for messages (default "<n_channels> channel(s) are expected").

    Raises
    ------
    DatasetError
        Naming the missing channel files, or the files and their channel counts when these do not add up.
    """
    present = [c for c in range(n_channels) if c in files]
    if len(present) == n_channels:
        return tuple(files[c] for c in present)  # one file per channel: no header is read
    expected = expected or f"{n_channels} channel(s) are expected"
    first = next(iter(files.values()), None)
    ending = file_ending(first) if first is not None else ""
    missing = [c for c in range(n_channels) if c not in files]
    lacking = f"case {case_id}: missing channel file(s) " + ", ".join(f"{case_id}_{c:04d}{ending}" for c in missing)
    if not present or present != list(range(len(present))):
        raise DatasetError(f"{lacking}; {expected}")
    counts = [read_channel_count(files[c]) for c in present]
    if sum(counts) == n_channels:
        return tuple(files[c] for c in present)
    if max(counts) == 1:
        raise DatasetError(f"{lacking}; {expected}")
    held = ", ".join(f"{files[c]} holds {k}" for c, k in zip(present, counts))
    if len(counts) > 1:
        held += f": {sum(counts)}"
    hint = " (drop the alpha channel: save the image as RGB)" if counts == [n_channels + 1] else ""
    raise DatasetError(
        f"case {case_id}: {held} channel(s), but {expected}{hint}; give one file per channel "
        f"({case_id}_0000{ending} .. {case_id}_{n_channels - 1:04d}{ending}) or one file that holds all {n_channels}"
    )


def _list_images(folder: Path, ending: str | None = None) -> list[Path]:
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if (ending and p.name.endswith(ending)) or (not ending and (file_ending(p) or is_dicom_series(p))):
            out.append(p)
    return out


def _parse_labels(raw: Mapping[str, Any], where: Path) -> tuple[dict[str, int], dict[str, tuple[int, ...]], int | None]:
    labels: dict[str, int] = {}
    regions: dict[str, tuple[int, ...]] = {}
    ignore = None
    for name, value in raw.items():
        if isinstance(value, list):
            regions[name] = tuple(int(v) for v in value)
        elif isinstance(value, int) and not isinstance(value, bool):
            if name == "ignore":
                ignore = value
            else:
                labels[name] = value
        else:
            raise DatasetError(
                f"{where}: label {name!r} has value {value!r}; expected an integer or a list of integers"
            )
    if regions:  # region-based: label files hold the union of region values
        for v in sorted({v for vals in regions.values() for v in vals} | {0}):
            if v not in labels.values():
                labels[next((n for n, vs in regions.items() if vs == (v,)), f"label_{v}")] = v
        labels = dict(sorted(labels.items(), key=lambda kv: kv[1]))
    if ignore is not None:
        labels["ignore"] = ignore
    return labels, regions, ignore


def _scan_nnunet(root: Path, meta: dict, problems: list[str]) -> DatasetSpec:
    where = root / "dataset.json"
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise DatasetError(
                f"{where}: missing key {key!r} (nnU-Net v2 layout needs channel_names, labels, file_ending)"
            )
    ending = meta["file_ending"]
    channels = tuple(meta["channel_names"][k] for k in sorted(meta["channel_names"], key=int))
    labels, regions, ignore = _parse_labels(meta["labels"], where)
    if "dataset" in meta:
        cases = tuple(
            Case(
                cid,
                tuple(_resolve(root, p) for p in entry["images"]),
                _resolve(root, entry["label"]) if entry.get("label") else None,
            )
            for cid, entry in sorted(meta["dataset"].items())
        )
    else:
        cases = _cases_from_channel_files(root / "imagesTr", root / "labelsTr", ending, channels, problems)
    test_cases = _cases_from_channel_files(root / "imagesTs", None, ending, channels, problems)
    n = meta.get("numTraining")
    if n is not None and n != len(cases):
        problems.append(f"{where}: numTraining is {n} but {len(cases)} training cases were found")
    return DatasetSpec(
        name=meta.get("name", root.name),
        root=root,
        layout="nnunet",
        channels=channels,
        labels=labels,
        file_ending=ending,
        cases=cases,
        test_cases=test_cases,
        regions=regions,
        region_class_order=tuple(meta.get("regions_class_order", ())),
        ignore_label=ignore,
    )


def _resolve(root: Path, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else (root / path)


def _cases_from_channel_files(
    images_dir: Path, labels_dir: Path | None, ending: str, channels: tuple[str, ...], problems: list[str]
) -> tuple[Case, ...]:
    n_channels = len(channels)
    expected = f"dataset.json declares {n_channels} channel(s) ({', '.join(channels)})"
    by_case: dict[str, dict[int, Path]] = defaultdict(dict)
    for p in _list_images(images_dir, ending):
        m = _CHANNEL_FILE.match(p.name[: -len(ending)])
        if not m:
            problems.append(f"{p}: name does not end in _XXXX{ending} (channel number); file ignored")
            continue
        by_case[m["case"]][int(m["channel"])] = p
    cases = []
    for cid, chans in sorted(by_case.items()):
        try:
            images = channel_files(cid, chans, n_channels, expected=expected)
        except ImageReadError as exc:  # names the file already
            problems.append(str(exc))
            images = ()
        except DatasetError as exc:
            problems.append(f"{images_dir}: {exc}")
            images = ()
        extra = [c for c in chans if c >= n_channels]
        if extra:
            problems.append(f"{images_dir}/{cid}: channel file(s) {extra} beyond the {n_channels} declared channels")
        label = None
        if labels_dir is not None:
            label = labels_dir / f"{cid}{ending}"
            if not label.exists():
                problems.append(f"{label}: missing label file for case {cid}")
                label = None
        if images:
            cases.append(Case(cid, images, label))
    if labels_dir is not None:
        known = set(by_case)
        for p in _list_images(labels_dir, ending):
            if p.name[: -len(ending)] not in known:
                problems.append(f"{p}: label file without images (no {p.name[: -len(ending)]}_0000{ending})")
    return tuple(cases)


def _scan_msd(root: Path, meta: dict, problems: list[str]) -> DatasetSpec:
    where = root / "dataset.json"
    modality = meta.get("modality", {"0": "unknown"})
    channels = tuple(modality[k] for k in sorted(modality, key=int))
    labels = {name: int(v) for v, name in meta.get("labels", {}).items()}
    cases = []
    for entry in meta["training"]:
        image = _resolve(root, entry["image"])
        label = _resolve(root, entry["label"]) if entry.get("label") else None
        if not image.exists():
            problems.append(f"{image}: image listed in {where} does not exist")
            continue
        if label is not None and not label.exists():
            problems.append(f"{label}: label listed in {where} does not exist")
            label = None
        cases.append(Case(strip_ending(image), (image,), label))
    tests = []
    for entry in meta.get("test", []):
        image = _resolve(root, entry if isinstance(entry, str) else entry["image"])
        if image.exists():
            tests.append(Case(strip_ending(image), (image,)))
    ending = file_ending(cases[0].images[0]) if cases else ".nii.gz"
    return DatasetSpec(
        name=meta.get("name", root.name),
        root=root,
        layout="msd",
        channels=channels,
        labels=dict(sorted(labels.items(), key=lambda kv: kv[1])),
        file_ending=ending,
        cases=tuple(cases),
        test_cases=tuple(tests),
    )


def _scan_plain(root: Path, problems: list[str]) -> DatasetSpec:
    if (root / "images").is_dir() and (root / "labels").is_dir():
        layout: Layout = "folders"
        images = {strip_ending(p): p for p in _list_images(root / "images")}
        labels = {strip_ending(p): p for p in _list_images(root / "labels")}
    else:
        layout = "pairs"
        images, labels = {}, {}
        for p in _list_images(root):
            stem = strip_ending(p)
            if stem.endswith("_image"):
                images[stem[: -len("_image")]] = p
            elif stem.endswith("_label"):
                labels[stem[: -len("_label")]] = p
    if not images:
        raise DatasetError(
            f"{root}: no dataset found. Expected a dataset.json (nnU-Net v2 or Decathlon layout), images/ + labels/ "
            f"folders with equal names, or <case>_image.<ext> + <case>_label.<ext> pairs ({', '.join(IMAGE_ENDINGS)} "
            "or DICOM folders)"
        )
    for cid in sorted(set(labels) - set(images)):
        problems.append(f"{labels[cid]}: label file without an image")
    cases = []
    for cid, img in sorted(images.items()):
        if cid not in labels:
            problems.append(f"{img}: missing label file for case {cid}")
        cases.append(Case(cid, (img,), labels.get(cid)))
    first = cases[0].images[0]
    channels, label_map, notes = _infer_channels_and_labels(cases)
    ending = file_ending(first) or ".nii.gz"  # DICOM input: labels and predictions are written as NIfTI
    return DatasetSpec(
        name=root.name,
        root=root,
        layout=layout,
        channels=channels,
        labels=label_map,
        file_ending=ending,
        cases=tuple(cases),
        notes=notes,
    )


def _infer_channels_and_labels(cases: list[Case]) -> tuple[tuple[str, ...], dict[str, int], tuple[str, ...]]:
    first = cases[0].images[0]
    array, _ = read_image(first)
    # air at about -1000 HU is the tell-tale of CT; everything else is treated as MR-like
    looks_ct = array.shape[0] == 1 and float(array.min()) <= -500 and float(np.percentile(array, 99)) < 4000
    looks_rgb = array.shape[0] == 3 and array.dtype == np.uint8  # 8-bit colour (PNG, TIFF): divided by 255
    if looks_ct:
        channels: tuple[str, ...] = ("CT",)
    elif looks_rgb:
        channels = ("R", "G", "B")
    else:
        channels = tuple(f"channel_{c}" for c in range(array.shape[0]))
    values: set[int] = set()
    for case in cases:
        if case.label is not None:
            try:
                values |= {int(v) for v in np.unique(read_label(case.label)[0])}
            except DatasetError:
                pass  # verify reports unreadable labels
    values |= {0}
    labels = {("background" if v == 0 else f"label_{v}"): v for v in sorted(values)}
    notes = (
        f"no dataset.json: channel(s) inferred as {list(channels)} from {first.name}",
        f"no dataset.json: label values inferred from the label files: {sorted(values)}",
    )
    return channels, labels, notes


def scan(root: Path | str) -> tuple[DatasetSpec, list[str]]:
    """Understand the dataset folder ``root``; return its spec and a list of file-set problems (may be empty)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    problems: list[str] = []
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{meta_path}: not valid JSON ({exc})") from None
        if "channel_names" in meta:
            spec = _scan_nnunet(root, meta, problems)
        elif "training" in meta and "modality" in meta:
            spec = _scan_msd(root, meta, problems)
        else:
            raise DatasetError(
                f"{meta_path}: neither nnU-Net v2 (channel_names, labels, file_ending) nor Decathlon "
                "(modality, labels, training) layout"
            )
    else:
        spec = _scan_plain(root, problems)
    if not spec.cases:
        problems.append(f"{root}: no training cases found")
    for note in spec.notes:
        log.info(note)
    return spec, problems


def discover(root: Path | str) -> DatasetSpec:
    """Like :func:`scan` but raise DatasetError listing every problem when the file set is incomplete."""
    spec, problems = scan(root)
    if problems:
        raise DatasetError("dataset problems:\n  " + "\n  ".join(problems) + "\nrun `autoseg verify` for a full check")
    return spec


def load_case(spec: DatasetSpec, case: Case) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Read one case: image (C, Z, Y, X) float32, label (Z, Y, X) integer or None, and the image geometry.

    The label is mapped exactly onto the image grid when stored in another orientation of the same grid.
    Raises DatasetError when the channel count or the label grid does not match the image.
    """
    image, geometry = read_images(case.images)
    if image.shape[0] != len(spec.channels):
        raise DatasetError(
            f"{case.images[0]}: {image.shape[0]} channel(s), but the dataset declares "
            f"{len(spec.channels)} ({', '.join(spec.channels)})"
        )
    if case.label is None:
        return image, None, geometry
    label, label_geometry = read_label(case.label, reference=geometry)
    if label_geometry.shape_zyx != geometry.shape_zyx:
        raise DatasetError(
            f"{case.label}: shape {label_geometry.shape_zyx} differs from the image's "
            f"{geometry.shape_zyx} ({case.images[0]})"
        )
    return image, label, geometry
