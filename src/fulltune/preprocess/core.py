"""Sharded preprocessing: tokenize, pack, mask the loss, mix in replay data.

One call of `preprocess_shard(cfg, i)` produces shard i of N, independently of the
others (one pipeline task each):

- the input is split into N parts by file, Parquet row group or JSONL byte range, and shard i
  reads only its part (`inputs.py` says how; stable for the same inputs and N);
- the part is processed in *blocks* of about `block_records` records and at most
  `inputs.BLOCK_TEXT_CAP` of text (the shard's memory is bounded by it), keyed by their place in
  their file. Blocks, not shards, are the unit every later decision is made in, so the sequences
  produced do not depend on N (N=1 and N=4 give the same multiset);
- domain records go to `train`, or to `domain_eval` when the stable hash of their prompt
  (`split_key`) falls in the held-out fraction (only when no eval_uri is configured): records sharing
  a prompt share a split;
- general records go to `general_eval` (stable hash, `general_eval_fraction`) or to the replay
  pool, from which each block draws `replay_fraction` of its training tokens, counted after
  over-long examples are cut or dropped (replay is not counted in the split's example counts);
- `text` records are tokenized, EOS-terminated and packed into `max_seq_len` sequences (or one
  padded sequence per document with `packing: false`); prompt/completion and chat records are
  rendered (chat through the tokenizer's chat template), labelled only on the completion or
  assistant tokens (`loss_on: assistant`), and packed whole (best-fit decreasing); one longer
  than `max_seq_len` is truncated (keeping its answer: `fit_overlong`) or dropped (`overlong`), and
  counted either way. Text and prompt/completion documents start with the ids the tokenizer puts
  before a text of its own accord (`leading_ids`: Llama's BOS), without loss; chat templates
  render their own.

Text is tokenized through `tokenizer.memo` when the tokenizer allows it (byte-level BPE with a
known pre-tokenizer): each distinct space-delimited piece is encoded once per shard and its ids
reused, which gives exactly the tokenizer's ids several times faster on repetitive domain text.
Token work is done on flat numpy arrays (one per block, with document offsets), never token by
token in Python. Outputs go to <work_dir>/data/shards/: one Parquet file per split and the shard
manifest, written *last*. A shard whose manifest exists, whose files match their checksums and whose
recorded fingerprint (settings, tokenizer, input files: `content_fingerprint`) is the run's is
skipped, so a retried pipeline redoes only what is missing, and a changed setting redoes the shard.
`gather_shards` merges the shard manifests into the dataset manifest (`dataset.py` describes it).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from fulltune import hf, storage
from fulltune.config import DataSection, RunConfig
from fulltune.data.records import Record, resolve_kind
from fulltune.preprocess import inputs
from fulltune.preprocess.dataset import (
    DOMAIN_EVAL,
    GENERAL_EVAL,
    IGNORE_INDEX,
    MAX_REPLAY_REPEATS,
    MIN_GENERAL_EVAL_SEQUENCES,
    TRAIN,
    DatasetManifest,
    ReplaySummary,
    SplitSummary,
)
from fulltune.tokenizer import memo

log = logging.getLogger(__name__)

# v2: documents start with the tokenizer's BOS; v3: completions in context; v4: blocks end at
# `inputs.BLOCK_TEXT_CAP` of text as well as at block_records (blocks of long records moved)
SHARD_FORMAT = "fulltune.shard/v4"
COUNTS = ("examples", "sequences", "tokens", "loss_tokens", "truncated", "dropped")


class PreprocessError(ValueError):
    pass


def stable_fraction(text: str, salt: str) -> float:
    """A number in [0, 1) fixed by the text: the same record lands in the same split on every run."""
    digest = hashlib.blake2b(f"{salt}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# -- documents as flat arrays ----------------------------------------------------------------------


@dataclass
class Docs:
    """Tokenized documents, end to end: `ids` and `labels` (int32) and `offsets` (n + 1 boundaries)."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    @classmethod
    def empty(cls) -> Docs:
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64))

    @classmethod
    def from_lists(cls, ids: Sequence[list[int]], labels: Sequence[list[int]] | None = None) -> Docs:
        """From per-document lists; labels default to the ids (every token carries loss)."""
        lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        flat = np.fromiter(chain.from_iterable(ids), np.int32, count=total)
        lab = flat if labels is None else np.fromiter(chain.from_iterable(labels), np.int32, count=total)
        return cls(flat, lab, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def prefixed(self, lead: Sequence[int]) -> Docs:
        """Each document with `lead` (the tokenizer's BOS) before it, carrying no loss."""
        if not lead or not len(self):
            return self
        k = len(lead)
        offsets = self.offsets + k * np.arange(len(self) + 1, dtype=np.int64)
        at_lead = (offsets[:-1, None] + np.arange(k)).ravel()
        body = np.ones(int(offsets[-1]), bool)
        body[at_lead] = False
        ids = np.empty(len(body), np.int32)
        ids[body], ids[at_lead] = self.ids, np.tile(np.asarray(lead, np.int32), len(self))
        labels = np.empty_like(ids)
        labels[body], labels[at_lead] = self.labels, IGNORE_INDEX
        return Docs(ids, labels, offsets)

    def take(
        self, order: np.ndarray, lengths: np.ndarray | None = None, skip: np.ndarray | None = None
    ) -> Docs:
        """Documents `order` (repeats allowed), each starting `skip` tokens in and cut to `lengths`
        tokens when given."""
        order = np.asarray(order, np.int64)
        starts = self.offsets[:-1][order]
        full = self.lengths[order]
        if skip is not None:
            starts, full = starts + skip, full - skip
        lengths = full if lengths is None else np.minimum(full, lengths)
        index = _segments(starts, lengths)
        offsets = np.zeros(len(order) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = self.ids[index]
        labels = ids if self.labels is self.ids else self.labels[index]
        return Docs(ids, labels, offsets)

    @staticmethod
    def concat(parts: list[Docs]) -> Docs:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Docs.empty()
        if len(parts) == 1:
            return parts[0]
        starts = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, starts, strict=True)])
        ids = np.concatenate([p.ids for p in parts])
        # text's labels are its ids (one array): kept so, not copied
        same = all(p.labels is p.ids for p in parts)
        return Docs(ids, ids if same else np.concatenate([p.labels for p in parts]), offsets)


