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
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from autoseg.data.dataset import Case, channel_files
from autoseg.data.geometry import Geometry
from autoseg.data.io import (
    file_ending,
    is_dicom_series,
    read_channel_count,
    read_images,
    strip_ending,
    write_image,
)
from autoseg.errors import AutosegError, DatasetError, InferenceError
from autoseg.files import atomic_path, write_text_atomic
from autoseg.inference.predictor import Predictor
from autoseg.planning.plans import Plans
from autoseg.runfolder import RunFolder
from autoseg.serialization import load_json

__all__ = ["CaseFailure", "PredictionFailed", "check_image", "collect_inputs", "predict_path"]

log = logging.getLogger(__name__)

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def collect_inputs(
    path: Path | str, n_channels: int, problems: list[CaseFailure] | None = None
) -> list[tuple[Case, str]]:
    """Cases to predict under ``path`` (a folder, one file or a DICOM series) with the ending their outputs get.

    ``<case>_XXXX`` files are one case's channel files (nnU-Net naming); a case may also be one file that holds
    every channel (RGB PNG, multi-channel TIFF), named ``<case>_0000`` or plainly ``<case>``, as in the plain
    folders ``autoseg run`` trains from. Numbered files that cannot be channel files (``img_0001`` ..
    ``img_0030`` for a 3-channel model) are cases of their own when each holds every channel.

    A case whose files do not fit the model (missing or extra channel files, a file with the wrong channel count)
    raises InferenceError, or, when ``problems`` is given, is left out and added to it.
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
        try:
            for case_id, files_of_case in _split_numbered_cases(case, channels, n_channels, path):
                try:
                    images = channel_files(
                        case_id, files_of_case, n_channels, expected=f"the model expects {n_channels} channel(s)"
                    )
                except DatasetError as exc:
                    raise InferenceError(f"{path}: {exc}") from None
                out.append((Case(case_id, images), endings[case]))
        except InferenceError as exc:
            if problems is None:
                raise
            problems.append(CaseFailure(case, tuple(str(f) for f in channels.values()), str(exc)))
    if not out and not problems:
        raise InferenceError(f"{path}: no images to predict")
    return sorted(out, key=lambda item: item[0].id)


@dataclass(frozen=True)
class CaseFailure:
    """A case that could not be predicted: its id, its input files and what was wrong."""

    case: str
    files: tuple[str, ...]
    problem: str


class PredictionFailed(InferenceError):
    """Some cases could not be predicted (the others were written); ``failures`` says which and why."""

    def __init__(self, failures: list[CaseFailure], written: list[Path]):
        self.failures, self.written = failures, written
        lines = [f"  {f.case} ({', '.join(f.files)}): {f.problem}" for f in failures]
        total = len(failures) + len(written)
        super().__init__(
            f"{len(failures)} of {total} case(s) could not be predicted ({len(written)} written):\n" + "\n".join(lines)
        )


#: An image whose spacing is this many times finer or coarser than every training image is refused (a wrong
#: header, or a scan the model never saw anything like) unless ``any_spacing`` is set.
SPACING_FACTOR = 4.0


def check_image(image: np.ndarray, geometry: Geometry, plans: Plans, spacings: np.ndarray | None) -> None:
    """Raise InferenceError when an image does not fit the model: channel count, dimensionality, NaN or infinite
    values, or (with ``spacings``, the training images' (z, y, x) spacings) a spacing far outside their range."""
    n_channels = len(plans.channels)
    if image.shape[0] != n_channels:
        raise InferenceError(
            f"{image.shape[0]} channel(s), but the model expects {n_channels} ({', '.join(plans.channels)})"
        )
    trained_2d = min(plans.original_median_shape) <= 1
    if trained_2d != geometry.is_2d and not (trained_2d and geometry.shape_zyx[0] == 1):
        kind = "2D images" if trained_2d else "3D volumes"
        raise InferenceError(
            f"a {geometry.ndim}D image of shape {geometry.shape_zyx}, but the model was trained on {kind}"
        )
    bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
    if bad:
        raise InferenceError(f"{bad} voxel(s) are NaN or infinite")
    if spacings is not None and len(spacings):
        axes = slice(1, 3) if geometry.is_2d else slice(0, 3)
        have = np.asarray(geometry.spacing_zyx, float)[axes]
        low, high = spacings.min(axis=0)[axes] / SPACING_FACTOR, spacings.max(axis=0)[axes] * SPACING_FACTOR
        if np.any(have < low) or np.any(have > high):
            raise InferenceError(
                f"spacing {tuple(round(float(v), 4) for v in have)} mm is more than {SPACING_FACTOR:g}x outside the "
                f"training images' range {tuple(round(float(v), 4) for v in spacings.min(axis=0)[axes])} .. "
                f"{tuple(round(float(v), 4) for v in spacings.max(axis=0)[axes])} mm (a wrong header?); "
                "predict it anyway with --any-spacing"
            )


def _training_spacings(run_dir: Path) -> np.ndarray | None:
    """The training images' spacings (rows), from the fingerprint or, in a model bundle, their range."""
    from autoseg.fingerprint import DataSummary, load_fingerprint

    run = RunFolder(run_dir)
    if run.fingerprint.is_file():
        return load_fingerprint(run.fingerprint).spacings
    if run.data_summary.is_file():
        summary = load_json(DataSummary, run.data_summary)
        return np.array([summary.spacing_min, summary.spacing_max], dtype=float)
    return None


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".autoseg-write-test."):
            pass
    except OSError as exc:
        raise InferenceError(f"{out_dir}: output folder is not writable ({exc.strerror or exc})") from None


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
    any_spacing: bool = False,
    engine: str = "torch",
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Predict every case under ``inputs`` into ``out_dir``; returns the label files written.

    A case that cannot be read or does not fit the model (:func:`check_image`) is reported and skipped; the others
    are predicted, and :class:`PredictionFailed` is raised at the end with the list. An output folder that cannot be
    written raises InferenceError at once, before any work. ``engine`` runs the forward passes (:class:`Predictor`).
    """
    predictor = Predictor(
        run_dir,
        configs=configs,
        folds=folds,
        device=device,
        mirror_mode=mirror_mode,
        checkpoint=checkpoint,
        precision=precision,
        engine=engine,
    )
    out_dir = Path(out_dir)
    _check_writable(out_dir)
    failures: list[CaseFailure] = []
    cases = collect_inputs(inputs, len(predictor.plans.channels), failures)
    spacings = None if any_spacing else _training_spacings(predictor.run_dir)
    written, scores = [], {}
    score_file = out_dir / "uncertainty.json"
    if uncertainty and score_file.is_file():
        scores = json.loads(score_file.read_text())
    for i, (case, ending) in enumerate(cases):
        target = out_dir / f"{case.id}{ending}"
        if skip_existing and target.is_file():
            written.append(target)
            continue
        try:
            image, geometry = read_images(case.images)
            check_image(image, geometry, predictor.plans, spacings)
        except (AutosegError, RuntimeError, OSError, ValueError) as exc:  # unreadable or unfit: the next case
            failures.append(CaseFailure(case.id, tuple(str(p) for p in case.images), _reason(exc)))
            log.error("case %s (%s): %s", case.id, ", ".join(str(p) for p in case.images), _reason(exc))
            continue
        prediction = predictor.predict(image, geometry, keep_probabilities=save_probabilities, uncertainty=uncertainty)
        try:
            if save_probabilities:
                assert prediction.probabilities is not None
                probs = prediction.probabilities.astype(np.float16)
                atomic_path(out_dir / f"{case.id}.npz", partial(np.savez_compressed, probabilities=probs))
            if uncertainty:
                assert prediction.entropy is not None
                write_image(prediction.entropy, geometry, out_dir / f"{case.id}_entropy.nii.gz")
                if prediction.disagreement is not None:
                    write_image(prediction.disagreement, geometry, out_dir / f"{case.id}_disagreement.nii.gz")
                scores[case.id] = prediction.scores
                write_text_atomic(score_file, json.dumps(scores, indent=2) + "\n")
            write_image(prediction.labels, geometry, target)  # last: its presence marks the case as done
        except OSError as exc:  # a full disk or a lost folder fails every later case too: stop here
            raise InferenceError(
                f"{target}: cannot write the prediction of case {case.id} ({exc.strerror or exc}); "
                f"{len(written)} case(s) written before it are complete, and nothing partial was left"
            ) from None
        written.append(target)
        if progress:
            progress(i + 1, len(cases))
    if failures:
        raise PredictionFailed(failures, written)
    return written


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, AutosegError) else f"cannot be read ({type(exc).__name__}: {exc})"
