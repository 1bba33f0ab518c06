"""Architecture families at an equal CPU budget on real data: test Dice with bootstrap intervals, step time, size.

    flock /tmp/autoseg-bench.lock python benchmarks/architectures.py --dataset hippocampus --dataset dsb2018 \\
        --iterations 1000 [--families plain,residual,...] [--threads 1] [--results DIR]

Conditions (the same for every family; written into the results file):

- one base run folder per dataset: ``autoseg fingerprint`` of the training part (``_realdata.materialise``: the
  fixed test split is never trained on), ``autoseg plan --device cpu --cross-validation never`` and ``autoseg
  preprocess`` of the primary configuration (3d_fullres for Hippocampus, 2d for a 2D dataset), done once;
- each family gets the rule plan's configuration with only the family changed, through the search space
  (``build_candidate`` with ``block=<family>``): same patch and batch, the rule's widths, the family's default
  blocks per stage; a family that does not fit the plan's memory or CPU step-time target is repaired the way the
  search repairs it (the repair is reported) or excluded (reported, not trained);
- **equal iterations** (``--iterations``, default 1000), not equal time: the step time differs by family and is
  reported, so equal time follows from the table (iterations / step time). One model per family on every
  training case (fold ``all``), the plan's learning rate, schedule, loss and augmentation, seed 12345;
- prediction of the test split with autoseg's defaults; ``autoseg evaluate`` scores it. Dice per class and the
  foreground mean, each with a bootstrap 95% interval over test cases, and the paired difference to ``plain``;
- step time: the fastest of three timed training steps (``measure_step_seconds``) at the planned patch and batch,
  with ``--threads`` torch threads (default 1), as every training here runs; parameters: the built network's.

Adds the run to ``benchmarks/results/architectures.json`` (``--results`` for another folder) as
``runs[<dataset>][<start time>]`` after every family, keeping earlier runs, and prints a table per dataset.
Expected run time on one quiet core: about 10-25 min per family and dataset at 1000 iterations (ConvNeXt's
depthwise 3D convolutions are the slowest on a CPU); ``--iterations 20 --max-test 4`` checks the script in minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _realdata  # noqa: E402
from _measure import RESULTS, add_run, git_commit, machine, print_table, run_autoseg  # noqa: E402
from real import against, metric_rows  # noqa: E402

from autoseg.errors import PlanningError  # noqa: E402
from autoseg.networks import build_network, list_blocks  # noqa: E402
from autoseg.planning.device import measure_step_seconds  # noqa: E402
from autoseg.planning.planner import primary_configuration  # noqa: E402
from autoseg.planning.plans import load_plans  # noqa: E402
from autoseg.search.objective import prepare_trial_dir  # noqa: E402
from autoseg.search.space import FAMILIES, build_candidate, rule_params  # noqa: E402


def _base(ds: _realdata.RealDataset, work: Path, args: argparse.Namespace) -> tuple[Path, Path, str]:
    """Materialised data, the planned and preprocessed base run folder, and its primary configuration."""
    data = _realdata.materialise(ds, work / "raw")
    if args.max_test:  # a quick check: fewer test cases
        for sub in ("imagesTs", "labelsTs"):
            for extra in sorted((data / sub).iterdir())[args.max_test :]:
                extra.unlink()
    base = work / "base"
    if not (base / "plans.json").is_file():
        run_autoseg(["fingerprint", str(data), "-o", str(base), "-j", "1"], work / "logs" / "fingerprint", 1)
        plan = ["plan", str(base), "--device", "cpu", "--cross-validation", "never"]
        run_autoseg(plan, work / "logs" / "plan", args.threads)
    config = primary_configuration(load_plans(base).configurations)
    run_autoseg(["preprocess", str(base), "-c", config, "-j", "1"], work / "logs" / "preprocess", 1)
    return data, base, config


def _family(family: str, base: Path, data: Path, config: str, work: Path, args: argparse.Namespace) -> dict:
    """Train, predict and score one family; returns its facts (and its evaluation summary)."""
    import torch

    plans = load_plans(base)
    try:
        params = {**rule_params(plans, config), "block": family}
        # every step priced alike: the training length is set below (equal iterations), not capped by compute
        candidate = build_candidate(plans, params, config=config, step_cost=lambda net, patch, batch: 1.0)
    except PlanningError as exc:
        return {"family": family, "excluded": str(exc)}
    c = candidate.configuration
    per_epoch = min(c.training.iterations_per_epoch, args.iterations)
    training = dataclasses.replace(
        c.training, epochs=-(-args.iterations // per_epoch), iterations_per_epoch=per_epoch, val_iterations=1
    )
    one = dataclasses.replace(candidate.plans, configurations={config: dataclasses.replace(c, training=training)})
    run = prepare_trial_dir(base, work / family, one, fresh=not args.keep)
    train_s = run_autoseg(["train", str(run), "-c", config, "-f", "all", "-j", "0"], run / "log_train", args.threads)
    pred = run / "pred"
    predict_s = run_autoseg(
        ["predict", "-m", str(run), "-i", str(data / "imagesTs"), "-o", str(pred)],
        run / "log_predict",
        args.threads,
    )
    labels = [str(v) for k, v in sorted(plans.labels.items(), key=lambda kv: kv[1]) if v != 0]
    evaluate = ["evaluate", str(pred), str(data / "labelsTs"), "-o", str(run / "eval"), "-j", "1"]
    run_autoseg([*evaluate, "--labels", *labels], run / "log_evaluate", 1)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    torch.set_num_threads(args.threads)
    n_in, n_out = len(plans.channels), plans.n_outputs
    step_s = measure_step_seconds(c.network, n_in, n_out, c.patch_size, c.batch_size)
    n_params = sum(p.numel() for p in build_network(c.network, n_in, n_out).parameters())
    return {
        "family": family,
        "patch_size": list(c.patch_size),
        "batch_size": c.batch_size,
        "features_per_stage": list(c.network.features_per_stage),
        "repairs": list(candidate.notes),
        "iterations": training.epochs * per_epoch,
        "step_s": round(step_s, 3),
        "parameters": n_params,
        "train_s": round(train_s, 1),
        "predict_s": round(predict_s, 1),
        "summary": summary,
    }


def run_dataset(ds: _realdata.RealDataset, args: argparse.Namespace, conditions: dict) -> None:
    work = args.work.resolve() / ds.key
    data, base, config = _base(ds, work, args)
    classes = {str(v): k for k, v in ds.labels.items() if v != 0}
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    entry = {**conditions, "started": started, "configuration": config, "families": {}}
    entry["test_cases"] = len(list((data / "labelsTs").iterdir()))
    for family in args.families:
        print(f"{ds.key}: {family} ...", flush=True)
        entry["families"][family] = _family(family, base, data, config, work, args)
        trained = {f: r["summary"] for f, r in entry["families"].items() if "summary" in r}
        entry["dice"] = against(trained, classes, "plain", resamples=args.resamples, seed=args.seed)
        path = add_run("architectures", {"format": 1}, ds.key, started, entry, folder=args.results)
    rows = [
        {k: r.get(k, "") for k in ("family", "step_s", "parameters", "iterations", "train_s", "excluded")}
        | {"repairs": "; ".join(r.get("repairs", []))}
        for r in entry["families"].values()
    ]
    print(f"\n{ds.key} ({config}, {args.iterations} iterations per family, {entry['test_cases']} test cases)")
    print_table(rows, ["family", "step_s", "parameters", "iterations", "train_s", "repairs", "excluded"])
    columns = [c for c in metric_rows(entry["dice"])[0] if c not in ("metric", "class")]
    print_table(metric_rows(entry["dice"]), ["metric", "class", *columns])
    print(f"wrote {path} ({ds.key}/{started})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", choices=sorted(_realdata.DATASETS), required=True)
    parser.add_argument("--families", type=lambda s: s.split(","), default=list(FAMILIES), help="comma-separated")
    parser.add_argument("--iterations", type=int, default=1000, help="training iterations per family")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every training and timing")
    parser.add_argument("--max-test", type=int, default=None, help="score only the first N test cases (a check)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="resume families already (partly) trained in --work")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "architectures")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of architectures.json")
    args = parser.parse_args()
    unknown = sorted(set(args.families) - set(list_blocks()))
    if unknown:
        parser.error(f"unknown families {unknown}; registered: {', '.join(list_blocks())}")
    conditions = {
        "machine": {**machine(), "threads": args.threads},
        "autoseg_commit": git_commit(),
        "conditions": " ".join((__doc__ or "").split("Conditions")[1].split("Writes")[0].split()),
        "budget": {"kind": "equal iterations", "iterations": args.iterations},
        "bootstrap": {"resamples": args.resamples, "seed": args.seed, "confidence": 0.95, "unit": "test case"},
        "max_test": args.max_test,
    }
    for key in args.dataset:
        run_dataset(_realdata.DATASETS[key], args, conditions)


if __name__ == "__main__":
    main()
