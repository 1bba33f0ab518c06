"""Resampling to a target spacing: B-spline images, label maps by per-label arg-max, nnU-Net's out-of-plane rule.

Every resampling here is separable: one 1D pass per axis whose size changes, each a sparse matrix of B-spline
weights applied along that axis (after the spline prefilter for orders >= 2). The sampling grid is the one of
``scipy.ndimage.zoom(..., grid_mode=True, mode="nearest")`` and ``skimage.transform.resize(..., mode="edge")``:
output voxel ``o`` of an axis resized from ``n`` to ``m`` voxels samples input coordinate
``(o + 0.5) * n / m - 0.5``, edges extended. A tensor-product spline equals its 1D passes applied in turn, so the
result is the same as those functions' (to float32 precision) at a fraction of the cost, and the out-of-plane
rule is no special code path: the coarse axis simply gets its own order.

Label maps are never interpolated as numbers. Each label's indicator is interpolated (order 0 or 1) inside its
own bounding box, a running maximum keeps the winner, and background scores ``1 - sum(others)`` (linear weights
sum to one), so no full-size float array per label ever exists and no label value can be invented. Exact ties
go to the nearest-neighbour label when it is one of the tied labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sparse
from scipy import ndimage

__all__ = [
    "compute_new_shape",
    "lowres_axis",
    "axis_orders",
    "resample_axes",
    "resample_image",
    "resample_label",
    "RowResampler",
]

#: Edge padding added before the spline prefilter along a resampled axis (as scipy.ndimage does for mode 'nearest').
SPLINE_PAD = 12
#: Poles of the B-spline prefilters, orders 2 to 5 (Unser, Aldroubi & Eden 1993; Thevenaz et al. 2000).
_POLES = {
    2: (math.sqrt(8.0) - 3.0,),
    3: (math.sqrt(3.0) - 2.0,),
    4: (
        math.sqrt(664.0 - math.sqrt(438976.0)) + math.sqrt(304.0) - 19.0,
        math.sqrt(664.0 + math.sqrt(438976.0)) - math.sqrt(304.0) - 19.0,
    ),
    5: (
        math.sqrt(67.5 - math.sqrt(4436.25)) + math.sqrt(26.25) - 6.5,
        math.sqrt(67.5 + math.sqrt(4436.25)) - math.sqrt(26.25) - 6.5,
    ),
}


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Shape after resampling from ``spacing`` to ``new_spacing``: ``round(shape * spacing / new_spacing)``, >= 1."""
    if not len(shape) == len(spacing) == len(new_spacing):
        raise ValueError(
            f"shape {tuple(shape)}, spacing {tuple(spacing)} and new spacing {tuple(new_spacing)} differ in length"
        )
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def _single_max_axis(spacing: Sequence[float]) -> int | None:
    s = np.asarray(spacing, float)
    axes = np.flatnonzero(s.max() / s == 1)
    return int(axes[0]) if axes.size == 1 else None


def lowres_axis(spacing: Sequence[float], new_spacing: Sequence[float], threshold: float) -> int | None:
    """The axis to resample separately (nnU-Net's rule), or None.

    When the current spacing is anisotropic (largest / smallest > ``threshold``) its coarsest axis is resampled on
    its own; otherwise the same test on the target spacing decides. Two or more equally coarse axes: none.
    """
    for s in (spacing, new_spacing):
        if max(s) / min(s) > threshold:
            return _single_max_axis(s)
    return None


def axis_orders(ndim: int, order: int, order_z: int, separate: int | None) -> tuple[int, ...]:
    """Interpolation order per spatial axis: ``order_z`` on the separately resampled axis, ``order`` elsewhere."""
    return tuple(order_z if axis == separate else order for axis in range(ndim))


def _bspline(x: np.ndarray, order: int) -> np.ndarray:
    """Centred cardinal B-spline of degree ``order`` >= 1 at ``x``."""
    half = (order + 1) / 2
    out = np.zeros_like(x)
    for j in range(order + 2):
        out += (-1) ** j * math.comb(order + 1, j) * np.maximum(0.0, x + half - j) ** order
    return out / math.factorial(order)


