"""CPU inference per case by forward-pass engine: torch fp32, torch bf16 (autocast), onnxruntime fp32 and, when the
``openvino`` package is installed, OpenVINO fp32; same model, same flips, same cases, same sliding window.

    flock /tmp/autoseg-bench.lock python benchmarks/onnx_cpu.py [--run RUN | --random-weights] [--cases 42]
                                                                [--repeats 3] [--mirror single] [--core 1]

Model: a trained Hippocampus run (default ``benchmarks/work/real/hippocampus/15min/autoseg_run``, the 15-min run of
``benchmarks/real.py``), or with ``--random-weights`` the network autoseg plans for Hippocampus on a CPU (``autoseg
fingerprint`` + ``plan --device cpu`` of the training part) with random weights. It is exported once with
``autoseg export --onnx`` (the ONNX check's largest logit difference is recorded) and every engine predicts from
that bundle, so all use the same weights. Cases: the first ``--cases`` of the Hippocampus test split fixed in
``_realdata.py``, read once into memory.

Each engine is an :class:`autoseg.inference.predictor.Predictor` (``precision`` fp32 or bf16; ``engine
onnxruntime``; for OpenVINO the fp32 predictor with each member's network swapped for the compiled ``network.onnx``,
inference precision pinned to f32), so everything but the forward passes is the same code. The process is pinned to
one core (``--core``) with ``--threads`` torch / onnxruntime / OpenVINO threads. After one warm-up case per engine,
``--repeats`` rounds time ``Predictor.predict`` on every case (engines in a rotated order each round); seconds per
case is the median over rounds of the round's mean. Agreement with torch fp32: the share of equal label voxels over
all cases and the mean Dice per foreground label. Prints a table and adds the run to
``benchmarks/results/onnx_cpu.json`` (every run kept, under ``runs[mirror_<mode>][<start time>]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _realdata  # noqa: E402
from _measure import add_run, machine, print_table  # noqa: E402

ENGINES = ("torch_fp32", "torch_bf16", "onnxruntime_fp32", "openvino_fp32")
DEFAULT_RUN = HERE / "work" / "real" / "hippocampus" / "15min" / "autoseg_run"
HEADER = {"benchmark": "onnx_cpu", "dataset": "hippocampus", "format": 1}


class OpenVinoNetwork:
    """An ONNX file compiled by OpenVINO for the CPU, called like the network (float32 in and out)."""

    def __init__(self, path: Path, threads: int):
        import openvino

        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = openvino.Core().compile_model(str(path), "CPU", config)

    def __call__(self, x):
        import torch

        return torch.from_numpy(np.asarray(self.compiled(np.ascontiguousarray(x.numpy()))[0]))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "autoseg"], capture_output=True, text=True, cwd=HERE.parent)
    return commit + ("+uncommitted changes in autoseg/" if dirty.stdout.strip() else "")


def _random_weight_run(work: Path) -> Path:
    """A run folder with autoseg's CPU plan for Hippocampus's training part and random weights (fold 'all')."""
    import torch

    from autoseg.fingerprint import extract_fingerprint
    from autoseg.networks.builder import build_network
    from autoseg.planning.planner import make_plans
    from autoseg.serialization import to_jsonable

    run = work / "random_run"
    checkpoint = run / "models" / "3d_fullres" / "fold_all" / "checkpoint_final.pt"
    if checkpoint.is_file():
        return run
    data = _realdata.materialise(_realdata.DATASETS["hippocampus"], work / "raw")
    fingerprint = extract_fingerprint(data, run / "fingerprint.json", workers=1)
    plans = make_plans(fingerprint, device="cpu", cross_validation=False)
    c = plans.configurations["3d_fullres"]
    plans = dataclasses.replace(plans, configurations={"3d_fullres": c})
    plans.save(run / "plans.json")
    torch.manual_seed(0)
    network = build_network(c.network, len(plans.channels), plans.n_outputs)
    checkpoint.parent.mkdir(parents=True)
    torch.save({"network": network.state_dict(), "configuration": json.dumps(to_jsonable(c))}, checkpoint)
    return run


def _cases(n: int) -> list[tuple[str, np.ndarray, object]]:
    from autoseg.data.io import read_image

    ds = _realdata.DATASETS["hippocampus"]
    cases = _realdata.test_cases(ds)[:n]
    return [(case, *read_image(ds.image(case))) for case in cases]


def _predictor(engine: str, folder: Path, mirror: str, threads: int):
    from autoseg.inference.predictor import Predictor
    from autoseg.runfolder import RunFolder

    common = {"device": "cpu", "mirror_mode": mirror}
    if engine == "onnxruntime_fp32":
        return Predictor(folder, engine="onnxruntime", **common)
    predictor = Predictor(folder, precision="bf16" if engine == "torch_bf16" else "fp32", **common)
    if engine == "openvino_fp32":
        for config, members in predictor.members.items():
            onnx = [OpenVinoNetwork(RunFolder(folder).onnx_network(config, m.fold), threads) for m in members]
            predictor.members[config] = [dataclasses.replace(m, network=n) for m, n in zip(members, onnx)]
    return predictor


def _agreement(labels: list[np.ndarray], reference: list[np.ndarray], n_labels: int) -> dict:
    """Equal-voxel share (all cases pooled) and mean Dice per foreground label of ``labels`` vs ``reference``."""
    equal = sum(int((a == b).sum()) for a, b in zip(labels, reference)) / sum(a.size for a in labels)
    dices = []
    for a, b in zip(labels, reference):
        for value in range(1, n_labels):
            total = int((a == value).sum() + (b == value).sum())
            if total:
                dices.append(2 * int(((a == value) & (b == value)).sum()) / total)
    return {"voxels_equal": round(equal, 6), "mean_dice": round(float(np.mean(dices)), 5) if dices else None}


def measure(args: argparse.Namespace) -> dict:
    """Time every engine on the cases; returns the run's entry for the results file."""
    import torch

    from autoseg.devices import cpu_has_native_bf16
    from autoseg.export.bundle import export_bundle, open_bundle, read_manifest

    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(args.threads)
    run = _random_weight_run(args.work) if args.random_weights else args.run.resolve()
    if not any(run.glob("models/*/fold_*/checkpoint_final.pt")):
        sys.exit(f"{run}: no trained model; train one (benchmarks/real.py) or pass --random-weights")
    bundle = args.work / "model.autoseg"
    shutil.rmtree(args.work / "cache", ignore_errors=True)
    export_bundle(run, bundle, onnx=True)
    folder = open_bundle(bundle, args.work / "cache")
    cases = _cases(args.cases)
    engines = [e for e in ENGINES if e != "openvino_fp32" or _version("openvino")]
    predictors = {e: _predictor(e, folder, args.mirror, args.threads) for e in engines}
    plans = predictors["torch_fp32"].plans
    for predictor in predictors.values():  # warm-up: first-call costs (allocators, kernel selection)
        predictor.predict(cases[0][1], cases[0][2])
    means: dict[str, list[float]] = {e: [] for e in engines}
    labels: dict[str, list[np.ndarray]] = {}
    for rep in range(args.repeats):
        for engine in engines[rep % len(engines) :] + engines[: rep % len(engines)]:
            times, out = [], []
            for _, image, geometry in cases:
                start = time.perf_counter()
                out.append(predictors[engine].predict(image, geometry).labels)
                times.append(time.perf_counter() - start)
            means[engine].append(sum(times) / len(times))
            labels.setdefault(engine, out)
            print(f"  round {rep}: {engine} {means[engine][-1]:.3f} s per case", flush=True)
    base = statistics.median(means["torch_fp32"])
    rows = []
    for engine in engines:
        per_case = statistics.median(means[engine])
        rows.append(
            {
                "engine": engine,
                "s_per_case": round(per_case, 4),
                "speed_vs_torch_fp32": round(base / per_case, 3),
                **_agreement(labels[engine], labels["torch_fp32"], plans.n_outputs),
                "rounds_s_per_case": [round(m, 4) for m in means[engine]],
            }
        )
    member = next(iter(predictors["torch_fp32"].members.values()))[0]
    return {
        "conditions": {
            "model": str(run),
            "weights": "random (planned network)" if args.random_weights else "trained",
            "configuration": member.configuration.name,
            "patch": list(member.configuration.patch_size),
            "network_features": list(member.configuration.network.features_per_stage),
            "members": sum(len(m) for m in predictors["torch_fp32"].members.values()),
            "mirror": args.mirror,
            "cases": [c for c, _, _ in cases],
            "repeats": args.repeats,
            "core": args.core,
            "threads": args.threads,
            "cpu_has_native_bf16": cpu_has_native_bf16(),
            "machine": machine(),
            "versions": {
                "autoseg_commit": _commit(),
                **{p: _version(p) for p in ("torch", "onnxruntime", "onnx", "openvino")},
            },
        },
        "onnx_checks": read_manifest(bundle)["onnx"],
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="trained run folder (default: %(default)s)")
    parser.add_argument("--random-weights", action="store_true", help="the planned CPU network with random weights")
    parser.add_argument("--cases", type=int, default=42, help="first N test cases (default: all 42)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mirror", default="single", choices=["all", "single", "none"], help="default: CPU default")
    parser.add_argument("--core", type=int, default=1, help="CPU core to pin to (-1: no pinning)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=HERE / "work" / "onnx_cpu")
    parser.add_argument("--name", default="onnx_cpu", help="results file name (default: onnx_cpu)")
    args = parser.parse_args()
    args.core = None if args.core < 0 else args.core
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    entry = measure(args)
    print(
        f"\n{len(entry['conditions']['cases'])} Hippocampus test cases, mirror {args.mirror}, one core, "
        f"{args.threads} thread(s), {entry['conditions']['weights']} weights"
    )
    print_table(entry["rows"], ["engine", "s_per_case", "speed_vs_torch_fp32", "voxels_equal", "mean_dice"])
    print(f"ONNX check: {json.dumps(entry['onnx_checks']['members'])}")
    print(f"wrote {add_run(args.name, HEADER, f'mirror_{args.mirror}', started, entry)}")


if __name__ == "__main__":
    main()
