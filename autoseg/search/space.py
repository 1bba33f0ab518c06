"""The search space as data, and the one function that turns a trial into a plan: :func:`suggest`.

Every parameter is *relative to the rule-based plan*, so that the rule plan is one point of the space (the study's
first, enqueued trial: :func:`rule_params`) and the same parameter means the same thing for 2D and 3D:

- ``configuration``: which planned configuration to train (2D, 3D full resolution, 3D low resolution);
- ``patch_scale``: patch volume relative to the rule's; the batch shrinks or grows by the same factor (the
  patch-versus-batch trade-off at a constant number of voxels per step);
- ``depth_delta``: encoder stages removed from the deepest topology the patch allows (0, -1, -2);
- ``width_scale``: features of every stage relative to the rule's; ``block``: the architecture family, any of
  the registry's (:data:`FAMILIES`: plain, residual, attention, multiscale, dense, convnext, hybrid);
- ``loss``, ``learning_rate``, ``oversampling`` (share of patches forced to contain foreground),
  ``aug_strength`` (:attr:`AugmentationSpec.strength`);
- ``epochs_scale``: training length relative to the rule's.

Budgets are kept, not hoped for. A candidate whose estimated training memory exceeds the device's budget, or
whose step on a CPU is estimated slower than the planner's target, is repaired (smaller batch, then smaller
patch, then fewer features) before anything is trained, and the repair is written into the configuration's
``why``; one that cannot be repaired is excluded: :class:`PlanningError` names the family and the limit. Training length
is capped so that the whole training costs no more than the rule plan's (a cheaper step may train longer, a dearer
one trains shorter): the time budget the planner fitted the rule plan's epochs to. Steps are priced by their
estimated FLOPs, or by measured seconds when the caller measures them (the search does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoseg.errors import ConfigError, PlanningError
from autoseg.networks import list_blocks
from autoseg.planning import default, rules
from autoseg.planning.memory import estimate_flops
from autoseg.planning.plans import Configuration, LossSpec, NetworkSpec, Plans
from autoseg.planning.topology import Topology, pad_to_multiple, pool_and_conv_props, shrink_patch, unet_for_topology

__all__ = [
    "Param",
    "Limits",
    "Candidate",
    "LOSSES",
    "FAMILIES",
    "search_space",
    "rule_params",
    "trainable_configurations",
    "limits_for",
    "build_candidate",
    "sample_params",
    "sample_candidate",
    "suggest",
]

#: Losses the search chooses from (the rule plan's loss is always added).
LOSSES = ("dice_ce", "dice_topk", "dice_focal", "tversky")
WIDTH_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)
#: Architecture families the search chooses from (the rule plan's is always added): every registered one.
FAMILIES = ("plain", "residual") + tuple(n for n in list_blocks() if n not in ("plain", "residual"))
#: Width scales the repair tries, relative to the sampled one, before a family is excluded.
REPAIR_WIDTHS = (0.75, 0.5, 0.25)
DEPTH_DELTAS = (-2, -1, 0)
MAX_FEATURES = {3: 320, 2: 512}


@dataclass(frozen=True)
class Param:
    """One search dimension: ``kind`` is ``categorical`` (``choices``), ``float`` or ``int`` (``low``..``high``)."""

    name: str
    kind: str
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 1.0
    log: bool = False


@dataclass(frozen=True)
class Limits:
    """What one training step may cost: memory (bytes) and, on a CPU, time against the planner's target."""

    budget: default.Budget
    #: False when the throughput is unknown (then only memory is checked).
    knows_speed: bool = True

    def seconds_target(self, ndim: int) -> float | None:
        if not (self.budget.is_cpu and self.knows_speed):
            return None
        return default.CPU_SECONDS_PER_ITERATION[ndim]

    def fits(self, net: NetworkSpec, patch: Sequence[int], batch: int) -> bool:
        if self.budget.memory(net, patch, batch) > self.budget.memory_limit():
            return False
        target = self.seconds_target(len(patch))
        return target is None or self.budget.seconds(net, patch, batch) <= target


