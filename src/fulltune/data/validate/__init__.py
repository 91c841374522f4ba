"""validate_data: read every record of every dataset once and judge it before any GPU is spent.

For each dataset (`data.train_uri`, and `data.eval_uri`, `data.general_uri` when set) every row is
parsed and normalised exactly as preprocessing will read it (`fulltune.data.records`). Each problem
has a stable code, a severity, a count and up to `data.max_examples` example locations:

record errors (the record is unusable, counts as bad, and preprocessing skips it)
    invalid_json, invalid_utf8, not_an_object, missing_field, wrong_type, empty_text, bad_chat,
    too_deep (JSON nested beyond the parser's recursion limit), csv_ragged_row (a CSV row whose
    field count differs from the header's), invalid_csv
fatal errors (fail the dataset whatever the policies)
    no_data (nothing at the URI, or a DatasetDict rather than one split), unreadable_file (corrupt
    gzip, Parquet or Arrow: an unknown number of records is lost), wrong_encoding (a JSONL or CSV
    file in UTF-16 or UTF-32, gzip-compressed without a .gz name, or bzip2, xz, zstd, zip or 7z), unknown_kind (no record names
    a known kind), no_records (no row, or none usable: every record has a record error)
secrets (the record is used; fail on any occurrence by default)
    secret_aws_key (AKIA/ASIA access key ids), secret_private_key (PEM private key blocks)
warnings (the record is used; worth a look)
    duplicate (exact same content as an earlier record of the dataset), train_overlap (an eval
    record also in train: the eval loss would flatter the model; fails above a tenth of the eval
    set by default), general_overlap (a general record also in train: forgetting would be measured
    on training data; fails above a tenth of the general set by default), control_chars (C0/C1 control
    characters), mojibake (U+FFFD or UTF-8 read as Latin-1, e.g. 'Ã©'), empty_file, skipped_file (a
    file in the data folder no reader takes, e.g. .txt, or a data file below a name starting with '.'
    or '_', e.g. .ipynb_checkpoints/ or Spark's _temporary/), empty_location (a location of a {a,b}
    alternation, a data window's day, with no data files), kind_mismatch,
    too_short / too_long (`data.min_chars`, `data.max_chars`), special_token_text (a special-token
    string such as '<|im_end|>' or '[INST]': the fixed SPECIAL_TOKEN_STRINGS plus the configured
    tokenizer's own special tokens when it loads), pii_email, pii_phone, pii_card (digits passing
    the Luhn check), chat_order (two consecutive same-role turns, or assistant before any user),
    chat_system_not_first, near_duplicate (only with `data.near_duplicates`: MinHash over word
    5-shingles, estimated Jaccard >= 0.8; deterministic; signatures of at most
    NEAR_DUP_MAX_INDEXED records kept)
Examples never show PII or secrets whole: 'j***@e***.com', 'AKIA************WXYZ', '************1111'.

Policies (`data.checks`, merged over `default_checks`): each configurable code has an action —
`fail` (fail when the code's rate, records with it / records, is above its `max_rate`), `warn`
(report only) or `ignore` (not reported; an unusable record is still skipped). Record errors
default to `fail` with no own `max_rate`: together they are held to `data.max_error_rate` (the
error budget: bad records whose code's action is `fail` / records). Any other code set to `fail`
without a `max_rate` fails on its first occurrence. Defaults beyond record errors: secrets fail on
any occurrence, exact duplicates above half the records (`codes.DUPLICATE_MAX_RATE`), eval records
also in train above a tenth of the eval set (`codes.TRAIN_OVERLAP_MAX_RATE`: the gate's domain gain
would be measured on training data), general records also in train above a tenth of the general set
(`codes.GENERAL_OVERLAP_MAX_RATE`: forgetting would be). A dataset fails on a fatal
error, an exceeded budget or an exceeded per-code `max_rate`; the DataValidationError message
lists the locations of the `fail` problems first. `report.json` and `report.html` are written to
`out_dir` in every case — also when failing, before DataValidationError is raised.

report.json (format `fulltune.validate_data/v1`):

    {"passed": bool, "max_error_rate": float,
     "checks": {"<code>": {"action", "max_rate"}}, "tokenizer_special_tokens": int,
     "datasets": {"train" | "eval" | "general": {
         "uri", "kind", "files", "records", "bad_records", "error_rate", "max_error_rate",
         "budget_bad_records", "over_budget", "passed",
         "problems": [{"code", "severity", "action", "count", "rate", "max_rate", "exceeded",
                       "examples": [{"location", "reason"}]}],
         "length_chars": {"min", "p50", "p95", "max"} | null,
         "length_histogram": [{"lo", "hi", "count"}]}},   # power-of-two character bins
     "metrics": {"<dataset>_records", "<dataset>_bad_records", "<dataset>_error_rate"}}

Everything streams: JSONL in blocks of whole lines (JSONL_BLOCK_BYTES), Parquet and Arrow in record
batches, CSV row by row (`formats`). Memory grows only by a few bytes per record: the record's
length (8 bytes) and, per distinct record, a 64-bit content digest plus its first location (16
bytes, in `fastcheck.ContentIndex`: ~24 MB per million records in all), plus about 1 KB per indexed
record with near_duplicates (its signature, band digests and location; ~200 MB at the
NEAR_DUP_MAX_INDEXED cap). The regex checks look at whole records only behind cheap substring
tests, so a 50 MB line takes seconds, not minutes.

A large local JSONL file (plain, not gzip; without near_duplicates) is checked by several worker
processes (`parallel`), one per PARALLEL_MIN_BYTES up to `data.validate_workers` (default: the CPUs
the step may use, at most DEFAULT_MAX_WORKERS): `jsonl_spans` cuts it into byte ranges of whole
lines (at most PARALLEL_SPAN_BYTES each), each worker checks its range with lines numbered from its
start and returns its problems (count and first examples per code), lengths and content digests;
the parent folds them in file order, shifting line numbers, and judges duplicates and train/eval
overlap over the whole dataset itself, so the report is byte for byte the one a single process
writes (tests/test_bad_inputs.py).

Two paths, one report (`validate_data(..., fast=False)` forces the second): text and
prompt/completion records are checked column-wise with pyarrow and numpy (`fulltune.data.fastcheck`:
pyarrow.json for JSONL blocks, byte-scan prefilters, the exact Python checks only on the rows a
prefilter cannot clear); chat records, and every JSONL line pyarrow rejects or might read otherwise
than json.loads, go through the precise path — json.loads line by line, each error with its
file:line. Both run the same checks (`rows.RowCheck`; each content check, with its exact test and
its prefilter, is defined once in `content`) and give identical reports (tests/test_bad_inputs.py
runs both on the same corpora).

The modules: `codes` (codes, severities, policies), `content` (the content checks), `duplicates`
and `near_duplicates`, `tally` (the counts of a pass), `rows` (the checks of a file's rows, fast or
precise), `formats` (each file format's reader), `parallel` (spans of a file on worker processes),
`dataset_check` (one dataset), `stats`, `verdict` (judgement, report.json, the error message) and
`page` (report.html).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fulltune.config import RunConfig
from fulltune.data.validate.codes import (
    CODES,
    FATAL,
    RECORD_ERRORS,
    WARNINGS,
    default_checks,
    resolve_checks,
)
from fulltune.data.validate.content import (
    SPECIAL_TOKEN_STRINGS,
    chat_structure,
    find_sensitive,
    mask_email,
    special_token_pattern,
    special_token_strings,
    tokenizer_special_tokens,
)
from fulltune.data.validate.dataset_check import DatasetCheck
from fulltune.data.validate.near_duplicates import NearDuplicates
from fulltune.data.validate.page import render_html, write_pages
from fulltune.data.validate.parallel import usable_cpus
from fulltune.data.validate.stats import length_histogram, percentile
from fulltune.data.validate.verdict import REPORT_FORMAT, DataValidationError, failure_message, full_report

__all__ = [
    "CODES",
    "FATAL",
    "RECORD_ERRORS",
    "REPORT_FORMAT",
    "SPECIAL_TOKEN_STRINGS",
    "WARNINGS",
    "DataValidationError",
    "NearDuplicates",
    "chat_structure",
    "default_checks",
    "failure_message",
    "find_sensitive",
    "length_histogram",
    "mask_email",
    "percentile",
    "render_html",
    "resolve_checks",
    "special_token_pattern",
    "tokenizer_special_tokens",
    "usable_cpus",
    "validate_data",
]


def validate_data(
    cfg: RunConfig, out_dir: Path, *, fast: bool = True, report_location: str | None = None
) -> dict[str, Any]:
    """Validate the configured datasets, write `report.json` and `report.html`, return the report.

    Args:
        cfg: the run config; `data` names the datasets, the columns, the error budget.
        out_dir: local directory for `report.json` and `report.html` (created if needed).
        fast: check well-formed blocks column-wise with pyarrow (`fulltune.data.fastcheck`); False
            reads every record with the precise line-by-line path. The reports are identical.
        report_location: where the reader of a failure finds the HTML report (the step's artifact);
            default `out_dir/report.html`.

    Raises:
        DataValidationError: a dataset is missing, unreadable, or over its error budget (the
            reports are written first); or, before any dataset is read, an evaluation task file
            (`evaluation.mc_tasks`, `generation_tasks`) is missing or has a line evaluate would
            refuse, which would otherwise surface only after training.
    """
    from fulltune.evaluate.core import task_file_problems

    if problems := task_file_problems(cfg.evaluation):
        raise DataValidationError(
            f"{len(problems)} evaluation task file problem(s), which evaluate would refuse after "
            "training:\n" + "\n".join(f"  {p}" for p in problems)
        )
    out_dir = Path(out_dir)
    data = cfg.data
    checks = resolve_checks(data)
    tokenizer_tokens = tokenizer_special_tokens(cfg)
    special = special_token_strings(tokenizer_tokens)
    datasets: dict[str, dict[str, Any]] = {}
    train: DatasetCheck | None = None
    for name, uri in (("train", data.train_uri), ("eval", data.eval_uri), ("general", data.general_uri)):
        if name != "train" and not uri:
            continue
        check = DatasetCheck(
            name,
            uri,
            data.reading(name),
            checks,
            special,
            fast=fast,
            train=train if name != "train" else None,
        )
        datasets[name] = check.run()
        if name == "train":
            train = check
    report = full_report(datasets, data, checks, len(tokenizer_tokens))
    write_pages(report, out_dir)
    if not report["passed"]:
        raise DataValidationError(failure_message(report, report_location or out_dir / "report.html"))
    return report
