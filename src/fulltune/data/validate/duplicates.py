"""duplicate, train_overlap and general_overlap: 64-bit digests of each record's content, judged in
file order."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from fulltune.data.fastcheck import ContentIndex, content_hash, content_hashes, join_columns
from fulltune.data.records import Location, Record
from fulltune.data.validate.tally import Tally

POSITION_BITS = 40  # packed first-seen location: file index << 40 | line or row
CONTENT_SEPARATOR = "\x1f"  # between a prompt and its completion in the content digested


def record_key(record: Record) -> int:
    """The content digest of one record (the precise path)."""
    if record.kind == "text":
        content = record.text or ""
    elif record.kind == "prompt_completion":
        content = f"{record.prompt}{CONTENT_SEPARATOR}{record.completion}"
    else:
        content = json.dumps(record.messages, ensure_ascii=False, sort_keys=True)
    return content_hash(content.encode("utf-8", "surrogatepass"))


def column_keys(cols: list[Any], kind: str) -> np.ndarray:
    """`record_key` of each row of a block's null-free string columns (text, or prompt and
    completion)."""
    if kind == "text":
        return content_hashes(cols[0])
    return content_hashes(join_columns(cols[0], cols[1], CONTENT_SEPARATOR))


def unpack(packed: int, files: list[str]) -> str:
    """A packed first location as the report writes it."""
    path, position = files[packed >> POSITION_BITS], packed & ((1 << POSITION_BITS) - 1)
    by_row = path.endswith((".parquet", ".arrow"))
    return str(Location(path, row=position) if by_row else Location(path, line=position))


class Duplicates:
    """The content digests of one dataset so far, each with its first location; with `train`,
    also the digests of the train dataset, which this one (eval or general) must not repeat: a
    record that does is reported as `overlap`."""

    def __init__(
        self,
        tally: Tally,
        files: list[str],
        train: Duplicates | None = None,
        overlap: str = "train_overlap",
    ):
        self.tally, self.files, self.train, self.overlap = tally, files, train, overlap
        self.index = ContentIndex()  # content digest -> packed first location

    def judge(
        self, file_index: int, keys: np.ndarray, positions: np.ndarray, where: Callable[[int], Location]
    ) -> np.ndarray:
        """Report `duplicate` and the overlap with train for the records of one file with content digests
        `keys`, at `positions` (lines or rows, in file order), record i at `where(i)`; index the
        new ones. Returns the mask of the records seen for the first time."""
        m = len(keys)
        packed = (np.uint64(file_index) << np.uint64(POSITION_BITS)) | positions.astype(np.uint64)
        _, first_idx, inverse = np.unique(keys, return_index=True, return_inverse=True)
        first_row = first_idx[inverse.reshape(-1)]
        found, earlier = self.index.lookup(keys)
        new = ~found & (first_row == np.arange(m))
        self.index.add_many(keys[new], packed[new])
        seen = np.where(found, earlier, packed[first_row])
        for i in np.flatnonzero(~new).tolist():
            self.tally.add("duplicate", f"same content as {unpack(int(seen[i]), self.files)}", where(i))
        if self.train is not None:
            in_train, first = self.train.index.lookup(keys)
            for i in np.flatnonzero(in_train).tolist():
                reason = f"same content as train record {unpack(int(first[i]), self.train.files)}"
                self.tally.add(self.overlap, reason, where(i))
        return new


class DeferredDuplicates:
    """A span worker's stand-in for `Duplicates`: it keeps the digests and line numbers in order
    for the parent, which judges duplicates and overlap over the whole dataset."""

    def __init__(self) -> None:
        self._keys: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []

    def judge(
        self, file_index: int, keys: np.ndarray, positions: np.ndarray, where: Callable[[int], Location]
    ) -> None:
        self._keys.append(keys)
        self._positions.append(np.asarray(positions, dtype=np.int64))

    def collected(self) -> tuple[np.ndarray, np.ndarray]:
        """(digests, line numbers) of every record judged, in order."""
        if not self._keys:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
        return np.concatenate(self._keys), np.concatenate(self._positions)
