"""Reading an evaluation task file: JSONL, one object a line, every problem named by file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from fulltune import storage


def task_records(
    uri: str, *, limit: int | None, error: type[Exception], expected: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`"<uri> line N"`, record) for each non-blank line, in file order, at most `limit`; a line that
    is not a JSON object raises `error` naming the line and saying it expected `expected`."""
    count = 0
    # JSONL lines end at "\n" only: str.splitlines() would also split at characters a JSON string may
    # hold unescaped (U+2028, U+0085 NEL, form feed), refusing a valid line as "not JSON".
    for number, line in enumerate(storage.read_text(uri).split("\n"), start=1):
        if not line.strip():
            continue
        if limit is not None and count >= limit:
            return
        where = f"{uri} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise error(f"{where}: expected an object with {expected}")
        count += 1
        yield where, record
