"""Real data at an equal CPU training budget: autoseg vs nnU-Net v2 on the datasets of ``_realdata.py``.

    flock /tmp/autoseg-bench.lock python benchmarks/real.py --dataset isbi_em --minutes 15 [--minutes 60 ...]
        [--max-train N] [--cores 0 1]

``_realdata.materialise`` lays out the dataset's training part (``imagesTr``/``labelsTr``, its first ``--max-train``
cases when given) and its fixed test part (``imagesTs``/``labelsTs``) as an nnU-Net v2 raw folder. Both tools train
on the training part only, side by side, exactly as ``end_to_end.py`` runs them (its :class:`Autoseg` and
:class:`NnUNet` sides: one core and one torch thread each, training started together and stopped at the budget,
nnU-Net's epochs x iterations fitted to the budget by a probe run); nnU-Net uses ``3d_fullres`` for 3D datasets and
``2d`` for 2D ones. Both predict ``imagesTs``, and ``autoseg evaluate`` scores both against ``labelsTs``.

Reported per class and for the foreground mean: mean Dice over test cases with a percentile bootstrap 95% interval
(cases resampled with replacement, ``--resamples`` times, seeded), HD95 for 3D datasets, and the paired per-case
difference autoseg - nnU-Net with its bootstrap interval; plus iterations trained, wall time per stage and peak RAM.
Each ``--minutes`` value is one run in a fresh work folder. Every run is added to
``benchmarks/results/real_<dataset>.json`` under ``runs[<budget>][<timestamp>]``; earlier runs stay.

nnU-Net comes from a benchmark-only venv (``NNUNET_PYTHON``, default ``/work/nnunet-venv/bin/python``; never a
dependency of autoseg), with the CPU build of torch pinned before nnunetv2 so that pip does not pull a CUDA build::

    python3 -m venv /work/nnunet-venv
    /work/nnunet-venv/bin/pip install torch==2.13.0
    /work/nnunet-venv/bin/pip install nnunetv2 'torch==2.13.0'
    /work/nnunet-venv/bin/pip uninstall -y torchvision  # CUDA-only wheel here; nnU-Net's default path never uses it
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _realdata  # noqa: E402
import end_to_end as e2e  # noqa: E402
from _measure import NNUNET_PYTHON, add_run, git_commit, machine, print_table  # noqa: E402

from autoseg.evaluation.statistics import paired_bootstrap  # noqa: E402

TOOLS = ("autoseg", "nnunet")
#: autoseg predicting with nnU-Net's prediction settings (every flip combination, fp32): the equal-settings row.
EQUAL = "autoseg_nnunet_settings"
EQUAL_FLAGS = ("--mirror", "all", "--precision", "fp32")
RESULTS_FORMAT = 1


def split_facts(ds: _realdata.RealDataset, data: Path, max_train: int | None) -> dict:
    """The test split (ids, rule, seed) and the training cases used."""
    bullets = re.findall(r"^- ``(\w+)``: (.*?)(?=^- |^$)", _realdata.__doc__, re.M | re.S)
    rule = " ".join(next((text for key, text in bullets if key == ds.key), "").split())
    train = sorted(p.name[: -len(f"_0000{ds.ending}")] for p in (data / "imagesTr").glob(f"*_0000{ds.ending}"))
    return {
        "rule": rule,
        "seed": _realdata.SEED,
        "test_cases": _realdata.test_cases(ds),
        "train_cases": train,
        "max_train": max_train,
    }


def per_case(summary: dict, metric: str, classes: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Case ids (sorted) and, per class and for ``mean`` (over the foreground classes), one value per case.

    Undefined values (``null`` in summary.json: an HD95 with one mask empty) are NaN, and so is the mean of a case
    with an undefined class value (averaging only the defined ones would hide a missed structure).
    """
    cases = sorted(summary["cases"], key=lambda c: c["case"])
    values = {
        k: np.array([math.nan if c["metrics"][k][metric] is None else c["metrics"][k][metric] for c in cases])
        for k in classes
    }
    values["mean"] = np.stack([values[k] for k in classes]).mean(axis=0)
    return [c["case"] for c in cases], values


def interval(values: np.ndarray, reference: np.ndarray | None, *, resamples: int, seed: int) -> dict:
    """Mean of ``values`` (minus ``reference``, paired by case) and its bootstrap 95% interval, over the cases where
    both are defined; ``n`` cases used, ``n_undefined`` left out."""
    other = np.zeros_like(values) if reference is None else reference
    ok = np.isfinite(values) & np.isfinite(other)
    result = {"mean": None, "low": None, "high": None, "n": int(ok.sum()), "n_undefined": int((~ok).sum())}
    if ok.any():
        mean, low, high = paired_bootstrap(values[ok], other[ok], n_resamples=resamples, seed=seed)
        result.update(mean=round(mean, 4), low=round(low, 4), high=round(high, 4))
    return result


