"""The vectorised half of validate_data: whole blocks of records checked with pyarrow and numpy.

`validate_data` reads JSONL in blocks of whole lines, Parquet and Arrow in record batches and CSV
in runs of rows. A block whose text columns come out of pyarrow as plain strings is checked here,
column at a time:

- JSONL is parsed by `pyarrow.json` with an explicit schema (only the columns the record kind
  needs). A block is taken only when pyarrow and `json.loads` must agree on it: valid UTF-8, no
  BOM or lone CR inside, no blank lines (so row i is line `first_line + i`), no line nested deeper
  than json.loads can follow, as many rows as lines and no nulls. Anything else — a syntax error,
  a number where text belongs, a missing field — makes `parse_jsonl` return None and the caller
  checks that block line by line with the precise path, so every error keeps its file:line.
- Every content check (`fulltune.data.validate.content.TextCheck`) pairs its exact Python test
  with a cheap vectorised prefilter that keeps every row the test could report on, built from the
  byte scans of `Utf8Column` (control and mojibake lead bytes, literals such as '@', 'AKIA' or a
  special-token string found from their first byte, ASCII digit runs dense enough to hold a phone
  or card number) and the column's lengths. Only the rows some prefilter keeps are turned into
  Python strings and run through the exact tests, so reasons and locations are the precise path's
  own.
- Exact duplicates: a 64-bit digest (`content_hash`) of each record's content (the same digest the
  precise path computes) looked up in `ContentIndex`: one sorted numpy array of (digest, first
  location) pairs plus a small dict of recent ones — 16 bytes per distinct record, the only state
  that grows with the dataset (16 MB for a million records).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterable
from functools import cached_property
from typing import Any

import numpy as np

INDEX_FLUSH = 1 << 16  # recent digests kept in a dict before they are merged into the sorted array
SMALL_RUN = 64  # at most this many digests added at once go to the dict rather than a sorted run


class ContentIndex:
    """64-bit content digest -> packed first location; 16 bytes per distinct record.

    One big sorted array, a few small sorted runs (blocks added by the vectorised path) and a dict
    (records added one at a time by the precise path); merged into the big array every
    INDEX_FLUSH entries."""

    def __init__(self) -> None:
        self._keys = np.empty(0, dtype=np.uint64)  # sorted
        self._vals = np.empty(0, dtype=np.uint64)
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # sorted (keys, values)
        self._run_size = 0
        self._recent: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._keys) + self._run_size + len(self._recent)

    def get(self, key: int) -> int | None:
        got = self._recent.get(key)
        if got is not None:
            return got
        k = np.uint64(key)
        for keys, vals in ((self._keys, self._vals), *self._runs):
            if len(keys):
                i = int(keys.searchsorted(k))
                if i < len(keys) and keys[i] == k:
                    return int(vals[i])
        return None

    def __contains__(self, key: int) -> bool:
        return self.get(key) is not None

    def add(self, key: int, value: int) -> None:
        """Record `key` (not yet present) first seen at `value`."""
        self._recent[key] = value
        if len(self._recent) >= INDEX_FLUSH:
            self._flush()

    def add_many(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Record distinct `keys` not yet present."""
        if len(keys) <= SMALL_RUN:
            # a few keys (a short range of rows between lines pyarrow rejected, a short run of the
            # precise path) go to the dict: a sorted run of their own would bring the next merge of
            # the whole index closer
            for key, value in zip(keys.tolist(), values.tolist(), strict=True):
                self.add(key, value)
            return
        order = np.argsort(keys)
        self._runs.append((keys[order], values[order].astype(np.uint64, copy=False)))
        self._run_size += len(keys)
        if self._run_size >= INDEX_FLUSH or len(self._runs) > 16:
            self._flush()

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, first location) for each of `keys`."""
        found = np.zeros(len(keys), dtype=bool)
        values = np.zeros(len(keys), dtype=np.uint64)
        for run_keys, run_vals in ((self._keys, self._vals), *self._runs):
            if len(run_keys):
                i = np.minimum(run_keys.searchsorted(keys), len(run_keys) - 1)
                hit = run_keys[i] == keys
                values[hit] = run_vals[i[hit]]
                found |= hit
        if self._recent:
            get = self._recent.get
            for j, key in enumerate(keys.tolist()):
                v = get(key)
                if v is not None:
                    found[j] = True
                    values[j] = v
        return found, values

    def _flush(self) -> None:
        n = len(self._recent)
        parts_k = [self._keys, np.fromiter(self._recent.keys(), dtype=np.uint64, count=n)]
        parts_v = [self._vals, np.fromiter(self._recent.values(), dtype=np.uint64, count=n)]
        parts_k += [k for k, _ in self._runs]
        parts_v += [v for _, v in self._runs]
        all_k, all_v = np.concatenate(parts_k), np.concatenate(parts_v)
        order = np.argsort(all_k, kind="stable")
        self._keys, self._vals = all_k[order], all_v[order]
        self._recent, self._runs, self._run_size = {}, [], 0


# -- column buffers ---------------------------------------------------------------------------------


def utf8_lengths(col: Any) -> np.ndarray:
    """Characters (code points) of each string, as Python's len() counts them."""
    import pyarrow.compute as pc

    lengths = pc.utf8_length(col)
    return np.frombuffer(lengths.buffers()[1], dtype=np.int32 if lengths.type == "int32" else np.int64)[
        lengths.offset : lengths.offset + len(lengths)
    ].astype(np.int64)


