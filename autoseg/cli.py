"""The ``autoseg`` command: argument parsing only; every command calls one public function.

A user's data problem (an :class:`~autoseg.errors.AutosegError`) is printed as one clear message, without a
traceback, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from autoseg import commands
from autoseg.commands import (
    cmd_evaluate,
    cmd_example,
    cmd_explain,
    cmd_export,
    cmd_fingerprint,
    cmd_plan,
    cmd_predict,
    cmd_preprocess,
    cmd_pretrain,
    cmd_report,
    cmd_run,
    cmd_search,
    cmd_select,
    cmd_synth,
    cmd_train,
    cmd_verify,
)
from autoseg.processes import command_status

__all__ = ["main", "build_parser"]


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="plan for auto (this machine), cpu or cuda")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB", help="plan for a GPU of this size")
    p.add_argument("--time-budget", type=float, default=None, metavar="HOURS", help="training time for all jobs")
    p.add_argument("--preset", default="default", choices=["default", "nnunet", "nnunet-resenc-m", "nnunet-resenc-l"])
    p.add_argument(
        "--cross-validation",
        default="auto",
        choices=list(commands.CROSS_VALIDATION),
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

    p = add("synth", cmd_synth, "write a synthetic dataset with known truth (nnU-Net v2 layout)")
    p.add_argument("out", type=Path, help="output dataset folder")
    p.add_argument("--kind", choices=["ct3d", "ct3d_hard", "ct3d_context", "mr3d", "2d"], default="ct3d")
    p.add_argument("--cases", type=int, default=8, help="training cases (default 8)")
    p.add_argument("--test-cases", type=int, default=2, help="held-out cases in imagesTs/labelsTs (default 2)")
    p.add_argument("--seed", type=int, default=0)

    p = add("verify", cmd_verify, "check a dataset folder and report every problem")
    p.add_argument("data", type=Path, help="dataset folder")
    p.add_argument("-j", "--workers", type=int, default=None, help="parallel workers (default: 2)")

    p = add("fingerprint", cmd_fingerprint, "compute the dataset fingerprint (RUN/fingerprint.json)")
    p.add_argument("data", type=Path, nargs="?", help="dataset folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="run folder")
    p.add_argument("-j", "--workers", type=int, default=None, help="parallel workers (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the foreground intensity sampling")
    p.add_argument("--from-nnunet", metavar="FILE", help="import an nnU-Net v2 dataset_fingerprint.json instead")
    p.add_argument("--dataset-json", metavar="FILE", help="the dataset.json that goes with --from-nnunet")

    p = add("plan", cmd_plan, "plan configurations for the device and time budget (RUN/plans.json)")
    p.add_argument("run", type=Path, help="run folder holding fingerprint.json")
    _plan_options(p)

    p = add("preprocess", cmd_preprocess, "crop, normalise and resample the training cases (RUN/preprocessed/)")
    p.add_argument("run", type=Path)
    p.add_argument("-c", "--configs", nargs="+", default=None, help="configurations (default: all planned)")
    p.add_argument("-j", "--workers", type=int, default=None, help="parallel workers (default: from cores and RAM)")

    p = add("train", cmd_train, "train configuration(s) x fold(s); finished folds are skipped, others resumed")
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

    p = add("pretrain", cmd_pretrain, "self-supervised pretraining (masked image modelling) on unlabelled images")
    p.add_argument("data", type=Path, nargs="+", help="dataset folder(s); their labels, if any, are ignored")
    p.add_argument("-o", "--output", type=Path, required=True, help="pretraining run folder (for --init-from)")
    p.add_argument("--plans", type=Path, required=True, metavar="RUN", help="the planned run to fine-tune later")
    p.add_argument("-c", "--config", default=None, help="configuration (default: 3d_fullres, else 2d)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=None, help="epochs (default: the plan's)")
    budget.add_argument("--time-budget", type=float, default=None, metavar="HOURS", help="pretrain for this long")
    p.add_argument("--device", default="auto")
    p.add_argument("-j", "--workers", type=int, default=None, help="data loader processes (default 0)")

    p = add("predict", cmd_predict, "segment new images with a trained run folder")
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

    p = add("export", cmd_export, "write a trained run's model as one file (MODEL.autoseg) that predicts anywhere")
    p.add_argument("run", type=Path, help="run folder (or a model bundle, to add ONNX networks to it)")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle file to write, e.g. MODEL.autoseg")
    p.add_argument("--configs", nargs="+", default=None, help="configurations (default: the selected ensemble)")
    p.add_argument("--folds", nargs="+", default=None, help="folds (default: every trained fold)")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also export every network to ONNX, checked against torch, for predict --engine onnxruntime",
    )

    p = add("report", cmd_report, "write one self-contained HTML page about a run (RUN/report.html)")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("-o", "--output", type=Path, default=None, help="HTML file to write (default: RUN/report.html)")

    p = add("explain", cmd_explain, "per-class attribution maps of a prediction, in the input's geometry")
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

    p = add("evaluate", cmd_evaluate, "metrics of predicted label files against reference label files")
    p.add_argument("pred", type=Path, help="folder of predictions")
    p.add_argument("gt", type=Path, help="folder of reference labels (same file names)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="label values (default: all in references)")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM", help="NSD tolerance in mm (default 1)")
    p.add_argument("-o", "--output", type=Path, default=None, help="folder for summary.json/csv (default: PRED)")
    p.add_argument("-j", "--workers", type=int, default=None)

    p = add("select", cmd_select, "choose configuration(s), ensemble and postprocessing on cross-validation")
    p.add_argument("run", type=Path)
    p.add_argument("--configs", nargs="+", default=None)

    p = add("search", cmd_search, "search what the rules cannot decide (Optuna); the best plan goes to plans.json")
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

    p = add("run", cmd_run, "every stage: fingerprint, plan, preprocess, [search,] train all folds, select")
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

    p = add("example", cmd_example, "the built-in example: synthetic CT, full pipeline on CPU, test Dice")
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
