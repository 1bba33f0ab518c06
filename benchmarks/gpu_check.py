"""One prepared check on a CUDA machine: plan for the real GPU, train as GPU jobs, predict, memory model.

    python benchmarks/gpu_check.py [--out DIR] [--epochs 4] [--aug-workers 2,4,8] [--aug-iterations 40]

1. the whole pipeline on a synthetic CT dataset: fingerprint, a plan for this GPU (memory read from the device,
   step time measured), preprocessing, (configuration, fold) jobs launched as separate processes on the GPU(s)
   by the job placer with mixed precision, their seconds per iteration and peak memory against the plan's
   estimate, then fp16 sliding-window prediction of held-out cases with and without mirroring, and their Dice;
2. the planner's plan for a large real dataset (Liver, from fingerprints/) on this GPU: measured peak memory of a
   real training step against the estimate and against the card;
3. augmentation in the CPU loader vs on the GPU (``augmentation.device``), 3d_fullres of the plan of 1. at 2, 4 and
   8 loader workers: seconds per iteration and GPU busy % (``torch.cuda.utilization()`` when pynvml is there, else
   sampled from ``nvidia-smi``) over the second of two epochs; and the time per batch of either augmentation on
   the Hippocampus plan (benchmarks/batch_augmentation.py) on the CPU and on the GPU.
Writes ``gpu_check.json`` into --out (default benchmarks/results). Without a GPU it says so and skips everything
(``--device cpu`` runs part 1 as a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))

from batch_augmentation import plan_for, time_per_batch  # noqa: E402

from autoseg.data.synth import make_dataset  # noqa: E402
from autoseg.evaluation.evaluate import evaluate_folders  # noqa: E402
from autoseg.fingerprint import extract_fingerprint  # noqa: E402
from autoseg.fingerprint_import import load_corpus_entry  # noqa: E402
from autoseg.inference.predict import predict_path  # noqa: E402
from autoseg.planning.memory import measure_training_memory  # noqa: E402
from autoseg.planning.planner import make_plans  # noqa: E402
from autoseg.planning.plans import load_plans  # noqa: E402
from autoseg.preprocessing.preprocess import preprocess  # noqa: E402
from autoseg.runfolder import record_dataset  # noqa: E402
from autoseg.training.jobs import Job, detect_devices, run_jobs  # noqa: E402
from autoseg.training.trainer import TrainOptions, train_fold  # noqa: E402

GIB = 2**30


def _stamp(start: float, text: str) -> None:
    print(f"[{time.perf_counter() - start:7.1f} s] {text}", flush=True)


def pipeline(work: Path, epochs: int, iterations: int, start: float, device: str = "cuda") -> dict:
    data = make_dataset(work / "data", "ct3d", cases=12, test_cases=3, seed=1)
    run = work / "run"
    record_dataset(run, data)
    fp = extract_fingerprint(data, run / "fingerprint.json")
    t = time.perf_counter()
    plans = make_plans(
        fp,
        device=device,
        overrides=[
            f"training.epochs={epochs}",
            f"training.iterations_per_epoch={iterations}",
            "training.val_iterations=5",
        ],
    )
    plan_seconds = time.perf_counter() - t
    plans.save(run / "plans.json")
    _stamp(start, f"planned for {plans.device.name} in {plan_seconds:.1f} s")
    preprocess(run, data_dir=data)
    devices = detect_devices(None if device == "cuda" else "cpu")
    jobs = [Job("3d_fullres", "0"), Job("3d_fullres", "1"), Job("2d", "0")]
    results = run_jobs(run, jobs, devices)
    _stamp(
        start,
        "jobs: "
        + ", ".join(f"{r.job.config}/{r.job.fold} on {r.device}: rc {r.returncode} {r.seconds:.0f} s" for r in results),
    )
    out = {
        "device": plans.device.name,
        "plan_seconds": round(plan_seconds, 1),
        "devices": devices,
        "plan_why": list(plans.why),
        "jobs": [],
        "configurations": {},
    }
    for name, c in plans.configurations.items():
        out["configurations"][name] = {
            "patch_size": list(c.patch_size),
            "batch_size": c.batch_size,
            "block": c.network.block,
            "features": list(c.network.features_per_stage),
            "estimated_memory_gib": round(c.estimated_memory_bytes / GIB, 3),
        }
    for r in results:
        log = run / "models" / r.job.config / f"fold_{r.job.fold}" / "log.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        peak = max((x.get("peak_memory_bytes") or 0 for x in records), default=0)
        estimate = plans.configurations[r.job.config].estimated_memory_bytes
        out["jobs"].append(
            {
                "config": r.job.config,
                "fold": r.job.fold,
                "device": r.device,
                "returncode": r.returncode,
                "seconds": r.seconds,
                "seconds_per_iteration": [x["seconds_per_iteration"] for x in records],
                "pseudo_dice_last": records[-1]["val_dice"] if records else None,
                "peak_memory_gib": round(peak / GIB, 3),
                "estimate_over_measured": round(estimate / peak, 3) if peak else None,
                "log_tail": r.log.read_text(errors="replace")[-1500:] if r.returncode else "",
            }
        )
    for mode in ("none", "all"):
        t = time.perf_counter()
        pred = work / f"pred_{mode}"
        predict_path(
            run, data / "imagesTs", pred, configs=["3d_fullres"], folds=["0", "1"], device=device, mirror_mode=mode
        )
        seconds = time.perf_counter() - t
        summary = evaluate_folders(pred, data / "labelsTs", workers=1)
        out[f"predict_{mode}"] = {
            "seconds_total": round(seconds, 2),
            "cases": 3,
            "dice_per_class": {k: round(v["dice"].mean, 4) for k, v in summary.per_class.items()},
        }
        _stamp(
            start,
            f"predict mirror={mode}: {seconds:.1f} s for 3 cases, Dice {out[f'predict_{mode}']['dice_per_class']}",
        )
    return out


def large_plan(start: float) -> dict:
    entry = load_corpus_entry(ROOT / "fingerprints" / "Dataset003_Liver.json")
    plans = make_plans(entry.fingerprint, device="cuda")
    c = plans.configurations["3d_fullres"]
    torch.backends.cudnn.benchmark = True
    measured = measure_training_memory(
        c.network, len(plans.channels), plans.n_outputs, c.patch_size, c.batch_size, precision="bf16", device="cuda"
    )
    total = torch.cuda.get_device_properties(0).total_memory
    _stamp(
        start,
        f"Liver plan {list(c.patch_size)} x{c.batch_size} ({c.network.block}): estimate "
        f"{c.estimated_memory_bytes / GIB:.1f} GiB, measured {measured / GIB:.1f} GiB of {total / GIB:.0f}",
    )
    return {
        "patch_size": list(c.patch_size),
        "batch_size": c.batch_size,
        "block": c.network.block,
        "features": list(c.network.features_per_stage),
        "estimated_gib": round(c.estimated_memory_bytes / GIB, 2),
        "measured_gib": round(measured / GIB, 2),
        "card_gib": round(total / GIB, 1),
        "estimate_over_measured": round(c.estimated_memory_bytes / measured, 3),
        "card_fraction_used": round(measured / total, 3),
        "why": list(c.why),
    }


class GpuBusy:
    """GPU busy % sampled in the background (every ~0.2 s): torch.cuda.utilization() (pynvml), else nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.source = "none"
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuBusy:
        try:
            torch.cuda.utilization()
            self.source, target = "torch.cuda.utilization", self._poll
        except Exception:  # no pynvml: one nvidia-smi process printing a line per sample
            if shutil.which("nvidia-smi") is None:
                return self
            query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"]
            index = torch.cuda.current_device()
            self._proc = subprocess.Popen([*query, "-i", str(index)], stdout=subprocess.PIPE, text=True)
            self.source, target = "nvidia-smi", self._read
        threading.Thread(target=target, daemon=True).start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append((time.monotonic(), float(torch.cuda.utilization())))

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append((time.monotonic(), float(line)))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)

    def mean(self, start: float, end: float) -> float | None:
        values = [v for t, v in self.samples if start <= t <= end]
        return round(sum(values) / len(values), 1) if values else None


