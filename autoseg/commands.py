"""What each ``autoseg`` command does with its parsed arguments (:mod:`autoseg.cli` builds the parser).

Every command calls one public function of the package and prints a short summary; the heavy imports happen
inside each command, so that ``autoseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from autoseg.errors import AutosegError


class StageBars:
    """``autoseg run``'s progress: ``bars(stage)`` gives the stage a ``progress(done, total)`` callback drawing a
    tqdm bar (with rate and ETA) that closes when the stage is done."""

    def __init__(self) -> None:
        self._open: list = []

    def __call__(self, desc: str) -> Callable[[int, int], None]:
        from tqdm import tqdm

        bar = None

        def update(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                unit = "job" if desc.startswith("train") else "case"
                bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=True)
                self._open.append(bar)
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

        return update

    def close(self) -> None:
        for bar in self._open:
            bar.close()


@contextmanager
def progress_bar(desc: str):
    """Yield a ``progress(done, total)`` callback drawing a tqdm bar on stderr."""
    bars = StageBars()
    try:
        yield bars(desc)
    finally:
        bars.close()


def cmd_synth(args: argparse.Namespace) -> int:
    from autoseg.data.synth import make_dataset

    out = make_dataset(args.out, args.kind, args.cases, test_cases=args.test_cases, seed=args.seed)
    print(f"wrote {args.cases} training and {args.test_cases} test cases ({args.kind}) to {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from autoseg.data.verify import verify_dataset

    with progress_bar("verify") as progress:
        report = verify_dataset(args.data, workers=args.workers, progress=progress)
    for note in report.notes:
        print(f"note: {note}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    for error in report.errors:
        print(f"error: {error}")
    status = "OK" if report.ok else f"{len(report.errors)} error(s)"
    print(
        f"{args.data}: {report.n_cases} training case(s), label values {report.label_values}, "
        f"{len(report.warnings)} warning(s): {status}"
    )
    return 0 if report.ok else 1


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from autoseg.runfolder import RunFolder

    out = RunFolder(args.output).fingerprint
    if args.from_nnunet:
        from autoseg.fingerprint_import import import_nnunet_fingerprint

        if not args.dataset_json:
            raise AutosegError("--from-nnunet needs --dataset-json (the dataset.json nnU-Net planned from)")
        fingerprint = import_nnunet_fingerprint(Path(args.from_nnunet), Path(args.dataset_json))
        fingerprint.save(out)
    else:
        from autoseg.fingerprint import extract_fingerprint

        if not args.data:
            raise AutosegError("give the dataset folder (autoseg fingerprint DATA -o RUN) or --from-nnunet FILE")
        from autoseg.runfolder import record_dataset

        with progress_bar("fingerprint") as progress:
            fingerprint = extract_fingerprint(args.data, out, workers=args.workers, seed=args.seed, progress=progress)
        record_dataset(args.output, args.data)
    print(
        f"{out}: {fingerprint.n_cases} cases, {fingerprint.dim}D, median spacing (z, y, x) "
        f"{tuple(round(s, 3) for s in fingerprint.median_spacing)} mm, median shape after crop "
        f"{tuple(round(s) for s in fingerprint.median_shape_after_crop)}"
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from autoseg.planning.planner import plan_run

    plans = plan_run(
        args.run,
        preset=args.preset,
        device=args.device,
        gpu_memory_gb=args.gpu_memory,
        time_budget_hours=args.time_budget,
        overrides=overrides(args),
        cross_validation=CROSS_VALIDATION[args.cross_validation],
        like=like_plans(args),
    )
    print(f"{Path(args.run) / 'plans.json'}: {plans.planner} plan for {plans.device.kind} ({plans.device.name})")
    for name, c in plans.configurations.items():
        print(
            f"  {name}: spacing {[round(s, 3) for s in c.spacing]} mm, patch {list(c.patch_size)}, batch "
            f"{c.batch_size}, {c.network.n_stages} stages {list(c.network.features_per_stage)} ({c.network.block}), "
            f"loss {c.loss.name}, {c.training.epochs} epochs x {c.training.iterations_per_epoch}, "
            f"~{c.estimated_memory_bytes / 2**30:.2f} GB"
        )
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from autoseg.preprocessing.preprocess import preprocess

    with progress_bar("preprocess") as progress:
        done = preprocess(args.run, configurations=args.configs, workers=args.workers, progress=progress)
    print(f"preprocessed {len(done)} case(s) (finished cases are skipped)")
    return 0


def folds(value: str) -> list[str] | str:
    if value in ("cv", "all-cv"):
        return "cv"
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_train(args: argparse.Namespace) -> int:
    from autoseg.pipeline import train_jobs
    from autoseg.planning.plans import load_plans
    from autoseg.training.trainer import TrainOptions

    plans = load_plans(args.run)  # --set overrides are applied (and recorded with each fold) by the training
    options = TrainOptions(device=args.device, workers=args.workers)
    train_jobs(
        Path(args.run),
        plans,
        args.config,
        folds(args.fold),
        devices=args.devices,
        overrides=overrides(args),
        options=options,
        executor=executor_options(args),
    )
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from autoseg.training.pretrain import PretrainOptions, pretrain

    options = PretrainOptions(
        epochs=args.epochs, time_budget_hours=args.time_budget, device=args.device, workers=args.workers or 0
    )
    final = pretrain(args.data, args.output, args.plans, config=args.config, options=options)
    print(f"pretrained: {final}; fine-tune with: autoseg train RUN --init-from {args.output}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from autoseg.export.bundle import model_folder
    from autoseg.inference.predict import predict_path

    with progress_bar("predict") as progress:
        written = predict_path(
            model_folder(args.model),
            args.input,
            args.output,
            configs=args.configs,
            folds=args.folds,
            device=args.device,
            mirror_mode="none" if args.no_tta else args.mirror,
            save_probabilities=args.save_probabilities,
            uncertainty=args.uncertainty,
            skip_existing=args.continue_,
            checkpoint=args.checkpoint,
            precision=args.precision,
            any_spacing=args.any_spacing,
            engine=args.engine,
            output_format=args.output_format,
            progress=progress,
        )
    print(f"wrote {len(written)} prediction(s) to {args.output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from autoseg.export.bundle import export_bundle, model_folder, read_manifest

    out = export_bundle(model_folder(args.run), args.output, configs=args.configs, folds=args.folds, onnx=args.onnx)
    if args.onnx:
        for member, check in read_manifest(out)["onnx"]["members"].items():
            print(
                f"  {member}: ONNX matches torch within {check['max_abs_diff']:.2g} (logits up to "
                f"{check['max_abs_logit']:.3g}) on input shapes {check['shapes']}"
            )
    engine = " --engine onnxruntime" if args.onnx else ""
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB); predict with: autoseg predict -m {out}{engine} -i IMAGES "
        "-o OUT"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from autoseg.export.report import write_report

    out = write_report(args.run, args.output)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB, self-contained: open it in any browser)")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from autoseg.analysis.explain import explain_path
    from autoseg.export.bundle import model_folder

    written = explain_path(
        model_folder(args.model),
        args.input,
        args.output,
        method=args.method,
        classes=args.classes,
        config=args.config,
        folds=args.folds,
        device=args.device,
        n_steps=args.steps,
        window=args.window,
    )
    print(f"wrote {len(written)} file(s) and explain.json to {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from autoseg.evaluation.evaluate import evaluate_folders

    summary = evaluate_folders(
        args.pred,
        args.gt,
        labels=args.labels,
        nsd_tolerance_mm=args.nsd_tolerance,
        out=args.output,
        workers=args.workers,
    )
    for name, stats in summary.per_class.items():
        print(
            f"class {name}: Dice {stats['dice'].mean:.4f}  HD95 {stats['hd95_mm'].mean:.2f} mm  "
            f"NSD@{summary.nsd_tolerance_mm:g}mm {stats['nsd'].mean:.4f}  ({stats['dice'].n_defined} cases)"
        )
    print(
        f"mean foreground Dice {summary.foreground_mean.get('dice', float('nan')):.4f}; "
        f"summary in {Path(args.output or args.pred) / 'summary.json'}"
    )
    return 0


def print_selection(selection) -> None:
    for name, dice in sorted(selection.candidates.items(), key=lambda kv: -kv[1]):
        print(f"  {name}: cross-validation mean foreground Dice {dice:.4f}")
    print(f"selected: {selection.best}")
    if selection.runner_up:
        d = selection.difference_to_runner_up
        print(f"  vs {selection.runner_up}: {d['mean']:+.4f} (95% CI {d['ci_low']:+.4f} .. {d['ci_high']:+.4f})")
    if selection.postprocessing is not None:
        print(
            f"  postprocessing: {selection.postprocessing} (Dice {selection.postprocessing_dice['before']:.4f} -> "
            f"{selection.postprocessing_dice['after']:.4f})"
        )


def cmd_select(args: argparse.Namespace) -> int:
    from autoseg.inference.select import select

    selection = select(args.run, configurations=args.configs)
    if selection is None:
        print("the plan trains one model on all cases (small time budget): nothing to select; predict uses it")
    else:
        print_selection(selection)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from autoseg.search import search

    search_log = logging.getLogger("autoseg.search")
    if search_log.getEffectiveLevel() > logging.INFO:  # a line per trial (the trainer adds one per epoch)
        search_log.setLevel(logging.INFO)
    result = search(
        args.run,
        trials=args.trials,
        time_budget_hours=args.time_budget,
        storage=args.storage,
        study_name=args.study,
        config=args.config,
        seed=args.seed,
        fold=args.fold,
        budget_epochs=args.budget_epochs,
        device=args.device,
        pruner=args.pruner,
        workers=args.workers,
        executor=executor_options(args),
        search_workers=args.search_workers,
    )
    counts = f"{result.n_complete} complete, {result.n_pruned} pruned, {result.n_failed} failed"
    print(f"study {result.study_name} ({result.storage}): {counts} trials in {result.seconds:.0f} s")
    if result.best_value is None:
        print("no trial finished; plans.json is unchanged")
        return 0
    rule = "n/a" if result.rule_value is None else f"{result.rule_value:.4f}"
    print(f"  rule plan: {rule}; best: trial {result.best_trial} ({result.configuration}) {result.best_value:.4f}")
    print(f"  best parameters written to {Path(args.run) / 'plans.json'}: {result.best_params}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from autoseg.pipeline import resume_summary

    state = resume_summary(args.output)
    if state:
        print(f"{args.output} exists: {state}", flush=True)
    bars = StageBars()
    try:
        selection = _run(args, bars)
    finally:
        bars.close()
    if selection is not None:
        print_selection(selection)
    else:
        print(f"trained; predict with: autoseg predict -m {args.output} -i IMAGES -o OUT")
    from autoseg.runfolder import RunFolder

    if RunFolder(args.output).report.is_file():
        print(f"report: {RunFolder(args.output).report}")
    return 0


def _run(args: argparse.Namespace, bars: StageBars):
    from autoseg.pipeline import run_pipeline

    return run_pipeline(
        args.data,
        args.output,
        device=args.device,
        gpu_memory_gb=args.gpu_memory,
        time_budget_hours=args.time_budget,
        preset=args.preset,
        overrides=overrides(args),
        like=like_plans(args),
        configs=args.configs,
        folds=folds(args.folds),
        devices=args.devices,
        workers=args.workers,
        search_trials=args.search_trials,
        search_hours=args.search_time,
        n_folds=args.n_folds,
        cross_validation=CROSS_VALIDATION[args.cross_validation],
        progress=bars,
        executor=executor_options(args),
        search_workers=args.search_workers,
    )


def cmd_example(args: argparse.Namespace) -> int:
    from autoseg.example import run_example

    run_example(args.out, time_budget_hours=args.time_budget, cases=args.cases)
    return 0


#: ``--cross-validation`` choices and what the planner gets.
CROSS_VALIDATION = {"auto": None, "always": True, "never": False}


def overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides, with ``--init-from`` as ``training.init_from``."""
    init = [f"training.init_from={json.dumps(str(args.init_from))}"] if args.init_from else []
    return [*args.set, *init]


def like_plans(args: argparse.Namespace):
    from autoseg.planning.plans import load_plans

    return load_plans(args.like) if args.like else None


def executor_options(args: argparse.Namespace):
    from autoseg.training.executors import ExecutorOptions

    return ExecutorOptions(
        args.executor,
        ray_address=args.ray_address,
        cpus_per_task=args.cpus_per_job,
        max_retries=args.max_retries,
        slurm_partition=args.slurm_partition,
        slurm_time_minutes=args.slurm_time,
    )
