"""Prediction of whole cases in their original geometry, by one model or an ensemble of folds/configurations.

For each configuration the case is preprocessed as in training, every fold's network predicts it with the
sliding window, and the folds' probabilities are averaged in that configuration's space. Each fold (a member) is
rebuilt from the configuration stored in its checkpoint, the one it was trained with (``autoseg train --set``
overrides included): network, patch size and mirror axes come from there, not from ``plans.json``. The mean is mapped
back onto the original grid one class channel at a time into a single (K, Z, Y, X) accumulator, where the
configurations are averaged, so at most one full-resolution float array per class is alive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autoseg.data.geometry import Geometry
from autoseg.devices import inference_dtype, resolve_device
from autoseg.errors import ConfigError, InferenceError
from autoseg.inference.engines import ENGINES, OnnxNetwork
from autoseg.inference.postprocessing import PostprocessingSpec, apply_postprocessing
from autoseg.inference.selection import load_selection
from autoseg.inference.sliding_window import sliding_window_logits, sliding_window_rows
from autoseg.inference.streaming import can_stream, labels_from_bands, mean_bands, paint_labels
from autoseg.inference.uncertainty import load_calibration, uncertainty_maps
from autoseg.networks.builder import build_network
from autoseg.planning.plans import Configuration, Plans, load_plans
from autoseg.preprocessing.preprocess import preprocess_case, revert
from autoseg.preprocessing.store import CaseProperties
from autoseg.runfolder import RunFolder, fold_dir
from autoseg.serialization import from_jsonable
from autoseg.training.cascade import one_hot
from autoseg.training.checkpoint import config_from_checkpoint, load_checkpoint

__all__ = [
    "Member",
    "Prediction",
    "Predictor",
    "member_configuration",
    "probabilities_to_labels",
    "trained_folds",
]

log = logging.getLogger(__name__)

#: Input voxels per forward pass of the sliding window, by device type.
TILE_VOXELS = {"cpu": 2**20, "cuda": 2**22}


@dataclass
class Prediction:
    """A case's prediction on its original grid."""

    labels: np.ndarray  # (Z, Y, X) integer
    geometry: Geometry
    probabilities: np.ndarray | None = None  # (K, Z, Y, X) float32, when kept
    entropy: np.ndarray | None = None  # (Z, Y, X) normalised to [0, 1]
    disagreement: np.ndarray | None = None  # (Z, Y, X) share of members whose label differs from the ensemble
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Member:
    """One trained network of an ensemble, with the configuration it was trained with; ``network`` is the torch
    module, or an :class:`~autoseg.inference.engines.OnnxNetwork` (logits of a batch, like the module)."""

    fold: str
    configuration: Configuration
    network: Callable[[torch.Tensor], torch.Tensor]


def member_configuration(state: dict, plans: Plans, config: str, path: Path) -> Configuration:
    """The configuration checkpoint ``state`` (read from ``path``) was trained with.

    Checkpoints written before the configuration was stored fall back to ``plans.json``'s, with a warning: they
    are rebuilt correctly only if the plan has not changed since and training had no ``--set`` overrides.
    """
    if "configuration" not in state:
        log.warning(
            "%s: the checkpoint does not record its configuration (an old checkpoint); rebuilding the network from "
            "plans.json's %r, which is right only if it was trained without --set overrides",
            path,
            config,
        )
        return plans.configurations[config]
    try:
        return from_jsonable(Configuration, config_from_checkpoint(state), where=f"{path}: configuration")
    except (ConfigError, ValueError) as exc:
        raise InferenceError(f"{path}: cannot read the configuration it was trained with ({exc})") from None


def trained_folds(run_dir: Path, config: str, checkpoint: str = "final") -> list[str]:
    """Folds of ``config`` that have ``checkpoint_<checkpoint>.pt`` (cross-validation folds before 'all')."""
    root = RunFolder(run_dir).models / config
    folds = [p.name[5:] for p in sorted(root.glob("fold_*")) if (p / f"checkpoint_{checkpoint}.pt").is_file()]
    return sorted(folds, key=lambda f: (f == "all", f))


def _to_probabilities_(logits: torch.Tensor, *, regions: bool, temperature: float = 1.0) -> torch.Tensor:
    """Softmax over channels (sigmoid for regions) of ``logits / temperature``, in place: no second full-size
    array."""
    if temperature != 1.0:
        logits /= temperature
    if regions:
        return logits.sigmoid_()
    logits -= logits.max(0, keepdim=True).values
    logits.exp_()
    logits /= logits.sum(0, keepdim=True)
    return logits