def _segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat indices of the segments [starts[i], starts[i] + lengths[i]), end to end."""
    total = int(lengths.sum())
    out_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts - out_starts, lengths) + np.arange(total, dtype=np.int64)


# -- tokenization -------------------------------------------------------------------------------


def load_tokenizer(cfg: RunConfig):
    tok = hf.load_tokenizer(cfg.tokenizer_uri, cfg.model.trust_remote_code)
    if tok.eos_token_id is None:
        raise PreprocessError(
            f"{cfg.tokenizer_uri}: tokenizer has no eos token; check_tokenizer should have refused it"
        )
    return tok


class Encoder:
    """Batch tokenization without special tokens, giving the ids `tok(texts,
    add_special_tokens=False)` gives: through `memo.MemoEncoder` when the tokenizer qualifies, else
    the fast tokenizer's Rust backend (`encode_batch_fast`: no offsets computed), else the
    tokenizer's own call."""

    def __init__(self, tok, memoize: bool = True):
        self.tok = tok
        self.eos = tok.eos_token_id
        self.lead = leading_ids(tok)
        backend = getattr(tok, "backend_tokenizer", None)
        self._encode = None
        self.memo: memo.MemoEncoder | None = None
        self.why_not: str | None = "not a fast tokenizer"
        if backend is not None:
            backend.no_truncation()  # as the tokenizer's own call does unless asked to truncate
            backend.no_padding()
            self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            self.why_not = "switched off"
            if memoize:
                try:
                    self.memo, self.why_not = memo.MemoEncoder(backend), None
                except memo.NotExact as exc:
                    self.why_not = exc.reason
            if self.why_not:
                log.info("tokenizing every text whole (memoised encoding: %s)", self.why_not)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, tokenized `memo.ENCODE_CHARS` characters at a time: a block's
        encodings at once took ~150 bytes per character of it."""
        return [ids for batch in memo.batches(texts) for ids in self._call(list(batch))]

    def _call(self, texts: list[str]) -> list[list[int]]:
        if self.memo is not None:
            flat, lengths = self.memo.encode(texts)
            bounds = np.cumsum(lengths).tolist()
            ids = flat.tolist()
            return [ids[a:b] for a, b in zip([0, *bounds[:-1]], bounds, strict=True)]
        if self._encode is None:
            return [list(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]
        return [e.ids for e in self._encode(texts, add_special_tokens=False)]

    def stats(self) -> dict[str, Any]:
        """How texts were tokenized, for the shard manifest: memoised or not (and why not), the
        pieces looked up and those the tokenizer encoded."""
        m = self.memo
        if m is None:
            return {"memoized": False, "reason": self.why_not}
        return {
            "memoized": not m.disabled,
            "reason": "the guard found a difference; see the log" if m.disabled else None,
            "pieces": m.pieces_seen,
            "pieces_encoded": m.pieces_encoded,
            "batches_whole": m.batches_whole,
        }

    def documents(self, texts: list[str]) -> Docs:
        """`texts` as EOS-terminated documents, every token carrying loss; tokenized
        `memo.ENCODE_CHARS` characters at a time, as `__call__` is."""
        return Docs.concat([self._documents(list(batch)) for batch in memo.batches(texts)])

    def _documents(self, texts: list[str]) -> Docs:
        if self.memo is None:
            ids = self(texts)
            for seq in ids:
                seq.append(self.eos)
            return Docs.from_lists(ids)
        flat, lengths = self.memo.encode(texts, end=(self.eos,))
        offsets = np.zeros(len(texts) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = flat.copy()  # writable, like every other Docs array
        return Docs(flat, flat, offsets)


def leading_ids(tok) -> list[int]:
    """The ids the tokenizer puts before any text of its own accord (Llama's, Mistral's and Gemma's
    BOS; none for GPT-2 or Qwen): what the model saw at the start of every document in pretraining
    and what `tok(text)` gives, so each text and prompt/completion document starts with them. A
    chat template renders its own."""
    plain = list(tok("a", add_special_tokens=False)["input_ids"])
    full = list(tok("a")["input_ids"])
    # where the text's own ids start: after the BOS, also when an EOS follows them (Llama 2's
    # add_eos_token), which the documents get from preprocessing anyway
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k]
    return []


def document_lead(kind: str, enc: Encoder) -> list[int]:
    """What starts each document of `kind`: the tokenizer's leading ids, except for chat."""
    return [] if kind == "chat" else enc.lead


def tokenize(records: list[Record], kind: str, enc: Encoder, loss_all: bool) -> Docs:
    """One block's records as EOS-terminated documents. Text: every token carries loss;
    prompt/completion and chat: only the completion / assistant turns unless `loss_all`."""
    if not records:
        return Docs.empty()
    if kind == "text":
        return enc.documents([r.text for r in records])
    if kind == "prompt_completion":
        p_ids, c_ids = prompt_completion_ids(records, enc)
        ids, labels = [], []
        for p, c in zip(p_ids, c_ids, strict=True):
            c.append(enc.eos)
            ids.append(p + c)
            labels.append((p if loss_all else [IGNORE_INDEX] * len(p)) + c)
        return Docs.from_lists(ids, labels)
    pairs = [located_chat_example(r, enc.tok, loss_all) for r in records]
    return Docs.from_lists([p[0] for p in pairs], [p[1] for p in pairs])


