"""Search evidence: does a small CPU search beat the rule plan where the rules are weak?

    flock /tmp/autoseg-bench.lock python benchmarks/search.py [--cases 20] [--folds 5] [--epochs 20]
        [--iterations 25] [--trials 12] [--budget-epochs 5] [--cpu-gflops 5] [--work DIR] [--name search]

Synthetic ``ct3d`` data: an organ, a bone and a small lesion inside the organ (about 2% of the foreground). The
rule plan is made for a small CPU budget (``--cpu-gflops``: the planner sizes networks for a CPU of that training
throughput, so the plan does not depend on the load of the machine) and trains every configuration for
``--epochs`` x ``--iterations``. Then:

1. the rule plan's ``3d_fullres`` is cross-validated (``--folds`` folds, the run's splits);
2. ``autoseg.search.search`` runs ``--trials`` trials over configuration, patch/batch, depth, width, blocks, loss,
   learning rate, oversampling, augmentation strength and training length; each trial trains fold 0 for a share
   of the plan's epochs (``--budget-epochs`` at the rule's length), successive halving prunes poor ones;
3. the plan the search wrote back into ``plans.json`` is cross-validated the same way.

Both cross-validations train in folders of their own that share the run's preprocessed data and splits, at the
same budget (the searched plan's epochs follow from its training length under the rule plan's compute), and are
scored by the full-resolution Dice of every validation case without test-time mirroring (mirroring costs 7x the
prediction time on a CPU and changes both plans alike). Dice per class is the mean over all cases of all folds.
Finished folds and trials are kept, so a killed benchmark resumes. Results: ``benchmarks/results/<--name>.json``
(``search.json``: the defaults; ``search_short.json``: ``--epochs 6 --iterations 20 --budget-epochs 3``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import print_table, write_results  # noqa: E402

from autoseg.data.synth import make_dataset  # noqa: E402
from autoseg.fingerprint import extract_fingerprint  # noqa: E402
from autoseg.inference.validation import predict_validation  # noqa: E402
from autoseg.planning.planner import make_plans  # noqa: E402
from autoseg.planning.plans import Plans, load_plans  # noqa: E402
from autoseg.preprocessing.preprocess import preprocess  # noqa: E402
from autoseg.preprocessing.store import list_cases, preprocessed_folder  # noqa: E402
from autoseg.runfolder import record_dataset  # noqa: E402
from autoseg.search import search  # noqa: E402
from autoseg.search.objective import prepare_trial_dir  # noqa: E402
from autoseg.search.storage import make_storage  # noqa: E402
from autoseg.training.splits import load_or_make_splits  # noqa: E402
from autoseg.training.trainer import TrainOptions, train_fold  # noqa: E402

WORK = Path(__file__).resolve().parent / "work" / "search"  # --work changes it
RULE_CONFIG = "3d_fullres"
log = logging.getLogger("benchmarks.search")


def prepare(args) -> Path:
    """Dataset, fingerprint, rule plan, preprocessing and splits (each skipped when present)."""
    data, run = args.work / "data", args.work / "run"
    if not (data / "dataset.json").is_file():
        make_dataset(data, "ct3d", cases=args.cases, test_cases=0, seed=args.seed)
    record_dataset(run, data)
    fp = extract_fingerprint(data, run / "fingerprint.json", workers=2)
    if not (run / "plans.json").is_file():
        changes = [
            f"training.epochs={args.epochs}",
            f"training.iterations_per_epoch={args.iterations}",
            f"training.val_iterations={args.val_iterations}",
        ]
        flops = args.cpu_gflops * 1e9
        plans = make_plans(fp, device="cpu", check_speed=False, cpu_flops=flops, n_folds=args.folds, overrides=changes)
        plans.save(run / "plans.json")
    preprocess(run, data_dir=data, workers=2)
    load_or_make_splits(run, list_cases(preprocessed_folder(run, RULE_CONFIG)), n_folds=args.folds)
    return run


def cross_validate(run: Path, plans: Plans, config: str, folder: Path, folds: int) -> dict:
    """Train every fold of ``config`` in ``folder`` (sharing RUN's data) and score its validation cases."""
    single = dataclasses.replace(plans, configurations={config: plans.configurations[config]})
    prepare_trial_dir(run, folder, single, fresh=False)
    results_file = folder / "cv.json"
    done = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for fold in range(folds):
        if str(fold) in done:
            continue
        start = time.perf_counter()
        train_fold(folder, config, fold, plans=single, options=TrainOptions(device="cpu", predict_validation=False))
        trained = time.perf_counter() - start
        summary = predict_validation(folder, single, config, fold, device="cpu", mirror_mode="none")
        done[str(fold)] = {
            "cases": {c.case: {k: m.dice for k, m in c.metrics.items()} for c in summary.cases},
            "train_seconds": round(trained, 1),
            "seconds": round(time.perf_counter() - start, 1),
        }
        results_file.write_text(json.dumps(done, indent=2))
        log.info("%s fold %d: mean Dice %.4f (%.0f s)", folder.name, fold, summary.foreground_mean["dice"], trained)
    return _pool(done, plans)


def _pool(done: dict, plans: Plans) -> dict:
    names = {str(v): k for k, v in plans.labels.items() if v != 0}
    per_class: dict[str, list[float]] = {n: [] for n in names.values()}
    for fold in done.values():
        for metrics in fold["cases"].values():
            for key, dice in metrics.items():
                if key in names and dice == dice:  # NaN: class absent from both
                    per_class[names[key]].append(dice)
    means = {k: round(statistics.fmean(v), 4) for k, v in per_class.items() if v}
    fold_means = [
        round(statistics.fmean(statistics.fmean(m[k] for k in names if m[k] == m[k]) for m in f["cases"].values()), 4)
        for f in done.values()
    ]
    return {
        "dice_per_class": means,
        "mean_foreground_dice": round(statistics.fmean(means.values()), 4),
        "fold_mean_dice": fold_means,
        "n_cases": sum(len(f["cases"]) for f in done.values()),
        "train_seconds": round(sum(f["train_seconds"] for f in done.values()), 1),
    }


def describe(c) -> dict:
    return {
        "patch_size": list(c.patch_size),
        "batch_size": c.batch_size,
        "features_per_stage": list(c.network.features_per_stage),
        "block": c.network.block,
        "loss": c.loss.name,
        "learning_rate": round(c.training.learning_rate, 5),
        "foreground_oversampling": round(c.foreground_oversampling, 3),
        "augmentation_strength": round(c.augmentation.strength, 3),
        "epochs": c.training.epochs,
        "iterations_per_epoch": c.training.iterations_per_epoch,
    }


def trial_table(run: Path, study_name: str) -> tuple[list[dict], float]:
    """One row per trial, and the search's wall time (first trial's start to last trial's end)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=make_storage(None, run))
    trials = study.get_trials(deepcopy=False)
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    span = (max(ends) - min(t.datetime_start for t in trials if t.datetime_start)).total_seconds()
    rows = []
    for t in study.get_trials(deepcopy=False):
        eff = t.user_attrs.get("effective", {})
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name + (" (infeasible)" if "infeasible" in t.user_attrs else ""),
                "value": None if t.value is None else round(t.value, 4),
                "config": t.user_attrs.get("configuration", t.params.get("configuration")),
                "patch": eff.get("patch_size"),
                "batch": eff.get("batch_size"),
                "features": eff.get("features_per_stage"),
                "loss": t.params.get("loss"),
                "lr": round(t.params["learning_rate"], 4) if "learning_rate" in t.params else None,
                "oversampling": round(t.params["oversampling"], 2) if "oversampling" in t.params else None,
                "epochs": eff.get("trial_epochs"),
                "last_epoch": max(t.intermediate_values) if t.intermediate_values else None,
                "seconds": None if seconds is None else round(seconds, 1),
                "dice_per_class": t.user_attrs.get("dice_per_class"),
            }
        )
    return rows, span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--val-iterations", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--budget-epochs", type=int, default=5)
    parser.add_argument("--cpu-gflops", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, default=WORK, help="working folder (kept, so a killed run resumes)")
    parser.add_argument("--name", default="search", help="results file: benchmarks/results/NAME.json")
    parser.add_argument("--no-results", action="store_true", help="do not write the results file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("autoseg.training", "autoseg.evaluation", "autoseg.inference", "autoseg.preprocessing"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    start = time.perf_counter()
    run = prepare(args)
    rule_plans = load_plans(run / "search" / "rule_plans.json") if (run / "search").is_dir() else load_plans(run)
    rule_cv = cross_validate(run, rule_plans, RULE_CONFIG, args.work / "cv_rule", args.folds)
    log.info("rule plan CV: %s", rule_cv)
    result = search(run, trials=args.trials, budget_epochs=args.budget_epochs, device="cpu", seed=args.seed)
    best_plans = load_plans(run)
    best_config = best_plans.search["configuration"]
    best_cv = cross_validate(run, best_plans, best_config, args.work / "cv_search", args.folds)
    table, span = trial_table(run, result.study_name)
    print_table(
        table, ["trial", "state", "value", "config", "patch", "batch", "features", "loss", "lr", "epochs", "seconds"]
    )
    rows = [
        {"plan": f"rule ({RULE_CONFIG})", **rule_cv["dice_per_class"], "mean": rule_cv["mean_foreground_dice"]},
        {"plan": f"search ({best_config})", **best_cv["dice_per_class"], "mean": best_cv["mean_foreground_dice"]},
    ]
    print_table(rows, ["plan", *rule_cv["dice_per_class"], "mean"])
    infeasible = sum(1 for t in table if "infeasible" in t["state"])
    payload = {
        "setup": {
            **{k: v for k, v in vars(args).items() if k not in ("work", "no_results", "name")},
            "dataset": "synthetic ct3d",
            "rule_configuration": RULE_CONFIG,
            "mirroring": "none",
        },
        "rule_plan": {"configuration": RULE_CONFIG, **describe(rule_plans.configurations[RULE_CONFIG])},
        "searched_plan": {"configuration": best_config, **describe(best_plans.configurations[best_config])},
        "cv_rule": rule_cv,
        "cv_search": best_cv,
        "search": {
            "wall_seconds": round(span, 1),
            "trial_seconds": round(sum(t["seconds"] or 0 for t in table), 1),
            "trials": len(table),
            "complete": result.n_complete,
            "pruned": result.n_pruned - infeasible,
            "infeasible_pruned_before_training": infeasible,
            "failed": result.n_failed,
            "best_trial": result.best_trial,
            "best_value_fold0": result.best_value,
            "rule_value_fold0": result.rule_value,
            "best_params": result.best_params,
        },
        "trials": table,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps({k: payload[k] for k in ("cv_rule", "cv_search", "search")}, indent=2))
    if not args.no_results:
        print("written", write_results(args.name, payload))


if __name__ == "__main__":
    main()
