"""One training epoch: the iterations, the validation on sampled patches (pseudo-Dice), and the epoch's record,
checkpoints, log line and curve. :func:`autoseg.training.trainer.train_fold` calls these in its loop."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from autoseg.files import write_text_atomic
from autoseg.networks.step import train_step
from autoseg.planning.plans import Configuration, Plans
from autoseg.training.batch_augmentation import augment_batch, batch_generator
from autoseg.training.checkpoint import save_checkpoint
from autoseg.training.curves import plot_training_curves
from autoseg.training.loader import BatchLoader
from autoseg.training.schedule import learning_rate

__all__ = ["augment_on_device", "duration", "finish_epoch", "pseudo_dice_counts", "run_epoch", "to_device"]

log = logging.getLogger(__name__)


def pseudo_dice_counts(output: torch.Tensor, target: torch.Tensor, plans: Plans) -> np.ndarray:
    """(n_classes, 3) true positives, false positives, false negatives of the arg-max (or sigmoid) prediction."""
    valid = (
        (target != plans.ignore_label) if plans.ignore_label is not None else torch.ones_like(target, dtype=torch.bool)
    )
    if plans.regions:
        pred = output > 0
        truth = torch.stack(
            [torch.isin(target[:, 0], torch.tensor(v, device=target.device)) for v in plans.regions.values()], 1
        )
    else:
        labels = output.argmax(1, keepdim=True)
        classes = torch.arange(1, plans.n_outputs, device=output.device).view(1, -1, *[1] * (output.ndim - 2))
        pred, truth = labels == classes, target == classes
    dims = [0] + list(range(2, output.ndim))
    tp = (pred & truth & valid).sum(dims)
    fp = (pred & ~truth & valid).sum(dims)
    fn = (~pred & truth & valid).sum(dims)
    return torch.stack([tp, fp, fn], 1).cpu().numpy().astype(np.int64)


def to_device(batch: dict, index: int = 0, *, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    data = torch.from_numpy(batch["data"]).to(device, non_blocking=True)
    targets = [torch.from_numpy(t).to(device, non_blocking=True).long() for t in batch["target"]]
    return data, targets


def augment_on_device(
    batch: dict, index: int, *, c: Configuration, scales, seed: int, device: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Training batch ``index`` (the loader's crop) augmented on ``device``; depends only on (seed, index)."""
    data, (seg,) = to_device(batch, device=device)
    return augment_batch(data, seg, c.augmentation, c.patch_size, batch_generator(seed, index), ds_scales=scales)


def run_epoch(
    network, optimizer, scaler, loss_fn, batches, prepare, source, val_recipe, plans, c, epoch, device, dtype
) -> dict:
    t = c.training
    lr = learning_rate(c, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    network.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, losses = time.perf_counter(), []
    # a bar per epoch on a terminal (rate and ETA of the epoch); logs get the line per epoch only
    bar = tqdm(total=t.iterations_per_epoch, desc=f"epoch {epoch + 1}", unit="it", leave=False, disable=None)
    for i in range(t.iterations_per_epoch):
        data, targets = prepare(next(batches), epoch * t.iterations_per_epoch + i)
        losses.append(
            train_step(network, optimizer, scaler, loss_fn, data, targets, dtype=dtype, grad_clip=t.grad_clip)
        )
        bar.update()
    bar.close()
    train_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if val_recipe is None:  # a non-main DDP rank: rank 0 validates
        return {"epoch": epoch, "train_loss": float(np.mean(losses))}
    network.eval()
    local = getattr(network, "module", network)  # rank 0 validates alone: the unwrapped network, no collectives
    batch_counts: list[np.ndarray] = []
    val_losses: list[float] = []
    with torch.no_grad(), BatchLoader(source, val_recipe, workers=0, start=epoch * t.val_iterations) as val_batches:
        for _ in range(t.val_iterations):
            data, targets = to_device(next(val_batches), device=device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                outputs = local(data)
            val_losses.append(float(loss_fn(outputs, targets if isinstance(outputs, (list, tuple)) else targets[0])))
            top = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
            batch_counts.append(pseudo_dice_counts(top.float(), targets[0], plans))
    counts = np.sum(batch_counts, axis=0)
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    dice = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    return {
        "epoch": epoch,
        "train_loss": float(np.mean(losses)),
        "val_loss": float(np.mean(val_losses)),
        "val_dice": [None if np.isnan(d) else float(d) for d in dice],
        "mean_fg_dice": float(np.nanmean(dice)) if np.any(~np.isnan(dice)) else 0.0,
        "lr": lr,
        "seconds": round(time.perf_counter() - start, 3),
        "seconds_per_iteration": round(train_seconds / t.iterations_per_epoch, 4),
        "peak_memory_bytes": peak,
    }


def finish_epoch(
    out: Path,
    record: dict,
    history: list[dict],
    network,
    optimizer,
    scaler,
    c: Configuration,
    best_ema: float,
    provenance: dict,
) -> float:
    ema = record["mean_fg_dice"] if not history else 0.9 * history[-1]["ema_dice"] + 0.1 * record["mean_fg_dice"]
    record["ema_dice"] = ema
    history.append(record)
    state = {
        "network": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "grad_scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "epoch": record["epoch"] + 1,
        "epochs": c.training.epochs,  # the schedule's length, shortened when a time limit needs it
        "best_ema": max(best_ema, ema),
        "history": json.dumps(history),
        **provenance,
    }
    save_checkpoint(out / "checkpoint_latest.pt", state)
    if ema > best_ema:
        save_checkpoint(out / "checkpoint_best.pt", state)
    write_text_atomic(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    plot_training_curves(history, out / "training_curve.png")
    dice = ", ".join("-" if d is None else f"{d:.3f}" for d in record["val_dice"])
    left = c.training.epochs - record["epoch"] - 1
    recent = [h["seconds"] for h in history[-5:]]
    log.info(
        "epoch %d/%d  loss %.4f  val loss %.4f  pseudo-Dice [%s]  EMA %.4f  lr %.2e  %.1fs (%.2fs/it)  ETA %s",
        record["epoch"] + 1,
        c.training.epochs,
        record["train_loss"],
        record["val_loss"],
        dice,
        ema,
        record["lr"],
        record["seconds"],
        record["seconds_per_iteration"],
        duration(left * sum(recent) / len(recent)),
    )
    return max(best_ema, ema)


def duration(seconds: float) -> str:
    """``1h05m``, ``4m10s`` or ``12s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