def prompt_completion_ids(records: list[Record], enc: Encoder) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) of each record, the completion's as they follow its prompt: the
    ids of prompt + completion after the prompt's own, where those begin them.

    Encoded alone, a completion gets what the tokenizer puts before every text it is given:
    SentencePiece's space marker (Metaspace, or a Prepend("▁") normalizer: Llama 2, Mistral), so
    "12 mg" after a prompt ending in a newline was learned as " 12 mg": the model was taught to
    answer with a space the data does not have. Where the joint ids do not begin with the prompt's
    (a merge across the boundary: "hel" + "lo"), the completion is encoded alone: the prompt's own ids
    are what the model is given at inference, and what it continues from."""
    prompts = enc([r.prompt for r in records])
    joint = enc([r.prompt + r.completion for r in records])
    completions = [j[len(p) :] for p, j in zip(prompts, joint, strict=True)]
    alone = [
        i for i, (p, j) in enumerate(zip(prompts, joint, strict=True)) if j[: len(p)] != p or len(j) == len(p)
    ]
    if alone:
        for i, ids in zip(alone, enc([records[i].completion for i in alone]), strict=True):
            completions[i] = ids
    return prompts, completions


def located_chat_example(record: Record, tok, loss_all: bool) -> tuple[list[int], list[int]]:
    """`chat_example`, a template's refusal of the conversation named with the record's place (a
    template may refuse conversations check_tokenizer's sample did not hold: roles out of order)."""
    try:
        return chat_example(record.messages, tok, loss_all)
    except PreprocessError as exc:
        raise PreprocessError(f"{record.loc}: {exc}") from exc
    except Exception as exc:  # jinja's TemplateError, or whatever the template raises
        raise PreprocessError(
            f"{record.loc}: the chat template refuses this conversation: {type(exc).__name__}: {exc}"
        ) from exc


def chat_example(messages: list[dict[str, str]], tok, loss_all: bool) -> tuple[list[int], list[int]]:
    """Render a conversation with the chat template; (ids, labels) with loss only on assistant turns.

    The span of each assistant turn in the rendered text is found by rendering prefixes of the
    conversation (`_assistant_span`); every token whose characters overlap a span carries loss (a
    byte-level token may start before the turn, as " G" after a generation prompt ending in a space).
    An assistant turn that opens the conversation (a canned greeting) answers nothing: it is context,
    without loss (and there is no empty conversation to render a generation prompt from).
    With `loss_all` every token carries loss: no turn is looked for, so a template whose prefixes
    do not render stably is fine (`loss_on: all` is the way out check_tokenizer names for one).
    """
    full = tok.apply_chat_template(messages, tokenize=False)
    if loss_all:
        ids = list(tok(full, add_special_tokens=False)["input_ids"])
        if needs_eos(full, ids, tok):
            ids.append(tok.eos_token_id)
        return ids, list(ids)
    why = no_token_offsets(tok)
    if why:
        raise PreprocessError(why)
    spans = [
        assistant_span(messages, i, full, tok)
        for i, m in enumerate(messages)
        if m["role"] == "assistant" and i > 0
    ]
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if needs_eos(full, ids, tok):
        ids.append(tok.eos_token_id)
        offsets = list(enc["offset_mapping"]) + [(len(full), len(full))]
    else:
        offsets = list(enc["offset_mapping"])
    labels = []
    # the EOS preprocessing appends ends the last turn: taught only where that turn is the assistant's
    # (after a user's turn it would teach the model to stop where it should answer)
    eos_loss = bool(spans) and messages[-1]["role"] == "assistant"
    for tid, (a, b) in zip(ids, offsets, strict=True):
        in_span = any(a < e and b > s for s, e in spans) or (a == len(full) and eos_loss)
        labels.append(tid if in_span else IGNORE_INDEX)
    return ids, labels


def no_token_offsets(tok) -> str | None:
    """Why `tok` cannot give the assistant turns' tokens, found by their character offsets in the
    rendered conversation; None when it can. transformers ignores return_offsets_mapping for a
    Python tokenizer (custom code such as tiktoken-based ones) and returns no offsets at all."""
    if getattr(tok, "is_fast", False):
        return None
    return (
        f"{type(tok).__name__} is a Python tokenizer, which gives no token offsets: preprocess.loss_on: "
        "assistant needs them to find the assistant turns' tokens. Set model.tokenizer_uri to the model's "
        "fast tokenizer (tokenizer.json), or preprocess.loss_on: all"
    )


def needs_eos(full: str, ids: list[int], tok) -> bool:
    """Whether the rendered conversation `full` (encoded: `ids`) gets an EOS appended: not when it
    ends with one. Qwen's template ends each turn with its EOS (<|im_end|>) and a newline: the
    conversation is over; another EOS after the newline would teach the model to say it twice."""
    ended = bool(tok.eos_token) and full.rstrip().endswith(tok.eos_token)
    return not ids or (ids[-1] != tok.eos_token_id and not ended)


def assistant_span(messages: list[dict[str, str]], i: int, full: str, tok) -> tuple[int, int]:
    """Where assistant turn i lies in `full`, the rendered conversation: from the end of the
    generation prompt after the turns before it to the end of the conversation rendered up to it.

    Some templates' generation prompt is longer than the header history renders (DeepSeek-R1
    distills and QwQ add "<think>\n", which history strips): the turn then starts where the generation
    prompt stops matching the conversation, so its loss starts with its first rendered character. A
    template whose generation prompt changes the turns before it (or whose prefixes render
    differently) leaves no place to start from: refused, rather than masked wrongly."""
    render = tok.apply_chat_template
    history = render(messages[:i], tokenize=False)
    prompted = render(messages[:i], tokenize=False, add_generation_prompt=True)
    upto = render(messages[: i + 1], tokenize=False)
    start = len(os.path.commonprefix([prompted, full]))
    if not (full.startswith(history) and full.startswith(upto) and len(history) <= start <= len(upto)):
        raise PreprocessError(
            f"the chat template of {tok.name_or_path} does not render conversation prefixes stably "
            f"(turn {i}: the conversation so far, with and without a generation prompt, is not a prefix "
            "of the whole), so the assistant turns cannot be found for the loss mask"
        )
    return start, len(upto)


# -- packing -----------------------------------------------------------------------------------


@dataclass
class PackStats:
    examples: int = 0  # documents in (before any was dropped)
    sequences: int = 0
    tokens: int = 0  # non-pad tokens
    loss_tokens: int = 0
    truncated: int = 0  # over-long examples cut to max_seq_len
    dropped: int = 0  # over-long examples left out (overlong: drop, or truncating left no loss token)

    def add(self, other: PackStats) -> None:
        for key in COUNTS:
            setattr(self, key, getattr(self, key) + getattr(other, key))


@dataclass
class Packed:
    """Fixed-length sequences, as [n, seq_len] arrays (several parts, concatenated on write)."""

    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    stats: PackStats = field(default_factory=PackStats)

    def add_rows(self, ids: np.ndarray, labels: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> None:
        """Whole rows: ids, labels, attention mask and position ids, each [n, seq_len]."""
        if not len(ids):
            return
        self.parts.append((ids, labels, mask, positions))
        self.stats.sequences += len(ids)
        self.stats.tokens += int(mask.sum(dtype=np.int64))
        self.stats.loss_tokens += int(np.count_nonzero((labels != IGNORE_INDEX) & (mask != 0)))

    def add(
        self, ids: list[int], labels: list[int], seq_len: int, pad_id: int, starts: list[bool] | None = None
    ) -> None:
        """One sequence, padded to seq_len. `starts` marks the first token of each document in it:
        position_ids restart there, so attention can be reset per document where the model supports it."""
        doc_starts = [0] if starts is None else [i for i, s in enumerate(starts) if s or i == 0]
        bins = [np.arange(len(doc_starts))]
        docs = Docs(
            np.asarray(ids, np.int32),
            np.asarray(labels, np.int32),
            np.asarray(doc_starts + [len(ids)], np.int64),
        )
        _fill(self, docs, bins, seq_len, pad_id)

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.concatenate([p[i] for p in self.parts]) for i in range(4))  # type: ignore[return-value]


def _fill(out: Packed, docs: Docs, bins: list[np.ndarray], seq_len: int, pad_id: int) -> None:
    """Rows of `out` from bins of documents (each bin's documents end to end, then padding)."""
    if not bins:
        return
    order = np.concatenate(bins)
    docs = docs.take(order)
    lengths = docs.lengths
    bin_sizes = np.array([len(b) for b in bins])
    bin_lengths = np.add.reduceat(lengths, np.cumsum(bin_sizes) - bin_sizes) if len(order) else bin_sizes * 0
    total = int(lengths.sum())
    rows = np.repeat(np.arange(len(bins)), bin_lengths)
    cols = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(bin_lengths) - bin_lengths, bin_lengths)
    pos = np.arange(total, dtype=np.int64) - np.repeat(docs.offsets[:-1], lengths)
    shape = (len(bins), seq_len)
    ids = np.full(shape, pad_id, np.int32)
    labels = np.full(shape, IGNORE_INDEX, np.int32)
    mask = np.zeros(shape, np.int8)
    positions = np.zeros(shape, np.int32)
    ids[rows, cols] = docs.ids
    labels[rows, cols] = docs.labels
    mask[rows, cols] = 1
    positions[rows, cols] = pos
    out.add_rows(ids, labels, mask, positions)


