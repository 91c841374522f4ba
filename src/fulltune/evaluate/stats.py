"""Paired bootstrap confidence intervals over eval examples.

Base and tuned are scored on the same examples, so every resample draws one set of example indices
(with replacement, from a seeded generator) and recomputes both models' statistics on it: the
interval is that of the *difference*, with the noise the two models share cancelled. The interval is
the percentile one (2.5th and 97.5th percentile of the resampled statistic for 95%).

Everything here is numpy on small arrays (one number per example), so 1000 resamples of 512
sequences take milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np


class Interval(NamedTuple):
    """A point estimate with its bootstrap percentile interval (NaN bounds when not computed)."""

    estimate: float
    low: float
    high: float

    @property
    def known(self) -> bool:
        return bool(np.isfinite(self.low) and np.isfinite(self.high))


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] example indices drawn with replacement; the same for the same (n, seed)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(resamples, n))


def bootstrap(
    statistic: Callable[[Any], np.ndarray],
    n: int,
    *,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> Interval:
    """Percentile interval of `statistic`, which maps an index array ([n] or [R, n]) to its value(s).

    `statistic(np.arange(n))` is the point estimate; `statistic(indices)` with [R, n] indices must
    return R values (vectorised over the first axis). NaN resamples are ignored. Fewer than two
    examples give no interval: every resample of one example is that example, and the zero-width
    interval would claim a certainty one sequence or question cannot give.
    """
    estimate = float(statistic(np.arange(n)))
    if resamples <= 0 or n < 2:
        return Interval(estimate, float("nan"), float("nan"))
    values = np.asarray(statistic(resample_indices(n, resamples, seed)), dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Interval(estimate, float("nan"), float("nan"))
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return Interval(estimate, float(low), float(high))


def ratio_of_sums(sums: np.ndarray, counts: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A statistic: sum(sums[idx]) / sum(counts[idx]) along the last axis (token-mean loss)."""

    def statistic(idx: np.ndarray) -> np.ndarray:
        total = counts[idx].sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(total > 0, sums[idx].sum(axis=-1) / np.maximum(total, 1), np.nan)

    return statistic
