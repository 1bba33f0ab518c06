"""The ``autoseg`` command: argument parsing only; every command calls one public function.

A user's data problem (an :class:`~autoseg.errors.AutosegError`) is printed as one clear message, without a
traceback, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from autoseg.errors import AutosegError
from autoseg.processes import command_status

__all__ = ["main", "build_parser"]


class _StageBars:
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
def _progress_bar(desc: str):
    """Yield a ``progress(done, total)`` callback drawing a tqdm bar on stderr."""
    bars = _StageBars()
    try:
        yield bars(desc)
    finally:
        bars.close()


def _cmd_synth(args: argparse.Namespace) -> int:
    from autoseg.data.synth import make_dataset

    out = make_dataset(args.out, args.kind, args.cases, test_cases=args.test_cases, seed=args.seed)
    print(f"wrote {args.cases} training and {args.test_cases} test cases ({args.kind}) to {out}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from autoseg.data.verify import verify_dataset

    with _progress_bar("verify") as progress:
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


def _cmd_fingerprint(args: argparse.Namespace) -> int:
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

        with _progress_bar("fingerprint") as progress:
            fingerprint = extract_fingerprint(args.data, out, workers=args.workers, seed=args.seed, progress=progress)
        record_dataset(args.output, args.data)
    print(
        f"{out}: {fingerprint.n_cases} cases, {fingerprint.dim}D, median spacing (z, y, x) "
        f"{tuple(round(s, 3) for s in fingerprint.median_spacing)} mm, median shape after crop "
        f"{tuple(round(s) for s in fingerprint.median_shape_after_crop)}"
    )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from autoseg.planning.planner import plan_run

    plans = plan_run(
        args.run,
        preset=args.preset,
        device=args.device,
        gpu_memory_gb=args.gpu_memory,
        time_budget_hours=args.time_budget,
        overrides=_overrides(args),
        cross_validation=CROSS_VALIDATION[args.cross_validation],
        like=_like(args),
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


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from autoseg.preprocessing.preprocess import preprocess

    with _progress_bar("preprocess") as progress:
        done = preprocess(args.run, configurations=args.configs, workers=args.workers, progress=progress)
    print(f"preprocessed {len(done)} case(s) (finished cases are skipped)")
    return 0


def _folds(value: str) -> list[str] | str:
    if value in ("cv", "all-cv"):
        return "cv"
    return [v.strip() for v in value.split(",") if v.strip()]


def _cmd_train(args: argparse.Namespace) -> int:
    from autoseg.pipeline import train_jobs
    from autoseg.planning.plans import load_plans
    from autoseg.training.trainer import TrainOptions

    plans = load_plans(args.run)  # --set overrides are applied (and recorded with each fold) by the training
    options = TrainOptions(device=args.device, workers=args.workers)
    train_jobs(
        Path(args.run),
        plans,
        args.config,
        _folds(args.fold),
        devices=args.devices,
        overrides=_overrides(args),
        options=options,
        executor=_executor(args),
    )
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from autoseg.training.pretrain import PretrainOptions, pretrain

    options = PretrainOptions(
        epochs=args.epochs, time_budget_hours=args.time_budget, device=args.device, workers=args.workers or 0
    )
    final = pretrain(args.data, args.output, args.plans, config=args.config, options=options)
    print(f"pretrained: {final}; fine-tune with: autoseg train RUN --init-from {args.output}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from autoseg.export.bundle import model_folder
    from autoseg.inference.predict import predict_path

    with _progress_bar("predict") as progress:
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


def _cmd_export(args: argparse.Namespace) -> int:
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


def _cmd_report(args: argparse.Namespace) -> int:
    from autoseg.export.report import write_report

    out = write_report(args.run, args.output)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB, self-contained: open it in any browser)")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
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


def _cmd_evaluate(args: argparse.Namespace) -> int:
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


def _print_selection(selection) -> None:
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


def _cmd_select(args: argparse.Namespace) -> int:
    from autoseg.inference.select import select

    selection = select(args.run, configurations=args.configs)
    if selection is None:
        print("the plan trains one model on all cases (small time budget): nothing to select; predict uses it")
    else:
        _print_selection(selection)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
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
        executor=_executor(args),
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


def _cmd_run(args: argparse.Namespace) -> int:
    from autoseg.pipeline import resume_summary

    state = resume_summary(args.output)
    if state:
        print(f"{args.output} exists: {state}", flush=True)
    bars = _StageBars()
    try:
        selection = _run(args, bars)
    finally:
        bars.close()
    if selection is not None:
        _print_selection(selection)
    else:
        print(f"trained; predict with: autoseg predict -m {args.output} -i IMAGES -o OUT")
    from autoseg.runfolder import RunFolder

    if RunFolder(args.output).report.is_file():
        print(f"report: {RunFolder(args.output).report}")
    return 0


def _run(args: argparse.Namespace, bars: _StageBars):
    from autoseg.pipeline import run_pipeline

    return run_pipeline(
        args.data,
        args.output,
        device=args.device,
        gpu_memory_gb=args.gpu_memory,
        time_budget_hours=args.time_budget,
        preset=args.preset,
        overrides=_overrides(args),
        like=_like(args),
        configs=args.configs,
        folds=_folds(args.folds),
        devices=args.devices,
        workers=args.workers,
        search_trials=args.search_trials,
        search_hours=args.search_time,
        n_folds=args.n_folds,
        cross_validation=CROSS_VALIDATION[args.cross_validation],
        progress=bars,
        executor=_executor(args),
        search_workers=args.search_workers,
    )


def _cmd_example(args: argparse.Namespace) -> int:
    from autoseg.example import run_example

    run_example(args.out, time_budget_hours=args.time_budget, cases=args.cases)
    return 0


#: ``--cross-validation`` choices and what the planner gets.
CROSS_VALIDATION = {"auto": None, "always": True, "never": False}


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="plan for auto (this machine), cpu or cuda")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB", help="plan for a GPU of this size")
    p.add_argument("--time-budget", type=float, default=None, metavar="HOURS", help="training time for all jobs")
    p.add_argument("--preset", default="default", choices=["default", "nnunet", "nnunet-resenc-m", "nnunet-resenc-l"])
    p.add_argument(
        "--cross-validation",
        default="auto",
        choices=list(CROSS_VALIDATION),
        help="auto (the time budget decides, default), always, or never (one model trained on all cases)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a plan field, e.g. training.epochs=50 or 3d_fullres.batch_size=4",
    )
    p.add_argument("--like", type=Path, default=None, metavar="RUN", help="plan like another run so its weights fit")
    _init_option(p)


def _init_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--init-from",
        default=None,
        metavar="RUN[:CONFIG[:FOLD]]",
        help="start training from another run's weights (fine-tuning; a pretraining run too)",
    )


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides, with ``--init-from`` as ``training.init_from``."""
    init = [f"training.init_from={json.dumps(str(args.init_from))}"] if args.init_from else []
    return [*args.set, *init]


