"""End to end on CPU: synthetic data -> fingerprint -> plan -> preprocess -> train -> select -> predict -> evaluate."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.data.io import read_header, read_label
from autoseg.data.synth import make_dataset
from autoseg.errors import InferenceError
from autoseg.evaluation.evaluate import evaluate_folders
from autoseg.export.bundle import open_bundle
from autoseg.export.report import collect_report_data, write_report
from autoseg.fingerprint import extract_fingerprint
from autoseg.inference.predict import predict_path
from autoseg.pipeline import run_pipeline
from autoseg.planning.planner import make_plans
from autoseg.runfolder import record_dataset
from tests.conftest import TINY, shared_data
from tests.export.test_report import check_in_chromium, check_page


def test_run_trains_every_fold_and_selects(trained):
    data, run = trained
    for config in ("3d_fullres", "2d"):
        for fold in range(5):
            folder = run / "models" / config / f"fold_{fold}"
            assert (folder / "checkpoint_final.pt").is_file()
            assert (folder / "validation" / "summary.json").is_file()
    selection = json.loads((run / "selection.json").read_text())
    assert set(selection["candidates"]) == {"3d_fullres", "2d", "2d+3d_fullres"}
    assert selection["best"] in selection["candidates"]
    assert -1 <= selection["difference_to_runner_up"]["mean"] <= 1


def test_run_searches_between_planning_and_training(trained):
    from autoseg.planning.plans import load_plans
    from autoseg.training.checkpoint import config_from_checkpoint, load_checkpoint

    data, run = trained
    plans = load_plans(run)
    assert plans.search is not None and plans.search["n_complete"] + plans.search["n_pruned"] >= 1
    name = plans.search["configuration"]
    assert (run / "search" / "history.png").is_file() and (run / "search" / "importances.png").is_file()
    trained_with = config_from_checkpoint(load_checkpoint(run / "models" / name / "fold_1" / "checkpoint_final.pt"))
    assert trained_with["patch_size"] == list(plans.configurations[name].patch_size)
    assert trained_with["training"]["learning_rate"] == pytest.approx(plans.configurations[name].training.learning_rate)


def test_run_again_does_nothing(trained, caplog):
    data, run = trained
    before = (run / "models" / "2d" / "fold_0" / "checkpoint_final.pt").stat().st_mtime_ns
    run_pipeline(data, run, device="cpu", configs=["3d_fullres", "2d"], workers=1)
    assert (run / "models" / "2d" / "fold_0" / "checkpoint_final.pt").stat().st_mtime_ns == before


def test_predict_keeps_geometry_and_evaluates(trained, tmp_path):
    data, run = trained
    out = tmp_path / "pred"
    written = predict_path(
        run,
        data / "imagesTs",
        out,
        device="cpu",
        uncertainty=True,
        save_probabilities=True,
        configs=["3d_fullres", "2d"],
        folds=["0"],
        mirror_mode="single",
    )
    assert [p.name for p in written] == ["case_005.nii.gz", "case_006.nii.gz"]
    for path in written:
        image_geo = read_header(data / "imagesTs" / path.name.replace(".nii.gz", "_0000.nii.gz"))
        assert read_header(path).same_grid(image_geo, atol=1e-6)
        assert (out / path.name.replace(".nii.gz", "_entropy.nii.gz")).is_file()
        probs = np.load(out / path.name.replace(".nii.gz", ".npz"))["probabilities"]
        assert probs.shape == (4, *image_geo.shape_zyx)
        labels, _ = read_label(path)
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
    scores = json.loads((out / "uncertainty.json").read_text())
    assert set(scores) == {"case_005", "case_006"} and "mean_disagreement_foreground" in scores["case_005"]
    summary = evaluate_folders(out, data / "labelsTs", workers=1)
    assert len(summary.cases) == 2
    # --continue skips finished cases
    mtime = written[0].stat().st_mtime_ns
    assert (
        main(["predict", "-m", str(run), "-i", str(data / "imagesTs"), "-o", str(out), "--continue", "--device", "cpu"])
        == 0
    )
    assert written[0].stat().st_mtime_ns == mtime


def test_bf16_prediction_agrees_with_fp32(trained, tmp_path):
    """The CPU's bf16 forward pass (what --precision auto picks where bf16 is native) gives the fp32 labels."""
    data, run = trained
    for precision in ("fp32", "bf16"):
        args = ["predict", "-m", str(run), "-i", str(data / "imagesTs"), "-o", str(tmp_path / precision)]
        args += ["--configs", "3d_fullres", "--folds", "0", "--no-tta", "--device", "cpu", "--precision", precision]
        assert main([*args, "--checkpoint", "latest"]) == 0
    for path in sorted((tmp_path / "fp32").glob("*.nii.gz")):
        a, _ = read_label(path)
        b, _ = read_label(tmp_path / "bf16" / path.name)
        assert (a == b).mean() > 0.99


