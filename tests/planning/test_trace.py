"""The traced memory model (families without an analytic walk): consistent with the analytic walk where both
apply, with autograd's saved tensors, and with one measured CPU peak. The measured peak of every family at
realistic sizes is benchmarks/memory_model.py --families."""

from __future__ import annotations

import dataclasses

import pytest

from autoseg.networks import list_blocks
from autoseg.planning import memory
from autoseg.planning.memory import estimate_flops, estimate_training_memory, measure_training_memory
from autoseg.planning.topology import pool_and_conv_props, unet_for_topology
from autoseg.planning.trace import traced_walk

CASES = {3: ((3.0, 0.8, 0.7), (8, 24, 32)), 2: ((0.8, 0.7), (40, 48))}


def _spec(family: str, ndim: int):
    spacing, patch = CASES[ndim]
    topo = pool_and_conv_props(spacing, patch)
    return unet_for_topology(topo, 8, block=family, max_features=32), topo.patch_size


@pytest.mark.parametrize("ndim", [3, 2])
@pytest.mark.parametrize("family", ["plain", "residual"])
def test_trace_reproduces_the_analytic_walk(family, ndim, monkeypatch):
    """Traced and analytic node lists give the same estimate on every device and precision (the trace counts the
    norms' per-channel statistics in the activation dtype, and the analytic walk in fp32: a few KB)."""
    spec, patch = _spec(family, ndim)
    analytic = {
        (b, p, d): estimate_training_memory(spec, 2, 3, patch, b, precision=p, device=d)
        for b in (1, 2)
        for p, d in (("fp32", "cpu"), ("bf16", "cuda"), ("fp32", "cuda"))
    }
    flops = estimate_flops(spec, 2, 3, patch, 2)
    monkeypatch.setattr(memory, "_ANALYTIC_BLOCKS", ())
    for (b, p, d), expected in analytic.items():
        traced = estimate_training_memory(spec, 2, 3, patch, b, precision=p, device=d)
        assert traced.total_bytes == pytest.approx(expected.total_bytes, rel=2e-3, abs=128)
    assert estimate_flops(spec, 2, 3, patch, 2) == flops


@pytest.mark.parametrize("family", [f for f in list_blocks() if f not in ("plain", "residual")])
def test_every_family_has_an_estimate_that_grows_with_the_batch(family):
    spec, patch = _spec(family, 3)
    one, two = (estimate_training_memory(spec, 1, 2, patch, b).total_bytes for b in (1, 2))
    walk = traced_walk(spec, 1, 2, tuple(patch))
    assert walk.held == 2 * sum(walk.scales)  # logits of every deep-supervision scale, 2 outputs
    assert 0 < one < two < 2 * one
    assert estimate_flops(spec, 1, 2, patch, 2) == 2 * estimate_flops(spec, 1, 2, patch, 1) > 0
    with_dropped_head = dataclasses.replace(spec, deep_supervision=False)
    assert estimate_training_memory(with_dropped_head, 1, 2, patch, 1).total_bytes < one


@pytest.mark.parametrize("family", ["attention", "hybrid"])
def test_estimate_matches_a_measured_cpu_peak(family):
    spec, patch = _spec(family, 2)
    estimate = estimate_training_memory(spec, 1, 3, patch, 4).total_bytes
    measured = measure_training_memory(spec, 1, 3, patch, 4)
    assert abs(estimate / measured - 1) < 0.10
