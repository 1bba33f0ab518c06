"""End to end at an equal wall-clock training budget: autoseg vs nnU-Net v2, same data, same held-out cases.

    flock /tmp/autoseg-bench.lock python benchmarks/end_to_end.py [--minutes 20] [--cases 20] [--test-cases 10]

One synthetic CT dataset (``autoseg synth --kind ct3d_hard``: oblique scans, overlapping intensities, two tiny
classes; a fresh seed every run unless ``--seed`` reproduces one; nnU-Net v2 layout, truth of the held-out cases in
``labelsTs/``) is both tools' raw data. Both tools run AT THE SAME TIME, each pinned to its own core (autoseg on
``--cores[0]``, nnU-Net on ``--cores[1]``) with one torch thread and no data-loader processes, so both get exactly
one core and see the same background load. Each tool plans with its own planner and defaults:

- autoseg: ``fingerprint``, ``plan --device cpu --time-budget MINUTES/60`` (planned under the same pinning, so its
  step measurement sees one core; the plan sizes the network and sets epochs so that every configuration x 5
  folds fits, or, when the budget is too small for that, fewer jobs: see README "Planning"), ``preprocess``,
  ``train`` (what the plan asks for), ``select``, ``predict``.
- nnU-Net: ``nnUNetv2_plan_and_preprocess -c 3d_fullres``, a probe run that measures its iteration time, then
  ``nnUNetv2_train 3d_fullres all`` with its default trainer whose epochs x iterations fit the budget (see
  ``_nnunet_e2e.py``), then prediction with its defaults (mirroring on).

Training starts for both at the same moment and is stopped at the budget if still running (prediction then uses
the latest checkpoints). Planning, preprocessing and prediction are timed and reported, outside the budget. Both
tools' predictions are scored by ``autoseg evaluate`` against ``labelsTs``. Prints a table and writes
``benchmarks/results/<--name>.json``.

The sides, :func:`run_sides` and :func:`evaluate_summary` are shared with ``real.py`` (the same comparison on real
datasets); the nnU-Net dataset and configuration are an :class:`NnUNetTask`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _nnunet_e2e as nn  # noqa: E402
from _measure import NNUNET_PYTHON, evaluation_seed, print_table, write_results  # noqa: E402

AUTOSEG = [sys.executable, "-m", "autoseg.cli"]


@dataclass(frozen=True)
class NnUNetTask:
    """What nnU-Net trains: its dataset id and folder name (``DatasetNNN_Name``) and its configuration."""

    dataset_id: int
    dataset: str
    configuration: str  # 3d_fullres for 3D data, 2d for 2D data


SYNTH_CT = NnUNetTask(905, "Dataset905_E2ESynthCT", "3d_fullres")
#: nnU-Net's checkpoints, in the order prediction prefers them (latest: training was stopped at the budget).
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth")


def nnunet_cmd(name: str) -> str:
    return str(Path(NNUNET_PYTHON).parent / name)


class Side:
    """One tool's stages, run in a thread; the barrier lines up the start and end of both trainings."""

    def __init__(self, name: str, work: Path, cpu: int, budget_s: float, barrier: threading.Barrier):
        self.name, self.work, self.cpu, self.budget_s, self.barrier = name, work, cpu, budget_s, barrier
        self.stages: dict[str, dict] = {}
        self.facts: dict = {}
        self.error: str | None = None

    def stage(self, name: str, cmd: list[str], *, env: dict | None = None, deadline: bool = False) -> dict:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {self.name}: {name}", flush=True)
        log = self.work / "logs" / f"{self.name}_{name}.log"
        result = nn.run_stage(cmd, log, cpu=self.cpu, env=env, deadline_s=self.budget_s if deadline else None)
        self.stages[name] = result
        return result

    def run(self, data: Path) -> None:
        try:
            self.prepare(data)
            self.barrier.wait()
            self.train()
            self.barrier.wait()
            self.predict(data)
        except Exception:  # report it and let the other side finish
            self.error = traceback.format_exc()
            print(f"{self.name} failed:\n{self.error}", flush=True)
            self.barrier.abort()


