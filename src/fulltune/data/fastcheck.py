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
- Every content check has a cheap vectorised prefilter that is a superset of what the exact
  Python check can find (`candidate_rows`): byte scans of the column's UTF-8 buffer for control
  characters, mojibake and U+FFFD lead bytes, '@', 'AKIA'/'ASIA', 'PRIVATE KEY-----', the first
  byte of every special-token string, and ASCII digit runs dense enough to hold a phone (7 digits
  in 8 bytes) or card number (13 digits in 25 bytes); plus the length limits. Only candidate rows
  are turned into Python strings and run through the exact checks (regexes, Luhn), so reasons and
  locations are the precise path's own.
- Exact duplicates: a 64-bit BLAKE2b digest of each record's content (the same digest the precise
  path computes) looked up in `ContentIndex`: one sorted numpy array of (digest, first location)
  pairs plus a small dict of recent ones — 16 bytes per distinct record, the only state that grows
  with the dataset (16 MB for a million records).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
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
            # a few keys (a short range of rows between lines pyarrow rejected) go to the dict: a
            # sorted run of their own would bring the next merge of the whole index closer
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


class Prefilter:
    """Which rows of a string column might hold anything the exact content checks report."""

    def __init__(self, special_tokens: list[str] | tuple[str, ...] | None):
        # special_tokens None: unknown pattern, every row is a candidate for that check
        self.tokens = special_tokens
        self.literals: dict[int, list[bytes]] = {}
        for literal in (
            b"AKIA",
            b"ASIA",
            b"PRIVATE KEY-----",
            *(t.encode("utf-8", "surrogatepass") for t in special_tokens or ()),
        ):
            self.literals.setdefault(literal[0], []).append(literal)
        self.first_bytes = [0x40, *sorted(self.literals)]

    def candidates(self, col: Any) -> np.ndarray:
        """Boolean mask: rows that must go through the exact checks (a superset of those with a
        finding). Rows are never dropped for being long or odd: only the byte scans decide."""
        data, offsets, _ = utf8_view(col)
        n = len(offsets) - 1
        cand = np.zeros(n, dtype=bool)
        if not len(data):
            return cand
        if self.tokens is None:
            cand[:] = True
            return cand
        last = len(data) - 1

        def mark(pos: np.ndarray) -> None:
            if len(pos):
                cand[_rows_of(offsets, pos)] = True

        # C0 controls other than \t \n \r (control_chars)
        low = np.flatnonzero(data < 0x20)
        if len(low):
            v = data[low]
            mark(low[(v != 0x09) & (v != 0x0A) & (v != 0x0D)])
        # DEL, C1 controls (C2 80-9F), U+FFFD (EF BF BD), mojibake leads Â Ã â (C3 82/83/A2)
        high = np.flatnonzero(data >= 0x7F)
        high_digit_rows = None
        if len(high):
            v = data[high]
            nxt = data[np.minimum(high + 1, last)]
            hit = (
                (v == 0x7F)
                | ((v == 0xC2) & (nxt >= 0x80) & (nxt <= 0x9F))
                | ((v == 0xEF) & (nxt == 0xBF))
                | ((v == 0xC3) & ((nxt == 0x82) | (nxt == 0x83) | (nxt == 0xA2)))
            )
            mark(high[hit])
            # non-ASCII decimal digits (what Python's \d also matches): decode the lead bytes
            # from U+0660 up (D9..F4) to code points and look them up
            wide = _wide_digits(data, high[v >= 0xD9])
            if len(wide):
                high_digit_rows = np.zeros(n, dtype=bool)
                high_digit_rows[_rows_of(offsets, wide)] = True
        # literals, found from their first byte in one scan: '@' (e-mail), AKIA/ASIA (AWS key
        # ids), PRIVATE KEY----- (PEM blocks) and the special-token strings
        hit = data == self.first_bytes[0]
        for byte in self.first_bytes[1:]:
            hit |= data == byte
        pos = np.flatnonzero(hit)
        if len(pos):
            at = data[pos]
            mark(pos[at == 0x40])
            for first, literals in self.literals.items():
                here = pos[at == first]
                if len(here):
                    for literal in literals:
                        mark(_literal_positions(data, here, literal))
        # phone (\d{3}[ .-]\d{4}: 7 digits within 8 bytes) and card (13 digits within 25 bytes)
        digits = np.flatnonzero((data - np.uint8(0x30)) < 10)
        if len(digits):
            if len(digits) >= 7:
                mark(digits[:-6][digits[6:] - digits[:-6] <= 7])
            if len(digits) >= 13:
                mark(digits[:-12][digits[12:] - digits[:-12] <= 24])
            if high_digit_rows is not None:  # ASCII digits plus possibly non-ASCII ones
                with_digit = np.zeros(n, dtype=bool)
                with_digit[_rows_of(offsets, digits)] = True
                cand |= with_digit & high_digit_rows
        return cand


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
