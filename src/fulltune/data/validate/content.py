"""What validate_data looks for in a record's text, each check defined once for both paths.

A `TextCheck` pairs the exact test of one text (the regexes and the Luhn check whose findings the
report shows) with, where it has one, a vectorised prefilter over a whole string column: a mask
that keeps every row the exact test could report on, built from the byte scans of
`fastcheck.Utf8Column`. The precise path runs the exact tests on every record; the column-wise path
runs them on the rows some prefilter keeps. tests/test_bad_inputs.py holds both paths to the same
report, and tests/test_validate_checks.py each prefilter to its exact test.

Also here: masking (examples never show PII or secrets whole), the special-token strings, and the
structure of chat conversations (records, not texts: the precise path alone reads chat).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from fulltune.config import DataSection, RunConfig
from fulltune.data.fastcheck import Utf8Column

Finding = tuple[str, str]  # (code, reason)


@dataclass(frozen=True)
class TextCheck:
    """One content check of a record's plain text.

    find: the exact test; the findings it returns are what the report shows.
    rows: the vectorised prefilter; a superset of the rows `find` reports on. None: every row."""

    codes: tuple[str, ...]
    find: Callable[[str], list[Finding]]
    rows: Callable[[Utf8Column], np.ndarray] | None = None
    literals: tuple[bytes, ...] = ()  # byte strings the prefilter looks for (`literal_check`)


def literal_check(codes: tuple[str, ...], find: Callable[[str], list[Finding]], literals) -> TextCheck:
    """A check whose prefilter keeps the rows holding any of `literals` (UTF-8 byte strings)."""
    literals = tuple(literals)
    return TextCheck(codes, find, lambda col: col.literal_rows(literals), literals)


def text_checks(cfg: DataSection, special: tuple[str, ...]) -> tuple[TextCheck, ...]:
    """Every content check of a dataset: its length limits, the `special` token strings, and the
    fixed ones."""
    checks = [CONTROL_CHARS_CHECK, MOJIBAKE_CHECK]
    if cfg.min_chars > 0:
        checks.append(
            TextCheck(
                ("too_short",),
                partial(find_too_short, cfg.min_chars),
                lambda col: col.lengths < cfg.min_chars,
            )
        )
    if cfg.max_chars is not None:
        checks.append(
            TextCheck(
                ("too_long",),
                partial(find_too_long, cfg.max_chars),
                lambda col: col.lengths > cfg.max_chars,
            )
        )
    checks.append(special_token_check(special))
    checks += SENSITIVE_CHECKS
    return tuple(checks)


def find_all(checks: tuple[TextCheck, ...], text: str) -> list[Finding]:
    """The findings of every check on one text, in the checks' order."""
    return [finding for check in checks for finding in check.find(text)]


def candidate_rows(checks: tuple[TextCheck, ...], col: Utf8Column) -> np.ndarray:
    """Mask of the rows of `col` that some check's exact test must see."""
    mask = np.zeros(col.size, dtype=bool)
    col.find_bytes(literal[0] for check in checks for literal in check.literals)
    for check in checks:
        if check.rows is None:
            return np.ones(col.size, dtype=bool)
        mask |= check.rows(col)
    return mask


# -- characters ---------------------------------------------------------------------------------------

CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
MOJIBAKE = re.compile("\ufffd|Ã[\u00a0-\u00bf]|Â[\u00a0-\u00bf]|â€")


def find_control_chars(text: str) -> list[Finding]:
    if match := CONTROL_CHARS.search(text):
        return [("control_chars", f"U+{ord(match.group()):04X} at character {match.start()}")]
    return []


def control_char_rows(col: Utf8Column) -> np.ndarray:
    """C0 controls other than \\t \\n \\r, DEL, and C1 controls (C2 80..9F in UTF-8)."""
    low = np.flatnonzero(col.data < 0x20)
    v = col.data[low]
    high, b, after = col.high
    c1 = (b == 0x7F) | ((b == 0xC2) & (after >= 0x80) & (after <= 0x9F))
    return col.rows(np.concatenate((low[(v != 0x09) & (v != 0x0A) & (v != 0x0D)], high[c1])))


def find_mojibake(text: str) -> list[Finding]:
    match = MOJIBAKE.search(text)
    if match is None:
        return []
    if match.group() == "\ufffd":
        reason = (
            f"U+FFFD replacement character at character {match.start()} (bytes lost in an earlier decode)"
        )
    else:
        reason = f"{match.group()!r} at character {match.start()} looks like UTF-8 read as Latin-1/cp1252"
    return [("mojibake", reason)]


def mojibake_rows(col: Utf8Column) -> np.ndarray:
    """U+FFFD (EF BF BD in UTF-8) and the leads of the mojibake pairs: Â, Ã, â (C3 82, 83, A2)."""
    high, b, after = col.high
    hit = ((b == 0xEF) & (after == 0xBF)) | (
        (b == 0xC3) & ((after == 0x82) | (after == 0x83) | (after == 0xA2))
    )
    return col.rows(high[hit])


CONTROL_CHARS_CHECK = TextCheck(("control_chars",), find_control_chars, control_char_rows)
MOJIBAKE_CHECK = TextCheck(("mojibake",), find_mojibake, mojibake_rows)