class Autoseg(Side):
    #: extra ``autoseg plan`` flags (a variant of the default plan, for comparisons between autoseg runs)
    plan_flags: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        return self.work / f"{self.name}_run"

    def prepare(self, data: Path) -> None:
        run = str(self.run_dir)
        self.stage("fingerprint", [*AUTOSEG, "fingerprint", str(data), "-o", run, "-j", "1"])
        hours = f"{self.budget_s / 3600:.6f}"
        self.stage("plan", [*AUTOSEG, "plan", run, "--device", "cpu", "--time-budget", hours, *self.plan_flags])
        self.stage("preprocess", [*AUTOSEG, "preprocess", run, "-j", "1"])

    def train(self) -> None:
        self.stage("train", [*AUTOSEG, "train", str(self.run_dir), "--devices", "cpu", "-j", "0"], deadline=True)

    def predict(self, data: Path) -> None:
        finished = not self.stages["train"]["stopped_at_budget"]
        if finished:
            self.stage("select", [*AUTOSEG, "select", str(self.run_dir)])
        self.predict_to("predict", data, self.work / f"pred_{self.name}")
        self.facts = autoseg_facts(self.run_dir)

    def predict_to(self, stage: str, data: Path, out: Path, *extra: str) -> dict:
        """``autoseg predict`` of ``imagesTs`` into ``out`` (the final checkpoints, or the latest when training was
        stopped at the budget); ``extra`` flags such as nnU-Net's settings for an equal-settings row."""
        finished = not self.stages["train"]["stopped_at_budget"]
        cmd = [*AUTOSEG, "predict", "-m", str(self.run_dir), "-i", str(data / "imagesTs"), "-o", str(out)]
        return self.stage(stage, cmd + ["--device", "cpu", *extra] + ([] if finished else ["--checkpoint", "latest"]))


class NnUNet(Side):
    def __init__(self, *args, task: NnUNetTask, **kwargs):
        super().__init__(*args, **kwargs)
        self.task = task

    def env(self) -> dict[str, str]:
        return {
            "nnUNet_raw": str(self.work / "nnUNet_raw"),
            "nnUNet_preprocessed": str(self.work / "nnUNet_preprocessed"),
            "nnUNet_results": str(self.work / "nnUNet_results"),
        }

    def train_env(self) -> dict[str, str]:
        """No augmentation processes (0 would break nnU-Net's planner, which sizes torch threads by it)."""
        return {**self.env(), "nnUNet_n_proc_DA": "0"}

    def model_dir(self, trainer: str) -> Path:
        return self.work / "nnUNet_results" / self.task.dataset / f"{trainer}__nnUNetPlans__{self.task.configuration}"

    def train_cmd(self, trainer: str) -> list[str]:
        task = self.task
        args = [str(task.dataset_id), task.configuration, "all", "-tr", trainer, "-device", "cpu"]
        return [nnunet_cmd("nnUNetv2_train"), *args]

    def prepare(self, data: Path) -> None:
        dataset = str(self.task.dataset_id)
        self.stage(
            "fingerprint", [nnunet_cmd("nnUNetv2_extract_fingerprint"), "-d", dataset, "-np", "1"], env=self.env()
        )
        self.stage("plan", [nnunet_cmd("nnUNetv2_plan_experiment"), "-d", dataset], env=self.env())
        cmd = [nnunet_cmd("nnUNetv2_preprocess"), "-d", dataset, "-c", self.task.configuration, "-np", "1"]
        self.stage("preprocess", cmd, env=self.env())
        nn.write_trainers(None)
        probe = self.stage("probe", self.train_cmd("nnUNetTrainerE2EProbe"), env=self.train_env())
        stats = nn.read_stats(self.model_dir("nnUNetTrainerE2EProbe") / "fold_all")
        self.schedule = nn.fit_schedule(stats, probe["wall_s"], self.budget_s)
        print(f"nnU-Net schedule: {self.schedule.why}", flush=True)
        nn.write_trainers(self.schedule)

    def train(self) -> None:
        self.stage("train", self.train_cmd("nnUNetTrainerE2EBudget"), env=self.train_env(), deadline=True)

    def predict(self, data: Path) -> None:
        model = self.model_dir("nnUNetTrainerE2EBudget")
        chk = next((c for c in CHECKPOINTS if (model / "fold_all" / c).is_file()), None)
        if chk is None:
            raise RuntimeError(f"{model / 'fold_all'}: no checkpoint; the budget ended before the first epoch did")
        script = str(HERE / "_nnunet_e2e_predict.py")
        out = self.work / "pred_nnunet"
        self.stage("predict", [NNUNET_PYTHON, script, str(model), "all", chk, str(data / "imagesTs"), str(out)])
        self.facts = nnunet_facts(self.work, model, self.schedule, chk, self.task)


