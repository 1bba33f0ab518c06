"""Training memory of a U-Net, in bytes: an analytic estimate, and a measurement to check it against.

:func:`estimate_training_memory` walks the architecture of a :class:`NetworkSpec` (feature-map sizes per stage
from the patch size and strides) and lists, node by node in forward order, what autograd saves for backward:

- conv-norm-nonlinearity: the convolution output (saved by the norm) and the norm output (saved by the next
  convolution; an in-place nonlinearity such as LeakyReLU shares it, GELU adds its own output), plus the norm's
  per-channel statistics;
- residual block: two of those, plus the pooled input and the 1x1 projection's output when the skip changes
  shape (the projection's norm output is added in place and freed);
- decoder stage: the concatenation (the transposed-convolution output is freed once concatenated) and its convs;
- each deep-supervision scale: the logits (held by the caller through the step) and, in fp32, the log-softmax,
  softmax and one-hot target of Dice + cross-entropy.

It then replays the backward pass in reverse order: a node's saved tensors are freed after its backward, its
parameters' gradients appear, and while it runs its gradient buffers are alive; the gradient of every skip
connection stays alive from its decoder stage until its encoder stage. The peak of that replay, or of the
optimizer step (all gradients, plus one temporary copy on CUDA where SGD runs multi-tensor with weight decay), is
added to what lives throughout: fp32 parameters, the SGD momentum buffer and the batch (fp32 image, one int64
label map per scale). Mixed precision (``fp16``/``bf16``) stores activations in 2 bytes, keeps fp32 master
weights, and adds the 2-byte weight and input copies that autocast makes and the convolutions save; the loss
stays fp32.

Gradient buffers per node, read off allocation timelines of real steps (``torch.profiler`` on CPU):

- a nonlinearity's backward allocates its input gradient; done in place on a view -- instance norm returns its
  output as a reshaped view of a batch norm -- autograd rebuilds the base first (``CopySlices``): three
  output-sized buffers instead of one. Detected by running the registered norm, not by name;
- a norm's backward: input gradient plus one temporary;
- a convolution's backward: input gradient; on CPU oneDNN also reorders input and output gradient (one copy
  each), and PyTorch's native im2col path -- taken for fp32, batch 1 and small inputs -- builds a column buffer
  of ``C_in x prod(kernel) x voxels_out``; on CUDA cuDNN's workspace is the allowance below.

Checked against :func:`measure_training_memory` (``benchmarks/memory_model.py``, results in
``benchmarks/results/``): within 1 % on the CPU over 2D/3D, plain/residual plans of 0.4-2.5 GB, and within 1 %
on an H100 (bf16, fp16, fp32; 5-43 GB). The other architecture families (attention, multiscale, dense, convnext,
hybrid) get their node list from a forward pass traced on the meta device (:mod:`autoseg.planning.trace`) and the
same replay: within 0.3 % of the CPU peak for 2D and 3D (``benchmarks/memory_model.py --families``).
The breakdown in :class:`MemoryEstimate` is taken at the peak. On CUDA
it targets ``torch.cuda.max_memory_allocated``: the CUDA context and the caching allocator's free blocks are not
counted, so plan with a margin below the card's memory.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from autoseg.errors import PlanningError
from autoseg.networks.blocks import get_nonlin, get_norm
from autoseg.networks.step import probe_step
from autoseg.planning.plans import NetworkSpec

__all__ = [
    "MemoryEstimate",
    "estimate_training_memory",
    "estimate_flops",
    "measure_training_memory",
    "CUDNN_WORKSPACE_BYTES",
]

#: cuDNN workspace allowance on CUDA. On an H100 (PyTorch 2.11, cuDNN 9.19) the measured peaks exceeded the
#: model without it by 7-44 MiB over eight plans of 5-43 GB, with cuDNN's benchmark mode on or off.
CUDNN_WORKSPACE_BYTES = 64 * 2**20

_PRECISIONS = {"fp32": 4, "fp16": 2, "bf16": 2}
_DEVICES = ("cpu", "cuda")
#: Families walked analytically; the others are traced on the meta device (:mod:`autoseg.planning.trace`).
_ANALYTIC_BLOCKS = ("plain", "residual")
#: PyTorch's CPU convolution takes its native im2col path for fp32, batch 1 and N*C*D*H (2D: N*C*H*W) <= this
#: (``use_mkldnn`` in ATen's Convolution.cpp).
_NATIVE_CONV_MAX = 20480


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one training step; ``total_bytes`` is the sum of the other byte fields, taken at the peak.

    ``activations``: saved tensors still alive (and logits held by the caller); ``gradients``: parameter
    gradients allocated so far; ``workspace``: gradient buffers in flight, skip-connection gradients, optimizer
    temporaries and (CUDA) cuDNN workspace.
    """

    total_bytes: int
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    inputs: int
    workspace: int
    precision: str = "fp32"
    device: str = "cpu"

    @property
    def total_mib(self) -> float:
        return self.total_bytes / 2**20


