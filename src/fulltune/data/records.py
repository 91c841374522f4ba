"""Reading training records from JSONL, Parquet, CSV and Hugging Face `save_to_disk` directories,
with the exact location of every record.

Three record kinds are understood:
- `text`: one document, `{"text": "..."}`;
- `prompt_completion`: `{"prompt": "...", "completion": "..."}`;
- `chat`: `{"messages": [{"role": "user", "content": "..."}, ...]}`; in CSV (or any string column)
  the cell holds that list as JSON text, e.g. `"[{""role"": ""user"", ""content"": ""hi""}, ...]"`.
Column names are mapped through `DataSection` (`text_field`, ...). Unless the config names the
kind, it is detected from the first parseable record whose fields name one (`resolve_kind`).

`iter_raw` yields every row with its location (file and 1-based line for JSONL and CSV, or 0-based
row for Parquet and Arrow),
either parsed or with a coded error — it never raises for a bad record, so validation can count
them all. `iter_records` yields only good, normalised records (what preprocessing consumes).
Everything streams: JSONL in blocks of whole lines (`iter_jsonl_blocks`; gzip too), CSV row by
row, Parquet and Arrow in batches (`iter_arrow_batches`); nothing is loaded whole. A CSV file's first row names the columns; a Hugging Face `save_to_disk` directory
(`state.json`, `dataset_info.json`, `data-*.arrow`) is read through its Arrow files.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from fulltune import storage
from fulltune.config import DataSection

DATA_PATTERNS = ("*.jsonl", "*.jsonl.gz", "*.json", "*.parquet", "*.csv", "*.csv.gz", "*.arrow")
CSV_SUFFIXES = (".csv", ".csv.gz")  # read by _iter_csv; everything not Parquet, Arrow or CSV is JSONL
# Python's csv module refuses a field over 128 KiB and then reads on from inside it, each later line of
# that one document a record of its own. A record's length is data.max_chars' business (too_long).
CSV_FIELD_LIMIT = 2**31 - 1  # the largest the module takes on every platform (a C long)
# Codes of a RawRecord that is no record: the file ends there (nothing after it is read).
FILE_ERRORS = frozenset({"unreadable_file", "wrong_encoding"})
# Metadata of a Hugging Face `save_to_disk` directory: not records.
HF_METADATA = frozenset({"state.json", "dataset_info.json", "dataset_dict.json"})
PARQUET_BATCH_ROWS = 8192
JSONL_BLOCK_BYTES = 4 << 20  # bytes of whole lines read (and checked) at a time
READ_BUFFER = 1 << 20
KIND_SCAN_LIMIT = 1000  # parseable records `resolve_kind` looks at before giving up
_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A dataset that cannot be read at all (missing, unknown format); names the URI."""


@dataclass(frozen=True)
class Location:
    """Where a record lives: `file:line` for JSONL (1-based, as editors count), `file row N` for
    Parquet (0-based, as pyarrow and pandas index), or just the file."""

    file: str
    line: int | None = None  # JSONL: 1-based line
    row_group: int | None = None  # Parquet
    row: int | None = None  # Parquet: 0-based row within the file

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.row is not None:
            return f"{self.file} row {self.row}"
        return self.file


@dataclass
class RawRecord:
    loc: Location
    value: dict[str, Any] | None = None
    code: str | None = None  # set when the row could not be parsed
    reason: str | None = None


@dataclass
class Record:
    kind: str  # text | prompt_completion | chat
    loc: Location
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def plain_text(self) -> str:
        """All the record's text, for length and vocabulary statistics."""
        if self.kind == "text":
            return self.text or ""
        if self.kind == "prompt_completion":
            return f"{self.prompt}\n{self.completion}"
        return "\n".join(m["content"] for m in self.messages)


class RecordError(ValueError):
    def __init__(self, code: str, reason: str, loc: Location):
        super().__init__(f"{loc}: {code}: {reason}")
        self.code, self.reason, self.loc = code, reason, loc