@dataclass(frozen=True)
class Candidate:
    """A trial's plan: ``plans`` holds exactly one configuration, ``name``, with the final epoch count.

    ``epochs_scale`` is the effective training length relative to the rule plan (after the compute cap);
    ``effective`` lists what was built (patch, batch, features, ...), ``notes`` what was repaired.
    """

    plans: Plans
    name: str
    epochs_scale: float
    effective: dict[str, Any]
    notes: tuple[str, ...] = ()

    @property
    def configuration(self) -> Configuration:
        return self.plans.configurations[self.name]


def trainable_configurations(plans: Plans) -> tuple[str, ...]:
    """Configurations a trial can train alone (a cascade stage needs its previous stage: excluded)."""
    return tuple(n for n, c in plans.configurations.items() if c.previous_stage is None)


def _learning_rate_range(plans: Plans) -> tuple[float, float]:
    rates = [c.training.learning_rate for c in plans.configurations.values()]
    return min(1e-3, *(r / 3 for r in rates)), max(1e-1, *(r * 3 for r in rates))


def search_space(plans: Plans, configs: Sequence[str] | None = None) -> tuple[Param, ...]:
    """The search dimensions for ``plans`` (``configuration`` only when several ``configs`` compete)."""
    configs = tuple(configs or trainable_configurations(plans))
    losses = tuple(dict.fromkeys(LOSSES + tuple(plans.configurations[n].loss.name for n in configs)))
    blocks = tuple(dict.fromkeys(FAMILIES + tuple(plans.configurations[n].network.block for n in configs)))
    low_lr, high_lr = _learning_rate_range(plans)
    strength = max([1.5] + [plans.configurations[n].augmentation.strength for n in configs])
    space = [
        Param("patch_scale", "float", low=0.5, high=2.0, log=True),
        Param("depth_delta", "categorical", DEPTH_DELTAS),
        Param("width_scale", "categorical", WIDTH_SCALES),
        Param("block", "categorical", blocks),
        Param("loss", "categorical", losses),
        Param("learning_rate", "float", low=low_lr, high=high_lr, log=True),
        Param("oversampling", "float", low=0.0, high=1.0),
        Param("aug_strength", "float", low=0.0, high=strength),
        Param("epochs_scale", "float", low=0.5, high=2.0, log=True),
    ]
    if len(configs) > 1:
        space.insert(0, Param("configuration", "categorical", configs))
    return tuple(space)


def rule_params(plans: Plans, config: str) -> dict[str, Any]:
    """The parameters that reproduce the rule plan's configuration ``config`` exactly."""
    c = plans.configurations[config]
    return {
        "configuration": config,
        "patch_scale": 1.0,
        "depth_delta": 0,
        "width_scale": 1.0,
        "block": c.network.block,
        "loss": c.loss.name,
        "learning_rate": c.training.learning_rate,
        "oversampling": c.foreground_oversampling,
        "aug_strength": c.augmentation.strength,
        "epochs_scale": 1.0,
    }


def limits_for(plans: Plans, flops_per_second: float | None = None) -> Limits:
    """Limits for the plan's device, with the throughput the plan was made with (``plans.device``) unless given."""
    flops_per_second = flops_per_second or plans.device.flops_per_second
    knows = flops_per_second is not None
    flops_per_second = flops_per_second or 1.0
    budget = default.Budget(plans.device, flops_per_second, plans.n_outputs, len(plans.channels))
    return Limits(budget, knows)


def _topology(spacing: Sequence[float], wanted: Sequence[float] | np.ndarray, depth_delta: int) -> Topology:
    """The deepest topology for ``wanted`` minus ``-depth_delta`` stages (at least two stay), patch padded to it."""
    topo = pool_and_conv_props(spacing, wanted)
    n = max(min(2, topo.n_stages), topo.n_stages + depth_delta)
    strides = topo.strides[:n]
    divisor = tuple(int(np.prod([s[d] for s in strides])) for d in range(len(spacing)))
    return dataclasses.replace(
        topo,
        strides=strides,
        kernel_sizes=topo.kernel_sizes[:n],
        pools_per_axis=tuple(int(round(math.log2(d))) for d in divisor),
        divisor=divisor,
        patch_size=pad_to_multiple(wanted, divisor),
    )


def _network(c: Configuration, topo: Topology, params: Mapping[str, Any]) -> NetworkSpec:
    rule = c.network
    base = max(4, int(round(rule.features_per_stage[0] * params["width_scale"])))
    cap = min(MAX_FEATURES[c.ndim], max(base, int(round(max(rule.features_per_stage) * params["width_scale"]))))
    net = unet_for_topology(topo, base, block=params["block"], max_features=cap)
    return dataclasses.replace(
        net, norm=rule.norm, nonlin=rule.nonlin, deep_supervision=rule.deep_supervision, conv_bias=rule.conv_bias
    )


