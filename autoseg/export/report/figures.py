"""The report's plots, drawn with matplotlib and returned as PNG bytes (the page embeds them as base64)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from autoseg.data.io import read_image, read_label
from autoseg.export.report.collect import CrossValidation, WorstCase
from autoseg.fingerprint import Fingerprint

__all__ = ["fingerprint_png", "curves_png", "cross_validation_png", "overlay_png"]

AXES = ("z", "y", "x")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    _pyplot().close(fig)
    return buffer.getvalue()


def _strip(ax, columns: Sequence[np.ndarray], labels: Sequence[str], *, seed: int = 0) -> None:
    """One column of jittered points per entry of ``columns``, its median as a black bar."""
    rng = np.random.default_rng(seed)
    for i, values in enumerate(columns):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=10, alpha=0.6)
        if len(values):
            ax.plot([i - 0.25, i + 0.25], [np.median(values)] * 2, color="black", lw=2)
    ax.set_xticks(range(len(labels)), labels)


def fingerprint_png(fp: Fingerprint, names: Mapping[str, str]) -> bytes:
    """Four panels: spacing and size after cropping per axis (a point per case), foreground intensity per channel
    (0.5-99.5 percentile line, mean +- std box, median tick) and class balance (share of foreground voxels and of
    cases containing the class)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    shown = [0, 1, 2] if fp.dim == 3 else [1, 2]  # a 2D dataset's z spacing is a placeholder
    labels = [AXES[a] for a in shown]
    _strip(axes[0, 0], [fp.spacings[:, a] for a in shown], labels)
    axes[0, 0].set(title="spacing per case", ylabel="mm")
    _strip(axes[0, 1], [fp.shapes_after_crop[:, a] for a in shown], labels)
    axes[0, 1].set(title="size after cropping per case", ylabel="voxels")
    ax = axes[1, 0]
    for i, channel in enumerate(fp.channels):
        s = channel.foreground_intensity
        if s is None:
            ax.text(i, 0, "unknown", ha="center")
            continue
        ax.plot([i, i], [s.percentile_00_5, s.percentile_99_5], color="tab:blue")
        ax.add_patch(plt.Rectangle((i - 0.2, s.mean - s.std), 0.4, 2 * s.std, alpha=0.3, color="tab:blue"))
        ax.plot([i - 0.2, i + 0.2], [s.median] * 2, color="black", lw=2)
    ax.set_xticks(range(len(fp.channels)), [c.name for c in fp.channels])
    ax.set_xlim(-0.6, len(fp.channels) - 0.4)
    ax.set(title="foreground intensity per channel (file units)")
    ax = axes[1, 1]
    x = np.arange(len(fp.classes))
    voxels = [np.nan if c.voxel_fraction is None else c.voxel_fraction for c in fp.classes]
    present = [np.nan if c.present_fraction is None else c.present_fraction for c in fp.classes]
    ax.bar(x - 0.2, voxels, 0.4, label="share of foreground voxels")
    ax.bar(x + 0.2, present, 0.4, label="share of cases containing it")
    ax.set_xticks(x, [names.get(str(c.label), c.name) for c in fp.classes], rotation=30, ha="right")
    ax.set(title="class balance", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def curves_png(config: str, folds: Mapping[str, Sequence[dict]]) -> bytes:
    """Two panels for one configuration: training (solid) and validation (dashed) loss, and the pseudo-Dice EMA,
    against the epoch, a colour per fold."""
    plt = _pyplot()
    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(11, 3.6))
    colours = plt.get_cmap("tab10")
    for i, (fold, history) in enumerate(sorted(folds.items())):
        epochs = [h["epoch"] + 1 for h in history]
        colour = colours(i % 10)
        loss_ax.plot(epochs, [h["train_loss"] for h in history], color=colour, label=f"fold {fold}")
        loss_ax.plot(epochs, [h["val_loss"] for h in history], color=colour, ls="--")
        dice_ax.plot(epochs, [h["ema_dice"] for h in history], color=colour, label=f"fold {fold}")
    loss_ax.set(title=f"{config}: loss (solid: training, dashed: validation)", xlabel="epoch", ylabel="loss")
    dice_ax.set(title=f"{config}: pseudo-Dice (EMA)", xlabel="epoch", ylabel="Dice", ylim=(0, 1))
    dice_ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return _png(fig)


