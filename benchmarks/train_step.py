"""Training step: seconds per iteration and peak memory, autoseg vs nnU-Net v2, same network, patch and batch.

    flock /tmp/autoseg-bench.lock python benchmarks/train_step.py [--device cpu|cuda] [--quick] [--autoseg-only]
                                                                 [--networks NAME ...] [--steps N] [--warmup N]

One iteration is each tool's own step on a fixed batch (data loading excluded): forward, Dice + CE at every
deep-supervision scale, backward, gradient clipping at 12, SGD (lr 0.01, Nesterov momentum 0.99). nnU-Net's is
``nnUNetTrainer.train_step`` of a trainer built on the preprocessed synthetic CT dataset (``initialize()``; fp16
autocast + GradScaler on CUDA, torch.compile when nnU-Net's default says so); autoseg's is the loop body of
``autoseg/training/trainer.py::_run_epoch`` (bf16 autocast on CUDA when supported, fp16 + GradScaler otherwise),
replicated here because the trainer has no single-step function. Each tool runs in its own process (nnU-Net in its
own environment, ``NNUNET_PYTHON``); both stay alive and take turns (A, B, B, A, ...) one step at a time, so load
from other processes hits both alike. Reported: median seconds per step after warm-up, peak RSS of each process
(CPU) or ``torch.cuda.max_memory_allocated`` (CUDA), parameter counts (must be equal).

Networks: ``nnunet_3d_fullres`` (nnU-Net's 3d_fullres plan of the synthetic CT dataset, which ``autoseg plan
--preset nnunet`` reproduces), ``autoseg_cpu`` (autoseg's default CPU plan of that dataset on the 2-core reference
machine) and, on CUDA, ``nnunet_liver`` (nnU-Net's 3d_fullres plan of MSD Liver: 6 stages, 128^3, batch 2).
With ``--autoseg-only`` only torch, numpy and this repository are needed (no dataset, no nnU-Net), e.g. on a GPU
machine without internet. Prints a table and writes benchmarks/results/train_step_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import NNUNET_PYTHON, machine, print_table, write_results  # noqa: E402
from _nnunet_models import load_batch, protocol_out, serve  # noqa: E402

from autoseg.planning.plans import NetworkSpec  # noqa: E402
from autoseg.serialization import from_jsonable, to_jsonable  # noqa: E402

WORK = HERE / "work" / "compare"
DATASET = "Dataset901_SynthCT"
K3 = (3, 3, 3)


@dataclass(frozen=True)
class Bench:
    """A network with the patch and batch it trains at."""

    spec: NetworkSpec
    patch: tuple[int, ...]
    batch: int
    source: str
    n_outputs: int = 4  # the synthetic CT dataset: background, organ, lesion, bone
    in_channels: int = 1
    batch_dice: bool = False  # nnU-Net's 3d_fullres default


def _plain(feats, kernels, strides) -> NetworkSpec:
    n = len(feats)
    return NetworkSpec(n, tuple(feats), tuple(kernels), tuple(strides), (2,) * n, (2,) * (n - 1))


NETWORKS = {
    "nnunet_3d_fullres": Bench(
        _plain((32, 64, 128, 256, 320), [(1, 3, 3)] + [K3] * 4, [(1, 1, 1), (1, 2, 2)] + [(2, 2, 2)] * 3),
        (32, 96, 96),
        2,
        "nnU-Net v2 3d_fullres plan of the synthetic CT dataset (= autoseg plan --preset nnunet)",
    ),
    "autoseg_cpu": Bench(
        _plain((12, 24, 48, 96), [(1, 3, 3)] + [K3] * 3, [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)]),
        (20, 48, 64),
        2,
        "autoseg plan --device cpu of the synthetic CT dataset on the 2-core reference machine",
    ),
    "nnunet_liver": Bench(
        _plain((32, 64, 128, 256, 320, 320), [K3] * 6, [(1, 1, 1)] + [(2, 2, 2)] * 5),
        (128, 128, 128),
        2,
        "nnU-Net v2 3d_fullres plan of MSD Task03 Liver (fingerprints/Dataset003_Liver.json), 4 outputs",
    ),
}
DEFAULT_NETWORKS = {"cpu": ["nnunet_3d_fullres", "autoseg_cpu"], "cuda": list(NETWORKS)}


# --- the synthetic dataset and both tools' plans ----------------------------------------------------------------


def nnunet_env(work: Path) -> dict[str, str]:
    return {
        "nnUNet_raw": str(work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(work / "nnUNet_results"),
    }


def _run(cmd: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _autoseg(*args: str) -> None:
    _run([sys.executable, "-m", "autoseg.cli", *args])


def prepare(work: Path = WORK, *, nnunet: bool = True, test_cases: int = 4) -> dict:
    """Synthetic CT dataset, autoseg plans (``run_nnunet``: --preset nnunet; ``run_cpu``: --device cpu) and, with
    ``nnunet``, nnU-Net's plan and preprocessing. Steps already done are skipped. Returns the plan checks."""
    raw = work / "nnUNet_raw" / DATASET
    if not (raw / "dataset.json").is_file():
        _autoseg("synth", str(raw), "--kind", "ct3d", "--cases", "8", "--test-cases", str(test_cases), "--seed", "0")
    for run, plan_args in (("run_nnunet", ["--preset", "nnunet"]), ("run_cpu", ["--device", "cpu"])):
        if not (work / run / "plans.json").is_file():
            _autoseg("fingerprint", str(raw), "-o", str(work / run))
            _autoseg("plan", str(work / run), *plan_args)
    if nnunet and not (work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans_3d_fullres").is_dir():
        tool = str(Path(NNUNET_PYTHON).parent / "nnUNetv2_plan_and_preprocess")
        _run([tool, "-d", DATASET[7:10], "-c", "3d_fullres", "-np", "2"], env=nnunet_env(work))
    return check_plans(work, nnunet=nnunet)


def _as_bench(config: dict) -> dict:
    net = config["network"]
    keys = ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_conv_per_stage_decoder")
    return {**{k: net[k] for k in keys}, "patch_size": config["patch_size"], "batch_size": config["batch_size"]}


def _bench_dict(b: Bench) -> dict:
    return {**nnunet_arch(b), "patch_size": list(b.patch), "batch_size": b.batch}


def check_plans(work: Path, *, nnunet: bool) -> dict:
    """Do the planners still produce the benchmark's networks? (nnU-Net's plan, autoseg's preset, the CPU plan)"""
    checks = {}
    preset = json.loads((work / "run_nnunet" / "plans.json").read_text())["configurations"]["3d_fullres"]
    checks["autoseg_preset_nnunet_equals_nnunet_3d_fullres"] = _as_bench(preset) == _bench_dict(
        NETWORKS["nnunet_3d_fullres"]
    )
    cpu = json.loads((work / "run_cpu" / "plans.json").read_text())["configurations"]["3d_fullres"]
    checks["autoseg_cpu_plan_here"] = _as_bench(cpu)
    checks["autoseg_cpu_plan_here_equals_autoseg_cpu"] = _as_bench(cpu) == _bench_dict(NETWORKS["autoseg_cpu"])
    if nnunet:
        plans = json.loads((work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json").read_text())
        c = plans["configurations"]["3d_fullres"]
        got = {k: c["architecture"]["arch_kwargs"][k] for k in nnunet_arch(NETWORKS["nnunet_3d_fullres"])}
        got.update(patch_size=c["patch_size"], batch_size=c["batch_size"])
        checks["nnunet_plan_equals_nnunet_3d_fullres"] = got == _bench_dict(NETWORKS["nnunet_3d_fullres"])
    return checks


def nnunet_arch(b: Bench) -> dict:
    """The PlainConvUNet keyword arguments that differ between networks (the rest are nnU-Net's 3d_fullres)."""
    s = b.spec
    if (s.block, s.norm, s.nonlin, s.conv_bias) != ("plain", "instance", "leaky_relu", True):
        raise ValueError("only plain instance-norm leaky-ReLU U-Nets with conv bias exist in both tools")
    return {
        "n_stages": s.n_stages,
        "features_per_stage": list(s.features_per_stage),
        "kernel_sizes": [list(k) for k in s.kernel_sizes],
        "strides": [list(k) for k in s.strides],
        "n_conv_per_stage": list(s.n_conv_per_stage),
        "n_conv_per_stage_decoder": list(s.n_conv_per_stage_decoder),
    }


def write_batch(b: Bench, path: Path, seed: int = 0) -> None:
    """A fixed batch: normal data and blocky label maps, targets strided to every deep-supervision scale."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((b.batch, b.in_channels, *b.patch), dtype=np.float32)
    coarse = rng.integers(0, b.n_outputs, size=(b.batch, 1, *[max(1, p // 4) for p in b.patch]))
    labels = coarse.repeat(4, 2).repeat(4, 3).repeat(4, 4)[(..., *[slice(0, p) for p in b.patch])]
    labels = np.pad(labels, [(0, 0), (0, 0)] + [(0, p - n) for p, n in zip(b.patch, labels.shape[2:])], "edge")
    targets, step = {}, np.ones(len(b.patch), int)
    for i, stride in enumerate(b.spec.strides[: b.spec.n_stages - 1]):
        step = step * np.asarray(stride)
        sub = labels[(..., *[slice(None, None, int(k)) for k in step])]
        targets[f"target_{i}"] = np.ascontiguousarray(sub, dtype=np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, data=data, **targets)


# --- autoseg's step (the loop body of trainer._run_epoch) --------------------------------------------------------


def autoseg_worker(setup: dict) -> None:
    """Time autoseg's training step on the fixed batch (see ``_nnunet_models.serve``)."""
    out = protocol_out()
    import torch

    import autoseg
    from autoseg.networks.builder import build_network
    from autoseg.networks.losses import build_loss
    from autoseg.planning.plans import LossSpec, TrainingSpec

    device = torch.device(setup["device"])
    torch.backends.cudnn.benchmark = bool(setup.get("cudnn_benchmark"))
    torch.manual_seed(0)
    spec, t = from_jsonable(NetworkSpec, setup["spec"]), TrainingSpec()
    network = build_network(spec, setup["in_channels"], setup["n_outputs"]).to(device)
    n_ds = spec.n_stages - 1 if spec.deep_supervision else 1
    loss_fn = build_loss(
        LossSpec("dice_ce", batch_dice=setup["batch_dice"]),
        n_outputs=setup["n_outputs"],
        deep_supervision_scales=n_ds,
    )
    optimizer = torch.optim.SGD(
        network.parameters(), lr=t.learning_rate, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay
    )
    dtype = None  # trainer._precision with precision "auto"
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    network.train()
    data_np, targets_np = load_batch(setup["batch_file"])

    def step() -> float:
        data = torch.from_numpy(data_np).to(device, non_blocking=True)
        targets = [torch.from_numpy(y).to(device, non_blocking=True).long() for y in targets_np]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = network(data)
        loss = loss_fn(outputs, targets if isinstance(outputs, (list, tuple)) else targets[0])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())

    info = {
        "tool": "autoseg",
        "version": getattr(autoseg, "__version__", ""),
        "torch": torch.__version__,
        "params": sum(p.numel() for p in network.parameters()),
        "compiled": False,
        "amp": {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[dtype],
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    serve(out, step, info, device)


# --- driver --------------------------------------------------------------------------------------------------------


class Worker:
    """One tool's step worker process, driven over JSON lines."""

    def __init__(self, label: str, cmd: list[str], env: dict, log: Path):
        self.label = label
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **env}
            )
        self.info = self._read()
        self.seconds: list[float] = []
        self.losses: list[float] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{self.label} worker ended ({self.proc.returncode}):\n{self.log.read_text()[-4000:]}")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def steps(self, n: int, keep: bool) -> None:
        reply = self.ask(steps=n)
        if keep:
            self.seconds += reply["seconds"]
            self.losses += reply["losses"]

    def close(self) -> dict:
        stats = self.ask(stats=True)
        self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)
        return stats


def _workers(name: str, b: Bench, args, batch_file: Path) -> list[Worker]:
    work, device = args.work, args.device
    common = {"device": device, "batch_file": str(batch_file), "n_outputs": b.n_outputs, "batch_dice": b.batch_dice}
    setups = [("autoseg", {**common, "spec": to_jsonable(b.spec), "in_channels": b.in_channels})]
    if device == "cuda" and args.cudnn_benchmark_row:
        setups.append(("autoseg+cudnn.benchmark", {**setups[0][1], "cudnn_benchmark": True}))
    if not args.autoseg_only:
        nn = {
            **common,
            "plans_file": str(work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json"),
            "dataset_json": str(work / "nnUNet_preprocessed" / DATASET / "dataset.json"),
            "configuration": f"bench_{name}",
            "arch": nnunet_arch(b),
            "patch_size": list(b.patch),
            "batch_size": b.batch,
        }
        setups.append(("nnU-Net v2", nn))
    workers = []
    for label, setup in setups:
        path = work / "setups" / f"train_{name}_{label.replace(' ', '_')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(setup, indent=1))
        if label.startswith("autoseg"):
            cmd, env = [sys.executable, __file__, "--worker", str(path)], {}
        else:
            cmd, env = [NNUNET_PYTHON, str(HERE / "_nnunet_models.py"), "train-worker", str(path)], nnunet_env(work)
            if args.nnunet_compile != "default":
                env["nnUNet_compile"] = "1" if args.nnunet_compile == "on" else "0"
        log = work / "logs" / f"train_{name}_{label.replace(' ', '_')}.log"
        workers.append(Worker(label, cmd, env, log))  # started one after the other: setups do not overlap
    return workers


def measure(name: str, b: Bench, args) -> dict:
    """Interleaved steps of every tool on one network; medians, memory, parameter counts."""
    batch_file = args.work / "batches" / f"{name}.npz"
    write_batch(b, batch_file)
    workers = _workers(name, b, args, batch_file)
    try:
        for w in workers:
            w.steps(args.warmup, keep=False)
        for r in range(args.steps):
            for w in workers if r % 2 == 0 else workers[::-1]:
                w.steps(1, keep=True)
        stats = [w.close() for w in workers]
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
    rows = []
    for w, s in zip(workers, stats):
        mem = s.get("cuda_max_allocated_mib", s["peak_rss_mib"])
        rows.append(
            {
                "network": name,
                "tool": w.label,
                "params": w.info["params"],
                "amp": w.info["amp"],
                "compiled": w.info["compiled"],
                "median_s": round(statistics.median(w.seconds), 4),
                "min_s": round(min(w.seconds), 4),
                "peak_mem_mib": mem,
                "rss_before_steps_mib": w.info["rss_mib"],
                "peak_rss_growth_mib": round(s["peak_rss_mib"] - w.info["rss_mib"], 1),
                "stats": s,
                "seconds": [round(x, 4) for x in w.seconds],
                "losses": [round(x, 5) for x in w.losses],
                "torch": w.info["torch"],
                "version": w.info["version"],
            }
        )
    return {"network": name, "rows": rows, **_ratios(rows)}


def _ratios(rows: list[dict]) -> dict:
    by = {r["tool"]: r for r in rows}
    out = {"params_equal": len({r["params"] for r in rows}) == 1}
    if "nnU-Net v2" in by:
        a, n = by["autoseg"], by["nnU-Net v2"]
        out["speedup_nnunet_over_autoseg"] = round(n["median_s"] / a["median_s"], 3)
        # the same round's steps ran back to back: their ratio is robust to load that drifts during the run
        out["paired_ratio_median"] = round(statistics.median(x / y for x, y in zip(n["seconds"], a["seconds"])), 3)
        out["memory_ratio_nnunet_over_autoseg"] = round(n["peak_mem_mib"] / a["peak_mem_mib"], 3)
        out["autoseg_not_slower"] = a["median_s"] <= n["median_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a GPU run in under two minutes)")
    parser.add_argument("--autoseg-only", action="store_true", help="no nnU-Net (and no dataset): autoseg rows only")
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), help="default: all that fit the device")
    parser.add_argument("--steps", type=int, help="measured steps per tool (default 16; 8 with --quick)")
    parser.add_argument("--warmup", type=int, help="unmeasured steps per tool first (default 3; 5 on CUDA)")
    parser.add_argument("--nnunet-compile", default="default", choices=["default", "on", "off"])
    parser.add_argument("--no-cudnn-benchmark-row", dest="cudnn_benchmark_row", action="store_false")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/train_step_<device>.json)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        autoseg_worker(json.loads(args.worker.read_text()))
        return
    args.steps = args.steps or (8 if args.quick else 16)
    args.warmup = args.warmup or (5 if args.device == "cuda" else 3)
    names = args.networks or DEFAULT_NETWORKS[args.device]
    checks = {} if args.autoseg_only else prepare(args.work, nnunet=True)
    results = []
    for name in names:
        results.append(measure(name, NETWORKS[name], args))
        _report(results, checks, args, names)


