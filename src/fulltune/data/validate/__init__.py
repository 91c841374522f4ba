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
    gzip, Parquet or Arrow: an unknown number of records is lost), unknown_kind (no record names a
    known kind), no_records (files hold no rows)
secrets (the record is used; fail on any occurrence by default)
    secret_aws_key (AKIA/ASIA access key ids), secret_private_key (PEM private key blocks)
warnings (the record is used; worth a look)
    duplicate (exact same content as an earlier record of the dataset), train_overlap (an eval
    record also in train: the eval loss would flatter the model), control_chars (C0/C1 control
    characters), mojibake (U+FFFD or UTF-8 read as Latin-1, e.g. 'Ã©'), empty_file, kind_mismatch,
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
error budget: bad records whose code's action is `fail` / records). A dataset fails on a fatal
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

Everything streams: JSONL in blocks of whole lines (JSONL_BLOCK_BYTES), Parquet and Arrow in
record batches, CSV row by row. Memory grows only by a few bytes per record: the record's length
(8 bytes) and, per distinct record, a 64-bit content digest plus its first location (16 bytes, in
`fastcheck.ContentIndex`: ~24 MB per million records in all), plus 512 bytes per indexed record
with near_duplicates. The regex checks look at whole records only behind cheap substring tests,
so a 50 MB line takes seconds, not minutes.

A large local JSONL file (plain, not gzip; without near_duplicates) is checked by several worker
processes, one per PARALLEL_MIN_BYTES up to `data.validate_workers` (default: the CPUs the step
may use, at most DEFAULT_MAX_WORKERS): `jsonl_spans` cuts it into byte ranges of whole lines (at
most PARALLEL_SPAN_BYTES each), each worker checks its range with lines numbered from its start
and returns its problems (count and first examples per code), lengths and content digests; the
parent folds them in file order, shifting line numbers, and judges duplicates and train/eval
overlap over the whole dataset itself, so the report is byte for byte the one a single process
writes (tests/test_bad_inputs.py).

Two paths, one report (`validate_data(..., fast=False)` forces the second): text and
prompt/completion records are checked column-wise with pyarrow and numpy (`fulltune.data.fastcheck`:
pyarrow.json for JSONL blocks, byte-scan prefilters, the exact Python checks only on the rows a
prefilter cannot clear); chat records, and every JSONL line pyarrow rejects or might read otherwise
than json.loads, go through the precise path — json.loads line by line, each error with its
file:line. Both give identical reports (tests/test_bad_inputs.py runs both on the same corpora).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
from array import array
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fulltune import storage
from fulltune.config import CheckPolicy, ConfigError, DataSection, RunConfig
from fulltune.data.fastcheck import (
    ContentIndex,
    Prefilter,
    content_hash,
    content_hashes,
    line_bounds,
    maybe_blank,
    parse_jsonl,
    utf8_lengths,
)
from fulltune.data.records import (
    DataError,
    JsonlBlock,
    Location,
    RawRecord,
    Record,
    RecordError,
    data_files,
    iter_arrow_batches,
    iter_jsonl_blocks,
    iter_raw_file,
    jsonl_spans,
    normalize,
    parse_jsonl_block,
    resolve_kind,
)
from fulltune.reports import CSS, write_reports

log = logging.getLogger(__name__)

REPORT_FORMAT = "fulltune.validate_data/v1"

# code -> (severity, what it means); "fatal" errors fail the dataset whatever the error budget.
CODES: dict[str, tuple[str, str]] = {
    "no_data": ("fatal", "nothing to read at the URI"),
    "unreadable_file": ("fatal", "a corrupt or truncated file: an unknown number of records is lost"),
    "unknown_kind": ("fatal", "the fields name no record kind (see data.text_field and friends)"),
    "no_records": ("fatal", "the data files hold no records"),
    "invalid_json": ("error", "the line is not valid JSON"),
    "invalid_utf8": ("error", "the line is not valid UTF-8"),
    "not_an_object": ("error", "the line is JSON but not an object"),
    "missing_field": ("error", "a field the record kind needs is absent"),
    "wrong_type": ("error", "a field has the wrong type"),
    "empty_text": ("error", "a text field is empty or whitespace only"),
    "bad_chat": ("error", "the messages are not a usable conversation"),
    "too_deep": ("error", "JSON nested too deeply to parse"),
    "csv_ragged_row": ("error", "a CSV row with more or fewer fields than the header"),
    "invalid_csv": ("error", "a CSV row the csv module cannot parse"),
    "secret_aws_key": ("error", "an AWS access key id (AKIA.../ASIA...): never train on credentials"),
    "secret_private_key": ("error", "a PEM private key block: never train on credentials"),
    "duplicate": ("warning", "same content as an earlier record: it is trained on twice"),
    "train_overlap": ("warning", "an eval record also in train: eval loss would flatter the model"),
    "control_chars": ("warning", "control characters, usually extraction debris"),
    "mojibake": ("warning", "garbled characters from a wrong decode upstream"),
    "empty_file": ("warning", "a data file without records"),
    "kind_mismatch": ("warning", "this dataset's record kind differs from train's"),
    "too_short": ("warning", "fewer characters than data.min_chars"),
    "too_long": ("warning", "more characters than data.max_chars"),
    "special_token_text": (
        "warning",
        "text holding a tokenizer special-token string (prompt-format injection)",
    ),
    "pii_email": ("warning", "an e-mail address"),
    "pii_phone": ("warning", "a phone number"),
    "pii_card": ("warning", "a payment card number (passes the Luhn check)"),
    "chat_order": ("warning", "two consecutive turns of one role, or an assistant turn before any user turn"),
    "chat_system_not_first": ("warning", "a system message that is not the first message"),
    "near_duplicate": ("warning", "nearly the same words as an earlier record (data.near_duplicates)"),
}
# Codes whose record is unusable (skipped by preprocessing): they count as bad records.
RECORD_ERRORS = frozenset(
    {
        "invalid_json",
        "invalid_utf8",
        "not_an_object",
        "missing_field",
        "wrong_type",
        "empty_text",
        "bad_chat",
        "too_deep",
        "csv_ragged_row",
        "invalid_csv",
    }
)
FATAL = frozenset(code for code, (severity, _) in CODES.items() if severity == "fatal")
WARNINGS = frozenset(code for code, (severity, _) in CODES.items() if severity == "warning")


