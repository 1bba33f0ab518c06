"""Training quality of the default CPU plan: validation Dice per class of one fold, and how long it took.

    flock /tmp/autoseg-bench.lock python benchmarks/train_cpu_plan.py [--kind ct3d] [--cases 20] [--config 3d_fullres]

The commands a user runs, each timed: ``autoseg synth`` (``--cases`` training cases, seeded), ``fingerprint``,
``plan --device cpu`` (no time budget: the default CPU plan, 0.25 h per training job, with the step time measured
on this machine), ``preprocess`` and ``train -c CONFIG -f 0``. Reported: the plan (patch, batch, network, epochs),
the seconds per iteration the trainer logged, the pseudo-Dice of each epoch, and the full-resolution Dice per class
of the fold's validation cases (``validation/summary.json``, written by the trainer). Prints a table and writes
``benchmarks/results/train_cpu_plan.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import evaluation_seed, print_table, run_measured, write_results  # noqa: E402

AUTOSEG = [sys.executable, "-m", "autoseg.cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="ct3d_hard", choices=["ct3d", "ct3d_hard", "mr3d", "2d"])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help="synthetic seed (default: a fresh one per run)")
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "train_cpu_plan")
    args = parser.parse_args()
    args.seed, seed_source = evaluation_seed(args.seed)
    print(f"synthetic {args.kind}, seed {args.seed} ({seed_source})", flush=True)
    shutil.rmtree(args.work, ignore_errors=True)
    data, run = args.work / "data", args.work / "run"
    stages = {}
    commands = {
        "synth": ["synth", str(data), "--kind", args.kind, "--cases", str(args.cases), "--seed", str(args.seed)],
        "fingerprint": ["fingerprint", str(data), "-o", str(run)],
        "plan": ["plan", str(run), "--device", "cpu"],
        "preprocess": ["preprocess", str(run), "-c", args.config],
        "train": ["train", str(run), "-c", args.config, "-f", "0"],
    }
    for name, cmd in commands.items():
        print(f"[{time.strftime('%H:%M:%S')}] autoseg {' '.join(cmd)}", flush=True)
        stages[name] = {k: v for k, v in run_measured([*AUTOSEG, "-v", *cmd]).items() if k != "output_tail"}
    plans = json.loads((run / "plans.json").read_text())
    c = plans["configurations"][args.config]
    fold = run / "models" / args.config / "fold_0"
    log = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    names = {str(v): k for k, v in plans["labels"].items()}
    dice = {names.get(k, k): round(v["dice"]["mean"], 4) for k, v in summary["per_class"].items()}
    rows = [
        {
            "epoch": r["epoch"] + 1,
            "train_loss": round(r["train_loss"], 4),
            "pseudo_dice": [None if d is None else round(d, 3) for d in r["val_dice"]],
            "s_per_it": r["seconds_per_iteration"],
        }
        for r in log
    ]
    print_table(rows, ["epoch", "train_loss", "pseudo_dice", "s_per_it"])
    print_table([{"stage": k, **v} for k, v in stages.items()], ["stage", "wall_s", "peak_rss_mib"])
    print("validation Dice per class (full resolution, fold 0):", dice)
    payload = {
        "setup": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "work"},
        "seed_source": seed_source,
        "plan": {
            "patch_size": c["patch_size"],
            "batch_size": c["batch_size"],
            "features_per_stage": c["network"]["features_per_stage"],
            "epochs": c["training"]["epochs"],
            "iterations_per_epoch": c["training"]["iterations_per_epoch"],
            "loss": c["loss"]["name"],
            "foreground_oversampling": c["foreground_oversampling"],
            "why": c["why"],
        },
        "stages": stages,
        "train_minutes": round(stages["train"]["wall_s"] / 60, 2),
        "validation_dice": dice,
        "validation_cases": len(summary.get("cases", [])),
        "epochs": rows,
    }
    print("written", write_results("train_cpu_plan", payload))


if __name__ == "__main__":
    main()