def _report(results: list[dict], checks: dict, args, names: list[str]) -> None:
    rows = [r for res in results for r in res["rows"]]
    for res in results:
        base = next(r for r in res["rows"] if r["tool"] == "autoseg")
        for r in res["rows"]:
            r["time_vs_autoseg"] = round(r["median_s"] / base["median_s"], 3)
            r["memory_vs_autoseg"] = round(r["peak_mem_mib"] / base["peak_mem_mib"], 3)
    mem = "peak_mem_mib (cuda max allocated)" if args.device == "cuda" else "peak_mem_mib (process peak RSS)"
    print(f"\ntraining step on {args.device}: median of {args.steps} interleaved steps after {args.warmup} warm-up")
    columns = ["network", "tool", "params", "amp", "median_s", "min_s", "peak_mem_mib", "time_vs_autoseg"]
    if args.device == "cpu":
        columns.append("peak_rss_growth_mib")
    print_table(rows, columns + ["memory_vs_autoseg"])
    print(f"({mem}; peak_rss_growth_mib: peak RSS minus RSS after setup; time_vs_autoseg > 1: slower than autoseg)")
    for res in results:
        extra = {k: v for k, v in res.items() if k not in ("network", "rows")}
        print(f"{res['network']}: {json.dumps(extra)}")
    if checks:
        print("plan checks:", json.dumps(checks))
    device_name = ""
    if args.device == "cuda":
        import torch

        device_name = torch.cuda.get_device_name(0)
    payload = {
        "device": args.device,
        "device_name": device_name,
        "quick": args.quick,
        "steps": args.steps,
        "warmup": args.warmup,
        "networks": {n: to_jsonable(NETWORKS[n]) for n in names},
        "plan_checks": checks,
        "results": results,
        "note": "memory: CPU = peak RSS of each tool's worker process (includes its imports; rss_before_steps_mib "
        "is the RSS after building the network and loading the batch); CUDA = torch.cuda.max_memory_allocated",
    }
    out = args.out or Path(f"train_step_{args.device}{'_autoseg_only' if args.autoseg_only else ''}")
    path = write_results(out.stem, payload) if not args.out else _write(args.out, payload)
    print(f"wrote {path}")


def _write(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


if __name__ == "__main__":
    main()