def default_checks(max_error_rate: float) -> dict[str, CheckPolicy]:
    """The policy of every configurable code: record errors fail above data.max_error_rate (their
    sum is also held to it); secrets fail on any occurrence; everything else warns."""
    out: dict[str, CheckPolicy] = {}
    for code in CODES:
        if code in FATAL:
            continue
        if code.startswith("secret_"):
            out[code] = CheckPolicy(action="fail", max_rate=0.0)
        elif code in RECORD_ERRORS:
            out[code] = CheckPolicy(action="fail", max_rate=None)
        else:
            out[code] = CheckPolicy(action="warn")
    return out


def resolve_checks(cfg: DataSection) -> dict[str, CheckPolicy]:
    """Defaults overridden by `data.checks`; unknown or fatal codes are a ConfigError."""
    checks = default_checks(cfg.max_error_rate)
    for code, policy in cfg.checks.items():
        if code in FATAL:
            raise ConfigError(f"data.checks.{code}: {code!r} is fatal and has no policy")
        if code not in checks:
            raise ConfigError(f"data.checks.{code}: unknown code; known: {', '.join(sorted(checks))}")
        checks[code] = policy
    return checks


MESSAGE_LINES = 20  # problem lines in the DataValidationError message; the report has them all

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_MOJIBAKE = re.compile("\ufffd|Ã[\u00a0-\u00bf]|Â[\u00a0-\u00bf]|â€")
_POSITION_BITS = 40  # packed first-seen location: file index << 40 | line or row
CSV_RUN_ROWS = 8192  # good CSV rows checked column-wise at a time

# Strings of the common chat/prompt formats that tokenizers map to special tokens.
SPECIAL_TOKEN_STRINGS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
    "<start_of_turn>",
    "<end_of_turn>",
)
_EMAIL = re.compile(
    r"(?<![\w.%+-])([A-Za-z0-9._%+-]{1,64})@([A-Za-z0-9-]{1,63})((?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24})\b"
)
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_AWS_KEY = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_DIGIT_RUN = re.compile(r"\d[\d ().+-]{8,}")  # candidate card and phone numbers
_PRIVATE_KEY = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----")
NEAR_DUP_PERMUTATIONS = 64
NEAR_DUP_BANDS = 16  # 16 bands of 4 rows: candidates from Jaccard ~0.5, verified at the threshold
NEAR_DUP_THRESHOLD = 0.8
NEAR_DUP_SHINGLE = 5  # words per shingle
NEAR_DUP_MAX_WORDS = 2000  # words of each record looked at (bounds time)
NEAR_DUP_MAX_INDEXED = 200_000  # records whose signatures are kept (bounds memory: ~512 B each)


class DataValidationError(ValueError):
    """Data that fails validation; the message starts with a one-line summary, then lists the top
    problems as `location: code: reason`."""


def validate_data(cfg: RunConfig, out_dir: Path, *, fast: bool = True) -> dict[str, Any]:
    """Validate the configured datasets, write `report.json` and `report.html`, return the report.

    Args:
        cfg: the run config; `data` names the datasets, the columns, the error budget.
        out_dir: local directory for `report.json` and `report.html` (created if needed).
        fast: check well-formed blocks column-wise with pyarrow (`fulltune.data.fastcheck`); False
            reads every record with the precise line-by-line path. The reports are identical.

    Raises:
        DataValidationError: a dataset is missing, unreadable, or over its error budget. The
            reports are written first.
    """
    out_dir = Path(out_dir)
    data = cfg.data
    checks = resolve_checks(data)
    tokenizer_tokens = tokenizer_special_tokens(cfg)
    special = special_token_pattern(tokenizer_tokens)
    datasets: dict[str, dict[str, Any]] = {}
    train_index: ContentIndex | None = None
    train_files: list[str] = []
    for name, uri in (("train", data.train_uri), ("eval", data.eval_uri), ("general", data.general_uri)):
        if name != "train" and not uri:
            continue
        check = _DatasetCheck(name, uri, data, checks, special, fast=fast)
        if name == "eval" and train_index is not None:
            check.compare_with(train_index, train_files, datasets["train"]["kind"])
        datasets[name] = check.run()
        if name == "train":
            train_index, train_files = check.index, check.files

    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "passed": all(d["passed"] for d in datasets.values()),
        "max_error_rate": data.max_error_rate,
        "checks": {code: policy.model_dump() for code, policy in sorted(checks.items())},
        "tokenizer_special_tokens": len(tokenizer_tokens),
        "datasets": datasets,
        "metrics": _metrics(datasets),
    }
    write_reports(report, out_dir, render_html)
    if not report["passed"]:
        raise DataValidationError(failure_message(report, out_dir / "report.html"))
    return report


# -- content checks ---------------------------------------------------------------------------------


def _mask(text: str, keep_start: int = 1, keep_end: int = 0) -> str:
    """Keep a few characters at each end, star the rest: never print PII or secrets whole."""
    if len(text) <= keep_start + keep_end:
        return "*" * len(text)
    return text[:keep_start] + "*" * (len(text) - keep_start - keep_end) + text[len(text) - keep_end :]


