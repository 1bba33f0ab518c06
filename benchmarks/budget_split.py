"""How to spend a training budget: one model on all cases vs a 5-fold cross-validation ensemble, on real data.

    flock /tmp/autoseg-bench.lock python benchmarks/budget_split.py --dataset hippocampus --minutes 60

The planner must decide, for a given time budget, whether to train one model on every case (all the budget in one
network) or a 5-fold cross-validation (five networks with a fifth of the budget each, whose ensemble is predicted
and which makes selection and postprocessing possible). This script measures that choice at one budget on one real
dataset, without touching its test split: ``_realdata.materialise(dev=True)`` lays out the training part minus its
development split (``_realdata.dev_cases``) for training and the development split for scoring.

Two autoseg runs of the same commit train side by side, each pinned to its own core with one torch thread (as in
``end_to_end.py``), started and stopped together at the budget:

- ``one_model``: ``autoseg plan --cross-validation never`` (one model, the primary configuration, every iteration);
- ``cross_validation``: ``autoseg plan --cross-validation always`` (5 folds of the primary configuration, when the
  budget cannot fit more configurations; ``autoseg select`` then picks the ensemble and postprocessing).

Both predict the development cases with their defaults and ``autoseg evaluate`` scores them. Reported: Dice per
class and foreground mean with a bootstrap 95% interval over the development cases, the paired difference
``one_model - cross_validation``, iterations per model, wall times. Every run is added to
``benchmarks/results/budget_split_<dataset>.json`` under ``runs[<budget>][<timestamp>]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _realdata  # noqa: E402
import end_to_end as e2e  # noqa: E402
from _measure import add_run, machine, print_table  # noqa: E402
from real import interval, metric_rows, per_case, versions  # noqa: E402

VARIANTS = {"one_model": "never", "cross_validation": "always"}


def run_budget(ds: _realdata.RealDataset, minutes: float, args: argparse.Namespace) -> None:
    group = f"{minutes:g}min"
    work = args.work.resolve() / ds.key / group
    shutil.rmtree(work, ignore_errors=True)
    data = _realdata.materialise(ds, work / "raw", dev=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    barrier = threading.Barrier(len(VARIANTS))
    sides = []
    for (name, policy), core in zip(VARIANTS.items(), args.cores):
        side = e2e.Autoseg(name, work, core, minutes * 60, barrier)
        side.plan_flags = ("--cross-validation", policy)
        sides.append(side)
    threads = [threading.Thread(target=s.run, args=(data,)) for s in sides]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(s.error for s in sides):
        raise SystemExit(f"a variant failed; logs in {work / 'logs'}")

    classes = {str(v): k for k, v in ds.labels.items() if v != 0}
    summaries = {
        s.name: e2e.evaluate_summary(
            work / f"pred_{s.name}", data / "labelsTs", work / f"eval_{s.name}", labels=[int(k) for k in classes]
        )
        for s in sides
    }
    stats: dict[str, dict] = {"dice": {}}
    values = {name: per_case(summary, "dice", list(classes))[1] for name, summary in summaries.items()}
    for k in [*classes, "mean"]:
        a, b = values["one_model"][k], values["cross_validation"][k]
        stats["dice"][classes.get(k, k)] = {
            "one_model": interval(a, None, resamples=args.resamples, seed=args.seed),
            "cross_validation": interval(b, None, resamples=args.resamples, seed=args.seed),
            "one_model_minus_cross_validation": interval(a, b, resamples=args.resamples, seed=args.seed),
        }
    rows = [e2e.stage_row(s) for s in sides]
    dev = _realdata.dev_cases(ds)
    print(f"\n{ds.key}: {minutes:g} min of training per variant, one core each, {len(dev)} development cases")
    print_table(rows, ["tool", "plan_s", "preprocess_s", "train_s", "stopped", "iterations", "select_s", "predict_s"])
    print()
    print_table(metric_rows(stats), ["metric", "class", *VARIANTS, "one_model_minus_cross_validation"])
    entry = {
        "started": started,
        "budget_minutes": minutes,
        "split": {"rule": " ".join(_realdata.dev_cases.__doc__.split()), "dev_cases": dev, "seed": _realdata.SEED + 1},
        "machine": {**machine(), "cores_used": dict(zip(VARIANTS, args.cores)), "threads_per_tool": 1},
        "versions": versions(),
        "variants": {name: f"autoseg plan --cross-validation {policy}" for name, policy in VARIANTS.items()},
        "bootstrap": {"resamples": args.resamples, "seed": args.seed, "confidence": 0.95, "unit": "development case"},
        "iterations": {s.name: e2e.iterations_done(s) for s in sides},
        "metrics": stats,
        "rows": rows,
        "plans": {s.name: s.facts for s in sides},
    }
    header = {"dataset": ds.key, "format": 1}
    print(f"wrote {add_run(f'budget_split_{ds.key}', header, group, started, entry)} ({group}/{started})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(_realdata.DATASETS))
    parser.add_argument("--minutes", type=float, action="append", required=True, help="budget; repeat for more")
    parser.add_argument("--cores", type=int, nargs=2, default=[0, 1], metavar=("ONE_MODEL", "CROSS_VALIDATION"))
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=HERE / "work" / "budget_split")
    args = parser.parse_args()
    for minutes in args.minutes:
        run_budget(_realdata.DATASETS[args.dataset], minutes, args)


if __name__ == "__main__":
    main()