def pack_stream(docs: Docs, seq_len: int, pad_id: int) -> Packed:
    """Concatenate documents (each already EOS-terminated) and cut into seq_len pieces.

    A document that spills over into the next sequence continues there from position 0.
    """
    out = Packed()
    out.stats.examples = len(docs)
    total = len(docs.ids)
    if not total:
        return out
    n = -(-total // seq_len)
    size = n * seq_len
    ids = np.full(size, pad_id, np.int32)
    ids[:total] = docs.ids
    labels = np.full(size, IGNORE_INDEX, np.int32)
    labels[:total] = docs.labels
    mask = np.zeros(size, np.int8)
    mask[:total] = 1
    # position = distance from the latest document start or sequence start
    start = np.zeros(size, np.int64)
    doc_starts = docs.offsets[:-1]
    start[doc_starts] = doc_starts
    start[::seq_len] = np.arange(0, size, seq_len)
    np.maximum.accumulate(start, out=start)
    positions = (np.arange(size, dtype=np.int64) - start).astype(np.int32)
    positions[total:] = 0
    shape = (n, seq_len)
    out.add_rows(ids.reshape(shape), labels.reshape(shape), mask.reshape(shape), positions.reshape(shape))
    return out


def chunk_windows(docs: Docs, seq_len: int, stride: int, pad_id: int) -> Packed:
    """Each document on its own, long ones cut into seq_len windows that overlap by `stride` tokens.

    The overlap gives each window the preceding context; its tokens carry no loss in the later window,
    so every token is learned from exactly once.
    """
    if not 0 <= stride < seq_len:
        raise PreprocessError(f"chunk_stride {stride} must be at least 0 and below max_seq_len {seq_len}")
    step = seq_len - stride
    starts, lengths, overlap = [], [], []
    for a, b in zip(docs.offsets[:-1].tolist(), docs.offsets[1:].tolist(), strict=True):
        s = a
        while True:
            starts.append(s)
            lengths.append(min(seq_len, b - s))
            overlap.append(s > a)
            if s + seq_len >= b:
                break
            s += step
    index = _segments(np.asarray(starts, np.int64), np.asarray(lengths, np.int64))
    offsets = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    labels = docs.labels[index].copy()
    for w in np.flatnonzero(overlap):  # the overlapped context was learned in the previous window
        labels[offsets[w] : offsets[w] + stride] = IGNORE_INDEX
    windows = Docs(docs.ids[index], labels, offsets)
    out = Packed()
    out.stats.examples = len(docs)
    _fill(out, windows, [np.array([w]) for w in range(len(windows))], seq_len, pad_id)
    return out


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to at most `capacity`: longest item first, into the bin it
    fills most tightly (ties: the older bin). Deterministic; typically within a few percent of optimal."""
    rooms: list[tuple[int, int]] = []  # (room left, bin), sorted
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        at = bisect.bisect_left(rooms, (n, -1))
        if at < len(rooms):
            room, b = rooms.pop(at)
            bins[b].append(i)
            bisect.insort(rooms, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(rooms, (capacity - n, len(bins) - 1))
    return bins


def fit_overlong(docs: Docs, seq_len: int, overlong: str) -> tuple[Docs, PackStats]:
    """Prompt/completion and chat examples made to fit seq_len; the stats count the examples in and
    those truncated or dropped.

    `drop` leaves out every over-long example. `truncate` keeps an over-long example's answer: when
    everything from its first loss token on fits, the prompt is cut from the left (the context nearest
    the answer stays, as TRL and OpenRLHF truncate prompts); otherwise the first seq_len tokens stay,
    the prompt and the answer's start. An example that would keep no loss token (a prompt longer than
    seq_len before an answer that does not fit either) trains nothing: it is dropped, and counted so.
    """
    stats = PackStats(examples=len(docs))
    lengths = docs.lengths
    over = lengths > seq_len
    if not over.any():
        return docs, stats
    if overlong == "drop":
        stats.dropped = int(over.sum())
        return docs.take(np.flatnonzero(~over)), stats
    starts, ends = docs.offsets[:-1], docs.offsets[1:]
    loss_at = np.append(np.flatnonzero(docs.labels != IGNORE_INDEX), len(docs.ids))
    first = loss_at[np.searchsorted(loss_at, starts)] - starts  # first loss token, from the doc's start
    has_loss = first < ends - starts
    answer_fits = has_loss & (lengths - first <= seq_len)
    keep = ~over | answer_fits | (has_loss & (first < seq_len))
    skip = np.where(over & answer_fits, lengths - seq_len, 0)
    stats.truncated = int((over & keep).sum())
    stats.dropped = int((~keep).sum())
    order = np.flatnonzero(keep)
    return docs.take(order, np.full(len(order), seq_len), skip[order]), stats


def pack_whole(docs: Docs, seq_len: int, pad_id: int, *, packing: bool, overlong: str = "truncate") -> Packed:
    """Examples kept whole: best-fit decreasing into seq_len bins, or one per sequence.

    Over-long examples are truncated or dropped first (`fit_overlong`), and counted.
    """
    docs, stats = fit_overlong(docs, seq_len, overlong)
    out = Packed(stats=stats)
    if packing:
        bins = [np.asarray(b) for b in best_fit_decreasing(docs.lengths.tolist(), seq_len)]
    else:
        bins = [np.array([i]) for i in range(len(docs))]
    _fill(out, docs, bins, seq_len, pad_id)
    return out


def pack(docs: Docs, kind: str, cfg: RunConfig, pad_id: int) -> Packed:
    pp = cfg.preprocess
    if kind == "text" and pp.packing:
        return pack_stream(docs, pp.max_seq_len, pad_id)
    if kind == "text":
        return chunk_windows(docs, pp.max_seq_len, pp.chunk_stride, pad_id)
    return pack_whole(docs, pp.max_seq_len, pad_id, packing=pp.packing, overlong=pp.overlong)


# -- replay ------------------------------------------------------------------------------------------


def split_long(docs: Docs, seq_len: int) -> Docs:
    """Each document longer than seq_len as consecutive pieces of at most seq_len tokens."""
    lengths = docs.lengths
    pieces = np.maximum(-(-lengths // seq_len), 1)
    doc = np.repeat(np.arange(len(docs)), pieces)
    k = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    starts = docs.offsets[:-1][doc] + k * seq_len
    return Docs(docs.ids, docs.labels, np.append(starts, len(docs.ids)))


def replay_docs(pool: Docs, target_tokens: int, start: int = 0) -> Docs:
    """Documents from the replay pool from `start` on, cycling if needed, until target_tokens
    (the last one cut to fit)."""
    if not len(pool) or target_tokens <= 0:
        return Docs.empty()
    lengths = pool.lengths
    order, cut, got, i = [], [], 0, start
    while got < target_tokens:
        j = i % len(pool)
        n = min(int(lengths[j]), target_tokens - got)
        order.append(j)
        cut.append(n)
        got += n
        i += 1
    return pool.take(np.asarray(order), np.asarray(cut))


def interleave(a: Docs, b: Docs) -> Docs:
    """Spread b's documents evenly through a's (deterministic)."""
    if not len(b):
        return a
    na, nb = len(a), len(b)
    order = []
    step = (na + nb) / nb
    next_b = step / 2
    ia = ib = 0
    for pos in range(na + nb):
        if ib < nb and (pos >= next_b or ia >= na):
            order.append(na + ib)
            ib += 1
            next_b += step
        else:
            order.append(ia)
            ia += 1
    return Docs.concat([a, b]).take(np.asarray(order))


# -- the shard step ----------------------------------------------------------------------------------


def _arrow(values: np.ndarray, type_):
    """A flat Arrow array over the numpy buffer, no copy (and no pandas import, which
    `pa.array(ndarray)` costs the first time: a second per process)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values).reshape(-1)
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(values)])


