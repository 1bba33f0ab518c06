"""ONNX export of a run's networks, each checked against torch before it is written.

Every member (configuration x fold) is exported in inference mode: deep supervision off, so the graph has one
output, the full-resolution logits ``(batch, classes, *spatial)`` of one input ``image`` ``(batch, channels,
*spatial)``. Batch and spatial axes are dynamic; each spatial size must be a multiple of the network's total
stride (the skip connections must line up), which the axis names (``z_multiple_of_4``) and the metadata say.

torch's TorchScript-based exporter (``dynamo=False``) is used: it exports these networks exactly and in under a
second, where the dynamo exporter took 10-20 s per small network here. Opset 17 covers every op used
(convolutions, transposed convolutions, instance/batch norm, (leaky) ReLU, GELU as Erf, Concat).

The check runs the export in onnxruntime (:class:`~autoseg.inference.engines.OnnxNetwork`, as ``autoseg predict
--engine onnxruntime`` will) and torch on random tiles of a few sizes (the patch; two patches in a batch; the
patch grown by one stride per axis) and fails when the largest absolute difference of the logits exceeds the
tolerance (1e-4 for float32). The result is written into the model's metadata beside what a runner needs
(``autoseg_onnx_format``, ``ndim``, ``in_channels``, ``n_outputs``, ``total_stride``, ``patch_size``, ...).
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoseg.errors import AutosegError, InferenceError
from autoseg.inference.engines import ONNX_FORMAT, OnnxNetwork
from autoseg.inference.predictor import Predictor
from autoseg.planning.plans import Configuration

__all__ = ["OPSET", "TOLERANCE", "OnnxCheck", "OnnxExportError", "export_network", "export_run"]

log = logging.getLogger(__name__)

OPSET = 17
#: Largest absolute logit difference between onnxruntime and torch (float32) an export may have.
TOLERANCE = 1e-4


class OnnxExportError(AutosegError):
    """A network cannot be exported to ONNX, or its export does not compute what the network computes."""


@dataclass(frozen=True)
class OnnxCheck:
    """The comparison of an export with its torch network on random tiles."""

    shapes: tuple[tuple[int, ...], ...]  # input shapes (batch, channels, *spatial) compared
    max_abs_diff: float  # over every logit of every shape
    max_abs_logit: float  # largest |logit| of torch: the scale the difference is measured against

    def to_json(self) -> dict:
        return {
            "shapes": [list(s) for s in self.shapes],
            "max_abs_diff": self.max_abs_diff,
            "max_abs_logit": self.max_abs_logit,
        }


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise OnnxExportError("ONNX export needs the onnx package: pip install 'autoseg[onnx]'") from None
    return onnx


def check_shapes(configuration: Configuration, in_channels: int) -> list[tuple[int, ...]]:
    """Input shapes an export is checked on: the patch, two patches in a batch, the patch plus one stride per axis."""
    patch = tuple(int(p) for p in configuration.patch_size)
    bigger = tuple(p + s for p, s in zip(patch, configuration.network.total_stride))
    return [(1, in_channels, *patch), (2, in_channels, *patch), (1, in_channels, *bigger)]


def _compare(network: torch.nn.Module, runner: OnnxNetwork, shapes: Sequence[tuple[int, ...]], seed: int) -> OnnxCheck:
    rng = np.random.default_rng(seed)
    diff = scale = 0.0
    for shape in shapes:
        x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        with torch.inference_mode():
            expected = network(x)
        got = runner(x)
        if got.shape != expected.shape:
            raise OnnxExportError(
                f"{runner.name}: output shape {tuple(got.shape)} for input {shape}, torch gives {tuple(expected.shape)}"
            )
        diff = max(diff, float((got - expected).abs().max()))
        scale = max(scale, float(expected.abs().max()))
    return OnnxCheck(tuple(tuple(s) for s in shapes), diff, scale)


def export_network(
    network: torch.nn.Module,
    configuration: Configuration,
    in_channels: int,
    n_outputs: int,
    *,
    metadata: dict | None = None,
    tolerance: float = TOLERANCE,
    seed: int = 0,
    name: str = "network",
) -> tuple[bytes, OnnxCheck]:
    """The ONNX model (bytes) of ``network``, a U-Net built from ``configuration``, and its check against torch.

    Parameters
    ----------
    network : the trained module; not modified (a copy is put in inference mode, deep supervision off).
    configuration : the configuration it was trained with (patch size, total stride).
    in_channels, n_outputs : its input channels and output channels (classes or regions).
    metadata : more JSON-able facts to record in the model (e.g. configuration name and fold).
    tolerance : largest allowed absolute logit difference between onnxruntime and torch.
    seed : of the random check tiles.
    name : what messages call the network.

    Raises
    ------
    OnnxExportError : the export fails, or differs from torch by more than ``tolerance``.
    """
    onnx = _import_onnx()
    network = copy.deepcopy(network).to("cpu", torch.float32).eval()
    network.deep_supervision = False  # type: ignore[assignment]  # inference mode: full-resolution logits only
    stride = configuration.network.total_stride
    axes = ("z", "y", "x")[-configuration.ndim :]
    dynamic = {0: "batch", **{i + 2: f"{a}_multiple_of_{s}" for i, (a, s) in enumerate(zip(axes, stride))}}
    example = torch.zeros(1, in_channels, *configuration.patch_size)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # the U-Net's input-size check is traced as a constant (as it should be), and instance norm is exported with
        # input statistics (which is what it computes): the exporter's warnings about both are noise
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                network,
                (example,),
                Path(tmp) / "network.onnx",
                dynamo=False,
                opset_version=OPSET,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": dynamic, "logits": dynamic},
            )
        except Exception as exc:  # the exporter raises many types; say which network failed
            raise OnnxExportError(f"{name}: torch.onnx.export failed ({type(exc).__name__}: {exc})") from exc
        model = onnx.load(Path(tmp) / "network.onnx")
    facts = {
        "autoseg_onnx_format": ONNX_FORMAT,
        "ndim": configuration.ndim,
        "in_channels": in_channels,
        "n_outputs": n_outputs,
        "total_stride": list(stride),
        "spatial_sizes": f"each a multiple of total_stride {list(stride)} (z, y, x order of the preprocessed image)",
        "patch_size": list(configuration.patch_size),
        "mirror_axes": list(configuration.augmentation.mirror_axes),
        "outputs": "logits of the full-resolution output (deep supervision off)",
        "opset": OPSET,
        "exporter": f"torch {torch.__version__} (TorchScript-based, dynamo=False)",
        **(metadata or {}),
    }
    props = {k: json.dumps(v) for k, v in facts.items()}
    onnx.helper.set_model_props(model, props)
    runner = OnnxNetwork(model.SerializeToString(), name=name)
    check = _compare(network, runner, check_shapes(configuration, in_channels), seed)
    if not check.max_abs_diff <= tolerance:
        raise OnnxExportError(
            f"{name}: the ONNX export differs from torch by up to {check.max_abs_diff:.3g} (logits up to "
            f"{check.max_abs_logit:.3g}) on random tiles {list(check.shapes)}; the tolerance is {tolerance:g}"
        )
    onnx.helper.set_model_props(model, {**props, "check": json.dumps(check.to_json())})
    return model.SerializeToString(), check


def export_run(
    run_dir: Path | str, configs: Sequence[str], folds: Sequence[str] | None = None, **options
) -> dict[tuple[str, str], tuple[bytes, OnnxCheck]]:
    """Every member (``(config, fold)``) of ``configs`` exported by :func:`export_network` (``options``), each
    rebuilt from its final checkpoint as prediction rebuilds it; ``folds`` default to every trained fold."""
    predictor = Predictor(run_dir, configs=configs, folds=folds, device="cpu", precision="fp32", mirror_mode="none")
    plans = predictor.plans
    out = {}
    groups = dict(predictor.members)
    for stage in predictor.previous.values():  # a cascade's previous stage predicts first: exported with it
        groups |= stage.members
    for config, members in groups.items():
        for member in members:
            if not isinstance(member.network, torch.nn.Module):
                raise InferenceError(f"{run_dir}: {config} fold {member.fold} is not a torch network")
            name = f"{config} fold {member.fold}"
            data, check = export_network(
                member.network,
                member.configuration,
                plans.input_channels(member.configuration),
                plans.n_outputs,
                metadata={"configuration": config, "fold": member.fold},
                name=name,
                **options,
            )
            log.info(
                "%s: ONNX export matches torch within %.2g (logits up to %.3g)",
                name,
                check.max_abs_diff,
                check.max_abs_logit,
            )
            out[config, member.fold] = data, check
    return out