def utf8_view(col: Any) -> tuple[np.ndarray, np.ndarray, memoryview]:
    """(bytes as uint8, row offsets rebased to 0 (n + 1), the same bytes as a memoryview) of a
    null-free string or large_string array."""
    import pyarrow as pa

    offsets_buf, data_buf = col.buffers()[1:3]
    width = np.int64 if pa.types.is_large_string(col.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=width)[col.offset : col.offset + len(col) + 1].astype(np.int64)
    if data_buf is None:
        data = np.empty(0, dtype=np.uint8)
    else:
        data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]
    offsets -= offsets[0]
    return data, offsets, memoryview(data)


def content_hash(data: bytes) -> int:
    """The 64-bit content digest of the duplicate checks: SHA-256 (hardware-accelerated on
    current x86 and ARM CPUs), first 8 bytes, little-endian."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def content_hashes(col: Any) -> np.ndarray:
    """`content_hash` of each string's UTF-8 bytes."""
    _, offsets, view = utf8_view(col)
    sha = hashlib.sha256
    starts, ends = offsets[:-1].tolist(), offsets[1:].tolist()
    digests = b"".join([sha(view[a:b]).digest() for a, b in zip(starts, ends, strict=True)])
    return np.frombuffer(digests, dtype="<u8").reshape(-1, 4)[:, 0].astype(np.uint64)


def join_columns(first: Any, second: Any, separator: str) -> Any:
    """`first` and `second` joined row by row with `separator`. Arrow's join needs its inputs and
    separator of one string type, and Parquet written by pandas holds large_string columns (a
    plain str separator is a string): both are taken as large_string where either is one."""
    import pyarrow as pa
    import pyarrow.compute as pc

    large = pa.types.is_large_string(first.type) or pa.types.is_large_string(second.type)
    kind = pa.large_string() if large else pa.string()
    return pc.binary_join_element_wise(first.cast(kind), second.cast(kind), pa.scalar(separator, kind))


