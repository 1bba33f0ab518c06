"""Tiny colour (RGB) PNG datasets in every layout, for the multi-channel-file tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SHAPE_YX = (24, 29)  # different lengths so that an axis mix-up fails loudly


def write_png(pixels: np.ndarray, path: Path) -> Path:
    """Write (Y, X) grey or (Y, X, components) colour pixels as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=pixels.ndim == 3), str(path))
    return path


def colour_case(seed: int, components: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(Y, X, components) uint8 pixels brighter inside a box, and the box as a (Y, X) 0/1 label map."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE_YX, np.uint8)
    label[5:15, 6:20] = 1
    pixels = rng.integers(0, 120, (*SHAPE_YX, components)).astype(np.uint8)
    pixels[label == 1] += 100
    return pixels, label


def write_colour_dataset(root: Path, layout: str, n_cases: int = 3) -> Path:
    """RGB PNG cases in layout ``folders`` (images/ + labels/), ``pairs`` (<case>_image.png + <case>_label.png)
    or ``nnunet`` (dataset.json with channels R, G, B and ONE file imagesTr/<case>_0000.png per case)."""
    for i in range(n_cases):
        cid = f"case_{i:02d}"
        pixels, label = colour_case(i)
        if layout == "folders":
            write_png(pixels, root / "images" / f"{cid}.png")
            write_png(label, root / "labels" / f"{cid}.png")
        elif layout == "pairs":
            write_png(pixels, root / f"{cid}_image.png")
            write_png(label, root / f"{cid}_label.png")
        elif layout == "nnunet":
            write_png(pixels, root / "imagesTr" / f"{cid}_0000.png")
            write_png(label, root / "labelsTr" / f"{cid}.png")
        else:
            raise ValueError(f"unknown layout {layout!r}")
    if layout == "nnunet":
        meta = {
            "channel_names": {"0": "R", "1": "G", "2": "B"},
            "labels": {"background": 0, "box": 1},
            "numTraining": n_cases,
            "file_ending": ".png",
        }
        (root / "dataset.json").write_text(json.dumps(meta))
    return root
