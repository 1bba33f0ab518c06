"""Sliding-window prediction: coverage, weighting and mirroring invariants."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoseg.inference.sliding_window import (
    gaussian_importance,
    mirror_combinations,
    sliding_window_logits,
    sliding_window_rows,
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


def _whole_image_reference(predict, image, patch, n_outputs, step, tile_batch):
    """The accumulation over the whole (padded) image that streaming must reproduce bit for bit."""
    x = torch.as_tensor(image)
    spatial = x.shape[1:]
    pad = [max(0, p - s) for p, s in zip(patch, spatial)]
    pads = [v for p in reversed(pad) for v in (p // 2, p - p // 2)]
    x = torch.nn.functional.pad(x, pads)
    weight = torch.from_numpy(gaussian_importance(patch))
    logits = torch.zeros((n_outputs, *x.shape[1:]))
    weights = torch.zeros(x.shape[1:])
    starts = list(itertools.product(*[tile_starts(s, p, step) for s, p in zip(x.shape[1:], patch)]))
    for i in range(0, len(starts), tile_batch):
        slices = [tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in starts[i : i + tile_batch]]
        out = predict(torch.stack([x[(slice(None), *sl)] for sl in slices]))
        for k, sl in enumerate(slices):
            logits[(slice(None), *sl)].addcmul_(out[k], weight)
            weights[sl] += weight
    logits /= weights
    return logits[(slice(None), *(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial)))]


@pytest.mark.parametrize(
    "shape,patch,tile_batch",
    [((23, 9, 10), (6, 8, 8), 1), ((23, 9, 10), (6, 8, 8), 5), ((4, 30, 7), (6, 8, 8), 2), ((40, 12), (8, 8), 64)],
)
def test_streamed_rows_equal_the_whole_image_exactly(shape, patch, tile_batch):
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 5, 3, padding=1) if len(shape) == 3 else torch.nn.Conv2d(2, 5, 3, padding=1)
    image = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    expected = _whole_image_reference(net, image, patch, 5, 0.5, tile_batch)
    rows = list(sliding_window_rows(net, image, patch, 5, tile_batch=tile_batch))
    ends = np.cumsum([r.shape[1] for _, r in rows])
    assert [first for first, _ in rows] == [0, *ends[:-1]]  # consecutive bands, in order
    assert len(rows) > 1 or tile_batch == 64 or shape[0] <= patch[0]  # streamed, unless one chunk holds every tile
    got = torch.cat([r for _, r in rows], dim=1)
    assert torch.equal(got, expected)
    assert torch.equal(sliding_window_logits(net, image, patch, 5, tile_batch=tile_batch), expected)
