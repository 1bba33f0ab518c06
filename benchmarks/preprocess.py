"""Preprocessing: autoseg vs nnU-Net v2 on the same synthetic dataset and the same 3d_fullres plan, in one run.

    flock /tmp/autoseg-bench.lock python benchmarks/preprocess.py [--kind ct3d|mr3d] [--cases 24] [--scale 1]
        [--workers 2] [--repeats 3]

Both tools fingerprint and plan the dataset (autoseg with ``--preset nnunet``); the run stops unless their
3d_fullres target spacing, patch and batch size agree. Then ``autoseg preprocess -c 3d_fullres -j N`` and
``nnUNetv2_preprocess -c 3d_fullres -np N`` run alternately (A, B, A, B, ...) from an empty output folder, timed
with the peak RSS of the whole process tree; the table shows medians. Agreement per case: Pearson r of the
preprocessed images and the share of equal label voxels (nnU-Net's -1 "outside the non-zero mask" counted as 0,
as its trainer does). ``--scale 2`` upsamples every case 2x per axis (8x the voxels) so that start-up time does
not dominate. Results go to benchmarks/results/preprocess.json under the key ``<kind>_x<scale>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import RESULTS, print_table, run_measured, write_results  # noqa: E402
from _nnunet import CONFIG, Work, autoseg_cmd, compare_plans, dump_nnunet_cases, make_data, nnunet_cmd, setup_plans  # noqa: E402

from autoseg.preprocessing.store import list_cases, read_case  # noqa: E402


def _time_autoseg(work: Work, workers: int) -> dict:
    shutil.rmtree(work.run / "preprocessed", ignore_errors=True)
    load = os.getloadavg()[0]
    run = run_measured(autoseg_cmd("preprocess", str(work.run), "-c", CONFIG, "-j", str(workers)))
    return {**run, "load_avg_1min_before": round(load, 2)}


def _time_nnunet(work: Work, workers: int) -> dict:
    shutil.rmtree(work.nnunet_dataset / "gt_segmentations", ignore_errors=True)
    for old in work.nnunet_dataset.glob(f"*_{CONFIG}"):
        shutil.rmtree(old)
    cmd = [nnunet_cmd("nnUNetv2_preprocess"), "-d", str(work.dataset_id), "-c", CONFIG, "-np", str(workers)]
    load = os.getloadavg()[0]
    return {**run_measured(cmd, env=work.env()), "load_avg_1min_before": round(load, 2)}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a -= a.mean()
    b -= b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float(np.array_equal(a, b))


def case_agreement(data: np.ndarray, seg: np.ndarray, their_data: np.ndarray, their_seg: np.ndarray) -> dict:
    """Agreement of one case: shapes, min over channels of Pearson r, share of equal label voxels (all, foreground)."""
    seg, their_seg = seg.reshape(data.shape[1:]), their_seg.reshape(their_data.shape[1:])
    if data.shape != their_data.shape:
        return {"shape_autoseg": list(data.shape), "shape_nnunet": list(their_data.shape), "shape_match": False}
    theirs = np.where(their_seg < 0, 0, their_seg)
    foreground = (seg > 0) | (theirs > 0)
    return {
        "shape_autoseg": list(data.shape),
        "shape_match": True,
        "r": round(min(_pearson(data[c], their_data[c]) for c in range(data.shape[0])), 6),
        "max_abs_diff": round(float(np.abs(data.astype(np.float64) - their_data).max()), 4),
        "label_agreement": round(float(np.mean(seg == theirs)), 6),
        "foreground_label_agreement": round(float(np.mean(seg[foreground] == theirs[foreground])), 6)
        if foreground.any()
        else 1.0,
        "nnunet_outside_mask_voxels": int(np.count_nonzero(their_seg < 0)),
    }


def agreement(work: Work) -> dict:
    """Per-case agreement of the two tools' last preprocessing output, with min / median over cases."""
    dump = work.root / "nnunet_arrays"
    shutil.rmtree(dump, ignore_errors=True)
    dump_nnunet_cases(work, dump)
    per_case = {}
    for cid in list_cases(work.autoseg_folder):
        data, seg, _ = read_case(work.autoseg_folder, cid, mmap=True)
        per_case[cid] = case_agreement(
            np.asarray(data), np.asarray(seg), np.load(dump / f"{cid}_data.npy"), np.load(dump / f"{cid}_seg.npy")
        )
    shutil.rmtree(dump)
    ok = [c for c in per_case.values() if c["shape_match"]]
    summary = {
        "cases": len(per_case),
        "shapes_match": f"{len(ok)}/{len(per_case)}",
        "r_min": min((c["r"] for c in ok), default=None),
        "r_median": statistics.median(c["r"] for c in ok) if ok else None,
        "label_agreement_min": min((c["label_agreement"] for c in ok), default=None),
        "label_agreement_median": statistics.median(c["label_agreement"] for c in ok) if ok else None,
        "foreground_label_agreement_min": min((c["foreground_label_agreement"] for c in ok), default=None),
    }
    summary["passes"] = bool(
        len(ok) == len(per_case) and ok and summary["r_min"] >= 0.99 and summary["label_agreement_min"] >= 0.99
    )
    return {"summary": summary, "per_case": per_case}