def _architecture(
    c: Configuration, params: Mapping[str, Any], limits: Limits
) -> tuple[NetworkSpec, tuple[int, ...], int, list[str]]:
    """Network, patch and batch for the sampled architecture, repaired into the budget."""
    unchanged = (
        params["patch_scale"] == 1.0
        and params["depth_delta"] == 0
        and params["width_scale"] == 1.0
        and params["block"] == c.network.block
    )
    if unchanged:
        return c.network, tuple(c.patch_size), c.batch_size, []
    scale = float(params["patch_scale"])
    upper = [max(p, int(math.ceil(m))) for p, m in zip(c.patch_size, c.median_image_size)]
    wanted = [min(u, p * scale ** (1 / c.ndim)) for p, u in zip(c.patch_size, upper)]
    batch = max(1, int(round(c.batch_size * float(np.prod(c.patch_size)) / float(np.prod(wanted)))))
    depth = int(params["depth_delta"])
    topo = _topology(c.spacing, wanted, depth)
    first = (topo.patch_size, batch)

    def usable(t: Topology) -> bool:  # at least two stages (a U-Net), unless the rule plan had fewer
        return t.n_stages >= min(2, c.network.n_stages)

    # the wanted patch with the largest batch that fits, at the sampled width or fewer features (down to half);
    # else batch 1 and the patch shrunk until it fits, at the sampled width or fewer features
    found = None
    for shrink in (False, True):
        for repair in (1.0, *REPAIR_WIDTHS[: None if shrink else 2]):
            narrower = {**params, "width_scale": params["width_scale"] * repair}
            found = _fit(c, narrower, limits, topo, batch, wanted, usable, shrink=shrink)
            if found is not None:
                break
        if found is not None:
            break
    if found is not None:
        topo, fitting = found
        notes = []
        if first != (topo.patch_size, fitting):
            notes.append(f"patch {list(first[0])} batch {first[1]} repaired to fit the budget")
        if repair != 1.0:
            width = narrower["width_scale"]
            notes.append(f"{params['block']} features x{repair:g} (width x{width:g}) to fit the budget")
        return _network(c, topo, narrower), tuple(topo.patch_size), fitting, notes
    target = limits.seconds_target(c.ndim)
    raise PlanningError(
        f"search: no patch of {c.name} fits the budget with width x{params['width_scale']} (fewer features down to "
        f"width x{params['width_scale'] * REPAIR_WIDTHS[-1]:g} tried), {params['block']} blocks and depth "
        f"{params['depth_delta']:+d} (memory {limits.budget.memory_limit() / 2**30:.1f} GB"
        + (f", {target:g} s per step on this CPU)" if target else ")")
        + f": family {params['block']!r} excluded for this point"
    )


def _fit(
    c: Configuration,
    params: Mapping[str, Any],
    limits: Limits,
    topo: Topology,
    batch: int,
    wanted: Sequence[float],
    usable: Callable[[Topology], bool],
    *,
    shrink: bool,
) -> tuple[Topology, int] | None:
    """The wanted patch with the largest batch that fits, or (``shrink``) batch 1 and the patch shrunk to fit."""
    if not shrink:
        fitting = next(
            (
                b
                for b in range(batch, 0, -1)
                if usable(topo) and limits.fits(_network(c, topo, params), topo.patch_size, b)
            ),
            None,
        )
        return None if fitting is None else (topo, fitting)
    depth = int(params["depth_delta"])
    shrunk = shrink_patch(
        wanted,
        c.median_image_size,
        lambda patch: _topology(c.spacing, patch, depth),
        lambda t: usable(t) and limits.fits(_network(c, t, params), t.patch_size, 1),
        ties="first",
    )
    return (shrunk[0], 1) if shrunk is not None else None


def _loss(c: Configuration, name: str) -> LossSpec:
    return c.loss if name == c.loss.name else LossSpec(name, c.loss.batch_dice)


StepCost = Callable[[NetworkSpec, Sequence[int], int], float]


