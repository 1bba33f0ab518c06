"""The nnU-Net presets reproduce nnU-Net v2's real plans, configuration by configuration, from real fingerprints.

Every ``fingerprints/`` entry with a fingerprint and recorded nnU-Net decisions is planned with the matching preset;
each configuration in nnU-Net's file must exist in ours with the same spacing, patch, batch, topology, features,
normalisation and mask use. Fields a person edited in nnU-Net's file (documented in the entry's caveats) are skipped
with the reason.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from autoseg.errors import PlanningError
from autoseg.fingerprint import ChannelFingerprint, IntensityStats
from autoseg.fingerprint_import import CorpusEntry, fingerprint_from_plans, load_corpus_entry
from autoseg.planning import rules
from autoseg.planning.nnunet import (
    PRESETS,
    compare_with_nnunet,
    network_for_topology,
    plan_nnunet,
)
from autoseg.planning.plans import load_plans
from autoseg.planning.topology import conv_feature_map_voxels, pool_and_conv_props

CORPUS = Path(__file__).resolve().parents[2] / "fingerprints"
COMPARED = (
    "spacing",
    "patch_size",
    "batch_size",
    "n_stages",
    "strides",
    "kernel_sizes",
    "features_per_stage",
    "normalization_schemes",
    "use_mask_for_norm",
    "n_conv_per_stage",
    "n_conv_per_stage_decoder",
    "batch_dice",
    "median_image_size",
    "network_class",
    "previous_stage",
    "inherits_from",
)


def _corpus_cases() -> list[tuple[str, str, str]]:
    """(entry file stem, preset, configuration) for every planned configuration in nnU-Net's files."""
    out = []
    for path in sorted(CORPUS.glob("*.json")):
        raw = json.loads(path.read_text())
        if raw["fingerprint"] is None:
            continue
        for preset, dec in raw["nnunet_decisions"].items():
            out.extend((path.stem, preset, name) for name in dec["configurations"])
    return out


@cache
def _entry(stem: str) -> CorpusEntry:
    return load_corpus_entry(CORPUS / f"{stem}.json")


@cache
def _plan(stem: str, preset: str):
    fingerprint = _entry(stem).fingerprint
    assert fingerprint is not None
    return plan_nnunet(fingerprint, preset)


def _hand_edited(entry: CorpusEntry, preset: str, config: str) -> list[str]:
    return list(entry.caveats.get("hand_edited", {}).get(preset, {}).get(config, []))


CASES = _corpus_cases()


def test_the_corpus_has_nnunet_decisions_to_check():
    assert len(CASES) >= 40


@pytest.mark.parametrize(("stem", "preset", "config"), CASES, ids=["/".join(c) for c in CASES])
def test_configuration_matches_nnunet(stem, preset, config):
    entry = _entry(stem)
    theirs = entry.nnunet_decisions[preset].configurations[config]
    edited = _hand_edited(entry, preset, config)
    ours = _plan(stem, preset).configurations.get(config)
    if ours is None:
        assert edited, f"nnU-Net made {config} but we did not"
        pytest.skip(f"{config} in nnU-Net's file was {'; '.join(edited)} ({entry.caveats.get('notes', '')})")
    diff = compare_with_nnunet(ours, theirs)
    assert set(diff) <= set(COMPARED)
    assert {k: v for k, v in diff.items() if k not in edited} == {}
    if diff:
        pytest.skip(
            f"{sorted(diff)} edited by hand in nnU-Net's file: ours {[v[0] for v in diff.values()]}, "
            f"theirs {[v[1] for v in diff.values()]}"
        )


@pytest.mark.parametrize(("stem", "preset"), sorted({(s, p) for s, p, _ in CASES}))
def test_same_configurations_as_nnunet(stem, preset):
    entry = _entry(stem)
    theirs = set(entry.nnunet_decisions[preset].configurations)
    ours = set(_plan(stem, preset).configurations)
    edited = set(entry.caveats.get("hand_edited", {}).get(preset, {}))
    assert ours - edited == theirs - edited
    plans_decisions = entry.nnunet_decisions[preset]
    plans = _plan(stem, preset)
    assert plans.transpose_forward == plans_decisions.transpose_forward
    assert plans.transpose_backward == plans_decisions.transpose_backward
    assert plans.original_median_spacing == plans_decisions.original_median_spacing_after_transp
    assert np.allclose(plans.original_median_shape, plans_decisions.original_median_shape_after_transp, atol=0.5)


@pytest.mark.parametrize(
    "stem", sorted(p.stem for p in CORPUS.glob("*.json") if json.loads(p.read_text())["caveats"].get("plans_only"))
)
def test_plans_only_2d_entries_match_from_their_median(stem):
    """2D plans depend only on the median image, the case count and the label count: rebuild them from those."""
    entry = _entry(stem)
    caveats, decisions = entry.caveats, entry.nnunet_decisions["nnunet"]
    n_cases = caveats.get("n_cases") or 400
    fingerprint = fingerprint_from_plans(decisions, n_cases=n_cases, n_labels=caveats.get("n_labels", 2))
    plans = plan_nnunet(fingerprint, "nnunet")
    assert list(plans.configurations) == ["2d"]
    diff = compare_with_nnunet(plans.configurations["2d"], decisions.configurations["2d"])
    if caveats.get("n_cases") is None:
        diff.pop("batch_size", None)  # the 5% cap needs numTraining, which this entry does not record
    assert diff == {}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_plans_round_trip_through_json(tmp_path, preset):
    plans = _plan("Dataset003_Liver", preset)
    plans.save(tmp_path / "plans.json")
    assert load_plans(tmp_path) == plans


