"""ONNX export: each network matches torch within 1e-4, and ``predict --engine onnxruntime`` gives torch's labels."""

from __future__ import annotations

import json
import sys
import zipfile

import numpy as np
import pytest
import torch

from autoseg.cli import main
from autoseg.data.io import read_label
from autoseg.errors import InferenceError
from autoseg.export import onnx as onnx_export
from autoseg.inference.engines import OnnxNetwork
from autoseg.inference.predict import predict_path
from autoseg.networks.builder import build_network
from autoseg.networks.spec import NetworkSpec
from autoseg.planning.plans import load_plans
from autoseg.training.trainer import TrainOptions, train_fold
from tests.training.test_trainer import make_tiny_run

SPEC_3D = NetworkSpec(
    3, (4, 8, 16), ((1, 3, 3), (3, 3, 3), (3, 3, 3)), ((1, 1, 1), (1, 2, 2), (2, 2, 2)), (1, 1, 1), (1, 1)
)
SPEC_2D = NetworkSpec(
    3, (4, 8, 12), ((3, 3), (3, 3), (3, 3)), ((1, 1), (2, 2), (2, 2)), (1, 2, 1), (1, 1), block="residual"
)


@pytest.fixture(scope="module", autouse=True)
def onnx_extra() -> None:
    """Skip (a failure in CI, which installs it) without the onnx extra."""
    for package in ("onnx", "onnxruntime"):
        pytest.importorskip(package, reason=f"needs {package}, of the onnx extra (pip install 'autoseg[onnx]')")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_tiny_run(tmp_path_factory.mktemp("onnx"), cases=2, epochs=1)
    train_fold(run, "3d_fullres", "all", options=TrainOptions(device="cpu", workers=0))
    return run


def _configuration(run, spec: NetworkSpec, patch):
    import dataclasses

    c = load_plans(run).configurations["3d_fullres"]
    return dataclasses.replace(c, network=spec, patch_size=tuple(patch))


@pytest.mark.parametrize(
    ("spec", "patch", "other"),
    [(SPEC_3D, (4, 12, 16), (6, 20, 8)), (SPEC_2D, (12, 20), (24, 8))],
    ids=["3d_plain", "2d_residual"],
)
def test_random_weight_network_exports_within_tolerance(run, spec, patch, other):
    torch.manual_seed(0)
    network = build_network(spec, 2, 3)  # deep supervision on, as in training
    assert network.deep_supervision
    c = _configuration(run, spec, patch)
    data, check = onnx_export.export_network(network, c, 2, 3, metadata={"fold": "x"})
    assert network.deep_supervision  # the caller's module is left as it was
    assert check.max_abs_diff < 1e-4 and check.max_abs_logit > 0.01
    assert [s[0] for s in check.shapes] == [1, 2, 1] and len({s[2:] for s in check.shapes}) == 2
    runner = OnnxNetwork(data)
    assert len(runner.session.get_outputs()) == 1  # the full-resolution logits only
    meta = runner.session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["total_stride"]) == list(spec.total_stride)
    assert json.loads(meta["check"])["max_abs_diff"] == check.max_abs_diff and json.loads(meta["fold"]) == "x"
    x = torch.randn(3, 2, *other)  # batch and spatial sizes the export never saw (multiples of the stride)
    network.deep_supervision = False
    with torch.inference_mode():
        expected = network.eval()(x)
    got = runner(x)
    assert got.shape == (3, 3, *other) and float((got - expected).abs().max()) < 1e-4
    with pytest.raises(InferenceError, match="multiple of the total stride"):
        runner(torch.randn(1, 2, *[n + 1 for n in other]))


def test_an_export_that_differs_from_torch_fails_loudly(run, monkeypatch):
    class Off(OnnxNetwork):
        def __call__(self, x):
            return super().__call__(x) + 1e-3

    monkeypatch.setattr(onnx_export, "OnnxNetwork", Off)
    c = _configuration(run, SPEC_3D, (4, 12, 16))
    with pytest.raises(onnx_export.OnnxExportError, match="differs from torch by up to 0.001.*tolerance is 0.0001"):
        onnx_export.export_network(build_network(SPEC_3D, 1, 3), c, 1, 3, name="3d fold 0")


def test_onnxruntime_predicts_the_labels_of_torch(run, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSEG_CACHE", str(tmp_path / "cache"))
    plain, bundle = tmp_path / "plain.autoseg", tmp_path / "model.autoseg"
    assert main(["export", str(run), "-o", str(plain)]) == 0
    assert main(["export", str(plain), "--onnx", "-o", str(bundle)]) == 0  # ONNX added to a bundle
    with zipfile.ZipFile(bundle) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("manifest.json"))
    assert {"models/3d_fullres/fold_all/network.onnx", "models/3d_fullres/fold_all/checkpoint_final.pt"} <= names
    assert "training_data.json" in names  # carried over from the first bundle
    assert manifest["onnx"]["members"]["3d_fullres/fold_all"]["max_abs_diff"] < 1e-4
    images = run.parent / "data" / "imagesTr"
    common = ["-m", str(bundle), "-i", str(images), "--device", "cpu", "--mirror", "single", "--precision", "fp32"]
    common += ["--save-probabilities"]
    assert main(["predict", *common, "-o", str(tmp_path / "torch")]) == 0
    assert main(["predict", *common, "-o", str(tmp_path / "ort"), "--engine", "onnxruntime"]) == 0
    written = sorted((tmp_path / "torch").glob("*.nii.gz"))
    assert len(written) == 2
    for path in written:
        expected, geometry = read_label(path)
        got, got_geometry = read_label(tmp_path / "ort" / path.name)
        assert got_geometry.same_grid(geometry, atol=0)
        np.testing.assert_array_equal(got, expected)
        probabilities = [
            np.load(folder / path.name.replace(".nii.gz", ".npz"))["probabilities"]
            for folder in (tmp_path / "torch", tmp_path / "ort")
        ]
        np.testing.assert_allclose(*probabilities, atol=1e-3)  # float16 files

    with pytest.raises(InferenceError, match="ONNX file not found.*--onnx"):  # a run folder holds no ONNX export
        predict_path(run, images, tmp_path / "none", engine="onnxruntime")
    with pytest.raises(InferenceError, match="use --precision fp32"):
        predict_path(run, images, tmp_path / "none", engine="onnxruntime", precision="bf16")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's note that its TorchScript exporter is legacy
def test_clear_errors_for_a_foreign_onnx_file_and_a_missing_onnxruntime(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Conv3d(1, 2, 3), (torch.zeros(1, 1, 4, 4, 4),), foreign, dynamo=False)
    with pytest.raises(InferenceError, match="foreign.onnx: not an autoseg ONNX export"):
        OnnxNetwork(foreign)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(InferenceError, match="garbage.onnx: onnxruntime cannot load it"):
        OnnxNetwork(garbage)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(InferenceError, match=r"pip install 'autoseg\[onnx\]'"):
        OnnxNetwork(foreign)
