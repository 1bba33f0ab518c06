"""DICOM-SEG written for the real CT series of ../shared/data/totalseg_dicom, checked frame by frame by position,
and read back into the series' geometry."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from autoseg.data.io import dicom_series_files, read_image, read_label, to_sitk
from autoseg.errors import DatasetError
from tests.conftest import shared_data

pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

from autoseg.data.dicom_seg import read_dicom_seg, segment_codes, source_instances, write_dicom_seg  # noqa: E402


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The series, its geometry, the TotalSegmentator label map on the image grid, the class names and the SEG."""
    folder = shared_data("totalseg_dicom")
    series = folder / "example_ct_dicom"
    _, geometry = read_image(series)
    label, _ = read_label(folder / "example_seg_dicom.nii.gz", reference=geometry)  # stored y-flipped: mapped
    names = json.loads((folder / "class_names.json").read_text())["total"]
    label_values = {"background": 0, **{name: int(value) for value, name in names.items()}}
    path = tmp_path_factory.mktemp("seg") / "ct.dcm"
    write_dicom_seg(label, source_instances(series, geometry), path, label_values=label_values, version="9.8.7")
    return series, geometry, label, label_values, path


def _source_headers(series: Path) -> dict[str, pydicom.Dataset]:
    """SOP Instance UID (from the file meta header: the data sets' own are blank in this series) -> header."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_series_files(series)]
    return {str(ds.file_meta.MediaStorageSOPInstanceUID): ds for ds in headers}


def test_segment_codes_come_from_the_class_name_or_are_generic():
    category, kind = segment_codes("liver")
    assert (category.meaning, kind.value, kind.scheme_designator) == ("Anatomical Structure", "10200004", "SCT")
    category, kind = segment_codes("Lesion")
    assert (category.meaning, kind.meaning) == ("Morphologically Abnormal Structure", "Lesion")
    category, kind = segment_codes("kidney_cyst_left")  # no code of that name: generic Tissue / Tissue
    assert (category.value, kind.value) == ("85756007", "85756007")


def test_seg_references_the_source_series_and_names_every_class(written):
    series, _, _, label_values, path = written
    seg = pydicom.dcmread(path)
    sources = _source_headers(series)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    source = next(iter(sources.values()))
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert {str(item.ReferencedSOPInstanceUID) for item in referenced.ReferencedInstanceSequence} == set(sources)
    classes = {str(item.ReferencedSOPClassUID) for item in referenced.ReferencedInstanceSequence}
    assert classes == {source.file_meta.MediaStorageSOPClassUID} == {"1.2.840.10008.5.1.4.1.1.2"}  # CT Image Storage
    foreground = sorted((v, n) for n, v in label_values.items() if v)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [n for _, n in foreground]  # one per class, by value
    assert [s.SegmentNumber for s in seg.SegmentSequence] == list(range(1, len(foreground) + 1))
    liver = seg.SegmentSequence[[n for _, n in foreground].index("liver")]
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("autoseg", "9.8.7")
    # the series is anonymised (blank Study/Series Instance UIDs): the SEG gets derived ones, the same every run
    again = source_instances(series, written[1])[0]
    assert (seg.StudyInstanceUID, referenced.SeriesInstanceUID) == (again.StudyInstanceUID, again.SeriesInstanceUID)


def test_each_frame_holds_the_mask_of_the_slice_at_its_source_position(written):
    """Independent of the writer's mapping: a frame's referenced instance sits where the frame says, and its pixels
    are the label map's slice at that physical position (SimpleITK's index of it)."""
    series, geometry, label, label_values, path = written
    sources = _source_headers(series)
    files = sorted(dicom_series_files(series))
    instance_numbers = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in files]
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    assert np.all(np.diff(z) < 0) and np.all(np.diff(instance_numbers) > 0)  # names/numbers run against the z axis
    seg = pydicom.dcmread(path)
    frames = seg.pixel_array
    grid = to_sitk(np.zeros(geometry.shape_zyx, np.uint8), geometry)
    value_of_segment = {s.SegmentNumber: label_values[s.SegmentLabel] for s in seg.SegmentSequence}
    seen = set()
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[uid].ImagePositionPatient])
        x, y, k = grid.TransformPhysicalPointToIndex(position)
        assert (x, y) == (0, 0)
        value = value_of_segment[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        np.testing.assert_array_equal(frame, label[k] == value)
        seen.add((k, value))
    present = {(k, int(v)) for k in range(label.shape[0]) for v in np.unique(label[k]) if v}
    assert seen == present  # every non-empty (slice, class) has its frame, and only those


def test_round_trip_gives_the_same_label_map_in_the_series_geometry(written):
    series, geometry, label, label_values, path = written
    back, back_geometry = read_dicom_seg(path, series, label_values=label_values)
    assert back_geometry == geometry
    np.testing.assert_array_equal(back, label)
    numbers, _ = read_dicom_seg(path, series)  # without the class names: segment numbers
    foreground = sorted(v for v in label_values.values() if v)
    np.testing.assert_array_equal(numbers, np.where(label > 0, np.searchsorted(foreground, label) + 1, 0))


def test_instances_off_the_grid_are_refused_naming_the_file(written):
    series, geometry, *_ = written
    z = geometry.origin_xyz[2] + 0.5 * geometry.spacing_zyx[0]  # half a slice off
    with pytest.raises(DatasetError, match=r"CT\.[0-9.]+: position .* is \[0.0, 0.0, -?0.5\] voxels .* not on a slice"):
        source_instances(series, dataclasses.replace(geometry, origin_xyz=(*geometry.origin_xyz[:2], z)))
    flipped = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(DatasetError, match="orientation .* is not the series' axes"):
        source_instances(series, dataclasses.replace(geometry, direction_xyz=flipped))


def test_a_seg_of_another_frame_of_reference_or_unknown_class_or_no_seg_is_refused(written, tmp_path):
    series, geometry, label, label_values, path = written
    seg = pydicom.dcmread(path)
    seg.FrameOfReferenceUID = pydicom.uid.generate_uid()
    seg.save_as(tmp_path / "other.dcm")
    with pytest.raises(DatasetError, match="other.dcm: its Frame of Reference is not that of"):
        read_dicom_seg(tmp_path / "other.dcm", series)
    ct = dicom_series_files(series)[0]
    with pytest.raises(DatasetError, match=r"CT\.[0-9.]+: not a readable DICOM Segmentation \(Dataset is not a Seg"):
        read_dicom_seg(ct, series)
    with pytest.raises(DatasetError, match="segment 1 'spleen' is not one of the classes"):
        read_dicom_seg(path, series, label_values={"background": 0, "liver": 5})
    with pytest.raises(ValueError, match=r"label value\(s\) \[5, 6, 7, .* are not among the classes"):
        write_dicom_seg(label, [], tmp_path / "x.dcm", label_values={"background": 0, "a": 1})
