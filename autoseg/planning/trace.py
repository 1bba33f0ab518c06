"""The memory model's node list for any registered architecture family, traced on the meta device.

The plain and residual U-Nets are walked analytically (:mod:`autoseg.planning.memory`). The other families
(attention gates, multi-scale bottleneck, dense, ConvNeXt, transformer bottleneck) are built on PyTorch's ``meta``
device -- shapes without data, so a trace costs milliseconds and no memory -- and one forward pass at batch 1 is
recorded:

- every leaf module call becomes a node (convolutions keep their kind, so their CPU gradient buffers are modelled
  as for the analytic walk; norms, nonlinearities, linear layers and the like are "act" nodes, with the
  gradient buffers the analytic walk gives norms and in-place nonlinearities);
- every tensor autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``) is charged once, to the
  node that saves it first in forward order: that node's backward runs last, and frees it;
- the deep-supervision heads' logits are held by the caller, and the loss terms and the skip connections'
  gradients are added as in the analytic walk;
- attention runs as the fused kernels of CPU and CUDA do (query, key, value, output and log-sum-exp saved; no
  tokens x tokens matrix), not as the meta device's unfused fallback;
- FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over the same forward (2 per multiply-add).

Checked against the measured CPU peak by ``benchmarks/memory_model.py --families``.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from autoseg.networks.builder import build_network
from autoseg.planning.plans import NetworkSpec

if TYPE_CHECKING:
    from autoseg.planning.memory import _Walk

__all__ = ["traced_walk"]

_CONVS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


class _FusedAttention(TorchFunctionMode):
    """Route ``scaled_dot_product_attention`` to the fused kernel, which saves what the real devices' kernels save."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args[:3])[0]
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=256)
def traced_walk(spec: NetworkSpec, in_channels: int, n_outputs: int, patch_size: tuple[int, ...]) -> _Walk:
    """Nodes (per sample) of one forward pass of the network ``spec`` describes, for the memory replay."""
    from autoseg.planning.memory import _Layer, _native_small, _Walk

    with torch.device("meta"):
        net = build_network(spec, in_channels, n_outputs)
        x = torch.empty(1, in_channels, *patch_size)
    w = _Walk(spec.ndim, norm_per_channel=0, act_buffers=1, nonlin_inplace=False)
    heads = {id(h) for h in net.heads}
    seen = {t.untyped_storage()._cdata for t in [x, *net.parameters()]}  # counted apart from activations
    skip_release: list[tuple[int, int]] = []  # (encoder stage index, skip gradient elements)
    stage_end: dict[int, int] = {}

    inside: list[_Layer] = []  # the leaf module running now (leaves do not nest)

    def charge(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in seen and storage.nbytes() > 0:
            seen.add(storage._cdata)
            if not inside:  # a functional op between modules (concatenation, gating product, attention)
                w.layers.append(_Layer("act", out=t.numel()))
            (inside or w.layers)[-1].saved += storage.nbytes() // t.element_size()
        return t

    def enter(module: nn.Module, args: tuple) -> None:
        inside.append(_Layer("act"))
        w.layers.append(inside[-1])

    def leave(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        layer = inside.pop()
        layer.out, layer.inp = out.numel(), args[0].numel()
        layer.params = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, _CONVS):
            transposed = isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d))
            c_in, kernel = args[0].shape[1] // module.groups, module.kernel_size
            small = _native_small(args[0].shape[1], args[0].shape[2:], kernel)
            layer.kind, layer.weights = "conv", layer.params
            layer.im2col = c_in * math.prod(kernel) * math.prod(out.shape[2:]) if small and not transposed else 0
        elif isinstance(module, _NORMS):  # a norm's backward: input gradient plus one temporary
            layer.act_buffers = 2
        elif getattr(module, "inplace", False):  # in place on a view: see the memory module's docstring
            layer.act_buffers = 3 if args[0]._base is not None else 1
        if id(module) in heads:
            w.held += layer.out
            w.scales.append(math.prod(out.shape[2:]))

    def encoder_done(i: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            stage_end[i] = len(w.layers) - 1
            skip_release.append((i, 2 * out.numel()))

        return hook

    def decoder_start(module: nn.Module, args: tuple) -> None:
        w.layers.append(_Layer("concat", skip_grad=args[0].numel()))

    leaves = [m for m in net.modules() if not any(m.children())]
    handles = [m.register_forward_pre_hook(enter) for m in leaves] + [m.register_forward_hook(leave) for m in leaves]
    handles += [stage.register_forward_hook(encoder_done(i)) for i, stage in enumerate(net.encoder)]
    handles += [d.register_forward_pre_hook(decoder_start) for d in net.decoder]
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(charge, lambda t: t),
            FlopCounterMode(display=False) as flops,
            _FusedAttention(),
        ):
            net(x)
    finally:
        for h in handles:
            h.remove()
    for i, elements in skip_release[:-1]:  # the bottleneck has no skip connection
        w.layers[stage_end[i]].skip_grad -= elements
    w.macs = flops.get_total_flops() // 2
    for v in w.scales:  # Dice + CE per scale: log-softmax, softmax and one-hot target, and their gradients
        w.layers.append(_Layer("loss", saved_fp32=3 * n_outputs * v))
    w.scales.reverse()
    return w