def autoseg_facts(run: Path) -> dict:
    """Key facts of autoseg's plan and of the training it did."""
    from autoseg.networks.builder import build_network
    from autoseg.planning.plans import load_plans

    plans = load_plans(run)
    configs = {}
    for name, c in plans.configurations.items():
        folds = sorted((run / "models" / name).glob("fold_*"))
        epochs_done = [
            len((f / "log.jsonl").read_text().splitlines()) if (f / "log.jsonl").is_file() else 0 for f in folds
        ]
        net = build_network(c.network, len(plans.channels), plans.n_outputs)
        configs[name] = {
            "patch_size": list(c.patch_size),
            "batch_size": c.batch_size,
            "features_per_stage": list(c.network.features_per_stage),
            "parameters": sum(p.numel() for p in net.parameters()),
            "mirror_axes": list(c.augmentation.mirror_axes),
            "precision": c.training.precision,
            "epochs": c.training.epochs,
            "iterations_per_epoch": c.training.iterations_per_epoch,
            "folds_trained": {f.name: (f / "checkpoint_final.pt").is_file() for f in folds},
            "epochs_done_per_fold": epochs_done,
            "iterations_done": sum(epochs_done) * c.training.iterations_per_epoch,
        }
    selection = run / "selection.json"
    chosen = json.loads(selection.read_text()) if selection.is_file() else None
    return {
        "configurations": configs,
        "selection": chosen and {"configurations": chosen["configurations"], "candidates": chosen["candidates"]},
        "plan_why": list(plans.why),
    }


def nnunet_facts(work: Path, model: Path, schedule: nn.Schedule, checkpoint: str, task: NnUNetTask) -> dict:
    """Key facts of nnU-Net's plan and of the training it did."""
    plans = json.loads((work / "nnUNet_preprocessed" / task.dataset / "nnUNetPlans.json").read_text())
    c = plans["configurations"][task.configuration]
    stats = nn.read_stats(model / "fold_all")
    arch = c["architecture"]["arch_kwargs"]
    epochs_done = len(stats.get("epoch_ends", []))
    return {
        "configuration": task.configuration,
        "fold": "all",
        "patch_size": c["patch_size"],
        "batch_size": c["batch_size"],
        "features_per_stage": arch["features_per_stage"],
        "parameters": stats.get("parameters"),
        "mirror_axes": stats.get("mirror_axes"),
        "schedule": nn.schedule_dict(schedule),
        "epochs_done": epochs_done,
        "iterations_done": epochs_done * schedule.iterations,
        "checkpoint_used": checkpoint,
    }


def evaluate_summary(pred: Path, gt: Path, out: Path, *, labels: list[int] | None = None, cpu: int = 0) -> dict:
    """``autoseg evaluate`` (the same code for both tools): its ``summary.json``, plus ``wall_s``."""
    cmd = [*AUTOSEG, "evaluate", str(pred), str(gt), "-o", str(out), "-j", "1"]
    result = nn.run_stage(cmd + (["--labels", *map(str, labels)] if labels else []), out / "log", cpu=cpu)
    return {**json.loads((out / "summary.json").read_text()), "wall_s": result["wall_s"]}


def evaluate(pred: Path, gt: Path, out: Path, names: dict[str, str]) -> dict:
    """Dice per class and foreground mean from ``autoseg evaluate`` (the same code for both tools)."""
    summary = evaluate_summary(pred, gt, out)
    dice = {names.get(k, k): round(v["dice"]["mean"], 4) for k, v in summary["per_class"].items()}
    return {"dice": dice, "mean_dice": round(summary["foreground_mean"]["dice"], 4), "wall_s": summary["wall_s"]}


