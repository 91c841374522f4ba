"""Record lengths in the report: min/p50/p95/max and a power-of-two histogram."""

from __future__ import annotations

from array import array

import numpy as np


def length_histogram(lengths: array) -> list[dict[str, int]]:
    """Record counts by length in characters, in power-of-two bins: [{"lo", "hi", "count"}]."""
    if not len(lengths):
        return []
    values = np.asarray(lengths, dtype=np.int64)
    bits = np.searchsorted(
        np.left_shift(1, np.arange(63, dtype=np.int64)), values, side="right"
    )  # bit_length
    counts = np.bincount(bits)
    return [
        {"lo": 0 if b == 0 else 1 << (b - 1), "hi": (1 << b) - 1, "count": int(counts[b])}
        for b in range(int(bits.min()), int(bits.max()) + 1)
    ]


def length_stats(lengths: array) -> dict[str, int] | None:
    if not lengths:
        return None
    ordered = np.sort(np.asarray(lengths, dtype=np.int64))
    return {
        "min": int(ordered[0]),
        "p50": int(percentile(ordered, 50)),  # type: ignore[arg-type]
        "p95": int(percentile(ordered, 95)),  # type: ignore[arg-type]
        "max": int(ordered[-1]),
    }


def percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending, non-empty list."""
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]
