"""Shared glue of the benchmarks that run autoseg and nnU-Net v2 side by side on one dataset and one plan.

One work folder holds both tools' trees: ``nnUNet_raw/DatasetNNN_Name`` (the synthetic dataset, which is already
in nnU-Net v2's raw layout), ``pre/`` and ``res/`` (nnU-Net's ``nnUNet_preprocessed`` / ``nnUNet_results``) and
``run/`` (autoseg's run folder). nnU-Net runs from its own virtual environment (``NNUNET_PYTHON``); nothing here
imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import NNUNET_PYTHON, run_measured  # noqa: E402

from autoseg.data.geometry import Geometry  # noqa: E402
from autoseg.data.io import read_image, write_image  # noqa: E402
from autoseg.data.synth import make_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
#: nnU-Net dataset id and name per synthetic kind.
DATASETS = {"ct3d": (901, "Dataset901_SynthCT"), "mr3d": (902, "Dataset902_SynthMR")}
CONFIG = "3d_fullres"


@dataclass(frozen=True)
class Work:
    """The folders of one side-by-side run."""

    root: Path
    kind: str

    @property
    def dataset_id(self) -> int:
        return DATASETS[self.kind][0]

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw" / DATASETS[self.kind][1]

    @property
    def nnunet_dataset(self) -> Path:
        return self.root / "pre" / DATASETS[self.kind][1]

    @property
    def nnunet_folder(self) -> Path:
        """nnU-Net's preprocessed cases of the configuration."""
        plans = json.loads((self.nnunet_dataset / "nnUNetPlans.json").read_text())
        return self.nnunet_dataset / plans["configurations"][CONFIG]["data_identifier"]

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def autoseg_folder(self) -> Path:
        """autoseg's preprocessed cases of the configuration."""
        plans = json.loads((self.run / "plans.json").read_text())
        return self.run / "preprocessed" / (plans["configurations"][CONFIG]["data_identifier"] or CONFIG)

    def env(self) -> dict[str, str]:
        return {
            "nnUNet_raw": str(self.root / "nnUNet_raw"),
            "nnUNet_preprocessed": str(self.root / "pre"),
            "nnUNet_results": str(self.root / "res"),
        }


def nnunet_cmd(name: str) -> str:
    """Path of an nnU-Net console script in its virtual environment."""
    return str(Path(NNUNET_PYTHON).parent / name)


def autoseg_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "autoseg.cli", *args]


def _upsample_case(paths: list[Path], label: Path, scale: float) -> None:
    """Resample one case's images (linear) and label (nearest) by ``scale`` on every axis, in place."""
    for path in [*paths, label]:
        array, geometry = read_image(path)
        shape = tuple(max(1, round(n * scale)) for n in geometry.shape_zyx)
        zoom = [1.0] + [new / old for new, old in zip(shape, geometry.shape_zyx)]
        order = 0 if path == label else 1
        out = ndimage.zoom(array.astype(np.float32), zoom, order=order, grid_mode=True, mode="grid-constant")
        out = np.rint(out) if array.dtype.kind in "iu" else out
        spacing = tuple(s * old / new for s, old, new in zip(geometry.spacing_zyx, geometry.shape_zyx, shape))
        new = Geometry(spacing, shape, geometry.origin_xyz, geometry.direction_xyz, geometry.ndim)  # type: ignore[arg-type]
        write_image(out.astype(array.dtype), new, path)


def make_data(work: Work, cases: int, *, scale: float = 1.0, seed: int = 0) -> dict:
    """Write the synthetic dataset (upsampled by ``scale`` per axis when > 1); returns a description for the JSON."""
    shutil.rmtree(work.root, ignore_errors=True)
    make_dataset(work.raw, work.kind, cases, test_cases=0, seed=seed)
    if scale != 1.0:
        for label in sorted((work.raw / "labelsTr").iterdir()):
            cid = label.name.removesuffix(".nii.gz")
            _upsample_case(sorted((work.raw / "imagesTr").glob(f"{cid}_*.nii.gz")), label, scale)
    shapes = [read_image(p)[1].shape_zyx for p in sorted((work.raw / "labelsTr").iterdir())]
    voxels = [int(np.prod(s)) for s in shapes]
    return {
        "kind": work.kind,
        "cases": cases,
        "seed": seed,
        "scale": scale,
        "what": f"autoseg.data.synth '{work.kind}' cases"
        + (f", upsampled x{scale:g} per axis (linear image, nearest label)" if scale != 1.0 else ""),
        "median_shape_zyx": [int(v) for v in np.median(np.array(shapes), axis=0)],
        "total_voxels": int(sum(voxels)),
    }


