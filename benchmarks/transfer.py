"""Few labels: training from scratch vs self-supervised pretraining vs another dataset's run, on MSD Hippocampus.

    flock /tmp/autoseg-bench.lock python benchmarks/transfer.py [--labels 5 10 20] [--iterations 250]
        [--pretrain-iterations 1000] [--source-iterations 250] [--cores 0]

Conditions, fixed before any result was seen:

- Test split: the fixed one of ``_realdata.py`` (20% of the 208 cases, seeded); it scores only. Labelled training
  cases: the first N (sorted ids) of the training part, N in ``--labels``.
- One plan for every run: autoseg's CPU plan of the 20-case subset with one model (no cross-validation), the runs
  with fewer labels planned like it (``plan_like``), so every method trains the same network on the same patches.
- scratch: that plan, random initialisation. pretrained: ``autoseg pretrain`` (masked image modelling) on every
  training-part image without its labels (never a test image), ``--pretrain-iterations``, then fine-tuned.
  other dataset: initialised from a run trained ``--source-iterations`` on the synthetic ``mr3d`` example (2 MR-like
  channels, 2 classes; there is no second real 3D dataset here), planned like the same plan: its first convolution
  is adapted to one channel and its output heads are re-initialised.
- Equal fine-tuning budget: ``--iterations`` for every method (iterations, not seconds: valid on a busy machine).
- Scored: mean foreground Dice per test case (``autoseg evaluate``), its mean with a percentile bootstrap 95%
  interval, and the paired per-case difference to scratch with its interval.

Every run is added to ``benchmarks/results/transfer.json`` (``runs[<iterations>it][<timestamp>]``) with a PNG
(Dice against the number of labelled cases) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _realdata  # noqa: E402
from _measure import RESULTS, add_run, git_commit, machine, print_table  # noqa: E402

from autoseg.data.synth import make_dataset  # noqa: E402
from autoseg.evaluation.evaluate import evaluate_folders  # noqa: E402
from autoseg.evaluation.statistics import paired_bootstrap  # noqa: E402
from autoseg.fingerprint import extract_fingerprint  # noqa: E402
from autoseg.inference.predict import predict_path  # noqa: E402
from autoseg.planning.planner import make_plans  # noqa: E402
from autoseg.planning.plans import Plans, load_plans  # noqa: E402
from autoseg.preprocessing.preprocess import preprocess  # noqa: E402
from autoseg.runfolder import RunFolder, record_dataset  # noqa: E402
from autoseg.training.pretrain import PretrainOptions, pretrain  # noqa: E402
from autoseg.training.trainer import TrainOptions, train_fold  # noqa: E402

CONFIG = "3d_fullres"
ITERATIONS_PER_EPOCH = 50
METHODS = ("scratch", "pretrained", "other_dataset")


def schedule(iterations: int) -> list[str]:
    epochs = max(1, iterations // ITERATIONS_PER_EPOCH)
    return [
        f"training.epochs={epochs}",
        f"training.iterations_per_epoch={ITERATIONS_PER_EPOCH}",
        "training.val_iterations=5",
    ]


def train_run(data: Path, run: Path, like: Plans | None, overrides: list[str], *, base: bool = False) -> Path:
    """Fingerprint, plan (like ``like``), preprocess and train one model on every case of ``data``."""
    record_dataset(run, data)
    fp = extract_fingerprint(data, RunFolder(run).fingerprint, workers=1)
    plans = make_plans(fp, device="cpu", cross_validation=False, overrides=overrides, like=like)
    plans.save(RunFolder(run).plans)
    if base:  # the plan every other run copies: nothing to train
        return run
    preprocess(run, configurations=[CONFIG], workers=1)
    train_fold(run, CONFIG, "all", options=TrainOptions(device="cpu", workers=0))
    return run


def test_dice(run: Path, test_root: Path, out: Path) -> dict[str, float]:
    """Mean foreground Dice per test case of ``run``'s model."""
    predict_path(run, test_root / "imagesTs", out, device="cpu")
    summary = evaluate_folders(out, test_root / "labelsTs", labels=[1, 2], out=out, workers=1)
    return {c.case: float(np.mean([c.metrics[k].dice for k in ("1", "2")])) for c in summary.cases}