@dataclass(frozen=True)
class DataFiles:
    """The files a data URI names that the readers take, and `skipped`: the other files of a named
    folder (a .txt, an upper-case .PARQUET), found by the same listing. Files below a name starting
    with '.' or '_' are not read (`storage.expand_all`): `hidden` holds those that look like data
    (.ipynb_checkpoints copies, a Spark job's _temporary output); the rest (_SUCCESS, checksum
    files) and Hugging Face's metadata are bookkeeping, not data."""

    files: list[str]
    skipped: list[str]
    empty: list[str] = field(default_factory=list)  # locations of an alternation with no data files
    hidden: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # of `files`, where the listing held them


def _missing_place(uri: str) -> str | None:
    """The local path that `uri` names, or a glob's folder, where it does not exist; None when it
    does, or for S3 (a prefix exists only through its objects) and brace alternations (each missing
    one is allowed). A missing path is a typo or a wrong folder: said so, not that its files are not
    of a format read."""
    if storage.is_s3(uri) or len(storage.alternatives(uri)) > 1:
        return None
    place = uri
    while any(ch in place for ch in "*?["):
        place = os.path.dirname(place)
    return None if not place or os.path.exists(place) else place


def find_data(uri: str) -> DataFiles:
    """The data files named by a file, directory or glob URI; fails when there are none."""
    try:
        found = storage.expand_all(uri, DATA_PATTERNS)
    except FileNotFoundError:
        found = storage.Expansion([], [])
    if any(storage.basename(f) == "dataset_dict.json" for f in found.files + found.others):
        # a DatasetDict holds several splits: reading them all would mix train and test
        raise DataError(
            f"{uri}: a Hugging Face DatasetDict; name one split's directory, e.g. {uri.rstrip('/')}/train"
        )
    files = [f for f in found.files if storage.basename(f) not in HF_METADATA]
    if not files and (missing := _missing_place(uri)) is not None:
        raise DataError(f"{uri}: does not exist" if missing == uri else f"{uri}: {missing} does not exist")
    skipped = [f for f in found.others if storage.basename(f) not in HF_METADATA]
    if not files:
        places = storage.alternatives(uri)
        where = f" in any of {len(places)} locations: {', '.join(places)}" if len(places) > 1 else ""
        raise DataError(
            f"{uri}: no data files found{where} (expected {', '.join(DATA_PATTERNS)})"
            f"{_unread_note(skipped, found.hidden)}"
        )
    return DataFiles(files, skipped, found.empty, found.hidden, found.sizes)


def _unread_note(skipped: list[str], hidden: list[str]) -> str:
    """What a folder without data files does hold, for its no-data error: a folder of .json.gz,
    .jsonl.zst or upper-case .JSONL files is there, only not read (the warning that names each
    skipped file is not written when the dataset has no data at all)."""
    parts = []
    for files, why in (
        (skipped, "whose names no reader takes"),
        (hidden, "below a name starting with '.' or '_'"),
    ):
        if files:
            more = f" and {len(files) - 3} more" if len(files) > 3 else ""
            plural = "s" if len(files) > 1 else ""
            parts.append(f"{len(files)} file{plural} {why}: {', '.join(files[:3])}{more}")
    return f"; not read: {'; '.join(parts)}" if parts else ""


def data_files(uri: str) -> list[str]:
    """The data files named by a file, directory or glob URI; fails when there are none."""
    return find_data(uri).files


def data_file_sizes(uri: str) -> list[tuple[str, int]]:
    """`data_files` with each file's size in bytes: from the listing that found them (on S3 it carries
    the sizes, where a HEAD per file would cost a request each, in every shard), else asked of storage
    (a single named file)."""
    found = find_data(uri)
    return [(f, found.sizes[f] if f in found.sizes else storage.size(f)) for f in found.files]


