"""Segmentation losses, registered by name, built from a plan's :class:`~autoseg.planning.plans.LossSpec`.

Conventions (shared by every registered loss):

* Outputs are logits ``(B, C, *spatial)``; targets are integer label maps ``(B, 1, *spatial)``.
* Label-based training (no regions): softmax over ``C = n_outputs`` classes, label value ``c`` is channel ``c``.
  Dice-type terms exclude the background channel 0 (``do_bg=False`` in nnU-Net's words).
* Region-based training (overlapping labels): one sigmoid channel per region; a region's target is the union of
  its label values. Cross-entropy becomes binary cross-entropy averaged over regions; Dice-type terms use every
  region.
* Soft Dice is ``(2 * TP + smooth) / (2 * TP + FP + FN + smooth)`` on probabilities with ``smooth = 1e-5``,
  computed per sample and class, or per class over the whole batch (``batch_dice``), then averaged. **The Dice
  loss is ``1 - Dice``** (0 for a perfect prediction); nnU-Net reports ``-Dice``, so an nnU-Net ``dice_ce`` log
  value is ours minus one.
* Ignore label: voxels whose target equals it count in no term; their gradients are exactly zero.
* Every reduction runs in float32 with autocast disabled, whatever precision the network ran in.

A loss is a weighted sum of *terms*; a term is a function of :class:`LossInputs` (the prepared logits, targets and
mask of one output scale) returning a scalar. ``register_loss`` adds a named factory that turns options into
weighted terms. :func:`build_loss` wraps the result for deep supervision (one output per scale).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from autoseg.errors import ConfigError, TrainingError
from autoseg.networks.spec import LossSpec

__all__ = [
    "DICE_SMOOTH",
    "LossInputs",
    "LossTerm",
    "LossFactory",
    "register_loss",
    "list_losses",
    "loss_defaults",
    "build_loss",
    "SegmentationLoss",
    "DeepSupervisionLoss",
    "deep_supervision_weights",
    "cross_entropy",
    "focal",
    "topk_cross_entropy",
    "soft_dice",
    "tversky",
]

DICE_SMOOTH = 1e-5

LossTerm = Callable[["LossInputs"], Tensor]
LossFactory = Callable[[Mapping[str, float]], Sequence[tuple[float, LossTerm]]]


@dataclass(frozen=True)
class _Entry:
    factory: LossFactory
    defaults: Mapping[str, float]


_REGISTRY: dict[str, _Entry] = {}


def register_loss(name: str, **defaults: float) -> Callable[[LossFactory], LossFactory]:
    """Register ``factory(options) -> [(weight, term), ...]`` under ``name``; ``defaults`` are its options.

    Options a plan may set are exactly the keys of ``defaults``. Registering a taken name raises ``ValueError``.
    """

    def decorator(factory: LossFactory) -> LossFactory:
        if name in _REGISTRY:
            raise ValueError(f"a loss named {name!r} is already registered; choose another name")
        _REGISTRY[name] = _Entry(factory, dict(defaults))
        return factory

    return decorator


def list_losses() -> list[str]:
    """Names of the registered losses, sorted."""
    return sorted(_REGISTRY)


def loss_defaults(name: str) -> dict[str, float]:
    """Default options of loss ``name`` (the keys a plan's ``loss.options`` may set)."""
    return dict(_lookup(name).defaults)


def _lookup(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ConfigError(f"loss.name: {name!r} is not a registered loss; valid names: {list_losses()}")
    return _REGISTRY[name]


class LossInputs:
    """One output scale prepared for the loss terms; derived tensors are computed once, on first use.

    Attributes
    ----------
    logits : Tensor
        ``(B, C, *spatial)`` float32.
    labels : Tensor
        ``(B, *spatial)`` int64 label map, ignored voxels set to 0.
    target : Tensor
        ``(B, C, *spatial)`` float32: one-hot labels (softmax) or region masks (sigmoid); 0 at ignored voxels.
    mask : Tensor or None
        ``(B, 1, *spatial)`` float32, 1 where a voxel counts; None without an ignore label.
    sigmoid : bool
        Region-based (independent sigmoid per channel) rather than softmax over channels.
    batch_dice : bool
        Dice-type terms pool the batch into one count per class.
    """

    def __init__(
        self, logits: Tensor, labels: Tensor, target: Tensor, mask: Tensor | None, *, sigmoid: bool, batch_dice: bool
    ) -> None:
        self.logits, self.labels, self.target, self.mask = logits, labels, target, mask
        self.sigmoid, self.batch_dice = sigmoid, batch_dice

    @functools.cached_property
    def probabilities(self) -> Tensor:
        """Softmax (labels) or sigmoid (regions) of the logits, ``(B, C, *spatial)``."""
        return torch.sigmoid(self.logits) if self.sigmoid else torch.softmax(self.logits, 1)

    @functools.cached_property
    def voxel_ce(self) -> Tensor:
        """Unreduced cross-entropy: ``(B, 1, *spatial)`` (softmax) or per-region BCE ``(B, C, *spatial)``."""
        if self.sigmoid:
            return F.binary_cross_entropy_with_logits(self.logits, self.target, reduction="none")
        return F.cross_entropy(self.logits, self.labels, reduction="none").unsqueeze(1)

    @functools.cached_property
    def soft_counts(self) -> tuple[Tensor, Tensor, Tensor]:
        """Soft (TP, predicted sum, target sum) per class: ``(C',)`` with batch dice, else ``(B, C')``.

        The background channel is left out for softmax outputs (``C' = C - 1``); ignored voxels count nowhere.
        """
        probs, target = self.probabilities, self.target
        if not self.sigmoid:
            probs, target = probs[:, 1:], target[:, 1:]
        if self.mask is not None:
            probs = probs * self.mask
        axes = tuple(range(2, probs.ndim)) if not self.batch_dice else (0, *range(2, probs.ndim))
        counts = torch.stack(((probs * target).sum(axes), probs.sum(axes), target.sum(axes)))
        if self.batch_dice:
            counts = _sum_over_ranks(counts)
        return counts[0], counts[1], counts[2]

    def masked_mean(self, voxel_map: Tensor) -> Tensor:
        """Mean of a ``(B, *spatial)`` map over the voxels that count (0 when none does)."""
        if self.mask is None:
            return voxel_map.mean()
        weights = self.mask[:, 0]
        return (voxel_map * weights).sum() / weights.sum().clamp_min(1.0)

    def valid_values(self, voxel_map: Tensor) -> Tensor:
        """The entries of a ``(B, *spatial)`` map at voxels that count, flattened."""
        return voxel_map.reshape(-1) if self.mask is None else voxel_map[self.mask[:, 0] > 0]


# --- terms -----------------------------------------------------------------------------------------------------


def _sum_over_ranks(counts: Tensor) -> Tensor:
    """Batch Dice under data parallelism: the counts of every rank's share of the batch, summed (with gradients).

    Each rank then computes the Dice of the whole batch, as one process would; the backward pass sums the
    gradients of the counts over the ranks, and DDP's averaging of parameter gradients makes the result the
    single-process gradient. Without gradients (validation, which rank 0 runs alone) the counts stay local: a
    collective that only one rank enters would pair with another rank's training collectives.
    """
    if not torch.is_grad_enabled() or not (dist.is_available() and dist.is_initialized()):
        return counts
    return counts if dist.get_world_size() == 1 else _AllReduceSum.apply(counts)


def _summed_copy(tensor: Tensor) -> Tensor:
    out = tensor.detach().clone().contiguous()
    dist.all_reduce(out)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward pass is the same sum of the gradients (torch's own one is deprecated)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        return _summed_copy(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _summed_copy(grad)


def cross_entropy(x: LossInputs) -> Tensor:
    """Mean cross-entropy (softmax) or binary cross-entropy averaged over regions (sigmoid)."""
    return x.masked_mean(x.voxel_ce.mean(1))


def focal(x: LossInputs, *, gamma: float) -> Tensor:
    """Focal loss ``(1 - p_t)^gamma * CE`` per voxel (per region for sigmoid), averaged (Lin et al., 2017)."""
    ce = x.voxel_ce
    modulation = (-torch.expm1(-ce)).clamp_min(1e-12).pow(gamma)
    return x.masked_mean((modulation * ce).mean(1))


def topk_cross_entropy(x: LossInputs, *, k: float) -> Tensor:
    """Mean of the ``k`` percent largest per-voxel cross-entropies (at least one voxel)."""
    values = x.valid_values(x.voxel_ce.mean(1))
    if values.numel() == 0:
        return x.logits.sum() * 0.0
    n = max(1, int(values.numel() * k / 100))
    return values.topk(n, sorted=False).values.mean()


def soft_dice(x: LossInputs, *, smooth: float) -> Tensor:
    """``1 - mean soft Dice`` over classes (and samples unless batch dice)."""
    tp, pred_sum, target_sum = x.soft_counts
    dice = (2 * tp + smooth) / (pred_sum + target_sum + smooth).clamp_min(1e-8)
    return 1.0 - dice.mean()


def tversky(x: LossInputs, *, alpha: float, beta: float, smooth: float) -> Tensor:
    """``1 - mean Tversky index``, ``TP / (TP + alpha FP + beta FN)``; alpha = beta = 0.5 is soft Dice."""
    tp, pred_sum, target_sum = x.soft_counts
    fp, fn = pred_sum - tp, target_sum - tp
    index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth).clamp_min(1e-8)
    return 1.0 - index.mean()


# --- registered losses -----------------------------------------------------------------------------------------


def _dice(o: Mapping[str, float]) -> LossTerm:
    return functools.partial(soft_dice, smooth=o["smooth"])


@register_loss("ce")
def _ce_loss(o: Mapping[str, float]) -> list[tuple[float, LossTerm]]:
    return [(1.0, cross_entropy)]


@register_loss("dice", smooth=DICE_SMOOTH)
def _dice_loss(o: Mapping[str, float]) -> list[tuple[float, LossTerm]]:
    return [(1.0, _dice(o))]


@register_loss("dice_ce", weight_dice=1.0, weight_ce=1.0, smooth=DICE_SMOOTH)
def _dice_ce_loss(o: Mapping[str, float]) -> list[tuple[float, LossTerm]]:
    return [(o["weight_dice"], _dice(o)), (o["weight_ce"], cross_entropy)]


@register_loss("focal", gamma=2.0)
def _focal_loss(o: Mapping[str, float]) -> list[tuple[float, LossTerm]]:
    return [(1.0, functools.partial(focal, gamma=o["gamma"]))]


@register_loss("topk", k=10.0)
def _topk_loss(o: Mapping[str, float]) -> list[tuple[float, LossTerm]]:
    return [(1.0, functools.partial(topk_cross_entropy, k=o["k"]))]


@register_loss("tversky", alpha=0.3, beta=0.7, smooth=DICE_SMOOTH)
def _tversky_loss(o: Mapping[str, float]) -> list[tuple[float, LossTerm]]:
    return [(1.0, functools.partial(tversky, alpha=o["alpha"], beta=o["beta"], smooth=o["smooth"]))]


@register_loss("dice_topk", weight_dice=1.0, weight_topk=1.0, k=10.0, smooth=DICE_SMOOTH)
def _dice_topk_loss(o: Mapping[str, float]) -> list[tuple[float, LossTerm]]:
    return [(o["weight_dice"], _dice(o)), (o["weight_topk"], functools.partial(topk_cross_entropy, k=o["k"]))]


@register_loss("dice_focal", weight_dice=1.0, weight_focal=1.0, gamma=2.0, smooth=DICE_SMOOTH)
def _dice_focal_loss(o: Mapping[str, float]) -> list[tuple[float, LossTerm]]:
    return [(o["weight_dice"], _dice(o)), (o["weight_focal"], functools.partial(focal, gamma=o["gamma"]))]


# --- options ---------------------------------------------------------------------------------------------------

# key -> (lowest, highest, lowest allowed); options not listed here must be finite, weights must be >= 0
_RANGES: dict[str, tuple[float, float, bool]] = {
    "k": (0.0, 100.0, False),
    "gamma": (0.0, math.inf, True),
    "alpha": (0.0, math.inf, True),
    "beta": (0.0, math.inf, True),
    "smooth": (0.0, math.inf, True),
}


def _check_option(name: str, key: str, value: object) -> float:
    low, high, low_ok = _RANGES.get(
        key, (0.0, math.inf, True) if key.startswith("weight_") else (-math.inf, math.inf, True)
    )
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not numeric or value < low or (value == low and not low_ok) or value > high:  # type: ignore[operator]
        interval = f"{'[' if low_ok else '('}{low}, {high}]"
        raise ConfigError(f"loss.options.{key}: {value!r} for loss {name!r} must be a finite number in {interval}")
    return float(value)  # type: ignore[arg-type]


def _options(name: str, defaults: Mapping[str, float], given: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"loss.options: unknown option(s) {unknown} for loss {name!r}; valid: {sorted(defaults)}")
    merged = {key: _check_option(name, key, value) for key, value in {**defaults, **given}.items()}
    weights = [value for key, value in merged.items() if key.startswith("weight_")]
    if weights and not any(weights):
        raise ConfigError(f"loss.options: every weight of loss {name!r} is 0; give at least one term a weight > 0")
    return merged


# --- modules ---------------------------------------------------------------------------------------------------


class SegmentationLoss(nn.Module):
    """Weighted sum of loss terms on one output scale: ``loss(logits (B, C, *s), labels (B, 1, *s)) -> scalar``."""

    def __init__(
        self,
        terms: Sequence[tuple[float, LossTerm]],
        *,
        n_outputs: int,
        regions: Sequence[Sequence[int]] | None = None,
        ignore_label: int | None = None,
        batch_dice: bool = False,
    ) -> None:
        super().__init__()
        self.terms = tuple((float(w), term) for w, term in terms if w != 0)
        self.n_outputs = n_outputs
        self.regions = tuple(tuple(int(v) for v in r) for r in regions) if regions else ()
        self.ignore_label = ignore_label
        self.batch_dice = batch_dice

    def prepare(self, logits: Tensor, target: Tensor) -> LossInputs:
        """Check shapes, cast to float32, encode the label map (one-hot or regions) and build the ignore mask."""
        if logits.ndim < 3 or logits.shape[1] != self.n_outputs:
            raise TrainingError(f"loss: output shape {tuple(logits.shape)} is not (B, {self.n_outputs}, *spatial)")
        if target.shape != (logits.shape[0], 1, *logits.shape[2:]):
            raise TrainingError(
                f"loss: target shape {tuple(target.shape)} does not match output shape {tuple(logits.shape)}; "
                f"expected an integer label map of shape {(logits.shape[0], 1, *logits.shape[2:])}"
            )
        labels = target[:, 0].long()
        mask = None
        if self.ignore_label is not None:
            keep = labels != self.ignore_label
            mask = keep.unsqueeze(1).float()
            labels = torch.where(keep, labels, 0)
        logits = logits.float()
        if self.regions:
            encoded = [torch.isin(labels, torch.tensor(r, device=labels.device)) for r in self.regions]
            onehot = torch.stack(encoded, 1).float()
        else:
            onehot = torch.zeros_like(logits).scatter_(1, labels.unsqueeze(1), 1.0)
        if mask is not None:
            onehot = onehot * mask
        return LossInputs(logits, labels, onehot, mask, sigmoid=bool(self.regions), batch_dice=self.batch_dice)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            inputs = self.prepare(logits, target)
            return sum((w * term(inputs) for w, term in self.terms), torch.zeros((), device=logits.device))


def deep_supervision_weights(n_scales: int) -> tuple[float, ...]:
    """nnU-Net's deep-supervision weights: ``1 / 2**i`` for scale i (0 = full resolution), the lowest resolution
    set to 0, normalised to sum 1. One scale gets weight 1."""
    if n_scales < 1:
        raise ValueError(f"deep_supervision_scales must be at least 1, got {n_scales}")
    if n_scales == 1:
        return (1.0,)
    raw = [1.0 / 2**i for i in range(n_scales - 1)] + [0.0]
    return tuple(w / sum(raw) for w in raw)


class DeepSupervisionLoss(nn.Module):
    """Apply ``loss`` to each (output, target) scale, highest resolution first, and sum with ``weights``.

    A single output tensor (deep supervision off, or validation) is scored against the first target alone.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        self.loss = loss
        self.weights = tuple(float(w) for w in weights)

    def forward(self, outputs: Tensor | Sequence[Tensor], targets: Tensor | Sequence[Tensor]) -> Tensor:
        if isinstance(outputs, Tensor):
            return self.loss(outputs, targets if isinstance(targets, Tensor) else targets[0])
        if isinstance(targets, Tensor):
            raise TrainingError(
                f"loss: got {len(outputs)} outputs (deep supervision) but one target; pass one downsampled target "
                "per output, highest resolution first"
            )
        n = len(self.weights)
        if len(outputs) != n or len(targets) != n:
            raise TrainingError(
                f"loss: built for {n} deep-supervision scales but got {len(outputs)} outputs and {len(targets)} "
                "targets; build_loss(deep_supervision_scales=...) must equal the network's number of outputs"
            )
        terms = [w * self.loss(o, t) for w, o, t in zip(self.weights, outputs, targets) if w != 0]
        return torch.stack(terms).sum()


def _check_layout(n_outputs: int, regions: Sequence[Sequence[int]] | None, ignore_label: int | None) -> None:
    if regions:
        if len(regions) != n_outputs:
            raise ConfigError(f"loss: {len(regions)} regions need n_outputs={len(regions)}, got {n_outputs}")
        for i, region in enumerate(regions):
            if len(region) == 0 or (ignore_label is not None and ignore_label in region):
                raise ConfigError(f"regions[{i}]: {list(region)} must be non-empty and exclude the ignore label")
    elif n_outputs < 2:
        raise ConfigError(f"loss: softmax outputs need background + at least one label, got n_outputs={n_outputs}")
    elif ignore_label is not None and 0 <= ignore_label < n_outputs:
        raise ConfigError(
            f"ignore_label: {ignore_label} is also output class {ignore_label} of {n_outputs}; the ignore label "
            "must be the highest label value in dataset.json"
        )


def build_loss(
    spec: LossSpec,
    *,
    n_outputs: int,
    regions: Sequence[Sequence[int]] | None = None,
    ignore_label: int | None = None,
    deep_supervision_scales: int = 1,
) -> nn.Module:
    """Build the loss a configuration asks for.

    Parameters
    ----------
    spec : LossSpec
        Registered loss name, ``batch_dice`` and options (see :func:`loss_defaults`).
    n_outputs : int
        Network output channels: classes including background, or the number of regions.
    regions : sequence of label-value sequences, optional
        Region-based training: channel i is the union of ``regions[i]`` (sigmoid outputs).
    ignore_label : int, optional
        Label value that counts in no term.
    deep_supervision_scales : int
        Number of network outputs (highest resolution first); weights from :func:`deep_supervision_weights`.

    Returns
    -------
    torch.nn.Module
        ``loss(outputs, targets) -> scalar`` with outputs ``(B, n_outputs, *spatial)`` logits or a list of them and
        targets ``(B, 1, *spatial)`` integer label maps or a list of them (one per scale).
    """
    entry = _lookup(spec.name)
    options = _options(spec.name, entry.defaults, spec.options)
    _check_layout(n_outputs, regions, ignore_label)
    single = SegmentationLoss(
        entry.factory(options),
        n_outputs=n_outputs,
        regions=regions,
        ignore_label=ignore_label,
        batch_dice=spec.batch_dice,
    )
    return DeepSupervisionLoss(single, deep_supervision_weights(deep_supervision_scales))
