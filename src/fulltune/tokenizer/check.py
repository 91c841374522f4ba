"""check_tokenizer: do the base model's files, its tokenizer and the domain data fit, before any GPU
is spent?

Checks, each with a status (ok, info, warning, error):

- model files: the base model loads as it is (`fulltune.model_check`, headers only: config and
  architecture, safetensors only, every shard complete, every tensor the config implies with its
  shape); each problem is in the report's `model_files` with its code and file;
- special tokens: eos must exist (error); bos and pad are reported (no pad, or pad == eos, is
  fine: padding is masked through the labels, never by token id, so EOS keeps its loss);
- embedding: every id of the tokenizer's vocabulary (not only `len(tokenizer)`: a vocabulary may
  have holes) must be below the model's embedding rows (`vocab_size` in the model's config.json,
  read without loading weights); the model's eos ids should include the
  tokenizer's eos, or the tuned model learns to end documents with a token generation ignores;
- context length: `preprocess.max_seq_len` must not exceed the model's context
  (`max_position_embeddings` or its family's name for it in config.json);
- chat template (chat data only): it exists, renders the sampled conversations with all their
  content, and (for `preprocess.loss_on: assistant`) renders prefixes stably, which is how
  preprocessing finds the assistant turns, whose tokens it finds by their offsets: a Python
  tokenizer, which gives none, is refused then;
- lengths: p50/p95/max tokens per training record and the share longer than
  `preprocess.max_seq_len` (prompt/completion and chat records would be truncated, or dropped with
  `preprocess.overlong: drop`: an error above `tokenizer.max_truncation_rate`, and with drop
  whenever fewer than DROP_MIN_KEPT of them fit; text is split across sequences, never truncated);
- fertility: tokens per whitespace word on the domain data, and on the general set when set;
- split terms: the `tokenizer.top_k_split_terms` domain words split into the most pieces, with
  the pieces, plus every word of `tokenizer.domain_terms`;
- unk rate (when the tokenizer has an unk token) and decode(encode(x)) fidelity.

Statistics come from a deterministic sample of at most `SAMPLE_RECORDS` records (reservoir
sampling seeded with `preprocess.seed`); a sampled text is encoded on its first `stat_chars`
characters (at least STAT_MIN_CHARS, and 16 per token of max_seq_len), a longer one's tokens
extrapolated from them, so that records of megabytes take megabytes, not gigabytes. `report.json`
and `report.html` are written to `out_dir` in every case — also when failing, before
TokenizerCheckError is raised.
"""

from __future__ import annotations

import html
import random
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from fulltune import report_kit as kit
from fulltune import storage
from fulltune.config import RunConfig
from fulltune.data.records import DataError, Record, RecordError, iter_records, resolve_kind
from fulltune.data.validate.stats import percentile
from fulltune.hf import TokenizerFilesError, load_tokenizer, metadata_dir
from fulltune.report_kit import Html, write_reports
from fulltune.tokenizer.memo import batches

REPORT_FORMAT = "fulltune.check_tokenizer/v1"
SAMPLE_RECORDS = 2000  # records sampled per dataset for the statistics
# With preprocess.overlong: drop, the share of sampled examples that must fit max_seq_len whatever
# tokenizer.max_truncation_rate allows: below it preprocessing leaves (almost) nothing to train on,
# which gather_shards or train would find only after the whole dataset is tokenized.
DROP_MIN_KEPT = 0.01
ROUNDTRIP_SAMPLE = 200  # of those, decoded again for the fidelity check
PREFIX_CHECK_SAMPLE = 50  # conversations whose prefixes are rendered for the assistant-span check
MAX_DISTINCT_WORDS = 50_000  # most frequent domain words whose pieces are counted
MAX_WORD_CHARS = 40  # longer "words" are URLs, hashes, base64: not vocabulary
FERTILITY_WARN_RATIO = 1.5  # domain tokens/word over general tokens/word worth a warning
ENCODE_BATCH = 256
# The tokenizer's encodings take ~150 bytes per character: one call is handed at most ENCODE_CHARS
# characters (memo.ENCODE_CHARS), and a sampled text longer than `stat_chars` is measured on its
# first `stat_chars` characters, its length extrapolated. Without these, a sample holding a few
# records of megabytes took gigabytes: more than the step's pod has.
STAT_MIN_CHARS = 100_000  # characters of each text measured at least
STAT_CHARS_PER_TOKEN = 16  # and at least this many per token of max_seq_len: whether it fits is exact
_PUNCT = string.punctuation + "«»“”‘’„…–—·"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
T = TypeVar("T")


class TokenizerCheckError(ValueError):
    """The tokenizer does not fit the model or the data; the message names each failed check."""


@dataclass
class Check:
    name: str
    status: str  # ok | info | warning | error
    message: str