def test_every_configuration_says_why():
    for config in _plan("Dataset009_Spleen", "nnunet").configurations.values():
        assert len(config.why) >= 5
        assert all(isinstance(w, str) and w for w in config.why)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(PlanningError, match="nnunet-resenc-l"):
        plan_nnunet(_entry("Dataset002_Heart").fingerprint, "nnunet-xl")


def test_more_gpu_memory_gives_a_larger_patch_or_batch():
    small = _plan("Dataset002_Heart", "nnunet").configurations["3d_fullres"]
    big = plan_nnunet(_entry("Dataset002_Heart").fingerprint, "nnunet", gpu_memory_gb=24).configurations["3d_fullres"]
    assert np.prod(big.patch_size) * big.batch_size > np.prod(small.patch_size) * small.batch_size
    assert big.estimated_memory_bytes > small.estimated_memory_bytes


# nnU-Net's own compute_conv_feature_map_size (dynamic_network_architectures 0.4.4, deep supervision off as in the
# planner) for networks from get_pool_and_conv_props: spacing, patch, residual?, classes -> value
PROXY_FACTS = [
    ((1.5, 0.5, 1.0), (135, 129, 108), False, 4, 969333120),
    ((1.0, 3.0, 0.8), (134, 40, 77), True, 2, 169128000),
    ((3.0, 1.5), (90, 67), False, 2, 3578880),
    ((0.5, 1.0), (135, 130), True, 6, 18961920),
    ((1.5, 1.5), (165, 25), True, 5, 3060288),
]


@pytest.mark.parametrize(("spacing", "patch", "residual", "classes", "expected"), PROXY_FACTS)
def test_memory_proxy_equals_nnunets(spacing, patch, residual, classes, expected):
    topo = pool_and_conv_props(spacing, patch)
    net = network_for_topology(topo, PRESETS["nnunet-resenc-m" if residual else "nnunet"])
    assert conv_feature_map_voxels(net, topo.patch_size, classes) == expected


# --- shared rules (autoseg.planning.rules) ---------------------------------------------------------------------


def test_thick_slices_use_the_10th_percentile_of_the_slice_spacing():
    spacings = np.array([[5.0, 0.8, 0.8]] * 8 + [[1.5, 0.8, 0.8]] * 2)
    shapes = np.array([[40, 512, 512]] * 10)
    decision = rules.target_spacing(spacings, shapes)
    assert decision.value == (1.5, 0.8, 0.8)
    assert "10th percentile" in decision.why


def test_thick_but_long_axis_keeps_the_median():
    spacings = np.array([[5.0, 0.8, 0.8]] * 8 + [[1.5, 0.8, 0.8]] * 2)
    shapes = np.array([[400, 512, 512]] * 10)  # not fewer than a third of the in-plane voxels
    assert rules.target_spacing(spacings, shapes).value == (5.0, 0.8, 0.8)


def test_thick_axis_never_gets_finer_than_the_other_axes():
    spacings = np.array([[6.0, 1.0, 1.0]] * 8 + [[0.5, 1.0, 1.0]] * 2)
    shapes = np.array([[20, 300, 300]] * 10)
    assert rules.target_spacing(spacings, shapes).value == (1.0 + 1e-5, 1.0, 1.0)


def test_transpose_puts_the_coarsest_axis_first():
    decision = rules.transpose_for_spacing((0.7, 0.7, 3.0))
    assert decision.value == ((2, 0, 1), (1, 2, 0))


def test_normalisation_uses_ct_statistics_and_the_mask_rule():
    stats = IntensityStats(
        mean=50.0, std=20.0, median=45.0, min=-1000.0, max=2000.0, percentile_00_5=-100.0, percentile_99_5=300.0
    )
    channels = (ChannelFingerprint("CT", "ct", stats), ChannelFingerprint("T1", "zscore", None))
    cropped = rules.channel_normalization(channels, 0.5).value
    assert cropped[0].scheme == "ct" and cropped[0].clip == (-100.0, 300.0) and cropped[0].use_mask is False
    assert (cropped[0].mean, cropped[0].std) == (50.0, 20.0)
    assert cropped[1].scheme == "zscore" and cropped[1].use_mask is True
    assert rules.channel_normalization(channels, 0.75).value[1].use_mask is False


def test_lowres_spacing_coarsens_fine_axes_first():
    step = rules.increase_lowres_spacing(np.array([3.0, 1.0, 1.0]))
    assert step.tolist() == [3.0, 1.03, 1.03]
    assert rules.increase_lowres_spacing(np.array([2.0, 1.0, 1.0])).tolist() == [2.06, 1.03, 1.03]
