"""One streaming pass over one dataset: open it, read each file its format's way, sum up."""

from __future__ import annotations

from typing import Any

from fulltune.config import CheckPolicy, DataSection
from fulltune.data.records import (
    CSV_SUFFIXES,
    DATA_PATTERNS,
    DataError,
    RecordError,
    find_data,
    resolve_kind,
)
from fulltune.data.validate.duplicates import Duplicates
from fulltune.data.validate.formats import (
    check_arrow_file,
    check_csv_file,
    check_file_precisely,
    check_jsonl_file,
)
from fulltune.data.validate.parallel import check_jsonl_parallel, span_workers
from fulltune.data.validate.rows import RowCheck
from fulltune.data.validate.tally import Tally
from fulltune.data.validate.verdict import dataset_report

# Why a data file below a hidden or bookkeeping name is not read (`storage.expand_all`).
HIDDEN_REASON = (
    "below a name starting with '.' or '_' (hidden, or bookkeeping such as .ipynb_checkpoints or "
    "Spark's _temporary): move it out to train on it"
)


class DatasetCheck:
    """Problems, lengths and content digests of one dataset. With `train` (the eval or general
    dataset's check), records also in train are reported as train_overlap (eval) or general_overlap;
    for eval, another record kind as kind_mismatch (a general set's kind is its own)."""

    def __init__(
        self,
        name: str,
        uri: str | None,
        cfg: DataSection,
        checks: dict[str, CheckPolicy],
        special: tuple[str, ...],
        *,
        fast: bool = True,
        train: DatasetCheck | None = None,
    ):
        self.name, self.uri, self.cfg, self.special = name, uri or "", cfg, special
        self.fast, self.train = fast, train
        self.tally = Tally(checks, cfg.max_examples)
        self.files: list[str] = []
        self.kind: str | None = None
        self.duplicates: Duplicates | None = None  # once open

    def run(self) -> dict[str, Any]:
        """The dataset's section of the report."""
        rows = self._open()
        if rows is not None:
            for file_index, path in enumerate(self.files):
                self._check_file(rows, file_index, path)
            if self.tally.records == self.tally.bad and not self.tally.has_fatal():
                # however wide the error budget, a dataset needs one record preprocessing can use
                reason = (
                    f"none of the {self.tally.records} records is usable"
                    if self.tally.records
                    else "the data files hold no records"
                )
                self.tally.add("no_records", reason, self.uri)
        return dataset_report(self.uri, self.kind, len(self.files), self.tally, self.cfg)

    def _open(self) -> RowCheck | None:
        """Find the files and the record kind; None when there is nothing to read (no_data)."""
        if not self.uri:
            self.tally.add("no_data", f"data.{self.name}_uri is required", f"data.{self.name}_uri")
            return None
        try:
            found = find_data(self.uri)
        except (DataError, OSError) as exc:
            _raise_if_transient(exc)
            reason = str(exc).removeprefix(f"{self.uri}: ")
            if isinstance(exc, DataError):  # what the URI names (storage errors name the store's problem)
                reason = f"data.{self.name}_uri: {reason}"
            self.tally.add("no_data", reason, self.uri)
            return None
        self.files = found.files
        for path in found.skipped:
            self.tally.add(
                "skipped_file", f"not read: the folder's data files end in {', '.join(DATA_PATTERNS)}", path
            )
        for path in found.hidden:
            self.tally.add("skipped_file", f"not read: {HIDDEN_REASON}", path)
        for place in found.empty:
            self.tally.add("empty_location", "no data files here; the dataset is read from the others", place)
        try:
            self.kind = resolve_kind(self.uri, self.cfg)
        except (RecordError, DataError, OSError):
            pass  # no record names a kind, none parses, or a file breaks: the pass reports it
        train_kind = self.train.kind if self.train and self.name == "eval" else None
        if train_kind and self.kind and self.kind != train_kind:
            self.tally.add(
                "kind_mismatch", f"records are {self.kind!r}, train records are {train_kind!r}", self.uri
            )
        overlap = "general_overlap" if self.name == "general" else "train_overlap"
        train = self.train.duplicates if self.train else None
        self.duplicates = Duplicates(self.tally, self.files, train, overlap)
        return RowCheck(self.cfg, self.kind, self.tally, self.special, self.duplicates)

    def _check_file(self, rows: RowCheck, file_index: int, path: str) -> None:
        before = self.tally.records
        try:
            broken = self._read(rows, file_index, path)
        except OSError as exc:  # vanished or unreadable mid-run
            _raise_if_transient(exc)
            self.tally.add("unreadable_file", f"{type(exc).__name__}: {exc}", path)
            broken = True
        if self.tally.records == before and not broken:
            self.tally.add("empty_file", "no records in this file", path)

    def _read(self, rows: RowCheck, file_index: int, path: str) -> bool:
        """Check every row of one file with the reader its format and the path allow; True when the
        file broke off (corrupt or truncated)."""
        fields = self._fast_fields()
        if fields is None:
            return check_file_precisely(rows, file_index, path)
        if path.endswith((".parquet", ".arrow")):
            return check_arrow_file(rows, file_index, path, fields)
        if path.endswith(CSV_SUFFIXES):
            return check_csv_file(rows, file_index, path, fields)
        workers = span_workers(self.cfg, path)
        if workers > 1:
            return check_jsonl_parallel(rows, file_index, path, fields, workers)
        return check_jsonl_file(rows, file_index, path, fields).broken

    def _fast_fields(self) -> list[str] | None:
        """The columns the fast path reads, or None when it does not apply."""
        if not self.fast or self.kind is None:
            return None
        if self.kind == "text":
            return [self.cfg.text_field]
        if self.kind == "prompt_completion":
            return [self.cfg.prompt_field, self.cfg.completion_field]
        return None  # chat records: the precise path


def _raise_if_transient(exc: Exception) -> None:
    """An S3 endpoint that cannot be reached says nothing about the data: the step fails with that
    error (naming the endpoint) instead of a verdict on the dataset; a missing bucket or refused
    credentials (StorageConfigError) are the config's problem and stay in the report."""
    from fulltune.storage import StorageConfigError, StorageError

    if isinstance(exc, StorageError) and not isinstance(exc, StorageConfigError):
        raise exc
