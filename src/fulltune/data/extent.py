"""How many records a data file holds, estimated without reading it whole (what plan sizes a run by).

- Parquet: the row count in the footer (on S3 a ranged read of the footer, not the file).
- Arrow: the record batches' row counts (memory-mapped: their headers, not their data); on S3 the
  rows of the batches in a prefix of PREFIX_BYTES (one ranged read), scaled by the file's size, as
  downloading the file to count would fetch all of it.
- JSONL and CSV, plain or gzipped: the records in a decoded prefix of at most PREFIX_BYTES, scaled
  by the file's decoded size. A gzipped file's decoded size is its size times the decompression
  ratio measured on that prefix: its size on disk is 5-15x smaller than the text it holds.
A file shorter than the prefix is counted exactly.

A dataset of more than SAMPLE_FILES files of one format is not looked into file by file: SAMPLE_FILES
of them, spread evenly over the sorted list, give its records per byte, and the format's total size
(from the listing) scales it. A folder of 10,000 files costs 64 reads, not 10,000 (40 GB when each
is over PREFIX_BYTES).
"""

from __future__ import annotations

import csv
import io
import zlib
from typing import Any

from fulltune import storage
from fulltune.data.records import CSV_FIELD_LIMIT, CSV_SUFFIXES

PREFIX_BYTES = 4 << 20  # decoded bytes looked at: thousands of records of ordinary length
GZIP_PREFIX_BYTES = 1 << 20  # compressed bytes read for them (text compresses ~3-15x)
FOOTER_READ = 64 << 10  # bytes pyarrow reads from a Parquet file's end at a time
SAMPLE_FILES = 64  # files of one format looked into; the others are counted by their size
# Formats whose files hold records at different densities per byte, longest suffix first.
FORMAT_SUFFIXES = (".jsonl.gz", ".csv.gz", ".parquet", ".arrow", ".csv")