@dataclass
class _Layer:
    """One node of the forward pass. Element counts are per sample unless named otherwise."""

    kind: str  # "conv" (also transposed and heads), "cna" (conv-norm[-nonlinearity]), "concat", "act", "loss"
    out: int = 0  # output elements
    inp: int = 0  # input elements
    saved: int = 0  # activation-dtype elements saved for backward, freed after this node's backward
    saved_fp32: int = 0  # fp32 elements saved (norm statistics, loss terms)
    params: int = 0  # parameters (not per sample)
    weights: int = 0  # conv weights and biases, which autocast copies to 2 bytes (not per sample)
    act_buffers: int = 0  # output-sized buffers of the nonlinearity's backward (0: no nonlinearity)
    im2col: int = 0  # column buffer of CPU's native convolution, which fp32 batch-1 small inputs take
    skip_grad: int = 0  # skip-connection gradient kept (> 0) or released (< 0) after this node's backward
    used: bool = True  # False for heads that do not run (no deep supervision): no gradients


@dataclass
class _Walk:
    """The forward pass of a U-Net as a list of nodes, plus totals."""

    ndim: int
    norm_per_channel: int
    act_buffers: int
    nonlin_inplace: bool
    layers: list[_Layer] = field(default_factory=list)
    held: int = 0  # logits elements per sample, held by the caller through the step
    macs: int = 0  # forward multiply-adds per sample
    scales: list[int] = field(default_factory=list)  # voxels per loss scale, full resolution first

    def conv(self, c_in: int, size_in, c_out: int, kernel, v_out: int, bias: bool, transposed=False) -> _Layer:
        w = c_in * c_out * math.prod(kernel)
        self.macs += w * (math.prod(size_in) if transposed else v_out)
        layer = _Layer("conv", out=c_out * v_out, inp=c_in * math.prod(size_in), params=w + c_out * bias)
        layer.weights = layer.params
        small = _native_small(c_in, size_in, kernel)
        layer.im2col = c_in * math.prod(kernel) * v_out if small and not transposed else 0
        self.layers.append(layer)
        return layer

    def conv_norm_act(self, c_in: int, size_in, c_out: int, kernel, size_out, bias: bool, act=True) -> _Layer:
        v_out = math.prod(size_out)
        layer = self.conv(c_in, size_in, c_out, kernel, v_out, bias)
        layer.kind = "cna"
        layer.params += self.norm_per_channel * c_out
        layer.saved = (2 + (act and not self.nonlin_inplace)) * c_out * v_out  # conv out, norm out (, act out)
        layer.saved_fp32 = 3 * c_out  # mean, inverse std, per-sample weight
        layer.act_buffers = self.act_buffers if act else 0
        return layer


