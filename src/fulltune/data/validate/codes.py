"""The problem codes validate_data reports: what each means, its severity, and its policy."""

from __future__ import annotations

from fulltune.config import CheckPolicy, ConfigError, DataSection

# code -> (severity, what it means); "fatal" errors fail the dataset whatever the error budget.
CODES: dict[str, tuple[str, str]] = {
    "no_data": ("fatal", "nothing to read at the URI"),
    "unreadable_file": ("fatal", "a corrupt or truncated file: an unknown number of records is lost"),
    "wrong_encoding": (
        "fatal",
        "a text file in UTF-16 or UTF-32, gzip-compressed without a .gz name, or compressed otherwise "
        "(bzip2, xz, zstd, zip, 7z): read as UTF-8, none of it is usable",
    ),
    "unknown_kind": ("fatal", "the fields name no record kind (see data.text_field and friends)"),
    "no_records": ("fatal", "the data files hold no usable records"),
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
    "general_overlap": (
        "warning",
        "a general-set record also in train: forgetting would be measured on (and replay repeat) training data",
    ),
    "control_chars": ("warning", "control characters, usually extraction debris"),
    "mojibake": ("warning", "garbled characters from a wrong decode upstream"),
    "empty_file": ("warning", "a data file without records"),
    "skipped_file": (
        "warning",
        "a file in the data folder of no format fulltune reads, or below a name starting with '.' or '_': "
        "not read",
    ),
    "empty_location": (
        "warning",
        "one of the locations a URI names ({a,b}, a data window's days) holds no data files: a day "
        "missing upstream?",
    ),
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


def reported_severity(code: str) -> str:
    """The severity a problem shows in the report: fatal codes show as errors (they are told apart
    by failing the dataset whatever its policies)."""
    return "warning" if code in WARNINGS else "error"


# A dataset where more than half the records repeat an earlier one is an export or join gone wrong
# far more often than real data: each repeat is trained on again, so the model memorises them and
# the effective dataset is less than half its size. Templated data that really is this repetitive
# sets data.checks.duplicate (e.g. {action: warn}).
DUPLICATE_MAX_RATE = 0.5
# The gate's domain gain is the eval loss's fall: on eval records training saw, it measures
# memorisation, not learning. A few shared records (boilerplate, a FAQ in both exports) move it
# little; beyond a tenth of the eval set the figure the gate passes a model on is largely training
# data. A deliberate overlap sets data.checks.train_overlap (e.g. {action: warn}).
TRAIN_OVERLAP_MAX_RATE = 0.1
# Forgetting is the general set's loss rising: on records training saw (general_uri naming the
# domain data, or a copy of it) it falls instead, and the gate passes whatever was forgotten. The
# same tenth as for eval; a deliberate overlap sets data.checks.general_overlap.
GENERAL_OVERLAP_MAX_RATE = 0.1
# What a code failing by default would do to the run: said in the DataValidationError.
CONSEQUENCES = {
    "train_overlap": "the domain gain would be measured on training data",
    "general_overlap": "forgetting would be measured on training data",
}


def default_checks(max_error_rate: float) -> dict[str, CheckPolicy]:
    """The policy of every configurable code: record errors fail above data.max_error_rate (their
    sum is also held to it); secrets fail on any occurrence; exact duplicates fail above
    DUPLICATE_MAX_RATE, eval records also in train above TRAIN_OVERLAP_MAX_RATE, general records
    also in train above GENERAL_OVERLAP_MAX_RATE; everything else warns."""
    out: dict[str, CheckPolicy] = {}
    for code in CODES:
        if code in FATAL:
            continue
        if code.startswith("secret_"):
            out[code] = CheckPolicy(action="fail", max_rate=0.0)
        elif code == "duplicate":
            out[code] = CheckPolicy(action="fail", max_rate=DUPLICATE_MAX_RATE)
        elif code == "train_overlap":
            out[code] = CheckPolicy(action="fail", max_rate=TRAIN_OVERLAP_MAX_RATE)
        elif code == "general_overlap":
            out[code] = CheckPolicy(action="fail", max_rate=GENERAL_OVERLAP_MAX_RATE)
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
