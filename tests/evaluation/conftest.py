"""Fixtures shared by the evaluation tests."""

from __future__ import annotations

import pytest

from autoseg.evaluation import surfaces


@pytest.fixture(params=["edt", "kdtree"])
def distance_path(request, monkeypatch):
    """Run a test with the distance transform and again with the k-d tree computing surface distances."""
    monkeypatch.setattr(surfaces, "KDTREE_VOXELS_PER_SURFACE_VOXEL", 10**12 if request.param == "edt" else 0)
    return request.param
