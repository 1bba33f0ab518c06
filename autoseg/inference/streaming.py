"""Labels predicted in bands along the first preprocessed axis, so that no array of classes x the whole image
ever exists.

A configuration's members predict the case together with :func:`~autoseg.inference.sliding_window.sliding_window_rows`
(bands of finished rows, about one patch deep); each band becomes mean probabilities, which
:class:`~autoseg.preprocessing.resampling.RowResampler` maps onto the original grid one class at a time, and a
running arg-max (or the region painting order) turns them into labels. Memory: the members' sliding-window bands
plus a few rows per class, whatever the length of the image; the labels equal those of the whole-image path
(:meth:`Predictor.predict` with probabilities) because every step computes the same numbers in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from autoseg.preprocessing.cropping import transpose_spatial
from autoseg.preprocessing.preprocess import probability_orders
from autoseg.preprocessing.resampling import RowResampler
from autoseg.preprocessing.store import CaseProperties

__all__ = ["can_stream", "mean_bands", "paint_labels", "labels_from_bands"]


def can_stream(properties: CaseProperties) -> bool:
    """Whether probabilities go back to the original grid by linear or nearest interpolation (no spline
    prefilter, which reads a whole axis at once)."""
    orders, _ = probability_orders(properties)
    return max(orders) <= 1


def mean_bands(streams: list[Iterator[tuple[int, np.ndarray]]]) -> Iterator[tuple[int, np.ndarray]]:
    """The members' probability bands averaged (members with the same patch yield the same bands)."""
    for parts in zip(*streams, strict=True):
        first = parts[0][0]
        if any(f != first or p.shape != parts[0][1].shape for f, p in parts):
            raise ValueError("members stream different bands; predict them with the whole-image path")
        mean = parts[0][1]
        for _, probs in parts[1:]:
            mean += probs
        mean /= len(parts)
        yield first, mean


def paint_labels(
    labels: np.ndarray,
    probability: Callable[[int], np.ndarray],
    n_outputs: int,
    region_order: tuple[int, ...] | None,
) -> None:
    """Write into ``labels`` the arg-max over ``probability(channel)`` maps, computed one at a time (a running
    maximum; the first class kept on ties, as ``argmax``), or paint the regions in ``region_order`` (> 0.5)."""
    if region_order is not None:
        for channel, value in enumerate(region_order):
            labels[probability(channel) > 0.5] = value
        return
    best = probability(0)
    for channel in range(1, n_outputs):
        prob = probability(channel)
        labels[prob > best] = channel
        np.maximum(best, prob, out=best)


def labels_from_bands(
    bands: Iterable[tuple[int, np.ndarray]],
    properties: CaseProperties,
    *,
    region_order: tuple[int, ...] | None,
    dtype: np.dtype,
) -> np.ndarray:
    """Labels on the original grid from consecutive bands ``(first_row, probabilities (K, rows, ...))`` of a
    case's preprocessed probabilities: a running arg-max over classes (first class kept on ties, as ``argmax``), or
    the regions painted in ``region_order``. Outside the crop box every voxel is background."""
    p = properties
    orders, separate = probability_orders(p)
    rows = RowResampler(p.shape_after_resampling, p.shape_after_crop, orders, separate)
    labels = np.zeros(p.geometry.shape_zyx, dtype)
    view = transpose_spatial(labels, p.transpose_forward)[tuple(slice(a, b) for a, b in p.crop_bbox)]
    buffer: np.ndarray | None = None
    start = done = received = 0
    for first, probs in bands:
        if first != received:
            raise ValueError(f"band starts at row {first}, expected {received}")
        buffer = probs if buffer is None else np.concatenate([buffer, probs], axis=1)
        received += probs.shape[1]
        ready = rows.ready(received)
        if ready == done:
            continue

        def class_rows(c: int, band: np.ndarray = buffer, a: int = start, o0: int = done, o1: int = ready):
            return rows.rows(band[c], a, o0, o1)

        paint_labels(view[done:ready], class_rows, buffer.shape[0], region_order)
        done = ready
        keep = min(rows.first_input(done), received)  # an output row may skip input rows not received yet
        buffer, start = buffer[:, keep - start :], keep
    if done != view.shape[0]:
        raise ValueError(f"{p.case_id}: bands ended after {received} rows; {view.shape[0] - done} output rows missing")
    return labels