def augmentation_comparison(run: Path, workers: list[int], iterations: int, start: float, device: str = "cuda") -> dict:
    """3d_fullres of ``run`` trained 2 epochs per (augmentation device, loader workers); the second epoch measured."""
    rows = []
    for where in ("cpu", "gpu"):
        for n in workers:
            folder = run.parent / f"augmentation_{where}_{n}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            for item in run.glob("*.json"):
                shutil.copy(item, folder / item.name)
            (folder / "preprocessed").symlink_to(run / "preprocessed")
            ends: list[tuple[float, dict]] = []
            overrides = [
                f"augmentation.device={where}",
                "training.epochs=2",
                f"training.iterations_per_epoch={iterations}",
                "training.val_iterations=1",
            ]

            def mark(epoch: int, record: dict, ends=ends) -> bool:
                ends.append((time.monotonic(), record))
                return False  # never stop early

            with GpuBusy() as busy:
                train_fold(
                    folder,
                    "3d_fullres",
                    0,
                    overrides=overrides,
                    options=TrainOptions(device=device, workers=n),
                    on_epoch_end=mark,
                )
            end, record = ends[-1]
            rows.append(
                {
                    "augmentation": where,
                    "loader_workers": n,
                    "seconds_per_iteration": record["seconds_per_iteration"],
                    "gpu_busy_percent": busy.mean(end - record["seconds"], end),
                    "utilisation_source": busy.source,
                }
            )
            _stamp(start, f"augmentation {where}, {n} workers: {rows[-1]}")
    c = load_plans(run).configurations["3d_fullres"]
    return {"patch_size": list(c.patch_size), "batch_size": c.batch_size, "iterations": iterations, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/autoseg-gpu-check"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=50, help="iterations per epoch")
    parser.add_argument("--device", default="cuda", help="cpu runs the pipeline part only (a smoke test)")
    parser.add_argument("--aug-workers", default="2,4,8", help="loader workers for the augmentation comparison")
    parser.add_argument("--aug-iterations", type=int, default=40, help="iterations per epoch of that comparison")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: GPU checks skipped (this check is for a GPU machine; --device cpu for a smoke test)")
        return
    start = time.perf_counter()
    result = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "none"}
    if args.device == "cuda":
        try:
            result["large_plan"] = large_plan(start)
        except Exception as exc:  # keep going: the pipeline part is independent
            result["large_plan"] = {"error": repr(exc)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps(result, indent=2) + "\n")  # the first part survives a timeout of the second
    result["pipeline"] = pipeline(args.work, args.epochs, args.iterations, start, args.device)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if args.device == "cuda":
        workers = [int(w) for w in args.aug_workers.split(",")]
        result["augmentation"] = augmentation_comparison(args.work / "run", workers, args.aug_iterations, start)
        hippocampus = plan_for(ROOT / "fingerprints" / "Dataset004_Hippocampus.json")
        torch.set_num_threads(1)  # as in a loader worker
        result["augmentation"]["per_batch_ms_hippocampus"] = time_per_batch(
            hippocampus, "3d_fullres", ["cpu", "cuda"], 20
        )
        path.write_text(json.dumps(result, indent=2) + "\n")
    _stamp(start, f"wrote {path}")


if __name__ == "__main__":
    main()