def _table(packed: Packed):
    import pyarrow as pa

    ids, labels, mask, positions = packed.columns()
    n, seq_len = ids.shape
    offsets = _arrow(np.arange(0, (n + 1) * seq_len, seq_len, dtype=np.int32), pa.int32())
    columns = [
        pa.ListArray.from_arrays(offsets, _arrow(ids, pa.int32())),
        pa.ListArray.from_arrays(offsets, _arrow(labels, pa.int32())),
        pa.ListArray.from_arrays(offsets, _arrow(mask, pa.int8())),
        pa.ListArray.from_arrays(offsets, _arrow(positions, pa.int32())),
    ]
    return pa.Table.from_arrays(columns, names=["input_ids", "labels", "attention_mask", "position_ids"])


class ParquetSink:
    """Writes packed sequences block by block, so a shard never holds all its tokens in memory.

    Each `write` becomes row groups of a local Parquet file; `close` uploads it and returns its
    manifest entry (None when nothing was written). No statistics or timestamps go into the file:
    the same inputs give the same bytes.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.stats = PackStats()
        self._tmp = tempfile.TemporaryDirectory(prefix="fulltune-shard-")
        self._path = Path(self._tmp.name, "part.parquet")
        self._writer = None

    def write(self, packed: Packed) -> None:
        import pyarrow.parquet as pq

        self.stats.add(packed.stats)
        if not packed.stats.sequences:
            return
        table = _table(packed)
        if self._writer is None:
            # zstd level 1 without dictionary pages: half the CPU of the defaults (dictionary
            # encoding of token ids) for 3% larger files; token ids compress well either way.
            self._writer = pq.ParquetWriter(
                self._path,
                table.schema,
                compression="zstd",
                compression_level=1,
                use_dictionary=False,
                write_statistics=False,
                store_schema=False,
            )
        self._writer.write_table(table)

    def close(self) -> dict[str, Any] | None:
        try:
            if self._writer is None:
                return None
            self._writer.close()
            sha, size = storage.sha256_file(self._path), self._path.stat().st_size
            storage.upload_file(self._path, self.uri)
            return {"uri": self.uri, "sequences": self.stats.sequences, "sha256": sha, "size": size}
        finally:
            self._tmp.cleanup()


def shard_is_complete(manifest_uri: str) -> bool:
    """The shard manifest exists and every file it lists matches its checksum."""
    if not storage.exists(manifest_uri):
        return False
    try:
        manifest = storage.read_json(manifest_uri)
        return all(
            storage.exists(f["uri"]) and storage.sha256_uri(f["uri"]) == f["sha256"]
            for split in manifest["splits"].values()
            for f in split["files"]
        )
    except (OSError, ValueError, KeyError):
        return False


# -- what a shard was built from ----------------------------------------------------------------------

# Settings that change how fast a shard is made, or how training reads it, never its content.
_NOT_CONTENT = {"preprocess": {"memoize_tokens", "attend_across_documents"}, "data": {"validate_workers"}}


def content_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """What a shard's content depends on, bar the tokenizer's own definition (`tokenizer_digest`):
    the preprocess and data settings, the tokenizer named, and every input file with its size.
    Recorded in the shard manifest: a shard built under another is redone, and gather refuses it."""
    data = cfg.data
    roles = (("train", data.train_uri), ("eval", data.eval_uri), ("general", data.general_uri))
    return {
        "format": SHARD_FORMAT,
        "preprocess": cfg.preprocess.model_dump(mode="json", exclude=_NOT_CONTENT["preprocess"]),
        "data": data.model_dump(mode="json", exclude=_NOT_CONTENT["data"]),
        "tokenizer_uri": cfg.tokenizer_uri,
        "trust_remote_code": cfg.model.trust_remote_code,
        "input_files": {
            role: [[f, size] for f, size in inputs.data_file_sizes(uri)] for role, uri in roles if uri
        },
    }


def tokenizer_digest(tok) -> str:
    """The tokenizer's definition, chat template and special tokens, hashed: what decides the ids and
    labels, whatever URI it was read from. Taken before `Encoder` switches off truncation and padding."""
    backend = getattr(tok, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    parts = (definition, str(tok.chat_template), str(tok.eos_token_id), str(tok.pad_token_id))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def fingerprint_differences(built: Any, wanted: Any, where: str = "") -> list[str]:
    """'where: built (now wanted)' for every setting that differs; [] when none does."""
    if isinstance(built, dict) and isinstance(wanted, dict):
        return [
            d
            for key in sorted(set(built) | set(wanted))
            for d in fingerprint_differences(built.get(key), wanted.get(key), f"{where}.{key}".lstrip("."))
        ]
    return [] if built == wanted else [f"{where or 'fingerprint'}: {built!r} (now {wanted!r})"]


def _stale(built: dict[str, Any] | None, fingerprint: dict[str, Any]) -> list[str]:
    """How a shard built under `built` (its manifest's fingerprint) differs from `fingerprint`."""
    if built is None:
        return ["fingerprint: none recorded (built by an earlier fulltune)"]
    return fingerprint_differences(built, fingerprint)


class _Shard:
    """The state of one shard run: tokenizer, replay pool, one sink per split, what was read."""

    def __init__(self, cfg: RunConfig, index: int, tok):
        self.cfg, self.index = cfg, index
        self.n = cfg.preprocess.num_shards
        self.enc = Encoder(tok, memoize=cfg.preprocess.memoize_tokens)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.loss_all = cfg.preprocess.loss_on == "all"
        self.salt = str(cfg.preprocess.seed)
        self.layout = cfg.layout
        self.kinds: dict[str, str] = {}
        self.sinks: dict[str, ParquetSink] = {}
        self.read: dict[str, dict[str, Any]] = {}
        self.pool = Docs.empty()
        self.domain_tokens = self.replay_tokens = 0
        self.domain_loss_tokens = self.replay_loss_tokens = 0

    def sink(self, split: str, kind: str) -> ParquetSink:
        if split not in self.sinks:
            self.kinds[split] = kind
            self.sinks[split] = ParquetSink(self.layout.shard_file(split, self.index))
        return self.sinks[split]

    def blocks(self, role: str, uri: str, kind: str, data: DataSection):
        """This shard's blocks of `uri`, read as `data` says; what was read is recorded under `role`."""
        stats = inputs.ReadStats()
        size = self.cfg.preprocess.block_records
        units = inputs.plan_shard(uri, size, self.index, self.n, stats)
        yield from inputs.read_blocks(units, data, kind, size, stats)
        self.read[role] = {
            "uri": uri,
            "units": len(units),
            "blocks": stats.blocks,
            "bytes_read": stats.bytes_read,
        }

    def write(self, split: str, kind: str, records: list[Record], key: inputs.BlockKey | None = None) -> None:
        """One block of `split`; a training block (`key` given) gets its share of replay."""
        pp = self.cfg.preprocess
        docs = tokenize(records, kind, self.enc, self.loss_all)
        fitted = PackStats(examples=len(docs))
        lead = document_lead(kind, self.enc)
        if kind != "text":
            # Before replay is sized: replay is a share of what is trained, not of what is read.
            docs, fitted = fit_overlong(docs, pp.max_seq_len - len(lead), pp.overlong)
        docs = docs.prefixed(lead)  # after fitting: a prompt cut from the left keeps its BOS
        if key is not None:
            docs = self.with_replay(docs, key)
        packed = pack(docs, kind, self.cfg, self.pad_id)
        # The counts are of the split's own examples; the replay section counts the replayed tokens.
        packed.stats.examples, packed.stats.truncated, packed.stats.dropped = (
            fitted.examples,
            fitted.truncated,
            fitted.dropped,
        )
        self.sink(split, kind).write(packed)

    def with_replay(self, docs: Docs, key: inputs.BlockKey) -> Docs:
        """`docs` with replay documents spread through them, `replay_fraction` of the tokens. Every
        token of both is packed (documents fit max_seq_len by now, or are text, packed as a stream),
        so the counts kept here are of what reaches the Parquet."""
        r = self.cfg.preprocess.replay_fraction
        if not len(self.pool) or r <= 0:
            return docs
        tokens = len(docs.ids)
        start = int(
            stable_fraction(f"block {inputs.block_name(key)}", self.salt + "/replay") * len(self.pool)
        )
        replay = replay_docs(self.pool, int(round(tokens * r / (1.0 - r))), start)
        self.domain_tokens += tokens
        self.replay_tokens += len(replay.ids)
        self.domain_loss_tokens += int(np.count_nonzero(docs.labels != IGNORE_INDEX))
        self.replay_loss_tokens += int(np.count_nonzero(replay.labels != IGNORE_INDEX))
        # Interleaved, so replay is spread over the epoch rather than appended at the end.
        return interleave(docs, replay)


def split_key(rec: Record) -> str:
    """What a record's split is decided by: its prompt, so that records answering the same prompt
    (several completions of one prompt, one conversation with different last answers) are held out
    together, and eval never scores a prompt training saw. Text: the text; prompt/completion: the
    prompt; chat: the conversation before its last assistant turn (all of it when that is empty)."""
    if rec.kind == "text":
        return rec.text or ""
    if rec.kind == "prompt_completion":
        return rec.prompt or ""
    turns = rec.messages
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=len(turns))
    return json.dumps([[m["role"], m["content"]] for m in (turns[:last] or turns)], ensure_ascii=False)