def estimate_dataset(files: list[tuple[str, int]]) -> float:
    """The records in `files` (path, size in bytes): each file's `estimate_records` when a format has
    at most SAMPLE_FILES of them, else those of SAMPLE_FILES spread evenly, scaled by size."""
    by_format: dict[str, list[tuple[str, int]]] = {}
    for path, size in files:
        fmt = next((s for s in FORMAT_SUFFIXES if path.endswith(s)), "jsonl")
        by_format.setdefault(fmt, []).append((path, size))
    total = 0.0
    for group in by_format.values():
        if len(group) <= SAMPLE_FILES:
            total += sum(estimate_records(path, size) for path, size in group)
            continue
        sample = [group[i * len(group) // SAMPLE_FILES] for i in range(SAMPLE_FILES)]
        counted = sum(estimate_records(path, size) for path, size in sample)
        total += counted * sum(size for _, size in group) / max(sum(size for _, size in sample), 1)
    return total


def estimate_records(path: str, size: int | None = None) -> float:
    """The records in one data file (blank lines and a CSV header not counted); bad rows count.
    `size`: the file's size when known (else asked of storage, where needed)."""
    if path.endswith(".parquet"):
        return float(_parquet_rows(path))
    if path.endswith(".arrow"):
        return _arrow_rows(path, size)
    data, consumed, whole = decoded_prefix(path)
    is_csv = path.endswith(CSV_SUFFIXES)
    if whole:
        return float(_count(data, is_csv))
    complete = data[: data.rfind(b"\n") + 1]  # the last line may be cut off
    if not complete:
        return 1.0  # one record longer than the prefix
    decoded_size = len(data) * (storage.size(path) if size is None else size) / max(consumed, 1)
    return _count(complete, is_csv) * decoded_size / len(complete)


def decoded_prefix(path: str) -> tuple[bytes, int, bool]:
    """(the first decoded bytes of a text file, the bytes of the file they took, whether that is all
    of it); gzip is decompressed (concatenated members too)."""
    if not path.endswith(".gz"):
        data = storage.read_range(path, 0, PREFIX_BYTES + 1)
        whole = len(data) <= PREFIX_BYTES
        data = data[:PREFIX_BYTES]
        return data, len(data), whole
    raw = storage.read_range(path, 0, GZIP_PREFIX_BYTES + 1)
    read_all = len(raw) <= GZIP_PREFIX_BYTES
    out, consumed, ended = _gunzip(raw[:GZIP_PREFIX_BYTES], PREFIX_BYTES)
    return out, consumed, read_all and ended and consumed == len(raw)


def _gunzip(raw: bytes, limit: int) -> tuple[bytes, int, bool]:
    """(up to `limit` bytes decompressed from the gzip members in `raw`, the compressed bytes they
    took, whether the last member read was complete)."""
    out = bytearray()
    consumed, ended = 0, False
    while consumed < len(raw) and len(out) < limit:
        d = zlib.decompressobj(wbits=31)
        try:
            out += d.decompress(raw[consumed:], limit - len(out))
        except zlib.error:
            break  # not gzip, or cut off mid-header: what came before stands
        rest = len(d.unconsumed_tail) + len(d.unused_data)
        consumed = len(raw) - rest
        ended = d.eof
        if not d.eof:
            break
    return bytes(out), consumed, ended


def _count(data: bytes, is_csv: bool) -> int:
    """Records in whole lines of JSONL (non-blank lines) or CSV (rows after the header, quoted
    newlines inside a field kept in it)."""
    if not is_csv:
        return sum(1 for line in data.splitlines() if line.strip())
    csv.field_size_limit(CSV_FIELD_LIMIT)
    text = io.StringIO(data.decode("utf-8-sig", errors="replace"), newline="")
    rows = 0
    try:
        for row in csv.reader(text):
            rows += any(cell.strip() for cell in row)
    except csv.Error:
        pass  # a broken row: validate_data says where; the rows before it stand
    return max(rows - 1, 0)


def _parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    try:
        if not storage.is_s3(path):
            return pq.read_metadata(path).num_rows
        with io.BufferedReader(_RangedFile(path), FOOTER_READ) as fh:
            return pq.read_metadata(fh).num_rows
    except Exception:  # pyarrow's errors for a broken file: validate_data reports it (unreadable_file)
        return 0


def _arrow_rows(path: str, size: int | None = None) -> float:
    from fulltune.data.records import ArrowBatch, iter_arrow_batches

    if storage.is_s3(path) and (prefix := _arrow_prefix_rows(path, size)) is not None:
        return prefix
    return float(sum(b.batch.num_rows for b in iter_arrow_batches(path) if isinstance(b, ArrowBatch)))


def _arrow_prefix_rows(path: str, size: int | None) -> float | None:
    """The rows of an Arrow stream scaled from the batches whole in its first PREFIX_BYTES; None
    when none is (a batch longer than the prefix, or the file format, whose batches need a footer)."""
    import pyarrow as pa

    data = storage.read_range(path, 0, PREFIX_BYTES)
    source = pa.BufferReader(data)
    rows = used = 0
    try:
        for batch in pa.ipc.open_stream(source):
            rows, used = rows + batch.num_rows, source.tell()
    except Exception:  # the prefix ends inside a batch, or this is no stream: what was read stands
        pass
    if not used:
        return None
    if len(data) < PREFIX_BYTES:  # the whole file
        return float(rows)
    return rows * (storage.size(path) if size is None else size) / used


class _RangedFile(io.RawIOBase):
    """An S3 object as a seekable file whose reads are ranged GETs: a Parquet footer costs a couple
    of requests, not the object."""

    def __init__(self, uri: str):
        self.uri, self.pos, self.length = uri, 0, storage.size(uri)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        data = storage.read_range(self.uri, self.pos, min(len(buffer), self.length - self.pos))
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)