def _rows_of(offsets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return np.searchsorted(offsets, positions, side="right") - 1


def _literal_positions(data: np.ndarray, first: np.ndarray, literal: bytes) -> np.ndarray:
    """Positions (from those of the literal's first byte) where all of `literal` starts."""
    pos = first[first + len(literal) <= len(data)]
    for i, byte in enumerate(literal[1:], 1):
        if not len(pos):
            break
        pos = pos[data[pos + i] == byte]
    return pos


def _nd_code_points() -> np.ndarray:
    """The non-ASCII characters Python's `\\d` matches in str patterns (its own Unicode tables)."""
    points = np.concatenate([np.arange(0x80, 0xD800), np.arange(0xE000, 0x110000)]).astype("<u4")
    chars = points.tobytes().decode("utf-32-le")
    return np.array([ord(m.group()) for m in re.finditer(r"\d", chars)], dtype=np.int64)


_ND: np.ndarray | None = None


_ND_PAIRS: np.ndarray | None = None  # [lead byte, second byte] of the UTF-8 of any Nd character


def _wide_digits(data: np.ndarray, lead: np.ndarray) -> np.ndarray:
    """Positions among `lead` (UTF-8 lead bytes) that start a non-ASCII decimal digit (Nd)."""
    global _ND, _ND_PAIRS
    if not len(lead):
        return lead
    if _ND is None or _ND_PAIRS is None:
        _ND = _nd_code_points()
        _ND_PAIRS = np.zeros((256, 256), dtype=bool)
        for cp in _ND.tolist():
            raw = chr(cp).encode("utf-8")
            _ND_PAIRS[raw[0], raw[1]] = True
    last = len(data) - 1
    lead = lead[_ND_PAIRS[data[lead], data[np.minimum(lead + 1, last)]]]
    if not len(lead):
        return lead
    b = [data[np.minimum(lead + k, last)].astype(np.int64) for k in range(4)]
    cp = np.where(
        b[0] < 0xE0,
        ((b[0] & 0x1F) << 6) | (b[1] & 0x3F),
        np.where(
            b[0] < 0xF0,
            ((b[0] & 0x0F) << 12) | ((b[1] & 0x3F) << 6) | (b[2] & 0x3F),
            ((b[0] & 0x07) << 18) | ((b[1] & 0x3F) << 12) | ((b[2] & 0x3F) << 6) | (b[3] & 0x3F),
        ),
    )
    return lead[np.isin(cp, _ND)]


class Utf8Column:
    """A null-free string column as UTF-8 bytes, with the byte scans that the content checks'
    prefilters (`fulltune.data.validate.content`) share, each made once, on first use.

    Masks have one entry per row, True where the row holds a match; they never drop a row for
    being long or odd."""

    def __init__(self, col: Any):
        self.column = col
        self.data, self.offsets, _ = utf8_view(col)
        self.size = len(self.offsets) - 1
        self._positions_of: dict[int, np.ndarray] = {}

    @cached_property
    def lengths(self) -> np.ndarray:
        """Characters (code points) of each row, as Python's len() counts them."""
        return utf8_lengths(self.column)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Mask of the rows holding any of these byte positions."""
        mask = np.zeros(self.size, dtype=bool)
        if len(positions):
            mask[_rows_of(self.offsets, positions)] = True
        return mask

    def positions_of(self, byte: int) -> np.ndarray:
        """Positions of one byte value."""
        if byte not in self._positions_of:
            self.find_bytes((byte,))
        return self._positions_of[byte]

    def find_bytes(self, values: Iterable[int]) -> None:
        """Find the positions of several byte values at once, for `positions_of`: one pass that
        collects them all costs about what one byte value's own pass does."""
        wanted = sorted(set(values) - self._positions_of.keys())
        if not wanted:
            return
        hit = self.data == wanted[0]
        for byte in wanted[1:]:
            hit |= self.data == byte
        pos = np.flatnonzero(hit)
        found = self.data[pos]
        for byte in wanted:
            self._positions_of[byte] = pos[found == byte]

    def literal_rows(self, literals: Iterable[bytes]) -> np.ndarray:
        """Mask of the rows holding any of `literals`, each found from its first byte's positions."""
        found = [_literal_positions(self.data, self.positions_of(lit[0]), lit) for lit in literals]
        return self.rows(np.concatenate(found)) if found else np.zeros(self.size, dtype=bool)

    @cached_property
    def high(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions, values, the byte after each) of the bytes from 0x7F up: DEL and every byte
        of the non-ASCII characters."""
        pos = np.flatnonzero(self.data >= 0x7F)
        after = self.data[np.minimum(pos + 1, len(self.data) - 1)]
        return pos, self.data[pos], after

    @cached_property
    def ascii_digits(self) -> np.ndarray:
        """Positions of the bytes '0' to '9'."""
        return np.flatnonzero((self.data - np.uint8(0x30)) < 10)

    @cached_property
    def other_digits(self) -> np.ndarray:
        """Positions of the non-ASCII decimal digits, which Python's \\d also matches: their lead
        bytes from U+0660 up (D9..F4) decoded to code points and looked up."""
        pos, values, _ = self.high
        return _wide_digits(self.data, pos[values >= 0xD9])


def maybe_blank(col: Any) -> np.ndarray:
    """Rows that might be empty or whitespace only (str.strip() == ''): those whose first
    character may be whitespace — an ASCII space or control, DEL, or a character whose UTF-8 lead
    byte some Unicode space shares (C2: U+0085, U+00A0; E1: U+1680; E2: U+2000-U+205F; E3:
    U+3000). The exact test runs on these rows only."""
    data, offsets, _ = utf8_view(col)
    starts, lengths = offsets[:-1], np.diff(offsets)
    if not len(data):
        return np.ones(len(starts), dtype=bool)
    first = data[np.minimum(starts, len(data) - 1)]
    return (
        (lengths == 0)
        | (first < 0x21)
        | (first == 0x7F)
        | (first == 0xC2)
        | (first == 0xE1)
        | (first == 0xE2)
        | (first == 0xE3)
    )


# -- JSONL blocks -----------------------------------------------------------------------------------

_BOM = b"\xef\xbb\xbf"


def max_depth() -> int:
    """Nesting json.loads surely parses without RecursionError at the validator's stack depth."""
    return sys.getrecursionlimit() // 2


_TWO_OBJECTS = re.compile(rb"}[ \t]*{")  # two JSON values on one line: pyarrow reads two rows
# A JSON escape of a UTF-16 surrogate: json.loads keeps a lone one (the precise path refuses the
# record), pyarrow does not, so such lines go through the precise path.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
PIECE_BYTES = 1 << 20  # JSONL parsed per pyarrow call; a bad line costs re-reading part of one


def _pool() -> Any:
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    return _POOL


_POOL: Any = None


def _suspicious_lines(data: bytes, arr: np.ndarray, starts: np.ndarray) -> set[int]:
    """Lines pyarrow and json.loads may read differently: they go through the precise path."""
    out: set[int] = set()

    def line_of(pos: int) -> int:
        return int(np.searchsorted(starts, pos, side="right")) - 1

    head = arr[starts]
    blank = np.flatnonzero((head == 0x20) | (head == 0x09) | (head == 0x0D) | (head == 0x0A))
    out.update(blank.tolist())  # maybe blank: pyarrow skips blank lines, json.loads lines count
    for pattern in (_BOM, b"\r"):
        pos = data.find(pattern)
        while pos >= 0:
            if pattern != b"\r" or data[pos + 1 : pos + 2] != b"\n":
                out.add(line_of(pos))
            pos = data.find(pattern, pos + 1)
    for m in _TWO_OBJECTS.finditer(data):
        out.add(line_of(m.start()))
    for m in _SURROGATE_ESCAPE.finditer(data):  # pyarrow would not refuse a lone surrogate
        out.add(line_of(m.start()))
    if not data.isascii() and not _valid_utf8(data):
        pos = 0
        while True:  # invalid UTF-8: json.loads' path reports invalid_utf8
            try:
                data[pos:].decode("utf-8")
                break
            except UnicodeDecodeError as exc:
                line = line_of(pos + exc.start)
                out.add(line)
                pos = int(starts[line + 1]) if line + 1 < len(starts) else len(data)
    openers = np.flatnonzero((arr == 0x7B) | (arr == 0x5B))
    if len(openers) >= max_depth():  # lines json.loads may find too deep
        per_line = np.bincount(np.searchsorted(starts, openers, side="right") - 1, minlength=len(starts))
        out.update(np.flatnonzero(per_line >= max_depth()).tolist())
    return out


def _valid_utf8(data: bytes) -> bool:
    """Arrow's UTF-8 validation (several times faster than bytes.decode)."""
    import pyarrow as pa

    if len(data) >= 1 << 31:
        try:
            data.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int32).tobytes())
    try:
        pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(data)]).cast(pa.string())
        return True
    except pa.ArrowInvalid:
        return False