def _hash_split(records: list[Record], fraction: float, salt: str) -> tuple[list[Record], list[Record]]:
    """(kept, held_out): a record is held out when the stable hash of its prompt (`split_key`) falls
    below `fraction`."""
    kept: list[Record] = []
    held: list[Record] = []
    for rec in records:
        (held if stable_fraction(split_key(rec), salt) < fraction else kept).append(rec)
    return kept, held


def _replay_pool(shard: _Shard, uri: str, kind: str, domain_kind: str) -> Docs:
    """The general set's records not held out for general_eval, tokenized (every shard reads it whole:
    the general set is small beside the domain data)."""
    from fulltune.data.records import iter_records

    pp = shard.cfg.preprocess
    salt = shard.salt + "/general"
    records = [
        r
        for r in iter_records(uri, shard.cfg.data.reading("general"), kind)
        if stable_fraction(split_key(r), salt) >= pp.general_eval_fraction
    ]
    pool = tokenize(records, kind, shard.enc, shard.loss_all).prefixed(document_lead(kind, shard.enc))
    if domain_kind == "text":
        return pool
    # Packed whole with the domain's examples, whose over-long handling must not cut them again:
    # a long general document replays as consecutive pieces that fit, as a text stream would.
    return split_long(pool, pp.max_seq_len)


