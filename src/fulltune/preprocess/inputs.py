"""Which part of the input each shard reads: blocks, and the split of the input into N shards.

A *block* is the unit every later decision is made in (eval split, replay, packing), and it is
defined by the input alone, never by the number of shards, so N=1 and N=4 produce the same
multiset of sequences. A block is keyed by the record's place in its file, not by a global record
count (which no shard could know without reading everything before its part):

- uncompressed JSON Lines (`.jsonl`, `.json`): block k of a file is the lines whose first byte lies in
  [k*B, (k+1)*B). B is `block_records` times the file's mean line length, measured on its first
  `SAMPLE_BYTES` (the same bytes every time, so B is stable for the same file), and at most
  `BLOCK_TEXT_CAP` bytes;
- Parquet: the rows of one row group, `block_records` at a time, a block ending early once its
  records hold `BLOCK_TEXT_CAP` characters;
- everything else (`.jsonl.gz`, `.csv`, `.arrow`: not splittable): the file's rows, in blocks ended
  the same way.

The cap bounds a shard's memory by the text it holds, not by a count of records: tokenizing and
packing a block costs tens of bytes per character, so 2,048 records of 50 KB (one 100 MB block)
took 5 GB, and longer records would exceed the step pod's memory. It is a constant, as
`block_records` is a setting: the blocks, and so the output, depend on the data and the config alone.

*Splitting*: the input's files, in sorted order, are laid end to end (total size T, from their
sizes alone). Shard i of N owns the bytes [i*T/N, (i+1)*T/N) and reads every unit that *starts* there:
a JSONL block (starting at its byte offset), a Parquet row group (starting at its share of the file's
rows, mapped onto its bytes), or a whole unsplittable file. Each unit belongs to exactly one shard,
so a shard reads about 1/N of the input: by file when there are many files, by row group or byte
range inside a large one; a file is shared only where a shard boundary falls inside it. Reads are
ranged (`seek`, or an HTTP Range request on S3), so neither a shard's download nor its parsing
covers other shards' bytes. Only the file sizes (from the folder's listing: no request per file on
S3) and, per file a shard reads, its first `SAMPLE_BYTES` (JSONL) or footer (Parquet) are looked at
to plan.

`ReadStats` counts the bytes actually read from storage; the shard manifest reports it.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from fulltune import storage
from fulltune.config import DataSection
from fulltune.data.records import (
    Location,
    RawRecord,
    Record,
    RecordError,
    data_file_sizes,
    iter_raw_file,
    normalize,
)

log = logging.getLogger(__name__)

SAMPLE_BYTES = 1 << 16  # head of a JSONL file measured for its mean line length
READ_BUFFER = 1 << 18
PARQUET_BATCH_ROWS = 1024
# The most text a block holds: bytes of a JSONL file (at least its characters), characters of the
# records elsewhere. Ordinary blocks (2,048 records of a few KB) are below it. (The description
# of preprocess.block_records states it.)
BLOCK_TEXT_CAP = 8 << 20
_BOM = b"\xef\xbb\xbf"


def file_format(path: str) -> str:
    """'jsonl' (split by byte range), 'parquet' (by row group) or 'file' (read whole)."""
    if path.endswith((".jsonl", ".json")):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    return "file"


@dataclass
class ReadStats:
    """Bytes read from storage (including read-ahead and planning), and blocks produced."""

    bytes_read: int = 0
    blocks: int = 0


class _CountingRaw(io.RawIOBase):
    """A raw, optionally seekable stream over a local file or an S3 object, counting bytes read.

    On S3 each `readinto` after a seek is one ranged GET streamed until the next seek, so a
    sequential read is one request and a Parquet reader's seeks fetch only the ranges it asks for.
    """

    def __init__(self, uri: str, stats: ReadStats, size: int | None = None):
        self.uri, self.stats = uri, stats
        self._pos = 0
        self._local: IO[bytes] | None = None
        self._body: Any = None
        self._size = size
        if not storage.is_s3(uri):
            self._local = open(uri, "rb", buffering=0)  # noqa: SIM115 - closed in close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _length(self) -> int:
        if self._size is None:
            self._size = storage.size(self.uri)
        return self._size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            offset += self._length()
        if offset != self._pos:
            self._drop_body()
            if self._local is not None:
                self._local.seek(offset)
        self._pos = offset
        return offset

    def readinto(self, buffer: Any) -> int:
        if self._local is not None:
            n = self._local.readinto(buffer)
        else:
            if self._body is None:
                if self._pos >= self._length():
                    return 0
                bucket, key = storage.split_s3(self.uri)
                with storage.s3_errors(self.uri):
                    self._body = storage.s3_client().get_object(
                        Bucket=bucket, Key=key, Range=f"bytes={self._pos}-"
                    )["Body"]
            data = self._body.read(len(buffer))
            n = len(data)
            buffer[:n] = data
        self._pos += n
        self.stats.bytes_read += n
        return n

    def _drop_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop_body()
        if self._local is not None:
            self._local.close()
        super().close()


def open_counted(uri: str, stats: ReadStats, size: int | None = None, buffer: int = READ_BUFFER):
    return io.BufferedReader(_CountingRaw(uri, stats, size), buffer)


# -- planning -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """What a shard reads: a run of JSONL blocks, one Parquet row group, or a whole file."""

    file_index: int
    path: str
    fmt: str
    size: int
    first: int = 0  # jsonl: first block; parquet: row group
    last: int = 0  # jsonl: one past the last block
    block_bytes: int = 0  # jsonl: B
    meta: Any = field(default=None, compare=False, repr=False)  # parquet: the footer, read once


def _jsonl_block_bytes(path: str, size: int, block_records: int, stats: ReadStats) -> int:
    with open_counted(path, stats, size, buffer=SAMPLE_BYTES) as fh:
        head = fh.read(SAMPLE_BYTES)
    lines = head.count(b"\n")
    if not lines:  # one line longer than the sample (or no newline at all): blocks of the cap
        return BLOCK_TEXT_CAP
    return max(1, min(BLOCK_TEXT_CAP, round(block_records * len(head) / lines)))


def _parquet_meta(path: str, size: int, stats: ReadStats):
    """The file's footer, or None for a file Parquet cannot read (validate_data reports it)."""
    import pyarrow.parquet as pq

    with _CountingRaw(path, stats, size) as fh:  # unbuffered: Parquet reads exact ranges
        try:
            return pq.ParquetFile(fh).metadata
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends
            log.warning("%s: not a readable Parquet file, skipped: %s", path, exc)
            return None


