"""``autoseg explain``: per-class attribution maps of a prediction, in the input's geometry.

The attribution is computed in the network's preprocessed space, for one configuration's members (its folds),
and mapped back onto the input grid with :func:`~autoseg.preprocessing.preprocess.revert` (linear, outside the
crop box 0). The predicted region ``R`` of a class is the ensemble's prediction in that space (no mirroring).

- ``integrated_gradients`` / ``gradient_x_input`` (captum) attribute ``F(x) = sum over R of the class's
  sliding-window logit`` (the Gaussian-weighted mean of the tiles' logits, as prediction computes it). ``F`` is a
  sum of one term per tile, each depending on its tile's input only, so both methods are computed tile by tile and
  summed: exactly the whole-image attribution, with the memory of one tile. Integrated gradients sum to
  ``F(x) - F(baseline)``.
- ``occlusion`` (captum ``Occlusion``) replaces a window of the preprocessed image by the baseline, predicts the
  whole image again with the same sliding window, and attributes the drop of the class's mean probability over
  ``R`` to the window's voxels. Cost: one sliding-window prediction per window position.

The baseline is the preprocessed image blurred at the scale of the patch (Gaussian, sigma a quarter of the patch
per axis; Sturmfels et al. 2020), not 0: the networks instance-normalise after their first convolution, so their
output does not change when the input is scaled, and along the path from 0 (``a * x``) all of ``F``'s change would
happen in an instant near ``a = 0``, which no quadrature sees. For the same reason gradient x input sums to about
0 (Euler's theorem); its map still shows where the logit is sensitive to the intensities.

Members' maps are averaged (the ensemble's logits and probabilities are means). A 2D configuration on a 3D image
is explained slice by slice, as it predicts.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.analysis.common import analysis_config, save_figure
from autoseg.data.geometry import Geometry
from autoseg.data.io import read_images, write_image
from autoseg.errors import ConfigError
from autoseg.files import write_text_atomic
from autoseg.inference.predict import collect_inputs
from autoseg.inference.predictor import TILE_VOXELS, Predictor, probabilities_to_labels
from autoseg.inference.sliding_window import gaussian_importance, sliding_window_logits, tile_starts
from autoseg.planning.plans import Plans, load_plans
from autoseg.preprocessing.preprocess import preprocess_case, revert
from autoseg.serialization import to_jsonable

__all__ = [
    "METHODS",
    "Explanation",
    "Target",
    "attribution_map",
    "class_targets",
    "explain_case",
    "explain_path",
    "plot_overlay",
]

log = logging.getLogger(__name__)

METHODS = ("integrated_gradients", "gradient_x_input", "occlusion")

Network = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Target:
    """What is explained: output ``channel`` over the predicted ``region`` (bool, preprocessed spatial shape)."""

    channel: int
    region: np.ndarray
    sigmoid: bool = False  # region-based (sigmoid) outputs; else softmax


@dataclass(frozen=True)
class Explanation:
    """One class's attribution map and predicted region on the input grid."""

    name: str
    attribution: np.ndarray  # (Z, Y, X) float32
    region: np.ndarray  # (Z, Y, X) bool
    geometry: Geometry


def class_targets(plans: Plans) -> dict[str, tuple[int, int]]:
    """Class name -> (output channel, label value predicted for it): the foreground labels, or the regions."""
    if plans.regions:
        order = plans.region_class_order or tuple(range(1, len(plans.regions) + 1))
        return {name: (i, int(order[i])) for i, name in enumerate(plans.regions)}
    names = {v: k for k, v in plans.labels.items()}
    return {names[v]: (v, v) for v in plans.foreground_values}


def _resolve_classes(plans: Plans, classes: Sequence[str] | None) -> dict[str, tuple[int, int]]:
    targets = class_targets(plans)
    if classes is None:
        return targets
    by_value = {str(value): name for name, (_, value) in targets.items()}
    out = {}
    for c in classes:
        name = c if c in targets else by_value.get(str(c))
        if name is None:
            valid = ", ".join(f"{n} ({v})" for n, (_, v) in targets.items())
            raise ConfigError(f"--class {c}: not a class of this model; choose a name or value of: {valid}")
        out[name] = targets[name]
    return out