def cross_validation_png(results: Sequence[CrossValidation], names: Mapping[str, str]) -> bytes:
    """Per class (and the per-case foreground mean): each candidate's per-case Dice as faint points, its mean
    with the bootstrap 95% interval as a bar."""
    plt = _pyplot()
    keys = list(dict.fromkeys(k for cv in results for k in cv.classes)) + ["mean"]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / max(len(results), 1)
    rng = np.random.default_rng(0)
    for j, cv in enumerate(results):
        offset = -0.4 + width * (j + 0.5)
        for i, key in enumerate(keys):
            if key == "mean":
                values = [cv.case_dice(c) for c in cv.cases]
            else:
                values = [c.metrics[key].dice for c in cv.cases if key in c.metrics]
            x = i + offset
            ax.scatter(x + rng.uniform(-width / 4, width / 4, len(values)), values, s=6, alpha=0.3, color=f"C{j}")
            iv = cv.intervals.get(key)
            if iv is not None and iv.n:
                ax.errorbar(
                    x,
                    iv.mean,
                    yerr=[[iv.mean - iv.low], [iv.high - iv.mean]],
                    fmt="o",
                    color=f"C{j}",
                    capsize=3,
                    label=cv.name if i == 0 else None,
                )
    ax.set_xticks(range(len(keys)), [names.get(k, k) for k in keys])
    ax.set(ylabel="Dice (out of fold)", ylim=(-0.02, 1.02), title="cross-validation Dice per case and class")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return _png(fig)


def _slice_index(reference: np.ndarray, prediction: np.ndarray) -> int:
    """The slice (first axis) with the most reference foreground; the most predicted foreground when the
    reference is empty."""
    counts = (reference > 0).sum(axis=(1, 2))
    if not counts.any():
        counts = (prediction > 0).sum(axis=(1, 2))
    return int(np.argmax(counts))


def overlay_png(case: WorstCase, names: Mapping[str, str]) -> tuple[bytes, int]:
    """Reference and prediction of ``case`` over its image on the slice with the most reference foreground;
    returns the PNG and the slice index (first array axis, z). ``names``: label value (str) -> class name; label
    value v is drawn in colour v - 1 of matplotlib's tab10."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    reference, geometry = read_label(case.reference)
    prediction, _ = read_label(case.prediction, reference=geometry)
    z = _slice_index(reference, prediction)
    image = None
    if case.image is not None:
        array, image_geometry = read_image(case.image)
        image = array[0, z] if image_geometry.shape_zyx == geometry.shape_zyx else None
    tab10 = plt.get_cmap("tab10")
    aspect = geometry.spacing_zyx[1] / geometry.spacing_zyx[2]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    for ax, labels, title in ((axes[0], reference, "reference"), (axes[1], prediction, "prediction")):
        if image is not None:
            low, high = np.percentile(image, [0.5, 99.5])
            ax.imshow(image, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
        colour = np.zeros((*labels[z].shape, 4))
        for value in np.unique(labels[z][labels[z] > 0]):
            colour[labels[z] == value] = (*tab10((int(value) - 1) % 10)[:3], 0.5)
        ax.imshow(colour, aspect=aspect, interpolation="nearest")
        ax.set_title(f"{case.case} {title}, slice z={z}")
        ax.axis("off")
    present = sorted({int(v) for v in np.unique(reference[z])} | {int(v) for v in np.unique(prediction[z])} - {0})
    handles = [Patch(color=tab10((v - 1) % 10), label=names.get(str(v), str(v))) for v in present if v > 0]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _png(fig), z
