"""Fingerprint extraction: autoseg vs nnU-Net v2 on the same synthetic CT dataset, side by side in one run.

    python benchmarks/fingerprint.py [--cases 24] [--workers 2]

nnU-Net v2 runs from its own virtual environment (``NNUNET_PYTHON``, default /work/nnunet-venv/bin/python); it is
never a dependency of autoseg. Prints a table and writes benchmarks/results/fingerprint.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import NNUNET_PYTHON, print_table, run_measured, write_results  # noqa: E402

from autoseg.data.synth import make_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work" / "fingerprint")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    raw = args.work / "nnUNet_raw" / "Dataset900_SynthCT"
    make_dataset(raw, "ct3d", args.cases, test_cases=0, seed=0)
    env = {
        "nnUNet_raw": str(args.work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(args.work / "pre"),
        "nnUNet_results": str(args.work / "res"),
    }
    ours = run_measured(
        [
            sys.executable,
            "-m",
            "autoseg.cli",
            "fingerprint",
            str(raw),
            "-o",
            str(args.work / "run"),
            "-j",
            str(args.workers),
        ]
    )
    theirs = run_measured(
        [
            str(Path(NNUNET_PYTHON).parent / "nnUNetv2_extract_fingerprint"),
            "-d",
            "900",
            "-np",
            str(args.workers),
            "--clean",
        ],
        env=env,
    )
    a = json.loads((args.work / "run" / "fingerprint.json").read_text())
    b = json.loads((args.work / "pre" / "Dataset900_SynthCT" / "dataset_fingerprint.json").read_text())
    nn_spacing = np.median(np.array(b["spacings"]), axis=0)
    fi_a, fi_b = a["channels"][0]["foreground_intensity"], b["foreground_intensity_properties_per_channel"]["0"]
    agreement = {
        "median_spacing_autoseg": a["median_spacing"],
        "median_spacing_nnunet": nn_spacing.tolist(),
        "median_spacing_identical": bool(np.allclose(a["median_spacing"], nn_spacing, rtol=0, atol=1e-9)),
        "shapes_after_crop_identical": [c["shape_after_crop"] for c in a["cases"]] == b["shapes_after_crop"],
    }
    for key in ("percentile_00_5", "median", "percentile_99_5", "mean", "std"):
        rel = abs(fi_a[key] - fi_b[key]) / max(abs(fi_b[key]), 1e-9)
        agreement[f"{key}_relative_difference"] = round(rel, 5)
    agreement["percentiles_within_1pct"] = all(
        agreement[f"{k}_relative_difference"] <= 0.01 for k in ("percentile_00_5", "percentile_99_5")
    )
    rows = [
        {"tool": "autoseg", "wall_s": ours["wall_s"], "peak_rss_mib": ours["peak_rss_mib"]},
        {"tool": "nnU-Net v2", "wall_s": theirs["wall_s"], "peak_rss_mib": theirs["peak_rss_mib"]},
        {
            "tool": "ratio nnU-Net/autoseg",
            "wall_s": round(theirs["wall_s"] / ours["wall_s"], 2),
            "peak_rss_mib": round(theirs["peak_rss_mib"] / ours["peak_rss_mib"], 2),
        },
    ]
    print(f"fingerprint of {args.cases} synthetic CT cases, {args.workers} workers")
    print_table(rows, ["tool", "wall_s", "peak_rss_mib"])
    print(json.dumps(agreement, indent=2))
    path = write_results(
        "fingerprint", {"cases": args.cases, "workers": args.workers, "rows": rows, "agreement": agreement}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
