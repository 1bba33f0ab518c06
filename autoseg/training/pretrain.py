"""Self-supervised pretraining on unlabelled images: masked image modelling with the planned network.

Why this objective: for convolutional U-Nets in 3D medical images, masked image modelling (hide random blocks of
the input, reconstruct them) was the strongest pretext task in the largest comparison so far (the OpenMind
benchmark of nnU-Net's nnssl: MAE-style reconstruction with a ResEnc U-Net beat contrastive and other methods on
fine-tuning), and it needs no pairs, negatives or large batches, which suits a CPU. Blocks are the size of the
network's total stride, so a masked block is one voxel of the coarsest feature map and cannot be filled in from
its neighbours at full resolution alone; 60% are masked; the loss is the mean squared error on the masked voxels.

The pretraining run is an ordinary run folder: ``plans.json`` (the labelled run's, so the network fits it and
its normalisation applies), ``preprocessed/`` (the images, labels ignored) and
``models/<config>/fold_all/checkpoint_final.pt``, which ``--init-from PRETRAIN`` accepts (its reconstruction head
is not transferred). Same preprocessing, augmentation, exact resume (per-epoch checkpoints, batches seeded by
index) and progress (a line per epoch, a loss curve) as training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from autoseg.data.dataset import scan
from autoseg.data.io import read_images
from autoseg.devices import resolve_device
from autoseg.errors import DatasetError, TrainingError
from autoseg.files import files_signature, write_text_atomic
from autoseg.networks.builder import build_network
from autoseg.networks.step import train_step
from autoseg.planning.plans import Plans, load_plans
from autoseg.preprocessing.preprocess import plan_hash, preprocess_case
from autoseg.preprocessing.store import case_done, list_cases, read_case, write_case
from autoseg.runfolder import RunFolder
from autoseg.serialization import to_jsonable
from autoseg.training.augmentation import sampling_patch_size
from autoseg.training.checkpoint import load_checkpoint, save_checkpoint
from autoseg.training.curves import plot_training_curves
from autoseg.training.loader import BatchLoader, BatchRecipe, CaseData
from autoseg.training.schedule import build_optimizer, learning_rate

__all__ = ["MASK_RATIO", "PretrainOptions", "masked_input", "masked_mse", "pretrain"]

log = logging.getLogger(__name__)

MASK_RATIO = 0.6
OBJECTIVE = "masked_image_modelling"


@dataclass(frozen=True)
class PretrainOptions:
    """How long and where: ``epochs`` (default: the plan's), or a ``time_budget_hours`` that fixes the epochs
    after the first one is timed; ``device``, loader ``workers``."""

    epochs: int | None = None
    time_budget_hours: float | None = None
    device: str = "auto"
    workers: int = 0
    seed: int = 12345


@dataclass(frozen=True)
class _Unlabelled:
    """Preprocessed images without labels (a CaseSource: an all-background label of the image's shape)."""

    folder: Path

    def open(self, case_id: str) -> CaseData:
        return _open(self.folder, case_id)


@lru_cache(maxsize=256)
def _open(folder: Path, case_id: str) -> CaseData:
    image, _, _ = read_case(folder, case_id, mmap=True)
    return CaseData(image, np.broadcast_to(np.int8(0), image.shape[1:]), {})


def masked_input(
    data: torch.Tensor, block: Sequence[int], ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked data, mask): blocks of ``block`` voxels set to 0 (the normalised mean) with probability ``ratio``;
    ``mask`` (B, 1, *spatial) is 1 where hidden."""
    spatial = data.shape[2:]
    coarse = [math.ceil(s / b) for s, b in zip(spatial, block)]
    keep = torch.rand((data.shape[0], 1, *coarse), generator=generator) >= ratio
    for axis, b in enumerate(block):
        keep = keep.repeat_interleave(b, dim=2 + axis)
    hidden = (~keep[(slice(None), slice(None), *[slice(0, s) for s in spatial])]).to(data.device, data.dtype)
    return data * (1 - hidden), hidden


def masked_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error on the hidden voxels. ``target`` is the image with the mask as its last channel (one
    tensor, as :func:`~autoseg.networks.step.train_step` hands a network of one output its first target)."""
    image, hidden = target[:, :-1], target[:, -1:]
    return ((output.float() - image) ** 2 * hidden).sum() / (hidden.sum() * image.shape[1]).clamp_min(1)


def _epoch(network, optimizer, batches, c, epoch: int, seed: int, device: torch.device) -> float:
    """One epoch of masked image modelling; the masks of epoch ``epoch`` are drawn from a generator seeded with it."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    network.train()
    losses = []
    for _ in tqdm(range(c.training.iterations_per_epoch), desc=f"pretrain {epoch + 1}", leave=False, disable=None):
        image = torch.from_numpy(next(batches)["data"]).to(device)
        masked, hidden = masked_input(image, c.network.total_stride, MASK_RATIO, generator)
        target = torch.cat([image, hidden], 1)
        step = train_step(
            network, optimizer, scaler, masked_mse, masked, [target], dtype=None, grad_clip=c.training.grad_clip
        )
        losses.append(step)
    return float(np.mean(losses))


def _prepare(data_dirs: Sequence[Path], plans: Plans, config: str, folder: Path) -> list[str]:
    """Preprocess every image of ``data_dirs`` (labels ignored) into ``folder``; finished cases are skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    hashed = plan_hash(plans, config)
    ids = []
    for root in data_dirs:
        spec, problems = scan(root)
        problems = [p for p in problems if "label" not in p]  # labels are not used
        if problems:
            raise DatasetError(f"{root}: " + "; ".join(problems))
        for case in spec.cases:
            case_id = f"{Path(root).name}__{case.id}" if len(data_dirs) > 1 else case.id
            ids.append(case_id)
            signature = files_signature(case.images)
            if case_done(folder, case_id, hashed, signature):
                continue
            image, geometry = read_images(case.images)
            data, _, props = preprocess_case(image, None, geometry, plans, config, case_id=case_id)
            props = dataclasses.replace(props, plan_hash=hashed, source_signature=signature)
            write_case(folder, case_id, data, None, props)
    return ids


def pretrain(
    data_dirs: Sequence[Path | str],
    out: Path | str,
    plans_from: Path | str,
    *,
    config: str | None = None,
    options: PretrainOptions = PretrainOptions(),
) -> Path:
    """Pretrain ``config`` of ``plans_from``'s plan on the images of ``data_dirs``; returns the final checkpoint.

    Run again after an interruption, it resumes from the last epoch.
    """
    run = RunFolder(out)
    plans = load_plans(Path(plans_from))
    config = config or next(n for n in ("3d_fullres", "2d", *plans.configurations) if n in plans.configurations)
    if config not in plans.configurations:
        raise TrainingError(f"configuration {config!r} not in {plans_from}; planned: {list(plans.configurations)}")
    run.root.mkdir(parents=True, exist_ok=True)
    plans.save(run.plans)
    c = plans.configurations[config]
    folder = run.preprocessed(c.data_identifier or config)
    ids = _prepare([Path(d) for d in data_dirs], plans, config, folder)
    if not ids or not list_cases(folder):
        raise DatasetError(f"{', '.join(map(str, data_dirs))}: no images to pretrain on")
    out_dir = run.fold(config, "all")
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "checkpoint_final.pt").is_file():
        log.info("%s: already pretrained", out_dir)
        return out_dir / "checkpoint_final.pt"
    return _train(plans, config, ids, folder, out_dir, options)


def _train(plans: Plans, config: str, ids: list[str], folder: Path, out: Path, options: PretrainOptions) -> Path:
    c = plans.configurations[config]
    t = c.training
    device = resolve_device(options.device)
    torch.manual_seed(options.seed)
    channels = len(plans.channels)
    network = build_network(c.network, channels, channels).to(device)
    network.deep_supervision = False
    optimizer = build_optimizer(c, network.parameters())
    epochs, start, history = options.epochs or t.epochs, 0, []
    latest = out / "checkpoint_latest.pt"
    if latest.is_file():
        state = load_checkpoint(latest, device)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start, epochs, history = state["epoch"], state["epochs"], json.loads(state["history"])
        log.info("resuming pretraining at epoch %d of %d", start, epochs)
    recipe = BatchRecipe(
        case_ids=tuple(ids),
        patch_size=tuple(c.patch_size),
        sampling_patch_size=sampling_patch_size(c.patch_size, c.augmentation),
        batch_size=c.batch_size,
        oversample_foreground=0.0,
        augmentation=c.augmentation,
        ds_scales=None,
        seed=options.seed,
    )
    provenance = {"configuration": json.dumps(to_jsonable(c)), "overrides": [], "pretraining": OBJECTIVE}
    began = time.perf_counter()
    with BatchLoader(_Unlabelled(folder), recipe, workers=options.workers, start=start * t.iterations_per_epoch) as it:
        epoch = start
        while epoch < epochs:  # the time budget may change ``epochs`` after the first
            lr = learning_rate(dataclasses.replace(c, training=dataclasses.replace(t, epochs=epochs)), epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tick = time.perf_counter()
            loss = _epoch(network, optimizer, it, c, epoch, options.seed, device)
            seconds = time.perf_counter() - tick
            if epoch == 0 and options.time_budget_hours is not None:  # fixed once, kept in the checkpoint
                epochs = max(1, int(options.time_budget_hours * 3600 // max(seconds, 1e-6)))
                log.info("pretraining: %.1f s per epoch: %d epoch(s) in the time budget", seconds, epochs)
            history.append({"epoch": epoch, "train_loss": loss, "lr": lr, "seconds": round(seconds, 2)})
            state = {
                "network": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch + 1,
                "epochs": epochs,
                "history": json.dumps(history),
                **provenance,
            }
            save_checkpoint(latest, state)
            write_text_atomic(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
            plot_training_curves(history, out / "training_curve.png")
            log.info(
                "pretrain epoch %d/%d  masked reconstruction loss %.4f  lr %.2e  %.1fs",
                epoch + 1,
                epochs,
                loss,
                lr,
                seconds,
            )
            epoch += 1
    save_checkpoint(out / "checkpoint_final.pt", load_checkpoint(latest))
    log.info("pretraining done in %.0f s: %s", time.perf_counter() - began, out / "checkpoint_final.pt")
    return out / "checkpoint_final.pt"