def setup_plans(work: Work, workers: int) -> dict:
    """Fingerprint and plan with both tools (timed once each, for information); returns the timings."""
    out = {}
    out["autoseg_fingerprint"] = run_measured(
        autoseg_cmd("fingerprint", str(work.raw), "-o", str(work.run), "-j", str(workers))
    )
    out["autoseg_plan"] = run_measured(autoseg_cmd("plan", str(work.run), "--preset", "nnunet"))
    fp = [nnunet_cmd("nnUNetv2_extract_fingerprint"), "-d", str(work.dataset_id), "-np", str(workers), "--clean"]
    out["nnunet_fingerprint"] = run_measured(fp, env=work.env())
    out["nnunet_plan"] = run_measured(
        [nnunet_cmd("nnUNetv2_plan_experiment"), "-d", str(work.dataset_id)], env=work.env()
    )
    return {k: {"wall_s": v["wall_s"], "peak_rss_mib": v["peak_rss_mib"]} for k, v in out.items()}


def compare_plans(work: Work) -> dict:
    """Both tools' 3d_fullres plan; raises SystemExit when spacing, patch, batch or axis order differ."""
    ours = json.loads((work.run / "plans.json").read_text())
    theirs = json.loads((work.nnunet_dataset / "nnUNetPlans.json").read_text())
    a, b = ours["configurations"][CONFIG], theirs["configurations"][CONFIG]
    plan = {
        "configuration": CONFIG,
        "spacing_autoseg": a["spacing"],
        "spacing_nnunet": b["spacing"],
        "patch_size_autoseg": a["patch_size"],
        "patch_size_nnunet": b["patch_size"],
        "batch_size_autoseg": a["batch_size"],
        "batch_size_nnunet": b["batch_size"],
        "transpose_forward_autoseg": ours["transpose_forward"],
        "transpose_forward_nnunet": theirs["transpose_forward"],
        "normalization_autoseg": [n["scheme"] + (" (mask)" if n["use_mask"] else "") for n in a["normalization"]],
        "normalization_nnunet": [
            s + (" (mask)" if m else "") for s, m in zip(b["normalization_schemes"], b["use_mask_for_norm"])
        ],
    }
    problems = []
    if not np.allclose(a["spacing"], b["spacing"], rtol=1e-6, atol=0):
        problems.append(f"spacing {a['spacing']} vs {b['spacing']}")
    for key in ("patch_size", "batch_size"):
        if list(np.atleast_1d(a[key])) != list(np.atleast_1d(b[key])):
            problems.append(f"{key} {a[key]} vs {b[key]}")
    if list(ours["transpose_forward"]) != list(theirs["transpose_forward"]):
        problems.append(f"transpose_forward {ours['transpose_forward']} vs {theirs['transpose_forward']}")
    print(
        f"{CONFIG} plan: spacing {a['spacing']} (nnU-Net {b['spacing']}), patch {a['patch_size']} "
        f"(nnU-Net {b['patch_size']}), batch {a['batch_size']} (nnU-Net {b['batch_size']})"
    )
    if problems:
        raise SystemExit(f"autoseg --preset nnunet and nnU-Net disagree on {CONFIG}: " + "; ".join(problems))
    return plan


def dump_nnunet_cases(work: Work, out: Path) -> None:
    """Write nnU-Net's preprocessed cases as ``<id>_data.npy`` / ``<id>_seg.npy`` (read with its dataset class)."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [NNUNET_PYTHON, str(HERE / "_nnunet_dump.py"), str(work.nnunet_folder), str(out)],
        check=True,
        env={**os.environ, **work.env()},
    )
