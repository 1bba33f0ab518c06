"""The training loop: one function that trains any configuration of any plan on one fold.

Read it top to bottom: set up (plan, split, data, network, loss, optimiser), resume from the latest checkpoint
if there is one, then for each epoch train ``iterations_per_epoch`` batches, validate on sampled patches
(pseudo-Dice), log, plot and checkpoint. Everything comes from the plan; nothing is a subclass.

Exact resume: batches depend only on (seed, batch index) and the checkpoint holds model, optimiser, gradient
scaler, RNG states and the epoch, so a run killed anywhere and started again continues the same trajectory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from autoseg.devices import resolve_device, training_dtype
from autoseg.errors import ConfigError, TrainingError
from autoseg.files import write_text_atomic
from autoseg.networks.builder import build_network
from autoseg.networks.losses import build_loss
from autoseg.planning.overrides import apply_overrides
from autoseg.planning.plans import Configuration, Plans, load_plans
from autoseg.preprocessing.preprocess import plan_hash
from autoseg.preprocessing.store import list_cases, preprocessed_folder, read_case, read_class_locations
from autoseg.runfolder import fold_dir
from autoseg.serialization import to_jsonable
from autoseg.training.augmentation import deep_supervision_scales, sampling_patch_size
from autoseg.training.cascade import prepare_previous_stage
from autoseg.training.checkpoint import load_checkpoint, save_checkpoint
from autoseg.training.distributed import DistributedContext, from_environment
from autoseg.training.epoch import augment_on_device, finish_epoch, run_epoch, to_device
from autoseg.training.loader import BatchLoader, BatchRecipe, CaseData, choose_workers
from autoseg.training.schedule import build_optimizer, fit_epochs
from autoseg.training.splits import fold_cases, load_or_make_splits
from autoseg.training.transfer import initialise_from

__all__ = ["TrainOptions", "PreprocessedCases", "train_fold"]

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict], bool]


@dataclass(frozen=True)
class TrainOptions:
    """How to run (not what to train: that is the plan)."""

    device: str = "auto"
    workers: int | None = None
    stop_after_epochs: int | None = None  # end early without finishing (tests, time budgets); resumable
    deterministic: bool = False


@dataclass(frozen=True)
class PreprocessedCases:
    """Cases of one preprocessed folder, opened as memory maps (a CaseSource for the loader); ``previous``: the
    folder of a cascade stage's previous-stage labels (:func:`autoseg.training.cascade.prepare_previous_stage`)."""

    folder: Path
    previous: Path | None = None

    def open(self, case_id: str) -> CaseData:
        return _open_case(self.folder, case_id, self.previous)


@lru_cache(maxsize=256)
def _open_case(folder: Path, case_id: str, previous: Path | None = None) -> CaseData:
    data, seg, _ = read_case(folder, case_id, mmap=True)
    if seg is None:
        raise TrainingError(f"{folder / case_id}: preprocessed case has no label map")
    label = seg[0] if seg.ndim == data.ndim else seg
    before = None
    if previous is not None:
        before = np.load(previous / f"{case_id}.npy", mmap_mode="r")
        if before.shape != label.shape:
            raise TrainingError(f"{previous / case_id}.npy: shape {before.shape} differs from the case's {label.shape}")
    return CaseData(data, label, read_class_locations(folder, case_id), before)


def _recipes(plans: Plans, c: Configuration, train_ids, val_ids, n_ds: int, seed: int) -> tuple[BatchRecipe, ...]:
    """Training and validation batches; with ``augmentation.device`` gpu the loader only crops training patches
    (enlarged for rotation) and :func:`~autoseg.training.epoch.augment_on_device` does the rest."""
    scales = tuple(deep_supervision_scales(c.network.strides, n_ds)) if n_ds > 1 else None
    on_loader = not _augments_on_device(c)
    train = BatchRecipe(
        previous_stage_values=plans.foreground_values if c.previous_stage else None,
        case_ids=tuple(train_ids),
        patch_size=tuple(c.patch_size),
        sampling_patch_size=sampling_patch_size(c.patch_size, c.augmentation),
        batch_size=c.batch_size,
        oversample_foreground=c.foreground_oversampling,
        augmentation=c.augmentation if on_loader else None,
        ds_scales=scales if on_loader else None,
        seed=seed,
    )
    val = dataclasses.replace(
        train,
        case_ids=tuple(val_ids or train_ids),
        sampling_patch_size=tuple(c.patch_size),
        augmentation=None,
        ds_scales=scales,
        seed=seed + 1,
    )
    return train, val


def _augments_on_device(c: Configuration) -> bool:
    """``augmentation.device`` gpu, except for a cascade stage: the loader transforms its previous-stage labels with
    the labels (batch augmentation does not know them)."""
    return c.augmentation.device == "gpu" and c.previous_stage is None