def mask_email(local: str, domain: str, tld: str) -> str:
    """'jane.doe@example.com' -> 'j***@e***.com'."""
    return f"{local[:1]}***@{domain[:1]}***{tld}"


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def find_sensitive(text: str) -> list[tuple[str, str]]:
    """(code, reason with the match masked) for the first PII/secret of each kind in `text`."""
    # Cheap substring tests first, and the character-class regexes only on small windows: a 50 MB
    # record must not take minutes.
    found: list[tuple[str, str]] = []
    if ("AKIA" in text or "ASIA" in text) and (m := _AWS_KEY.search(text)):
        found.append(("secret_aws_key", f"{_mask(m.group(), 4, 4)} at character {m.start()}"))
    if "PRIVATE KEY-----" in text and (m := _PRIVATE_KEY.search(text)):
        found.append(
            ("secret_private_key", f"-----BEGIN {m.group(1)}PRIVATE KEY----- block at character {m.start()}")
        )
    at = text.find("@")
    for _ in range(1000):
        if at < 0:
            break
        lo = max(0, at - 65)
        if (m := _EMAIL.search(text[lo : at + 400])) and lo + m.start() <= at:
            found.append(("pii_email", f"{mask_email(*m.groups())} at character {lo + m.start()}"))
            break
        at = text.find("@", at + 1)
    if any(d in text for d in "0123456789"):
        card = phone = None
        for run in _DIGIT_RUN.finditer(text):
            lo = max(0, run.start() - 1)
            window = text[lo : run.end() + 1]
            if card is None:
                for m in _CARD.finditer(window):
                    digits = re.sub(r"\D", "", m.group())
                    if 13 <= len(digits) <= 19 and _luhn(digits):
                        card = ("pii_card", f"{_mask(digits, 0, 4)} at character {lo + m.start()}")
                        break
            if phone is None and (m := _PHONE.search(window)):
                digits = re.sub(r"\D", "", m.group())
                phone = ("pii_phone", f"{_mask(digits, 0, 2)} at character {lo + m.start()}")
            if card and phone:
                break
        found += [f for f in (card, phone) if f]
    return found


def special_token_pattern(extra: list[str] | tuple[str, ...] = ()) -> re.Pattern[str]:
    """One regex over the fixed special-token strings plus `extra` (a tokenizer's own)."""
    tokens = {t for t in (*SPECIAL_TOKEN_STRINGS, *extra) if isinstance(t, str) and len(t.strip()) >= 3}
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=lambda t: (-len(t), t))))
    _PATTERN_TOKENS[pattern.pattern] = tuple(sorted(tokens))
    return pattern


_PATTERN_TOKENS: dict[str, tuple[str, ...]] = {}  # special_token_pattern's source -> its strings


def tokenizer_special_tokens(cfg: RunConfig) -> list[str]:
    """The special tokens of the configured tokenizer; none when there is no loadable tokenizer."""
    uri = cfg.tokenizer_uri
    if not uri:
        return []
    try:
        from fulltune.hf import load_tokenizer

        tok = load_tokenizer(uri, trust_remote_code=cfg.model.trust_remote_code)
        tokens = list(getattr(tok, "all_special_tokens", []) or [])
        decoder = getattr(tok, "added_tokens_decoder", {}) or {}
        tokens += [str(t) for t in decoder.values() if getattr(t, "special", False)]
        return sorted(set(tokens))
    except Exception:  # no tokenizer there (yet): the fixed list still applies
        return []


