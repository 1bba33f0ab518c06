"""Hand-built plans for the preprocessing tests (the planner is tested on its own), and their round trip."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.planning.plans import (
    AugmentationSpec,
    ChannelNormalization,
    Configuration,
    DeviceSpec,
    NetworkSpec,
    Plans,
    ResamplingSpec,
    load_plans,
)

CT_NORM = ChannelNormalization("ct", clip=(-1000.0, 700.0), mean=80.0, std=150.0)


def _network(ndim: int) -> NetworkSpec:
    k = (3,) * ndim
    return NetworkSpec(
        n_stages=2,
        features_per_stage=(8, 16),
        kernel_sizes=(k, k),
        strides=((1,) * ndim, (2,) * ndim),
        n_conv_per_stage=(1, 1),
        n_conv_per_stage_decoder=(1,),
    )


def make_configuration(
    name: str,
    spacing: Sequence[float],
    normalization: Sequence[ChannelNormalization],
    *,
    resampling: ResamplingSpec | None = None,
    data_identifier: str = "",
) -> Configuration:
    ndim = len(spacing)
    return Configuration(
        name=name,
        spacing=tuple(float(s) for s in spacing),
        patch_size=(16,) * ndim,
        batch_size=2,
        median_image_size=(16.0,) * ndim,
        normalization=tuple(normalization),
        network=_network(ndim),
        augmentation=AugmentationSpec(mirror_axes=tuple(range(ndim))),
        resampling=resampling or ResamplingSpec(),
        data_identifier=data_identifier or f"autoseg_{name}",
    )


def make_plans(
    configurations: Sequence[Configuration],
    *,
    channels: Sequence[str] = ("CT",),
    labels: dict[str, int] | None = None,
    transpose_forward: Sequence[int] = (0, 1, 2),
) -> Plans:
    forward = tuple(int(a) for a in transpose_forward)
    return Plans(
        dataset_name="test",
        planner="hand",
        device=DeviceSpec("cpu", 1 << 30),
        channels=tuple(channels),
        labels=labels or {"background": 0, "organ": 1, "lesion": 2, "bone": 3},
        transpose_forward=forward,
        transpose_backward=tuple(int(a) for a in np.argsort(forward)),
        original_median_spacing=(3.0, 0.8, 0.8),
        original_median_shape=(26.0, 90.0, 90.0),
        configurations={c.name: c for c in configurations},
    )


def ct_plans(spacing: Sequence[float] = (3.0, 0.8, 0.8), **kwargs) -> Plans:
    """Plans with one 3D configuration ``3d_fullres`` for the synthetic CT."""
    return make_plans([make_configuration("3d_fullres", spacing, [CT_NORM])], **kwargs)


def test_hand_built_plans_round_trip(tmp_path: Path) -> None:
    plans = make_plans(
        [make_configuration("3d_fullres", (3.0, 0.8, 0.8), [CT_NORM]), make_configuration("2d", (0.8, 0.8), [CT_NORM])],
        transpose_forward=(2, 0, 1),
    )
    plans.save(tmp_path / "plans.json")
    assert load_plans(tmp_path) == plans
    assert plans.transpose_backward == (1, 2, 0)