def build_candidate(
    plans: Plans,
    params: Mapping[str, Any],
    *,
    config: str | None = None,
    limits: Limits | None = None,
    step_cost: StepCost | None = None,
) -> Candidate:
    """The plan of one point of the space (``params`` as :func:`rule_params` returns them).

    Pure apart from the memory/time estimates; the rule's own parameters give back the rule configuration.
    ``step_cost(network, patch, batch)`` prices a training step for the training-length cap (default: its
    estimated FLOPs; the search passes measured seconds, since FLOPs miss e.g. the slower batch-1 convolutions of a
    CPU).
    """
    name = config or params.get("configuration")
    if name not in plans.configurations:
        raise ConfigError(f"search: configuration {name!r} not in the plan; choose one of {list(plans.configurations)}")
    limits = limits or limits_for(plans)
    c = plans.configurations[name]
    net, patch, batch, notes = _architecture(c, params, limits)
    price = step_cost or (lambda n, p, b: float(estimate_flops(n, len(plans.channels), plans.n_outputs, p, b)))
    unchanged = (net, patch, batch) == (c.network, tuple(c.patch_size), c.batch_size)
    ratio = 1.0 if unchanged else price(net, patch, batch) / price(c.network, c.patch_size, c.batch_size)
    epochs_scale = min(float(params["epochs_scale"]), 1.0 / ratio)
    if epochs_scale < params["epochs_scale"]:
        notes.append(f"training length capped at x{epochs_scale:.2f} (the rule plan's compute)")
    augmentation = (
        c.augmentation
        if patch == tuple(c.patch_size)
        else dataclasses.replace(rules.augmentation_for_patch(patch).value, device=c.augmentation.device)
    )
    configuration = dataclasses.replace(
        c,
        why=c.why + tuple(f"search: {note}" for note in notes),
        patch_size=patch,
        batch_size=batch,
        network=net,
        augmentation=dataclasses.replace(augmentation, strength=float(params["aug_strength"])),
        loss=_loss(c, params["loss"]),
        foreground_oversampling=float(params["oversampling"]),
        training=dataclasses.replace(
            c.training,
            learning_rate=float(params["learning_rate"]),
            epochs=max(1, int(round(c.training.epochs * epochs_scale))),
        ),
        estimated_memory_bytes=int(limits.budget.memory(net, patch, batch)),
    )
    effective = {
        "patch_size": list(patch),
        "batch_size": batch,
        "n_stages": net.n_stages,
        "features_per_stage": list(net.features_per_stage),
        "epochs": configuration.training.epochs,
        "epochs_scale": round(epochs_scale, 4),
        "step_cost_ratio": round(ratio, 4),
    }
    single = dataclasses.replace(plans, configurations={name: configuration})
    return Candidate(single, name, epochs_scale, effective, tuple(notes))


def sample_params(trial: Any, space: Sequence[Param]) -> dict[str, Any]:
    """Ask ``trial`` (an Optuna trial, or ``FixedTrial``) for every parameter of ``space``."""
    out: dict[str, Any] = {}
    for p in space:
        if p.kind == "categorical":
            out[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "float":
            out[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
        elif p.kind == "int":
            out[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
        else:
            raise ConfigError(f"search parameter {p.name!r}: kind {p.kind!r} must be categorical, float or int")
    return out


def sample_candidate(
    trial: Any,
    plans: Plans,
    config_name: str | None = None,
    *,
    configs: Sequence[str] | None = None,
    limits: Limits | None = None,
    step_cost: StepCost | None = None,
) -> Candidate:
    """Sample a point with ``trial`` and build its :class:`Candidate`.

    ``config_name`` fixes the configuration; otherwise the trial chooses among ``configs`` (default: every
    trainable configuration).
    """
    names = (config_name,) if config_name else tuple(configs or trainable_configurations(plans))
    params = sample_params(trial, search_space(plans, names))
    name = params.get("configuration", names[0])
    return build_candidate(plans, params, config=name, limits=limits, step_cost=step_cost)


def suggest(trial: Any, plans: Plans, config_name: str | None = None, *, limits: Limits | None = None) -> Plans:
    """Turn a trial into a plan: the returned Plans holds one configuration, the trial's, at full length.

    ``config_name`` fixes the configuration; without it the trial chooses among the trainable ones.
    """
    return sample_candidate(trial, plans, config_name, limits=limits).plans
