"""Training data loader throughput: autoseg vs nnU-Net v2, same dataset, same 3d_fullres patch and batch size.

    flock /tmp/autoseg-bench.lock python benchmarks/dataloader.py [--kind ct3d|mr3d] [--cases 24] [--scale 1]
        [--workers 2] [--batches 100] [--warmup 10] [--repeats 3]

Both tools fingerprint, plan (autoseg ``--preset nnunet``; the run stops unless target spacing, patch and batch
agree) and preprocess the dataset. Then each loader runs in its own process with ``--workers`` worker processes,
its full default augmentation and deep-supervision targets: ``--warmup`` batches, then ``--batches`` timed
batches; augmented batches per second, alternately (A, B, A, B, ...), medians in the table. autoseg's loader is
:class:`autoseg.training.loader.BatchLoader` with the recipe the trainer builds; nnU-Net's is built as
``nnUNetTrainer.get_dataloaders`` does (benchmarks/_nnunet_loader.py, run with nnU-Net's python). Results go to
benchmarks/results/dataloader.json under ``<kind>_x<scale>_w<workers>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import NNUNET_PYTHON, RESULTS, print_table, run_measured, write_results  # noqa: E402
from _nnunet import CONFIG, Work, autoseg_cmd, compare_plans, make_data, nnunet_cmd, setup_plans  # noqa: E402

HERE = Path(__file__).resolve().parent


def measure_autoseg(run_dir: Path, workers: int, warmup: int, batches: int) -> dict:
    """Batches per second of autoseg's training loader over every preprocessed case (run in a child process)."""
    import torch

    from autoseg.planning.plans import load_plans
    from autoseg.preprocessing.store import list_cases, preprocessed_folder
    from autoseg.training.loader import BatchLoader
    from autoseg.training.trainer import PreprocessedCases, _recipes

    start = time.perf_counter()
    plans = load_plans(run_dir)
    c = plans.configurations[CONFIG]
    folder = preprocessed_folder(run_dir, CONFIG)
    n_ds = len(c.network.strides) - 1 if c.network.deep_supervision else 1
    recipe, _ = _recipes(plans, c, list_cases(folder), None, n_ds, c.training.seed)
    info = {
        "patch_size": list(recipe.patch_size),
        "sampling_patch_size": list(recipe.sampling_patch_size),
        "batch_size": recipe.batch_size,
        "dummy_2d": bool(c.augmentation.dummy_2d),
        "cases": len(recipe.case_ids),
    }

    def take(loader: BatchLoader) -> dict:
        batch = next(loader)  # handed to the training step as tensors, as nnU-Net's loader does
        return {"data": torch.from_numpy(batch["data"]), "target": [torch.from_numpy(t) for t in batch["target"]]}

    with BatchLoader(PreprocessedCases(folder), recipe, workers=workers) as loader:
        batch = take(loader)
        first = time.perf_counter() - start
        for _ in range(warmup):
            batch = take(loader)
        t0 = time.perf_counter()
        for _ in range(batches):
            batch = take(loader)
        elapsed = time.perf_counter() - t0
    info.update(
        data_shape=list(batch["data"].shape),
        target_shapes=[list(t.shape) for t in batch["target"]],
        first_batch_s=round(first, 3),
        measured_s=round(elapsed, 3),
        batches_per_s=round(batches / elapsed, 3),
    )
    return info


def _result(run: dict, load: float) -> dict:
    line = next(ln for ln in reversed(run["output_tail"].splitlines()) if ln.startswith("RESULT "))
    extra = {"wall_s": run["wall_s"], "peak_rss_mib": run["peak_rss_mib"], "load_avg_1min_before": round(load, 2)}
    return {**json.loads(line.removeprefix("RESULT ")), **extra}


def _run_autoseg(work: Work, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(work.run), *_loop_args(args)]
    load = os.getloadavg()[0]
    return _result(run_measured(cmd), load)


