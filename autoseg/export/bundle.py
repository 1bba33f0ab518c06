"""The model bundle: one file that predicts anywhere, without the run folder it came from.

``MODEL.autoseg`` is a zip archive laid out as a small run folder, so the predictor reads it as it reads a run::

    manifest.json                         format, autoseg version, members, labels, sha256 and size of every file
    plans.json                            the plan (its search section, which names study files, left out)
    selection.json                        the ensemble to use and its postprocessing
    training_data.json                    the fingerprint's dataset-level summary (DataSummary: no case ids)
    models/<config>/fold_<k>/checkpoint_final.pt   weights and the configuration they were trained with, nothing else
    models/<config>/fold_<k>/network.onnx          with ``onnx=True``: the network for onnxruntime (:mod:`.onnx`)

No patient data goes in: no case ids, file paths, images or per-case facts (the fingerprint, splits, validation
predictions, logs and optimiser states stay in the run folder). :func:`open_bundle` checks every file against the
manifest and unpacks the bundle once into a cache folder named by its checksum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from autoseg.errors import ConfigError, InferenceError
from autoseg.export import onnx as onnx_export
from autoseg.files import atomic_path
from autoseg.fingerprint import DataSummary, load_fingerprint
from autoseg.inference.predictor import trained_folds
from autoseg.inference.selection import Selection, load_selection
from autoseg.planning.plans import load_plans
from autoseg.runfolder import RunFolder
from autoseg.serialization import to_jsonable
from autoseg.training.checkpoint import load_checkpoint

__all__ = ["BUNDLE_FORMAT", "export_bundle", "open_bundle", "model_folder", "read_manifest"]

BUNDLE_FORMAT = 1
#: Environment variable naming the folder bundles are unpacked into (default ``~/.cache/autoseg/bundles``).
CACHE_ENV = "AUTOSEG_CACHE"


def _json(obj: object) -> bytes:
    return (json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n").encode()


def _weights(path: Path) -> bytes:
    """A checkpoint reduced to its weights and configuration (no optimiser, history or random state)."""
    state = load_checkpoint(path)
    if "configuration" not in state:
        raise ConfigError(f"{path}: an old checkpoint without its configuration cannot be exported; retrain the fold")
    buffer = io.BytesIO()
    torch.save({"network": state["network"], "configuration": state["configuration"]}, buffer)
    return buffer.getvalue()


def _members(run: RunFolder, configs: Sequence[str], folds: Sequence[str] | None) -> dict[str, list[str]]:
    members = {}
    for config in configs:
        have = trained_folds(run.root, config)
        use = [str(f) for f in folds] if folds is not None else have
        missing = [f for f in use if f not in have]
        if missing or not use:
            raise ConfigError(
                f"{run.models / config}: no final checkpoint for fold(s) {missing or 'any'}; trained: {have or 'none'}"
            )
        members[config] = use
    return members


def export_bundle(
    run_dir: Path | str,
    out: Path | str,
    *,
    configs: Sequence[str] | None = None,
    folds: Sequence[str] | None = None,
    onnx: bool = False,
) -> Path:
    """Write the model bundle of a trained run (or of an unpacked bundle) to ``out`` (atomically); return its path.

    ``configs`` default to the selected ensemble (``selection.json``; with it its postprocessing), else every
    trained configuration; ``folds`` to every fold with a final checkpoint. With ``onnx`` every member's network is
    also exported to ONNX and checked against torch (:func:`autoseg.export.onnx.export_run`; the manifest's
    ``onnx`` entry records each check), for ``autoseg predict --engine onnxruntime``.
    """
    run = RunFolder(run_dir)
    plans = load_plans(run.root)
    selection = load_selection(run.root)
    names = list(configs or (selection.configurations if selection else ()))
    names = names or [c for c in plans.configurations if trained_folds(run.root, c)]
    unknown = [c for c in names if c not in plans.configurations]
    if unknown or not names:
        raise ConfigError(f"{run.root}: configuration(s) {unknown or names} not trained in this run")
    members = _members(run, names, folds)
    for config in names:  # a cascade stage predicts with its previous stage's folds first: they travel with it
        previous = plans.configurations[config].previous_stage
        if previous and previous not in members:
            members |= _members(run, [previous], None)
    if selection is not None and tuple(names) == tuple(selection.configurations):
        chosen = selection
    else:  # another ensemble than the selected one: no postprocessing was decided for it
        chosen = Selection(tuple(names), None, candidates={}, per_class_dice={}, best="+".join(names))
    files = {
        "plans.json": _json(dataclasses.replace(plans, search=None)),
        "selection.json": _json(chosen),
    }
    if run.fingerprint.is_file():
        files["training_data.json"] = _json(DataSummary.of(load_fingerprint(run.fingerprint)))
    elif run.data_summary.is_file():  # a bundle exported again
        files["training_data.json"] = run.data_summary.read_bytes()
    for config, use in members.items():
        for fold in use:
            files[f"models/{config}/fold_{fold}/checkpoint_final.pt"] = _weights(run.checkpoint(config, fold))
    checks = {}
    if onnx:
        for (config, fold), (data, check) in onnx_export.export_run(run.root, names, folds).items():
            files[RunFolder("").onnx_network(config, fold).as_posix()] = data
            checks[f"{config}/fold_{fold}"] = check.to_json()
    manifest = {
        "format": BUNDLE_FORMAT,
        "autoseg_version": plans.autoseg_version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset_name": plans.dataset_name,
        "members": members,
        "labels": plans.labels,
        "channels": list(plans.channels),
        "postprocessing": chosen.postprocessing is not None,
        "temperature": None,
        "onnx": {"opset": onnx_export.OPSET, "tolerance": onnx_export.TOLERANCE, "members": checks} if onnx else None,
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in files.items()
        },
    }

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("manifest.json", json.dumps(manifest, indent=2) + "\n")
            for name, data in files.items():
                archive.writestr(name, data)

    out = Path(out)
    atomic_path(out, write)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check(archive: zipfile.ZipFile, path: Path) -> dict:
    """The manifest, after checking that the archive holds exactly its files with their checksums."""
    try:
        manifest = json.loads(archive.read("manifest.json"))
    except KeyError:
        raise InferenceError(f"{path}: not an autoseg model bundle (no manifest.json)") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise InferenceError(f"{path}: bundle format {manifest.get('format')!r}; this autoseg reads {BUNDLE_FORMAT}")
    listed = set(manifest["files"]) | {"manifest.json"}
    names = set(archive.namelist())
    if names != listed:
        raise InferenceError(f"{path}: files {sorted(names ^ listed)} differ from the manifest; the bundle is damaged")
    for name, facts in manifest["files"].items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise InferenceError(f"{path}: unsafe file name {name!r} in the bundle")
        if hashlib.sha256(archive.read(name)).hexdigest() != facts["sha256"]:
            raise InferenceError(f"{path}: {name} does not match its checksum; the bundle is damaged")
    return manifest


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InferenceError(f"{path}: cannot read the model bundle ({exc})") from None


def read_manifest(path: Path | str) -> dict:
    """The manifest of a bundle file, after checking every file against it."""
    with _open_zip(Path(path)) as archive:
        return _check(archive, Path(path))


def open_bundle(path: Path | str, cache: Path | str | None = None) -> Path:
    """Unpack a checked bundle (once; later calls reuse it) and return the folder, a run folder for prediction."""
    path = Path(path)
    root = Path(cache or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "autoseg" / "bundles")
    target = root / _sha256(path)[:24]
    if (target / "manifest.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    archive = _open_zip(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        with archive:
            _check(archive, path)
            archive.extractall(tmp)
        try:
            tmp.rename(target)
        except OSError:  # unpacked meanwhile by another process
            if not (target / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_folder(model: Path | str) -> Path:
    """What ``autoseg predict -m`` reads: a run folder as given, or a bundle file unpacked by :func:`open_bundle`."""
    model = Path(model)
    return open_bundle(model) if model.is_file() else model
