"""Statistics over cases: confidence intervals of a mean over cases, and for comparing two methods evaluated on the
same cases."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_mean", "paired_bootstrap"]

#: Resamples drawn per vectorised block, so memory stays bounded (block x n_cases indices) for many cases.
_BLOCK_ELEMENTS = 4_000_000


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval of the mean paired difference ``a - b`` over cases.

    Cases are resampled with replacement (pairs stay together), ``n_resamples`` times, with
    ``np.random.default_rng(seed)``; the interval is given by the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of the resampled means.

    Parameters
    ----------
    a, b : one value per case (for example the Dice of two models), same length, finite.
    n_resamples : number of bootstrap resamples.
    seed : seed of the random generator; the same seed gives the same interval.
    confidence : coverage of the interval, in (0, 1).

    Returns
    -------
    (mean_diff, low, high) : the observed mean of ``a - b`` and the interval bounds.
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.ndim != 1 or a_arr.shape != b_arr.shape:
        raise ValueError(f"a and b must be 1D with one value per case; got shapes {a_arr.shape} and {b_arr.shape}")
    if a_arr.size == 0:
        raise ValueError("a and b are empty; need at least one case")
    if not (np.all(np.isfinite(a_arr)) and np.all(np.isfinite(b_arr))):
        raise ValueError("a and b contain NaN or Inf (undefined metrics); drop or replace those cases first")
    return bootstrap_mean(a_arr - b_arr, n_resamples=n_resamples, seed=seed, confidence=confidence)


def bootstrap_mean(
    values: Sequence[float] | np.ndarray, *, n_resamples: int = 10000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (one finite value per case).

    Cases are resampled with replacement ``n_resamples`` times with ``np.random.default_rng(seed)``; returns
    ``(mean, low, high)``, the bounds being the ``(1 -+ confidence) / 2`` quantiles of the resampled means.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be 1D with at least one case; got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("values contain NaN or Inf (undefined metrics); drop or replace those cases first")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1; got {n_resamples}")
    n = values.size
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // n)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(values.mean()), float(low), float(high)
