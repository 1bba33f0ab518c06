"""Sliding-window prediction: coverage, weighting and mirroring invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoseg.inference.sliding_window import (
    gaussian_importance,
    mirror_combinations,
    sliding_window_logits,
    tile_starts,
)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 300), patch=st.integers(1, 128), step=st.sampled_from([0.25, 0.5, 0.75, 1.0]))
def test_tiles_cover_the_axis_with_requested_overlap(size, patch, step):
    starts = tile_starts(size, patch, step)
    assert starts[0] == 0
    if size > patch:
        assert starts[-1] == size - patch
        assert all(0 < b - a <= patch * step + 1 for a, b in zip(starts, starts[1:]))


def test_gaussian_is_positive_peaked_and_symmetric():
    g = gaussian_importance((5, 8, 9))
    assert g.shape == (5, 8, 9) and g.min() > 0 and g.max() == pytest.approx(1.0)
    np.testing.assert_allclose(g, g[::-1, ::-1, ::-1], rtol=1e-6)


def test_mirror_combinations():
    assert mirror_combinations((0, 1, 2)) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_combinations((0, 1), "single") == [(), (0,), (1,)]
    assert mirror_combinations((0, 1), "none") == [()]


def _local_model(x: torch.Tensor) -> torch.Tensor:
    """A translation-equivariant 'network': logits are functions of the voxel value only."""
    return torch.cat([-x[:, :1], x[:, :1], 2 * x[:, :1]], dim=1)


@pytest.mark.parametrize("shape,patch", [((7, 11, 13), (4, 6, 8)), ((3, 5, 20), (4, 6, 8)), ((9, 17), (8, 8))])
def test_equivariant_model_is_reproduced_exactly(shape, patch):
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    axes = tuple(range(len(shape)))
    out = sliding_window_logits(_local_model, image, patch, 3, mirror_axes=axes, tile_batch=3)
    assert out.shape == (3, *shape)
    expected = _local_model(torch.from_numpy(image)[None])[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_mirroring_averages_flipped_predictions():
    def position_model(x):  # depends on position along the last axis: mirroring must average it out
        ramp = torch.arange(x.shape[-1], dtype=torch.float32)
        return (x[:, :1] * 0 + ramp).expand(x.shape[0], 1, *x.shape[2:])

    image = np.zeros((1, 4, 6), np.float32)
    out = sliding_window_logits(position_model, image, (4, 6), 1, mirror_axes=(1,))
    torch.testing.assert_close(out[0], torch.full((4, 6), 2.5))
