"""Synthetic datasets with known truth, written in the nnU-Net v2 layout.

They carry the difficulties of real data while staying small enough to train on a CPU in minutes:

- ``ct3d``: one CT channel in HU (air -1000 outside the body), anisotropic spacing of about 3 x 0.8 x 0.8 mm,
  an organ (large), a lesion inside it (small, about 1% of the foreground) and a bone-like structure.
- ``mr3d``: two MR-like channels with a smooth multiplicative bias field, an arbitrary per-case intensity scale
  and zero background, anisotropic; a gland (large) and a lesion (small).
- ``2d``: grey 2D PNG images (microscopy-like): cells (large) and small bright spots.
- ``ct3d_hard``: ``ct3d`` made harder for evaluation: every scan is oblique (its axes rotated up to 25 degrees
  against the anatomy, stored in the direction cosines), the lesion's and the organ's intensities overlap, and a
  second tiny class (cysts, darker than the organ and as dark as the tissue around it) lies in the organ.
- ``ct3d_context``: large CT volumes (about 68 x 240 x 270 voxels of 2 x 0.8 x 0.8 mm) where the class of an
  organ depends on something far away: two identical kidney-like organs, one on each side, and a heart on a random
  side (as in situs inversus); the organ on the heart's side is one class, the other organ another. A patch that
  sees one organ but not the heart cannot tell which it is; a whole-image view can (the case for the
  low-resolution cascade).

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


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A random rotation (3 x 3, x/y/z) by up to ``max_degrees`` about a random axis (Rodrigues' formula)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(-max_degrees, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _grid(
    rng: np.random.Generator,
    shape_range: tuple[tuple[int, int], ...],
    spacing: tuple[float, float, float],
    jitter: float,
    oblique_degrees: float = 0.0,
) -> tuple[np.ndarray, Geometry]:
    """Physical coordinates (mm, relative to the volume centre, (3, Z, Y, X) in z/y/x order) and the geometry.

    With ``oblique_degrees`` the scan's axes are rotated against the anatomy (direction cosines of the file), so
    objects defined in these coordinates lie obliquely in the voxel grid, as in a tilted acquisition.
    """
    shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in shape_range)
    spacing_zyx = tuple(float(s * rng.uniform(1 - jitter, 1 + jitter)) for s in spacing)
    origin = tuple(float(v) for v in rng.uniform(-200, 200, size=3))
    rotation = _rotation(rng, oblique_degrees) if oblique_degrees else np.eye(3)
    direction = tuple(float(v) for v in rotation.ravel())
    geometry = Geometry(spacing_zyx, shape, origin, direction, 3)  # type: ignore[arg-type]
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing_zyx)]
    local_xyz = np.stack(np.meshgrid(*axes, indexing="ij"))[::-1]
    return np.einsum("ij,j...->i...", rotation, local_xyz)[::-1], geometry


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


def _make_ct(rng: np.random.Generator, hard: bool = False) -> tuple[list[np.ndarray], np.ndarray, Geometry]:
    coords, geometry = _grid(rng, ((22, 30), (80, 100), (80, 100)), (3.0, 0.8, 0.8), 0.08, 25.0 if hard else 0.0)
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

    def inside_organ(radius_range: tuple[float, float], spread: float) -> np.ndarray:
        c = tuple(organ_c[i] + rng.uniform(-spread, spread) * organ_r[i] for i in range(3))
        return _ellipsoid(coords, c, tuple(rng.uniform(*radius_range, size=3))) & organ

    for _ in range(int(rng.integers(1, 3))):  # one or two small lesions inside the organ
        label[inside_organ((4, 7), 0.5)] = 2
    if hard:  # one to three cysts, smaller than the lesions
        for _ in range(int(rng.integers(1, 4))):
            label[inside_organ((2.5, 4.5), 0.6) & (label == 1)] = 4
    # (mean, texture) HU per label; the hard kind's lesion overlaps the organ and its cysts overlap the tissue
    hu_of = (
        {1: (95, 10), 2: (40, 8), 3: (600, 150)} if not hard else {1: (80, 14), 2: (58, 12), 3: (600, 150), 4: (22, 10)}
    )
    hu = np.full(geometry.shape_zyx, -1000.0)
    hu[body] = 20 + 15 * _texture(rng, geometry.shape_zyx, 2)[body]
    for value, (mean, spread) in hu_of.items():
        mask = label == value
        hu[mask] = mean + spread * _texture(rng, geometry.shape_zyx, 1.5 if value == 1 else 1)[mask]
    hu = ndimage.gaussian_filter(hu, sigma=(0.3, 0.8, 0.8)) + rng.normal(0, 12, hu.shape)
    return [np.clip(np.rint(hu), -1024, 3071).astype(np.int16)], label, geometry


def _make_ct_context(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, Geometry]:
    coords, geometry = _grid(rng, ((64, 72), (225, 255), (255, 285)), (2.0, 0.8, 0.8), 0.05)
    extent = np.array(geometry.shape_zyx) * np.array(geometry.spacing_zyx) / 2
    body = _ellipsoid(coords, (0, 0, 0), (extent[0] * 1.5, extent[1] * 0.85, extent[2] * 0.9), rng, 0.05)
    heart_side = float(rng.choice((-1.0, 1.0)))  # coords are (z, y, x): x runs across the body
    label = np.zeros(geometry.shape_zyx, np.uint8)
    for side, value in ((heart_side, 1), (-heart_side, 2)):  # the organ on the heart's side is class 1
        centre = (rng.uniform(-38, -30), rng.uniform(25, 35), side * rng.uniform(40, 50))
        label[_ellipsoid(coords, centre, (rng.uniform(20, 24), 15.0, 13.0), rng, 0.1) & body] = value
    heart_c = (rng.uniform(35, 42), rng.uniform(-20, -10), heart_side * rng.uniform(30, 40))
    label[_ellipsoid(coords, heart_c, tuple(rng.uniform(16, 20, size=3)), rng, 0.1) & body] = 3
    spine = _ellipsoid(coords, (0.0, 55.0, 0.0), (extent[0] * 2, 10.0, 10.0)) & body
    hu = np.full(geometry.shape_zyx, -1000.0)
    hu[body] = 20 + 15 * _texture(rng, geometry.shape_zyx, 2)[body]
    hu[spine] = 600 + 100 * _texture(rng, geometry.shape_zyx, 1)[spine]
    for value, (mean, spread) in {1: (130, 12), 2: (130, 12), 3: (250, 20)}.items():
        mask = label == value
        hu[mask] = mean + spread * _texture(rng, geometry.shape_zyx, 1.5)[mask]
    hu = ndimage.gaussian_filter(hu, sigma=(0.4, 0.6, 0.6)) + rng.normal(0, 12, hu.shape)
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
    "ct3d_hard": _Kind(
        ("CT",),
        {"background": 0, "organ": 1, "lesion": 2, "bone": 3, "cyst": 4},
        ".nii.gz",
        lambda rng: _make_ct(rng, hard=True),
    ),
    "ct3d_context": _Kind(
        ("CT",),
        {"background": 0, "organ_heart_side": 1, "organ_other_side": 2, "heart": 3},
        ".nii.gz",
        _make_ct_context,
    ),
    "mr3d": _Kind(("T1", "T2"), {"background": 0, "gland": 1, "lesion": 2}, ".nii.gz", _make_mr),
    "2d": _Kind(("microscopy",), {"background": 0, "cell": 1, "spot": 2}, ".png", _make_2d),
}


#: A fixed number per kind for its seeds (so adding a kind never changes another kind's cases).
_KIND_NUMBER = {"2d": 0, "ct3d": 1, "mr3d": 2, "ct3d_hard": 3, "ct3d_context": 4}


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
        images, label, geometry = spec.make(np.random.default_rng([seed, _KIND_NUMBER[kind], i]))
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
