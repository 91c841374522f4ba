"""A large local JSONL file checked in byte spans of whole lines on worker processes.

Each worker checks its span with lines numbered from 1 at its start and returns its `Tally` (the
examples keep their Location) with the content digests and line numbers of its good records; the
parent folds the spans in file order, shifting line numbers, and judges duplicates and train/eval
overlap over the whole dataset itself, so the report is byte for byte the one a single process
writes (tests/test_bad_inputs.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fulltune import storage
from fulltune.config import CheckPolicy, DataSection
from fulltune.data.records import WIDE_PEEK, Location, encoding_problem, jsonl_spans
from fulltune.data.validate.duplicates import DeferredDuplicates
from fulltune.data.validate.formats import check_jsonl_file
from fulltune.data.validate.rows import RowCheck
from fulltune.data.validate.tally import Tally

log = logging.getLogger(__name__)

PARALLEL_MIN_BYTES = 64 << 20  # a JSONL file gets one more worker per this many bytes
PARALLEL_SPAN_BYTES = 256 << 20  # at most this much per span (spans are merged in order)
# Without data.validate_workers: at most this many (~250 MB each), so that a step without a CPU
# limit on a large node does not start one per core.
DEFAULT_MAX_WORKERS = 8


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a pod's limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def span_workers(cfg: DataSection, path: str) -> int:
    """Processes for one JSONL file on the fast path: >1 only for a large, local, uncompressed
    file without near-duplicate detection (whose index is inherently sequential)."""
    if cfg.near_duplicates or storage.is_s3(path) or path.endswith(".gz"):
        return 1
    try:
        size = os.path.getsize(path)
    except OSError:
        return 1
    workers = cfg.validate_workers or min(usable_cpus(), DEFAULT_MAX_WORKERS)
    return max(1, min(workers, size // PARALLEL_MIN_BYTES))


@dataclass
class SpanJob:
    """What a worker needs to check one span: the dataset's settings and the span."""

    cfg: DataSection
    checks: dict[str, CheckPolicy]
    special: tuple[str, ...]
    kind: str | None
    path: str
    fields: list[str]
    span: tuple[int, int]


@dataclass
class SpanResult:
    tally: Tally
    keys: np.ndarray  # content digests of the span's good records, in order
    lines: np.ndarray  # their line numbers, from 1 at the span's start
    line_count: int  # lines in the span


def check_jsonl_parallel(rows: RowCheck, file_index: int, path: str, fields: list[str], workers: int) -> bool:
    """One file in spans checked by worker processes, merged in file order into `rows`; True when
    the file broke off."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with open(path, "rb") as fh:
        # every span would fail line by line: one reader names it
        if encoding_problem(path, fh.read(WIDE_PEEK)):
            return check_jsonl_file(rows, file_index, path, fields).broken
    parts = max(workers, -(-os.path.getsize(path) // PARALLEL_SPAN_BYTES))
    jobs = [
        SpanJob(rows.cfg, rows.tally.checks, rows.special, rows.kind, path, fields, span)
        for span in jsonl_spans(path, parts)
    ]
    base = 1  # the file's line number of the current span's first line
    merged = 0
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            for res in pool.map(check_span, jobs):
                _merge_span(rows, file_index, path, res, base)
                base += res.line_count
                merged += 1
    except BrokenProcessPool:
        if merged:
            raise
        # no worker started (e.g. a script without `if __name__ == "__main__":`, which spawned
        # processes re-import): one process does the work instead
        log.warning("validate_data: worker processes failed to start; checking %s in one process", path)
        return check_jsonl_file(rows, file_index, path, fields).broken
    return False


def check_span(job: SpanJob) -> SpanResult:
    """Worker: check the lines of one byte span of a JSONL file (numbered from 1 at its start);
    duplicates are left to the parent, which sees the whole dataset."""
    tally = Tally(job.checks, job.cfg.max_examples, keep_locations=True)
    duplicates = DeferredDuplicates()
    rows = RowCheck(job.cfg, job.kind, tally, job.special, duplicates)
    read = check_jsonl_file(rows, 0, job.path, job.fields, job.span)
    keys, lines = duplicates.collected()
    return SpanResult(tally, keys, lines, read.lines)


def _merge_span(rows: RowCheck, file_index: int, path: str, res: SpanResult, base: int) -> None:
    """Fold one span's results into the dataset's, its lines shifted to start at `base`."""
    rows.tally.merge(res.tally, base - 1)
    lines = res.lines + (base - 1)
    rows.duplicates.judge(file_index, res.keys, lines, lambda i: Location(path, line=int(lines[i])))
