"""One data file, read the way its format allows, its rows handed to a `RowCheck`.

Each reader returns whether the file broke off (corrupt or truncated: an unknown number of records
is lost). Rows that come out of pyarrow as null-free strings go the fast way (`RowCheck.check_columns`);
everything else goes the precise way (`RowCheck.check_raw_records`), with its file:line or row.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from fulltune.data.fastcheck import line_bounds, parse_jsonl
from fulltune.data.records import (
    JsonlBlock,
    Location,
    RawRecord,
    iter_arrow_batches,
    iter_jsonl_blocks,
    iter_raw_file,
    parse_jsonl_block,
)
from fulltune.data.validate.rows import RowCheck

CSV_RUN_ROWS = 8192  # good CSV rows checked column-wise at a time


class JsonlRead(NamedTuple):
    broken: bool  # the file broke off
    lines: int  # lines read (of the span, when reading one)


def check_file_precisely(rows: RowCheck, file_index: int, path: str) -> bool:
    """The precise path over every row, whatever the format."""
    return rows.check_raw_records(file_index, iter_raw_file(path))


def check_jsonl_file(
    rows: RowCheck, file_index: int, path: str, fields: list[str], span: tuple[int, int] | None = None
) -> JsonlRead:
    """JSONL in blocks of whole lines, each cut into the line ranges pyarrow takes (fast) and the
    ones it does not (precise). With `span`, only that byte range, its lines numbered from 1."""
    lines = 0
    for block in iter_jsonl_blocks(path, span=span):
        if isinstance(block, RawRecord):  # the file broke off
            rows.tally.add(block.code or "unreadable_file", block.reason or "", block.loc)
            return JsonlRead(True, lines)
        bounds = line_bounds(block.data)
        lines = block.first_line - 1 + len(bounds) - 1
        for a, b, cols in parse_jsonl(block.data, fields):
            if cols is None:  # lines pyarrow did not take: json.loads, line by line
                part = JsonlBlock(
                    path, block.first_line + a, block.data[bounds[a] : bounds[b]], block.first and a == 0
                )
                if rows.check_raw_records(file_index, parse_jsonl_block(part)):
                    return JsonlRead(True, lines)
                continue
            positions = np.arange(block.first_line + a, block.first_line + b, dtype=np.int64)
            rows.check_columns(file_index, cols, positions, lambda n: Location(path, line=n))
    return JsonlRead(False, lines)


def check_csv_file(rows: RowCheck, file_index: int, path: str, fields: list[str]) -> bool:
    """The csv module parses (its exact semantics and line numbers); runs of rows whose fields
    are all strings are checked column-wise, the others one by one."""
    import pyarrow as pa

    run: list[RawRecord] = []

    def flush() -> None:
        if run:
            cols = {f: pa.array([r.value[f] for r in run], pa.string()) for f in fields}  # type: ignore[index]
            lines = np.array([r.loc.line for r in run], dtype=np.int64)
            rows.check_columns(file_index, cols, lines, lambda n: Location(path, line=n))
            run.clear()

    for raw in iter_raw_file(path):
        if raw.value is not None and all(isinstance(raw.value.get(f), str) for f in fields):
            run.append(raw)
            if len(run) >= CSV_RUN_ROWS:
                flush()
            continue
        flush()
        if rows.check_raw_records(file_index, [raw]):
            return True
    flush()
    return False


def check_arrow_file(rows: RowCheck, file_index: int, path: str, fields: list[str]) -> bool:
    """Parquet or Arrow in record batches: column-wise where the fields are null-free strings."""
    for item in iter_arrow_batches(path):
        if isinstance(item, RawRecord):  # the file broke off
            rows.tally.add(item.code or "unreadable_file", item.reason or "", item.loc)
            return True
        batch, rg = item.batch, item.row_group
        cols = _string_columns(batch, fields)
        if cols is not None:
            positions = np.arange(item.first_row, item.first_row + batch.num_rows, dtype=np.int64)
            rows.check_columns(
                file_index, cols, positions, lambda n, rg=rg: Location(path, row_group=rg, row=n)
            )
            continue
        raws = (
            RawRecord(Location(path, row_group=rg, row=item.first_row + i), value=value)
            for i, value in enumerate(batch.to_pylist())
        )
        rows.check_raw_records(file_index, raws)
    return False


def _string_columns(batch: Any, fields: list[str]) -> dict[str, Any] | None:
    """The batch's `fields` when all are there as null-free strings, else None."""
    import pyarrow as pa

    names = batch.schema.names
    cols = {f: batch.column(names.index(f)) for f in fields if f in names}
    if len(cols) == len(fields) and all(
        (pa.types.is_string(c.type) or pa.types.is_large_string(c.type)) and not c.null_count
        for c in cols.values()
    ):
        return cols
    return None
