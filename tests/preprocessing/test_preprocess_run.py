"""preprocess() over a dataset: stored layout, resuming, parallel workers, failures that name the case."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from autoseg.data.dataset import discover
from autoseg.data.dataset import load_case as load_raw_case
from autoseg.data.io import read_image, write_image
from autoseg.data.synth import make_dataset
from autoseg.errors import ConfigError, PreprocessingError
from autoseg.preprocessing import list_cases, load_case, preprocess, preprocessed_folder, read_class_locations, revert
from autoseg.preprocessing.preprocess import auto_workers, estimate_case_bytes, plan_hash
from autoseg.preprocessing.store import read_store_info
from autoseg.runfolder import record_dataset
from tests.conftest import write_nnunet_dataset
from tests.preprocessing.test_plans_fixture import CT_NORM, ct_plans, make_configuration, make_plans

LABELS = {"background": 0, "a": 1, "b": 2}


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder with hand-built plans, and a tiny 3-case CT dataset."""
    data = write_nnunet_dataset(tmp_path / "data", n_cases=3, labels=LABELS)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ct_plans((3.0, 1.0, 1.0), labels=LABELS).save(run_dir / "plans.json")
    return run_dir, data


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json") if p.name != "preprocessing.json"}


def test_writes_every_case_and_the_loader_reads_it(run) -> None:
    run_dir, data = run
    calls = []
    done = preprocess(run_dir, data_dir=data, workers=1, progress=lambda i, n: calls.append((i, n)))
    assert done == ["case_00", "case_01", "case_02"]
    assert calls == [(1, 3), (2, 3), (3, 3)]
    folder = preprocessed_folder(run_dir, "3d_fullres")
    assert folder == run_dir / "preprocessed" / "autoseg_3d_fullres"
    assert list_cases(folder) == done
    image, label, props = load_case(run_dir, "3d_fullres", "case_01")
    assert image.dtype == np.float32 and image.shape[1:] == label.shape == props.shape_after_resampling
    assert np.issubdtype(label.dtype, np.integer)
    assert props.case_id == "case_01" and props.plan_hash == plan_hash(
        ct_plans((3.0, 1.0, 1.0), labels=LABELS), "3d_fullres"
    )
    locations = read_class_locations(folder, "case_01")
    assert sorted(locations) == [1, 2]
    assert props.class_locations == {str(k): len(v) for k, v in locations.items()}
    info = read_store_info(folder)
    assert info.plan_hash == props.plan_hash and info.configurations == ("3d_fullres",)
    assert json.loads((folder / "preprocessing.json").read_text())["fields"]["spacing"] == [3.0, 1.0, 1.0]


def test_rerun_skips_finished_cases_and_redoes_a_missing_one(run) -> None:
    run_dir, data = run
    preprocess(run_dir, data_dir=data, workers=1)
    folder = preprocessed_folder(run_dir, "3d_fullres")
    before = _mtimes(folder)
    assert preprocess(run_dir, data_dir=data, workers=1) == []
    (folder / "case_01.json").unlink()  # killed while writing case_01: its arrays may exist, its .json not
    assert preprocess(run_dir, data_dir=data, workers=1) == ["case_01"]
    after = _mtimes(folder)
    assert after["case_00.json"] == before["case_00.json"] and after["case_02.json"] == before["case_02.json"]


def test_a_changed_plan_redoes_every_case(run) -> None:
    run_dir, data = run
    preprocess(run_dir, data_dir=data, workers=1)
    ct_plans((3.0, 0.9, 0.9), labels=LABELS).save(run_dir / "plans.json")
    assert preprocess(run_dir, data_dir=data, workers=1) == ["case_00", "case_01", "case_02"]


def test_a_changed_input_file_redoes_that_case(run) -> None:
    run_dir, data = run
    preprocess(run_dir, data_dir=data, workers=1)
    path = data / "imagesTr" / "case_02_0000.nii.gz"
    image, geometry = read_image(path)
    write_image(image[0] + 1, geometry, path)
    assert preprocess(run_dir, data_dir=data, workers=1) == ["case_02"]


def test_parallel_workers_store_the_same_arrays(run, tmp_path: Path) -> None:
    run_dir, data = run
    preprocess(run_dir, data_dir=data, workers=2)
    other = tmp_path / "run1"
    other.mkdir()
    (other / "plans.json").write_bytes((run_dir / "plans.json").read_bytes())
    preprocess(other, data_dir=data, workers=1)
    for case_id in ("case_00", "case_01", "case_02"):
        a, b = load_case(run_dir, "3d_fullres", case_id), load_case(other, "3d_fullres", case_id)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_case_is_named_and_finished_cases_stay_valid(run, tmp_path: Path, workers: int) -> None:
    run_dir, _ = run
    data = write_nnunet_dataset(tmp_path / "nrrd", n_cases=3, labels=LABELS, ending=".nrrd")  # NIfTI reads NaN as 0
    path = data / "imagesTr" / "case_02_0000.nrrd"
    image, geometry = read_image(path)
    image = image.astype(np.float32)
    image[0, 3, 4, 5] = np.nan
    write_image(image[0], geometry, path)
    with pytest.raises(PreprocessingError, match="case_02.*NaN"):
        preprocess(run_dir, data_dir=data, workers=workers)
    folder = preprocessed_folder(run_dir, "3d_fullres")
    assert "case_02" not in list_cases(folder)
    if workers == 1:
        assert list_cases(folder) == ["case_00", "case_01"]
    for case_id in list_cases(folder):
        assert load_case(run_dir, "3d_fullres", case_id)[2].case_id == case_id