def _spline_pad(order: int) -> int:
    """Edge padding added before the spline prefilter: its boundary start-up then lies out of reach of the taps."""
    return 0 if order < 2 else SPLINE_PAD if order <= 3 else 2 * SPLINE_PAD


def _weights(n_in: int, n_out: int, order: int) -> sparse.csr_matrix:
    """(n_out, n_cols) sparse matrix that resamples an axis of ``n_in`` voxels to ``n_out``.

    For ``order`` >= 2 it acts on spline coefficients of the axis padded by :func:`_spline_pad` voxels per side.
    """
    coords = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        index = np.floor(coords + 0.5).astype(np.int64)[:, None]
        weight = np.ones_like(index, dtype=np.float64)
    else:
        start = np.floor(coords + (0.5 if order % 2 == 0 else 0.0)).astype(np.int64) - order // 2
        index = start[:, None] + np.arange(order + 1)[None]
        weight = _bspline(coords[:, None] - index, order)
    pad = _spline_pad(order)
    n_cols = n_in + 2 * pad
    index = np.clip(index + pad, 0, n_cols - 1)
    rows = np.repeat(np.arange(n_out), index.shape[1])
    matrix = sparse.csr_matrix((weight.ravel().astype(np.float32), (rows, index.ravel())), shape=(n_out, n_cols))
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    return matrix


def _apply_along(volume: np.ndarray, matrix: sparse.csr_matrix, axis: int) -> np.ndarray:
    """``matrix`` applied along ``axis`` of ``volume`` (float32 result)."""
    moved = np.ascontiguousarray(np.moveaxis(volume, axis, 0), dtype=np.float32)
    return _apply_rows(moved, matrix, axis)


def _apply_rows(rows: np.ndarray, matrix: sparse.csr_matrix, axis: int) -> np.ndarray:
    """``matrix`` applied to the first axis of C-contiguous ``rows``, which then moves back to position ``axis``."""
    out = matrix @ rows.reshape(rows.shape[0], -1)
    out = np.asarray(out, dtype=np.float32).reshape((matrix.shape[0], *rows.shape[1:]))
    return np.moveaxis(out, 0, axis)


def _prefilter_rows(rows: np.ndarray, order: int) -> None:
    """B-spline prefilter of order 2..5 along the first axis, in place (recursive filters; Unser, 1999).

    Each pole runs a causal and an anti-causal first-order recursion over whole rows (vectorised over the other
    axes); start values assume the signal continues with its edge value, which the edge padding makes true.
    """
    n = rows.shape[0]
    rows = rows.reshape(n, -1)  # a view: rows is C-contiguous
    rows *= np.float32(np.prod([(1 - z) * (1 - 1 / z) for z in _POLES[order]]))
    tmp = np.empty_like(rows[0])
    for pole in _POLES[order]:
        z = np.float32(pole)
        rows[0] /= np.float32(1 - pole)
        for i in range(1, n):
            np.multiply(rows[i - 1], z, out=tmp)
            rows[i] += tmp
        rows[n - 1] *= np.float32(pole / (pole - 1))
        for i in range(n - 2, -1, -1):
            np.subtract(rows[i + 1], rows[i], out=tmp)
            np.multiply(tmp, z, out=rows[i])