def _padded(array: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``array`` (C, *spatial) padded with 0 to at least ``patch``, centred as the sliding window pads it."""
    spatial = array.shape[1:]
    pad = [max(0, p - s) for p, s in zip(patch, spatial)]
    pads: list[int] = []
    for p in reversed(pad):
        pads += [p // 2, p - p // 2]
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial))
    return torch.nn.functional.pad(array, pads), crop


@dataclass(frozen=True)
class _Options:
    method: str
    n_outputs: int
    step: float
    n_steps: int
    window: Sequence[int] | None
    device: torch.device
    norm: float  # voxels of the whole region (a 2D network on a 3D case is explained slice by slice)


def _gradient_attribution(
    network: Network,
    data: np.ndarray,
    baseline: np.ndarray,
    patch: Sequence[int],
    target: Target,
    options: _Options,
) -> np.ndarray:
    """Attribution (C, *spatial) of ``F = sum over the region of the channel's sliding-window logit``, tile by tile."""
    from captum.attr import InputXGradient, IntegratedGradients

    x, crop = _padded(torch.as_tensor(data, dtype=torch.float32), patch)
    base, _ = _padded(torch.as_tensor(baseline, dtype=torch.float32), patch)
    region, _ = _padded(torch.as_tensor(target.region[None], dtype=torch.float32), patch)
    g = torch.from_numpy(gaussian_importance(patch))
    tiles = [
        tuple(slice(s, s + p) for s, p in zip(start, patch))
        for start in itertools.product(*[tile_starts(s, p, options.step) for s, p in zip(x.shape[1:], patch)])
    ]
    weights = torch.zeros(x.shape[1:])
    for sl in tiles:
        weights[sl] += g
    scale = region[0] / weights  # F = sum_tiles sum_voxels logit * g * region / weights
    attribution = torch.zeros_like(x)
    for sl in tiles:
        w = (g * scale[sl]).to(options.device)
        if not bool(w.any()):
            continue  # a tile that does not reach the region adds nothing to F

        def f(inp: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:
            return (network(inp)[:, target.channel] * w).flatten(1).sum(1)

        tile = x[(slice(None), *sl)][None].to(options.device)
        with torch.enable_grad():
            if options.method == "integrated_gradients":
                b = base[(slice(None), *sl)][None].to(options.device)
                n = options.n_steps
                a = IntegratedGradients(f).attribute(tile, baselines=b, n_steps=n, internal_batch_size=n)
            else:
                a = InputXGradient(f).attribute(tile.requires_grad_())
        attribution[(slice(None), *sl)] += a[0].detach().cpu()
    return attribution[(slice(None), *crop)].numpy()


def _occlusion_attribution(
    networks: Sequence[tuple[Network, Sequence[int]]],
    data: np.ndarray,
    baseline: np.ndarray,
    target: Target,
    options: _Options,
) -> np.ndarray:
    """Drop of the members' mean class probability, summed over the region / ``options.norm``, when a window of the
    image is replaced by the baseline (captum Occlusion; non-overlapping windows), (C, *spatial)."""
    from captum.attr import Occlusion

    region = torch.from_numpy(target.region)

    def f(batch: torch.Tensor) -> torch.Tensor:
        values = []
        for x in batch:
            total = torch.zeros(())
            for network, patch in networks:
                tiles = max(1, min(256, TILE_VOXELS[options.device.type] // int(np.prod(patch))))
                logits = sliding_window_logits(
                    network, x, patch, options.n_outputs, step=options.step, device=options.device, tile_batch=tiles
                )
                p = logits[target.channel].sigmoid() if target.sigmoid else logits.softmax(0)[target.channel]
                total += p[region].sum() / options.norm
            values.append(total / len(networks))
        return torch.stack(values)

    window = options.window or [max(1, p // 2) for p in networks[0][1]]
    shape = (data.shape[0], *(min(int(w), s) for w, s in zip(window, data.shape[1:])))
    attribution = Occlusion(f).attribute(
        torch.as_tensor(data, dtype=torch.float32)[None],
        sliding_window_shapes=shape,
        strides=shape,
        baselines=torch.as_tensor(baseline, dtype=torch.float32)[None],
    )
    return attribution[0].numpy()


def blurred_baseline(data: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """The attribution baseline: ``data`` (C, *spatial) blurred with sigma = a quarter of ``patch`` per axis."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(data, sigma=(0, *(p / 4 for p in patch)), mode="nearest").astype(np.float32)


def attribution_map(
    networks: Sequence[tuple[Network, Sequence[int]]],
    data: np.ndarray,
    target: Target,
    method: str,
    *,
    n_outputs: int,
    step: float = 0.5,
    n_steps: int = 16,
    window: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Attribution map (spatial shape of ``data``, summed over input channels) of ``target`` in the preprocessed
    space, averaged over ``networks`` ((network, patch size) pairs: one configuration's members).

    Parameters
    ----------
    data : (C, *spatial) preprocessed image; a 2D network on a (C, Z, Y, X) image is explained slice by slice.
    method : one of :data:`METHODS`.
    n_steps : integration steps of integrated gradients.
    window : occlusion window in voxels per spatial axis of the network (default: half the patch).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown attribution method {method!r}; choose from {', '.join(METHODS)}")
    options = _Options(method, n_outputs, step, n_steps, window, torch.device(device), float(target.region.sum()))
    if data.ndim - 1 == len(networks[0][1]):
        return _attribution(networks, data, target, options)
    out = np.zeros(data.shape[1:], np.float32)  # a 2D network on a 3D case
    for z in np.flatnonzero(target.region.any(axis=tuple(range(1, target.region.ndim)))):
        out[z] = _attribution(networks, data[:, z], Target(target.channel, target.region[z], target.sigmoid), options)
    return out


def _attribution(networks, data: np.ndarray, target: Target, options: _Options) -> np.ndarray:
    """:func:`attribution_map` of an image of the networks' dimensionality."""
    if not target.region.any():
        return np.zeros(data.shape[1:], np.float32)
    baseline = blurred_baseline(data, networks[0][1])
    if options.method == "occlusion":
        maps = [_occlusion_attribution(networks, data, baseline, target, options)]
    else:
        maps = [_gradient_attribution(net, data, baseline, patch, target, options) for net, patch in networks]
    return np.mean(maps, axis=0).sum(axis=0).astype(np.float32)


def explain_case(
    predictor: Predictor,
    image: np.ndarray,
    geometry: Geometry,
    *,
    method: str = "integrated_gradients",
    classes: Sequence[str] | None = None,
    config: str | None = None,
    n_steps: int = 16,
    window: Sequence[int] | None = None,
) -> list[Explanation]:
    """Attribution maps of each class (default: every foreground class) of ``predictor``'s prediction of one image
    (C, Z, Y, X) with its geometry, on the input grid. ``config``: the configuration explained (default: the first
    of the predictor's)."""
    plans = predictor.plans
    config = config or next(iter(predictor.members))
    if config not in predictor.members:
        raise ConfigError(f"configuration {config!r} is not loaded; the predictor has {', '.join(predictor.members)}")
    members = predictor.members[config]
    data, _, props = preprocess_case(image, None, geometry, plans, config)
    mean, _ = predictor._config_probabilities(data, members)
    labels = probabilities_to_labels(mean, plans)
    networks = [(m.network, m.configuration.patch_size) for m in members]
    out = []
    for name, (channel, value) in _resolve_classes(plans, classes).items():
        region = mean[channel] > 0.5 if plans.regions else labels == value
        target = Target(channel, region, bool(plans.regions))
        pre = attribution_map(
            networks,
            data,
            target,
            method,
            n_outputs=plans.n_outputs,
            step=predictor.step,
            n_steps=n_steps,
            window=window,
            device=predictor.device,
        )
        attribution = revert(pre[None], props, is_label=False, fill=[0.0])[0]
        original_region = revert(region.astype(np.uint8), props, is_label=True, order=0) > 0
        out.append(Explanation(name, attribution, original_region, geometry))
        log.info("explain %s: class %s, %d voxels predicted", method, name, int(region.sum()))
    return out


def _relevant_slice(attribution: np.ndarray) -> int:
    """The slice (first axis) holding the most absolute attribution."""
    return int(np.abs(attribution).reshape(attribution.shape[0], -1).sum(1).argmax())


def plot_overlay(image: np.ndarray, explanation: Explanation, z: int, path: Path, *, title: str = "") -> None:
    """PNG of slice ``z``: the image's first channel in grey, the signed attribution in red (positive) and blue
    (negative), opaque where it is strongest, and the predicted region's outline; pixels keep their aspect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = explanation.attribution[z]
    limit = float(np.abs(a).max()) or 1.0
    spacing = explanation.geometry.spacing_zyx
    fig, ax = plt.subplots(figsize=(6, 6 * a.shape[0] * spacing[1] / (a.shape[1] * spacing[2])), dpi=100)
    ax.imshow(image[0, z], cmap="gray", aspect=spacing[1] / spacing[2], interpolation="nearest")
    shown = ax.imshow(
        a,
        cmap="bwr",
        vmin=-limit,
        vmax=limit,
        alpha=np.clip(np.abs(a) / limit, 0, 1) * 0.8,
        aspect=spacing[1] / spacing[2],
        interpolation="nearest",
    )
    if explanation.region[z].any():
        ax.contour(explanation.region[z].astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
    fig.colorbar(shown, ax=ax, fraction=0.046, label="attribution")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    save_figure(fig, path)


def explain_path(
    run_dir: Path | str,
    inputs: Path | str,
    out_dir: Path | str,
    *,
    method: str = "integrated_gradients",
    classes: Sequence[str] | None = None,
    config: str | None = None,
    folds: Sequence[str] | None = None,
    device: str = "auto",
    n_steps: int = 16,
    window: Sequence[int] | None = None,
) -> list[Path]:
    """Explain every case under ``inputs`` (a file, folder or DICOM series) into ``out_dir``; returns the files.

    Writes ``<case>_<method>_<class>.nii.gz`` (the map on the input's grid, with its spacing, origin and
    direction), ``<case>_<method>_<class>.png`` (the slice with most attribution, or the 2D image) and
    ``explain.json`` (per case and class: the slice shown, the region's size, the attribution's sum and the share
    of positive attribution inside the region).
    """
    config = analysis_config(run_dir, load_plans(run_dir), config)
    predictor = Predictor(run_dir, configs=[config], folds=folds, device=device, mirror_mode="none")
    out_dir = Path(out_dir)
    written: list[Path] = []
    summary: dict[str, Any] = {"method": method, "cases": {}}
    for case, _ in collect_inputs(inputs, len(predictor.plans.channels)):
        image, geometry = read_images(case.images)
        explanations = explain_case(
            predictor, image, geometry, method=method, classes=classes, config=config, n_steps=n_steps, window=window
        )
        summary["cases"][case.id] = {}
        for e in explanations:
            stem = out_dir / f"{case.id}_{method}_{e.name}"
            write_image(e.attribution, geometry, stem.with_name(stem.name + ".nii.gz"))
            z = _relevant_slice(e.attribution)
            plot_overlay(image, e, z, stem.with_name(stem.name + ".png"), title=f"{case.id}: {e.name}, {method}, z={z}")
            positive = np.clip(e.attribution, 0, None)
            summary["cases"][case.id][e.name] = {
                "slice": z,
                "region_voxels": int(e.region.sum()),
                "attribution_sum": float(e.attribution.sum()),
                "positive_share_in_region": float(positive[e.region].sum() / max(positive.sum(), 1e-30)),
            }
            written += [stem.with_name(stem.name + ".nii.gz"), stem.with_name(stem.name + ".png")]
    write_text_atomic(out_dir / "explain.json", json.dumps(to_jsonable(summary), indent=2) + "\n")
    return written