def run_sides(data: Path, work: Path, budget_s: float, cores: list[int], task: NnUNetTask) -> list[Side]:
    """Both tools side by side on ``data`` (an nnU-Net raw dataset folder under ``work/nnUNet_raw``), each pinned to
    its core, training started and ended together; raises SystemExit when a side failed."""
    barrier = threading.Barrier(2)
    sides = [
        Autoseg("autoseg", work, cores[0], budget_s, barrier),
        NnUNet("nnunet", work, cores[1], budget_s, barrier, task=task),
    ]
    threads = [threading.Thread(target=s.run, args=(data,)) for s in sides]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [s for s in sides if s.error]
    if failed:
        raise SystemExit(f"{', '.join(s.name for s in failed)} failed; logs in {work / 'logs'}")
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget of each tool (default 20)")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--test-cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=None, help="synthetic seed (default: a fresh one per run)")
    parser.add_argument("--kind", default="ct3d_hard", choices=["ct3d", "ct3d_hard"], help="default ct3d_hard")
    parser.add_argument("--cores", type=int, nargs=2, default=[0, 1], metavar=("AUTOSEG", "NNUNET"))
    parser.add_argument("--work", type=Path, default=HERE / "work" / "end_to_end")
    parser.add_argument("--name", default="end_to_end", help="results file name (default end_to_end)")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    data = args.work / "nnUNet_raw" / SYNTH_CT.dataset
    args.seed, seed_source = evaluation_seed(args.seed)
    print(f"synthetic {args.kind}, seed {args.seed} ({seed_source})", flush=True)
    synth = [*AUTOSEG, "synth", str(data), "--kind", args.kind, "--cases", str(args.cases)]
    nn.run_stage(
        synth + ["--test-cases", str(args.test_cases), "--seed", str(args.seed)],
        args.work / "logs" / "synth.log",
        cpu=0,
    )
    sides = run_sides(data, args.work, args.minutes * 60, args.cores, SYNTH_CT)
    labels = json.loads((data / "dataset.json").read_text())["labels"]
    names = {str(v): k for k, v in labels.items()}
    scores = {
        s.name: evaluate(args.work / f"pred_{s.name}", data / "labelsTs", args.work / f"eval_{s.name}", names)
        for s in sides
    }
    rows = [table_row(s, scores[s.name]) for s in sides]
    class_names = list(scores["autoseg"]["dice"])
    print(
        f"\nequal budget: {args.minutes:g} min of training each, one core each, {args.cases} training cases, "
        f"{args.test_cases} held-out cases"
    )
    columns = ["tool", "fingerprint_s", "plan_s", "preprocess_s", "train_s", "stopped", "iterations"]
    print_table(
        rows, columns + [*class_names, "mean_dice", "select_s", "predict_s", "train_rss_mib", "predict_rss_mib"]
    )
    payload = {
        "settings": {
            "minutes": args.minutes,
            "cases": args.cases,
            "test_cases": args.test_cases,
            "seed": args.seed,
            "seed_source": seed_source,
            "kind": args.kind,
            "cores": {"autoseg": args.cores[0], "nnunet": args.cores[1]},
            "threads_per_tool": 1,
            "data_loader_processes": 0,
            "nnunet": "3d_fullres, fold all, nnUNetTrainer with epochs x iterations fitted to the budget "
            "(nnUNetTrainerE2EBudget), prediction with mirroring, step 0.5",
            "autoseg": "default planner (--device cpu --time-budget), train what the plan asks for (every "
            "configuration x 5 folds, or fewer jobs for a small budget), select when it cross-validates, prediction "
            "with mirroring",
        },
        "rows": rows,
        "scores": scores,
        "stages": {s.name: s.stages for s in sides},
        "plans": {s.name: s.facts for s in sides},
    }
    print(f"wrote {write_results(args.name, payload)}")


def iterations_done(side: Side) -> int:
    """Training iterations the tool ran (autoseg: summed over every configuration and fold it trained)."""
    if isinstance(side, Autoseg):
        return sum(c["iterations_done"] for c in side.facts["configurations"].values())
    return side.facts["iterations_done"]


def stage_row(side: Side) -> dict:
    """Stage times (nnU-Net's probe counted with planning), whether training hit the budget, iterations, peak RSS."""
    st = side.stages
    return {
        "tool": side.name,
        "fingerprint_s": st["fingerprint"]["wall_s"],
        "plan_s": round(st["plan"]["wall_s"] + st.get("probe", {}).get("wall_s", 0), 1),
        "preprocess_s": st["preprocess"]["wall_s"],
        "train_s": st["train"]["wall_s"],
        "stopped": st["train"]["stopped_at_budget"],
        "iterations": iterations_done(side),
        "select_s": st.get("select", {}).get("wall_s", "-"),
        "predict_s": st["predict"]["wall_s"],
        "train_rss_mib": st["train"]["peak_rss_mib"],
        "predict_rss_mib": st["predict"]["peak_rss_mib"],
    }


def table_row(side: Side, score: dict) -> dict:
    """One tool's line of the table: stage times, iterations trained, Dice, peak memory."""
    row = stage_row(side)
    return {**row, **score["dice"], "mean_dice": score["mean_dice"]}


if __name__ == "__main__":
    main()