def _resample_axis(volume: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """Resample one axis of a float volume; returns ``volume`` itself when the size does not change (interpolating
    splines reproduce the samples at integer positions), else a new float32 array (not necessarily contiguous)."""
    n_in = volume.shape[axis]
    if n_in == n_out:
        return volume
    if order not in _POLES and order > 1:
        raise ValueError(f"spline order {order} is not supported; use 0 to 5")
    moved = np.moveaxis(volume, axis, 0)
    if order < 2:
        return _apply_rows(np.ascontiguousarray(moved, dtype=np.float32), _weights(n_in, n_out, order), axis)
    pad = _spline_pad(order)
    rows = np.empty((n_in + 2 * pad, *moved.shape[1:]), np.float32)
    rows[pad : pad + n_in] = moved
    rows[:pad] = moved[0]
    rows[pad + n_in :] = moved[-1]
    _prefilter_rows(rows, order)
    return _apply_rows(rows, _weights(n_in, n_out, order), axis)


def _pass_order(shape: Sequence[int], new_shape: Sequence[int], axes: Sequence[int]) -> list[int]:
    """Axes that shrink most go first, so that later passes work on less data."""
    return sorted(axes, key=lambda a: new_shape[a] / shape[a])


def resample_axes(volume: np.ndarray, new_shape: Sequence[int], orders: Sequence[int]) -> np.ndarray:
    """Resample a spatial float volume (no channel axis) to ``new_shape`` with one spline order per axis.

    Returns a new float32 array; ``volume`` is not modified.
    """
    if len(new_shape) != volume.ndim or len(orders) != volume.ndim:
        raise ValueError(f"volume has {volume.ndim} axes; got new_shape {tuple(new_shape)} and orders {tuple(orders)}")
    out = np.asarray(volume, dtype=np.float32)
    for axis in _pass_order(volume.shape, new_shape, range(volume.ndim)):
        out = _resample_axis(out, axis, int(new_shape[axis]), int(orders[axis]))
    return np.array(out, dtype=np.float32, order="C", copy=True) if out is volume else np.ascontiguousarray(out)


def resample_image(
    image: np.ndarray,
    new_shape: Sequence[int],
    *,
    orders: Sequence[int],
    separate: int | None = None,
    clip: bool = True,
) -> np.ndarray:
    """Resample a (C, Z, Y, X) image (or probabilities) to spatial ``new_shape``.

    Parameters
    ----------
    image : (C, *spatial) array, any real dtype.
    new_shape : spatial output shape.
    orders : spline order per spatial axis (0 nearest, 1 linear, 3 cubic), see :func:`axis_orders`.
    separate : the separately resampled axis, or None. It is resampled last, after the other axes.
    clip : clip to the input's range, as skimage's ``resize`` does (per slice of ``separate`` when given, since
        those slices are resampled as 2D images): removes the overshoot of cubic splines.

    Returns
    -------
    (C, *new_shape) float32 array.
    """
    spatial = image.ndim - 1
    if len(new_shape) != spatial:
        raise ValueError(f"image has {spatial} spatial axes; new_shape {tuple(new_shape)} has {len(new_shape)}")
    out = np.empty((image.shape[0], *(int(n) for n in new_shape)), dtype=np.float32)
    in_plane = [a for a in range(spatial) if a != separate]
    for c in range(image.shape[0]):
        channel = np.asarray(image[c], dtype=np.float32)
        vol = channel
        for axis in _pass_order(channel.shape, new_shape, in_plane):
            vol = _resample_axis(vol, axis, int(new_shape[axis]), int(orders[axis]))
        if clip and separate is not None and vol is not channel:
            other = tuple(a for a in range(spatial) if a != separate)
            shape = [1] * spatial
            shape[separate] = -1
            np.clip(vol, channel.min(axis=other).reshape(shape), channel.max(axis=other).reshape(shape), out=vol)
        if separate is not None:
            vol = _resample_axis(vol, separate, int(new_shape[separate]), int(orders[separate]))
        if clip and separate is None and vol is not channel and channel.size:
            np.clip(vol, channel.min(), channel.max(), out=vol)
        out[c] = vol
    return out


class RowResampler:
    """:func:`resample_image` of one (Z, Y, X) channel (orders <= 1, ``clip=False``) computed a band of rows at a
    time along axis 0, with the same result: output rows come out as soon as the input rows they interpolate from
    are in, so a volume that arrives in bands (streamed prediction) never exists whole.

    The passes run in :func:`resample_image`'s order; the axis-0 pass applies the rows of its weight matrix that the
    band needs (the same weights, summed in the same order), the other passes act row by row.
    """

    def __init__(self, shape: Sequence[int], new_shape: Sequence[int], orders: Sequence[int], separate: int | None):
        if max(orders) > 1:
            raise ValueError(f"row-wise resampling needs interpolation orders <= 1 (no prefilter); got {tuple(orders)}")
        self.shape, self.new_shape = tuple(int(n) for n in shape), tuple(int(n) for n in new_shape)
        self.orders = tuple(int(o) for o in orders)
        in_plane = [a for a in range(len(self.shape)) if a != separate]
        self.passes = _pass_order(self.shape, self.new_shape, in_plane) + ([separate] if separate is not None else [])
        self.rows0: sparse.csr_matrix | None = None
        last = np.arange(self.shape[0])  # the last input row each output row reads (identity when not resized)
        if self.shape[0] != self.new_shape[0]:
            self.rows0 = _weights(self.shape[0], self.new_shape[0], self.orders[0])
            m = self.rows0
            last = np.array([m.indices[m.indptr[o] : m.indptr[o + 1]].max() for o in range(m.shape[0])])
            first = np.array([m.indices[m.indptr[o] : m.indptr[o + 1]].min() for o in range(m.shape[0])])
            self._first = first
        else:
            self._first = last
        self._last = np.maximum.accumulate(last)

    def ready(self, rows_in: int) -> int:
        """How many output rows can be computed once input rows ``[0, rows_in)`` are in."""
        return int(np.searchsorted(self._last, rows_in, side="left"))

    def first_input(self, out_row: int) -> int:
        """The first input row that output rows ``out_row`` and later read: earlier input rows can be dropped."""
        return int(self._first[out_row:].min()) if out_row < len(self._first) else self.shape[0]

    def rows(self, band: np.ndarray, band_start: int, start: int, stop: int) -> np.ndarray:
        """Output rows ``[start, stop)`` from ``band``, input rows ``[band_start, band_start + len(band))``."""
        vol = np.asarray(band, dtype=np.float32)
        if self.rows0 is None:  # axis 0 keeps its size: output row o is input row o
            vol = vol[start - band_start : stop - band_start]
        for axis in self.passes:
            if axis != 0:
                vol = _resample_axis(vol, axis, self.new_shape[axis], self.orders[axis])
            elif self.rows0 is not None:
                window = self.rows0[start:stop, band_start : band_start + vol.shape[0]]
                vol = _apply_rows(np.ascontiguousarray(vol), window, 0)
        return np.ascontiguousarray(vol, dtype=np.float32)


def _nearest(label: np.ndarray, new_shape: Sequence[int], axes: Sequence[int]) -> np.ndarray:
    for axis in axes:
        n_in, n_out = label.shape[axis], int(new_shape[axis])
        if n_in != n_out:
            index = np.clip(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)), 0, n_in - 1)  # round(coordinate)
            label = np.take(label, index.astype(np.intp), axis=axis)
    return label


