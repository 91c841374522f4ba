"""Reading an evaluation task file: JSONL, one object a line, every problem named by file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, TypeVar

from fulltune import storage
from fulltune.preprocess.dataset import spread

T = TypeVar("T")


def task_records(uri: str, *, error: type[Exception], expected: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`"<uri> line N"`, record) for each non-blank line, in file order; a line that is not a JSON
    object raises `error` naming the line and saying it expected `expected`."""
    # JSONL lines end at "\n" only: str.splitlines() would also split at characters a JSON string may
    # hold unescaped (U+2028, U+0085 NEL, form feed), refusing a valid line as "not JSON".
    for number, line in enumerate(storage.read_text(uri).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{uri} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise error(f"{where}: expected an object with {expected}")
        yield where, record


def capped(items: list[T], limit: int | None) -> list[T]:
    """At most `limit` of `items`, spread evenly over the whole file in file order, as the loss sets
    are capped: task files are often sorted (by subject, by source), and the first lines alone would
    judge the models on a corner of the task."""
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in spread(len(items), limit)]
