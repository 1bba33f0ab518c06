"""Training batches: patch sampling with foreground oversampling, augmentation, and multi-process loading.

Batch ``b`` depends only on ``(seed, b)``: every random draw of that batch comes from a generator seeded with
both. So the order of batches is the same whatever the number of workers, and resuming at batch ``b`` continues
the exact sequence (the sampler's whole state is the next batch index).

Workers are separate processes, each producing every ``W``-th batch into its own bounded queue; the consumer reads
them round-robin, which keeps the order without a reorder buffer. A worker that raises sends its traceback; a
worker that dies (e.g. killed for memory) is detected and reported with its exit code. Workers end with the
training process however it ends: a worker is killed when its parent exits (even by SIGKILL; see
:mod:`autoseg.processes`), and while workers run, SIGTERM stops the training process as Ctrl-C does, which closes
the loader.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import random
import signal
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Protocol

import numpy as np

from autoseg.errors import TrainingError
from autoseg.planning.plans import AugmentationSpec
from autoseg.processes import die_with_parent, sigterm_raises
from autoseg.training.augmentation import DownsampleTargets, build_transforms
from autoseg.training.cascade import PreviousStageToData

__all__ = ["CaseData", "CaseSource", "BatchRecipe", "sample_patch", "make_batch", "BatchLoader", "choose_workers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseData:
    """One preprocessed case: image (C, Z, Y, X), label (Z, Y, X), and voxel coordinates (N, 3) per class; for a
    cascade stage also the previous stage's labels (Z, Y, X) on the same grid."""

    image: np.ndarray
    label: np.ndarray
    locations: Mapping[int, np.ndarray]
    previous: np.ndarray | None = None


class CaseSource(Protocol):
    """Where cases come from (picklable; ``open`` must be cheap, e.g. memory maps)."""

    def open(self, case_id: str) -> CaseData: ...


@dataclass(frozen=True)
class BatchRecipe:
    """Everything needed to make batch ``b`` (picklable, sent to workers).

    Patches are cut at ``sampling_patch_size``; ``augmentation`` (when not None) brings them to ``patch_size``.
    Without it the loader only crops: at ``patch_size`` for validation, or enlarged for augmentation on the device.
    """

    case_ids: tuple[str, ...]
    patch_size: tuple[int, ...]
    sampling_patch_size: tuple[int, ...]
    batch_size: int
    oversample_foreground: float
    augmentation: AugmentationSpec | None
    ds_scales: tuple[tuple[float, ...], ...] | None
    seed: int
    #: a cascade stage: the label values whose one-hot maps of the previous stage's labels are input channels
    previous_stage_values: tuple[int, ...] | None = None


