"""The cascade (3d_lowres -> 3d_cascade_fullres) against 3d_fullres on large images where context decides the class.

    flock /tmp/autoseg-bench.lock python benchmarks/cascade.py [--cases 12] [--test-cases 8] [--iterations 500]
        [--folds 3] [--threads 1] [--work DIR] [--results DIR]

Conditions (fixed before any result was seen; written into the results file):

- data: the synthetic ``ct3d_context`` kind (about 68 x 240 x 270 voxels of 2 x 0.8 x 0.8 mm; a fresh seed per
  run, drawn unless ``--data-seed`` is given, and recorded: seed 0 was the development data): two
  kidney-like organs that look alike, one per side, and a heart on a random side; the organ on the heart's side is
  class 1, the other class 2, the heart class 3. ``--cases`` training cases; ``--test-cases`` further cases score
  only (nothing is chosen on them);
- one run folder: ``autoseg run --device cpu --cross-validation always --n-folds F`` with ``--configs 3d_fullres
  3d_cascade_fullres``: the rule plan (the benchmark stops if the rules do not plan the cascade), every
  configuration trained ``--iterations`` iterations per fold (epochs of 50), then ``select`` on cross-validation;
- the equal-compute row: 3d_fullres once more with twice the iterations (as many as 3d_lowres and the cascade
  stage together), same folds and preprocessed data;
- test prediction of each configuration by the ensemble of its F folds, autoseg's defaults but no mirroring (for
  time: every configuration alike);
  ``autoseg evaluate``: Dice per class and foreground mean with a bootstrap 95% interval over test cases, and the
  paired difference to 3d_fullres; also the cross-validation Dice ``select`` saw and what it chose, and the
  training seconds of each configuration (all folds; the cascade's include its 3d_lowres stage).

Adds the run to ``benchmarks/results/cascade.json`` as ``runs[<iterations>it][<start time>]`` and prints a table.
Expected run time on one core: about 3.5 h at the defaults (the validation predictions of large images included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import RESULTS, add_run, git_commit, machine, print_table, run_autoseg  # noqa: E402
from real import against, metric_rows  # noqa: E402

from autoseg.data.synth import KINDS, make_dataset  # noqa: E402
from autoseg.inference.selection import load_selection  # noqa: E402
from autoseg.planning.plans import load_plans  # noqa: E402
from autoseg.search.objective import prepare_trial_dir  # noqa: E402

KIND, PER_EPOCH = "ct3d_context", 50
FULL, CASCADE, LONG = "3d_fullres", "3d_cascade_fullres", "3d_fullres_2x"


def _seconds(run: Path, config: str) -> float:
    """Training seconds of every fold of ``config`` (sum of the epochs' ``seconds`` in their logs)."""
    logs = sorted((run / "models" / config).glob("fold_*/log.jsonl"))
    return round(sum(json.loads(line)["seconds"] for log in logs for line in log.read_text().splitlines()), 1)


def _train(data: Path, work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The cross-validated run of 3d_fullres and the cascade, and the run of 3d_fullres with twice the iterations."""
    run, long = work / "run", work / "fullres_2x"
    schedule = [f"training.iterations_per_epoch={PER_EPOCH}", "training.val_iterations=2"]
    epochs = max(1, args.iterations // PER_EPOCH)
    if not (run / "plans.json").is_file():
        plan = ["plan", str(run), "--device", "cpu", "--cross-validation", "always"]
        run_autoseg(["fingerprint", str(data), "-o", str(run), "-j", "1"], work / "logs" / "fingerprint", 1)
        sets = [a for s in [*schedule, f"training.epochs={epochs}"] for a in ("--set", s)]
        run_autoseg([*plan, *sets], work / "logs" / "plan", args.threads)
    plans = load_plans(run)
    if CASCADE not in plans.configurations:
        why = " ".join(plans.configurations[FULL].why)
        raise SystemExit(f"the rules did not plan the cascade for {data}; 3d_fullres: {why}")
    cmd = ["run", str(data), "-o", str(run), "--device", "cpu", "--n-folds", str(args.folds), "-j", "1"]
    run_autoseg([*cmd, "--configs", FULL, CASCADE], work / "logs" / "run", args.threads)
    full = plans.configurations[FULL]
    twice = dataclasses.replace(full, training=dataclasses.replace(full.training, epochs=2 * epochs))
    prepare_trial_dir(run, long, dataclasses.replace(plans, configurations={FULL: twice}), fresh=not args.keep)
    run_autoseg(["train", str(long), "-c", FULL, "-j", "0"], work / "logs" / "train_2x", args.threads)
    return run, long


def _score(name: str, run: Path, config: str, data: Path, work: Path, args: argparse.Namespace) -> dict:
    pred, labels = work / "pred" / name, [str(v) for v in (1, 2, 3)]
    predict_s = run_autoseg(
        ["predict", "-m", str(run), "--configs", config, "--no-tta", "-i", str(data / "imagesTs"), "-o", str(pred)],
        work / "logs" / f"predict_{name}",
        args.threads,
    )
    out = work / "eval" / name
    evaluate = ["evaluate", str(pred), str(data / "labelsTs"), "-o", str(out), "-j", "1", "--labels", *labels]
    run_autoseg(evaluate, work / "logs" / f"evaluate_{name}", 1)
    return {"predict_s": round(predict_s, 1), "summary": json.loads((out / "summary.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--test-cases", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=500, help="training iterations per fold")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--data-seed", type=int, help="seed of the synthetic cases (default: a fresh random one)")
    parser.add_argument("--keep", action="store_true", help="resume what an earlier run left in --work")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "cascade")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of cascade.json")
    args = parser.parse_args()
    work = args.work.resolve()
    if not args.keep and work.exists():
        shutil.rmtree(work)
    started, commit = time.strftime("%Y-%m-%dT%H:%M:%S"), git_commit()
    data, seed_file = work / "data", work / "data_seed.txt"
    if seed_file.is_file():  # --keep: the cases already made
        args.data_seed = int(seed_file.read_text())
    elif args.data_seed is None:
        args.data_seed = secrets.randbelow(2**31)
    if not (data / "dataset.json").is_file():
        make_dataset(data, KIND, args.cases, test_cases=args.test_cases, seed=args.data_seed)
        seed_file.write_text(str(args.data_seed))
    run, long = _train(data, work, args)
    plans, selection = load_plans(run), load_selection(run)
    assert selection is not None
    scored = {FULL: (run, FULL), CASCADE: (run, CASCADE), LONG: (long, FULL)}
    results = {name: _score(name, r, c, data, work, args) for name, (r, c) in scored.items()}
    classes = {str(v): k for k, v in KINDS[KIND].labels.items() if v}
    summaries = {n: r["summary"] for n, r in results.items()}
    dice = against(summaries, classes, FULL, resamples=args.resamples, seed=args.seed)["dice"]
    configs = {name: plans.configurations[name] for name in ("3d_fullres", "3d_lowres")}
    entry = {
        "machine": {**machine(), "threads": args.threads},
        "autoseg_commit": commit,
        "conditions": " ".join((__doc__ or "").split("Conditions")[1].split("Adds the run")[0].split()),
        "started": started,
        "dataset": {"kind": KIND, "seed": args.data_seed, "cases": args.cases, "test_cases": args.test_cases},
        "folds": args.folds,
        "iterations": {
            FULL: args.iterations,
            "3d_lowres": args.iterations,
            CASCADE: args.iterations,
            LONG: 2 * args.iterations,
        },
        "plan": {
            n: {"spacing": list(c.spacing), "patch_size": list(c.patch_size), "batch_size": c.batch_size}
            for n, c in configs.items()
        },
        "train_s": {
            FULL: _seconds(run, FULL),
            CASCADE: _seconds(run, "3d_lowres") + _seconds(run, CASCADE),
            LONG: _seconds(long, FULL),
        },
        "cross_validation": {"candidates": selection.candidates, "chosen": selection.best},
        "predict_s": {n: r["predict_s"] for n, r in results.items()},
        "dice": {"dice": dice},
        "summaries": {n: r["summary"] for n, r in results.items()},
    }
    path = add_run("cascade", {"format": 1}, f"{args.iterations}it", started, entry, folder=args.results)
    columns = ["iterations", "train_s", "predict_s"]
    rows = [
        {"configuration": n, **{c: entry[c][n] for c in columns}, "cv_dice": selection.candidates.get(n, "")}
        for n in results
    ]
    print_table(rows, ["configuration", "iterations", "train_s", "predict_s", "cv_dice"])
    columns = [c for c in metric_rows(entry["dice"])[0] if c not in ("metric", "class")]
    print_table(metric_rows(entry["dice"]), ["metric", "class", *columns])
    print(f"select chose {selection.best}; wrote {path}")


if __name__ == "__main__":
    main()
