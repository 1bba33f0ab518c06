"""Bad input at prediction time: each bad case is named with its problem, the others are still predicted, the command
exits non-zero with a summary; an unwritable output folder or a full disk stops with a clear error and leaves no
partial file."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.cli import main
from autoseg.data.io import dicom_series_files, read_image, read_label, write_image
from autoseg.errors import InferenceError
from autoseg.inference.predict import PredictionFailed, predict_path
from autoseg.training.trainer import TrainOptions, train_fold
from tests.conftest import shared_data
from tests.data.colour import colour_case, write_png
from tests.training.test_trainer import make_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = make_tiny_run(tmp_path_factory.mktemp("bad_inputs"), cases=3, epochs=1)
    train_fold(run, "3d_fullres", "all", options=TrainOptions(device="cpu", workers=0))
    return run


def _good(run: Path) -> Path:
    return run.parent / "data" / "imagesTr" / "case_000_0000.nii.gz"


@pytest.fixture
def inputs(run, tmp_path) -> Path:
    """One good case and one case of every kind of bad input."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(_good(run), folder / "good_0000.nii.gz")
    image, geometry = read_image(_good(run))
    nan = image[0].astype(np.float32)
    nan[0, 0, :3] = np.nan
    write_image(nan, geometry, folder / "nan_0000.nrrd")  # (SimpleITK's NIfTI writer turns NaN into 0)
    two = sitk.GetImageFromArray(np.stack([image[0], image[0]], axis=-1), isVector=True)  # 2 channels in 1 file
    two.CopyInformation(sitk.ReadImage(str(_good(run))))
    sitk.WriteImage(two, str(folder / "twochannel_0000.nrrd"))
    (folder / "garbage_0000.nii.gz").write_bytes(b"not an image at all")
    write_png(colour_case(0)[1] * 100, folder / "flat_0000.png")  # a 2D image for a 3D model
    far = sitk.ReadImage(str(_good(run)))
    far.SetSpacing([s / 100 for s in far.GetSpacing()])  # 100x finer: a header in metres, say
    sitk.WriteImage(far, str(folder / "huge_0000.nii.gz"))
    return folder


def test_bad_cases_are_named_and_the_others_predicted(run, inputs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PredictionFailed) as info:
        predict_path(run, inputs, out, device="cpu", mirror_mode="none")
    problems = {f.case: f.problem for f in info.value.failures}
    assert set(problems) == {"nan", "twochannel", "garbage", "flat", "huge"}
    assert problems["nan"] == "3 voxel(s) are NaN or infinite"
    assert problems["twochannel"].startswith("2 channel(s), but the model expects 1")
    assert "cannot be read" in problems["garbage"] or "garbage_0000.nii.gz" in problems["garbage"]
    assert "2D image" in problems["flat"] and "trained on 3D volumes" in problems["flat"]
    assert "outside the training images' range" in problems["huge"] and "--any-spacing" in problems["huge"]
    assert [p.name for p in info.value.written] == ["good.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz"]
    message = str(info.value)
    assert message.startswith("5 of 6 case(s) could not be predicted (1 written)")
    assert str(inputs / "nan_0000.nrrd") in message


def test_cli_exits_non_zero_with_a_summary(run, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict", "-m", str(run), "-i", str(inputs), "-o", str(out), "--device", "cpu", "--no-tta"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "5 of 6 case(s) could not be predicted" in err and "huge_0000.nii.gz" in err
    assert (out / "good.nii.gz").is_file()
    # --any-spacing accepts the far-off spacing; the other bad cases still fail
    assert main([*args, "--any-spacing", "--continue"]) == 1
    assert "4 of 6 case(s)" in capsys.readouterr().err and (out / "huge.nii.gz").is_file()


def test_unwritable_output_folder_fails_before_any_work(run, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(InferenceError, match=r"a_file/out: output folder is not writable"):
        predict_path(run, _good(run), blocker / "out", device="cpu")


def test_full_disk_stops_with_the_file_named_and_no_partial_output(run, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(_good(run), folder / f"{name}_0000.nii.gz")
    write = sitk.WriteImage
    calls = []

    def fill_disk(image, path, *args, **kwargs):  # the second case's file is half written when the disk fills up
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\x00" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(image, path, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", fill_disk)
    out = tmp_path / "out"
    with pytest.raises(InferenceError, match=r"out/b.nii.gz: cannot write the prediction of case b \(No space left"):
        predict_path(run, folder, out, device="cpu", mirror_mode="none")
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz"]  # no temporary or partial file
    labels, _ = read_label(out / "a.nii.gz")
    assert labels.shape == read_image(_good(run))[0].shape[1:]


def test_a_dicom_series_off_its_grid_is_named_before_predicting(run, tmp_path):
    """DICOM-SEG output maps slices to instances by position: an instance off the grid fails its case, naming it."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    series = tmp_path / "ct"
    series.mkdir()
    files = dicom_series_files(shared_data("totalseg_dicom", "example_ct_dicom"))[:4]
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if i == 1:  # shifted half a pixel along x: SimpleITK still reads a series, but slice 1 is not on its grid
            ds.ImagePositionPatient[0] = float(ds.ImagePositionPatient[0]) + 0.5 * float(ds.PixelSpacing[1])
        ds.save_as(series / f.name)
    out = tmp_path / "out"
    with pytest.raises(PredictionFailed) as info:
        predict_path(run, series, out, device="cpu")
    (failure,) = info.value.failures
    assert failure.case == "ct" and f"{files[1].name}: position" in failure.problem
    assert "not on a slice of its grid" in failure.problem
    assert not list(out.iterdir())