def iter_raw(uri: str) -> Iterator[RawRecord]:
    """Every row of every data file under `uri`, parsed or with a coded error."""
    for path in data_files(uri):
        yield from iter_raw_file(path)


def iter_raw_file(path: str) -> Iterator[RawRecord]:
    """Every row of one data file (JSONL, Parquet, Arrow or CSV; JSONL and CSV also gzipped), parsed or
    with a coded error."""
    if path.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif path.endswith(".arrow"):
        yield from _iter_arrow(path)
    elif path.endswith(CSV_SUFFIXES):
        yield from _iter_csv(path)
    else:
        yield from _iter_jsonl(path)


class _RawReader(io.RawIOBase):
    """A file-like object with only `read(n)` (an S3 StreamingBody) as a raw stream, so that
    io.BufferedReader can iterate it by lines (iterating a StreamingBody yields 1 KiB chunks);
    with `limit`, at most that many bytes from the current position (a span of a local file)."""

    def __init__(self, fh: IO[bytes], limit: int | None = None):
        self._fh, self._left = fh, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = len(buffer) if self._left is None else min(len(buffer), self._left)
        data = self._fh.read(n)
        buffer[: len(data)] = data
        if self._left is not None:
            self._left -= len(data)
        return len(data)


def _line_stream(fh: IO[bytes], path: str) -> IO[bytes]:
    return fh if not storage.is_s3(path) else io.BufferedReader(_RawReader(fh), READ_BUFFER)


# Longest first: UTF-32 LE's mark starts with UTF-16 LE's. A marked file is named without its byte
# order, the name iconv takes to read the order from the mark and drop it.
_BYTE_ORDER_MARKS = (
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\xfe\xff", "UTF-16"),
    (b"\xff\xfe", "UTF-16"),
)


# A UTF-16/32 unit holding an ASCII character: (encoding, unit bytes, the byte that is not NUL).
_WIDE_ASCII = (("UTF-32LE", 4, 0), ("UTF-32BE", 4, 3), ("UTF-16LE", 2, 0), ("UTF-16BE", 2, 1))
WIDE_PEEK = 64  # bytes looked at


def wide_encoding(head: bytes) -> str | None:
    """The UTF-16 or UTF-32 encoding a text file's first bytes show: a byte-order mark not followed
    by UTF-8 lines, or units that nearly all hold an ASCII character beside NULs ('{', a CSV header);
    None for anything else (a stray mark before UTF-8 lines is a broken line, not another encoding)."""
    for mark, name in _BYTE_ORDER_MARKS:
        if head.startswith(mark):
            return None if _utf8_lines(head[len(mark) :], mark) else name
    for name, width, at in _WIDE_ASCII:
        units = [head[i : i + width] for i in range(0, len(head) - width + 1, width)]
        ascii_units = sum(1 for u in units if u[at] and u.count(0) == width - 1)
        if len(units) >= 2 and ascii_units >= 0.9 * len(units):
            return name
    return None


def _utf8_lines(data: bytes, mark: bytes) -> bool:
    """Whether the bytes after a byte-order mark read as lines of UTF-8, a character cut off at the
    end allowed: valid UTF-8 once the same mark starting a line is dropped (a stray mark each), with
    few NULs (a broken line may hold one; UTF-16/32 text of ASCII characters is valid UTF-8 too, but
    half or three quarters of its bytes are NULs)."""
    data = data.replace(b"\n" + mark, b"\n")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return False
    return data.count(0) * 4 < len(data)