def _crop(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Crop ``array[..., start:start+size]`` over its last len(size) axes, padding with zeros outside."""
    spatial = array.shape[-len(size) :]
    out = np.zeros((*array.shape[: -len(size)], *size), dtype=array.dtype)
    src, dst = [], []
    for s, n, full in zip(start, size, spatial):
        lo, hi = max(s, 0), min(s + n, full)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, lo - s + max(0, hi - lo)))
    lead = (slice(None),) * (array.ndim - len(size))
    out[(*lead, *dst)] = array[(*lead, *src)]
    return out


def sample_patch(
    case: CaseData,
    size: Sequence[int],
    force_foreground: bool,
    rng: np.random.Generator,
    final_size: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut one patch of ``size`` (2 or 3 axes) from a 3D case: image (C, *size) and label (1, *size), or (2, *size)
    with the previous stage's labels as second channel when the case has them (a cascade stage).

    ``final_size`` is the patch the network gets after augmentation crops the centre of ``size`` (default: ``size``).
    A patch may reach past the image by half the difference on each side (zero padded), so the final centre crop can
    touch every border but never leaves the image (as sliding-window tiles at inference). With
    ``force_foreground``, a class present in the case is drawn uniformly, then one of its stored voxels, and the
    patch is centred on it, moved inward at the borders just enough to keep the final crop inside the image, so the
    voxel is always in the final crop. Otherwise the patch position is uniform.
    2D patches come from one slice (the foreground voxel's slice, or a random one). A case smaller than the patch
    is centred in it.
    """
    image, label = case.image, case.label
    labels = [label] if case.previous is None else [label, case.previous]
    classes = [c for c, locs in case.locations.items() if len(locs)]
    centre = None
    if force_foreground and classes:
        locs = case.locations[classes[int(rng.integers(len(classes)))]]
        centre = np.asarray(locs[int(rng.integers(len(locs)))])
    if len(size) == 2:
        z = int(centre[0]) if centre is not None else int(rng.integers(image.shape[1]))
        image, label, labels = image[:, z], label[z], [lab[z] for lab in labels]
        centre = centre[1:] if centre is not None else None
    start = []
    for axis, (n, final, full) in enumerate(zip(size, final_size or size, label.shape)):
        need = max(n - final, n - full)  # how far the patch may extend past the image, both sides together
        lo, hi = -(need // 2), full + need // 2 + need % 2 - n
        if centre is not None:  # centred on the voxel, moved inward at the borders: the final crop stays inside
            start.append(int(np.clip(centre[axis] - n // 2, lo, hi)))
        else:
            start.append(int(rng.integers(lo, hi + 1)))
    patch_labels = [_crop(np.asarray(lab)[None], start, size) for lab in labels]
    return _crop(np.asarray(image), start, size), np.concatenate(patch_labels)


def make_batch(source: CaseSource, recipe: BatchRecipe, index: int, transforms=None) -> dict:
    """Batch number ``index``: {"data": (B, C, *patch) float32, "target": [ (B, 1, *scaled patch) int16, ... ]}."""
    rng = np.random.default_rng([recipe.seed, index])
    # batchgenerators draws from numpy's and Python's global generators: seed both from this batch's generator
    np.random.seed(int(rng.integers(2**32)))  # noqa: NPY002
    random.seed(int(rng.integers(2**32)))
    images, labels = [], []
    n_random = round(recipe.batch_size * (1 - recipe.oversample_foreground))
    for i in range(recipe.batch_size):
        case = source.open(recipe.case_ids[int(rng.integers(len(recipe.case_ids)))])
        image, label = sample_patch(case, recipe.sampling_patch_size, i >= n_random, rng, final_size=recipe.patch_size)
        images.append(image)
        labels.append(label)
    batch = {"data": np.stack(images).astype(np.float32, copy=False), "seg": np.stack(labels)}
    if transforms is not None:
        batch = transforms(**batch)
    else:
        if recipe.previous_stage_values is not None:
            batch = PreviousStageToData(recipe.previous_stage_values, perturb=False)(**batch)
        if recipe.ds_scales is not None:
            batch = DownsampleTargets(recipe.ds_scales)(**batch)
    targets = batch["seg"] if isinstance(batch["seg"], list) else [batch["seg"]]
    return {
        "data": np.ascontiguousarray(batch["data"], dtype=np.float32),
        "target": [np.rint(t).astype(np.int16) for t in targets],
    }


def _build(recipe: BatchRecipe):
    if recipe.augmentation is None:
        return None
    return build_transforms(
        recipe.patch_size,
        recipe.augmentation,
        ds_scales=recipe.ds_scales,
        previous_stage_values=recipe.previous_stage_values,
    )


def _worker(
    parent_pid: int, source: CaseSource, recipe: BatchRecipe, first: int, stride: int, out: mp.Queue, stop
) -> None:
    # a worker has nothing to save: killed outright when the parent ends, which otherwise left it waiting forever
    # to put a batch into a queue nobody reads
    die_with_parent(parent_pid, sig=signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts workers down
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, which fork copied
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        transforms = _build(recipe)
        index = first
        while not stop.is_set():
            batch = make_batch(source, recipe, index, transforms)
            while not stop.is_set():
                try:
                    out.put(("ok", index, batch), timeout=0.5)
                    break
                except queue.Full:
                    continue
            index += stride
        # stopped: batches still buffered are not wanted; exit without waiting to flush them into a full pipe
        out.cancel_join_thread()
    except Exception:  # sent to the parent, which raises it with the worker's traceback
        out.put(("error", first, traceback.format_exc()))


def choose_workers(batch_bytes: int, *, cores: int | None = None, free_bytes: int | None = None) -> int:
    """Worker processes: one core is left to the training process; each worker may hold ~4 batches in memory."""
    cores = cores or os.cpu_count() or 1
    if free_bytes is None:
        try:
            free_bytes = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free_bytes = 4 * 2**30
    by_memory = int(0.5 * free_bytes // max(1, 4 * batch_bytes + 256 * 2**20))
    return max(1, min(cores - 1, by_memory, 12))


class BatchLoader:
    """Iterator over training batches from ``start`` on; ``workers=0`` makes them in this process.

    Use as a context manager (or call :meth:`close`) so that worker processes always end. While workers run,
    SIGTERM raises :class:`autoseg.processes.Terminated` (a KeyboardInterrupt) in the main thread, so that the
    ``with`` block closes the loader; workers end by themselves if this process is killed.
    """

    def __init__(self, source: CaseSource, recipe: BatchRecipe, *, workers: int = 0, start: int = 0, prefetch: int = 3):
        self.source, self.recipe, self.workers = source, recipe, workers
        self.next_index = self._start = start
        self._procs: list[BaseProcess] = []
        self._queues: list[mp.Queue] = []
        self._transforms = None
        self._signals = contextlib.ExitStack()
        if workers > 0:
            self._start_workers(prefetch)
        else:
            self._transforms = _build(recipe)

    def _start_workers(self, prefetch: int) -> None:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
        self._stop = ctx.Event()
        self._signals.enter_context(sigterm_raises())
        try:
            for w in range(self.workers):
                q = ctx.Queue(maxsize=prefetch)
                p = ctx.Process(
                    target=_worker,
                    args=(os.getpid(), self.source, self.recipe, self._start + w, self.workers, q, self._stop),
                    daemon=True,
                    name=f"autoseg-loader-{w}",
                )
                self._queues.append(q)
                p.start()
                self._procs.append(p)
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if not self._procs:
            batch = make_batch(self.source, self.recipe, self.next_index, self._transforms)
            self.next_index += 1
            return batch
        w = (self.next_index - self._start) % self.workers
        proc, q = self._procs[w], self._queues[w]
        while True:
            try:
                kind, index, payload = q.get(timeout=1.0)
                break
            except queue.Empty:
                if not proc.is_alive():
                    code = proc.exitcode
                    why = f"killed by signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
                    oom = " (SIGKILL usually means the system ran out of memory; use fewer workers)"
                    hint = oom if code == -9 else ""
                    self.close()
                    raise TrainingError(f"data loader worker {w} died: {why}{hint}") from None
        if kind == "error":
            self.close()
            raise TrainingError(f"data loader worker {w} failed:\n{payload}")
        if index != self.next_index:
            self.close()
            raise TrainingError(f"data loader out of order: expected batch {self.next_index}, got {index}")
        self.next_index += 1
        return payload

    def close(self) -> None:
        """Stop and join the workers (terminating any that do not stop within a few seconds)."""
        if not self._procs and not self._queues:
            self._signals.close()
            return
        # no draining: workers see the flag within one put timeout and leave without flushing (cancel_join_thread),
        # and reading here could block for ever on the half-written batch of a worker that died mid-put
        self._stop.set()
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for q in self._queues:
            q.close()
            q.join_thread()
        self._procs, self._queues = [], []
        self._signals.close()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