def check_tokenizer(cfg: RunConfig, out_dir: Path, *, report_location: str | None = None) -> dict[str, Any]:
    """Check the tokenizer against the model and the data; write `report.json`/`report.html`.

    Args:
        cfg: the run config: `model` names the tokenizer and model, `data` the datasets,
            `preprocess.max_seq_len` the sequence length, `tokenizer` the thresholds and terms.
        out_dir: local directory for `report.json` and `report.html` (created if needed).
        report_location: where the reader of a failure finds the HTML report (the step's artifact);
            default `out_dir/report.html`.

    Returns:
        The report, with a flat `metrics` dict of numbers for the KFP Metrics artifact.

    Raises:
        TokenizerCheckError: a check failed (no eos, more tokens than embedding rows, missing or
            broken chat template, too many records over max_seq_len, unreadable tokenizer, model
            config or data). The reports are written first.
    """
    out_dir = Path(out_dir)
    checker = _Checker(cfg)
    checker.run()
    report = checker.report()
    write_reports(report, out_dir, render_html)
    errors = [c for c in checker.checks if c.status == "error"]
    if errors:
        lines = [f"check_tokenizer failed: {len(errors)} check(s): " + ", ".join(c.name for c in errors)]
        lines += [f"  {c.name}: {c.message}" for c in errors]
        lines.append(f"  report: {report_location or out_dir / 'report.html'}")
        raise TokenizerCheckError("\n".join(lines))
    return report


# -- loading --------------------------------------------------------------------------------------


tokenizer_dir = metadata_dir  # the tokenizer's files, without the model's weights


def load_model_config(uri: str) -> dict[str, Any]:
    """The model's config.json as a dict (no weights are read)."""
    return storage.read_json(storage.join(uri, "config.json"))


def _config_sections(model_config: dict[str, Any]) -> list[dict[str, Any]]:
    """The model config, then its text model's (multimodal configs) where that is an object: one
    that is not is the model file check's bad_config, not a crash of the checks that read it."""
    text = model_config.get("text_config")
    return [model_config, text] if isinstance(text, dict) else [model_config]


def embedding_rows(model_config: dict[str, Any]) -> int | None:
    """`vocab_size` of the model config, or of its text model for multimodal configs."""
    for section in _config_sections(model_config):
        if isinstance(section.get("vocab_size"), int):
            return section["vocab_size"]
    return None


# Where model configs give the longest sequence the model was trained on: HF's common name, GPT-2's,
# and the names some remote-code families use.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(model_config: dict[str, Any]) -> tuple[str, int] | None:
    """(key, value) of the model's context length in its config (or its text model's), or None."""
    for section in _config_sections(model_config):
        for key in CONTEXT_KEYS:
            if isinstance(section.get(key), int) and section[key] > 0:
                return key, section[key]
    return None


def _eos_ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


# -- the checks -----------------------------------------------------------------------------------


