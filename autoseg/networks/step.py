"""One training step, the same for training and for the planner's speed and memory probes.

:func:`train_step` is what the trainer runs every iteration. :func:`probe_step` builds a network of a plan's
spec with its default loss (soft Dice + cross-entropy over every deep-supervision scale), an optimizer like
training's and a random batch, and returns that same step for the probes to time (``planning.device``) and to
measure the memory of (``planning.memory``), so that they predict the step training will run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from autoseg.devices import autocast_dtype
from autoseg.networks.builder import build_network
from autoseg.networks.losses import build_loss
from autoseg.networks.spec import GRAD_CLIP, LossSpec, NetworkSpec

__all__ = ["probe_step", "train_step"]


def train_step(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: Callable[..., torch.Tensor],
    data: torch.Tensor,
    targets: list[torch.Tensor],
    *,
    dtype: torch.dtype | None,
    grad_clip: float,
) -> float:
    """One optimisation step: forward (autocast when ``dtype``), loss, backward, gradient clipping, step."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(data.device.type, dtype=dtype, enabled=dtype is not None):
        outputs = network(data)
    loss = loss_fn(outputs, targets if isinstance(outputs, (list, tuple)) else targets[0])
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def probe_step(
    spec: NetworkSpec,
    in_channels: int,
    n_outputs: int,
    patch_size: Sequence[int],
    batch_size: int,
    *,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Callable[[], float], Callable[[], int]]:
    """``(step, settle)`` for a random batch: ``step()`` runs :func:`train_step`; ``settle()`` frees the gradients
    and returns the bytes that stay alive between steps (weights, optimizer state, batch)."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    network = build_network(spec, in_channels, n_outputs).to(dev)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    data = torch.randn(batch_size, in_channels, *patch_size, device=dev)
    sizes = spec.stage_sizes(patch_size)  # the first stage's stride is all ones: sizes[0] is the patch
    n_scales = len(sizes) - 1 if spec.deep_supervision else 1
    targets = [torch.randint(0, n_outputs, (batch_size, 1, *size), device=dev) for size in sizes[:n_scales]]
    loss_fn = build_loss(LossSpec(), n_outputs=n_outputs, deep_supervision_scales=n_scales)
    dtype = autocast_dtype(precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype is torch.float16)

    def step() -> float:
        return train_step(network, optimizer, scaler, loss_fn, data, targets, dtype=dtype, grad_clip=GRAD_CLIP)

    def settle() -> int:
        optimizer.zero_grad(set_to_none=True)
        tensors = [*network.parameters(), *network.buffers(), data, *targets]
        tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return sum(t.untyped_storage().nbytes() for t in tensors)

    return step, settle
