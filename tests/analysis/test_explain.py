"""Attribution maps: exact tile-by-tile integrated gradients, the model-randomisation sanity check (Adebayo et al.
2018), slice-by-slice 2D networks, and ``autoseg explain`` writing maps in the input's geometry."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from autoseg.analysis.explain import METHODS, Target, attribution_map, blurred_baseline
from autoseg.data.io import read_header, read_image
from autoseg.errors import ConfigError
from autoseg.inference.predictor import Predictor, probabilities_to_labels
from autoseg.inference.sliding_window import sliding_window_logits
from autoseg.preprocessing.preprocess import preprocess_case

pytest.importorskip("captum")  # the analysis extra


@pytest.fixture(scope="module")
def case(trained_run):
    """The trained members, a preprocessed crop around the organ (y smaller than the patch: padded) and the organ
    region the model predicts there."""
    predictor = Predictor(trained_run, device="cpu", mirror_mode="none")
    members = predictor.members["3d_fullres"]
    image, geometry = read_image(trained_run.parent / "data" / "imagesTr" / "case_000_0000.nii.gz")
    data, _, _ = preprocess_case(image, None, geometry, predictor.plans, "3d_fullres")
    mean, _ = predictor._config_probabilities(data, members)
    organ = probabilities_to_labels(mean, predictor.plans) == 1
    z, y, x = (int(np.mean(a)) for a in np.nonzero(organ))
    box = (slice(None), slice(max(0, z - 4), z + 4), slice(max(0, y - 5), y + 5), slice(max(0, x - 6), x + 6))
    networks = [(m.network, m.configuration.patch_size) for m in members]
    return networks, np.ascontiguousarray(data[box]), organ[box[1:]], predictor.plans.n_outputs


def test_integrated_gradients_sum_to_the_change_of_the_target(case):
    """Completeness: the tile-by-tile attributions add up to F(x) - F(baseline), F the organ logit of the whole
    sliding window summed over the region; a wrong tile weight or padding breaks the equality."""
    networks, data, region, n_outputs = case
    (network, patch), mask = networks[0], torch.from_numpy(region)
    a = attribution_map(networks, data, Target(1, region), "integrated_gradients", n_outputs=n_outputs, n_steps=8)
    assert a.shape == data.shape[1:] and region.any()

    def target(x: np.ndarray) -> float:
        return float(sliding_window_logits(network, x, patch, n_outputs, step=0.5)[1][mask].sum())

    change = target(data) - target(blurred_baseline(data, patch))
    assert abs(change) > 1
    assert a.sum() == pytest.approx(change, rel=0.03)


def _randomised(network: torch.nn.Module) -> torch.nn.Module:
    out = copy.deepcopy(network)
    torch.manual_seed(0)
    for module in out.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return out


@pytest.mark.parametrize("method", METHODS)
def test_maps_change_when_the_weights_are_reinitialised(case, method):
    """Model-randomisation sanity check: with the same target, the map of re-initialised weights ranks voxels
    differently from the trained model's (Spearman of |attribution| well below 1, which it would be for a map that
    shows the image rather than what the model learned)."""
    from scipy.stats import spearmanr

    networks, data, region, n_outputs = case
    options = {"n_outputs": n_outputs, "n_steps": 8, "window": (2, 5, 6)}
    trained = attribution_map(networks, data, Target(1, region), method, **options)
    random = attribution_map([(_randomised(n), p) for n, p in networks], data, Target(1, region), method, **options)
    assert np.abs(trained).sum() > 0 and np.abs(random).sum() > 0
    rho = spearmanr(np.abs(trained).ravel(), np.abs(random).ravel())[0]
    assert rho < 0.8, f"{method}: maps of trained and random weights correlate (Spearman {rho:.2f})"


def test_2d_network_on_a_3d_case_is_explained_slice_by_slice():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1))
    data = np.random.default_rng(0).normal(size=(1, 3, 10, 12)).astype(np.float32)
    region = np.zeros((3, 10, 12), bool)
    region[0, 2:6, 3:9] = region[2, 4:8, 1:5] = True
    volume = attribution_map([(network, (8, 8))], data, Target(2, region), "gradient_x_input", n_outputs=3)
    for z in range(3):
        alone = attribution_map([(network, (8, 8))], data[:, z], Target(2, region[z]), "gradient_x_input", n_outputs=3)
        np.testing.assert_allclose(volume[z], alone, atol=1e-6)
    assert not volume[1].any() and volume[0].any()  # no region in slice 1: nothing to explain there


def test_explain_writes_maps_in_the_input_geometry(trained_run, tmp_path, capsys):
    from autoseg.cli import main

    image = trained_run.parent / "data" / "imagesTr" / "case_001_0000.nii.gz"
    out = tmp_path / "explain"
    args = ["explain", "-m", str(trained_run), "-i", str(image), "-o", str(out), "--device", "cpu"]
    assert main([*args, "--class", "organ", "--method", "gradient_x_input"]) == 0
    nifti = out / "case_001_gradient_x_input_organ.nii.gz"
    assert read_header(nifti).same_grid(read_header(image))
    attribution, _ = read_image(nifti)
    assert np.abs(attribution).sum() > 0
    assert (out / "case_001_gradient_x_input_organ.png").stat().st_size > 1000
    summary = json.loads((out / "explain.json").read_text())["cases"]["case_001"]["organ"]
    assert summary["region_voxels"] > 0 and summary["slice"] == int(np.abs(attribution[0]).sum((1, 2)).argmax())
    assert "wrote 2 file(s)" in capsys.readouterr().out
    assert main([*args, "--class", "kidney"]) == 1
    assert "kidney: not a class of this model" in capsys.readouterr().err


def test_unknown_method_is_refused(case):
    networks, data, region, n_outputs = case
    with pytest.raises(ConfigError, match="unknown attribution method 'saliency'.*occlusion"):
        attribution_map(networks, data, Target(1, region), "saliency", n_outputs=n_outputs)
