"""``autoseg predict``: label files for a folder, a file or a DICOM series, in the inputs' exact geometry.

Inputs are named like the training images: ``<case>_0000<ending>`` (one file per channel, or one file that
holds every channel, such as an RGB PNG), or plain ``<case><ending>`` for single-channel models and for files
that hold every channel; a DICOM series folder is one case. Outputs are ``<case><ending>``
(NIfTI for DICOM input). ``--uncertainty`` adds ``<case>_entropy.nii.gz`` (and ``<case>_disagreement.nii.gz``
for ensembles) and ``uncertainty.json`` with per-case scores; ``--save-probabilities`` adds ``<case>.npz``.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from autoseg.data.dataset import Case, channel_files
from autoseg.data.io import (
    file_ending,
    is_dicom_series,
    read_channel_count,
    read_images,
    strip_ending,
    write_image,
)
from autoseg.errors import DatasetError, InferenceError
from autoseg.files import atomic_path, write_text_atomic
from autoseg.inference.predictor import Predictor

__all__ = ["collect_inputs", "predict_path"]

log = logging.getLogger(__name__)

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def collect_inputs(path: Path | str, n_channels: int) -> list[tuple[Case, str]]:
    """Cases to predict under ``path`` (a folder, one file or a DICOM series) with the ending their outputs get.

    ``<case>_XXXX`` files are one case's channel files (nnU-Net naming); a case may also be one file that holds
    every channel (RGB PNG, multi-channel TIFF), named ``<case>_0000`` or plainly ``<case>``, as in the plain
    folders ``autoseg run`` trains from. Numbered files that cannot be channel files (``img_0001`` ..
    ``img_0030`` for a 3-channel model) are cases of their own when each holds every channel.
    """
    path = Path(path)
    if not path.exists():
        raise InferenceError(f"{path}: input not found")
    if path.is_dir() and is_dicom_series(path):
        return [(Case(path.name, (path,)), ".nii.gz")]
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if not p.name.startswith("."))
    grouped: dict[str, dict[int, Path]] = defaultdict(dict)
    endings: dict[str, str] = {}
    out: list[tuple[Case, str]] = []
    for f in files:
        if f.is_dir():
            if is_dicom_series(f):
                out.append((Case(f.name, (f,)), ".nii.gz"))
            continue
        ending = file_ending(f)
        if not ending:
            continue
        stem = strip_ending(f)
        m = _CHANNEL.match(stem)
        case, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
        grouped[case][channel] = f
        endings[case] = ending
        if path.is_file() and m and n_channels > 1 and _channel_count(f, path) < n_channels:
            for c in range(n_channels):  # one channel file given: gather its siblings
                sibling = f.with_name(f"{case}_{c:04d}{ending}")
                if sibling.exists():
                    grouped[case][c] = sibling
    for case, channels in sorted(grouped.items()):
        for case_id, files_of_case in _split_numbered_cases(case, channels, n_channels, path):
            try:
                images = channel_files(
                    case_id, files_of_case, n_channels, expected=f"the model expects {n_channels} channel(s)"
                )
            except DatasetError as exc:
                raise InferenceError(f"{path}: {exc}") from None
            out.append((Case(case_id, images), endings[case]))
    if not out:
        raise InferenceError(f"{path}: no images to predict")
    return sorted(out, key=lambda item: item[0].id)


def _channel_count(f: Path, path: Path) -> int:
    try:
        return read_channel_count(f)
    except DatasetError as exc:
        raise InferenceError(f"{path}: {exc}") from None


def _split_numbered_cases(
    case: str, files: dict[int, Path], n_channels: int, path: Path
) -> list[tuple[str, dict[int, Path]]]:
    """``[(case, files)]`` when ``files`` (by channel number) can be the channel files of ``case``, else one case
    per file named after its full stem, provided each file holds all ``n_channels``.

    Raises InferenceError for channel files numbered beyond ``n_channels``.
    """
    numbers = sorted(files)
    if numbers == list(range(len(numbers))) and len(numbers) <= n_channels:
        return [(case, files)]
    if all(_channel_count(f, path) == n_channels for f in files.values()):
        return [(strip_ending(f), {0: f}) for f in files.values()]
    beyond = [files[c].name for c in numbers if c >= n_channels]
    if beyond:
        raise InferenceError(
            f"{path}: case {case}: channel file(s) {', '.join(beyond)} beyond the {n_channels} channel(s) the model "
            "expects; is this the right model?"
        )
    return [(case, files)]  # a channel file is missing: channel_files names it


def predict_path(
    run_dir: Path | str,
    inputs: Path | str,
    out_dir: Path | str,
    *,
    configs: Sequence[str] | None = None,
    folds: Sequence[str] | None = None,
    device: str = "auto",
    mirror_mode: str = "auto",
    save_probabilities: bool = False,
    uncertainty: bool = False,
    skip_existing: bool = False,
    checkpoint: str = "final",
    precision: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Predict every case under ``inputs`` into ``out_dir``; returns the label files written."""
    out_dir = Path(out_dir)
    predictor = Predictor(
        run_dir,
        configs=configs,
        folds=folds,
        device=device,
        mirror_mode=mirror_mode,
        checkpoint=checkpoint,
        precision=precision,
    )
    n_channels = len(predictor.plans.channels)
    cases = collect_inputs(inputs, n_channels)
    written, scores = [], {}
    score_file = out_dir / "uncertainty.json"
    if uncertainty and score_file.is_file():
        scores = json.loads(score_file.read_text())
    for i, (case, ending) in enumerate(cases):
        target = out_dir / f"{case.id}{ending}"
        if skip_existing and target.is_file():
            written.append(target)
            continue
        image, geometry = read_images(case.images)
        if image.shape[0] != n_channels:
            raise InferenceError(
                f"case {case.id} ({', '.join(str(p) for p in case.images)}): {image.shape[0]} channel(s), but the "
                f"model expects {n_channels} ({', '.join(predictor.plans.channels)})"
            )
        prediction = predictor.predict(image, geometry, keep_probabilities=save_probabilities, uncertainty=uncertainty)
        if save_probabilities:
            probs = prediction.probabilities.astype(np.float16)
            atomic_path(out_dir / f"{case.id}.npz", lambda tmp, p=probs: np.savez_compressed(tmp, probabilities=p))
        if uncertainty:
            write_image(prediction.entropy, geometry, out_dir / f"{case.id}_entropy.nii.gz")
            if prediction.disagreement is not None:
                write_image(prediction.disagreement, geometry, out_dir / f"{case.id}_disagreement.nii.gz")
            scores[case.id] = prediction.scores
            write_text_atomic(score_file, json.dumps(scores, indent=2) + "\n")
        write_image(prediction.labels, geometry, target)  # last: its presence marks the case as done
        written.append(target)
        if progress:
            progress(i + 1, len(cases))
    return written
