"""Forward-pass precision of prediction on a trained model: fp32 vs bf16, Dice against the truth and time.

    flock /tmp/autoseg-bench.lock python benchmarks/precision.py [--run benchmarks/work/train_cpu_plan/run]

Uses the fold-0 model that ``benchmarks/train_cpu_plan.py`` trains (the default CPU plan of synthetic CT) and
predicts, in this process, the fold's validation cases and the dataset's held-out cases (``imagesTs``) with
``--precision fp32`` and ``--precision bf16`` (what ``auto`` picks on a CPU with native bf16 arithmetic), with all
8 flips and with one flip per axis. Reported: seconds, Dice per class against the reference labels (``autoseg
evaluate``), and the share of voxels whose label is the same in fp32 and bf16. Prints a table and writes
``benchmarks/results/precision.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import print_table, write_results  # noqa: E402

PRECISIONS = ("fp32", "bf16")
MIRRORS = ("all", "single")


def _cases(run: Path, folder: Path) -> tuple[Path, Path]:
    """A folder of images (fold-0 validation + held-out) and one of their reference labels, as symbolic links."""
    from autoseg.runfolder import run_dataset

    spec = run_dataset(run)
    val = json.loads((run / "splits.json").read_text())["folds"][0]["val"]
    images, labels = folder / "images", folder / "labels"
    shutil.rmtree(folder, ignore_errors=True)
    images.mkdir(parents=True)
    labels.mkdir()
    data = spec.root
    pairs = [(data / "imagesTr", data / "labelsTr", c) for c in val]
    pairs += [
        (data / "imagesTs", data / "labelsTs", p.name[: -len("_0000.nii.gz")])
        for p in (data / "imagesTs").glob("*_0000.nii.gz")
    ]
    for image_dir, label_dir, case in pairs:
        (images / f"{case}_0000.nii.gz").symlink_to(image_dir / f"{case}_0000.nii.gz")
        (labels / f"{case}.nii.gz").symlink_to(label_dir / f"{case}.nii.gz")
    return images, labels


def main() -> None:
    from autoseg.data.io import read_label
    from autoseg.devices import cpu_has_native_bf16
    from autoseg.evaluation.evaluate import evaluate_folders
    from autoseg.inference.predict import predict_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=HERE / "work" / "train_cpu_plan" / "run")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "precision")
    args = parser.parse_args()
    if not (args.run / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt").is_file():
        sys.exit(f"{args.run}: no trained fold 0 of 3d_fullres; run benchmarks/train_cpu_plan.py first")
    images, labels = _cases(args.run, args.work / "cases")
    rows, agreement = [], {}
    for mirror in MIRRORS:
        outputs = {}
        for precision in PRECISIONS:
            out = args.work / f"{mirror}_{precision}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            written = predict_path(
                args.run,
                images,
                out,
                configs=["3d_fullres"],
                folds=["0"],
                device="cpu",
                mirror_mode=mirror,
                precision=precision,
            )
            seconds = time.perf_counter() - start
            summary = evaluate_folders(out, labels, out=out, workers=1)
            dice = {name: round(stats["dice"].mean, 4) for name, stats in summary.per_class.items()}
            rows.append(
                {
                    "mirror": mirror,
                    "precision": precision,
                    "cases": len(written),
                    "seconds": round(seconds, 1),
                    "dice": dice,
                    "mean_dice": round(float(np.mean(list(dice.values()))), 4),
                }
            )
            outputs[precision] = written
            print(rows[-1], flush=True)
        same = [float((read_label(a)[0] == read_label(b)[0]).mean()) for a, b in zip(*outputs.values())]
        agreement[mirror] = {
            "voxels_equal_min": round(min(same), 6),
            "voxels_equal_mean": round(float(np.mean(same)), 6),
        }
    print_table(rows, ["mirror", "precision", "cases", "seconds", "dice", "mean_dice"])
    print(json.dumps(agreement))
    payload = {
        "run": str(args.run),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "rows": rows,
        "fp32_vs_bf16_labels": agreement,
    }
    print(f"wrote {write_results('precision', payload)}")


if __name__ == "__main__":
    main()