@pytest.mark.parametrize("source", ["nrrd", "mr"])
def test_predictions_have_the_exact_geometry_of_real_scans(trained, tmp_path, source):
    _, run = trained
    if source == "nrrd":
        image = shared_data("pyradiomics", "brain1_image.nrrd")
    else:
        image = shared_data("totalseg_mr", "example_mr_sm.nii.gz")
    written = predict_path(run, image, tmp_path, device="cpu", mirror_mode="none", configs=["2d"], folds=["0"])
    assert len(written) == 1
    _assert_same_geometry(read_header(written[0]), read_header(image))


def _assert_same_geometry(got, expected):
    assert got.shape_zyx == expected.shape_zyx
    np.testing.assert_allclose(got.spacing_zyx, expected.spacing_zyx, rtol=1e-6)
    np.testing.assert_allclose(got.origin_xyz, expected.origin_xyz, atol=1e-4)
    np.testing.assert_allclose(got.direction_xyz, expected.direction_xyz, atol=1e-6)


def test_dicom_series_in_dicom_seg_out(trained, tmp_path):
    """A DICOM series gives <case>.dcm by default: a DICOM-SEG referencing the series, one segment per class,
    holding the labels that --output-format nifti writes in the series' exact geometry. The series is 4 contiguous
    slices of the real CT (to keep the test short); the whole series' round trip is in tests/data/test_dicom_seg.py."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from autoseg.data.dicom_seg import read_dicom_seg
    from autoseg.data.io import dicom_series_files
    from autoseg.planning.plans import load_plans

    data, run = trained
    series = tmp_path / "ct"
    series.mkdir()
    for f in dicom_series_files(shared_data("totalseg_dicom", "example_ct_dicom"))[8:12]:
        shutil.copy(f, series / f.name)
    common = ["-m", str(run), "-i", str(series), "--configs", "2d", "--folds", "0", "--no-tta", "--device", "cpu"]
    assert main(["predict", *common, "-o", str(tmp_path / "seg")]) == 0
    assert main(["predict", *common, "-o", str(tmp_path / "nii"), "--output-format", "nifti"]) == 0
    assert [p.name for p in (tmp_path / "seg").iterdir()] == ["ct.dcm"]
    nifti, nifti_geometry = read_label(tmp_path / "nii" / "ct.nii.gz")
    _assert_same_geometry(nifti_geometry, read_header(series))
    plans = load_plans(run)
    labels, geometry = read_dicom_seg(tmp_path / "seg" / "ct.dcm", series, label_values=plans.labels)
    _assert_same_geometry(geometry, nifti_geometry)
    np.testing.assert_array_equal(labels, nifti)
    seg = pydicom.dcmread(tmp_path / "seg" / "ct.dcm", stop_before_pixels=True)
    names = [name for name, value in sorted(plans.labels.items(), key=lambda kv: kv[1]) if value]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == names
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.iterdir()]
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert {str(item.ReferencedSOPInstanceUID) for item in referenced} == {
        str(ds.file_meta.MediaStorageSOPInstanceUID) for ds in headers
    }
    with pytest.raises(InferenceError, match="DICOM-SEG output needs DICOM series input"):
        predict_path(run, data / "imagesTs", tmp_path / "refused", device="cpu", output_format="dicom-seg")


def test_a_budget_for_one_model_trains_it_on_all_cases(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", "ct3d", cases=4, test_cases=1, seed=6)
    run = tmp_path / "run"
    record_dataset(run, data)
    fp = extract_fingerprint(data, run / "fingerprint.json", workers=1)
    plans = make_plans(fp, device="cpu", check_speed=False, cpu_flops=5e7, time_budget_hours=0.001, overrides=TINY)
    assert not plans.cross_validation and list(plans.configurations) == ["3d_fullres"]
    plans.save(run / "plans.json")
    assert main(["run", str(data), "-o", str(run), "--device", "cpu", "-j", "1"]) == 0  # nothing to select from
    shown = capsys.readouterr()
    assert "trained; predict with" in shown.out and f"report: {run / 'report.html'}" in shown.out
    for stage in ("preprocess", "train (jobs)"):  # a progress bar per stage (the fingerprint was made above)
        assert f"{stage}: 100%" in shown.err, shown.err[-2000:]
    assert (run / "models" / "3d_fullres" / "fold_all" / "checkpoint_final.pt").is_file()
    assert not (run / "models" / "3d_fullres" / "fold_0").exists()
    page = check_page(run / "report.html")  # autoseg run writes it, also without cross-validation
    assert page.missing["cross-validation"] == [
        "the plan trains one model on all cases (small time budget): no cross-validation"
    ]
    assert "training" not in page.missing and any(s == "training" for s, _ in page.images)
    assert main(["select", str(run)]) == 0 and not (run / "selection.json").exists()
    written = predict_path(run, data / "imagesTs", tmp_path / "pred", device="cpu")
    assert (
        len(written) == 1
        and read_header(written[0]).shape_zyx == read_header(next((data / "imagesTs").iterdir())).shape_zyx
    )


def test_resume_summary_says_where_a_run_resumes(tmp_path):
    from autoseg.pipeline import resume_summary

    assert resume_summary(tmp_path) is None
    (tmp_path / "fingerprint.json").write_text("{}")
    assert "planning next" in resume_summary(tmp_path)
    (tmp_path / "plans.json").write_text("{}")
    store = tmp_path / "preprocessed" / "3d_fullres"
    store.mkdir(parents=True)
    for case in ("a", "b"):
        (store / f"{case}.json").write_text("{}")
        (store / f"{case}.npy").write_bytes(b"")
    (store / "c.json").write_text("{}")  # interrupted: no array yet
    done = tmp_path / "models" / "3d_fullres" / "fold_0"
    partial = tmp_path / "models" / "3d_fullres" / "fold_1"
    for folder in (done, partial):
        folder.mkdir(parents=True)
    (done / "checkpoint_final.pt").write_bytes(b"")
    (partial / "checkpoint_latest.pt").write_bytes(b"")
    (partial / "log.jsonl").write_text("{}\n{}\n{}\n")
    assert resume_summary(tmp_path) == (
        "done: fingerprint; plan; preprocessed 3d_fullres (2 cases); 1 fold(s) trained (3d_fullres fold_0); "
        "resuming 3d_fullres fold_1 at epoch 3"
    )


def test_exported_bundle_predicts_like_the_run_and_holds_no_patient_data(trained, tmp_path, monkeypatch):
    data, run = trained
    bundle = tmp_path / "ship" / "model.autoseg"
    assert main(["export", str(run), "-o", str(bundle)]) == 0
    with zipfile.ZipFile(bundle) as archive:
        names = archive.namelist()
        blobs = {name: archive.read(name) for name in names}
    assert {"manifest.json", "plans.json", "selection.json", "training_data.json"} <= set(names)
    assert not any(n.endswith((".nii.gz", ".npz", ".npy", "splits.json", "fingerprint.json")) for n in names)
    case_ids = sorted({p.name.split("_0000")[0] for p in (data / "imagesTr").glob("*_0000.nii.gz")})
    assert case_ids
    for name, blob in blobs.items():  # no case id, file path or folder name of the run or its data in any file
        for secret in [*case_ids, str(run), str(data), data.parent.name]:
            assert secret.encode() not in blob, f"{name} contains {secret!r}"
    manifest = json.loads(blobs["manifest.json"])
    assert manifest["members"] and set(manifest["files"]) == set(names) - {"manifest.json"}

    monkeypatch.setenv("AUTOSEG_CACHE", str(tmp_path / "cache"))  # a machine that never unpacked it
    common = ["-i", str(data / "imagesTs"), "--device", "cpu", "--mirror", "none"]
    assert main(["predict", "-m", str(run), "-o", str(tmp_path / "from_run"), *common]) == 0
    assert main(["predict", "-m", str(bundle), "-o", str(tmp_path / "from_bundle"), *common]) == 0
    for path in sorted((tmp_path / "from_run").glob("*.nii.gz")):
        expected, geometry = read_label(path)
        got, got_geometry = read_label(tmp_path / "from_bundle" / path.name)
        np.testing.assert_array_equal(got, expected)
        assert got_geometry.same_grid(geometry, atol=0)

    damaged = tmp_path / "damaged.autoseg"
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(damaged, "w") as dst:
        for name in src.namelist():
            blob = src.read(name)
            dst.writestr(name, blob[:-1] + bytes([blob[-1] ^ 1]) if name == "plans.json" else blob)
    with pytest.raises(InferenceError, match="plans.json does not match its checksum"):
        open_bundle(damaged, tmp_path / "cache2")


def test_run_writes_a_report_that_a_browser_shows(trained):
    """The report of the trained run: every section filled, intervals agreeing with the selection's means, the
    worst cases drawn; Chromium loads it without an error and decodes every image."""
    from autoseg.inference.selection import load_selection

    data, run = trained
    page = check_page(run / "report.html")
    # the cascade (3d_lowres, 3d_cascade_fullres) planned, not trained; no analysis
    assert set(page.missing) == {"training", "analysis"}, page.missing
    assert page.missing["training"] == ["planned but not trained: 3d_lowres, 3d_cascade_fullres"]
    shown = [section for section, _ in page.images]
    assert shown.count("training") == 2 and shown.count("worst-cases") == 3 and "cross-validation" in shown
    assert shown.count("plan") == 2  # the search's history and importances
    selection = load_selection(run)
    assert f"Chosen: {selection.best}" in page.sections["cross-validation"]
    report = collect_report_data(run)
    chosen = next(cv for cv in report.cross_validation if cv.name == selection.best)
    assert sorted(c.case for c in chosen.cases) == [f"case_{i:03d}" for i in range(5)]
    for key, mean in selection.per_class_dice[selection.best].items():
        interval = chosen.intervals[key]
        assert interval.mean == pytest.approx(mean) and interval.low <= interval.mean <= interval.high
    worst = sorted(chosen.cases, key=chosen.case_dice)[0].case
    assert report.worst[0].case == worst and f"{worst}: mean Dice" in page.sections["worst-cases"]
    images = check_in_chromium(run / "report.html")
    assert len(images) == len(page.images)


def test_report_without_selection_merges_the_folds_validation_results(trained, tmp_path):
    _, run = trained
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("run.json", "fingerprint.json", "plans.json", "splits.json"):
        shutil.copy(run / name, copy / name)
    (copy / "references").symlink_to(run / "references")
    for fold in sorted((run / "models" / "2d").glob("fold_*")):
        target = copy / "models" / "2d" / fold.name
        target.mkdir(parents=True)
        shutil.copy(fold / "log.jsonl", target)
        if fold.name != "fold_4":  # a fold still training
            (target / "validation").symlink_to(fold / "validation")
    report = collect_report_data(copy)
    assert [(cv.name, cv.folds_missing, len(cv.cases)) for cv in report.cross_validation] == [("2d", ("fold_4",), 4)]
    assert len(report.worst) == 3 and all(w.image is not None for w in report.worst)
    page = check_page(write_report(copy))
    assert any("autoseg select" in t for t in page.missing["cross-validation"])
    assert "fold_4 without validation results yet" in " ".join(page.missing["cross-validation"])