def stats(values: dict[str, float], reference: dict[str, float] | None, resamples: int) -> dict:
    cases = sorted(values)
    a = np.array([values[c] for c in cases])
    b = np.array([reference[c] for c in cases]) if reference else np.zeros_like(a)
    mean, low, high = paired_bootstrap(a, b, n_resamples=resamples, seed=0)
    return {"mean": round(mean, 4), "low": round(low, 4), "high": round(high, 4), "n": len(cases)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for method in METHODS:
        ns = sorted(int(n) for n in results)
        s = [results[str(n)][method]["dice"] for n in ns]
        err = [[x["mean"] - x["low"] for x in s], [x["high"] - x["mean"] for x in s]]
        ax.errorbar(ns, [x["mean"] for x in s], yerr=err, marker="o", capsize=3, label=method)
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("test Dice (mean foreground, 95% CI)")
    ax.set_xscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--iterations", type=int, default=250, help="fine-tuning iterations, every method")
    parser.add_argument("--pretrain-iterations", type=int, default=1000)
    parser.add_argument("--source-iterations", type=int, default=250)
    parser.add_argument("--work", type=Path, default=HERE / "work" / "transfer")
    parser.add_argument("--cores", type=int, nargs="+", default=[0])
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of transfer.json and transfer.png")
    args = parser.parse_args()
    os.sched_setaffinity(0, set(args.cores))
    import torch

    torch.set_num_threads(len(args.cores))
    started, commit = time.strftime("%Y-%m-%dT%H:%M:%S"), git_commit()
    hippo = _realdata.DATASETS["hippocampus"]
    work = args.work / started.replace(":", "")
    everything = _realdata.materialise(hippo, work / "all")
    base = train_run(_realdata.materialise(hippo, work / "labels20", max_train=20), work / "plan", None, [], base=True)
    like = load_plans(base)
    # pretraining on every training-part image, its labels ignored; never a test image
    unlabelled = work / "unlabelled"
    (unlabelled / "imagesTr").mkdir(parents=True, exist_ok=True)
    for image in (everything / "imagesTr").iterdir():
        target = unlabelled / "imagesTr" / image.name
        if not target.exists():
            os.symlink(image.resolve(), target)
    (unlabelled / "dataset.json").write_text(
        json.dumps({"channel_names": hippo.channels, "labels": hippo.labels, "file_ending": ".nii.gz"})
    )
    tick = time.perf_counter()
    epochs = max(1, args.pretrain_iterations // like.configurations[CONFIG].training.iterations_per_epoch)
    pretrain([unlabelled], work / "pretrain", base, config=CONFIG, options=PretrainOptions(epochs=epochs, device="cpu"))
    seconds = {"pretrain": round(time.perf_counter() - tick)}
    tick = time.perf_counter()
    source_data = make_dataset(work / "mr3d", "mr3d", cases=20, test_cases=0, seed=11)
    source = train_run(source_data, work / "source", like, schedule(args.source_iterations))
    seconds["source"] = round(time.perf_counter() - tick)
    init = {"scratch": [], "pretrained": [work / "pretrain"], "other_dataset": [source]}
    results: dict[str, dict] = {}
    rows = []
    for n in args.labels:
        data = _realdata.materialise(hippo, work / f"labels{n}", max_train=n)
        dice = {}
        for method in METHODS:
            tick = time.perf_counter()
            overrides = schedule(args.iterations) + [f'training.init_from="{p}"' for p in init[method]]
            run = train_run(data, work / f"run_{n}_{method}", like, overrides)
            dice[method] = test_dice(run, everything, work / f"pred_{n}_{method}")
            seconds[f"{n}_{method}"] = round(time.perf_counter() - tick)
        results[str(n)] = {
            m: {
                "dice": stats(dice[m], None, args.resamples),
                "minus_scratch": stats(dice[m], dice["scratch"], args.resamples) if m != "scratch" else None,
                "per_case": {c: round(v, 4) for c, v in sorted(dice[m].items())},
            }
            for m in METHODS
        }
        for m in METHODS:
            s, d = results[str(n)][m]["dice"], results[str(n)][m]["minus_scratch"]
            rows.append(
                {
                    "labels": n,
                    "method": m,
                    "test Dice [95% CI]": f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]",
                    "minus scratch": "" if d is None else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]",
                }
            )
    print_table(rows, ["labels", "method", "test Dice [95% CI]", "minus scratch"])
    args.results.mkdir(parents=True, exist_ok=True)
    png = args.results / "transfer.png"
    plot(results, png)
    entry = {
        "conditions": {
            "fine_tune_iterations": args.iterations,
            "pretrain_iterations": args.pretrain_iterations,
            "source_iterations": args.source_iterations,
            "plan": "autoseg CPU plan of the 20-case subset, one model; others planned like it",
            "test_cases": _realdata.test_cases(hippo),
            "cores": args.cores,
        },
        "machine": machine(),
        "autoseg_commit": commit,
        "seconds": seconds,
        "results": results,
        "png": png.name,
    }
    path = add_run("transfer", {"dataset": "hippocampus"}, f"{args.iterations}it", started, entry, folder=args.results)
    print(f"written: {path}, {png}")


if __name__ == "__main__":
    main()