def _native_small(c_in: int, size_in: Sequence[int], kernel: Sequence[int]) -> bool:
    """Whether a CPU fp32 batch-1 convolution takes PyTorch's native im2col path (small inputs, small kernels)."""
    return c_in * math.prod(size_in[:2]) <= _NATIVE_CONV_MAX and not (kernel[-1] > 3 and kernel[-2] > 3)


def _conv_out(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    return tuple((n + 2 * ((k - 1) // 2) - k) // s + 1 for n, k, s in zip(size, kernel, stride))


@functools.cache
def _traits(norm: str, nonlin: str, ndim: int) -> tuple[int, bool, int]:
    """(norm parameters per channel, nonlinearity in place?, output-sized buffers of the nonlinearity's backward:
    three when it works in place on a norm output that is a view, see the module docstring, else one)."""
    norm_layer = get_norm(norm)(ndim, 2)
    inplace = bool(getattr(get_nonlin(nonlin)(), "inplace", False))
    with torch.no_grad():
        out = norm_layer(torch.ones((2, 2) + (3,) * ndim))
    per_channel = sum(p.numel() for p in norm_layer.parameters()) // 2
    return per_channel, inplace, 3 if inplace and out._base is not None else 1


def _residual_block(w: _Walk, c_in: int, c_out: int, k, size_in, stride, bias: bool) -> tuple[int, ...]:
    size = _conv_out(size_in, k, stride)
    v = math.prod(size)
    w.conv_norm_act(c_in, size_in, c_out, k, size, bias)
    w.conv_norm_act(c_out, size, c_out, k, size, bias, act=False)
    if c_in != c_out:  # the 1x1 projection (after average pooling when strided) and its norm
        proj = w.conv(c_in, size, c_out, [1] * w.ndim, v, bias=False)
        proj.params += w.norm_per_channel * c_out
        proj.saved = c_out * v + (c_in * v if any(s != 1 for s in stride) else 0)  # conv output (+ pooled input)
        proj.saved_fp32 = 3 * c_out
    w.layers.append(_Layer("act", out=c_out * v, saved=0 if w.nonlin_inplace else c_out * v))
    return size


def _walk(spec: NetworkSpec, in_channels: int, n_outputs: int, patch_size: Sequence[int]) -> _Walk:
    if len(patch_size) != spec.ndim:
        raise PlanningError(f"patch_size {tuple(patch_size)} has {len(patch_size)} axes; the network is {spec.ndim}D")
    if spec.block not in _ANALYTIC_BLOCKS:
        from autoseg.planning.trace import traced_walk  # imports this module's node types

        return copy.deepcopy(traced_walk(spec, in_channels, n_outputs, tuple(int(p) for p in patch_size)))
    per_channel, inplace, buffers = _traits(spec.norm, spec.nonlin, spec.ndim)
    w = _Walk(spec.ndim, norm_per_channel=per_channel, act_buffers=buffers, nonlin_inplace=inplace)
    ones, feats, bias = [1] * spec.ndim, spec.features_per_stage, spec.conv_bias
    size, c_in = tuple(patch_size), in_channels
    if spec.block == "residual":  # stem
        w.conv_norm_act(in_channels, size, feats[0], spec.kernel_sizes[0], size, bias)
        c_in = feats[0]
    sizes = []
    for i in range(spec.n_stages):
        k = spec.kernel_sizes[i]
        for j in range(spec.n_conv_per_stage[i]):
            stride = spec.strides[i] if j == 0 else ones
            if spec.block == "plain":
                size_in, size = size, _conv_out(size, k, stride)
                w.conv_norm_act(c_in, size_in, feats[i], k, size, bias)
            else:
                size = _residual_block(w, c_in, feats[i], k, size, stride, bias)
            c_in = feats[i]
        sizes.append(size)
        if i < spec.n_stages - 1:  # the skip's gradient is released once this stage's backward starts
            w.layers[-1].skip_grad = -2 * feats[i] * math.prod(size)
    for j, s in enumerate(range(spec.n_stages - 2, -1, -1)):
        c, v = feats[s], math.prod(sizes[s])
        w.conv(feats[s + 1], sizes[s + 1], c, spec.strides[s + 1], v, bias, transposed=True)  # freed after concat
        w.layers.append(_Layer("concat", saved=2 * c * v, skip_grad=2 * c * v))  # its gradient holds the skip's
        for i in range(spec.n_conv_per_stage_decoder[j]):
            w.conv_norm_act(2 * c if i == 0 else c, sizes[s], c, spec.kernel_sizes[s], sizes[s], bias)
        head = w.conv(c, sizes[s], n_outputs, ones, v, bias=True)
        head.used = spec.deep_supervision or s == 0
        if head.used:
            w.held += n_outputs * v
            w.scales.append(v)
    for v in w.scales:  # Dice + CE per scale: log-softmax, softmax and one-hot target, and their gradients
        w.layers.append(_Layer("loss", saved_fp32=3 * n_outputs * v))
    w.scales.reverse()
    return w


def _in_flight(layer: _Layer, device: str, native_conv: bool) -> tuple[int, int]:
    """(activation-dtype, fp32) gradient elements per sample alive while ``layer`` runs backward, beyond what is
    saved, net of what it frees before that moment."""
    if layer.kind == "loss":
        return 0, layer.saved_fp32
    if layer.kind == "concat":
        return 0, 0
    if layer.kind == "act":  # output and input gradient, or the buffers of a norm / in-place nonlinearity
        return (1 + (layer.act_buffers or 1)) * layer.out, 0
    # convolution: output and input gradients; on CPU oneDNN reorders input and output gradient (or the native
    # path builds im2col columns); CUDA's cuDNN workspace is a separate allowance
    conv = layer.out + layer.inp
    if device == "cpu":
        conv += layer.im2col if native_conv and layer.im2col else layer.inp + layer.out
    if layer.kind == "conv":
        return conv, 0
    # conv-norm-nonlinearity runs backward as nonlinearity, norm (output gradient, input gradient, one
    # temporary), then convolution, by which time its own outputs are freed
    steps = [3 * layer.out, conv - layer.saved, layer.out * (1 + layer.act_buffers)]
    return max(steps), 0


def _check(precision: str, device: str) -> None:
    if precision not in _PRECISIONS or device not in _DEVICES:
        raise PlanningError(
            f"precision must be one of {sorted(_PRECISIONS)} and device one of {list(_DEVICES)}; "
            f"got precision={precision!r}, device={device!r}"
        )


def estimate_training_memory(
    spec: NetworkSpec,
    in_channels: int,
    n_outputs: int,
    patch_size: Sequence[int],
    batch_size: int,
    *,
    precision: str = "fp32",
    device: str = "cpu",
) -> MemoryEstimate:
    """Peak bytes of one training step (forward, Dice + CE at every deep-supervision scale, backward, SGD).

    Parameters
    ----------
    spec
        The network.
    in_channels, n_outputs
        Input channels and output channels (classes or regions).
    patch_size
        Spatial patch size in the network's axis order (2 or 3 entries).
    batch_size
        Samples per step.
    precision
        ``fp32``, or ``fp16``/``bf16`` for autocast mixed precision.
    device
        ``cpu`` or ``cuda`` (CUDA adds the cuDNN allowance and the multi-tensor optimizer's temporary).

    Returns
    -------
    MemoryEstimate
        ``total_bytes`` and its breakdown at the peak.
    """
    _check(precision, device)
    w = _walk(spec, in_channels, n_outputs, patch_size)
    ab, mixed, b = _PRECISIONS[precision], precision != "fp32", batch_size
    if mixed:  # the first convolution saves the 2-byte copy of the input
        w.layers[0].saved += in_channels * math.prod(patch_size)

    def saved(layer: _Layer) -> int:
        return b * (layer.saved * ab + layer.saved_fp32 * 4) + (2 * layer.weights * layer.used if mixed else 0)

    native_conv = device == "cpu" and not mixed and b == 1
    alive, grads, skip = sum(saved(layer) for layer in w.layers), 0, 0
    peak = (0, 0, 0)  # (alive activations, gradients, workspace) at the peak
    for layer in reversed(w.layers):
        act, fp32 = _in_flight(layer, device, native_conv)
        flight = b * (act * ab + fp32 * 4)
        if alive + grads + skip + flight > sum(peak):
            peak = (alive, grads, skip + flight)
        alive -= saved(layer)
        grads += 4 * layer.params * layer.used
        skip += b * layer.skip_grad * ab
    step_temp = grads if device == "cuda" else 0  # multi-tensor SGD: gradients + weight decay, a temporary copy
    if grads + step_temp > sum(peak):
        peak = (0, grads, step_temp)
    params = 4 * sum(layer.params for layer in w.layers)
    inputs = b * (4 * in_channels * math.prod(patch_size) + 8 * sum(w.scales))
    activations = peak[0] + b * w.held * ab
    workspace = peak[2] + (CUDNN_WORKSPACE_BYTES if device == "cuda" else 0)
    total = 2 * params + inputs + activations + peak[1] + workspace
    return MemoryEstimate(
        total_bytes=int(total),
        parameters=params,
        gradients=peak[1],
        optimizer_state=params,
        activations=int(activations),
        inputs=int(inputs),
        workspace=int(workspace),
        precision=precision,
        device=device,
    )


def estimate_flops(
    spec: NetworkSpec, in_channels: int, n_outputs: int, patch_size: Sequence[int], batch_size: int
) -> int:
    """Floating-point operations of one training step: 2 x the multiply-adds of every (transposed) convolution and
    head, times 3 for forward + backward (input and weight gradients). Norms, nonlinearities and the loss are
    memory-bound and left out."""
    return int(3 * 2 * _walk(spec, in_channels, n_outputs, patch_size).macs * batch_size)


def measure_training_memory(
    spec: NetworkSpec,
    in_channels: int,
    n_outputs: int,
    patch_size: Sequence[int],
    batch_size: int,
    *,
    precision: str = "fp32",
    device: str = "cpu",
    seed: int = 0,
) -> int:
    """Peak bytes of a real training step: forward, Dice + CE at every scale, backward, clipping, SGD step.

    Arguments as :func:`estimate_training_memory`; ``seed`` seeds the weights and the random batch.

    One warm-up step runs first (it creates the momentum buffers, picks cuDNN algorithms under the current
    ``torch.backends.cudnn.benchmark`` setting, which the trainer should share), then the measured step.
    On CUDA the peak is ``torch.cuda.max_memory_allocated`` over the step minus what was allocated before the
    network was built. On CPU there is no allocator statistic; the peak is taken from the allocation timeline of
    ``torch.profiler`` (``profile_memory=True``): the bytes alive before the step (parameters, momentum, batch)
    plus the maximum of the cumulative allocations and frees during it. That is the CPU counterpart of
    ``max_memory_allocated``: it counts exactly the tensors the step needs, independent of how malloc caches and
    returns pages, whereas peak-RSS growth would mix in allocator slack, thread pools and library buffers that a
    model of the step cannot predict and that change from run to run. (The timeline is read from the profiler's
    kineto results, the one place PyTorch exposes each allocation and free with its size.)

    Returns
    -------
    int
        Peak bytes.
    """
    _check(precision, device)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    step, settle = probe_step(
        spec, in_channels, n_outputs, patch_size, batch_size, precision=precision, device=dev, seed=seed
    )
    step()  # warm-up: momentum buffers, cuDNN autotuning
    live = settle()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    return _cpu_peak(step, live)


def _cpu_peak(step, live_bytes: int) -> int:
    """Bytes alive before ``step`` plus the peak of the allocation timeline recorded while it runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type().name == "CPU":
            current += e.nbytes()
            peak = max(peak, current)
    return live_bytes + peak