def test_configurations_sharing_an_identifier_must_agree(run) -> None:
    run_dir, data = run
    plans = make_plans(
        [
            make_configuration("3d_fullres", (3.0, 1.0, 1.0), [CT_NORM], data_identifier="shared"),
            make_configuration("3d_lowres", (3.0, 2.0, 2.0), [CT_NORM], data_identifier="shared"),
        ],
        labels=LABELS,
    )
    plans.save(run_dir / "plans.json")
    with pytest.raises(PreprocessingError, match="share data_identifier 'shared'"):
        preprocess(run_dir, data_dir=data, workers=1)


def test_several_configurations_in_one_pass(run) -> None:
    run_dir, data = run
    plans = make_plans(
        [make_configuration("3d_fullres", (3.0, 1.0, 1.0), [CT_NORM]), make_configuration("2d", (1.4, 1.4), [CT_NORM])],
        labels=LABELS,
    )
    plans.save(run_dir / "plans.json")
    assert preprocess(run_dir, data_dir=data, workers=1) == ["case_00", "case_01", "case_02"]
    image, _, props = load_case(run_dir, "2d", "case_00")
    assert props.spacing[0] == pytest.approx(3.0) and image.shape[1] == 7
    assert preprocess(run_dir, data_dir=data, configurations=["2d"], workers=1) == []


def test_data_dir_defaults_to_the_one_recorded_in_the_run_folder(run) -> None:
    run_dir, data = run
    with pytest.raises(ConfigError, match="run.json"):
        preprocess(run_dir)
    record_dataset(run_dir, data)
    assert preprocess(run_dir, workers=1) == ["case_00", "case_01", "case_02"]


def test_worker_count_respects_cores_cases_and_memory(run) -> None:
    run_dir, data = run
    spec = discover(data)
    workers = auto_workers(run_dir, spec, ct_plans(labels=LABELS), ["3d_fullres"])
    assert 1 <= workers <= len(spec.cases)
    assert estimate_case_bytes(10**8, 1, 1.0) > estimate_case_bytes(10**6, 1, 1.0) > 10**6


def test_synthetic_ct_round_trip_to_the_input_grid(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ct", "ct3d", 2, test_cases=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    plans = ct_plans((3.0, 0.8, 0.8))
    plans = replace(
        plans, configurations={"3d_fullres": replace(plans.configurations["3d_fullres"], data_identifier="fullres")}
    )
    plans.save(run_dir / "plans.json")
    preprocess(run_dir, data_dir=data, workers=1)
    spec = discover(data)
    for case in spec.cases:
        _, label, geometry = load_raw_case(spec, case)
        _, seg, props = load_case(run_dir, "3d_fullres", case.id)
        back = revert(np.asarray(seg), props, is_label=True)
        assert props.geometry == geometry
        assert back.shape == label.shape
        assert np.mean(back == label) > 0.99


def test_synthetic_mr_is_z_scored_inside_the_body(tmp_path: Path) -> None:
    """The planner's MR normalisation (z-score in the non-zero mask) keeps every channel alive (about unit spread)."""
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.planning.planner import make_plans

    data = make_dataset(tmp_path / "data", "mr3d", cases=2, test_cases=0, seed=1)
    run_dir = tmp_path / "run"
    record_dataset(run_dir, data)
    fingerprint = extract_fingerprint(data, run_dir / "fingerprint.json", workers=1)
    plans = make_plans(fingerprint, device="cpu", check_speed=False, cpu_flops=5e7)
    plans.save(run_dir / "plans.json")
    schemes = plans.configurations["3d_fullres"].normalization
    assert [(s.scheme, s.use_mask) for s in schemes] == [("zscore", True)] * 2
    preprocess(run_dir, configurations=["3d_fullres"], workers=1)
    for case_id in list_cases(preprocessed_folder(run_dir, "3d_fullres")):
        image, _, _ = load_case(run_dir, "3d_fullres", case_id)
        for channel in image:
            inside = channel != 0
            assert inside.mean() > 0.2
            assert 0.6 < float(channel[inside].std()) < 1.4  # unit spread before resampling smooths the noise