# -- lengths ------------------------------------------------------------------------------------------


def find_too_short(min_chars: int, text: str) -> list[Finding]:
    if len(text) < min_chars:
        return [("too_short", f"{len(text):,} characters < data.min_chars {min_chars:,}")]
    return []


def find_too_long(max_chars: int, text: str) -> list[Finding]:
    if len(text) > max_chars:
        return [("too_long", f"{len(text):,} characters > data.max_chars {max_chars:,}")]
    return []


# -- special tokens -----------------------------------------------------------------------------------

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


def special_token_strings(extra: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """The fixed special-token strings plus `extra` (a tokenizer's own), without the ones too short
    to tell from ordinary text."""
    return tuple(
        sorted({t for t in (*SPECIAL_TOKEN_STRINGS, *extra) if isinstance(t, str) and len(t.strip()) >= 3})
    )


def special_token_pattern(extra: list[str] | tuple[str, ...] = ()) -> re.Pattern[str]:
    """One regex over the fixed special-token strings plus `extra` (a tokenizer's own)."""
    tokens = special_token_strings(extra)
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=lambda t: (-len(t), t))))


def special_token_check(tokens: tuple[str, ...]) -> TextCheck:
    """special_token_text for these strings (`special_token_strings`)."""
    pattern = special_token_pattern(tokens)
    literals = [t.encode("utf-8", "surrogatepass") for t in tokens]
    return literal_check(("special_token_text",), partial(_find_special_token, pattern), literals)


def _find_special_token(pattern: re.Pattern[str], text: str) -> list[Finding]:
    if match := pattern.search(text):
        return [("special_token_text", f"{match.group()!r} at character {match.start()}")]
    return []


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


# -- secrets and PII ----------------------------------------------------------------------------------
# Cheap substring tests first, and the character-class regexes only on small windows: a 50 MB
# record must not take minutes.

_EMAIL = re.compile(
    r"(?<![\w.%+-])([A-Za-z0-9._%+-]{1,64})@([A-Za-z0-9-]{1,63})((?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24})\b"
)
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_AWS_KEY = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_DIGIT_RUN = re.compile(r"\d[\d ().+-]{8,}")  # candidate card and phone numbers
_PRIVATE_KEY = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----")


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


def find_aws_key(text: str) -> list[Finding]:
    if ("AKIA" in text or "ASIA" in text) and (m := _AWS_KEY.search(text)):
        return [("secret_aws_key", f"{_mask(m.group(), 4, 4)} at character {m.start()}")]
    return []


def find_private_key(text: str) -> list[Finding]:
    if "PRIVATE KEY-----" in text and (m := _PRIVATE_KEY.search(text)):
        return [
            ("secret_private_key", f"-----BEGIN {m.group(1)}PRIVATE KEY----- block at character {m.start()}")
        ]
    return []


def find_email(text: str) -> list[Finding]:
    """The first e-mail address, looked for around each '@' (at most 1000 of them)."""
    at = text.find("@")
    for _ in range(1000):
        if at < 0:
            break
        lo = max(0, at - 65)
        if (m := _EMAIL.search(text[lo : at + 400])) and lo + m.start() <= at:
            return [("pii_email", f"{mask_email(*m.groups())} at character {lo + m.start()}")]
        at = text.find("@", at + 1)
    return []


def find_card_and_phone(text: str) -> list[Finding]:
    """The first payment card number (Luhn) and the first phone number, in runs of digits: one scan
    of the runs for both."""
    if not any(d in text for d in "0123456789"):
        return []
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
    return [f for f in (card, phone) if f]


def number_rows(col: Utf8Column) -> np.ndarray:
    """Rows with ASCII digits dense enough for a phone number (\\d{3}[ .-]\\d{4}: 7 digits within 8
    bytes) or a card number (13 digits within 25 bytes), and rows with an ASCII digit (which
    `find_card_and_phone` needs to look at all) and a non-ASCII one (which its \\d also matches)."""
    digits = col.ascii_digits
    dense = np.concatenate(
        (digits[:-6][digits[6:] - digits[:-6] <= 7], digits[:-12][digits[12:] - digits[:-12] <= 24])
    )
    rows = col.rows(dense)
    if len(digits) and len(col.other_digits):
        rows |= col.rows(digits) & col.rows(col.other_digits)
    return rows


SENSITIVE_CHECKS = (
    literal_check(("secret_aws_key",), find_aws_key, (b"AKIA", b"ASIA")),
    literal_check(("secret_private_key",), find_private_key, (b"PRIVATE KEY-----",)),
    literal_check(("pii_email",), find_email, (b"@",)),
    TextCheck(("pii_card", "pii_phone"), find_card_and_phone, number_rows),
)


def find_sensitive(text: str) -> list[Finding]:
    """(code, reason with the match masked) for the first PII/secret of each kind in `text`."""
    return find_all(SENSITIVE_CHECKS, text)


# -- chat structure -----------------------------------------------------------------------------------


def chat_structure(messages: list[dict[str, str]]) -> list[Finding]:
    """(code, reason) for conversations in an order chat templates do not expect."""
    found: list[Finding] = []
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
