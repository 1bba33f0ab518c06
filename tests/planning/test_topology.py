"""nnU-Net's pooling / kernel rule (autoseg.planning.topology): properties and decisions of real nnU-Net plans."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from autoseg.planning.topology import pad_to_multiple, pool_and_conv_props

MIN_SIZE = 4

spacing_values = st.sampled_from([0.4, 0.5, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0])
cases = st.integers(2, 3).flatmap(
    lambda dim: st.tuples(
        st.lists(spacing_values, min_size=dim, max_size=dim),
        st.lists(st.integers(1, 600), min_size=dim, max_size=dim),
    )
)


@settings(max_examples=200, deadline=None)
@given(cases)
def test_patch_is_padded_to_a_multiple_of_the_total_stride(case):
    spacing, patch = case
    topo = pool_and_conv_props(spacing, patch)
    total = [math.prod(s[a] for s in topo.strides) for a in range(len(patch))]
    assert tuple(total) == topo.divisor
    assert all(p % d == 0 for p, d in zip(topo.patch_size, topo.divisor))
    assert all(0 <= p - w < d for p, w, d in zip(topo.patch_size, patch, topo.divisor))


@settings(max_examples=200, deadline=None)
@given(cases)
def test_bottleneck_keeps_at_least_four_voxels_on_pooled_axes(case):
    spacing, patch = case
    topo = pool_and_conv_props(spacing, patch, min_feature_map_size=MIN_SIZE)
    for axis, pools in enumerate(topo.pools_per_axis):
        if pools:
            assert topo.bottleneck_size[axis] >= MIN_SIZE


@settings(max_examples=200, deadline=None)
@given(cases)
def test_pooling_only_on_axes_within_2x_of_the_finest_spacing(case):
    spacing, patch = case
    topo = pool_and_conv_props(spacing, patch, min_feature_map_size=MIN_SIZE)
    current, size = [float(s) for s in spacing], [float(p) for p in patch]
    for stride in topo.strides[1:]:
        eligible = [a for a in range(len(size)) if size[a] >= 2 * MIN_SIZE]
        finest = min(current[a] for a in eligible)
        for a, s in enumerate(stride):
            if s == 2:
                assert a in eligible
                assert current[a] / finest < 2
                current[a] *= 2
                size[a] = math.ceil(size[a] / 2)


@settings(max_examples=200, deadline=None)
@given(cases)
def test_kernels_start_thin_and_become_3_once_an_axis_catches_up(case):
    spacing, patch = case
    topo = pool_and_conv_props(spacing, patch)
    assert topo.strides[0] == (1,) * len(patch)
    assert len(topo.kernel_sizes) == topo.n_stages
    assert topo.kernel_sizes[-1] == (3,) * len(patch)
    for before, after in zip(topo.kernel_sizes, topo.kernel_sizes[1:]):
        assert all(b <= a for b, a in zip(before, after))  # once 3, always 3
    finest = min(spacing)
    first = topo.kernel_sizes[0]
    assert all(k == (3 if s / finest < 2 else 1) for k, s in zip(first, spacing)) or topo.n_stages == 1


def test_prostate_thick_slices_match_nnunet_plans():
    """Dataset005_Prostate 3d_fullres in nnU-Net's nnUNetPlans.json: 1x3x3 kernels until z catches up."""
    topo = pool_and_conv_props((3.5999999046325684, 0.625, 0.625), (20, 320, 256))
    assert topo.strides == ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2))
    assert topo.kernel_sizes == ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    assert topo.patch_size == (20, 320, 256)
    assert topo.divisor == (4, 64, 64)


def test_single_axis_needs_three_times_the_bottleneck_to_pool():
    # x is the only axis that may pool (z too coarse, y too small); 10 < 3 * 4 so pooling stops
    topo = pool_and_conv_props((5.0, 1.0, 1.0), (3, 5, 10))
    assert topo.pools_per_axis == (0, 0, 0)
    topo = pool_and_conv_props((5.0, 1.0, 1.0), (3, 5, 12))
    assert topo.pools_per_axis == (0, 0, 1)


def test_non_integer_median_shape_is_padded_up():
    assert pad_to_multiple((230.5, 425.0), (64, 64)) == (256, 448)
    assert pad_to_multiple((128, 7), (32, 1)) == (128, 7)
