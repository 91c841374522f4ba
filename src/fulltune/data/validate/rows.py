"""The checks of a dataset's rows: precise (record by record) or fast (column-wise); one set of checks.

Both paths end in `RowCheck._check_batch`, which runs the same checks on a batch of good records:
the duplicate index, the content checks (`content.TextCheck`), chat structure and near-duplicates.
They differ only before it: the precise path parses and normalises each record in Python and
hands every record to the content checks; the fast path takes null-free string columns from
pyarrow, finds blank fields with a byte prefilter and `records.normalize`, and hands the content
checks only the rows some check's prefilter keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fulltune.config import DataSection
from fulltune.data.fastcheck import Utf8Column, join_columns, maybe_blank
from fulltune.data.records import FILE_ERRORS, Location, RawRecord, Record, RecordError, normalize
from fulltune.data.validate.content import candidate_rows, chat_structure, find_all, text_checks
from fulltune.data.validate.duplicates import DeferredDuplicates, Duplicates, column_keys, record_key
from fulltune.data.validate.near_duplicates import NearDuplicates
from fulltune.data.validate.tally import Tally

# Good records of the precise path are checked in batches of at most this many records or
# characters (whichever comes first): the duplicate index is vectorised, and memory stays flat.
PRECISE_BATCH_RECORDS = 4096
PRECISE_BATCH_CHARS = 4 << 20


@dataclass
class Batch:
    """Good records of one file, in file order, for the checks both paths share."""

    keys: np.ndarray  # content digests (`duplicates.record_key`)
    positions: np.ndarray  # line or row of each record in its file
    lengths: np.ndarray  # characters of each record's plain text
    where: Callable[[int], Location]  # location of record i
    texts: Callable[[np.ndarray], list[str]]  # plain texts of the records at these indices
    candidates: np.ndarray | None = None  # records the content checks must see; None: all
    conversations: list[list[dict[str, str]]] | None = None  # chat records: their messages


@dataclass
class _PreciseRecords:
    """Good records of the precise path waiting for `_check_batch`."""

    records: list[Record] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    chars: int = 0

    def append(self, record: Record) -> None:
        text = record.plain_text()
        self.records.append(record)
        self.texts.append(text)
        self.chars += len(text)

    def full(self) -> bool:
        return len(self.records) >= PRECISE_BATCH_RECORDS or self.chars >= PRECISE_BATCH_CHARS

    def take(self) -> Batch:
        records, texts = self.records, self.texts
        self.records, self.texts, self.chars = [], [], 0
        return Batch(
            keys=np.array([record_key(r) for r in records], dtype=np.uint64),
            positions=np.array(
                [r.loc.line if r.loc.line is not None else (r.loc.row or 0) for r in records], dtype=np.int64
            ),
            lengths=np.array([len(t) for t in texts], dtype=np.int64),
            where=lambda i: records[i].loc,
            texts=lambda rows: [texts[i] for i in rows.tolist()],
            conversations=[r.messages for r in records] if records and records[0].kind == "chat" else None,
        )


class RowCheck:
    """Checks the rows of one dataset's files (`kind` None: no record names a known kind, and each
    row is reported as unknown_kind)."""

    def __init__(
        self,
        cfg: DataSection,
        kind: str | None,
        tally: Tally,
        special: tuple[str, ...],
        duplicates: Duplicates | DeferredDuplicates,
    ):
        self.cfg, self.kind, self.tally, self.special = cfg, kind, tally, special
        self.duplicates = duplicates
        self.text_checks = text_checks(cfg, special)
        self.near = NearDuplicates() if cfg.near_duplicates else None

    # -- precise -----------------------------------------------------------------------------------

    def check_raw_records(self, file_index: int, raws: Iterable[RawRecord]) -> bool:
        """The precise path over rows parsed one by one; True when the file broke off."""
        pending = _PreciseRecords()
        broken = False
        for raw in raws:
            if raw.code in FILE_ERRORS:  # not a record: the file broke off or cannot be read
                self.tally.add(raw.code, raw.reason or "", raw.loc)
                broken = True
                break
            self.tally.records += 1
            record = self._record(raw)
            if record is not None:
                pending.append(record)
                if pending.full():
                    self._check_batch(file_index, pending.take())
        if pending.records:
            self._check_batch(file_index, pending.take())
        return broken

    def _record(self, raw: RawRecord) -> Record | None:
        """The normalised record, or None when it is unusable (reported as a bad record)."""
        if self.kind is None:
            if raw.code:
                self.tally.bad_record(raw.code, raw.reason or "", raw.loc)
            else:
                self.tally.bad_record(
                    "unknown_kind", _unknown_kind_reason(raw.value or {}, self.cfg), raw.loc
                )
            return None
        try:
            return normalize(raw, self.kind, self.cfg)
        except RecordError as exc:
            self.tally.bad_record(exc.code, exc.reason, exc.loc)
            return None

    # -- fast ----------------------------------------------------------------------------------------

    def check_columns(
        self, file_index: int, cols: dict[str, Any], positions: np.ndarray, loc: Callable[[int], Location]
    ) -> None:
        """The fast path over rows already parsed into null-free string columns `cols` (the record
        kind's fields), at `positions` (lines or rows), each at `loc(position)`."""
        import pyarrow as pa

        self.tally.records += len(positions)
        cols, positions = self._without_blank(cols, positions, loc)
        if not len(positions):
            return
        columns = list(cols.values())
        plain = _plain_text(columns, self.kind or "")
        scan = Utf8Column(plain)
        self._check_batch(
            file_index,
            Batch(
                keys=column_keys(columns, self.kind or ""),
                positions=positions,
                lengths=scan.lengths,
                where=lambda i: loc(int(positions[i])),
                texts=lambda rows: plain.take(pa.array(rows)).to_pylist(),
                candidates=candidate_rows(self.text_checks, scan),
            ),
        )

    def _without_blank(
        self, cols: dict[str, Any], positions: np.ndarray, loc: Callable[[int], Location]
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Report the rows with an empty or whitespace-only field (the precise path's own
        `_record`, on the rows `maybe_blank` cannot clear) and drop them."""
        import pyarrow as pa

        maybe = np.zeros(len(positions), dtype=bool)
        for col in cols.values():
            maybe |= maybe_blank(col)
        bad = np.zeros(len(positions), dtype=bool)
        for i in np.flatnonzero(maybe).tolist():
            value = {f: col[i].as_py() for f, col in cols.items()}
            bad[i] = self._record(RawRecord(loc(int(positions[i])), value=value)) is None
        if not bad.any():
            return cols, positions
        keep = pa.array(~bad)
        return {f: c.filter(keep) for f, c in cols.items()}, positions[~bad]

    # -- both ----------------------------------------------------------------------------------------

    def _check_batch(self, file_index: int, batch: Batch) -> None:
        """Lengths, duplicates, content checks, chat structure and near-duplicates of good records."""
        self.tally.lengths.frombytes(batch.lengths.astype(np.int64, copy=False).tobytes())
        new = self.duplicates.judge(file_index, batch.keys, batch.positions, batch.where)
        if batch.candidates is None:
            rows = np.arange(len(batch.keys))
        else:
            rows = np.flatnonzero(batch.candidates)
        if len(rows):
            for i, text in zip(rows.tolist(), batch.texts(rows), strict=True):
                found = find_all(self.text_checks, text)
                if batch.conversations is not None:
                    found += chat_structure(batch.conversations[i])
                for code, reason in found:
                    self.tally.add(code, reason, batch.where(i))
        if self.near is not None and new is not None:
            rows = np.flatnonzero(new)
            for i, text in zip(rows.tolist(), batch.texts(rows), strict=True):
                where = str(batch.where(i))
                if (earlier := self.near.check(text, where)) is not None:
                    self.tally.add("near_duplicate", f"nearly the same words as {earlier}", where)


def _plain_text(cols: list[Any], kind: str) -> Any:
    """Each row's plain text as `Record.plain_text` makes it: the text, or prompt and completion
    joined by a newline."""
    if kind == "text":
        return cols[0]
    return join_columns(cols[0], cols[1], "\n")


def _unknown_kind_reason(value: dict[str, Any], cfg: DataSection) -> str:
    return (
        f"fields {sorted(value)[:8]} name no record kind; expected {cfg.text_field!r}, "
        f"{cfg.prompt_field!r}+{cfg.completion_field!r} or {cfg.messages_field!r} (see data.*_field; "
        "data.general_text_field for general_uri's text)"
    )