def _row(tool: str, runs: list[dict]) -> dict:
    return {
        "tool": tool,
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        "runs_wall_s": [r["wall_s"] for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["ct3d", "mr3d"], default="ct3d")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--scale", type=float, default=1.0, help="upsample every case by this factor per axis")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work" / "preprocess")
    args = parser.parse_args()

    work = Work(args.work, args.kind)
    dataset = make_data(work, args.cases, scale=args.scale)
    print(f"dataset: {dataset['what']}, {args.cases} cases, median shape {dataset['median_shape_zyx']}")
    setup = setup_plans(work, args.workers)
    plan = compare_plans(work)
    ours, theirs = [], []
    for i in range(args.repeats):
        ours.append(_time_autoseg(work, args.workers))
        theirs.append(_time_nnunet(work, args.workers))
        print(f"run {i + 1}: autoseg {ours[-1]['wall_s']} s, nnU-Net {theirs[-1]['wall_s']} s")
    agree = agreement(work)
    a, b = _row("autoseg", ours), _row("nnU-Net v2", theirs)
    ratio = {
        "tool": "ratio nnU-Net/autoseg",
        "wall_s": round(b["wall_s"] / a["wall_s"], 2),
        "peak_rss_mib": round(b["peak_rss_mib"] / a["peak_rss_mib"], 2),
    }
    print(
        f"preprocess {CONFIG}: {args.cases} {args.kind} cases (x{args.scale:g}), {args.workers} workers, "
        f"median of {args.repeats}"
    )
    print_table([a, b, ratio], ["tool", "wall_s", "peak_rss_mib", "runs_wall_s"])
    print("agreement:", json.dumps(agree["summary"]))
    key = f"{args.kind}_x{args.scale:g}"
    old = RESULTS / "preprocess.json"
    runs = json.loads(old.read_text()).get("runs", {}) if old.is_file() else {}
    runs[key] = {
        "dataset": dataset,
        "workers": args.workers,
        "repeats": args.repeats,
        "plan": plan,
        "setup_single_run": setup,
        "rows": [a, b, ratio],
        "ratio_time_nnunet_over_autoseg": ratio["wall_s"],
        "ratio_peak_rss_nnunet_over_autoseg": ratio["peak_rss_mib"],
        "per_run": {"autoseg": _strip(ours), "nnunet": _strip(theirs)},
        "agreement": agree,
    }
    print(f"wrote {write_results('preprocess', {'runs': runs})}")


def _strip(runs: list[dict]) -> list[dict]:
    keys = ("wall_s", "peak_rss_mib", "load_avg_1min_before")
    return [{k: r[k] for k in keys} for r in runs]


if __name__ == "__main__":
    main()