def _like(args: argparse.Namespace):
    from autoseg.planning.plans import load_plans

    return load_plans(args.like) if args.like else None


def _executor_options(p: argparse.ArgumentParser, *, search: bool) -> None:
    g = p.add_argument_group("cluster", "where jobs run (README: Running on a cluster)")
    g.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray", "slurm"],
        help="local (this machine, default), ray (a Ray cluster) or slurm (SLURM through submitit); the run folder "
        "must be on a filesystem every worker shares",
    )
    g.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else start one)")
    g.add_argument("--slurm-partition", default=None, help="SLURM partition (default: the cluster's)")
    g.add_argument("--slurm-time", type=int, default=24 * 60, metavar="MINUTES", help="SLURM time per job (1440)")
    g.add_argument("--cpus-per-job", type=int, default=1, help="CPUs each Ray/SLURM job reserves (default 1)")
    g.add_argument(
        "--max-retries", type=int, default=3, help="runs of a job whose worker died (Ray) or timed out (SLURM)"
    )
    if search:
        g.add_argument("--search-workers", type=int, default=2, help="search workers on the cluster (default 2)")


def _executor(args: argparse.Namespace):
    from autoseg.training.executors import ExecutorOptions

    return ExecutorOptions(
        args.executor,
        ray_address=args.ray_address,
        cpus_per_task=args.cpus_per_job,
        max_retries=args.max_retries,
        slurm_partition=args.slurm_partition,
        slurm_time_minutes=args.slurm_time,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``autoseg`` command (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="autoseg", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
        p.set_defaults(func=func)
        commands[name] = func
        return p

    p = add("synth", _cmd_synth, "write a synthetic dataset with known truth (nnU-Net v2 layout)")
    p.add_argument("out", type=Path, help="output dataset folder")
    p.add_argument("--kind", choices=["ct3d", "ct3d_hard", "mr3d", "2d"], default="ct3d")
    p.add_argument("--cases", type=int, default=8, help="training cases (default 8)")
    p.add_argument("--test-cases", type=int, default=2, help="held-out cases in imagesTs/labelsTs (default 2)")
    p.add_argument("--seed", type=int, default=0)

    p = add("verify", _cmd_verify, "check a dataset folder and report every problem")
    p.add_argument("data", type=Path, help="dataset folder")
    p.add_argument("-j", "--workers", type=int, default=None, help="parallel workers (default: 2)")

    p = add("fingerprint", _cmd_fingerprint, "compute the dataset fingerprint (RUN/fingerprint.json)")
    p.add_argument("data", type=Path, nargs="?", help="dataset folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="run folder")
    p.add_argument("-j", "--workers", type=int, default=None, help="parallel workers (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the foreground intensity sampling")
    p.add_argument("--from-nnunet", metavar="FILE", help="import an nnU-Net v2 dataset_fingerprint.json instead")
    p.add_argument("--dataset-json", metavar="FILE", help="the dataset.json that goes with --from-nnunet")

    p = add("plan", _cmd_plan, "plan configurations for the device and time budget (RUN/plans.json)")
    p.add_argument("run", type=Path, help="run folder holding fingerprint.json")
    _plan_options(p)

    p = add("preprocess", _cmd_preprocess, "crop, normalise and resample the training cases (RUN/preprocessed/)")
    p.add_argument("run", type=Path)
    p.add_argument("-c", "--configs", nargs="+", default=None, help="configurations (default: all planned)")
    p.add_argument("-j", "--workers", type=int, default=None, help="parallel workers (default: from cores and RAM)")

    p = add("train", _cmd_train, "train configuration(s) x fold(s); finished folds are skipped, others resumed")
    p.add_argument("run", type=Path)
    p.add_argument("-c", "--config", nargs="+", default=None, help="configuration(s) (default: all planned)")
    p.add_argument(
        "-f",
        "--fold",
        default="cv",
        help="fold number(s) 0,1,..., 'all' (train on every case) or 'cv' (default: every cross-validation fold, "
        "or 'all' when the plan has no cross-validation)",
    )
    p.add_argument("--devices", default=None, help="GPUs to use, e.g. 0,1 (default: all visible; cpu without)")
    p.add_argument("--device", default="auto", help="device of an in-process job (auto, cpu, cuda)")
    p.add_argument("-j", "--workers", type=int, default=None, help="data loader processes (default: from cores/RAM)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a plan field")
    _init_option(p)
    _executor_options(p, search=False)

    p = add("pretrain", _cmd_pretrain, "self-supervised pretraining (masked image modelling) on unlabelled images")
    p.add_argument("data", type=Path, nargs="+", help="dataset folder(s); their labels, if any, are ignored")
    p.add_argument("-o", "--output", type=Path, required=True, help="pretraining run folder (for --init-from)")
    p.add_argument("--plans", type=Path, required=True, metavar="RUN", help="the planned run to fine-tune later")
    p.add_argument("-c", "--config", default=None, help="configuration (default: 3d_fullres, else 2d)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=None, help="epochs (default: the plan's)")
    budget.add_argument("--time-budget", type=float, default=None, metavar="HOURS", help="pretrain for this long")
    p.add_argument("--device", default="auto")
    p.add_argument("-j", "--workers", type=int, default=None, help="data loader processes (default 0)")

    p = add("predict", _cmd_predict, "segment new images with a trained run folder")
    p.add_argument("-m", "--model", type=Path, required=True, help="run folder or model bundle (autoseg export)")
    p.add_argument("-i", "--input", type=Path, required=True, help="image folder, one image file, or a DICOM folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--configs", nargs="+", default=None, help="configurations (default: selection.json)")
    p.add_argument("--folds", nargs="+", default=None, help="folds (default: every trained fold)")
    p.add_argument("--no-tta", action="store_true", help="no mirroring (fastest)")
    p.add_argument(
        "--mirror",
        choices=["auto", "all", "single", "none"],
        default="auto",
        help="test-time mirroring: all flip combinations (as nnU-Net), one flip per axis, or none; "
        "auto (default): all on a GPU, single on a CPU",
    )
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>.npz probabilities")
    p.add_argument(
        "--any-spacing",
        action="store_true",
        help="predict images whose spacing is far outside the training range (refused by default)",
    )
    p.add_argument("--uncertainty", action="store_true", help="also write entropy/disagreement maps and scores")
    p.add_argument(
        "--output-format",
        choices=["auto", "nifti", "dicom-seg"],
        default="auto",
        help="label files: auto (default): <case>.dcm DICOM-SEG for a DICOM series, else the input's format; "
        "nifti: <case>.nii.gz for every case; dicom-seg: DICOM series input only",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--continue", dest="continue_", action="store_true", help="skip cases already predicted")
    p.add_argument(
        "--checkpoint",
        choices=["final", "best", "latest"],
        default="final",
        help="which checkpoint of each fold (default: final)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16", "bf16"],
        default="auto",
        help="forward-pass precision; auto (default): fp16 on a GPU, bf16 on a CPU with native bf16 (AVX512-BF16/AMX), "
        "else fp32",
    )
    p.add_argument(
        "--engine",
        choices=["torch", "onnxruntime"],
        default="torch",
        help="forward passes by torch (default) or by onnxruntime on the CPU (a bundle exported with --onnx), with "
        "the same sliding window, mirroring, ensemble and postprocessing",
    )

    p = add("export", _cmd_export, "write a trained run's model as one file (MODEL.autoseg) that predicts anywhere")
    p.add_argument("run", type=Path, help="run folder (or a model bundle, to add ONNX networks to it)")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle file to write, e.g. MODEL.autoseg")
    p.add_argument("--configs", nargs="+", default=None, help="configurations (default: the selected ensemble)")
    p.add_argument("--folds", nargs="+", default=None, help="folds (default: every trained fold)")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also export every network to ONNX, checked against torch, for predict --engine onnxruntime",
    )

    p = add("report", _cmd_report, "write one self-contained HTML page about a run (RUN/report.html)")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("-o", "--output", type=Path, default=None, help="HTML file to write (default: RUN/report.html)")

    p = add("explain", _cmd_explain, "per-class attribution maps of a prediction, in the input's geometry")
    p.add_argument("-m", "--model", type=Path, required=True, help="run folder or model bundle (autoseg export)")
    p.add_argument("-i", "--input", type=Path, required=True, help="image folder, one image file, or a DICOM folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--class", dest="classes", nargs="+", default=None, help="class names or values (default: all)")
    p.add_argument(
        "--method", choices=["integrated_gradients", "gradient_x_input", "occlusion"], default="integrated_gradients"
    )
    p.add_argument("-c", "--config", default=None, help="configuration explained (default: the first selected)")
    p.add_argument("--folds", nargs="+", default=None, help="folds (default: every trained fold)")
    p.add_argument("--steps", type=int, default=16, help="integration steps of integrated gradients (default 16)")
    p.add_argument("--window", type=int, nargs="+", default=None, help="occlusion window in voxels (default: patch/2)")
    p.add_argument("--device", default="auto")

    p = add("evaluate", _cmd_evaluate, "metrics of predicted label files against reference label files")
    p.add_argument("pred", type=Path, help="folder of predictions")
    p.add_argument("gt", type=Path, help="folder of reference labels (same file names)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="label values (default: all in references)")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM", help="NSD tolerance in mm (default 1)")
    p.add_argument("-o", "--output", type=Path, default=None, help="folder for summary.json/csv (default: PRED)")
    p.add_argument("-j", "--workers", type=int, default=None)

    p = add("select", _cmd_select, "choose configuration(s), ensemble and postprocessing on cross-validation")
    p.add_argument("run", type=Path)
    p.add_argument("--configs", nargs="+", default=None)

    p = add("search", _cmd_search, "search what the rules cannot decide (Optuna); the best plan goes to plans.json")
    p.add_argument("run", type=Path, help="preprocessed run folder")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--trials", type=int, default=None, help="finished trials the study should have")
    budget.add_argument("--time-budget", type=float, default=None, metavar="HOURS", help="search for this long")
    p.add_argument("--storage", default=None, help="postgresql://... shared by workers (default: a journal file)")
    p.add_argument("--study", default=None, help="study name (default: autoseg-<dataset>)")
    p.add_argument("--config", default=None, help="search this configuration only (default: the configuration too)")
    p.add_argument("--fold", type=int, default=0, help="fold each trial trains and validates (default 0)")
    p.add_argument("--budget-epochs", type=int, default=None, help="epochs of a trial (default: a quarter, >= 3)")
    p.add_argument("--pruner", choices=["successive_halving", "hyperband", "none"], default="successive_halving")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("-j", "--workers", type=int, default=None, help="data loader processes per trial")
    _executor_options(p, search=True)

    p = add("run", _cmd_run, "every stage: fingerprint, plan, preprocess, [search,] train all folds, select")
    p.add_argument("data", type=Path, help="dataset folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="run folder")
    _plan_options(p)
    p.add_argument("--configs", nargs="+", default=None, help="configurations to train (default: all planned)")
    p.add_argument("--folds", default="cv", help="'cv' (all cross-validation folds, default) or e.g. 0,1")
    p.add_argument("--n-folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--devices", default=None, help="GPUs to use, e.g. 0,1")
    p.add_argument("-j", "--workers", type=int, default=None)
    p.add_argument("--search-trials", type=int, default=0, help="run a search of N trials before training")
    p.add_argument("--search-time", type=float, default=None, metavar="HOURS", help="search for this long instead")
    _executor_options(p, search=True)

    from autoseg.analysis.common import add_analyze_parser

    add_analyze_parser(sub)

    p = add("example", _cmd_example, "the built-in example: synthetic CT, full pipeline on CPU, test Dice")
    p.add_argument("out", type=Path, nargs="?", default=Path("example"), help="folder (default: ./example)")
    p.add_argument("--time-budget", type=float, default=0.1, metavar="HOURS", help="training budget (default 0.1)")
    p.add_argument("--cases", type=int, default=10, help="training cases (default 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoseg`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return command_status(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
