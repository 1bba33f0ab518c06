"""Devices and numeric precision: which device a name means, and which dtype each stage computes in.

One place for the precision policy of every stage: training (mixed precision on a GPU, float32 on a CPU, where
autocast is slower), inference (half precision on a GPU, bfloat16 on a CPU that computes it in hardware), and
the planner's step-time probes (what training will use on that kind of device).
"""

from __future__ import annotations

import torch

from autoseg.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "autocast_dtype",
    "cpu_has_native_bf16",
    "inference_dtype",
    "planned_precision",
    "resolve_device",
    "training_dtype",
]

#: Precision names accepted by plans (``training.precision``) and by ``autoseg predict --precision``.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; ConfigError for CUDA without one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), where bf16 convolutions are ~2x fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of an explicit precision name (None: float32, no autocast)."""
    if precision not in PRECISIONS or precision == "auto":
        raise ConfigError(f"precision {precision!r}: choose one of fp32, fp16, bf16")
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


def training_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of training. ``auto``: bfloat16 on a GPU that supports it, else float16 (with a gradient
    scaler); float32 on a CPU (autocast there is slower than float32 on most CPUs)."""
    _check(precision)
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return autocast_dtype(precision)


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of the network's forward pass at prediction (None: float32).

    ``auto``: float16 on a GPU, bfloat16 on a CPU with native bf16 arithmetic, else float32. Logits are
    accumulated in float32 whatever the forward precision.
    """
    _check(precision)
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    return autocast_dtype(precision)


def planned_precision(device_kind: str) -> str:
    """The precision that training with ``auto`` uses on this kind of device, for step-time and memory probes."""
    return "fp32" if device_kind == "cpu" else "bf16"
