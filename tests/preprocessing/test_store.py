"""On-disk store of preprocessed cases: memory-mapped arrays, properties, oversampling locations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoseg.errors import PreprocessingError
from autoseg.planning.plans import ResamplingSpec
from autoseg.preprocessing.store import (
    CaseProperties,
    case_done,
    list_cases,
    read_case,
    read_class_locations,
    read_properties,
    remove_case,
    sample_class_locations,
    write_case,
)
from tests.conftest import tiny_geometry


def _props(case_id: str = "case_00", plan_hash: str = "abc") -> CaseProperties:
    return CaseProperties(
        case_id=case_id,
        geometry=tiny_geometry(),
        transpose_forward=(0, 2, 1),
        transpose_backward=(0, 2, 1),
        original_spacing=(3.0, 0.8, 0.7),
        shape_before_crop=(7, 13, 11),
        crop_bbox=((1, 6), (0, 13), (2, 11)),
        shape_after_crop=(5, 13, 9),
        spacing=(3.0, 1.0, 1.0),
        shape_after_resampling=(5, 10, 6),
        resampling=ResamplingSpec(),
        class_locations={"1": 3},
        plan_hash=plan_hash,
        source_signature="sig",
    )


def _write(folder: Path, case_id: str = "case_00", plan_hash: str = "abc") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 5, 10, 6)).astype(np.float32)
    seg = rng.integers(0, 3, (1, 5, 10, 6)).astype(np.int8)
    write_case(folder, case_id, data, seg, _props(case_id, plan_hash), sample_class_locations(seg[0], [1, 2]))
    return data, seg


def test_case_round_trips_through_memory_maps(tmp_path: Path) -> None:
    data, seg = _write(tmp_path)
    image, label, props = read_case(tmp_path, "case_00")
    assert isinstance(image, np.memmap) and isinstance(label, np.memmap)
    assert image.dtype == np.float32 and label.dtype == np.int8
    assert np.array_equal(image, data)
    assert np.array_equal(label, seg[0])
    assert props == _props()


def test_properties_file_is_plain_json_that_round_trips(tmp_path: Path) -> None:
    _write(tmp_path)
    assert (tmp_path / "case_00.json").read_text().lstrip().startswith("{")
    assert read_properties(tmp_path, "case_00") == _props()


def test_a_case_without_its_json_is_not_done(tmp_path: Path) -> None:
    _write(tmp_path)
    assert case_done(tmp_path, "case_00", "abc", "sig")
    assert not case_done(tmp_path, "case_00", "other-plan", "sig")
    assert not case_done(tmp_path, "case_00", "abc", "changed-input")
    (tmp_path / "case_00.json").unlink()  # as if killed before the .json was written
    assert not case_done(tmp_path, "case_00", "abc", "sig")
    assert list_cases(tmp_path) == []
    with pytest.raises(PreprocessingError, match="not preprocessed"):
        read_case(tmp_path, "case_00")


def test_list_and_remove_cases(tmp_path: Path) -> None:
    _write(tmp_path, "b")
    _write(tmp_path, "a")
    assert list_cases(tmp_path) == ["a", "b"]
    remove_case(tmp_path, "a")
    assert list_cases(tmp_path) == ["b"]
    assert not any(p.name.startswith("a") for p in tmp_path.iterdir())


def test_class_locations_are_capped_seeded_and_on_the_class() -> None:
    rng = np.random.default_rng(1)
    seg = rng.integers(0, 3, (9, 40, 50)).astype(np.int8)
    seg[seg == 2] = 0
    seg[4, 10, 10] = 2
    locations = sample_class_locations(seg, [1, 2, 5], max_per_class=500)
    assert locations[1].shape == (500, 3) and locations[1].dtype == np.int32
    assert np.all(seg[tuple(locations[1].T)] == 1)
    assert locations[2].tolist() == [[4, 10, 10]]
    assert locations[5].shape == (0, 3)
    again = sample_class_locations(seg, [1, 2, 5], max_per_class=500)
    assert np.array_equal(again[1], locations[1])


def test_class_locations_round_trip_through_npz(tmp_path: Path) -> None:
    _, seg = _write(tmp_path)
    locations = read_class_locations(tmp_path, "case_00")
    assert sorted(locations) == [1, 2]
    for value, coords in locations.items():
        assert np.all(seg[0][tuple(coords.T)] == value)
        assert len(coords) == np.count_nonzero(seg[0] == value)