def against(summaries: dict[str, dict], classes: dict[str, str], reference: str, *, resamples: int, seed: int) -> dict:
    """Dice per class and foreground mean of each run (an evaluation summary per name), each with its interval and
    the paired difference ``<name>-<reference>``; ``classes`` maps label value (str) to name."""
    values = {n: per_case(s, "dice", list(classes))[1] for n, s in summaries.items()}
    stats: dict[str, dict] = {"dice": {}}
    for k in [*classes, "mean"]:
        row: dict[str, dict] = {}
        for n, v in values.items():
            row[n] = interval(v[k], None, resamples=resamples, seed=seed)
            if n != reference and reference in values:
                row[f"{n}-{reference}"] = interval(v[k], values[reference][k], resamples=resamples, seed=seed)
        stats["dice"][classes.get(k, k)] = row
    return stats


def compare(summaries: dict[str, dict], metrics: list[str], classes: dict[str, str], *, resamples: int, seed: int):
    """Per metric and class (and foreground mean): each tool's mean with its interval, and the paired difference.

    Returns ``(statistics, per_case_values)``; ``classes`` maps label value (str) to name.
    """
    stats: dict[str, dict] = {}
    cases: dict[str, dict] = {tool: {} for tool in summaries}
    ours = [t for t in summaries if t != "nnunet"]
    for metric in metrics:
        ids, values = {}, {}
        for tool in summaries:
            ids[tool], values[tool] = per_case(summaries[tool], metric, list(classes))
        if any(ids[t] != ids["nnunet"] for t in ours):
            raise RuntimeError(f"the tools' predictions cover different cases: {ids}")
        stats[metric] = {}
        for k in [*classes, "mean"]:
            b = values["nnunet"][k]
            entry = {t: interval(values[t][k], None, resamples=resamples, seed=seed) for t in summaries}
            for t in ours:
                entry[f"{t}_minus_nnunet"] = interval(values[t][k], b, resamples=resamples, seed=seed)
            stats[metric][classes.get(k, k)] = entry
            for tool in summaries:
                for case, x in zip(ids[tool], values[tool][k]):
                    entry = cases[tool].setdefault(case, {}).setdefault(classes.get(k, k), {})
                    entry[metric] = None if not math.isfinite(x) else round(float(x), 4)
    return stats, cases


def metric_rows(stats: dict) -> list[dict]:
    """The printed metric table: one row per metric and class, ``mean [low, high]`` per column."""

    def cell(s: dict) -> str:
        if s["mean"] is None:
            return f"undefined in all {s['n_undefined']} cases"
        text = f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"
        return text + (f" ({s['n_undefined']} undef.)" if s["n_undefined"] else "")

    return [
        {"metric": metric, "class": name, **{col: cell(s) for col, s in by_tool.items()}}
        for metric, by_class in stats.items()
        for name, by_tool in by_class.items()
    ]


def tool_settings(sides: dict[str, e2e.Side]) -> dict:
    """Both tools' settings as run: network, patch, batch, mirroring (training and prediction), precision."""
    import torch

    from autoseg.devices import inference_dtype

    autoseg = sides["autoseg"].facts
    dtype = inference_dtype("auto", torch.device("cpu"))
    nnunet = sides["nnunet"].facts
    return {
        "autoseg": {
            "planner": "default (plan --device cpu --time-budget BUDGET)",
            "configurations": {
                name: {k: c[k] for k in ("patch_size", "batch_size", "features_per_stage", "parameters")}
                | {
                    "mirror_axes_training": c["mirror_axes"],
                    "training_precision": "fp32" if c["precision"] in ("auto", "fp32") else c["precision"],
                }
                for name, c in autoseg["configurations"].items()
            },
            "prediction_nnunet_settings": {
                "row": EQUAL,
                "flags": list(EQUAL_FLAGS),
                "mirroring": "every flip combination (as nnU-Net)",
                "precision": "fp32",
            },
            "prediction": {
                "mirroring": "--mirror auto: one flip per axis on a CPU (not every combination)",
                "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
                "checkpoint": "final" if not sides["autoseg"].stages["train"]["stopped_at_budget"] else "latest",
            },
            "plan_why": autoseg["plan_why"],
        },
        "nnunet": {
            "planner": "ExperimentPlanner (nnUNetv2_plan_experiment defaults)",
            "configuration": nnunet["configuration"],
            **{k: nnunet[k] for k in ("patch_size", "batch_size", "features_per_stage", "parameters")},
            "mirror_axes_training": nnunet["mirror_axes"],
            "training_precision": "fp32 (nnU-Net autocasts on CUDA only)",
            "trainer": "nnUNetTrainer defaults, epochs x iterations fitted to the budget (nnUNetTrainerE2EBudget)",
            "schedule": nnunet["schedule"],
            "prediction": {
                "mirroring": f"every flip combination of axes {nnunet['mirror_axes']}",
                "precision": "fp32",
                "tile_step": 0.5,
                "checkpoint": nnunet["checkpoint_used"],
            },
        },
    }