GZIP_MAGIC = b"\x1f\x8b"
# The other compressions data arrives in (a corpus as .jsonl.zst, an export as .zip), by the bytes
# each file starts with; the readers decompress gzip only.
OTHER_COMPRESSIONS = (
    (re.compile(rb"BZh[1-9]1AY&SY"), "bzip2"),
    (re.compile(rb"\xfd7zXZ\x00"), "xz"),
    (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd"),
    (re.compile(rb"PK\x03\x04"), "zip"),
    (re.compile(rb"7z\xbc\xaf\x27\x1c"), "7z"),
)


def encoding_problem(path: str, head: bytes) -> str | None:
    """Why a text file (JSONL, CSV) whose first bytes are `head` cannot be read as UTF-8 text at all,
    naming the fix, or None: UTF-16/32 text, gzip-compressed data in a file whose name does not end
    in .gz (the readers decompress by the name), or another compression (they decompress gzip only).
    Read as text, every line would be an error of its own, and the count of records meaningless."""
    if head.startswith(GZIP_MAGIC) and not path.endswith(".gz"):
        name = storage.basename(path)
        return f"the file is gzip-compressed but not named .gz: rename it {name}.gz"
    for magic, compression in OTHER_COMPRESSIONS:
        if magic.match(head):
            return (
                f"the file is {compression}-compressed; only gzip is read (.jsonl.gz, .csv.gz): "
                "decompress it, or recompress it with gzip"
            )
    name = wide_encoding(head)
    if name is None:
        return None
    return f"the file is {name}, not UTF-8: re-encode it (e.g. iconv -f {name} -t UTF-8)"


def _wrong_encoding(path: str, stream: Any) -> RawRecord | None:
    """A RawRecord naming a text file that is not UTF-8 text (`encoding_problem`), once, instead of
    an error for every line, from the stream's first bytes without consuming them."""
    reason = encoding_problem(path, stream.peek(WIDE_PEEK)[:WIDE_PEEK])
    if reason is None:
        return None
    return RawRecord(Location(path, line=1), code="wrong_encoding", reason=reason)


def _iter_jsonl(path: str) -> Iterator[RawRecord]:
    for block in iter_jsonl_blocks(path):
        if isinstance(block, RawRecord):  # the file broke off
            yield block
            return
        yield from parse_jsonl_block(block)


@dataclass
class JsonlBlock:
    """Whole lines of a JSONL file: `data` starts at 1-based line `first_line`; `first` when it
    starts the file. The last block of a file may lack the final newline."""

    path: str
    first_line: int
    data: bytes
    first: bool

    def line_count(self) -> int:
        return self.data.count(b"\n") + (0 if self.data.endswith(b"\n") or not self.data else 1)


def jsonl_spans(path: str, parts: int) -> list[tuple[int, int]]:
    """A local, uncompressed JSONL file cut into up to `parts` byte ranges [start, end) of whole
    lines, about equal in size; deterministic for a given file and `parts`."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as fh:
        for k in range(1, parts):
            at = max(k * size // parts, cuts[-1])
            fh.seek(at)
            while True:  # the end of the line holding byte `at`
                chunk = fh.read(1 << 16)
                if not chunk:
                    at = size
                    break
                nl = chunk.find(b"\n")
                if nl >= 0:
                    at += nl + 1
                    break
                at += len(chunk)
            if at > cuts[-1] and at < size:
                cuts.append(at)
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def iter_jsonl_blocks(
    path: str, block_bytes: int | None = None, *, span: tuple[int, int] | None = None
) -> Iterator[JsonlBlock | RawRecord]:
    """A JSONL file (or .jsonl.gz) as blocks of whole lines of about `block_bytes`; a line longer than
    that is one block. A corrupt or truncated gzip ends the blocks with an `unreadable_file`
    RawRecord naming the first line not read; a file that is one JSON document, not JSON Lines
    (`not_json_lines`), is that RawRecord alone. Memory: one block (plus the longest line).

    `span` (a local uncompressed file only, see `jsonl_spans`): only the lines in that byte range,
    numbered from 1 at its start."""
    for block in _jsonl_blocks(path, block_bytes, span):
        if isinstance(block, JsonlBlock) and block.first and (refused := not_json_lines(block)) is not None:
            yield refused
            return
        yield block


def not_json_lines(block: JsonlBlock) -> RawRecord | None:
    """An `unreadable_file` RawRecord when the first block of a file shows one JSON document rather
    than JSON Lines: a .json file opening an array, or a first line that only opens an object or
    array, the whole block one JSON document (json.dump(..., indent=2)). Read line by line, each of
    its lines would be an error of its own and the count of records the count of lines; a stray '{'
    line before records is one broken line, as any other."""
    data = block.data.removeprefix(_BOM)
    head = data.split(b"\n", 1)[0].strip()
    if block.path.endswith(".json") and head.startswith(b"["):
        reason = "a JSON array, not JSON Lines: write one object per line"
    elif head in (b"{", b"[") and _one_document(data):
        reason = (
            "one JSON document over several lines (pretty-printed), not JSON Lines: write one object per line"
        )
    else:
        return None
    return RawRecord(Location(block.path, line=block.first_line), code="unreadable_file", reason=reason)


def _one_document(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False


def _jsonl_blocks(
    path: str, block_bytes: int | None, span: tuple[int, int] | None
) -> Iterator[JsonlBlock | RawRecord]:
    """`iter_jsonl_blocks` as read, before its first block is judged."""
    block_bytes = block_bytes or JSONL_BLOCK_BYTES
    with storage.open_read(path) as fh:
        if span is not None:
            fh.seek(span[0])
            stream: Any = io.BufferedReader(_RawReader(fh, span[1] - span[0]), READ_BUFFER)
        else:
            raw = _line_stream(fh, path)
            stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        if not hasattr(stream, "read1"):
            stream = io.BufferedReader(_RawReader(stream), READ_BUFFER)
        line = 1
        first = span is None or span[0] == 0
        parts: list[bytes] = []  # read, not yet yielded (a list: a long line is not re-copied)
        size = 0
        newline = False  # some part holds a newline

        def cut() -> JsonlBlock | None:
            """The whole lines read so far as a block; the rest stays in `parts`."""
            nonlocal parts, size, newline
            if not newline:
                return None
            k = len(parts) - 1
            while parts[k].rfind(b"\n") < 0:
                k -= 1
            at = parts[k].rfind(b"\n") + 1
            data = b"".join([*parts[:k], parts[k][:at]])
            rest = b"".join([parts[k][at:], *parts[k + 1 :]])
            parts, size, newline = ([rest] if rest else []), len(rest), b"\n" in rest
            return JsonlBlock(path, line, data, first)

        try:
            if first and (wrong := _wrong_encoding(path, stream)) is not None:
                yield wrong
                return
            while True:
                chunk = stream.read1(block_bytes)
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
                newline = newline or b"\n" in chunk
                if size < block_bytes or (block := cut()) is None:
                    continue  # a short read, or one long line: read on
                yield block
                line += block.line_count()
                first = False
        except (OSError, EOFError, zlib.error) as exc:  # truncated or corrupt gzip
            if (block := cut()) is not None:
                yield block
                line += block.line_count()
            yield RawRecord(
                Location(path, line=line), code="unreadable_file", reason=f"{type(exc).__name__}: {exc}"
            )
            return
        if parts:
            yield JsonlBlock(path, line, b"".join(parts), first)


def parse_jsonl_block(block: JsonlBlock) -> Iterator[RawRecord]:
    """Every non-blank line of a block parsed with json.loads, or with a coded error."""
    path = block.path
    lines = block.data.split(b"\n")
    if block.data.endswith(b"\n"):
        lines.pop()
    for i, line in enumerate(lines):
        lineno = block.first_line + i
        loc = Location(path, line=lineno)
        if block.first and i == 0 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            yield RawRecord(loc, code="invalid_utf8", reason=f"byte {exc.start}: {exc.reason}")
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield RawRecord(
                loc, code="invalid_json", reason=f"column {exc.colno}: {exc.msg.removesuffix(' at')}"
            )
            continue
        except RecursionError:
            yield RawRecord(loc, code="too_deep", reason="JSON nested too deeply to parse")
            continue
        if not isinstance(value, dict):
            yield RawRecord(
                loc, code="not_an_object", reason=f"expected a JSON object, got {type(value).__name__}"
            )
            continue
        yield RawRecord(loc, value=value)


def _iter_csv(path: str) -> Iterator[RawRecord]:
    """CSV with a header row; each later row is a record of strings. Undecodable bytes are kept as
    surrogates (so the reader never stops) and reported as invalid_utf8 for their row."""
    with storage.open_read(path) as fh:
        stream: Any = _line_stream(fh, path)
        if path.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=stream)
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
        # strict: a quote that never closes (or text after a closing quote) is an error at the row
        # where it starts, instead of the rest of the file read as one field of one record
        csv.field_size_limit(CSV_FIELD_LIMIT)
        reader = csv.reader(text, strict=True)
        header: list[str] | None = None
        lineno = 0  # physical lines consumed so far; a record starts on the next one
        try:
            if (wrong := _wrong_encoding(path, stream)) is not None:  # before the wrapper reads
                yield wrong
                return
            while True:
                start = lineno + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    if "unexpected end of data" in str(exc):  # every line after `start` is in one field
                        reason = (
                            f"a quote opened in the record at line {start} never closes: lines {start}-"
                            f"{reader.line_num} would be read as one field (an unknown number of records)"
                        )
                        yield RawRecord(Location(path, line=start), code="unreadable_file", reason=reason)
                        return
                    lineno = reader.line_num
                    yield RawRecord(Location(path, line=start), code="invalid_csv", reason=str(exc))
                    continue
                lineno = reader.line_num
                loc = Location(path, line=start)
                if header is None:
                    # dict(zip()) would keep the last silently; unnamed columns (a spreadsheet's
                    # blank header cells) hold no field a record kind reads
                    if (twice := _repeated_name([name for name in row if name.strip()])) is not None:
                        yield RawRecord(loc, code="unreadable_file", reason=_column_twice(twice))
                        return
                    header = row
                    continue
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    yield RawRecord(
                        loc,
                        code="csv_ragged_row",
                        reason=f"{len(row)} fields, the header has {len(header)}",
                    )
                    continue
                bad = next((i for i, cell in enumerate(row) if _has_surrogate(cell)), None)
                if bad is not None:
                    yield RawRecord(
                        loc, code="invalid_utf8", reason=f"column {header[bad]!r} is not valid UTF-8"
                    )
                    continue
                yield RawRecord(loc, value=dict(zip(header, row, strict=True)))
        except (OSError, EOFError, zlib.error, UnicodeError) as exc:
            yield RawRecord(
                Location(path, line=lineno + 1), code="unreadable_file", reason=f"{type(exc).__name__}: {exc}"
            )


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


@dataclass
class ArrowBatch:
    """Rows `first_row`, `first_row + 1`, ... of a Parquet or Arrow file as one record batch."""

    path: str
    first_row: int
    batch: Any  # pyarrow.RecordBatch
    row_group: int | None = None


def iter_arrow_batches(path: str) -> Iterator[ArrowBatch | RawRecord]:
    """A Parquet or Arrow file batch by batch; an `unreadable_file` RawRecord ends a broken file."""
    suffix = ".parquet" if path.endswith(".parquet") else ".arrow"
    # Parquet needs random access (the schema is in the footer): an S3 object is spooled to disk.
    with storage.local_file(path, suffix) as local:
        batches = _parquet_batches(local, path) if suffix == ".parquet" else _arrow_batches(local, path)
        for i, item in enumerate(batches):
            if i == 0 and isinstance(item, ArrowBatch) and (twice := _repeated_name(item.batch.schema.names)):
                # readers differ on which of the two they take: validated is not what would be trained
                yield RawRecord(Location(path), code="unreadable_file", reason=_column_twice(twice))
                return
            yield item


def _column_twice(name: str) -> str:
    return f"column {name!r} appears more than once: which one holds the records is ambiguous"


def _repeated_name(names: list[str]) -> str | None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def _rows(path: str) -> Iterator[RawRecord]:
    for item in iter_arrow_batches(path):
        if isinstance(item, RawRecord):
            yield item
            return
        for i, value in enumerate(item.batch.to_pylist()):
            yield RawRecord(Location(path, row_group=item.row_group, row=item.first_row + i), value=value)


def _iter_arrow(path: str) -> Iterator[RawRecord]:
    """An Arrow IPC file or stream (what Hugging Face `save_to_disk` writes), batch by batch."""
    yield from _rows(path)


def _iter_parquet(path: str) -> Iterator[RawRecord]:
    yield from _rows(path)


def _arrow_batches(local: str, path: str) -> Iterator[ArrowBatch | RawRecord]:
    import pyarrow as pa

    row = 0
    with pa.memory_map(local) as source:
        try:
            reader: Any = pa.ipc.open_stream(source)
        except Exception:
            try:
                source.seek(0)
                file_reader = pa.ipc.open_file(source)
                reader = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
            except Exception as exc:
                yield RawRecord(
                    Location(path), code="unreadable_file", reason=f"not a readable Arrow file: {exc}"
                )
                return
        try:
            for batch in reader:
                yield ArrowBatch(path, row, batch)
                row += batch.num_rows
        except Exception as exc:  # a truncated stream: the rest cannot be read
            yield RawRecord(
                Location(path, row=row), code="unreadable_file", reason=f"{type(exc).__name__}: {exc}"
            )


def _parquet_batches(local: str, path: str) -> Iterator[ArrowBatch | RawRecord]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(local)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        yield RawRecord(Location(path), code="unreadable_file", reason=f"not a readable Parquet file: {exc}")
        return
    with pf:
        row = 0
        for rg in range(pf.num_row_groups):
            try:
                for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[rg]):
                    yield ArrowBatch(path, row, batch, rg)
                    row += batch.num_rows
            except Exception as exc:  # a corrupt page: the rest of the file cannot be trusted
                reason = f"row group {rg} unreadable: {type(exc).__name__}: {exc}"
                yield RawRecord(Location(path, row_group=rg, row=row), code="unreadable_file", reason=reason)
                return


def detect_kind(value: dict[str, Any], cfg: DataSection) -> str | None:
    if cfg.messages_field in value:
        return "chat"
    if cfg.prompt_field in value and cfg.completion_field in value:
        return "prompt_completion"
    if cfg.text_field in value:
        return "text"
    return None


CHAT_ROLES = ("system", "user", "assistant", "tool")


def normalize(raw: RawRecord, kind: str, cfg: DataSection) -> Record:
    """A parsed row as a Record of `kind`; raises RecordError with a stable code."""
    if raw.code:
        raise RecordError(raw.code, raw.reason or "", raw.loc)
    value = raw.value or {}

    def present(name: str) -> Any:
        if name not in value:
            raise RecordError(
                "missing_field", f"field {name!r} is missing (have: {sorted(value)[:8]})", raw.loc
            )
        return value[name]

    def string_field(name: str) -> str:
        got = present(name)
        if not isinstance(got, str):
            raise RecordError(
                "wrong_type", f"field {name!r} must be a string, got {type(got).__name__}", raw.loc
            )
        if not got.strip():
            raise RecordError("empty_text", f"field {name!r} is empty or whitespace", raw.loc)
        _refuse_surrogates(got, f"field {name!r}", raw.loc)
        return got

    if kind == "text":
        return Record(kind, raw.loc, text=string_field(cfg.text_field))
    if kind == "prompt_completion":
        return Record(
            kind,
            raw.loc,
            prompt=string_field(cfg.prompt_field),
            completion=string_field(cfg.completion_field),
        )
    if kind == "chat":
        # absent (another field name, e.g. ShareGPT's 'conversations') is not a malformed conversation
        msgs = present(cfg.messages_field)
        if isinstance(msgs, str):
            # a CSV cell (or a string column) holding the conversation as JSON text
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError as exc:
                raise RecordError(
                    "bad_chat",
                    f"field {cfg.messages_field!r} is not valid JSON: column {exc.colno}: "
                    f"{exc.msg.removesuffix(' at')}",
                    raw.loc,
                ) from None
            except RecursionError:
                raise RecordError(
                    "bad_chat", f"field {cfg.messages_field!r}: JSON nested too deeply to parse", raw.loc
                ) from None
        if not isinstance(msgs, list) or not msgs:
            raise RecordError(
                "bad_chat",
                f"field {cfg.messages_field!r} must be a non-empty list of {{role, content}}",
                raw.loc,
            )
        out = []
        for i, m in enumerate(msgs):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise RecordError(
                    "bad_chat", f"message {i} must be an object with string 'role' and 'content'", raw.loc
                )
            if m["role"] not in CHAT_ROLES:
                raise RecordError("bad_chat", f"message {i} has unknown role {m['role']!r}", raw.loc)
            if not m["content"].strip():
                raise RecordError("empty_text", f"message {i} ({m['role']}) is empty", raw.loc)
            _refuse_surrogates(m["content"], f"message {i} ({m['role']})", raw.loc)
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise RecordError("bad_chat", "no assistant turn: nothing to learn from", raw.loc)
        return Record(kind, raw.loc, messages=out)
    raise ValueError(f"unknown record kind {kind!r}")


def _refuse_surrogates(text: str, what: str, loc: Location) -> None:
    """RecordError invalid_utf8 for a lone UTF-16 surrogate in `text` (what a JSON escape such as
    \\ud800 without its pair decodes to): no UTF-8 encoder (the tokenizer, the Parquet writer)
    accepts it."""
    # Strict UTF-8 encoding fails exactly on surrogates, several times faster than a regex scan;
    # isascii() (C, first non-ASCII character) spares most records even that.
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordError(
            "invalid_utf8",
            f"{what} holds \\u{ord(text[exc.start]):04x} at character {exc.start}, a lone UTF-16 "
            "surrogate (a JSON escape without its pair, or bytes that are not UTF-8): not text",
            loc,
        ) from None


def resolve_kind(uri: str, cfg: DataSection) -> str:
    """The configured kind, or the kind of the first parseable record whose fields name one (always
    detected for the general set: `cfg` is then `DataSection.reading("general")`).

    A stray first record with other fields does not decide the kind (it is reported by
    `normalize` as `missing_field`, within the error budget); when none of the first
    `KIND_SCAN_LIMIT` parseable records names a kind, RecordError `unknown_kind` points at the
    first of them.
    """
    if cfg.record_kind != "auto":
        return cfg.record_kind
    first: RawRecord | None = None
    seen = 0
    for raw in iter_raw(uri):
        if raw.value is None:
            continue
        kind = detect_kind(raw.value, cfg)
        if kind is not None:
            return kind
        first = first or raw
        seen += 1
        if seen >= KIND_SCAN_LIMIT:
            break
    if first is not None:
        raise RecordError(
            "unknown_kind",
            f"cannot tell the record kind from fields {sorted(first.value or {})[:8]}; expected "
            f"{cfg.text_field!r}, {cfg.prompt_field!r}+{cfg.completion_field!r} or {cfg.messages_field!r}",
            first.loc,
        )
    raise DataError(f"{uri}: no parseable records")


def iter_records(uri: str, cfg: DataSection, kind: str | None = None) -> Iterator[Record]:
    """Good records only; bad ones are skipped (validate_data has already judged them)."""
    kind = kind or resolve_kind(uri, cfg)
    for raw in iter_raw(uri):
        try:
            yield normalize(raw, kind, cfg)
        except RecordError:
            continue
