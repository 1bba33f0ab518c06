"""Forward-pass engines of prediction: the torch network itself, or its ONNX export run by onnxruntime.

:class:`OnnxNetwork` behaves like the network for the sliding window (a (B, C, *spatial) float32 tensor in,
(B, K, *spatial) logits out), so prediction with onnxruntime goes through exactly the same sliding window,
mirroring, ensembling, postprocessing and geometry code as with torch. ONNX files are written by
:mod:`autoseg.export.onnx`, which records in the model's metadata (keys below) what a network needs to be run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from autoseg.errors import InferenceError

__all__ = ["ENGINES", "ONNX_FORMAT", "OnnxNetwork", "import_onnxruntime"]

#: ``autoseg predict --engine`` choices.
ENGINES = ("torch", "onnxruntime")
#: Version of the metadata :mod:`autoseg.export.onnx` writes into each ONNX file (key ``autoseg_onnx_format``).
ONNX_FORMAT = 1
#: Metadata keys every autoseg ONNX export carries (values are JSON).
REQUIRED_METADATA = ("autoseg_onnx_format", "ndim", "in_channels", "n_outputs", "total_stride")


def import_onnxruntime():
    """The onnxruntime module, or InferenceError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise InferenceError(
            "the onnxruntime engine needs the onnxruntime package: pip install 'autoseg[onnx]' (or use --engine torch)"
        ) from None
    return onnxruntime


class OnnxNetwork:
    """An autoseg ONNX export (a file, or its bytes) in an onnxruntime CPU session, called like the network.

    Parameters
    ----------
    model : path of a ``.onnx`` file written by :mod:`autoseg.export.onnx`, or its bytes.
    threads : intra-op threads of the session (default: torch's, ``torch.get_num_threads()``, so that both engines
        use the same cores).
    name : what error messages call the model (default: the path).
    """

    def __init__(self, model: Path | str | bytes, *, threads: int | None = None, name: str | None = None):
        ort = import_onnxruntime()
        self.name = name or (str(model) if not isinstance(model, bytes) else "ONNX model")
        if not isinstance(model, bytes) and not Path(model).is_file():
            raise InferenceError(
                f"{self.name}: ONNX file not found; export the model with `autoseg export RUN --onnx -o "
                "MODEL.autoseg` and predict with `-m MODEL.autoseg`"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            source = model if isinstance(model, bytes) else str(model)
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid models
            raise InferenceError(f"{self.name}: onnxruntime cannot load it as an ONNX model ({exc})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise InferenceError(
                f"{self.name}: not an autoseg ONNX export (metadata {missing} missing); export the run with "
                "`autoseg export RUN --onnx -o MODEL.autoseg`"
            )
        try:
            self.metadata = {k: json.loads(meta[k]) for k in REQUIRED_METADATA}
        except ValueError as exc:
            raise InferenceError(f"{self.name}: unreadable autoseg metadata ({exc}); export the run again") from None
        if self.metadata["autoseg_onnx_format"] != ONNX_FORMAT:
            raise InferenceError(
                f"{self.name}: autoseg ONNX format {self.metadata['autoseg_onnx_format']!r}; this autoseg reads "
                f"{ONNX_FORMAT}: export the run again"
            )
        self.ndim, self.in_channels = int(self.metadata["ndim"]), int(self.metadata["in_channels"])
        self.n_outputs = int(self.metadata["n_outputs"])
        self.total_stride = tuple(int(s) for s in self.metadata["total_stride"])
        self._input = self.session.get_inputs()[0].name

    def check_fits(self, *, ndim: int, in_channels: int, n_outputs: int) -> None:
        """InferenceError unless this export is a network of ``ndim`` spatial dims and these channel counts."""
        have, want = (self.ndim, self.in_channels, self.n_outputs), (ndim, in_channels, n_outputs)
        if have != want:
            raise InferenceError(
                f"{self.name}: a {have[0]}D network of {have[1]} input and {have[2]} output channel(s), but the model "
                f"needs {want[0]}D, {want[1]} and {want[2]}: the ONNX file belongs to another model; export it again"
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, *spatial) of a float32 batch (B, C, *spatial) on the CPU; spatial sizes must be multiples of
        :attr:`total_stride`."""
        spatial = tuple(x.shape[2:])
        if (
            x.shape[1] != self.in_channels
            or len(spatial) != self.ndim
            or any(n % t for n, t in zip(spatial, self.total_stride))
        ):
            raise InferenceError(
                f"{self.name}: input of shape {tuple(x.shape)} does not fit: {self.in_channels} channel(s) and "
                f"{self.ndim} spatial sizes, each a multiple of the total stride {self.total_stride}"
            )
        batch = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        (logits,) = self.session.run(None, {self._input: batch})
        return torch.from_numpy(logits)
