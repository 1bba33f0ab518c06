"""Memory model check: estimated vs measured peak training memory over realistic U-Net plans.

    python benchmarks/memory_model.py [--device cpu|cuda] [--quick] [--precision fp32|fp16|bf16]
                                      [--cudnn-benchmark on|off] [--out FILE] [--families]

``--families`` checks every registered architecture family instead (2D and 3D, a small 4-stage network per
family on the CPU, a Hippocampus-sized one on CUDA); results go to memory_model_families_<device>.json.

Each plan runs one warm-up and one measured training step (forward, Dice + CE at every deep-supervision scale,
backward, gradient clipping, SGD with momentum); see :func:`autoseg.planning.memory.measure_training_memory`.
On CUDA the plans fill tens of GB and run under autocast (bf16, and fp16 with a gradient scaler) as the trainer
does, with cuDNN's benchmark mode on (as nnU-Net trains); ``--quick`` keeps the run under two minutes on a GPU.
On CPU the plans are scaled down to keep the run within a few minutes on two cores. Prints a table and writes
benchmarks/results/memory_model_<device>.json (or ``--out``) after every plan.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import RESULTS, machine, print_table  # noqa: E402

from autoseg.planning.memory import estimate_flops, estimate_training_memory, measure_training_memory  # noqa: E402
from autoseg.planning.plans import NetworkSpec  # noqa: E402
from autoseg.serialization import save_json, to_jsonable  # noqa: E402

K3, K2 = (3, 3, 3), (3, 3)


def _spec(feats, kernels, strides, n_conv, n_dec, block="plain", **kw) -> NetworkSpec:
    return NetworkSpec(
        len(feats), tuple(feats), tuple(kernels), tuple(strides), tuple(n_conv), tuple(n_dec), block=block, **kw
    )


# nnU-Net v2 default 3d_fullres of MSD Liver (Dataset003) and ResEnc-L 3d_fullres of MSD Heart (Dataset002)
LIVER_3D = _spec((32, 64, 128, 256, 320, 320), [K3] * 6, [(1, 1, 1)] + [(2, 2, 2)] * 5, [2] * 6, [2] * 5)
RESENC_L = _spec(
    (32, 64, 128, 256, 320, 320),
    [K3] * 6,
    [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)],
    (1, 3, 4, 6, 6, 6),
    [1] * 5,
    block="residual",
)
# nnU-Net v2 default 2d of MSD Liver: 8 stages up to 512 features
LIVER_2D = _spec((32, 64, 128, 256, 512, 512, 512, 512), [K2] * 8, [(1, 1)] + [(2, 2)] * 7, [2] * 8, [2] * 7)
# smaller relatives for the CPU
PLAIN_3D5 = _spec((32, 64, 128, 256, 320), [K3] * 5, [(1, 1, 1)] + [(2, 2, 2)] * 4, [2] * 5, [2] * 4)
RESENC_3D5 = _spec(
    (32, 64, 128, 256, 320), [K3] * 5, [(1, 1, 1)] + [(2, 2, 2)] * 4, (1, 3, 4, 6, 6), [1] * 4, block="residual"
)
ANISO_3D = _spec(
    (32, 64, 128, 256, 320),
    [(1, 3, 3), (1, 3, 3), K3, K3, K3],
    [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)],
    [2] * 5,
    [2] * 4,
)
PLAIN_2D7 = _spec((32, 64, 128, 256, 512, 512, 512), [K2] * 7, [(1, 1)] + [(2, 2)] * 6, [2] * 7, [2] * 6)
RESENC_2D7 = _spec(
    (32, 64, 128, 256, 512, 512, 512),
    [K2] * 7,
    [(1, 1)] + [(2, 2)] * 6,
    (1, 3, 4, 6, 6, 6, 6),
    [1] * 6,
    block="residual",
)
BN_GELU_3D = _spec(
    (24, 48, 96, 192), [K3] * 4, [(1, 1, 1)] + [(2, 2, 2)] * 3, [2] * 4, [2] * 3, norm="batch", nonlin="gelu"
)

# (name, spec, in_channels, n_outputs, patch, batch, precision or None for --precision / the device default)
CPU_PLANS = [
    ("3d plain 5st 32x64x64 b2", PLAIN_3D5, 1, 3, (32, 64, 64), 2, None),
    ("3d resenc 5st 32x64x64 b2", RESENC_3D5, 1, 3, (32, 64, 64), 2, None),
    ("3d aniso 5st 16x96x96 b2", ANISO_3D, 2, 4, (16, 96, 96), 2, None),
    ("2d plain 7st 256x256 b12", PLAIN_2D7, 1, 3, (256, 256), 12, None),
    ("2d resenc 7st 256x256 b6", RESENC_2D7, 1, 3, (256, 256), 6, None),
    ("3d bn+gelu 4st 32x64x80 b2", BN_GELU_3D, 1, 5, (32, 64, 80), 2, None),
    ("3d plain 5st 32x64x64 b1", PLAIN_3D5, 1, 3, (32, 64, 64), 1, None),
]
CUDA_PLANS = [  # --quick runs the first four (about 50 GB of measurements in all)
    ("3d_fullres liver 128^3 b2", LIVER_3D, 1, 3, (128, 128, 128), 2, None),
    ("3d_fullres liver 128^3 b2 fp16", LIVER_3D, 1, 3, (128, 128, 128), 2, "fp16"),
    ("resenc-L heart 112x288x224 b2", RESENC_L, 1, 2, (112, 288, 224), 2, None),
    ("2d liver 512^2 b48", LIVER_2D, 1, 3, (512, 512), 48, None),
    ("3d_fullres 64x128x128 b2 fp32", LIVER_3D, 1, 3, (64, 128, 128), 2, "fp32"),
    ("3d_fullres liver 192x224x224 b4", LIVER_3D, 1, 3, (192, 224, 224), 4, None),
    ("resenc-L 128x256x256 b4", RESENC_L, 1, 3, (128, 256, 256), 4, None),
    ("2d liver 512^2 b12", LIVER_2D, 1, 3, (512, 512), 12, None),
]
QUICK = {"cpu": 3, "cuda": 4}


def family_plans(device: str) -> list:
    """One 3D and one 2D plan per registered family (4 stages), sized for the device."""
    from autoseg.networks import list_blocks

    width, p3, p2, b3, b2 = (
        (32, (64, 96, 96), (256, 256), 2, 16) if device == "cuda" else (16, (32, 48, 64), (128, 160), 2, 8)
    )
    plans = []
    for family in list_blocks():
        for patch, batch, kernel in ((p3, b3, K3), (p2, b2, K2)):
            ndim = len(patch)
            feats = tuple(width * 2**i for i in range(4))
            strides = [(1,) * ndim] + [(2,) * ndim] * 3
            grid = tuple(p // 8 for p in patch) if family == "hybrid" else None
            spec = _spec(feats, [kernel] * 4, strides, [2] * 4, [2] * 3, block=family, bottleneck_tokens=grid)
            plans.append((f"{ndim}d {family} {'x'.join(map(str, patch))} b{batch}", spec, 1, 3, patch, batch, None))
    return plans


def _machine(device: str) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def _run(plan, device: str, default_precision: str, limit_bytes: int | None) -> dict:
    name, spec, c_in, n_out, patch, batch, precision = plan
    precision = precision or default_precision
    est = estimate_training_memory(spec, c_in, n_out, patch, batch, precision=precision, device=device)
    row = {
        "plan": name,
        "precision": precision,
        "estimate_mib": round(est.total_mib, 1),
        "spec": to_jsonable(spec),
        "in_channels": c_in,
        "n_outputs": n_out,
        "patch_size": list(patch),
        "batch_size": batch,
        "breakdown_bytes": to_jsonable(est),
        "gflop_per_step": round(estimate_flops(spec, c_in, n_out, patch, batch) / 1e9, 1),
    }
    if limit_bytes is not None and est.total_bytes > limit_bytes:
        return {**row, "measured_mib": "skipped (too large)"}
    start = time.perf_counter()
    try:
        measured = measure_training_memory(spec, c_in, n_out, patch, batch, precision=precision, device=device)
    except torch.OutOfMemoryError:
        return {**row, "measured_mib": "out of memory"}
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return {
        **row,
        "measured_mib": round(measured / 2**20, 1),
        "ratio": round(est.total_bytes / measured, 3),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="only the first few plans")
    parser.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default=None,
        help="for plans without their own precision (default: fp32 on CPU, bf16 on CUDA)",
    )
    parser.add_argument("--cudnn-benchmark", choices=["on", "off"], default="on")
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/...)")
    parser.add_argument("--families", action="store_true", help="every registered architecture family instead")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    stem = "memory_model_families" if args.families else "memory_model"
    out = args.out or RESULTS / f"{stem}_{args.device}.json"
    header = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": args.device,
        "quick": args.quick,
        "cudnn_benchmark": args.cudnn_benchmark,
        "environment": _machine(args.device),
    }
    default_precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    plans = CUDA_PLANS if args.device == "cuda" else CPU_PLANS
    if args.families:
        plans = family_plans(args.device)
    if args.quick:
        plans = plans[: QUICK[args.device]]
    limit = int(0.9 * torch.cuda.get_device_properties(0).total_memory) if args.device == "cuda" else None
    rows = []
    for plan in plans:
        rows.append(_run(plan, args.device, default_precision, limit))
        print(
            f"{rows[-1]['plan']}: estimate {rows[-1]['estimate_mib']} MiB, measured {rows[-1]['measured_mib']}",
            flush=True,
        )
        save_json({**header, "rows": rows}, out)
    print_table(rows, ["plan", "precision", "estimate_mib", "measured_mib", "ratio", "gflop_per_step", "seconds"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
