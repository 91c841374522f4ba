r"""Exact, memoised encoding for byte-level BPE tokenizers (GPT-2, GPT-NeoX, Llama 3, Qwen 2, ...).

A fast tokenizer spends most of its time per *occurrence* of a word: it splits the text with its
pre-tokenizer regex, tracks alignments and runs BPE per piece (its own BPE cache only saves the
last step). Domain text repeats the same space-delimited words over and over, so encoding each
distinct piece once and reusing its ids is several times faster — and, for the tokenizers this
module accepts, gives exactly the ids the tokenizer gives for the whole text.

Why it is exact. The text is cut only before a space ``' '`` that is not inside a run of
whitespace: one with non-whitespace before it (``x|_``) or after it (``|_y``); the right part keeps
the space. For the pre-tokenizer patterns below (GPT-2's, cl100k/Llama 3's, Qwen 2's) a pre-token
always starts at such a space. Before it: no alternative puts a space after the first character
of a match except the whitespace ones, and a whitespace match cannot begin at the non-whitespace
character before the space. After a run of whitespace that ends in ``_y``: ``\s+(?!\S)`` stops one
short of the run's end, ``\s*[\r\n]+`` ends at a line break, so the last space is left to start the
next match. The patterns look back at nothing and look ahead only after whitespace, so each piece
splits on its own exactly as it does in context, and BPE never merges across pre-tokens.
(`tests/test_memo.py` checks every cut against the pre-tokenizers themselves.) Normalization must
be local to a piece as well: none, or NFC (a space is a starter that composes with nothing). Added
tokens (specials such as ``<|endoftext|>``) are matched on the whole text, with options that can
swallow neighbouring spaces, so a document that contains any added token's content is encoded
whole by the tokenizer instead.

`unsupported(backend)` says why a tokenizer is outside these rules (then use the tokenizer itself).
As a guard, `MemoEncoder` compares itself with the tokenizer on the first documents it encodes; on
a difference it logs a warning and hands every text to the tokenizer from then on.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from array import array
from collections.abc import Iterator, Sequence
from itertools import chain, islice
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Pre-tokenizer patterns for which the cut rule above holds (as tokenizer.json spells them).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PATTERNS = frozenset({GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN})
NORMALIZERS = {None: None, "NFC": "NFC"}

# A space with non-whitespace before or after it. Python's \s is str.isspace(), a superset of the
# Unicode White_Space set the tokenizer's regex engine uses, so this never cuts where the
# tokenizer would not.
_CUT = re.compile(r"(?<=\S) | (?=\S)")

DEFAULT_CAPACITY = 1 << 18  # distinct pieces kept (~40 MB); the memo starts over when it is full
MAX_PIECE = 64  # longer pieces (a paragraph without spaces, CJK text) are encoded but not kept
MAX_NEW_SHARE = 0.5  # a batch whose distinct new pieces hold more of its text goes to the tokenizer
MAX_BACKOFF = 16  # batches
BACKOFF_CHARS = 1 << 16  # smaller batches (a few held-out records) do not start a backoff
JOIN_CHARS = 1 << 16  # new pieces are encoded together in texts of about this many characters
VERIFY_DOCS = 64
# A tokenizer's encodings take ~150 bytes per character (ids, offsets, token strings): a call is
# handed at most ENCODE_CHARS characters (`batches`; a longer text in parts cut where the memo cuts,
# `spans`), so tokenizing takes ~150 MB whatever the length of the texts.
ENCODE_CHARS = 1 << 20


class NotExact(ValueError):
    """Memoised encoding would not give this tokenizer's ids exactly; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(f"memoised encoding is not exact for this tokenizer: {reason}")
        self.reason = reason


def unsupported(backend: Any) -> str | None:
    """Why memoised encoding would not give this tokenizer's ids exactly; None when it would."""
    try:
        spec = json.loads(backend.to_str())
    except (AttributeError, ValueError) as exc:
        return f"tokenizer cannot be serialised ({exc})"
    return _unsupported(spec)


def _unsupported(spec: dict) -> str | None:
    normalizer = spec.get("normalizer")
    ntype = None if normalizer is None else normalizer.get("type")
    if ntype not in NORMALIZERS:
        return f"normalizer {ntype} is not known to be local to a space-delimited piece"
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout"):
        return f"model {model.get('type')} (dropout {model.get('dropout')}) is not deterministic BPE"
    if not _pre_tokenizer_ok(spec.get("pre_tokenizer")):
        return "pre-tokenizer is not byte-level with a known split pattern"
    if ntype is not None and not all(t["content"].isascii() for t in spec.get("added_tokens", [])):
        return "added tokens with non-ASCII content under a normalizer"
    return None