def _read_piece(piece: bytes, options: Any) -> Any:
    """(table, None) or (None, error message) for one piece of whole lines."""
    import pyarrow as pa
    import pyarrow.json as pj

    try:
        table = pj.read_json(
            pa.BufferReader(piece),
            read_options=pj.ReadOptions(use_threads=False, block_size=len(piece) + 1),
            parse_options=options,
        )
        return table, None
    except Exception as exc:  # ArrowInvalid and friends: a line pyarrow cannot take
        return None, str(exc)


def parse_jsonl(data: bytes, fields: list[str]) -> list[tuple[int, int, dict[str, Any] | None]]:
    """A JSONL block as consecutive line ranges [start, end) (0-based within the block), each with
    its `fields` as null-free string arrays (the vectorised path) or None (json.loads line by line).
    Lines pyarrow rejects, or may read otherwise than json.loads, land in the None ranges."""
    import pyarrow as pa
    import pyarrow.json as pj

    if not data:
        return []
    arr = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(arr == 0x0A)
    starts = np.concatenate(([0], nl + 1))
    starts = starts[starts < len(arr)]
    n = len(starts)
    bounds = np.append(starts, len(arr))  # byte range of line i: bounds[i]:bounds[i + 1]
    precise = _suspicious_lines(data, arr, starts)
    schema = pa.schema([(f, pa.string()) for f in fields])
    options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")

    # pieces of about PIECE_BYTES between suspicious lines, parsed in parallel
    pieces: list[tuple[int, int]] = []
    line = 0
    for stop in [*sorted(precise), n]:
        while line < stop:
            end = int(np.searchsorted(bounds, bounds[line] + PIECE_BYTES, side="left"))
            end = min(max(end, line + 1), stop)
            pieces.append((line, end))
            line = end
        line = stop + 1
    results = list(_pool().map(lambda p: _read_piece(data[bounds[p[0]] : bounds[p[1]]], options), pieces))
    fast: dict[int, tuple[int, dict[str, Any]]] = {}  # start line -> (end line, columns)
    todo = list(zip(pieces, results, strict=True))
    while todo:
        (a, b), (table, error) = todo.pop()
        if table is not None and table.num_rows == b - a:
            cols = {f: table.column(f).combine_chunks() for f in fields}
            nulls = np.zeros(b - a, dtype=bool)
            for col in cols.values():
                if col.null_count:
                    nulls |= np.array(col.is_null().to_pylist(), dtype=bool)
            run = a
            for i in [*np.flatnonzero(nulls).tolist(), b - a]:
                if a + i > run:
                    fast[run] = (a + i, {f: c.slice(run - a, a + i - run) for f, c in cols.items()})
                run = a + i + 1
            precise.update(a + i for i in np.flatnonzero(nulls).tolist())
            continue
        row = bad_line_hint(error or "")
        if table is not None or row is None or not (0 <= row < b - a):
            precise.update(range(a, b))  # rows do not map to lines, or no hint: all precise
            continue
        # the error names the row where the parser stopped: that line or the one before is bad
        lo, hi = max(a, a + row - 1), a + row + 1
        precise.update(range(lo, hi))
        for x, y in ((a, lo), (hi, b)):
            if x < y:
                todo.append(((x, y), _read_piece(data[bounds[x] : bounds[y]], options)))

    out: list[tuple[int, int, dict[str, Any] | None]] = []
    line = 0
    while line < n:
        if line in fast:
            parts = []
            start = line
            while line in fast:  # adjacent pieces: one range
                line, cols = fast[line]
                parts.append(cols)
            if len(parts) > 1:
                cols = {f: pa.concat_arrays([p[f] for p in parts]) for f in fields}
            out.append((start, line, cols))
            continue
        end = line + 1
        while end < n and end not in fast:
            end += 1
        out.append((line, end, None))
        line = end
    return out


def line_bounds(data: bytes) -> np.ndarray:
    """Byte offset of the start of each line of `data`, plus len(data)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    starts = np.concatenate(([0], np.flatnonzero(arr == 0x0A) + 1))
    return np.append(starts[starts < len(arr)], len(arr))


def bad_line_hint(message: str) -> int | None:
    """The row pyarrow's JSON error names ('... in row 12'), if any."""
    m = re.search(r"in row (\d+)", message)
    return int(m.group(1)) if m else None