def preprocess_shard(cfg: RunConfig, index: int) -> dict[str, Any]:
    """Produce shard `index`; returns its manifest. Skips work already complete."""
    pp, data = cfg.preprocess, cfg.data
    n = pp.num_shards
    if not 0 <= index < n:
        raise PreprocessError(f"shard index {index} out of range for num_shards={n}")
    manifest_uri = cfg.layout.shard_manifest(index)
    tok = load_tokenizer(cfg)
    fingerprint = {**content_fingerprint(cfg), "tokenizer": tokenizer_digest(tok)}
    if shard_is_complete(manifest_uri):
        built = storage.read_json(manifest_uri)
        stale = _stale(built.get("fingerprint"), fingerprint)
        if not stale:
            log.info("shard %d already complete at %s: skipped", index, manifest_uri)
            return {**built, "skipped": True}
        log.warning("shard %d at %s was built with other settings, redone: %s", index, manifest_uri, stale)

    shard = _Shard(cfg, index, tok)
    kind = resolve_kind(data.train_uri, data)
    eval_kind = resolve_kind(data.eval_uri, data) if data.eval_uri else kind
    general = data.reading("general")
    gkind = resolve_kind(data.general_uri, general) if data.general_uri else None
    if gkind is not None and pp.replay_fraction > 0:
        shard.pool = _replay_pool(shard, data.general_uri, gkind, kind)
    shard.sink(TRAIN, kind)
    shard.sink(DOMAIN_EVAL, eval_kind)
    for key, recs in shard.blocks(TRAIN, data.train_uri, kind, data):
        if data.eval_uri is None:
            recs, held = _hash_split(recs, pp.eval_fraction, shard.salt)
            if held:
                shard.write(DOMAIN_EVAL, kind, held)
        if recs:
            shard.write(TRAIN, kind, recs, key)
    if data.eval_uri:
        for _, recs in shard.blocks(DOMAIN_EVAL, data.eval_uri, eval_kind, data):
            shard.write(DOMAIN_EVAL, eval_kind, recs)
    if gkind is not None:
        shard.sink(GENERAL_EVAL, gkind)
        for _, recs in shard.blocks(GENERAL_EVAL, data.general_uri, gkind, general):
            _, held = _hash_split(recs, pp.general_eval_fraction, shard.salt + "/general")
            if held:
                shard.write(GENERAL_EVAL, gkind, held)

    out_splits: dict[str, Any] = {}
    for name, sink in shard.sinks.items():
        entry = sink.close()
        out_splits[name] = {"kind": shard.kinds[name], **vars(sink.stats), "files": [entry] if entry else []}
    r = pp.replay_fraction if len(shard.pool) else 0.0
    replay_info = {}
    if r > 0:
        d, g = shard.domain_tokens, shard.replay_tokens
        dl, gl = shard.domain_loss_tokens, shard.replay_loss_tokens
        replay_info = {
            "domain_tokens": d,
            "replay_tokens": g,
            "achieved_fraction": g / max(d + g, 1),
            "configured_fraction": r,
            "domain_loss_tokens": dl,
            "replay_loss_tokens": gl,
            "achieved_loss_fraction": gl / max(dl + gl, 1),
            "pool_tokens": len(shard.pool.ids),
        }
    manifest = {
        "format": SHARD_FORMAT,
        "shard": index,
        "num_shards": n,
        "max_seq_len": pp.max_seq_len,
        "pad_token_id": shard.pad_id,
        "splits": out_splits,
        "replay": replay_info,
        "inputs": shard.read,
        "tokenization": shard.enc.stats(),
        "fingerprint": fingerprint,
    }
    storage.write_json(manifest_uri, manifest)  # last: the shard is visible only now
    log.info("shard %d: %s", index, {k: v["sequences"] for k, v in out_splits.items()})
    return manifest


def gather_shards(cfg: RunConfig, shard_manifests: list[str] | None = None) -> DatasetManifest:
    """Merge the shard manifests into the dataset manifest (`cfg.layout.dataset_manifest`)."""
    n = cfg.preprocess.num_shards
    uris = shard_manifests or [cfg.layout.shard_manifest(i) for i in range(n)]
    fingerprint = content_fingerprint(cfg)  # lists every input file: once, not once per shard
    shards = [_checked_shard(uri, fingerprint) for uri in uris]
    tokenizers = {m["fingerprint"].get("tokenizer") for m in shards}
    if len(tokenizers) > 1:
        raise PreprocessError(
            f"the shards were tokenized by {len(tokenizers)} different tokenizers; preprocess again"
        )
    shards.sort(key=lambda m: m["shard"])
    if [m["shard"] for m in shards] != list(range(n)):
        raise PreprocessError(f"expected shards 0..{n - 1}, got {[m['shard'] for m in shards]}")
    manifest = DatasetManifest(
        max_seq_len=cfg.preprocess.max_seq_len,
        pad_token_id=shards[0]["pad_token_id"],
        num_shards=n,
        splits=_merged_splits(shards, cfg.preprocess.max_seq_len),
        replay=_replay_summary(shards, cfg.preprocess.replay_fraction),
    )
    if not manifest.sequences(TRAIN):
        raise PreprocessError(no_training_sequences(cfg, manifest))
    manifest.warnings = dataset_warnings(cfg, manifest)
    for warning in manifest.warnings:
        log.warning("%s", warning)
    storage.write_json(cfg.layout.dataset_manifest, manifest.to_json())
    return manifest