def _pre_tokenizer_ok(pre: dict | None) -> bool:
    def byte_level(p: dict, use_regex: bool) -> bool:
        return (
            p.get("type") == "ByteLevel"
            and not p.get("add_prefix_space", True)
            and bool(p.get("use_regex", True)) == use_regex
        )

    if pre is None:
        return False
    if byte_level(pre, use_regex=True):
        return True
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not parts or len(parts) != 2:
        return False
    split, level = parts
    return (
        split.get("type") == "Split"
        and (split.get("pattern") or {}).get("Regex") in SPLIT_PATTERNS
        and split.get("behavior") == "Isolated"
        and not split.get("invert", False)
        and byte_level(level, use_regex=False)
    )


def _sentinel(spec: dict) -> tuple[str, int] | None:
    """An added token that is always split out as itself: special, and neither stripping the
    whitespace beside it nor requiring word boundaries. (content, id), or None."""
    for t in spec.get("added_tokens", []):
        if (
            t.get("special")
            and t["content"]
            and not (t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
        ):
            return t["content"], int(t["id"])
    return None


def pieces(text: str) -> list[str]:
    """`text` cut before every space not inside a run of whitespace; every piece after the first
    lost that space (the encoder puts it back)."""
    if text.isprintable():  # the only whitespace is ' ' (every other kind is unprintable)
        parts = text.split(" ")
        if "" not in parts:  # no leading, trailing or repeated spaces: every space is a cut
            return parts
    return _CUT.split(text)


def batches(texts: Sequence[str], max_texts: int | None = None) -> Iterator[Sequence[str]]:
    """`texts` in consecutive runs of at most ENCODE_CHARS characters (a longer text alone), and of
    at most `max_texts` texts when given."""
    start = 0
    while start < len(texts):
        stop = len(texts) if max_texts is None else min(len(texts), start + max_texts)
        end, chars = start + 1, len(texts[start])
        while end < stop and chars + len(texts[end]) <= ENCODE_CHARS:
            chars += len(texts[end])
            end += 1
        yield texts[start:end]
        start = end


def spans(text: str) -> list[str]:
    """`text` in consecutive parts of about ENCODE_CHARS characters, each cut where `pieces` cuts (a
    part after the first starts with the space): encoded apart, for a tokenizer `unsupported` accepts
    and a text without added tokens, they give the text's ids, as the memo's pieces do."""
    out: list[str] = []
    run: list[str] = []
    size = 0
    for i, piece in enumerate(pieces(text)):
        if i:
            piece = " " + piece
        if run and size + len(piece) > ENCODE_CHARS:
            out.append("".join(run))
            run, size = [], 0
        run.append(piece)
        size += len(piece)
    out.append("".join(run))
    return out


class MemoEncoder:
    """Token ids of many texts, each distinct piece encoded once by `backend` (a `tokenizers`
    Tokenizer that `unsupported` accepts, truncation and padding off); no special tokens added.

    `encode(texts, end)` returns the ids of every text followed by `end`, end to end (int32), and
    the length of each. `pieces_seen` / `pieces_encoded` count the pieces looked up and those the
    tokenizer had to encode (distinct per batch)."""

    def __init__(
        self,
        backend: Any,
        capacity: int = DEFAULT_CAPACITY,
        verify_docs: int = VERIFY_DOCS,
        join_chars: int = JOIN_CHARS,
    ):
        try:
            spec = json.loads(backend.to_str())  # once: it is the whole vocabulary
        except (AttributeError, ValueError) as exc:
            raise NotExact(f"tokenizer cannot be serialised ({exc})") from exc
        reason = _unsupported(spec)
        if reason:
            raise NotExact(reason)
        self._batch = backend.encode_batch_fast
        self._normal = NORMALIZERS[(spec.get("normalizer") or {}).get("type")]
        contents = sorted({t["content"] for t in spec.get("added_tokens", []) if t["content"]}, key=len)
        self._added = re.compile("|".join(map(re.escape, reversed(contents)))) if contents else None
        self._sentinel = _sentinel(spec)
        self.capacity = capacity
        self.join_chars = join_chars
        self._first: dict[str, bytes] = {}  # a text's first piece (no space before it)
        self._rest: dict[str, bytes] = {}  # later pieces, stored without their leading space
        self._verify = verify_docs
        self.pieces_seen = 0
        self.pieces_encoded = 0
        self.verified = verify_docs <= 0
        self.disabled = False  # set when the guard found a difference
        self.batches_whole = 0  # batches left to the tokenizer for want of repeats
        self._backoff = self._skip = 0

    def _has_added(self, text: str) -> bool:
        if self._added is None:
            return False
        if self._normal is not None:
            text = unicodedata.normalize(self._normal, text)
        return self._added.search(text) is not None

    def _ids(self, texts: list[str]) -> list[bytes]:
        """The tokenizer's ids of each text, in calls of at most ENCODE_CHARS characters."""
        out: list[bytes] = []
        for batch in batches(texts):
            if len(batch) == 1 and len(batch[0]) > ENCODE_CHARS and not self._has_added(batch[0]):
                parts = batches(spans(batch[0]))
                encoded = (e for part in parts for e in self._batch(list(part), add_special_tokens=False))
                out.append(b"".join(array("i", e.ids).tobytes() for e in encoded))
                continue
            out.extend(
                array("i", e.ids).tobytes() for e in self._batch(list(batch), add_special_tokens=False)
            )
        return out

    def _many(self, texts: list[str], prefix: str) -> list[bytes]:
        """The ids of `prefix + t` for every t. With a sentinel, many texts go into one tokenizer
        call, each followed by the sentinel (an added token, split out before anything else, so the
        text between two is encoded exactly as on its own) and cut again at the sentinel's id —
        one call and one Encoding per ~JOIN_CHARS characters instead of one per piece."""
        if self._sentinel is None:
            return self._ids([prefix + t for t in texts])
        mark, mark_id = self._sentinel
        groups: list[list[str]] = []
        group: list[str] = []
        size = 0
        for t in texts:
            group.append(t)
            size += len(t)
            if size >= self.join_chars:
                groups.append(group)
                group, size = [], 0
        if group:
            groups.append(group)
        joined = [mark.join(prefix + t for t in g) + mark for g in groups]
        out: list[bytes] = []
        for g, enc in zip(groups, self._batch(joined, add_special_tokens=False), strict=True):
            ids = np.array(enc.ids, np.int32)
            ends = np.flatnonzero(ids == mark_id)
            if len(ends) != len(g):  # the sentinel was not split out as expected: one at a time
                out.extend(self._ids([prefix + t for t in g]))
                continue
            buf = ids.tobytes()
            out.extend(buf[4 * a : 4 * b] for a, b in zip(np.r_[0, ends[:-1] + 1], ends, strict=True))
        return out

    def encode(self, texts: Sequence[str], end: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        texts = list(texts)
        tail = array("i", end).tobytes()
        docs = self._plain(texts, tail) if self.disabled else self._memoised(texts, tail)
        flat = np.frombuffer(b"".join(docs), np.int32)
        lengths = np.fromiter(map(len, docs), np.int64, count=len(docs)) // 4
        return flat, lengths

    def _plain(self, texts: list[str], tail: bytes) -> list[bytes]:
        return [ids + tail for ids in self._ids(texts)]

    def _memoised(self, texts: list[str], tail: bytes) -> list[bytes]:
        if self._skip:
            self._skip -= 1
            return self._plain(texts, tail)
        cut = [None if self._has_added(t) else pieces(t) for t in texts]
        kept = [c for c in cut if c is not None]
        first, rest = self._first, self._rest
        new_first = list({c[0] for c in kept}.difference(first))
        new_rest = list(set(chain.from_iterable(islice(c, 1, None) for c in kept)).difference(rest))
        new_chars = sum(map(len, new_first)) + sum(map(len, new_rest))
        chars = sum(map(len, texts))
        if new_chars > MAX_NEW_SHARE * chars:
            # Few repeats (random strings, a new domain): the tokenizer alone is cheaper. After a
            # batch of some size, try the memo again only after 1, 2, 4 ... MAX_BACKOFF batches.
            if chars >= BACKOFF_CHARS:
                self._backoff = min(2 * self._backoff or 1, MAX_BACKOFF)
                self._skip = self._backoff
            self.batches_whole += 1
            return self._plain(texts, tail)
        self._backoff = 0
        first.update(zip(new_first, self._many(new_first, ""), strict=True))
        rest.update(zip(new_rest, self._many(new_rest, " "), strict=True))
        self.pieces_encoded += len(new_first) + len(new_rest)
        self.pieces_seen += sum(map(len, kept))
        whole = [i for i, c in enumerate(cut) if c is None]
        direct = dict(zip(whole, self._ids([texts[i] for i in whole]), strict=True))
        get = rest.__getitem__
        docs = [
            direct[i] + tail if c is None else b"".join([first[c[0]], *map(get, islice(c, 1, None)), tail])
            for i, c in enumerate(cut)
        ]
        for memo, new in ((first, new_first), (rest, new_rest)):
            for p in new:
                if len(p) > MAX_PIECE:
                    del memo[p]
        if len(rest) + len(first) > self.capacity:
            rest.clear()
            first.clear()
        if not self.verified and not self._check(texts, docs, tail):
            self.disabled = True
            return self._plain(texts, tail)
        return docs

    def _check(self, texts: list[str], docs: list[bytes], tail: bytes) -> bool:
        """The first documents against the tokenizer's own encoding (a difference is a bug here)."""
        n = min(len(texts), self._verify)
        for i, want in enumerate(self._ids(texts[:n])):
            if docs[i] != want + tail:
                log.warning(
                    "memoised encoding differs from the tokenizer's on text %r; encoding every text "
                    "with the tokenizer from now on (slower, exact) — please report it with the tokenizer",
                    texts[i][:80],
                )
                return False
        self._verify -= n
        self.verified = self._verify <= 0
        return True