class _Checker:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.checks: list[Check] = []
        self.tok: Any = None
        self.info: dict[str, Any] = {}
        self.model: dict[str, Any] = {}
        self.lengths: dict[str, Any] | None = None
        self.fertility: dict[str, Any] = {}
        self.split_terms: list[dict[str, Any]] = []
        self.domain_terms: list[dict[str, Any]] = []
        self.unk_words: list[str] = []
        self.unk: dict[str, Any] | None = None
        self.roundtrip: dict[str, Any] | None = None
        self.chat: dict[str, Any] | None = None
        self.rendered: list[str] = []  # the sampled conversations the chat template renders
        self.kind: str | None = None
        self.model_files: list[dict[str, str]] = []

    def add(self, name: str, status: str, message: str) -> None:
        self.checks.append(Check(name, status, message))

    def run(self) -> None:
        cfg = self.cfg
        if cfg.model.base_model_uri:
            self._model_files(cfg.model.base_model_uri)
        if not cfg.tokenizer_uri:
            self.add("load", "error", "model.base_model_uri (or model.tokenizer_uri) is required")
            return
        try:
            self.tok = load_tokenizer(cfg.tokenizer_uri, cfg.model.trust_remote_code)
        except TokenizerFilesError as exc:  # names the file and the fix itself
            self.add("load", "error", f"cannot load the tokenizer: {exc}")
            return
        except Exception as exc:  # transformers raises many kinds; all mean the same to the user
            self.add("load", "error", f"cannot load the tokenizer from {cfg.tokenizer_uri}: {exc}")
            return
        self._special_tokens()
        self._embedding()
        domain = self._sample("train", cfg.data.train_uri)
        if domain is None:
            return
        limit = stat_chars(cfg.preprocess.max_seq_len)
        domain_texts = [r.plain_text()[:limit] for r in domain]
        encoded = encode_stats(self.tok, [r.plain_text() for r in domain], limit, keep=ROUNDTRIP_SAMPLE)
        if self.kind != "chat" or self._chat_template(domain):  # no lengths without a working template
            self._lengths(domain, encoded)
        self.fertility["domain"] = encoded.fertility()
        if cfg.data.general_uri:
            general = self._sample("general", cfg.data.general_uri)
            if general is not None:
                texts = [r.plain_text() for r in general]
                self.fertility["general"] = encode_stats(self.tok, texts, limit).fertility()
        self._fertility_check()
        self._words(domain_texts)
        self._unk(encoded)
        self._roundtrip(domain_texts[:ROUNDTRIP_SAMPLE], encoded.head)

    # the model's files, special tokens and the embedding ---------------------------------------

    def _model_files(self, uri: str) -> None:
        from fulltune.model_check import check_model_files

        problems = check_model_files(uri, self.cfg.model.trust_remote_code)
        self.model_files = [vars(p) for p in problems]
        if problems:
            self.add("model_files", "error", "; ".join(map(str, problems)))
        else:
            self.add("model_files", "ok", f"{uri}: every tensor the config implies is there, complete")

    def _special_tokens(self) -> None:
        tok = self.tok
        self.info = {
            "class": type(tok).__name__,
            "size": len(tok),
            **{f"{name}_token": getattr(tok, f"{name}_token", None) for name in ("bos", "eos", "pad", "unk")},
            **{
                f"{name}_token_id": getattr(tok, f"{name}_token_id", None)
                for name in ("bos", "eos", "pad", "unk")
            },
            "chat_template": bool(getattr(tok, "chat_template", None)),
        }
        eos, pad = tok.eos_token_id, tok.pad_token_id
        if eos is None:
            self.add(
                "eos_token", "error", "the tokenizer has no eos token: documents cannot be ended or separated"
            )
        else:
            self.add("eos_token", "ok", f"eos {tok.eos_token!r} (id {eos})")
        if tok.bos_token_id is None:
            self.add("bos_token", "info", "no bos token (normal for some model families, e.g. Qwen)")
        else:
            self.add("bos_token", "ok", f"bos {tok.bos_token!r} (id {tok.bos_token_id})")
        # fulltune masks padding through the labels (preprocess sets them to IGNORE_INDEX), never by
        # token id, so padding with EOS costs no EOS its loss: no reason to warn, and adding a pad
        # token would need an embedding row the model may not have (Llama 3 uses all of its rows)
        if pad is None:
            self.add(
                "pad_token",
                "info",
                f"no pad token: sequences are padded with eos (id {eos}) and the padding is masked through "
                "the labels, so every EOS keeps its loss (code that masks padding by token id would not)",
            )
        elif pad == eos:
            self.add(
                "pad_token",
                "info",
                f"pad is the eos token (id {pad}): the padding is masked through the labels, so every EOS "
                "keeps its loss (code that masks padding by token id would not)",
            )
        else:
            self.add("pad_token", "ok", f"pad {tok.pad_token!r} (id {pad}), distinct from eos")

    def _embedding(self) -> None:
        uri = self.cfg.model.base_model_uri
        if not uri:
            self.add("embedding", "error", "model.base_model_uri is required to check the embedding size")
            return
        try:
            model_config = load_model_config(uri)
            if not isinstance(model_config, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            self.add("embedding", "error", f"cannot read {storage.join(uri, 'config.json')}: {exc}")
            return
        rows = embedding_rows(model_config)
        model_eos = _eos_ids(model_config.get("eos_token_id")) | self._generation_eos(uri)
        context = context_length(model_config)
        self.model = {
            "model_type": model_config.get("model_type"),
            "embedding_rows": rows,
            "eos_token_ids": sorted(model_eos),
            "context_length": context[1] if context else None,
        }
        self._context(uri, context)
        self._embedding_fits(rows)
        eos = self.tok.eos_token_id
        if eos is not None and model_eos and eos not in model_eos:
            self.add(
                "eos_matches_model",
                "warning",
                f"training ends documents with eos id {eos}, but the model config stops generation at "
                f"{sorted(model_eos)}: the tuned model may not stop. Align config.json/generation_config.json.",
            )

    def _embedding_fits(self, rows: int | None) -> None:
        """Every id the tokenizer can give must have an embedding row. The ids, not their number:
        a vocabulary with holes (special tokens placed at high ids) gives ids past len(tokenizer)."""
        size = len(self.tok)
        if rows is None:
            self.add("embedding", "warning", "the model config has no vocab_size: embedding size not checked")
            return
        past = sorted((i, t) for t, i in self.tok.get_vocab().items() if i >= rows)
        if not past:
            self.add("embedding", "ok", f"{size} tokenizer ids fit the model's {rows} embedding rows")
            return
        shown = ", ".join(f"{t!r} ({i})" for i, t in past[:5]) + (", ..." if len(past) > 5 else "")
        self.add(
            "embedding",
            "error",
            f"the tokenizer has {size} tokens but the model's embedding has {rows} rows: {len(past)} id(s) "
            f"would index past it, up to {past[-1][0]}: {shown}. Use the model's own tokenizer, or resize "
            "the embeddings first.",
        )

    def _generation_eos(self, uri: str) -> set[int]:
        """The eos ids of generation_config.json. transformers skips one that is not JSON (generation
        falls back to config.json), but from_pretrained fails on JSON that is not an object: in
        train, once the GPUs are granted, so that is refused here."""
        where = storage.join(uri, "generation_config.json")
        try:
            generation = storage.read_json(where)
        except (OSError, ValueError):
            return set()
        if not isinstance(generation, dict):
            self.add(
                "generation_config",
                "error",
                f"{where} is not a JSON object (it holds a {type(generation).__name__}): loading the model "
                "in train would fail on it. Save the model's generation config again, or delete the file.",
            )
            return set()
        return _eos_ids(generation.get("eos_token_id"))

    def _context(self, uri: str, context: tuple[str, int] | None) -> None:
        """Sequences longer than the model was trained on: a learned position table has no rows for
        the positions past it (an index error in the first step), rotary embeddings turn through
        angles the model never saw (a quietly worse model)."""
        seq = self.cfg.preprocess.max_seq_len
        if context is None:
            self.add("context_length", "info", "the model config names no context length: not checked")
            return
        key, length = context
        if seq > length:
            self.add(
                "context_length",
                "error",
                f"preprocess.max_seq_len {seq} is longer than the model's context, {key} {length} in "
                f"{storage.join(uri, 'config.json')}: positions past {length} were never trained. Set "
                f"preprocess.max_seq_len to {length} or less; to extend the context on purpose, give the model "
                f"a rope scaling in config.json and raise {key} with it.",
            )
        else:
            self.add("context_length", "ok", f"max_seq_len {seq} within the model's {key} {length}")

    # data --------------------------------------------------------------------------------------

    def _sample(self, name: str, uri: str) -> list[Record] | None:
        """A deterministic sample of the dataset's good records, or None (and an error check)."""
        try:
            data = self.cfg.data.reading(name)
            kind = resolve_kind(uri, data)
            records = reservoir(iter_records(uri, data, kind), SAMPLE_RECORDS, self.cfg.preprocess.seed)
        except (DataError, RecordError, OSError) as exc:
            self.add(f"{name}_data", "error", f"cannot read {uri}: {exc}")
            return None
        if not records:
            self.add(f"{name}_data", "error", f"{uri}: no usable records")
            return None
        if name == "train":
            self.kind = kind
        return records

    def _chat_template(self, records: list[Record]) -> bool:
        """Render every sampled conversation (`self.rendered`, which the lengths count) and check
        each keeps its turns' content; False when no lengths can be counted."""
        template = getattr(self.tok, "chat_template", None)
        if not template:
            self.add(
                "chat_template",
                "error",
                "the data is chat but the tokenizer has no chat template "
                "(chat_template in tokenizer_config.json or chat_template.jinja)",
            )
            return False
        rendered: list[tuple[Record, str]] = []
        failed: list[tuple[Record, Exception]] = []
        for r in records:
            try:
                rendered.append((r, self.tok.apply_chat_template(r.messages, tokenize=False)))
            except Exception as exc:  # jinja raises TemplateError and whatever the template raises
                failed.append((r, exc))
        self.rendered = [text for _, text in rendered]
        if failed:
            r, exc = failed[0]
            self.add(
                "chat_template",
                "error",
                f"the template fails on {len(failed)} of {len(records)} sampled conversations, first "
                f"{r.loc}: {type(exc).__name__}: {exc}",
            )
        if not rendered or not self._turns_kept(rendered, len(records), ok=not failed):
            return False
        if self.cfg.preprocess.loss_on == "assistant":
            from fulltune.preprocess.core import no_token_offsets

            why = no_token_offsets(self.tok)
            if why:  # preprocessing would refuse every conversation for it, and say so
                self.add("token_offsets", "error", f"{self.cfg.tokenizer_uri}: {why}")
                return True
            return self._prefix_stable([r for r, _ in rendered[:PREFIX_CHECK_SAMPLE]])
        return True

    def _turns_kept(self, rendered: list[tuple[Record, str]], sampled: int, *, ok: bool) -> bool:
        """Whether the renderings keep every assistant turn's content; a warning for other turns'
        content dropped, and an "ok" when `ok` and nothing is. The first rendering that loses
        content (else the first) goes into the report."""
        lost = [
            (r, text, roles)
            for r, text in rendered
            if (roles := [m["role"] for m in r.messages if m["content"].strip() not in text])
        ]
        answers = [x for x in lost if "assistant" in x[2]]
        shown, text, roles = (answers or lost or [(*rendered[0], [])])[0]
        self.chat = {
            "sample_location": str(shown.loc),
            "rendered": text[:4000],
            "marks_assistant_turns": bool(_GENERATION_TAG.search(str(self.tok.chat_template))),
        }
        if answers:
            # The answers are what training teaches: preprocessing would train on what the template
            # makes of them (nothing, or the EOS after the prompt alone: a model that stops at once).
            self.add(
                "chat_template",
                "error",
                f"rendering drops or changes the content of assistant turns in {len(answers)} of {sampled} "
                f"sampled conversations, first {shown.loc} (turns {roles}): training would not teach the "
                "data's answers. Use a template that renders assistant messages as they are",
            )
            return False
        if lost:
            self.add(
                "chat_template",
                "warning",
                f"rendering drops or changes the content of turns in {len(lost)} of {sampled} sampled "
                f"conversations, first {shown.loc} (turns {roles})",
            )
        elif ok:
            self.add(
                "chat_template", "ok", f"renders all {sampled} sampled conversations with all their turns"
            )
        return True

    def _prefix_stable(self, records: list[Record]) -> bool:
        """Build each of `records` (conversations the template renders whole) as preprocessing
        does for loss_on: assistant (`preprocess.core.chat_example`): it finds each assistant turn by
        rendering the conversation up to it, with and without a generation prompt, which needs each
        of those renderings to work and to be a prefix of the whole."""
        from fulltune.preprocess.core import PreprocessError, located_chat_example

        for r in records:
            try:
                located_chat_example(r, self.tok, loss_all=False)
            except PreprocessError as exc:  # names the record
                self.add(
                    "chat_template",
                    "error",
                    f"{exc}: preprocessing would refuse it for preprocess.loss_on: assistant. Fix the "
                    "template or set preprocess.loss_on: all",
                )
                return False
        return True

    def _record_lengths(self, records: list[Record], text: Encoded) -> list[int]:
        """Tokens each record takes in training, counted as preprocessing builds it: the text (or
        prompt + completion, or the rendered conversation) without added special tokens, plus the
        EOS that ends it (unless a rendered conversation already ends with one: `needs_eos`), plus, except for
        chat, the ids the tokenizer leads every text with (Llama's BOS), which preprocessing puts
        before each document and counts against max_seq_len. `text` is the records' plain texts
        measured (`encode_stats`: a long one on a bounded prefix), which is all text records need."""
        from fulltune.preprocess.core import Encoder, needs_eos, prompt_completion_ids

        tok = self.tok
        if self.kind == "chat":  # the conversations the template renders (`_chat_template`)
            encoded = _encode(tok, self.rendered, special=False)
            return [len(x) + needs_eos(r, x, tok) for r, x in zip(self.rendered, encoded, strict=True)]
        enc = Encoder(tok, memoize=False)
        lead = len(enc.lead)
        if self.kind == "prompt_completion":
            # preprocessing's own split: a completion encoded after its prompt, not alone
            prompts, completions = prompt_completion_ids(records, enc)
            return [lead + len(p) + len(c) + 1 for p, c in zip(prompts, completions, strict=True)]
        return [lead + n + 1 for n in text.counts]

    def _lengths(self, records: list[Record], text: Encoded) -> None:
        max_len = self.cfg.preprocess.max_seq_len
        lengths = self._record_lengths(records, text)
        if not lengths:
            return
        over = sum(n > max_len for n in lengths)
        rate = over / len(lengths)
        ordered = sorted(lengths)
        self.lengths = {
            "records_sampled": len(lengths),
            "max_seq_len": max_len,
            "over_max_seq_len": over,
            "truncation_rate": rate,
            # text is split across sequences or windows, never truncated: its rate is only "over"
            "truncated": self.kind != "text",
            "p50": percentile(ordered, 50),
            "p95": percentile(ordered, 95),
            "max": ordered[-1],
        }
        allowed = self.cfg.tokenizer.max_truncation_rate
        stats = f"p50 {self.lengths['p50']}, p95 {self.lengths['p95']}, max {ordered[-1]}"
        if self.kind == "text":
            # Text is never truncated: packing splits documents across sequences, and without packing
            # long documents become overlapping windows (chunk_stride). Reported, never a failure.
            how = (
                "packing splits them across sequences"
                if self.cfg.preprocess.packing
                else "they become windows"
            )
            self.add(
                "truncation",
                "info" if over else "ok",
                f"{over} of {len(lengths)} sampled records ({rate:.1%}) are longer than max_seq_len={max_len} tokens; "
                f"{how}, nothing is dropped; {stats}",
            )
            return
        over_what = f"{over} of {len(lengths)} sampled records ({rate:.1%}) are longer than max_seq_len={max_len} tokens"
        if self.cfg.preprocess.overlong == "drop" and len(lengths) - over < DROP_MIN_KEPT * len(lengths):
            left = "none" if over == len(lengths) else "almost none"
            self.add(
                "truncation",
                "error",
                f"{over_what} and preprocess.overlong is drop: {left} would be left to train on; raise "
                f"preprocess.max_seq_len (p95 {self.lengths['p95']}) or set preprocess.overlong: truncate; {stats}",
            )
            return
        fate = (
            "dropped (preprocess.overlong: drop)" if self.cfg.preprocess.overlong == "drop" else "truncated"
        )
        message = f"{over_what} (allowed {allowed:.1%}) and would be {fate}; {stats}"
        self.add("truncation", "error" if rate > allowed else "ok", message)

    def _fertility_check(self) -> None:
        domain, general = self.fertility.get("domain"), self.fertility.get("general")
        if domain is None:
            return
        if general:
            ratio = domain / general
            self.fertility["ratio"] = ratio
            message = (
                f"{domain:.2f} tokens per word on domain data, {general:.2f} on general data ({ratio:.2f}x)"
            )
            if ratio > FERTILITY_WARN_RATIO:
                self.add(
                    "fertility",
                    "warning",
                    message + ": domain text is expensive for this tokenizer; see the split terms below",
                )
                return
            self.add("fertility", "ok", message)
        else:
            self.add("fertility", "info", f"{domain:.2f} tokens per word on domain data")

    def _words(self, texts: list[str]) -> None:
        raw_counts: Counter[str] = Counter()
        for text in texts:
            raw_counts.update(text.split())
        counts: Counter[str] = Counter()
        for raw, n in raw_counts.items():
            word = raw.strip(_PUNCT)
            if word and len(word) <= MAX_WORD_CHARS and any(ch.isalpha() for ch in word):
                counts[word] += n
        words = [w for w, _ in counts.most_common(MAX_DISTINCT_WORDS)]
        terms = list(dict.fromkeys(self.cfg.tokenizer.domain_terms))
        pieces = word_pieces(self.tok, words + terms)
        unk = self.tok.unk_token_id

        def entry(word: str, ids: list[int]) -> dict[str, Any]:
            return {
                "word": word,
                "pieces": _show_pieces(self.tok, ids),
                "num_pieces": len(ids),
                "count": counts.get(word, 0),
                "has_unk": unk is not None and unk in ids,
            }

        ranked = sorted(
            (i for i in range(len(words)) if len(pieces[i]) > 1),
            key=lambda i: (-len(pieces[i]), -counts[words[i]], words[i]),
        )
        self.split_terms = [
            entry(words[i], pieces[i]) for i in ranked[: self.cfg.tokenizer.top_k_split_terms]
        ]
        self.domain_terms = [entry(t, ids) for t, ids in zip(terms, pieces[len(words) :], strict=True)]
        if unk is not None:
            self.unk_words = [w for w, ids in zip(words, pieces[: len(words)], strict=True) if unk in ids][
                :10
            ]

    def _unk(self, encoded: Encoded) -> None:
        if self.tok.unk_token_id is None:
            return
        total, count = encoded.tokens, encoded.unk
        rate = count / total if total else 0.0
        self.unk = {"token": self.tok.unk_token, "count": count, "tokens": total, "rate": rate}
        if count:
            words = ", ".join(repr(w) for w in self.unk_words[:5])
            self.add(
                "unk",
                "warning",
                f"{count} of {total} tokens ({rate:.3%}) are {self.tok.unk_token!r}: that text is lost "
                f"to the model" + (f"; e.g. in {words}" if words else ""),
            )
        else:
            self.add("unk", "ok", f"no {self.tok.unk_token!r} tokens in {total} sampled tokens")

    def _roundtrip(self, texts: list[str], ids: list[list[int]]) -> None:
        exact = 0
        examples: list[dict[str, str]] = []
        for text, x in zip(texts, ids, strict=True):
            back = self.tok.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if back == text:
                exact += 1
            elif len(examples) < 3:
                at = next(
                    (i for i, (a, b) in enumerate(zip(text, back, strict=False)) if a != b),
                    min(len(text), len(back)),
                )
                examples.append(
                    {
                        "at": str(at),
                        "original": text[max(0, at - 20) : at + 20],
                        "decoded": back[max(0, at - 20) : at + 20],
                    }
                )
        rate = exact / len(texts) if texts else 1.0
        self.roundtrip = {"checked": len(texts), "exact": exact, "rate": rate, "examples": examples}
        if exact < len(texts):
            self.add(
                "roundtrip",
                "warning",
                f"decode(encode(x)) differs from x for {len(texts) - exact} of {len(texts)} sampled texts "
                "(normalization or lossy tokens); generated text will differ the same way",
            )
        else:
            self.add("roundtrip", "ok", f"decode(encode(x)) == x for all {len(texts)} sampled texts")

    # the report --------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        statuses = Counter(c.status for c in self.checks)
        metrics: dict[str, float] = {"errors": statuses["error"], "warnings": statuses["warning"]}
        if self.tok is not None:
            metrics["tokenizer_size"] = len(self.tok)
        if self.model.get("embedding_rows") is not None:
            metrics["embedding_rows"] = self.model["embedding_rows"]
        if self.lengths:
            metrics["sampled_records"] = self.lengths["records_sampled"]
            metrics["truncation_rate"] = self.lengths["truncation_rate"]
            for k in ("p50", "p95", "max"):
                metrics[f"tokens_{k}"] = self.lengths[k]
        for k, v in self.fertility.items():
            metrics[f"{k}_fertility" if k != "ratio" else "fertility_ratio"] = v
        if self.unk is not None:
            metrics["unk_rate"] = self.unk["rate"]
        if self.roundtrip is not None:
            metrics["roundtrip_exact_rate"] = self.roundtrip["rate"]
        return {
            "format": REPORT_FORMAT,
            "passed": statuses["error"] == 0,
            "tokenizer_uri": self.cfg.tokenizer_uri,
            "base_model_uri": self.cfg.model.base_model_uri,
            "record_kind": self.kind,
            "tokenizer": self.info,
            "model": self.model,
            "checks": [vars(c) for c in self.checks],
            "model_files": self.model_files,
            "lengths": self.lengths,
            "fertility": self.fertility,
            "split_terms": self.split_terms,
            "domain_terms": self.domain_terms,
            "unk": self.unk,
            "roundtrip": self.roundtrip,
            "chat": self.chat,
            "metrics": metrics,
        }


# -- helpers --------------------------------------------------------------------------------------


def reservoir(items: Iterable[T], k: int, seed: int) -> list[T]:
    """A uniform sample of at most `k` items, in stream order; the same for the same seed and data."""
    rng = random.Random(seed)
    kept: list[tuple[int, T]] = []
    for i, item in enumerate(items):
        if i < k:
            kept.append((i, item))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                kept[j] = (i, item)
    return [item for _, item in sorted(kept, key=lambda pair: pair[0])]


def _encode(tok: Any, texts: list[str], *, special: bool) -> list[list[int]]:
    return list(_iter_encoded(tok, texts, special=special))


def _iter_encoded(tok: Any, texts: list[str], *, special: bool) -> Iterator[list[int]]:
    """The ids of each text, encoded ENCODE_BATCH texts or ENCODE_CHARS characters at a time."""
    for batch in batches(texts, max_texts=ENCODE_BATCH):
        enc = tok(list(batch), add_special_tokens=special, return_attention_mask=False, verbose=False)
        yield from (list(ids) for ids in enc["input_ids"])


def stat_chars(max_seq_len: int) -> int:
    """The characters of a sampled text that are encoded; a longer text's tokens are extrapolated.
    At 16 characters a token (more than any tokenizer averages) the part measured alone is longer
    than max_seq_len, so whether a record fits is never an extrapolation."""
    return max(STAT_MIN_CHARS, STAT_CHARS_PER_TOKEN * max_seq_len)


@dataclass
class Encoded:
    """Texts encoded for the statistics, without keeping every id: each text's tokens (from its first
    `limit` characters, scaled by its length when longer), each text's last id (None when cut),
    the tokens and words of what was encoded, the unk tokens among them, and the ids of the first
    texts (for the round trip)."""

    counts: list[int] = field(default_factory=list)
    last: list[int | None] = field(default_factory=list)
    tokens: int = 0
    words: int = 0
    unk: int = 0
    head: list[list[int]] = field(default_factory=list)

    def fertility(self) -> float | None:
        """Tokens per whitespace word."""
        return self.tokens / self.words if self.words else None


def encode_stats(tok: Any, texts: list[str], limit: int, keep: int = 0) -> Encoded:
    """`Encoded` for `texts`, each measured on its first `limit` characters, keeping the ids of the
    first `keep`."""
    out, unk = Encoded(), tok.unk_token_id
    cut = [t[:limit] for t in texts]
    for i, (text, ids) in enumerate(zip(texts, _iter_encoded(tok, cut, special=False), strict=True)):
        whole = len(text) <= limit
        out.counts.append(len(ids) if whole else round(len(ids) * len(text) / limit))
        out.last.append(ids[-1] if ids and whole else None)
        out.tokens += len(ids)
        out.words += len(cut[i].split())
        out.unk += ids.count(unk) if unk is not None else 0
        if i < keep:
            out.head.append(ids)
    return out


def word_pieces(tok: Any, words: list[str]) -> list[list[int]]:
    """The token ids of each word as it appears inside running text (after a space).

    Encoding the bare word would give its start-of-text form, which differs for byte-level BPE
    ('Ġword' vs 'word'); so "a <word>" is encoded and the ids of "a" are removed when they are
    its prefix (they are for whitespace-splitting tokenizers), else the bare word is encoded.
    """
    if not words:
        return []
    prefix = _encode(tok, ["a"], special=False)[0]
    in_text = _encode(tok, ["a " + w for w in words], special=False)
    bare: list[list[int]] | None = None
    out = []
    for i, ids in enumerate(in_text):
        if ids[: len(prefix)] == prefix and len(ids) > len(prefix):
            out.append(ids[len(prefix) :])
        else:
            bare = bare or _encode(tok, words, special=False)
            out.append(bare[i])
    return out


def _show_pieces(tok: Any, ids: list[int]) -> list[str]:
    """Readable pieces: each id decoded alone, the raw token where that is not a whole character.

    A space the tokenizer spends a token of its own on is shown as ' '.
    """
    pieces = []
    for n, i in enumerate(ids):
        piece = tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if n == 0 and piece.strip():
            piece = piece.lstrip()  # the word's leading space, unless it is a token of its own
        if not piece or "\ufffd" in piece:
            piece = _byte_token(tok.convert_ids_to_tokens(i))
        pieces.append(piece)
    return pieces


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-ins for bytes, mapped back to the bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _byte_token(token: str) -> str:
    """A token holding part of a character: its bytes as <0xNN> (byte-level BPE), else the raw token."""
    decoder = _byte_level_decoder()
    if token and all(ch in decoder for ch in token):
        return "".join(f"<0x{decoder[ch]:02X}>" for ch in token)
    return token


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page: the checks, the length and fertility numbers, the split terms."""
    passed = report["passed"]
    failed = [c["name"] for c in report["checks"] if c["status"] == "error"]
    verdict = (
        "PASSED — no check failed" if passed else f"FAILED — {len(failed)} check(s): " + ", ".join(failed)
    )
    return kit.page(
        "check_tokenizer",
        "Tokenizer check",
        kit.banner("pass" if passed else "fail", verdict),
        _subject(report),
        kit.heading("Checks"),
        kit.table(
            ["check", "status", "detail"],
            [(c["name"], kit.badge(c["status"], c["status"]), c["message"]) for c in report["checks"]],
        ),
        _numbers(report["metrics"]),
        _term_table("Most-split domain words", report["split_terms"]),
        _term_table("Domain terms", report["domain_terms"]),
        _roundtrip_table(report.get("roundtrip") or {}),
        _chat_section(report.get("chat")),
    )


def _subject(report: dict[str, Any]) -> str:
    kind = f", {html.escape(report['record_kind'])} records" if report["record_kind"] else ""
    tokenizer, model = kit.code(report["tokenizer_uri"]), kit.code(report["base_model_uri"])
    return f"<p>Tokenizer {tokenizer}, model {model}{kind}.</p>"


def _numbers(metrics: dict[str, Any]) -> str:
    numbers = [(k, v) for k, v in metrics.items() if k not in ("errors", "warnings")]
    return kit.heading("Numbers") + kit.key_value_table(numbers) if numbers else ""


def _term_table(title: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    return kit.heading(title) + kit.table(
        ["word", "pieces", "#", "count in sample"],
        [(kit.code(r["word"]), kit.code(repr(r["pieces"])), r["num_pieces"], r["count"]) for r in rows],
    )


def _roundtrip_table(roundtrip: dict[str, Any]) -> str:
    if not roundtrip.get("examples"):
        return ""
    pre = "<pre>{}</pre>".format
    return kit.heading("Round-trip differences") + kit.table(
        ["original", "decoded"],
        [
            (Html(pre(html.escape(ex["original"]))), Html(pre(html.escape(ex["decoded"]))))
            for ex in roundtrip["examples"]
        ],
    )


def _chat_section(chat: dict[str, Any] | None) -> str:
    if not chat:
        return ""
    marks = "marks" if chat["marks_assistant_turns"] else "does not mark"
    return (
        kit.heading("Chat template")
        + f"<p>Rendering of {kit.code(chat['sample_location'])}; the template {marks} assistant turns with "
        f"{kit.code('{% generation %}')}.</p><pre>{html.escape(chat['rendered'])}</pre>"
    )
