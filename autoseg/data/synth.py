"""Synthetic datasets with known truth, written in the nnU-Net v2 layout.

They carry the difficulties of real data while staying small enough to train on a CPU in minutes:

- ``ct3d``: one CT channel in HU (air -1000 outside the body), anisotropic spacing of about 3 x 0.8 x 0.8 mm,
  an organ (large), a lesion inside it (small, about 1% of the foreground) and a bone-like structure.
- ``mr3d``: two MR-like channels with a smooth multiplicative bias field, an arbitrary per-case intensity scale
  and zero background, anisotropic; a gland (large) and a lesion (small).
- ``2d``: grey 2D PNG images (microscopy-like): cells (large) and small bright spots.

Objects are placed in physical (mm) coordinates and sampled on each case's grid, so shapes, spacings and
origins vary from case to case without distorting the anatomy. ``labelsTs/`` holds the truth of the test cases.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.data.geometry import Geometry
from autoseg.data.io import write_image

__all__ = ["KINDS", "make_dataset"]


@dataclass(frozen=True)
class _Kind:
    channels: tuple[str, ...]
    labels: dict[str, int]
    ending: str
    make: Callable[[np.random.Generator], tuple[list[np.ndarray], np.ndarray, Geometry]]


def _grid(
    rng: np.random.Generator,
    shape_range: tuple[tuple[int, int], ...],
    spacing: tuple[float, float, float],
    jitter: float,
) -> tuple[np.ndarray, Geometry]:
    shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in shape_range)
    spacing_zyx = tuple(float(s * rng.uniform(1 - jitter, 1 + jitter)) for s in spacing)
    origin = tuple(float(v) for v in rng.uniform(-200, 200, size=3))
    geometry = Geometry(spacing_zyx, shape, origin, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), 3)  # type: ignore[arg-type]
    # physical coordinates (mm) of voxel centres relative to the volume centre, (3, Z, Y, X)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing_zyx)]
    return np.stack(np.meshgrid(*axes, indexing="ij")), geometry


def _ellipsoid(
    coords: np.ndarray, centre, radii, rng: np.random.Generator | None = None, wobble: float = 0.0
) -> np.ndarray:
    d = sum(((coords[i] - centre[i]) / radii[i]) ** 2 for i in range(len(radii)))
    if rng is not None and wobble:
        noise = ndimage.gaussian_filter(rng.standard_normal(d.shape), sigma=3)
        d = d + wobble * noise / (noise.std() + 1e-6)
    return d <= 1.0


def _texture(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    t = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma)
    return t / (t.std() + 1e-6)


def _make_ct(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, Geometry]:
    coords, geometry = _grid(rng, ((22, 30), (80, 100), (80, 100)), (3.0, 0.8, 0.8), 0.08)
    extent = np.array(geometry.shape_zyx) * np.array(geometry.spacing_zyx) / 2
    body = _ellipsoid(coords, (0, 0, 0), (extent[0] * 1.5, extent[1] * 0.85, extent[2] * 0.9), rng, 0.05)
    organ_c = (rng.uniform(-10, 10), rng.uniform(-8, 8), rng.uniform(-12, 0))
    organ_r = (rng.uniform(25, 35), rng.uniform(16, 22), rng.uniform(18, 26))
    organ = _ellipsoid(coords, organ_c, organ_r, rng, 0.15) & body
    bone_c = (0.0, extent[1] * 0.55, rng.uniform(-4, 4))
    bone = _ellipsoid(coords, bone_c, (extent[0] * 2, 6.0, 7.0)) & body
    label = np.zeros(geometry.shape_zyx, np.uint8)
    label[organ] = 1
    label[bone] = 3
    for _ in range(int(rng.integers(1, 3))):  # one or two small lesions inside the organ
        c = tuple(organ_c[i] + rng.uniform(-0.5, 0.5) * organ_r[i] for i in range(3))
        lesion = _ellipsoid(coords, c, tuple(rng.uniform(4, 7, size=3))) & organ
        label[lesion] = 2
    hu = np.full(geometry.shape_zyx, -1000.0)
    hu[body] = 20 + 15 * _texture(rng, geometry.shape_zyx, 2)[body]
    hu[label == 1] = 95 + 10 * _texture(rng, geometry.shape_zyx, 1.5)[label == 1]
    hu[label == 2] = 40 + 8 * _texture(rng, geometry.shape_zyx, 1)[label == 2]
    hu[label == 3] = 600 + 150 * _texture(rng, geometry.shape_zyx, 1)[label == 3]
    hu = ndimage.gaussian_filter(hu, sigma=(0.3, 0.8, 0.8)) + rng.normal(0, 12, hu.shape)
    return [np.clip(np.rint(hu), -1024, 3071).astype(np.int16)], label, geometry


def _make_mr(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, Geometry]:
    coords, geometry = _grid(rng, ((20, 26), (72, 90), (72, 90)), (3.0, 0.8, 0.8), 0.08)
    extent = np.array(geometry.shape_zyx) * np.array(geometry.spacing_zyx) / 2
    body = _ellipsoid(coords, (0, 0, 0), (extent[0] * 1.5, extent[1] * 0.8, extent[2] * 0.85), rng, 0.05)
    gland_c = (rng.uniform(-6, 6), rng.uniform(-6, 6), rng.uniform(-6, 6))
    gland_r = (rng.uniform(18, 26), rng.uniform(14, 20), rng.uniform(16, 22))
    gland = _ellipsoid(coords, gland_c, gland_r, rng, 0.15) & body
    label = np.zeros(geometry.shape_zyx, np.uint8)
    label[gland] = 1
    c = tuple(gland_c[i] + rng.uniform(-0.4, 0.4) * gland_r[i] for i in range(3))
    label[_ellipsoid(coords, c, tuple(rng.uniform(4, 6.5, size=3))) & gland] = 2
    bias = np.exp(0.25 * _texture(rng, geometry.shape_zyx, 12))
    channels = []
    for base in ((300, 500, 250), (400, 250, 650)):  # (tissue, gland, lesion): T1-like and T2-like contrasts
        img = np.zeros(geometry.shape_zyx)
        for value, mask in zip(base, (body, label == 1, label == 2)):
            img[mask] = value * (1 + 0.06 * _texture(rng, geometry.shape_zyx, 1.5)[mask])
        img = img * bias * rng.uniform(0.5, 2.0) + np.abs(rng.normal(0, 12, img.shape)) * body
        img[~body] = 0
        channels.append(img.astype(np.float32))
    return channels, label, geometry


def _make_2d(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, Geometry]:
    shape = (1, int(rng.integers(96, 129)), int(rng.integers(96, 129)))
    yy, xx = np.mgrid[: shape[1], : shape[2]].astype(float)
    label = np.zeros(shape[1:], np.uint8)
    for _ in range(int(rng.integers(3, 7))):
        c, r = rng.uniform(10, np.array(shape[1:]) - 10), rng.uniform(7, 14, size=2)
        label[((yy - c[0]) / r[0]) ** 2 + ((xx - c[1]) / r[1]) ** 2 <= 1] = 1
    for _ in range(int(rng.integers(2, 6))):
        c = rng.uniform(4, np.array(shape[1:]) - 4)
        label[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= rng.uniform(2, 3.5) ** 2] = 2
    img = 40 + 12 * _texture(rng, shape[1:], 3)
    img[label == 1] += 70
    img[label == 2] += 150
    img = ndimage.gaussian_filter(img, 1.0) + rng.normal(0, 12, img.shape)
    geometry = Geometry((999.0, 1.0, 1.0), shape, (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), 2)  # type: ignore[arg-type]
    return [np.clip(img, 0, 255).astype(np.uint8)[None]], label[None], geometry


KINDS: dict[str, _Kind] = {
    "ct3d": _Kind(("CT",), {"background": 0, "organ": 1, "lesion": 2, "bone": 3}, ".nii.gz", _make_ct),
    "mr3d": _Kind(("T1", "T2"), {"background": 0, "gland": 1, "lesion": 2}, ".nii.gz", _make_mr),
    "2d": _Kind(("microscopy",), {"background": 0, "cell": 1, "spot": 2}, ".png", _make_2d),
}


def make_dataset(out: Path | str, kind: str = "ct3d", cases: int = 8, *, test_cases: int = 2, seed: int = 0) -> Path:
    """Write a synthetic dataset to ``out`` (nnU-Net v2 layout) and return ``out``.

    Case ``i`` depends only on ``(seed, kind, i)``, so the same arguments always give the same files.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {sorted(KINDS)}")
    spec = KINDS[kind]
    out = Path(out)
    for i in range(cases + test_cases):
        train = i < cases
        images, label, geometry = spec.make(np.random.default_rng([seed, sorted(KINDS).index(kind), i]))
        cid = f"case_{i:03d}"
        folder = "Tr" if train else "Ts"
        for c, image in enumerate(images):
            write_image(image, geometry, out / f"images{folder}" / f"{cid}_{c:04d}{spec.ending}")
        write_image(label, geometry, out / f"labels{folder}" / f"{cid}{spec.ending}")
    meta = {
        "name": f"synthetic_{kind}",
        "description": f"autoseg synthetic dataset, kind {kind}, seed {seed}",
        "channel_names": {str(c): n for c, n in enumerate(spec.channels)},
        "labels": spec.labels,
        "numTraining": cases,
        "file_ending": spec.ending,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