def _block(matrices: list[sparse.csr_matrix | None], box: tuple[slice, ...]) -> tuple[list, tuple[slice, ...]]:
    """Sub-matrices that map input block ``box`` to the output rows it reaches, and those output rows."""
    subs: list[sparse.csr_matrix | None] = []
    out_box: list[slice] = []
    for matrix, sl in zip(matrices, box):
        if matrix is None:
            subs.append(None)
            out_box.append(sl)
            continue
        cols = matrix[:, sl.start : sl.stop]
        rows = np.flatnonzero(np.diff(cols.indptr))
        if rows.size == 0:  # the block falls between the samples of a strong downsampling
            return [], ()
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        subs.append(cols[r0:r1])
        out_box.append(slice(r0, r1))
    return subs, tuple(out_box)


def _label_dtype(max_value: int) -> np.dtype:
    for dtype in (np.uint8, np.int16, np.int32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def resample_label(label: np.ndarray, new_shape: Sequence[int], *, orders: Sequence[int]) -> np.ndarray:
    """Resample a (Z, Y, X) label map of non-negative integers to ``new_shape``.

    Axes with order 0 take the nearest voxel; axes with order 1 interpolate every label's indicator linearly and
    each output voxel takes the label with the highest score (exact ties: the nearest-neighbour label when it is
    among them, else the smallest). Only labels present in ``label`` can occur in the result. Work and memory
    are confined to the bounding box of the foreground.

    Returns a new array of ``label``'s dtype.
    """
    if label.ndim != len(new_shape) or len(orders) != label.ndim:
        raise ValueError(f"label has {label.ndim} axes; got new_shape {tuple(new_shape)} and orders {tuple(orders)}")
    if any(o not in (0, 1) for o in orders):
        raise ValueError(
            f"label maps are resampled with order 0 or 1 per axis; got {tuple(orders)} "
            "(set resampling.order_label / order_z to 0 or 1 in the plan)"
        )
    new_shape = tuple(int(n) for n in new_shape)
    dtype = label.dtype
    label = _nearest(label, new_shape, [a for a in range(label.ndim) if orders[a] == 0])
    linear = [a for a in range(label.ndim) if label.shape[a] != new_shape[a]]
    if not linear:
        return np.array(label, dtype=dtype, copy=True)
    if label.size and label.min() < 0:
        raise ValueError("resample_label needs non-negative label values")
    work = np.ascontiguousarray(label).astype(_label_dtype(int(label.max(initial=0))), copy=False)
    matrices = [_weights(label.shape[a], new_shape[a], 1) if a in linear else None for a in range(label.ndim)]
    blocks = []
    for value, box in enumerate(ndimage.find_objects(work), start=1):
        if box is not None:
            subs, out_box = _block(matrices, box)
            if out_box:
                blocks.append((value, box, subs, out_box))
    result = np.zeros(new_shape, dtype)
    if not blocks:
        return result
    # everything happens inside the union of the labels' output boxes; outside it background wins outright
    union = tuple(
        slice(min(b[3][a].start for b in blocks), max(b[3][a].stop for b in blocks)) for a in range(label.ndim)
    )
    result[union] = _arg_max(work, blocks, matrices, linear, union, _nearest(label, new_shape, linear)[union])
    return result


def _arg_max(
    work: np.ndarray, blocks: list, matrices: list, linear: list[int], union: tuple[slice, ...], nearest: np.ndarray
) -> np.ndarray:
    """Per-voxel winner over the labels' interpolated indicators inside ``union`` (see :func:`resample_label`)."""
    shape = nearest.shape
    best = np.zeros(shape, np.float32)  # best foreground score
    total = np.zeros(shape, np.float32)  # sum of foreground scores; background scores 1 - total
    near_score = np.zeros(shape, np.float32)  # score of the nearest-neighbour label
    result = np.zeros(shape, nearest.dtype)
    for value, box, subs, out_box in blocks:
        local = tuple(slice(o.start - u.start, o.stop - u.start) for o, u in zip(out_box, union))
        score = (work[box] == value).astype(np.float32)
        for axis in _pass_order(score.shape, [s.stop - s.start for s in out_box], linear):
            score = _apply_along(score, subs[axis], axis)
        b, r, n = best[local], result[local], near_score[local]
        wins = score > b
        np.copyto(b, score, where=wins)
        np.copyto(r, value, where=wins, casting="unsafe")
        total[local] += score
        np.copyto(n, score, where=nearest[local] == value)
    background = np.subtract(1.0, total, out=total)
    np.copyto(result, 0, where=background >= best, casting="unsafe")
    np.copyto(near_score, background, where=nearest == 0)
    np.maximum(best, background, out=best)
    np.copyto(result, nearest, where=near_score >= best)
    return result