def plan_shard(uri: str, block_records: int, index: int, num_shards: int, stats: ReadStats) -> list[Unit]:
    """The units shard `index` of `num_shards` reads from `uri`, in input order."""
    listed = data_file_sizes(uri)
    files, sizes = [f for f, _ in listed], [n for _, n in listed]
    total = sum(sizes)
    lo, hi = index * total // num_shards, (index + 1) * total // num_shards
    units: list[Unit] = []
    offset = 0
    for fi, (path, size) in enumerate(zip(files, sizes, strict=True)):
        start, offset = offset, offset + size
        if size == 0 or start >= hi or offset <= lo:
            continue
        fmt = file_format(path)
        if fmt == "jsonl":
            b = _jsonl_block_bytes(path, size, block_records, stats)
            count = -(-size // b)
            first = max(0, -(-(lo - start) // b))
            last = min(count, -(-(hi - start) // b))
            if first < last:
                units.append(Unit(fi, path, fmt, size, first, last, b))
        elif fmt == "parquet":
            meta = _parquet_meta(path, size, stats)
            if meta is None:
                continue
            rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            before, total_rows = 0, max(sum(rows), 1)
            for rg, n in enumerate(rows):
                at = start + size * before // total_rows
                before += n
                if n and lo <= at < hi:
                    units.append(Unit(fi, path, fmt, size, rg, meta=meta))
        elif lo <= start < hi:
            units.append(Unit(fi, path, fmt, size))
    return units


# -- reading ---------------------------------------------------------------------------------------

BlockKey = tuple[int, int, int]  # (file index, block or row group, block within the row group / file)


def block_name(key: BlockKey) -> str:
    return "{}:{}:{}".format(*key)


def read_blocks(
    units: list[Unit], cfg: DataSection, kind: str, block_records: int, stats: ReadStats
) -> Iterator[tuple[BlockKey, list[Record]]]:
    """(key, records) for every non-empty block of the units, in input order; bad rows skipped."""
    parquet: tuple[str, Any, Any] | None = None  # (path, open file, ParquetFile): row groups share it
    for unit in units:
        if parquet is not None and parquet[0] != unit.path:
            parquet[1].close()
            parquet = None
        if unit.fmt == "jsonl":
            blocks = _jsonl_blocks(unit, cfg, kind, stats)
        elif unit.fmt == "parquet":
            if parquet is None:
                import pyarrow.parquet as pq

                fh = _CountingRaw(unit.path, stats, unit.size)
                parquet = (unit.path, fh, pq.ParquetFile(fh, metadata=unit.meta))
            blocks = _parquet_blocks(unit, parquet[2], cfg, kind, block_records)
        else:
            blocks = _file_blocks(unit, cfg, kind, block_records, stats)
        for key, recs in blocks:
            if recs:
                stats.blocks += 1
                yield key, recs
    if parquet is not None:
        parquet[1].close()


def _good(raw: RawRecord, kind: str, cfg: DataSection) -> Record | None:
    try:
        return normalize(raw, kind, cfg)
    except RecordError:
        return None


def _jsonl_blocks(unit: Unit, cfg: DataSection, kind: str, stats: ReadStats):
    """Lines whose first byte lies in [first*B, last*B), grouped by block (line start // B)."""
    b = unit.block_bytes
    start, end = unit.first * b, min(unit.last * b, unit.size)
    loc = Location(unit.path)
    with open_counted(unit.path, stats, unit.size) as fh:
        pos = start
        if start:
            fh.seek(start - 1)
            pos = start - 1 + len(fh.readline())  # the rest of a line that began before `start`
        block, recs = pos // b, []
        while pos < end:
            line = fh.readline()
            if not line:
                break
            k, at = pos // b, pos
            pos += len(line)
            if k != block:
                yield (unit.file_index, block, 0), recs
                block, recs = k, []
            if at == 0 and line.startswith(_BOM):
                line = line[len(_BOM) :]
            value = _parse_line(line)
            if value is not None:
                rec = _good(RawRecord(loc, value=value), kind, cfg)
                if rec is not None:
                    recs.append(rec)
        yield (unit.file_index, block, 0), recs


def _parse_line(line: bytes) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        value = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # bad JSON or UTF-8: validate_data has counted it
        return None
    return value if isinstance(value, dict) else None


def _parquet_blocks(unit: Unit, pf: Any, cfg: DataSection, kind: str, block_records: int):
    """One row group's rows, in blocks (`_grouped`)."""
    loc = Location(unit.path, row_group=unit.first)

    def rows() -> Iterator[Record | None]:
        row = 0
        batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[unit.first])
        while True:
            try:
                batch = next(batches, None)
            except Exception as exc:  # a corrupt page: the rest of the row group cannot be trusted
                log.warning(
                    "%s row group %d: unreadable after row %d, rest skipped: %s",
                    unit.path,
                    unit.first,
                    row,
                    exc,
                )
                return
            if batch is None:
                return
            for value in batch.to_pylist():
                row += 1
                yield _good(RawRecord(loc, value=value), kind, cfg)

    for k, recs in enumerate(_grouped(rows(), block_records)):
        yield (unit.file_index, unit.first, k), recs


def _file_blocks(unit: Unit, cfg: DataSection, kind: str, block_records: int, stats: ReadStats):
    """An unsplittable file (gzip, CSV, Arrow), read whole through the validator's reader, in blocks
    (`_grouped`)."""
    stats.bytes_read += unit.size
    rows = (_good(raw, kind, cfg) for raw in iter_raw_file(unit.path))
    for k, recs in enumerate(_grouped(rows, block_records)):
        yield (unit.file_index, 0, k), recs


def _grouped(rows: Iterator[Record | None], block_records: int) -> Iterator[list[Record]]:
    """Consecutive rows in blocks of `block_records` rows (a bad one, None, counts too) or of
    `BLOCK_TEXT_CAP` characters of records, whichever is reached first."""
    recs: list[Record] = []
    n = chars = 0
    for rec in rows:
        n += 1
        if rec is not None:
            recs.append(rec)
            chars += record_chars(rec)
        if n == block_records or chars >= BLOCK_TEXT_CAP:
            yield recs
            recs, n, chars = [], 0, 0
    if n:
        yield recs


def record_chars(rec: Record) -> int:
    """The characters of a record's text (what tokenizing and packing it costs memory for)."""
    if rec.kind == "text":
        return len(rec.text or "")
    if rec.kind == "prompt_completion":
        return len(rec.prompt or "") + len(rec.completion or "")
    return sum(len(m["content"]) for m in rec.messages)
