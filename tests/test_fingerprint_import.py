"""Importing nnU-Net fingerprints / plans and MONAI datastats into autoseg's types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoseg.errors import ConfigError
from autoseg.fingerprint import Fingerprint
from autoseg.fingerprint_import import (
    NNUNET_UNKNOWN,
    import_monai_datastats,
    import_nnunet_fingerprint,
    read_nnunet_plans,
)
from autoseg.serialization import from_jsonable, to_jsonable

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "nnunet"

STATS = {
    "max": 900.0,
    "mean": 100.0,
    "median": 90.0,
    "min": -50.0,
    "percentile_00_5": -10.0,
    "percentile_99_5": 500.0,
    "std": 40.0,
}


def _write(folder: Path, fingerprint: dict, dataset: dict) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder / "dataset_fingerprint.json", folder / "dataset.json"


def _nnunet_fingerprint(n: int = 3) -> dict:
    return {
        "foreground_intensity_properties_per_channel": {"0": STATS, "1": dict(STATS, mean=7.0)},
        "median_relative_size_after_cropping": 0.6,
        "shapes_after_crop": [[7 + i, 11, 13] for i in range(n)],
        "spacings": [[3.0 + i, 0.7, 0.8] for i in range(n)],
    }


def test_nnunet_fingerprint_keeps_zyx_order_and_lists_what_it_lacks(tmp_path):
    dataset = {
        "channel_names": {"0": "CT", "1": "T2"},
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": 3,
        "file_ending": ".nrrd",
    }
    fp = import_nnunet_fingerprint(*_write(tmp_path / "Dataset042_Tiny", _nnunet_fingerprint(), dataset))
    assert fp.dataset_name == "Dataset042_Tiny"
    assert fp.dim == 3 and fp.n_cases == 3
    assert fp.cases[1].spacing == (4.0, 0.7, 0.8)
    assert fp.cases[1].shape_after_crop == (8, 11, 13)
    assert fp.median_spacing == (4.0, 0.7, 0.8)
    assert fp.median_shape_after_crop == (8.0, 11.0, 13.0)
    assert fp.median_relative_size_after_cropping == 0.6
    assert [c.normalization_hint for c in fp.channels] == ["ct", "zscore"]
    assert fp.channels[0].foreground_intensity.percentile_99_5 == 500.0
    assert fp.channels[1].foreground_intensity.mean == 7.0
    assert [(c.label, c.name) for c in fp.classes] == [(1, "liver"), (2, "tumour")]
    assert fp.classes[0].voxel_fraction is None and fp.cases[0].crop_bbox is None and fp.cases[0].shape is None
    assert fp.unknown == NNUNET_UNKNOWN
    assert fp.file_ending == ".nrrd"
    assert fp.source == f"nnunet:{tmp_path / 'Dataset042_Tiny' / 'dataset_fingerprint.json'}"


def test_regions_and_ignore_label_are_kept(tmp_path):
    dataset = {
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3], "ignore": 4},
        "regions_class_order": [1, 2, 3],
        "numTraining": 3,
        "file_ending": ".nii.gz",
    }
    fingerprint = _nnunet_fingerprint()
    fingerprint["foreground_intensity_properties_per_channel"] = {"0": STATS}
    fp = import_nnunet_fingerprint(*_write(tmp_path / "d", fingerprint, dataset))
    assert fp.regions == {"whole": (1, 2, 3), "core": (2, 3), "enhancing": (3,)}
    assert fp.region_class_order == (1, 2, 3)
    assert fp.ignore_label == 4
    assert 4 not in [c.label for c in fp.classes]
    assert len(fp.classes) == 3


def test_2d_dataset_is_recognised(tmp_path):
    fingerprint = {
        "foreground_intensity_properties_per_channel": {"0": STATS},
        "median_relative_size_after_cropping": 1.0,
        "shapes_after_crop": [[1, 512, 480], [1, 500, 512]],
        "spacings": [[999.0, 1.0, 1.0]] * 2,
    }
    dataset = {"channel_names": {"0": "grey"}, "labels": {"background": 0, "vessel": 1}, "file_ending": ".png"}
    assert import_nnunet_fingerprint(*_write(tmp_path / "d", fingerprint, dataset)).dim == 2


def test_imported_fingerprint_round_trips_through_json(tmp_path):
    dataset = {"channel_names": {"0": "CT", "1": "T2"}, "labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}
    fp = import_nnunet_fingerprint(*_write(tmp_path / "d", _nnunet_fingerprint(), dataset))
    assert from_jsonable(Fingerprint, json.loads(json.dumps(to_jsonable(fp)))) == fp


def test_missing_key_names_the_file(tmp_path):
    fingerprint = _nnunet_fingerprint()
    del fingerprint["spacings"]
    paths = _write(tmp_path / "d", fingerprint, {"channel_names": {"0": "CT"}, "labels": {"background": 0}})
    with pytest.raises(ConfigError, match="dataset_fingerprint.json.*spacings"):
        import_nnunet_fingerprint(*paths)


def test_real_nnunet_fingerprint_if_present():
    folder = REFERENCE / "Dataset005_Prostate"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present (reference data lives in ../shared/reference beside the checkout)")
    fp = import_nnunet_fingerprint(folder / "dataset_fingerprint.json", folder / "dataset.json")
    assert fp.n_cases == 32
    assert fp.median_spacing[0] == pytest.approx(3.6, abs=1e-6)  # thick slices along z: array order kept
    assert [c.name for c in fp.channels] == ["T2", "ADC"]


PLAN_COMMON = {
    "data_identifier": "nnUNetPlans_3d_fullres",
    "preprocessor_name": "DefaultPreprocessor",
    "batch_size": 2,
    "patch_size": [20, 320, 256],
    "median_image_size_in_voxels": [20.0, 320.0, 319.0],
    "spacing": [3.6, 0.625, 0.625],
    "normalization_schemes": ["ZScoreNormalization"],
    "use_mask_for_norm": [False],
    "resampling_fn_data": "resample_data_or_seg_to_shape",
}
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
KERNELS = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]


def _plans(configuration: dict) -> dict:
    return {
        "dataset_name": "Dataset005_Prostate",
        "plans_name": "nnUNetPlans",
        "experiment_planner_used": "ExperimentPlanner",
        "original_median_spacing_after_transp": [3.6, 0.625, 0.625],
        "original_median_shape_after_transp": [20, 320, 319],
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": configuration,
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
    }


def test_current_and_legacy_plans_layouts_give_the_same_decisions(tmp_path):
    current = dict(
        PLAN_COMMON,
        batch_dice=False,
        architecture={
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": 3,
                "features_per_stage": [32, 64, 128],
                "kernel_sizes": KERNELS,
                "strides": STRIDES,
                "n_conv_per_stage": [2, 2, 2],
                "n_conv_per_stage_decoder": [2, 2],
            },
            "_kw_requires_import": [],
        },
    )
    legacy = dict(
        PLAN_COMMON,
        batch_dice=False,
        UNet_class_name="PlainConvUNet",
        UNet_base_num_features=32,
        n_conv_per_stage_encoder=[2, 2, 2],
        n_conv_per_stage_decoder=[2, 2],
        num_pool_per_axis=[1, 2, 2],
        pool_op_kernel_sizes=STRIDES,
        conv_kernel_sizes=KERNELS,
        unet_max_num_features=320,
    )
    (tmp_path / "a.json").write_text(json.dumps(_plans(current)))
    (tmp_path / "b.json").write_text(json.dumps(_plans(legacy)))
    a, b = read_nnunet_plans(tmp_path / "a.json"), read_nnunet_plans(tmp_path / "b.json")
    assert (a.layout, b.layout) == ("current", "legacy")
    assert a.configurations == b.configurations
    full = a.configurations["3d_fullres"]
    assert full.network_class == "PlainConvUNet" and full.features_per_stage == (32, 64, 128)
    assert full.strides == ((1, 1, 1), (1, 2, 2), (2, 2, 2)) and full.patch_size == (20, 320, 256)
    cascade = a.configurations["3d_cascade_fullres"]
    assert (cascade.inherits_from, cascade.previous_stage, cascade.patch_size) == ("3d_fullres", "3d_lowres", None)


def test_monai_datastats_are_reversed_to_zyx(tmp_path):
    yaml = pytest.importorskip("yaml")
    intensity = {
        "max": 900.0,
        "mean": 100.0,
        "median": 90.0,
        "min": -50.0,
        "stdev": 40.0,
        "percentile_00_5": -10.0,
        "percentile_99_5": 500.0,
    }

    def case(z: int) -> dict:
        return {
            "image_stats": {"shape": [[13, 11, z]], "cropped_shape": [[13, 10, z]], "spacing": [0.8, 0.7, 3.0]},
            "label_stats": {
                "labels": [0, 1],
                "label": [{"foreground_percentage": 0.9}, {"foreground_percentage": 0.1 if z > 7 else 0.0}],
            },
        }

    data = {"stats_summary": {"image_foreground_stats": {"intensity": intensity}}, "stats_by_cases": [case(7), case(9)]}
    path = tmp_path / "datastats_by_case.yaml"
    path.write_text(yaml.safe_dump(data))
    fp = import_monai_datastats(path, channel_names=("CT",))
    assert fp.cases[0].spacing == (3.0, 0.7, 0.8)
    assert fp.cases[0].shape == (7, 11, 13) and fp.cases[0].shape_after_crop == (7, 10, 13)
    assert fp.median_relative_size_after_cropping == pytest.approx(10 / 11)
    assert fp.classes[0].present_fraction == 0.5
    assert fp.channels[0].normalization_hint == "ct" and fp.channels[0].foreground_intensity.std == 40.0
    assert fp.source.startswith("monai:")