def dataset_warnings(cfg: RunConfig, manifest: DatasetManifest) -> list[str]:
    """What the eval sets cannot do for this dataset: judge the domain gain (and the champion
    comparison) on enough sequences, measure forgetting on enough, or replay without repeating the
    general set many times an epoch (plan warns of the general set's from its estimates)."""
    out = []
    domain = manifest.sequences(DOMAIN_EVAL)
    if 0 < domain < MIN_GENERAL_EVAL_SEQUENCES:
        out.append(
            f"domain_eval has {domain} sequences, fewer than {MIN_GENERAL_EVAL_SEQUENCES}: the domain gain, the "
            "champion comparison and their confidence intervals rest on a handful of sequences; set "
            "data.eval_uri or raise preprocess.eval_fraction"
        )
    if not cfg.data.general_uri:
        return [
            *out,
            "no general set (data.general_uri): forgetting will not be measured and nothing is replayed",
        ]
    held = manifest.sequences(GENERAL_EVAL)
    if held < MIN_GENERAL_EVAL_SEQUENCES:
        out.append(
            f"general_eval has {held} sequences, fewer than {MIN_GENERAL_EVAL_SEQUENCES}: the forgetting "
            "figures and their confidence interval are noise; add general data"
        )
    replay = manifest.replay
    if replay and replay.repeats > MAX_REPLAY_REPEATS:
        out.append(
            f"replay: the pool of {replay.pool_tokens:,} tokens is replayed ~{replay.repeats:,.0f} times an "
            f"epoch ({replay.replay_tokens:,} tokens): it teaches the pool rather than keeping general "
            "ability; add general data or lower preprocess.replay_fraction"
        )
    return out


def no_training_sequences(cfg: RunConfig, manifest: DatasetManifest) -> str:
    """Why the training split is empty, from the shards' counts of what they read and left out."""
    pp, data = cfg.preprocess, cfg.data
    split = manifest.splits.get(TRAIN)
    head = f"no training sequences were produced from data.train_uri {data.train_uri}: "
    if split and split.examples and split.dropped >= split.examples:
        longer = f"every one of its {split.examples:,} examples is longer than preprocess.max_seq_len {pp.max_seq_len}"
        if pp.overlong == "drop":
            why = "and preprocess.overlong is drop; raise max_seq_len or set overlong: truncate"
        else:  # truncate drops only an example whose prompt fills max_seq_len before a too long answer
            why = (
                "with a prompt that fills it before an answer too long to fit, so truncating leaves no "
                "answer token to learn from; raise max_seq_len or shorten the prompts"
            )
        return f"{head}{longer} {why}"
    if data.eval_uri is None:
        held = manifest.splits[DOMAIN_EVAL].examples if DOMAIN_EVAL in manifest.splits else 0
        return head + (
            f"all {held:,} of its examples were held out for evaluation (preprocess.eval_fraction "
            f"{pp.eval_fraction:g}); add data or set data.eval_uri"
            if held
            else "it holds no usable records"
        )
    return head + "it holds no usable records"


def empty_eval_splits(cfg: RunConfig, manifest: DatasetManifest) -> list[str]:
    """Why an eval split evaluate needs has no sequences: domain_eval always (the domain gain), and
    general_eval when a general set is configured (forgetting). The gather step refuses such a dataset,
    before training: evaluate would refuse it only after every GPU-hour of training was spent. (Not
    `gather_shards` itself: a dataset is still inspectable without them.)"""
    pp, data = cfg.preprocess, cfg.data
    out = []
    if not manifest.sequences(DOMAIN_EVAL):
        held = manifest.splits.get(DOMAIN_EVAL) or SplitSummary()
        if data.eval_uri:
            source = f"data.eval_uri {data.eval_uri} gave {held.examples:,} usable examples"
        else:
            total = held.examples + manifest.splits[TRAIN].examples
            source = (
                f"preprocess.eval_fraction {pp.eval_fraction:g} held out {held.examples:,} of the {total:,} "
                "examples of data.train_uri (each by the hash of its prompt)"
            )
        out.append(
            f"domain_eval has no sequences: {source}{_all_dropped(held)}; evaluate measures the domain gain "
            "on it: set data.eval_uri or raise preprocess.eval_fraction"
        )
    if data.general_uri and not manifest.sequences(GENERAL_EVAL):
        held = manifest.splits.get(GENERAL_EVAL) or SplitSummary()
        out.append(
            f"general_eval has no sequences: preprocess.general_eval_fraction {pp.general_eval_fraction:g} "
            f"held out {held.examples:,} records of data.general_uri {data.general_uri}{_all_dropped(held)}; "
            "evaluate measures forgetting on it: add general data or raise preprocess.general_eval_fraction"
        )
    return out


def _all_dropped(split: SplitSummary) -> str:
    """What emptied a split whose every example was too long to keep (`fit_overlong`)."""
    if split.examples and split.dropped >= split.examples:
        return ", all of them dropped as longer than preprocess.max_seq_len"
    return ""


def _checked_shard(uri: str, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The shard manifest at `uri`, refused when the shard is incomplete or was built from other
    settings or inputs than `fingerprint` (the run's; the tokenizer's digest is compared across shards)."""
    if not shard_is_complete(uri):
        raise PreprocessError(f"{uri}: shard missing or its files do not match their checksums")
    manifest = storage.read_json(uri)
    built = manifest.get("fingerprint")
    stale = _stale(built and {k: v for k, v in built.items() if k != "tokenizer"}, fingerprint)
    if stale:
        raise PreprocessError(
            f"{uri}: the shard was built from other settings or inputs than this run's: {'; '.join(stale)}; "
            "preprocess again (a shard whose settings differ is redone)"
        )
    return manifest


def _merged_splits(shards: list[dict[str, Any]], seq_len: int) -> dict[str, SplitSummary]:
    """Each split's counts summed and files listed over the shards, in shard order."""
    splits: dict[str, dict[str, Any]] = {}
    for m in shards:
        for name, s in m["splits"].items():
            agg = splits.setdefault(name, {"kind": s["kind"], **dict.fromkeys(COUNTS, 0), "files": []})
            for key in COUNTS:
                agg[key] += s.get(key, 0)
            agg["files"].extend(s["files"])
    for s in splits.values():
        s["padding_fraction"] = 1.0 - s["tokens"] / max(s["sequences"] * seq_len, 1)
    return {name: SplitSummary.model_validate(s) for name, s in splits.items()}


def _replay_summary(shards: list[dict[str, Any]], configured: float) -> ReplaySummary | None:
    replay = [m["replay"] for m in shards if m.get("replay")]
    if not replay:
        return None
    domain = sum(r["domain_tokens"] for r in replay)
    general = sum(r["replay_tokens"] for r in replay)
    domain_loss = sum(r.get("domain_loss_tokens", 0) for r in replay)
    general_loss = sum(r.get("replay_loss_tokens", 0) for r in replay)
    return ReplaySummary(
        domain_tokens=domain,
        replay_tokens=general,
        achieved_fraction=general / max(domain + general, 1),
        configured_fraction=configured,
        domain_loss_tokens=domain_loss,
        replay_loss_tokens=general_loss,
        achieved_loss_fraction=general_loss / max(domain_loss + general_loss, 1),
        pool_tokens=max(r.get("pool_tokens", 0) for r in replay),  # every shard holds the whole pool
    )
