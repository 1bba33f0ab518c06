"""What only a GPU can show, run wherever CUDA is available (``gpu`` marker; skipped elsewhere, with the reason).

The same network and weights give the same sliding-window logits on the GPU as on the CPU in float32, and the
trainer's step runs in bfloat16 (or float16 with its gradient scaler) where training's ``auto`` precision says so.
"""

from __future__ import annotations

import pytest
import torch

from autoseg.devices import training_dtype
from autoseg.inference.sliding_window import sliding_window_logits
from autoseg.networks.builder import build_network
from autoseg.networks.spec import NetworkSpec
from autoseg.networks.step import probe_step

pytestmark = pytest.mark.gpu

KERNELS, STRIDES = ((1, 3, 3), (3, 3, 3), (3, 3, 3)), ((1, 1, 1), (1, 2, 2), (2, 2, 2))
SPEC = NetworkSpec(3, (4, 8, 16), KERNELS, STRIDES, (1, 1, 1), (1, 1))


def test_sliding_window_on_the_gpu_equals_the_cpu():
    torch.manual_seed(0)
    network = build_network(SPEC, 1, 3).eval()
    network.deep_supervision = False
    image = torch.randn(1, 9, 40, 44).numpy()
    kwargs = dict(patch_size=(4, 16, 16), n_outputs=3, mirror_axes=(1, 2), tile_batch=3)
    cpu = sliding_window_logits(network, image, device="cpu", **kwargs)
    gpu = sliding_window_logits(network.to("cuda"), image, device="cuda", **kwargs)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)


def test_training_step_in_mixed_precision():
    dtype = training_dtype("auto", torch.device("cuda"))
    precision = "bf16" if dtype is torch.bfloat16 else "fp16"
    step, settle = probe_step(SPEC, 1, 3, (8, 32, 32), 2, precision=precision, device="cuda")
    losses = [step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and settle() > 0
