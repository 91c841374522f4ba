"""Where the GPU waited: the idle gaps between kernels in a profiled window, and the host code that ran
during them.

A step bound by the host shows up as a device that is idle part of the time (GPU runs 2-4,
docs/benchmarks.md). The operator table says how long the kernels took, not where the device waited;
this module reads the profiler's events for that:

- the device's busy time as the union of its kernels' intervals (kernels on several streams that
  overlap count once);
- the idle gaps, counted by size: many short ones are launch overhead spread over the step, a few
  long ones are the host doing something else (a hook, a sync, the loop between steps);
- for each gap of at least `min_gap_us`, the host frame that spanned its middle: the innermost
  Python frame outside torch (with `with_stack=True`; without it, the innermost operator). The idle
  time is added up per frame, so the host code that kept the device waiting longest comes first.

Pure functions over (start, end) intervals in microseconds; `profile_gaps` adapts
`torch.profiler`'s events to them.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from dataclasses import dataclass

# Gap sizes to count: under 0.1 ms is the time between two launches; over 1 ms, the host was elsewhere.
GAP_BINS_US = (100.0, 1000.0)
LONGEST = 8  # gaps listed one by one with their place in the window
TORCH_FRAMES = ("torch/", "aten::", "<built-in", "cuda", "autograd::", "nn.Module:")


@dataclass(frozen=True)
class HostSpan:
    """An interval the host spent in one Python frame or operator."""

    start: float
    end: float
    name: str


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of the intervals, as sorted disjoint intervals."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def idle_gaps(kernels: list[tuple[float, float]], window: tuple[float, float]) -> list[tuple[float, float]]:
    """The intervals of `window` in which no kernel ran."""
    gaps, cursor = [], window[0]
    for start, end in merge(kernels):
        start, end = max(start, window[0]), min(end, window[1])
        if start > cursor:
            gaps.append((cursor, start))
        cursor = max(cursor, end)
    if window[1] > cursor:
        gaps.append((cursor, window[1]))
    return gaps


def innermost(spans: list[HostSpan], starts: list[float], at: float, lookback: int = 20_000) -> str:
    """The name of the innermost span containing time `at` (spans sorted by start; `starts` their
    starts). A thread's spans nest, so the innermost is the one that started last; across threads the
    latest is where the host was busiest (the autograd thread's hooks while the main thread waits in
    `backward`)."""
    last = bisect.bisect_right(starts, at) - 1
    before: HostSpan | None = None  # the span that ended last before `at`
    for i in range(last, max(-1, last - lookback), -1):
        if spans[i].end >= at:
            return spans[i].name
        if before is None or spans[i].end > before.end:
            before = spans[i]
    # The host was in no recorded frame (C++ without Python above it, or the profiler itself): what
    # it finished last says where in the step that was.
    return f"(no frame recorded; after {before.name})" if before else "(no frame or operator recorded)"


def summarise(
    kernels: list[tuple[float, float]],
    spans: list[HostSpan],
    window: tuple[float, float],
    min_gap_us: float = 200.0,
    top: int = 12,
) -> str:
    """A text report: busy fraction, gap counts by size, and idle time per host frame, largest first."""
    wall = window[1] - window[0]
    if wall <= 0 or not kernels:
        return "no device kernels recorded\n"
    gaps = idle_gaps(kernels, window)
    busy = wall - sum(e - s for s, e in gaps)
    lines = [f"device busy {busy / wall:.1%} of {wall / 1e3:,.1f} ms (union of kernels); idle gaps:"]
    edges = (0.0, *GAP_BINS_US, float("inf"))
    for lo, hi in itertools.pairwise(edges):
        sizes = [e - s for s, e in gaps if lo <= e - s < hi]
        label = f"{lo / 1e3:g}-{hi / 1e3:g} ms" if hi != float("inf") else f"over {lo / 1e3:g} ms"
        lines.append(f"  {label}: {len(sizes)} gaps, {sum(sizes) / 1e3:,.1f} ms")
    spans = sorted(spans, key=lambda s: s.start)
    starts = [s.start for s in spans]
    per_frame: dict[str, list[float]] = defaultdict(list)
    for s, e in gaps:
        if e - s >= min_gap_us:
            per_frame[innermost(spans, starts, (s + e) / 2)].append(e - s)
    ranked = sorted(per_frame.items(), key=lambda kv: -sum(kv[1]))[:top]
    lines.append(
        f"idle time in gaps of {min_gap_us / 1e3:g} ms or more, by the host frame at each gap's middle:"
    )
    lines += [f"  {sum(v) / 1e3:8.1f} ms  {len(v):5d} gaps  {name}" for name, v in ranked]
    longest = sorted(gaps, key=lambda g: g[0] - g[1])[:LONGEST]
    lines.append(f"the {len(longest)} longest gaps, by when they began in the window:")
    lines += [
        f"  at {(s - window[0]) / 1e3:8.1f} ms: {(e - s) / 1e3:6.1f} ms  {innermost(spans, starts, (s + e) / 2)}"
        for s, e in sorted(longest)
    ]
    return "\n".join(lines) + "\n"


def profile_gaps(events, min_gap_us: float = 200.0) -> str:
    """`summarise` over a finished `torch.profiler.profile`'s `events()`: its device kernels, and its
    Python frames and operators on the host."""
    kernels, spans, host = [], [], []
    for e in events:
        interval = (e.time_range.start, e.time_range.end)
        if str(e.device_type).endswith("CUDA"):
            kernels.append(interval)
            continue
        host.append(interval)
        if not e.name.startswith(("cuda", "<built-in")):  # runtime calls: what was launched, not who
            spans.append(HostSpan(*interval, outside_torch(e)))
    if not host:
        return "no events recorded\n"
    window = (min(s for s, _ in host), max(e for _, e in host))
    return summarise(kernels, spans, window, min_gap_us)


def outside_torch(event) -> str:
    """The nearest frame, this one or an enclosing one, outside torch and its runtime: a gap spent in
    `torch/nn/modules/module.py: named_modules` is worth acting on once it is known which library's
    hook called it, and keying by that library frame keeps one hook's gaps in one row."""
    frame = event
    while frame is not None and frame.name.startswith(TORCH_FRAMES):
        frame = frame.cpu_parent
    return frame.name if frame is not None else event.name