def versions() -> dict:
    code = "import importlib.metadata as m; print(m.version('nnunetv2'), m.version('torch'))"
    nn_versions = subprocess.run([NNUNET_PYTHON, "-c", code], capture_output=True, text=True).stdout.split()
    import torch

    return {
        "autoseg_commit": git_commit(),
        "torch_autoseg": torch.__version__,
        "nnunetv2": nn_versions[0] if nn_versions else None,
        "torch_nnunet": nn_versions[1] if len(nn_versions) > 1 else None,
    }


def run_budget(ds: _realdata.RealDataset, minutes: float, args: argparse.Namespace) -> None:
    """One run: both tools trained for ``minutes`` each, scored, printed and added to the results file."""
    group = f"{minutes:g}min" + (f"_train{args.max_train}" if args.max_train else "")
    work = args.work.resolve() / ds.key / group
    shutil.rmtree(work, ignore_errors=True)
    data = _realdata.materialise(ds, work / "nnUNet_raw", max_train=args.max_train)
    task = e2e.NnUNetTask(ds.nnunet_id, ds.nnunet_name, "3d_fullres" if ds.dim == 3 else "2d")
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    sides = {s.name: s for s in e2e.run_sides(data, work, minutes * 60, args.cores, task)}

    classes = {str(v): k for k, v in ds.labels.items() if v != 0}
    labels = [int(k) for k in classes]
    # equal-settings row: the same autoseg model, predicting with nnU-Net's flips and precision
    sides["autoseg"].predict_to("predict_nnunet_settings", data, work / f"pred_{EQUAL}", *EQUAL_FLAGS)
    summaries = {
        t: e2e.evaluate_summary(work / f"pred_{t}", data / "labelsTs", work / f"eval_{t}", labels=labels)
        for t in (*TOOLS, EQUAL)
    }
    metrics = ["dice", "hd95_mm"] if ds.dim == 3 else ["dice"]
    stats, cases = compare(summaries, metrics, classes, resamples=args.resamples, seed=args.seed)
    split = split_facts(ds, data, args.max_train)
    rows = [e2e.stage_row(sides[t]) for t in TOOLS]

    print(
        f"\n{ds.key}: {minutes:g} min of training each, one core each, {len(split['train_cases'])} training cases, "
        f"{len(split['test_cases'])} test cases; bootstrap 95% intervals over test cases ({args.resamples} resamples)"
    )
    columns = ["tool", "fingerprint_s", "plan_s", "preprocess_s", "train_s", "stopped", "iterations", "select_s"]
    print_table(rows, columns + ["predict_s", "train_rss_mib", "predict_rss_mib"])
    print()
    columns = ["metric", "class", "autoseg", "nnunet", "autoseg_minus_nnunet", EQUAL, f"{EQUAL}_minus_nnunet"]
    print_table(metric_rows(stats), columns)

    entry = {
        "started": started,
        "budget_minutes": minutes,
        "split": split,
        "machine": {
            **machine(),
            "cores_used": {"autoseg": args.cores[0], "nnunet": args.cores[1]},
            "threads_per_tool": 1,
            "data_loader_processes": 0,
        },
        "versions": versions(),
        "bootstrap": {"resamples": args.resamples, "seed": args.seed, "confidence": 0.95, "unit": "test case"},
        "iterations": {t: e2e.iterations_done(sides[t]) for t in TOOLS},
        "settings": tool_settings(sides),
        "metrics": stats,
        "rows": rows,
        "stages": {t: sides[t].stages for t in TOOLS},
        "evaluate_s": {t: summaries[t]["wall_s"] for t in TOOLS},
        "per_case": cases,
        "plans": {t: sides[t].facts for t in TOOLS},
    }
    header = {"dataset": ds.key, "format": RESULTS_FORMAT}
    print(f"wrote {add_run(args.name or f'real_{ds.key}', header, group, started, entry)} ({group}/{started})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(_realdata.DATASETS))
    parser.add_argument(
        "--minutes", type=float, action="append", required=True, help="training budget of each tool; repeat for more"
    )
    parser.add_argument("--max-train", type=int, help="train on the first N training cases only")
    parser.add_argument("--cores", type=int, nargs=2, default=[0, 1], metavar=("AUTOSEG", "NNUNET"))
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "real")
    parser.add_argument("--name", help="results file name (default real_<dataset>)")
    args = parser.parse_args()
    if args.name and not re.fullmatch(r"[\w.-]+", args.name):
        parser.error(f"--name {args.name!r}: use letters, digits, '_', '.', '-'")
    for minutes in args.minutes:
        run_budget(_realdata.DATASETS[args.dataset], minutes, args)


if __name__ == "__main__":
    main()