def _setup_logging(folder: Path) -> tuple[logging.Handler, int]:
    """Send autoseg's INFO messages to ``folder/training.log`` (whatever the console shows)."""
    handler = logging.FileHandler(folder / "training.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("autoseg")
    previous = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler, previous


def train_fold(
    run_dir: Path | str,
    config: str,
    fold: int | str,
    *,
    plans: Plans | None = None,
    overrides: Sequence[str] = (),
    options: TrainOptions = TrainOptions(),
    on_epoch_end: EpochCallback | None = None,
) -> Path:
    """Train configuration ``config`` of ``RUN/plans.json`` on cross-validation fold ``fold`` (or ``"all"``).

    ``plans`` replaces ``RUN/plans.json``; ``overrides`` (``key=value``, as ``autoseg train --set``) are applied on
    top. Writes ``RUN/models/<config>/fold_<k>/``: ``configuration.json`` (the configuration trained, overrides
    included and listed in its ``why``), ``checkpoint_latest.pt`` every epoch, ``checkpoint_best.pt`` (EMA of the
    validation pseudo-Dice), ``checkpoint_final.pt`` (each with the configuration and the override strings, from
    which prediction rebuilds the network), ``log.jsonl``, ``training.log`` and ``training_curve.png``.
    ``on_epoch_end(epoch, record)`` may return True to stop (pruning). Returns the folder.
    """
    run_dir = Path(run_dir)
    planned = plans or load_plans(run_dir)
    plans = apply_overrides(planned, overrides)
    if overrides and config in planned.configurations and plan_hash(planned, config) != plan_hash(plans, config):
        raise ConfigError(
            f"--set {' '.join(overrides)}: changes how {config} is preprocessed (spacing, normalization, resampling, "
            "labels or channels), so the preprocessed data would not match what the network is trained for; put the "
            f"change in {run_dir / 'plans.json'} and run `autoseg preprocess` again"
        )
    if config not in plans.configurations:
        raise TrainingError(
            f"configuration {config!r} not in {run_dir / 'plans.json'}; available: {', '.join(plans.configurations)}"
        )
    c = plans.configurations[config]
    out = fold_dir(run_dir, config, fold)
    out.mkdir(parents=True, exist_ok=True)
    handler, previous_level = _setup_logging(out)
    try:
        return _train(run_dir, plans, c, fold, out, tuple(overrides), options, on_epoch_end)
    finally:
        logging.getLogger("autoseg").removeHandler(handler)
        logging.getLogger("autoseg").setLevel(previous_level)
        handler.close()


def _train(
    run_dir: Path,
    plans: Plans,
    c: Configuration,
    fold: int | str,
    out: Path,
    overrides: tuple[str, ...],
    options: TrainOptions,
    on_epoch_end: EpochCallback | None,
) -> Path:
    started = time.perf_counter()  # the time limit counts start-up too
    t = c.training
    device = resolve_device(options.device)
    ddp = from_environment(device)
    if ddp is not None:
        device = ddp.device(device)
    main = ddp is None or ddp.is_main
    dtype = training_dtype(c.training.precision, device)
    folder = preprocessed_folder(run_dir, c.name)
    cases = list_cases(folder)
    if not cases:
        raise TrainingError(f"{folder}: no preprocessed cases; run `autoseg preprocess {run_dir}` first")
    splits = load_or_make_splits(run_dir, cases)
    train_ids, val_ids = fold_cases(splits, "all" if fold == "all" else int(fold))
    seed = t.seed + (0 if fold == "all" else int(fold))
    if options.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    in_channels = plans.input_channels(c)
    model = build_network(c.network, in_channels, plans.n_outputs).to(device)
    network = ddp.wrap(model, device) if ddp is not None else model
    n_ds = len(c.network.strides) - 1 if c.network.deep_supervision else 1
    loss_fn = build_loss(
        c.loss,
        n_outputs=plans.n_outputs,
        regions=list(plans.regions.values()) or None,
        ignore_label=plans.ignore_label,
        deep_supervision_scales=n_ds,
    )
    optimizer = build_optimizer(c, network.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    history: list[dict] = []
    start_epoch, best_ema = 0, -1.0
    latest = out / "checkpoint_latest.pt"
    if (out / "checkpoint_final.pt").exists():
        log.info("%s: already trained (checkpoint_final.pt exists); nothing to do", out)
        return out
    if not latest.exists() and t.init_from:  # a new fold fine-tuned from another run's weights
        report = initialise_from(model, t.init_from, c.name, plans.labels)
        if main:
            write_text_atomic(out / "transfer.json", json.dumps(dataclasses.asdict(report), indent=2) + "\n")
    if latest.exists():
        state = load_checkpoint(latest, device)
        model.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["grad_scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best_ema, history = state["epoch"], state["best_ema"], json.loads(state["history"])
        log.info("resuming %s fold %s at epoch %d", c.name, fold, start_epoch)
        if t.time_limit_hours is not None and state.get("epochs", t.epochs) < t.epochs:  # shortened to fit
            c = dataclasses.replace(c, training=dataclasses.replace(t, epochs=state["epochs"]))
            t = c.training
    elapsed_before = 0.0  # the job's wall-clock seconds in earlier runs (logs from before it was kept: summed epochs)
    for h in history:
        elapsed_before = h.setdefault("elapsed_seconds", elapsed_before + h["seconds"])
    # what this fold is trained with, kept in every checkpoint: prediction rebuilds the network from it
    provenance = {"configuration": json.dumps(to_jsonable(c)), "overrides": list(overrides)}
    if main:
        write_text_atomic(out / "configuration.json", json.dumps(to_jsonable(c), indent=2) + "\n")
        if overrides:
            log.info("%s fold %s: plan overrides %s", c.name, fold, " ".join(overrides))
    rank_seed = seed + (7919 * ddp.rank if ddp is not None else 0)
    per_rank = dataclasses.replace(c, batch_size=ddp.local_batch(c.batch_size)) if ddp is not None else c
    train_recipe, val_recipe = _recipes(plans, per_rank, train_ids, val_ids, n_ds, rank_seed)
    previous = None
    if c.previous_stage:  # a cascade stage: the previous stage's out-of-fold labels, on this grid
        previous = prepare_previous_stage(run_dir, plans, c.name, (*train_ids, *val_ids), splits, folder)
    source = PreprocessedCases(folder, previous)
    batch_bytes = 4 * c.batch_size * in_channels * int(np.prod(train_recipe.sampling_patch_size))
    workers = options.workers if options.workers is not None else choose_workers(batch_bytes)
    log.info(
        "training %s fold %s on %s: %d train / %d val cases, patch %s, batch %d, %d epochs x %d iterations, "
        "%d loader workers",
        c.name,
        fold,
        device,
        len(train_ids),
        len(val_ids),
        list(c.patch_size),
        c.batch_size,
        t.epochs,
        t.iterations_per_epoch,
        workers,
    )
    last_epoch = t.epochs if options.stop_after_epochs is None else min(t.epochs, options.stop_after_epochs)
    prepare = functools.partial(to_device, device=device)
    if c.augmentation.device == "gpu" and not _augments_on_device(c):
        log.info("cascade stage: augmentation stays in the loader, with the previous stage's labels")
    if _augments_on_device(c):
        log.info("augmentation on %s: whole batches, after the loader's crop", device)
        scales = tuple(deep_supervision_scales(c.network.strides, n_ds)) if n_ds > 1 else None
        prepare = functools.partial(augment_on_device, c=c, scales=scales, seed=train_recipe.seed, device=device)
    with BatchLoader(source, train_recipe, workers=workers, start=start_epoch * t.iterations_per_epoch) as batches:
        for epoch in range(start_epoch, last_epoch):
            record = run_epoch(
                network,
                optimizer,
                scaler,
                loss_fn,
                batches,
                prepare,
                source,
                val_recipe if main else None,
                plans,
                c,
                epoch,
                device,
                dtype,
            )
            if main:
                record["elapsed_seconds"] = round(elapsed_before + time.perf_counter() - started, 3)
                best_ema = finish_epoch(out, record, history, model, optimizer, scaler, c, best_ema, provenance)
                if on_epoch_end is not None and on_epoch_end(epoch, record):
                    log.info("stopped after epoch %d by the caller (e.g. pruned by the search)", epoch)
                    return out
            if t.time_limit_hours is not None:
                c = _fit_time_limit(c, history, ddp)
                t = c.training
                last_epoch = min(last_epoch, t.epochs)
                if epoch + 1 >= last_epoch:
                    break
    if ddp is not None:
        del network  # DDP's reducer holds the process group and gloo work: free it before the group goes
        ddp.close()
    if main and last_epoch == t.epochs and not (out / "checkpoint_final.pt").exists():
        save_checkpoint(out / "checkpoint_final.pt", load_checkpoint(latest))
    return out


def _fit_time_limit(c: Configuration, history: list[dict], ddp: DistributedContext | None) -> Configuration:
    """``c`` with the epochs that fit its time limit (:func:`fit_epochs`, decided on rank 0 and shared)."""
    epochs, why = fit_epochs(c.training, [h["elapsed_seconds"] for h in history]) if history else (None, None)
    if ddp is not None:
        epochs = ddp.broadcast(epochs)
    if epochs is None or epochs >= c.training.epochs:
        return c
    if why:
        log.info("%s", why)
    return dataclasses.replace(c, training=dataclasses.replace(c.training, epochs=epochs))