def chat_structure(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(code, reason) for conversations in an order chat templates do not expect."""
    found: list[tuple[str, str]] = []
    roles = [m["role"] for m in messages]
    for i, role in enumerate(roles):
        if role == "system" and i > 0:
            found.append(("chat_system_not_first", f"message {i} is a system message"))
            break
    seen_user = False
    for i, role in enumerate(roles):
        if role == "assistant" and not seen_user:
            found.append(("chat_order", f"message {i} (assistant) comes before any user message"))
            break
        seen_user = seen_user or role == "user"
        if i and role == roles[i - 1] and role in ("user", "assistant", "system"):
            found.append(("chat_order", f"messages {i - 1} and {i} are both {role}"))
            break
    return found


class NearDuplicates:
    """MinHash over word shingles with LSH banding: deterministic, bounded memory and time."""

    def __init__(self) -> None:
        import numpy as np

        self.np = np
        rng = np.random.default_rng(20240611)
        self.seeds = rng.integers(1, 2**63 - 1, size=NEAR_DUP_PERMUTATIONS, dtype=np.uint64) | np.uint64(1)
        self.buckets: dict[tuple[int, bytes], int] = {}
        self.signatures: list[bytes] = []
        self.locations: list[str] = []

    def signature(self, text: str) -> Any:
        np = self.np
        words = text.lower().split()[:NEAR_DUP_MAX_WORDS]
        if len(words) < NEAR_DUP_SHINGLE:
            return None  # too short to judge by shingles
        shingles = {
            " ".join(words[i : i + NEAR_DUP_SHINGLE]) for i in range(len(words) - NEAR_DUP_SHINGLE + 1)
        }
        hashes = np.fromiter(
            (
                int.from_bytes(
                    hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
                )
                for s in shingles
            ),
            dtype=np.uint64,
            count=len(shingles),
        )
        with np.errstate(over="ignore"):
            mixed = hashes[:, None] * self.seeds[None, :]
            mixed ^= mixed >> np.uint64(29)
        return mixed.min(axis=0)

    def check(self, text: str, location: str) -> str | None:
        """The location of an earlier record this one nearly duplicates, else None (then indexed)."""
        sig = self.signature(text)
        if sig is None:
            return None
        rows = NEAR_DUP_PERMUTATIONS // NEAR_DUP_BANDS
        keys = [(b, sig[b * rows : (b + 1) * rows].tobytes()) for b in range(NEAR_DUP_BANDS)]
        for key in keys:
            other = self.buckets.get(key)
            if other is None:
                continue
            theirs = self.np.frombuffer(self.signatures[other], dtype=self.np.uint64)
            if float((theirs == sig).mean()) >= NEAR_DUP_THRESHOLD:
                return self.locations[other]
        if len(self.signatures) < NEAR_DUP_MAX_INDEXED:
            index = len(self.signatures)
            self.signatures.append(sig.tobytes())
            self.locations.append(location)
            for key in keys:
                self.buckets.setdefault(key, index)
        return None


# -- one dataset ----------------------------------------------------------------------------------


@dataclass
class _Problem:
    code: str
    severity: str
    count: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)


class _DatasetCheck:
    """One streaming pass over one dataset, collecting problems, lengths and content hashes."""

    def __init__(
        self,
        name: str,
        uri: str | None,
        cfg: DataSection,
        checks: dict[str, CheckPolicy] | None = None,
        special: re.Pattern[str] | None = None,
        *,
        fast: bool = True,
    ):
        self.name, self.uri, self.cfg = name, uri or "", cfg
        self.checks = checks if checks is not None else resolve_checks(cfg)
        self.special = special or special_token_pattern()
        self.near = NearDuplicates() if cfg.near_duplicates else None
        self.budget_bad = 0  # bad records whose code's action is 'fail': held to max_error_rate
        self.problems: dict[str, _Problem] = {}
        self.files: list[str] = []
        self.index = ContentIndex()  # content hash -> packed first location
        self.fast = fast
        self.prefilter = Prefilter(_PATTERN_TOKENS.get(self.special.pattern))
        self.records = self.bad = 0
        self.lengths = array("q")
        self.kind: str | None = None
        self._other: tuple[ContentIndex, list[str], str | None] | None = None
        # In a worker checking one span of a file (`_check_span`): content digests and line
        # numbers in order, for the parent to judge duplicates and overlap over the whole dataset.
        self._deferred: tuple[list[np.ndarray], list[np.ndarray]] | None = None
        self.lines_read = 0  # lines of the current JSONL file (or span) read so far

    def compare_with(self, index: ContentIndex, files: list[str], kind: str | None) -> None:
        """Report records that also occur in another dataset (eval vs train) as train_overlap."""
        self._other = (index, files, kind)

    def bad_record(self, code: str, reason: str, location: Location | str) -> None:
        self.bad += 1
        policy = self.checks.get(code)
        if policy is None or policy.action == "fail":
            self.budget_bad += 1
        self.add(code, reason, location)

    def add(self, code: str, reason: str, location: Location | str) -> None:
        policy = self.checks.get(code)
        if policy is not None and policy.action == "ignore":
            return
        severity = "warning" if code in WARNINGS else "error"
        problem = self.problems.setdefault(code, _Problem(code, severity))
        problem.count += 1
        if len(problem.examples) < self.cfg.max_examples:
            # a worker keeps the Location: the parent shifts its span-relative line number
            where: Any = location if self._deferred is not None else str(location)
            problem.examples.append({"location": where, "reason": reason})

    def run(self) -> dict[str, Any]:
        if not self.uri:
            self.add("no_data", f"data.{self.name}_uri is required", f"data.{self.name}_uri")
            return self.result()
        try:
            self.files = data_files(self.uri)
        except (DataError, OSError) as exc:
            self.add("no_data", str(exc).removeprefix(f"{self.uri}: "), self.uri)
            return self.result()
        try:
            self.kind = resolve_kind(self.uri, self.cfg)
        except (RecordError, DataError, OSError):
            pass  # no record names a kind, none parses, or a file breaks: the pass below reports it
        if self._other and self._other[2] and self.kind and self.kind != self._other[2]:
            self.add(
                "kind_mismatch", f"records are {self.kind!r}, train records are {self._other[2]!r}", self.uri
            )

        for file_index, path in enumerate(self.files):
            before = self.records
            try:
                broken = self._check_file(file_index, path)
            except OSError as exc:  # vanished or unreadable mid-run
                self.add("unreadable_file", f"{type(exc).__name__}: {exc}", path)
                broken = True
            if self.records == before and not broken:
                self.add("empty_file", "no records in this file", path)
        if self.records == 0 and not any(p.code in FATAL for p in self.problems.values()):
            self.add("no_records", "the data files hold no records", self.uri)
        return self.result()

    def _check_file(self, file_index: int, path: str) -> bool:
        """Check every row of one file; True when the file broke off (corrupt or truncated)."""
        fields = self._fast_fields()
        if fields is None:
            return self._check_rows(file_index, iter_raw_file(path))
        if path.endswith((".parquet", ".arrow")):
            return self._check_arrow_file(file_index, path, fields)
        if path.endswith(".csv"):
            return self._check_csv_file(file_index, path, fields)
        workers = self._span_workers(path)
        if workers > 1:
            return self._check_jsonl_parallel(file_index, path, fields, workers)
        return self._check_jsonl_file(file_index, path, fields)

    def _span_workers(self, path: str) -> int:
        """Processes for one JSONL file: >1 only for a large, local, uncompressed file on the
        vectorised path without near-duplicate detection (whose index is inherently sequential)."""
        if self.near is not None or storage.is_s3(path) or path.endswith(".gz"):
            return 1
        try:
            size = os.path.getsize(path)
        except OSError:
            return 1
        workers = self.cfg.validate_workers or min(usable_cpus(), DEFAULT_MAX_WORKERS)
        return max(1, min(workers, size // PARALLEL_MIN_BYTES))

    def _check_jsonl_parallel(self, file_index: int, path: str, fields: list[str], workers: int) -> bool:
        """One file in byte spans of whole lines, each checked in a worker process; the results are
        merged in file order, so the report is the one a single process would write."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        size = os.path.getsize(path)
        parts = max(workers, -(-size // PARALLEL_SPAN_BYTES))
        jobs = [
            (
                self.name,
                self.cfg,
                self.checks,
                self.special,
                self.prefilter.tokens,
                self.kind,
                path,
                fields,
                span,
            )
            for span in jsonl_spans(path, parts)
        ]
        base = 1  # the file's line number of the current span's first line
        merged = 0
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
        try:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
                for res in pool.map(_check_span, jobs):
                    self._merge_span(file_index, path, res, base)
                    base += res["line_count"]
                    merged += 1
        except BrokenProcessPool:
            if merged:
                raise
            # no worker started (e.g. a script without `if __name__ == "__main__":`, which spawned
            # processes re-import): one process does the work instead
            log.warning("validate_data: worker processes failed to start; checking %s in one process", path)
            return self._check_jsonl_file(file_index, path, fields)
        return False

    def _merge_span(self, file_index: int, path: str, res: dict[str, Any], base: int) -> None:
        """Fold one span's results into this dataset's, its lines shifted to start at `base`."""
        self.records += res["records"]
        self.bad += res["bad"]
        self.budget_bad += res["budget_bad"]
        for code, (severity, count, examples) in res["problems"].items():
            problem = self.problems.setdefault(code, _Problem(code, severity))
            problem.count += count
            for ex in examples[: max(0, self.cfg.max_examples - len(problem.examples))]:
                where = ex["location"]
                if isinstance(where, Location) and where.line is not None:
                    where = replace(where, line=where.line + base - 1)
                problem.examples.append({"location": str(where), "reason": ex["reason"]})
        self.lengths.frombytes(res["lengths"])
        lines = res["lines"] + (base - 1)
        self._duplicates(file_index, res["keys"], lines, lambda n: Location(path, line=n))

    def _fast_fields(self) -> list[str] | None:
        """The columns the vectorised path reads, or None when it does not apply."""
        if not self.fast or self.kind is None:
            return None
        if self.kind == "text":
            return [self.cfg.text_field]
        if self.kind == "prompt_completion":
            return [self.cfg.prompt_field, self.cfg.completion_field]
        return None  # chat records: the precise path

    def _check_rows(self, file_index: int, raws: Any) -> bool:
        """The precise path: row by row. True when the file broke off."""
        for raw in raws:
            if raw.code == "unreadable_file":  # not a record: the file broke off here
                self.add(raw.code, raw.reason or "", raw.loc)
                return True
            self._check_raw(raw, file_index)
        return False

    def _check_raw(self, raw: RawRecord, file_index: int) -> None:
        self.records += 1
        if self.kind is None:
            if raw.code:
                self.bad_record(raw.code, raw.reason or "", raw.loc)
            else:
                self.bad_record("unknown_kind", _unknown_kind_reason(raw.value or {}, self.cfg), raw.loc)
            return
        try:
            record = normalize(raw, self.kind, self.cfg)
        except RecordError as exc:
            self.bad_record(exc.code, exc.reason, exc.loc)
            return
        self._check_record(record, file_index)

    def _check_jsonl_file(
        self, file_index: int, path: str, fields: list[str], span: tuple[int, int] | None = None
    ) -> bool:
        for block in iter_jsonl_blocks(path, span=span):
            if isinstance(block, RawRecord):  # the file broke off
                self.add(block.code or "unreadable_file", block.reason or "", block.loc)
                return True
            bounds = line_bounds(block.data)
            self.lines_read = block.first_line - 1 + len(bounds) - 1
            for a, b, cols in parse_jsonl(block.data, fields):
                if cols is None:  # lines pyarrow did not take: json.loads, line by line
                    part = JsonlBlock(
                        path, block.first_line + a, block.data[bounds[a] : bounds[b]], block.first and a == 0
                    )
                    if self._check_rows(file_index, parse_jsonl_block(part)):
                        return True
                    continue
                self.records += b - a
                lines = np.arange(block.first_line + a, block.first_line + b, dtype=np.int64)
                self._check_columns(file_index, cols, lines, lambda n: Location(path, line=n))
        return False

    def _check_csv_file(self, file_index: int, path: str, fields: list[str]) -> bool:
        """The csv module parses (its exact semantics and line numbers); runs of good rows are
        checked column-wise."""
        import pyarrow as pa

        run: list[RawRecord] = []

        def flush() -> None:
            if run:
                self.records += len(run)
                cols = {f: pa.array([r.value[f] for r in run], pa.string()) for f in fields}  # type: ignore[index]
                lines = np.array([r.loc.line for r in run], dtype=np.int64)
                self._check_columns(file_index, cols, lines, lambda n: Location(path, line=n))
                run.clear()

        for raw in iter_raw_file(path):
            if raw.value is not None and all(isinstance(raw.value.get(f), str) for f in fields):
                run.append(raw)
                if len(run) >= CSV_RUN_ROWS:
                    flush()
                continue
            flush()
            if raw.code == "unreadable_file":
                self.add(raw.code, raw.reason or "", raw.loc)
                return True
            self._check_raw(raw, file_index)
        flush()
        return False

    def _check_arrow_file(self, file_index: int, path: str, fields: list[str]) -> bool:
        import pyarrow as pa

        for item in iter_arrow_batches(path):
            if isinstance(item, RawRecord):
                self.add(item.code or "unreadable_file", item.reason or "", item.loc)
                return True
            batch, rg = item.batch, item.row_group
            names = batch.schema.names
            cols = {f: batch.column(names.index(f)) for f in fields if f in names}
            if len(cols) == len(fields) and all(
                (pa.types.is_string(c.type) or pa.types.is_large_string(c.type)) and not c.null_count
                for c in cols.values()
            ):
                self.records += batch.num_rows
                rows = np.arange(item.first_row, item.first_row + batch.num_rows, dtype=np.int64)
                self._check_columns(
                    file_index, cols, rows, lambda n, rg=rg: Location(path, row_group=rg, row=n)
                )
                continue
            for i, value in enumerate(batch.to_pylist()):
                loc = Location(path, row_group=rg, row=item.first_row + i)
                self._check_raw(RawRecord(loc, value=value), file_index)
        return False

    def _check_columns(self, file_index: int, cols: dict[str, Any], positions: np.ndarray, loc: Any) -> None:
        """The vectorised path over rows whose `cols` (null-free strings) are already parsed:
        the same findings, reasons and order as `_check_raw` row by row."""
        import pyarrow as pa
        import pyarrow.compute as pc

        fields = list(cols)
        # empty or whitespace-only fields: the exact test on the rows that may be blank
        maybe = np.zeros(len(positions), dtype=bool)
        for col in cols.values():
            maybe |= maybe_blank(col)
        if maybe.any():
            bad = np.zeros(len(positions), dtype=bool)
            for i in np.flatnonzero(maybe).tolist():
                value = {f: cols[f][i].as_py() for f in fields}
                try:
                    normalize(RawRecord(loc(int(positions[i])), value=value), self.kind or "", self.cfg)
                except RecordError as exc:
                    self.bad_record(exc.code, exc.reason, exc.loc)
                    bad[i] = True
            if bad.any():
                keep = pa.array(~bad)
                cols = {f: c.filter(keep) for f, c in cols.items()}
                positions = positions[~bad]
        m = len(positions)
        if not m:
            return
        if self.kind == "text":
            plain = content = cols[fields[0]]
        else:
            prompt, completion = cols[fields[0]], cols[fields[1]]
            plain = pc.binary_join_element_wise(prompt, completion, "\n")
            content = pc.binary_join_element_wise(prompt, completion, "\x1f")
        lengths = utf8_lengths(plain)
        self.lengths.frombytes(lengths.tobytes())

        # exact duplicates, within the block and against everything before it
        keys = content_hashes(content)
        new = self._duplicates(file_index, keys, positions, loc)

        # content checks: the exact (Python) checks on the rows the prefilter cannot clear
        cand = self.prefilter.candidates(plain)
        if self.cfg.min_chars > 0:
            cand |= lengths < self.cfg.min_chars
        if self.cfg.max_chars is not None:
            cand |= lengths > self.cfg.max_chars
        rows = np.flatnonzero(cand)
        if len(rows):
            texts = plain.take(pa.array(rows)).to_pylist()
            for i, text in zip(rows.tolist(), texts, strict=True):
                self._content_checks(text, loc(int(positions[i])), None)
        if self.near is not None and new is not None:
            rows = np.flatnonzero(new)
            texts = plain.take(pa.array(rows)).to_pylist()
            for i, text in zip(rows.tolist(), texts, strict=True):
                where_ = str(loc(int(positions[i])))
                if (earlier_loc := self.near.check(text, where_)) is not None:
                    self.add("near_duplicate", f"nearly the same words as {earlier_loc}", where_)

    def _duplicates(
        self, file_index: int, keys: np.ndarray, positions: np.ndarray, loc: Any
    ) -> np.ndarray | None:
        """Report `duplicate` and `train_overlap` for records with content digests `keys` at
        `positions` (in file order) and index the new ones; returns the mask of first occurrences.
        A span worker only collects them (None)."""
        if self._deferred is not None:
            self._deferred[0].append(keys)
            self._deferred[1].append(np.asarray(positions, dtype=np.int64))
            return None
        m = len(keys)
        packed = (np.uint64(file_index) << np.uint64(_POSITION_BITS)) | positions.astype(np.uint64)
        _, first_idx, inverse = np.unique(keys, return_index=True, return_inverse=True)
        first_row = first_idx[inverse.reshape(-1)]
        found, earlier = self.index.lookup(keys)
        is_first = first_row == np.arange(m)
        new = ~found & is_first
        self.index.add_many(keys[new], packed[new])
        seen = np.where(found, earlier, packed[first_row])
        for i in np.flatnonzero(~new).tolist():
            self.add(
                "duplicate", f"same content as {_unpack(int(seen[i]), self.files)}", loc(int(positions[i]))
            )
        if self._other is not None:
            other_index, other_files, _ = self._other
            in_other, where = other_index.lookup(keys)
            for i in np.flatnonzero(in_other).tolist():
                self.add(
                    "train_overlap",
                    f"same content as train record {_unpack(int(where[i]), other_files)}",
                    loc(int(positions[i])),
                )
        return new

    def _check_record(self, record: Record, file_index: int) -> None:
        text = record.plain_text()
        self.lengths.append(len(text))
        key = _content_hash(record)
        position = record.loc.line if record.loc.line is not None else (record.loc.row or 0)
        if self._deferred is not None:  # a span worker: the parent judges duplicates
            self._duplicates(file_index, np.array([key], dtype=np.uint64), np.array([position]), None)
            self._content_checks(text, record.loc, record.messages if record.kind == "chat" else None)
            return
        first = self.index.get(key)
        if first is None:
            self.index.add(key, (file_index << _POSITION_BITS) | position)
        else:
            self.add("duplicate", f"same content as {_unpack(first, self.files)}", record.loc)
        if self._other is not None:
            other_index, other_files, _ = self._other
            where = other_index.get(key)
            if where is not None:
                self.add(
                    "train_overlap", f"same content as train record {_unpack(where, other_files)}", record.loc
                )
        self._content_checks(text, record.loc, record.messages if record.kind == "chat" else None)
        if self.near is not None and first is None:
            if (earlier := self.near.check(text, str(record.loc))) is not None:
                self.add("near_duplicate", f"nearly the same words as {earlier}", record.loc)

    def _content_checks(self, text: str, loc: Location, messages: list[dict[str, str]] | None) -> None:
        if match := _CONTROL.search(text):
            self.add("control_chars", f"U+{ord(match.group()):04X} at character {match.start()}", loc)
        if match := _MOJIBAKE.search(text):
            if match.group() == "\ufffd":
                reason = f"U+FFFD replacement character at character {match.start()} (bytes lost in an earlier decode)"
            else:
                reason = (
                    f"{match.group()!r} at character {match.start()} looks like UTF-8 read as Latin-1/cp1252"
                )
            self.add("mojibake", reason, loc)
        if len(text) < self.cfg.min_chars:
            self.add("too_short", f"{len(text):,} characters < data.min_chars {self.cfg.min_chars:,}", loc)
        if self.cfg.max_chars is not None and len(text) > self.cfg.max_chars:
            self.add("too_long", f"{len(text):,} characters > data.max_chars {self.cfg.max_chars:,}", loc)
        if match := self.special.search(text):
            self.add("special_token_text", f"{match.group()!r} at character {match.start()}", loc)
        for code, reason in find_sensitive(text):
            self.add(code, reason, loc)
        if messages is not None:
            for code, reason in chat_structure(messages):
                self.add(code, reason, loc)

    def result(self) -> dict[str, Any]:
        problems = sorted(
            self.problems.values(),
            key=lambda p: (p.code not in FATAL, p.severity != "error", -p.count, p.code),
        )
        rate = self.bad / self.records if self.records else 0.0
        budget_rate = self.budget_bad / self.records if self.records else 0.0
        fatal = any(p.code in FATAL for p in problems)
        listed = []
        exceeded_any = False
        for p in problems:
            policy = self.checks.get(p.code)
            action = "fail" if policy is None else policy.action
            limit = None if policy is None else policy.max_rate
            p_rate = p.count / self.records if self.records else 0.0
            # record errors without their own max_rate are held to max_error_rate as a sum (below)
            exceeded = p.code in FATAL or (action == "fail" and limit is not None and p_rate > limit)
            exceeded_any = exceeded_any or (exceeded and p.code not in FATAL)
            listed.append(
                {
                    "code": p.code,
                    "severity": p.severity,
                    "action": action,
                    "count": p.count,
                    "rate": p_rate,
                    "max_rate": self.cfg.max_error_rate if limit is None and action == "fail" else limit,
                    "exceeded": exceeded,
                    "examples": p.examples,
                }
            )
        over_budget = budget_rate > self.cfg.max_error_rate
        return {
            "uri": self.uri,
            "kind": self.kind,
            "files": len(self.files),
            "records": self.records,
            "bad_records": self.bad,
            "error_rate": rate,
            "max_error_rate": self.cfg.max_error_rate,
            "budget_bad_records": self.budget_bad,
            "over_budget": over_budget,
            "passed": not fatal and not over_budget and not exceeded_any,
            "problems": listed,
            "length_chars": _length_stats(self.lengths),
            "length_histogram": length_histogram(self.lengths),
        }


PARALLEL_MIN_BYTES = 64 << 20  # a JSONL file gets one more worker per this many bytes
PARALLEL_SPAN_BYTES = 256 << 20  # at most this much per span (spans are merged in order)
# Without data.validate_workers: at most this many (~250 MB each), so that a step without a CPU
# limit on a large node does not start one per core.
DEFAULT_MAX_WORKERS = 8


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a pod's limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _check_span(job: tuple[Any, ...]) -> dict[str, Any]:
    """Worker: check the lines of one byte span of a JSONL file (numbered from 1 at its start);
    duplicates are left to the parent, which sees the whole dataset."""
    name, cfg, checks, special, tokens, kind, path, fields, span = job
    if tokens is not None:
        _PATTERN_TOKENS[special.pattern] = tokens  # a fresh process: the prefilter needs the strings
    check = _DatasetCheck(name, path, cfg, checks, special, fast=True)
    check.kind, check.files = kind, [path]
    check._deferred = ([], [])
    check._check_jsonl_file(0, path, fields, span)
    keys, lines = check._deferred
    return {
        "records": check.records,
        "bad": check.bad,
        "budget_bad": check.budget_bad,
        "problems": {c: (p.severity, p.count, p.examples) for c, p in check.problems.items()},
        "lengths": check.lengths.tobytes(),
        "keys": np.concatenate(keys) if keys else np.empty(0, dtype=np.uint64),
        "lines": np.concatenate(lines) if lines else np.empty(0, dtype=np.int64),
        "line_count": check.lines_read,
    }


def _unknown_kind_reason(value: dict[str, Any], cfg: DataSection) -> str:
    return (
        f"fields {sorted(value)[:8]} name no record kind; expected {cfg.text_field!r}, "
        f"{cfg.prompt_field!r}+{cfg.completion_field!r} or {cfg.messages_field!r} (see data.*_field)"
    )


def _content_hash(record: Record) -> int:
    if record.kind == "text":
        content = record.text or ""
    elif record.kind == "prompt_completion":
        content = f"{record.prompt}\x1f{record.completion}"
    else:
        content = json.dumps(record.messages, ensure_ascii=False, sort_keys=True)
    return content_hash(content.encode("utf-8", "surrogatepass"))


def _unpack(packed: int, files: list[str]) -> str:
    path, position = files[packed >> _POSITION_BITS], packed & ((1 << _POSITION_BITS) - 1)
    by_row = path.endswith((".parquet", ".arrow"))
    return str(Location(path, row=position) if by_row else Location(path, line=position))


def length_histogram(lengths: array) -> list[dict[str, int]]:
    """Record counts by length in characters, in power-of-two bins: [{"lo", "hi", "count"}]."""
    if not len(lengths):
        return []
    values = np.asarray(lengths, dtype=np.int64)
    bits = np.searchsorted(
        np.left_shift(1, np.arange(63, dtype=np.int64)), values, side="right"
    )  # bit_length
    counts = np.bincount(bits)
    return [
        {"lo": 0 if b == 0 else 1 << (b - 1), "hi": (1 << b) - 1, "count": int(counts[b])}
        for b in range(int(bits.min()), int(bits.max()) + 1)
    ]


def _length_stats(lengths: array) -> dict[str, int] | None:
    if not lengths:
        return None
    ordered = np.sort(np.asarray(lengths, dtype=np.int64))
    return {
        "min": int(ordered[0]),
        "p50": int(percentile(ordered, 50)),  # type: ignore[arg-type]
        "p95": int(percentile(ordered, 95)),  # type: ignore[arg-type]
        "max": int(ordered[-1]),
    }


def percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending, non-empty list."""
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def _metrics(datasets: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Numbers only, flat: what the KFP Metrics artifact shows."""
    out: dict[str, float] = {}
    for name, d in datasets.items():
        out[f"{name}_records"] = d["records"]
        out[f"{name}_bad_records"] = d["bad_records"]
        out[f"{name}_error_rate"] = d["error_rate"]
    return out


# -- messages and reports ---------------------------------------------------------------------------


def _verdict(d: dict[str, Any]) -> str:
    fatal = [p["code"] for p in d["problems"] if p["code"] in FATAL]
    if fatal:
        return ", ".join(fatal)
    parts = []
    if d.get("over_budget", True):
        bad = d.get("budget_bad_records", d["bad_records"])
        rate = bad / d["records"] if d["records"] else 0.0
        parts.append(f"{bad} of {d['records']} records bad ({rate:.2%} > allowed {d['max_error_rate']:.2%})")
    for p in d["problems"]:
        if p.get("exceeded"):
            parts.append(
                f"{p['code']} in {p['count']} of {d['records']} records "
                f"({p['rate']:.2%} > allowed {p['max_rate']:.2%})"
            )
    return "; ".join(parts)


def failure_message(report: dict[str, Any], html_path: Path | str) -> str:
    """One summary line, then the top error locations as `location: code: reason`."""
    failed = {name: d for name, d in report["datasets"].items() if not d["passed"]}
    lines = ["validate_data failed: " + "; ".join(f"{name}: {_verdict(d)}" for name, d in failed.items())]
    shown = total = 0
    for d in failed.values():
        for problem in d["problems"]:
            if problem.get("action", "fail") != "fail":
                continue
            total += problem["count"]
            for ex in problem["examples"]:
                if shown < MESSAGE_LINES:
                    lines.append(f"  {ex['location']}: {problem['code']}: {ex['reason']}")
                    shown += 1
    if total > shown:
        lines.append(f"  ... {total - shown} more; see {html_path}")
    else:
        lines.append(f"  report: {html_path}")
    return "\n".join(lines)


def histogram_svg(bins: list[dict[str, int]], width: int = 480, height: int = 120) -> str:
    """Inline SVG bars, one per power-of-two length bin; each bar's title gives range and count."""
    esc = html.escape
    top = max(b["count"] for b in bins) or 1
    bar = width / len(bins)
    shapes = []
    for i, b in enumerate(bins):
        h = round((height - 20) * b["count"] / top, 1)
        x = round(i * bar, 1)
        shapes.append(
            f"<rect x='{x}' y='{height - 20 - h}' width='{max(1.0, round(bar - 2, 1))}' height='{h}' fill='#4a7bd0'>"
            f"<title>{b['lo']:,}–{b['hi']:,} chars: {b['count']:,} records</title></rect>"
        )
        if len(bins) <= 16 or i % 2 == 0:
            shapes.append(
                f"<text x='{x + bar / 2:.1f}' y='{height - 6}' font-size='9' text-anchor='middle'>{esc(_short(b['lo']))}</text>"
            )
    return (
        f"<svg class='histogram' role='img' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
        f"xmlns='http://www.w3.org/2000/svg'>{''.join(shapes)}</svg>"
    )


def _short(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("k", 1 << 10)):
        if n >= size:
            return f"{n // size}{unit}"
    return str(n)


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page: the summary table, then each dataset's problems with examples."""
    esc = html.escape
    datasets = report["datasets"]
    passed = report["passed"]
    total = sum(d["records"] for d in datasets.values())
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>validate_data</title><style>{CSS}</style>"
        "</head><body><h1>Data validation: "
        + ("<span class='ok'>passed</span>" if passed else "<span class='error'>failed</span>")
        + "</h1>"
    ]
    if passed and not any(d["problems"] for d in datasets.values()):
        parts.append(
            f"<p>All {total:,} records in {len(datasets)} dataset(s) parsed cleanly; no problems found.</p>"
        )
    rows = []
    for name, d in datasets.items():
        stats = d["length_chars"] or {}
        status = (
            "<span class='ok'>passed</span>"
            if d["passed"]
            else f"<span class='error'>{esc(_verdict(d))}</span>"
        )
        numbers = [
            d["files"],
            d["records"],
            d["bad_records"],
            *(stats.get(k) for k in ("min", "p50", "p95", "max")),
        ]
        rows.append(
            f"<tr><td>{esc(name)}</td><td><code>{esc(d['uri'])}</code></td><td>{esc(str(d['kind'] or '—'))}</td>"
            + "".join(f"<td class='n'>{'—' if n is None else f'{n:,}'}</td>" for n in numbers[:3])
            + f"<td class='n'>{d['error_rate']:.2%}</td>"
            + "".join(f"<td class='n'>{'—' if n is None else f'{n:,}'}</td>" for n in numbers[3:])
            + f"<td>{status}</td></tr>"
        )
    parts.append(
        "<table><tr><th>dataset</th><th>uri</th><th>kind</th><th>files</th><th>records</th><th>bad</th>"
        "<th>error rate</th><th>chars min</th><th>p50</th><th>p95</th><th>max</th><th>status</th></tr>"
        + "".join(rows)
        + "</table>"
        + f"<p>Allowed error rate: {report['max_error_rate']:.2%} of records per dataset.</p>"
    )
    for name, d in datasets.items():
        if d.get("length_histogram"):
            parts.append(
                f"<h2>{esc(name)}: record length (characters)</h2>{histogram_svg(d['length_histogram'])}"
            )
        if not d["problems"]:
            continue
        parts.append(
            f"<h2>{esc(name)}: problems</h2><table><tr><th>code</th><th>severity</th><th>action</th><th>count</th>"
            "<th>meaning</th><th>examples</th></tr>"
        )
        for p in d["problems"]:
            examples = "".join(
                f"<li><code>{esc(ex['location'])}</code>: {esc(ex['reason'])}</li>" for ex in p["examples"]
            )
            more = p["count"] - len(p["examples"])
            if more > 0:
                examples += f"<li>… and {more:,} more</li>"
            parts.append(
                f"<tr><td><code>{esc(p['code'])}</code></td><td class='{esc(p['severity'])}'>{esc(p['severity'])}</td>"
                f"<td>{esc(p.get('action', ''))}{' (exceeded)' if p.get('exceeded') else ''}</td>"
                f"<td class='n'>{p['count']:,}</td><td>{esc(CODES.get(p['code'], ('', ''))[1])}</td>"
                f"<td><ul>{examples}</ul></td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)
