"""Compare plan variants by a cross-validation fold they were all trained on (never the test split).

    python benchmarks/fold_compare.py --name NAME --what "..." --variant A=RUN_A --variant B=RUN_B [--config 2d]
        [--fold 0] [--command A="..."]

Each RUN is a run folder whose fold was trained by ``autoseg train RUN -c CONFIG -f FOLD`` on the *training* part of
a dataset (``_realdata.materialise``): the fold's validation cases come from that part, so choosing a rule from
this comparison leaves the test split untouched. For each variant the script reads what the trainer wrote (the
configuration it trained, ``log.jsonl``, ``validation/summary.json``: full-resolution metrics of the fold's
validation cases) and reports Dice per class and foreground mean with a bootstrap 95% interval over the validation
cases, the paired difference to the first variant, and the pseudo-Dice curve (EMA) at a few iteration counts.
Prints a table and adds the comparison to ``benchmarks/results/fold_compare_<NAME>.json`` (earlier comparisons stay).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import add_run, machine, print_table  # noqa: E402

from autoseg.evaluation.statistics import paired_bootstrap  # noqa: E402

#: Plan fields reported per variant (the ones rules decide).
FIELDS = ("patch_size", "batch_size", "loss", "foreground_oversampling", "augmentation")


def read_variant(run: Path, config: str, fold: int) -> dict:
    """What the fold trained with and what it reached."""
    folder = run / "models" / config / f"fold_{fold}"
    configuration = json.loads((folder / "configuration.json").read_text())
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    iterations = configuration["training"]["iterations_per_epoch"]
    return {
        "run": str(run),
        "configuration": {k: configuration[k] for k in FIELDS}
        | {"features_per_stage": configuration["network"]["features_per_stage"]},
        "epochs": len(log),
        "iterations": len(log) * iterations,
        "seconds_per_iteration": round(float(np.median([r["seconds_per_iteration"] for r in log])), 3),
        "curve": [
            {"iterations": (r["epoch"] + 1) * iterations, "ema_pseudo_dice": round(r["ema_dice"], 4)} for r in log
        ],
        "summary": summary,
    }


def per_case_dice(summary: dict) -> tuple[list[str], dict[str, np.ndarray]]:
    cases = sorted(summary["cases"], key=lambda c: c["case"])
    classes = sorted(cases[0]["metrics"])
    values = {k: np.array([c["metrics"][k]["dice"] for c in cases], float) for k in classes}
    values["mean"] = np.stack([values[k] for k in classes]).mean(axis=0)
    return [c["case"] for c in cases], values


def _ci(s: dict) -> str:
    return f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="results file name")
    parser.add_argument("--what", required=True, help="what is compared, in words")
    parser.add_argument("--variant", action="append", required=True, metavar="LABEL=RUN")
    parser.add_argument("--command", action="append", default=[], metavar="LABEL=COMMANDS", help="how RUN was made")
    parser.add_argument("--config", default="2d")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    variants = {k: read_variant(Path(v), args.config, args.fold) for k, v in (a.split("=", 1) for a in args.variant)}
    commands = dict(a.split("=", 1) for a in args.command)
    first = next(iter(variants))
    ids0, base = per_case_dice(variants[first]["summary"])
    rows, stats = [], {}
    for label, v in variants.items():
        ids, values = per_case_dice(v["summary"])
        if ids != ids0:
            raise SystemExit(f"variant {label} was validated on other cases than {first}: {ids} vs {ids0}")
        stats[label] = {}
        for k, x in values.items():
            mean, low, high = paired_bootstrap(x, np.zeros_like(x), n_resamples=args.resamples, seed=0)
            d = paired_bootstrap(x, base[k], n_resamples=args.resamples, seed=0)
            stats[label][k] = {"mean": round(mean, 4), "low": round(low, 4), "high": round(high, 4)}
            stats[label][k]["minus_" + first] = {"mean": round(d[0], 4), "low": round(d[1], 4), "high": round(d[2], 4)}
        curve = {c["iterations"]: c["ema_pseudo_dice"] for c in v["curve"]}
        marks = [i for i in sorted(curve) if i in (250, 500, 750, 1000) or i == max(curve)]
        rows.append(
            {
                "variant": label,
                "loss": v["configuration"]["loss"]["name"],
                "oversampling": v["configuration"]["foreground_oversampling"],
                "iterations": v["iterations"],
                "s_per_it": v["seconds_per_iteration"],
                **{f"dice_{k}": _ci(s) for k, s in stats[label].items()},
                f"mean_minus_{first}": "{mean:.3f} [{low:.3f}, {high:.3f}]".format(
                    **stats[label]["mean"]["minus_" + first]
                ),
                "ema_curve": ", ".join(f"{i}: {curve[i]:.3f}" for i in marks),
            }
        )
    print(f"{args.what}; {args.config} fold {args.fold}, {len(ids0)} validation cases, bootstrap 95% over cases")
    print_table(rows, list(rows[0]))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    entry = {
        "what": args.what,
        "config": args.config,
        "fold": args.fold,
        "validation_cases": ids0,
        "machine": machine(),
        "commands": commands,
        "statistics": stats,
        "variants": {k: {kk: vv for kk, vv in v.items() if kk != "summary"} for k, v in variants.items()},
    }
    print(f"wrote {add_run(f'fold_compare_{args.name}', {'format': 1}, 'comparisons', started, entry)}")


if __name__ == "__main__":
    main()
