"""The nnU-Net v2 side of the train-step and inference benchmarks, and the step-worker protocol both sides speak.

Run with nnU-Net's own Python (``NNUNET_PYTHON``); nnU-Net is never imported by autoseg:

    python benchmarks/_nnunet_models.py train-worker SETUP.json
    python benchmarks/_nnunet_models.py export SETUP.json

``train-worker`` builds an ``nnUNetTrainer`` on the preprocessed synthetic dataset (the benchmark's network is
added to nnU-Net's plans as a configuration inheriting from ``3d_fullres``), calls ``initialize()`` and then times
``nnUNetTrainer.train_step`` on a fixed batch when the driver asks (see :func:`serve`). ``export`` writes an
nnU-Net model folder (plans.json, dataset.json, fold_0/checkpoint_final.pth in nnU-Net's checkpoint format) whose
weights are those of an autoseg checkpoint, mapped parameter by parameter onto PlainConvUNet, and runs the network
on a probe input so that the driver can check both tools compute the same function.

Only the standard library, numpy and torch are imported at module level, so the protocol (:func:`protocol_out`,
:func:`serve`) is importable from autoseg's environment too.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# --- the worker protocol (both tools) --------------------------------------------------------------------------


def protocol_out():
    """The stream for protocol replies; everything else this process prints goes to stderr from now on."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_stats(device: torch.device) -> dict:
    """Peak RSS of this process (and CUDA peaks), MiB."""
    stats = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    with open("/proc/self/status") as fh:
        rss = next((int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:")), 0)
    stats["rss_mib"] = round(rss / 1024, 1)
    if device.type == "cuda":
        stats["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        stats["cuda_max_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return stats


def serve(out, step: Callable[[], float], info: dict, device: torch.device) -> None:
    """Reply ``info`` (+ memory) once ready, then answer JSON lines from stdin.

    ``{"steps": k}`` runs ``step`` k times and replies ``{"seconds": [...], "losses": [...]}`` (each step timed
    alone, the device synchronised before and after); ``{"stats": true}`` replies :func:`memory_stats`;
    ``{"quit": true}`` ends.
    """
    out.write(json.dumps({**info, **memory_stats(device), "threads": torch.get_num_threads()}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            return
        if cmd.get("stats"):
            out.write(json.dumps(memory_stats(device)) + "\n")
            continue
        seconds, losses = [], []
        for _ in range(int(cmd["steps"])):
            _sync(device)
            start = time.perf_counter()
            losses.append(step())
            _sync(device)
            seconds.append(time.perf_counter() - start)
        out.write(json.dumps({"seconds": seconds, "losses": losses}) + "\n")


def load_batch(path: str | Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """The benchmark's fixed batch: data (B, C, *patch) float32, targets [(B, 1, *scaled patch) int16, ...]."""
    with np.load(path) as f:
        n = sum(1 for k in f.files if k.startswith("target_"))
        return f["data"], [f[f"target_{i}"] for i in range(n)]


# --- nnU-Net: plans, trainer, model folder ---------------------------------------------------------------------


def _plans_with(setup: dict) -> dict:
    """nnU-Net's plans with the benchmark network as configuration ``setup['configuration']``."""
    plans = json.loads(Path(setup["plans_file"]).read_text())
    name = setup["configuration"]
    if name == "3d_fullres":
        return plans
    base = plans["configurations"]["3d_fullres"]
    arch = json.loads(json.dumps(base["architecture"]))
    arch["arch_kwargs"].update(setup["arch"])
    plans["configurations"][name] = {
        "inherits_from": "3d_fullres",
        "patch_size": setup["patch_size"],
        "batch_size": setup["batch_size"],
        "batch_dice": setup["batch_dice"],
        "architecture": arch,
    }
    return plans


def _check_arch(plans: dict, setup: dict) -> None:
    """The configuration nnU-Net will build has exactly the benchmark's network, patch and batch."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    c = PlansManager(plans).get_configuration(setup["configuration"])
    kwargs = c.network_arch_init_kwargs
    got = {k: json.loads(json.dumps(kwargs[k])) for k in setup["arch"]}
    got.update(patch_size=list(c.patch_size), batch_size=c.batch_size)
    want = {**setup["arch"], "patch_size": setup["patch_size"], "batch_size": setup["batch_size"]}
    if got != want:
        raise SystemExit(f"nnU-Net configuration {setup['configuration']} differs from the benchmark: {got} != {want}")


def train_worker(setup: dict) -> None:
    """Time ``nnUNetTrainer.train_step`` on the fixed batch (see :func:`serve`)."""
    out = protocol_out()
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    device = torch.device(setup["device"])
    torch.manual_seed(0)
    plans = _plans_with(setup)
    _check_arch(plans, setup)
    plans["continue_training"] = False
    dataset_json = json.loads(Path(setup["dataset_json"]).read_text())
    trainer = nnUNetTrainer(plans, setup["configuration"], 0, dataset_json, device=device)
    trainer.initialize()
    trainer.set_deep_supervision_enabled(True)
    trainer.network.train()
    data, targets = load_batch(setup["batch_file"])
    pin = device.type == "cuda"  # nnU-Net's data loader pins memory on CUDA
    batch = {
        "data": torch.from_numpy(data).pin_memory() if pin else torch.from_numpy(data),
        "target": [torch.from_numpy(t).pin_memory() if pin else torch.from_numpy(t) for t in targets],
    }

    def step() -> float:
        return float(trainer.train_step(batch)["loss"])

    import nnunetv2

    info = {
        "tool": "nnU-Net v2",
        "version": getattr(nnunetv2, "__version__", _version("nnunetv2")),
        "torch": torch.__version__,
        "params": sum(p.numel() for p in trainer.network.parameters()),
        "compiled": bool(trainer._do_i_compile()),
        "amp": "fp16 autocast + GradScaler" if device.type == "cuda" else "fp32",
    }
    serve(out, step, info, device)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


_NN = [
    (re.compile(r"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(weight|bias)$"), "enc"),
    (re.compile(r"^decoder\.transpconvs\.(\d+)\.(weight|bias)$"), "up"),
    (re.compile(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)$"), "dec"),
    (re.compile(r"^decoder\.seg_layers\.(\d+)\.(weight|bias)$"), "head"),
]
_AS = [
    (re.compile(r"^encoder\.(\d+)\.(\d+)\.(conv|norm)\.(weight|bias)$"), "enc"),
    (re.compile(r"^upsample\.(\d+)\.(weight|bias)$"), "up"),
    (re.compile(r"^decoder\.(\d+)\.(\d+)\.(conv|norm)\.(weight|bias)$"), "dec"),
    (re.compile(r"^heads\.(\d+)\.(weight|bias)$"), "head"),
]


def _canonical(key: str, patterns) -> tuple | None:
    for pattern, kind in patterns:
        m = pattern.match(key)
        if m:
            return (kind, *m.groups())
    return None


def autoseg_to_nnunet(autoseg_state: dict, nnunet_state: dict) -> dict:
    """Map an autoseg plain U-Net state dict onto PlainConvUNet keys (same layer, same shape, or an error)."""
    by_role = {}
    for key, value in autoseg_state.items():
        role = _canonical(key, _AS)
        if role is None:
            raise SystemExit(f"autoseg parameter {key} has no PlainConvUNet counterpart")
        by_role[role] = value
    mapped, used = {}, set()
    for key, value in nnunet_state.items():
        if ".all_modules." in key or key.startswith("decoder.encoder."):
            continue  # aliases of parameters mapped under their primary name
        role = _canonical(key, _NN)
        if role not in by_role or tuple(by_role[role].shape) != tuple(value.shape):
            raise SystemExit(f"PlainConvUNet parameter {key} {tuple(value.shape)} has no autoseg counterpart")
        mapped[key], used = by_role[role], used | {role}
    if used != set(by_role):
        raise SystemExit(f"autoseg parameters left unmapped: {sorted(set(by_role) - used)}")
    return mapped


def export(setup: dict) -> None:
    """Write nnU-Net's model folder for ``setup['configuration']`` with the autoseg checkpoint's weights."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = _plans_with(setup)
    _check_arch(plans, setup)
    dataset_json = json.loads(Path(setup["dataset_json"]).read_text())
    c = PlansManager(plans).get_configuration(setup["configuration"])
    n_out = PlansManager(plans).get_label_manager(dataset_json).num_segmentation_heads
    network = get_network_from_plans(
        c.network_arch_class_name,
        c.network_arch_init_kwargs,
        c.network_arch_init_kwargs_req_import,
        len(dataset_json["channel_names"]),
        n_out,
        deep_supervision=False,
    )
    autoseg_state = torch.load(setup["autoseg_checkpoint"], map_location="cpu", weights_only=True)["network"]
    result = network.load_state_dict(autoseg_to_nnunet(autoseg_state, network.state_dict()), strict=False)
    missing = [k for k in result.missing_keys if ".all_modules." not in k and not k.startswith("decoder.encoder.")]
    if missing or result.unexpected_keys:  # aliases share their tensors with the primary names loaded above
        raise SystemExit(f"weights not loaded: missing {missing}, unexpected {result.unexpected_keys}")
    folder = Path(setup["model_folder"])
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": 1,
        "init_args": {
            "plans": plans,
            "configuration": setup["configuration"],
            "fold": 0,
            "dataset_json": dataset_json,
            "device": torch.device("cpu"),
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": tuple(setup["mirror_axes"]),
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    network.eval()
    with torch.inference_mode():
        probe = torch.from_numpy(np.load(setup["probe_in"]))
        np.save(setup["probe_out"], network(probe).numpy())
    info = {"params": sum(p.numel() for p in network.parameters()), "model_folder": str(folder)}
    print(json.dumps(info))


def main() -> None:
    command, setup_file = sys.argv[1], sys.argv[2]
    setup = json.loads(Path(setup_file).read_text())
    {"train-worker": train_worker, "export": export}[command](setup)


if __name__ == "__main__":
    main()