def _region_order(plans: Plans) -> tuple[int, ...] | None:
    """The label painted for each sigmoid output, in painting order; None for softmax outputs."""
    if not plans.regions:
        return None
    return plans.region_class_order or tuple(range(1, len(plans.regions) + 1))


def _label_dtype(plans: Plans) -> np.dtype:
    return np.dtype(np.uint8 if plans.regions or plans.n_outputs <= 256 else np.int16)


def probabilities_to_labels(probabilities: np.ndarray, plans: Plans) -> np.ndarray:
    """Arg-max of softmax probabilities, or region order for sigmoid (region-based) outputs."""
    order = _region_order(plans)
    if order is None:
        return probabilities.argmax(0).astype(_label_dtype(plans))
    labels = np.zeros(probabilities.shape[1:], np.uint8)
    for channel, value in enumerate(order):
        labels[probabilities[channel] > 0.5] = value
    return labels


class Predictor:
    """Networks of a run folder, loaded once, predicting case after case.

    Parameters
    ----------
    run_dir : the run folder (needs plans.json and models/).
    configs : configurations to ensemble (default: the selection in selection.json, else every trained one).
    folds : folds to ensemble (default: every fold with a final checkpoint).
    mirror_mode : ``all`` (every flip combination), ``single`` (one flip per axis), ``none``, or ``auto``: ``all`` on
        a GPU, ``single`` on a CPU, where every pass is expensive (k + 1 instead of 2^k passes in 3D: 4 vs 8).
    precision : forward-pass precision, see :func:`inference_dtype`.
    engine : ``torch``, or ``onnxruntime``: each member's ``network.onnx`` (``autoseg export --onnx``) computes the
        forward passes, in float32 on the CPU, with as many threads as torch; everything else is the same.
    temperatures : logits / T before the softmax, by configuration (default: ``RUN/calibration.json``, written by
        ``autoseg analyze calibration``; T = 1 where it has none). ``{}`` predicts uncalibrated.
    """

    def __init__(
        self,
        run_dir: Path | str,
        *,
        configs: Sequence[str] | None = None,
        folds: Sequence[str] | None = None,
        device: str = "auto",
        mirror_mode: str = "auto",
        step: float = 0.5,
        checkpoint: str = "final",
        tile_batch: int | None = None,
        postprocessing: PostprocessingSpec | None = None,
        plans: Plans | None = None,
        precision: str = "auto",
        engine: str = "torch",
        temperatures: Mapping[str, float] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.plans = plans or load_plans(self.run_dir)
        self.engine = engine
        if engine not in ENGINES:
            raise InferenceError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
        if engine == "onnxruntime":
            _check_onnx_options(device, precision, checkpoint)
            device, precision = "cpu", "fp32"
        self.temperatures = dict(load_calibration(self.run_dir).temperatures if temperatures is None else temperatures)
        self.device = resolve_device(device)
        if mirror_mode == "auto":
            mirror_mode = "all" if self.device.type == "cuda" else "single"
        self.mirror_mode, self.step = mirror_mode, step
        self.autocast = inference_dtype(precision, self.device)
        selection = load_selection(self.run_dir) if configs is None else None
        if selection is not None:
            configs = list(selection.configurations)
            if postprocessing is None:
                postprocessing = selection.postprocessing
        configs = list(configs or [c for c in self.plans.configurations if trained_folds(self.run_dir, c, checkpoint)])
        if not configs:
            raise InferenceError(
                f"{self.run_dir}: no trained model found (models/<config>/fold_*/"
                f"checkpoint_{checkpoint}.pt); run `autoseg train` first"
            )
        self.postprocessing = postprocessing
        self.members: dict[str, list[Member]] = {}
        for config in configs:
            if config not in self.plans.configurations:
                raise InferenceError(
                    f"configuration {config!r} not in the plan; available: {', '.join(self.plans.configurations)}"
                )
            use = [str(f) for f in folds] if folds is not None else trained_folds(self.run_dir, config, checkpoint)
            if not use:
                raise InferenceError(f"{self.run_dir}/models/{config}: no fold with checkpoint_{checkpoint}.pt")
            self.members[config] = [self._load(config, f, checkpoint) for f in use]
        # a cascade stage's input includes its previous stage's prediction: an ensemble of that stage's folds
        self.previous: dict[str, Predictor] = {}
        for config in self.members:
            stage = self.plans.configurations[config].previous_stage
            if stage:
                self.previous[config] = Predictor(
                    self.run_dir,
                    configs=[stage],
                    device=device,
                    mirror_mode=mirror_mode,
                    step=step,
                    checkpoint=checkpoint,
                    tile_batch=tile_batch,
                    postprocessing=None,
                    plans=self.plans,
                    precision=precision,
                    engine=engine,
                )
        self.tile_batch = tile_batch
        n = sum(len(m) for m in self.members.values())
        dtype = str(self.autocast or torch.float32).removeprefix("torch.")
        log.info(
            "predictor: %s, %d model(s) on %s (%s), mirroring %s, %s",
            ", ".join(self.members),
            n,
            self.device,
            engine,
            mirror_mode,
            dtype,
        )

    def _load(self, config: str, fold: str, checkpoint: str) -> Member:
        path = fold_dir(self.run_dir, config, fold) / f"checkpoint_{checkpoint}.pt"
        if not path.is_file():
            raise InferenceError(f"{path}: checkpoint missing; train fold {fold} of {config} first")
        state = load_checkpoint(path)
        c = member_configuration(state, self.plans, config, path)
        if self.engine == "onnxruntime":
            onnx = OnnxNetwork(RunFolder(self.run_dir).onnx_network(config, fold))
            onnx.check_fits(ndim=c.ndim, in_channels=self.plans.input_channels(c), n_outputs=self.plans.n_outputs)
            return Member(fold, c, onnx)
        network = build_network(c.network, self.plans.input_channels(c), self.plans.n_outputs)
        try:
            network.load_state_dict(state["network"])
        except RuntimeError as exc:
            raise InferenceError(
                f"{path}: the weights do not fit the network of its configuration ({exc}); the checkpoint and its "
                "configuration disagree, retrain the fold"
            ) from None
        network.deep_supervision = False
        return Member(fold, c, network.to(self.device).eval())

    def _config_probabilities(self, data: np.ndarray, members: list[Member]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Mean probabilities (K, *spatial) of the members in the preprocessed space, and each member's arg-max.

        Patch size, mirror axes and dimensionality are each member's own (from its checkpoint).
        """
        mean: np.ndarray | None = None
        member_labels: list[np.ndarray] = []
        for member in members:
            c = member.configuration

            def window(volume: np.ndarray, c=c, network=member.network) -> torch.Tensor:
                return sliding_window_logits(network, volume, c.patch_size, self.plans.n_outputs, **self._window(c))

            if c.ndim == 2 and data.ndim == 4:  # 2D network on a 3D case: slice by slice
                logits = torch.stack([window(data[:, z]) for z in range(data.shape[1])], dim=1)
            else:
                logits = window(data)
            temperature = self.temperatures.get(c.name, 1.0)
            probs = _to_probabilities_(logits, regions=bool(self.plans.regions), temperature=temperature).numpy()
            member_labels.append(probabilities_to_labels(probs, self.plans))
            if mean is None:
                mean = probs
            else:
                mean += probs
            del logits, probs
        assert mean is not None  # a configuration has at least one member
        mean /= len(members)
        return mean, member_labels

    def _window(self, c: Configuration) -> dict:
        """Sliding-window options for a member of configuration ``c``: its patch's tiles per forward pass (about
        TILE_VOXELS input voxels; small patches are batched many at a time) and mirror axes."""
        tiles = self.tile_batch or max(1, min(256, TILE_VOXELS[self.device.type] // int(np.prod(c.patch_size))))
        return {
            "step": self.step,
            "mirror_axes": tuple(c.augmentation.mirror_axes),
            "mirror_mode": self.mirror_mode,
            "tile_batch": tiles,
            "device": self.device,
            "autocast_dtype": self.autocast,
        }

    def _can_stream(self, data: np.ndarray, props: CaseProperties, members: list[Member]) -> bool:
        """Labels only from one configuration of 3D members with one patch size: predicted band by band."""
        configs = [m.configuration for m in members]
        return (
            len(self.members) == 1
            and all(c.ndim == data.ndim - 1 and c.patch_size == configs[0].patch_size for c in configs)
            and can_stream(props)
        )

    def _labels_streamed(self, data: np.ndarray, props: CaseProperties, members: list[Member]) -> np.ndarray:
        """:meth:`_labels_class_by_class`'s labels, streamed along the first axis (:mod:`.streaming`)."""
        regions = bool(self.plans.regions)

        def bands(member: Member):
            c = member.configuration
            temperature = self.temperatures.get(c.name, 1.0)
            for first, logits in sliding_window_rows(
                member.network, data, c.patch_size, self.plans.n_outputs, **self._window(c)
            ):
                yield first, _to_probabilities_(logits, regions=regions, temperature=temperature).numpy()

        streams = mean_bands([bands(m) for m in members])
        return labels_from_bands(streams, props, region_order=_region_order(self.plans), dtype=_label_dtype(self.plans))

    def _inputs(
        self, image: np.ndarray, geometry: Geometry, config: str, previous: np.ndarray | None
    ) -> tuple[np.ndarray, CaseProperties]:
        """The network input of ``config`` for a case: preprocessed image channels, and for a cascade stage the previous
        stage's labels (``previous`` on the original grid, else predicted here) one-hot on the same grid."""
        if config not in self.previous:
            data, _, props = preprocess_case(image, None, geometry, self.plans, config)
            return data, props
        if previous is None:
            previous = self.previous[config].predict(image, geometry).labels
        data, grid, props = preprocess_case(image, previous, geometry, self.plans, config)
        assert grid is not None
        return np.concatenate([data, one_hot(grid[0], self.plans.foreground_values)]), props

    def predict(
        self,
        image: np.ndarray,
        geometry: Geometry,
        *,
        keep_probabilities: bool = False,
        uncertainty: bool = False,
        previous_stage: np.ndarray | None = None,
    ) -> Prediction:
        """Predict one case given as read: image (C, Z, Y, X) and its geometry.

        ``previous_stage``: for a cascade stage, the previous stage's labels on the original grid (the out-of-fold
        prediction when validating); by default the previous stage's folds predict them.
        """
        if image.shape[0] != len(self.plans.channels):
            raise InferenceError(
                f"image has {image.shape[0]} channel(s); the model expects "
                f"{len(self.plans.channels)} ({', '.join(self.plans.channels)})"
            )
        k = self.plans.n_outputs
        fill = [0.0] * k if self.plans.regions else [1.0] + [0.0] * (k - 1)
        means: list[tuple[np.ndarray, CaseProperties]] = []  # per configuration, in its preprocessed space
        member_maps: list[np.ndarray] = []
        labels: np.ndarray | None = None
        for config, members in self.members.items():
            data, props = self._inputs(image, geometry, config, previous_stage)
            if not (keep_probabilities or uncertainty) and self._can_stream(data, props, members):
                labels = self._labels_streamed(data, props, members)
                break
            mean, member_labels = self._config_probabilities(data, members)
            means.append((mean, props))
            if uncertainty and sum(len(m) for m in self.members.values()) > 1:
                member_maps += [revert(lab, props, is_label=True, order=0) for lab in member_labels]
        total: np.ndarray | None = None
        if keep_probabilities or uncertainty:
            total = _class_probabilities(means, list(range(k)), fill)
            labels = probabilities_to_labels(total, self.plans)
        elif labels is None:  # labels only: one class at a time at full resolution, never classes x the whole image
            labels = self._labels_class_by_class(means, fill)
        if self.postprocessing is not None:
            labels = apply_postprocessing(labels, self.postprocessing, geometry.voxel_volume_mm3)
        result = Prediction(labels=labels, geometry=geometry)
        if uncertainty:
            assert total is not None
            result.entropy, result.disagreement, result.scores = uncertainty_maps(
                total, labels, member_maps, bool(self.plans.regions)
            )
        if keep_probabilities:
            result.probabilities = total
        return result

    def _labels_class_by_class(self, means: list[tuple[np.ndarray, CaseProperties]], fill: list[float]) -> np.ndarray:
        """The labels :func:`probabilities_to_labels` gives for the whole probability map, computed from one class's
        full-resolution probabilities at a time (a running arg-max, first class kept on ties as ``argmax`` does;
        regions painted in their order): memory of a few full-resolution maps whatever the number of classes."""
        labels = np.zeros(means[0][1].geometry.shape_zyx, _label_dtype(self.plans))
        paint_labels(
            labels,
            lambda c: _class_probabilities(means, [c], fill)[0],
            self.plans.n_outputs,
            _region_order(self.plans),
        )
        return labels


def _check_onnx_options(device: str, precision: str, checkpoint: str) -> None:
    """InferenceError for options the onnxruntime engine cannot honour (it runs the final networks' float32 export
    on the CPU)."""
    if device not in ("auto", "cpu"):
        raise InferenceError(f"--engine onnxruntime runs on the CPU; use --device cpu, or --engine torch for {device}")
    if precision not in ("auto", "fp32"):
        raise InferenceError(f"--engine onnxruntime runs the float32 export; use --precision fp32 (not {precision})")
    if checkpoint != "final":
        raise InferenceError(
            f"--engine onnxruntime runs the exported final networks; --checkpoint {checkpoint} needs --engine torch"
        )


def _class_probabilities(
    means: list[tuple[np.ndarray, CaseProperties]], channels: list[int], fill: list[float]
) -> np.ndarray:
    """Mean over configurations of the ``channels`` of each configuration's probabilities, on the original grid."""
    total = None
    for mean, props in means:
        part = revert(mean[channels], props, is_label=False, fill=[fill[c] for c in channels])
        if total is None:
            total = part
        else:
            total += part
    assert total is not None
    total /= len(means)
    return total