def _run_nnunet(work: Work, args: argparse.Namespace) -> dict:
    plans, dataset_json = work.nnunet_dataset / "nnUNetPlans.json", work.nnunet_dataset / "dataset.json"
    cmd = [NNUNET_PYTHON, str(HERE / "_nnunet_loader.py"), str(plans), str(dataset_json), *_loop_args(args)]
    load = os.getloadavg()[0]
    return _result(run_measured(cmd, env=work.env()), load)


def _loop_args(args: argparse.Namespace) -> list[str]:
    return ["--workers", str(args.workers), "--warmup", str(args.warmup), "--batches", str(args.batches)]


def _preprocess_both(work: Work, workers: int) -> None:
    run_measured(autoseg_cmd("preprocess", str(work.run), "-c", CONFIG, "-j", str(workers)))
    cmd = [nnunet_cmd("nnUNetv2_preprocess"), "-d", str(work.dataset_id), "-c", CONFIG, "-np", str(workers)]
    run_measured(cmd, env=work.env())


def _row(tool: str, runs: list[dict]) -> dict:
    return {
        "tool": tool,
        "batches_per_s": statistics.median(r["batches_per_s"] for r in runs),
        "first_batch_s": statistics.median(r["first_batch_s"] for r in runs),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        "runs_batches_per_s": [r["batches_per_s"] for r in runs],
    }


def _check_same_batches(ours: dict, theirs: dict) -> None:
    for key in ("patch_size", "batch_size", "data_shape", "target_shapes"):
        if ours[key] != theirs[key]:
            raise SystemExit(f"the loaders do not make the same batches: {key} {ours[key]} vs nnU-Net {theirs[key]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["ct3d", "mr3d"], default="ct3d")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--scale", type=float, default=1.0, help="upsample every case by this factor per axis")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (both tools)")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=HERE / "work" / "dataloader")
    parser.add_argument("--reuse", action="store_true", help="keep the work folder's preprocessed data")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: measure autoseg in RUN
    args = parser.parse_args()
    if args.child:
        result = measure_autoseg(args.child, args.workers, args.warmup, args.batches)
        print("RESULT " + json.dumps(result), flush=True)
        return

    work = Work(args.work, args.kind)
    if not args.reuse:
        dataset = make_data(work, args.cases, scale=args.scale)
        setup_plans(work, 2)
        plan = compare_plans(work)  # before preprocessing: fail early when the plans differ
        _preprocess_both(work, 2)
        (work.root / "dataset_info.json").write_text(json.dumps(dataset))
    else:
        plan = compare_plans(work)
    dataset = json.loads((work.root / "dataset_info.json").read_text())
    ours, theirs = [], []
    for i in range(args.repeats):
        ours.append(_run_autoseg(work, args))
        theirs.append(_run_nnunet(work, args))
        _check_same_batches(ours[-1], theirs[-1])
        print(f"run {i + 1}: autoseg {ours[-1]['batches_per_s']} batches/s, nnU-Net {theirs[-1]['batches_per_s']}")
    a, b = _row("autoseg", ours), _row("nnU-Net v2", theirs)
    ratio = {"tool": "ratio autoseg/nnU-Net", "batches_per_s": round(a["batches_per_s"] / b["batches_per_s"], 2)}
    print(
        f"training loader {CONFIG}: patch {ours[0]['patch_size']}, batch {ours[0]['batch_size']}, "
        f"{args.workers} workers, {args.batches} batches after {args.warmup}, median of {args.repeats}"
    )
    print_table([a, b, ratio], ["tool", "batches_per_s", "first_batch_s", "peak_rss_mib", "runs_batches_per_s"])
    key = f"{args.kind}_x{dataset['scale']:g}_w{args.workers}"
    old = RESULTS / "dataloader.json"
    runs = json.loads(old.read_text()).get("runs", {}) if old.is_file() else {}
    runs[key] = {
        "dataset": dataset,
        "plan": plan,
        "workers": args.workers,
        "batches": args.batches,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rows": [a, b, ratio],
        "ratio_throughput_autoseg_over_nnunet": ratio["batches_per_s"],
        "per_run": {"autoseg": ours, "nnunet": theirs},
    }
    print(f"wrote {write_results('dataloader', {'runs': runs})}")


if __name__ == "__main__":
    main()
