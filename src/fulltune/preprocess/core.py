"""Sharded preprocessing: tokenize, pack, mask the loss, mix in replay data.

One call of `preprocess_shard(cfg, work_dir, i)` produces shard i of N, independently of the
others (one pipeline task each):

- records are assigned to shards by their ordinal in the input (ordinal % N), so the split is
  stable for the same inputs and N;
- domain records go to `train`, or to `domain_eval` when their stable hash falls in the held-out
  fraction (only when no eval_uri is configured);
- general records go to `general_eval` (stable hash, `general_eval_fraction`) or to the replay
  pool, from which the shard draws `replay_fraction` of its training tokens;
- `text` records are tokenized, EOS-terminated and packed into `max_seq_len` sequences (or one
  padded sequence per document with `packing: false`); prompt/completion and chat records are
  rendered (chat through the tokenizer's chat template), labelled only on the completion or
  assistant tokens (`loss_on: assistant`), and packed whole with first-fit decreasing.

Outputs go to <work_dir>/data/shards/: one Parquet file per split and the shard manifest, written
*last*. A shard whose manifest exists and whose files match their checksums is skipped, so a
retried pipeline redoes only what is missing. `gather_shards` merges the shard manifests into the
dataset manifest (`dataset.py` describes it).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fulltune import hf, storage
from fulltune.config import RunConfig
from fulltune.data.records import Record, iter_records, resolve_kind
from fulltune.preprocess.dataset import IGNORE_INDEX, MANIFEST_FORMAT

log = logging.getLogger(__name__)

SHARD_FORMAT = "fulltune.shard/v1"
TOKENIZE_BATCH = 512


class PreprocessError(ValueError):
    pass


def stable_fraction(text: str, salt: str) -> float:
    """A number in [0, 1) fixed by the text: the same record lands in the same split on every run."""
    digest = hashlib.blake2b(f"{salt}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def shard_dir(work_dir: str) -> str:
    return storage.join(work_dir, "data", "shards")


def shard_manifest_uri(work_dir: str, index: int) -> str:
    return storage.join(shard_dir(work_dir), f"shard-{index:05d}.json")


# -- tokenization -------------------------------------------------------------------------------


@dataclass
class Example:
    """One tokenized training example: ids and the per-token loss mask (labels)."""

    input_ids: list[int]
    labels: list[int]


def load_tokenizer(cfg: RunConfig):
    tok = hf.load_tokenizer(cfg.tokenizer_uri, cfg.model.trust_remote_code)
    if tok.eos_token_id is None:
        raise PreprocessError(
            f"{cfg.tokenizer_uri}: tokenizer has no eos token; check_tokenizer should have refused it"
        )
    return tok


def tokenize_records(records: Iterable[Record], tok, cfg: RunConfig) -> Iterator[Example]:
    """Examples from records, tokenized in batches. Text: all tokens + EOS carry loss."""
    loss_all = cfg.preprocess.loss_on == "all"
    batch: list[Record] = []

    def flush() -> Iterator[Example]:
        kind = batch[0].kind
        if kind == "text":
            ids = tok([r.text for r in batch], add_special_tokens=False)["input_ids"]
            for seq in ids:
                seq = list(seq) + [tok.eos_token_id]
                yield Example(seq, list(seq))
        elif kind == "prompt_completion":
            p_ids = tok([r.prompt for r in batch], add_special_tokens=False)["input_ids"]
            c_ids = tok([r.completion for r in batch], add_special_tokens=False)["input_ids"]
            for p, c in zip(p_ids, c_ids, strict=True):
                c = list(c) + [tok.eos_token_id]
                yield Example(list(p) + c, (list(p) if loss_all else [IGNORE_INDEX] * len(p)) + c)
        else:
            for r in batch:
                yield chat_example(r.messages, tok, loss_all)
        batch.clear()

    for rec in records:
        if batch and rec.kind != batch[0].kind:
            yield from flush()
        batch.append(rec)
        if len(batch) >= TOKENIZE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def chat_example(messages: list[dict[str, str]], tok, loss_all: bool) -> Example:
    """Render a conversation with the chat template; labels only on the assistant turns.

    The span of each assistant turn in the rendered text is found by rendering the prefix with a
    generation prompt and the prefix including the turn; tokens whose characters start inside a
    span carry loss. This works for any template that renders prefixes stably.
    """
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = len(tok.apply_chat_template(messages[: i + 1], tokenize=False))
        if full[:end] != tok.apply_chat_template(messages[: i + 1], tokenize=False):
            raise PreprocessError("the chat template does not render conversation prefixes stably")
        spans.append((start, end))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not ids or ids[-1] != tok.eos_token_id:
        ids.append(tok.eos_token_id)
        offsets = list(enc["offset_mapping"]) + [(len(full), len(full))]
    else:
        offsets = list(enc["offset_mapping"])
    labels = []
    for tid, (a, _b) in zip(ids, offsets, strict=True):
        in_span = any(s <= a < e for s, e in spans) or (a == len(full) and spans)
        labels.append(tid if (loss_all or in_span) else IGNORE_INDEX)
    return Example(ids, labels)


# -- packing -----------------------------------------------------------------------------------


@dataclass
class PackStats:
    sequences: int = 0
    tokens: int = 0  # non-pad tokens
    loss_tokens: int = 0
    truncated: int = 0
    examples: int = 0

    def add(self, other: PackStats) -> None:
        for key in ("sequences", "tokens", "loss_tokens", "truncated", "examples"):
            setattr(self, key, getattr(self, key) + getattr(other, key))


@dataclass
class Packed:
    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    attention_mask: list[list[int]] = field(default_factory=list)
    position_ids: list[list[int]] = field(default_factory=list)
    stats: PackStats = field(default_factory=PackStats)

    def extend(self, other: Packed) -> None:
        self.input_ids += other.input_ids
        self.labels += other.labels
        self.attention_mask += other.attention_mask
        self.position_ids += other.position_ids
        self.stats.add(other.stats)

    def add(
        self, ids: list[int], labels: list[int], seq_len: int, pad_id: int, starts: list[bool] | None = None
    ) -> None:
        """One sequence, padded to seq_len. `starts` marks the first token of each document in it:
        position_ids restart there, so attention can be reset per document where the model supports it."""
        n = len(ids)
        pad = seq_len - n
        self.input_ids.append(ids + [pad_id] * pad)
        self.labels.append(labels + [IGNORE_INDEX] * pad)
        self.attention_mask.append([1] * n + [0] * pad)
        self.position_ids.append(_positions(starts, n) + [0] * pad)
        self.stats.sequences += 1
        self.stats.tokens += n
        self.stats.loss_tokens += sum(1 for x in labels if x != IGNORE_INDEX)


def _positions(starts: list[bool] | None, n: int) -> list[int]:
    if starts is None:
        return list(range(n))
    out, p = [], 0
    for i in range(n):
        p = 0 if (i == 0 or starts[i]) else p + 1
        out.append(p)
    return out


def pack_stream(examples: Iterable[Example], seq_len: int, pad_id: int) -> Packed:
    """Concatenate documents (each already EOS-terminated) and cut into seq_len pieces.

    A document that spills over into the next sequence continues there from position 0.
    """
    out = Packed()
    buf_ids: list[int] = []
    buf_labels: list[int] = []
    buf_starts: list[bool] = []
    for ex in examples:
        out.stats.examples += 1
        buf_ids.extend(ex.input_ids)
        buf_labels.extend(ex.labels)
        buf_starts.extend([True] + [False] * (len(ex.input_ids) - 1))
        while len(buf_ids) >= seq_len:
            out.add(buf_ids[:seq_len], buf_labels[:seq_len], seq_len, pad_id, buf_starts[:seq_len])
            del buf_ids[:seq_len], buf_labels[:seq_len], buf_starts[:seq_len]
    if buf_ids:
        out.add(buf_ids, buf_labels, seq_len, pad_id, buf_starts)
    return out


def chunk_windows(examples: Iterable[Example], seq_len: int, stride: int, pad_id: int) -> Packed:
    """Each document on its own, long ones cut into seq_len windows that overlap by `stride` tokens.

    The overlap gives each window the preceding context; its tokens carry no loss in the later window,
    so every token is learned from exactly once.
    """
    if not 0 <= stride < seq_len:
        raise PreprocessError(f"chunk_stride {stride} must be at least 0 and below max_seq_len {seq_len}")
    out = Packed()
    step = seq_len - stride
    for ex in examples:
        out.stats.examples += 1
        start = 0
        while True:
            ids = ex.input_ids[start : start + seq_len]
            labels = ex.labels[start : start + seq_len]
            if start:
                labels = [IGNORE_INDEX] * stride + labels[stride:]
            out.add(ids, labels, seq_len, pad_id)
            if start + seq_len >= len(ex.input_ids):
                break
            start += step
    return out


def pack_whole(examples: Iterable[Example], seq_len: int, pad_id: int, *, packing: bool) -> Packed:
    """Examples kept whole: first-fit decreasing into seq_len bins, or one per sequence.

    Over-long examples are truncated to seq_len and counted.
    """
    out = Packed()
    items: list[Example] = []
    for ex in examples:
        out.stats.examples += 1
        if len(ex.input_ids) > seq_len:
            out.stats.truncated += 1
            ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len])
        items.append(ex)
    if not packing:
        for ex in items:
            out.add(ex.input_ids, ex.labels, seq_len, pad_id)
        return out
    order = sorted(range(len(items)), key=lambda i: (-len(items[i].input_ids), i))
    bins: list[list[int]] = []  # example indices per bin
    free: list[int] = []
    for i in order:
        n = len(items[i].input_ids)
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(seq_len - n)
    for members in bins:
        ids = [t for i in members for t in items[i].input_ids]
        labels = [t for i in members for t in items[i].labels]
        starts = [j == 0 for i in members for j in range(len(items[i].input_ids))]
        out.add(ids, labels, seq_len, pad_id, starts)
    return out


def pack(examples: Iterable[Example], kind: str, cfg: RunConfig, pad_id: int) -> Packed:
    seq_len = cfg.preprocess.max_seq_len
    if kind == "text" and cfg.preprocess.packing:
        return pack_stream(examples, seq_len, pad_id)
    if kind == "text":
        return chunk_windows(examples, seq_len, cfg.preprocess.chunk_stride, pad_id)
    return pack_whole(examples, seq_len, pad_id, packing=cfg.preprocess.packing)


# -- the shard step ----------------------------------------------------------------------------------


def _shard_blocks(
    uri: str, cfg: RunConfig, kind: str, index: int, num_shards: int
) -> dict[int, list[Record]]:
    """The blocks of `block_records` consecutive records that belong to this shard (block % N == index).

    Blocks, not shards, are the unit every later decision is made in (split, replay, packing), so the
    sequences produced do not depend on the number of shards: N=1 and N=4 give the same multiset.
    """
    size = cfg.preprocess.block_records
    blocks: dict[int, list[Record]] = {}
    for ordinal, rec in enumerate(iter_records(uri, cfg.data, kind)):
        block = ordinal // size
        if block % num_shards == index:
            blocks.setdefault(block, []).append(rec)
    return blocks


@dataclass
class ShardInput:
    """What one shard processes: per split, its records grouped by block; and the replay pool."""

    kinds: dict[str, str] = field(default_factory=dict)
    blocks: dict[str, dict[int, list[Record]]] = field(default_factory=dict)
    replay_pool: list[Record] = field(default_factory=list)


def _shard_input(cfg: RunConfig, index: int, n: int) -> ShardInput:
    pp, data = cfg.preprocess, cfg.data
    salt = str(pp.seed)
    out = ShardInput()
    kind = resolve_kind(data.train_uri, data)
    out.kinds["train"] = out.kinds["domain_eval"] = kind
    train_blocks = _shard_blocks(data.train_uri, cfg, kind, index, n)
    if data.eval_uri is None:
        out.blocks["train"], out.blocks["domain_eval"] = _hash_split(train_blocks, pp.eval_fraction, salt)
    else:
        out.blocks["train"] = train_blocks
        out.kinds["domain_eval"] = resolve_kind(data.eval_uri, data)
        out.blocks["domain_eval"] = _shard_blocks(data.eval_uri, cfg, out.kinds["domain_eval"], index, n)
    if data.general_uri is not None:
        gkind = resolve_kind(data.general_uri, data)
        out.kinds["general_eval"] = gkind
        general = _shard_blocks(data.general_uri, cfg, gkind, index, n)
        _, out.blocks["general_eval"] = _hash_split(general, pp.general_eval_fraction, salt + "/general")
        if pp.replay_fraction > 0:
            # Every shard sees the whole replay pool (the general set is small beside the domain data).
            out.replay_pool = [
                r
                for r in iter_records(data.general_uri, data, gkind)
                if stable_fraction(r.plain_text(), salt + "/general") >= pp.general_eval_fraction
            ]
    return out


def _hash_split(blocks: dict[int, list[Record]], fraction: float, salt: str):
    """(kept, held_out) blocks: a record is held out when its stable hash falls below `fraction`."""
    kept: dict[int, list[Record]] = {}
    held: dict[int, list[Record]] = {}
    for b, recs in blocks.items():
        for rec in recs:
            (held if stable_fraction(rec.plain_text(), salt) < fraction else kept).setdefault(b, []).append(
                rec
            )
    return kept, held


def _replay_examples(pool: list[Example], target_tokens: int, start: int = 0) -> list[Example]:
    """Examples from the replay pool from `start` on, cycling if needed, until target_tokens."""
    out: list[Example] = []
    got = 0
    if not pool or target_tokens <= 0:
        return out
    i = start
    while got < target_tokens:
        ex = pool[i % len(pool)]
        remaining = target_tokens - got
        if len(ex.input_ids) > remaining:
            ex = Example(ex.input_ids[:remaining], ex.labels[:remaining])
        out.append(ex)
        got += len(ex.input_ids)
        i += 1
    return out


def _table(packed: Packed):
    import pyarrow as pa

    return pa.table(
        {
            "input_ids": pa.array(packed.input_ids, type=pa.list_(pa.int32())),
            "labels": pa.array(packed.labels, type=pa.list_(pa.int32())),
            "attention_mask": pa.array(packed.attention_mask, type=pa.list_(pa.int8())),
            "position_ids": pa.array(packed.position_ids, type=pa.list_(pa.int32())),
        }
    )


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
            self._writer = pq.ParquetWriter(
                self._path, table.schema, compression="zstd", write_statistics=False, store_schema=False
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


def preprocess_shard(cfg: RunConfig, work_dir: str, index: int) -> dict[str, Any]:
    """Produce shard `index`; returns its manifest. Skips work already complete."""
    n = cfg.preprocess.num_shards
    if not 0 <= index < n:
        raise PreprocessError(f"shard index {index} out of range for num_shards={n}")
    manifest_uri = shard_manifest_uri(work_dir, index)
    if shard_is_complete(manifest_uri):
        log.info("shard %d already complete at %s: skipped", index, manifest_uri)
        manifest = storage.read_json(manifest_uri)
        manifest["skipped"] = True
        return manifest

    tok = load_tokenizer(cfg)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    inputs = _shard_input(cfg, index, n)
    pool = list(tokenize_records(inputs.replay_pool, tok, cfg))
    r = cfg.preprocess.replay_fraction if pool else 0.0
    salt = str(cfg.preprocess.seed)
    domain_tokens = replay_tokens = 0
    out_splits: dict[str, Any] = {}
    for name, blocks in inputs.blocks.items():
        kind = inputs.kinds[name]
        sink = ParquetSink(storage.join(shard_dir(work_dir), f"{name}-{index:05d}.parquet"))
        for b in sorted(blocks):
            examples = list(tokenize_records(blocks[b], tok, cfg))
            if name == "train" and r > 0:
                tokens = sum(len(e.input_ids) for e in examples)
                start = int(stable_fraction(f"block {b}", salt + "/replay") * len(pool))
                replay = _replay_examples(pool, int(round(tokens * r / (1.0 - r))), start)
                domain_tokens += tokens
                replay_tokens += sum(len(e.input_ids) for e in replay)
                # Interleaved, so replay is spread over the epoch rather than appended at the end.
                examples = _interleave(examples, replay)
            sink.write(pack(examples, kind, cfg, pad_id))
            del blocks[b]  # the block's records are done with
        entry = sink.close()
        stats = sink.stats
        out_splits[name] = {
            "kind": kind,
            "examples": stats.examples,
            "sequences": stats.sequences,
            "tokens": stats.tokens,
            "loss_tokens": stats.loss_tokens,
            "truncated": stats.truncated,
            "files": [entry] if entry else [],
        }
    replay_info = {}
    if r > 0:
        replay_info = {
            "domain_tokens": domain_tokens,
            "replay_tokens": replay_tokens,
            "achieved_fraction": replay_tokens / max(domain_tokens + replay_tokens, 1),
            "configured_fraction": r,
        }
    manifest = {
        "format": SHARD_FORMAT,
        "shard": index,
        "num_shards": n,
        "max_seq_len": cfg.preprocess.max_seq_len,
        "pad_token_id": pad_id,
        "splits": out_splits,
        "replay": replay_info,
    }
    storage.write_json(manifest_uri, manifest)  # last: the shard is visible only now
    log.info("shard %d: %s", index, {k: v["sequences"] for k, v in out_splits.items()})
    return manifest


def _interleave(a: list[Example], b: list[Example]) -> list[Example]:
    """Spread b evenly through a (deterministic)."""
    if not b:
        return a
    out: list[Example] = []
    step = (len(a) + len(b)) / len(b)
    next_b = step / 2
    ia = ib = 0
    for pos in range(len(a) + len(b)):
        if ib < len(b) and (pos >= next_b or ia >= len(a)):
            out.append(b[ib])
            ib += 1
            next_b += step
        else:
            out.append(a[ia])
            ia += 1
    return out


def gather_shards(cfg: RunConfig, work_dir: str, shard_manifests: list[str] | None = None) -> dict[str, Any]:
    """Merge the shard manifests into the dataset manifest; writes <work_dir>/data/dataset.json."""
    n = cfg.preprocess.num_shards
    uris = shard_manifests or [shard_manifest_uri(work_dir, i) for i in range(n)]
    shards = []
    for uri in uris:
        if not shard_is_complete(uri):
            raise PreprocessError(f"{uri}: shard missing or its files do not match their checksums")
        shards.append(storage.read_json(uri))
    shards.sort(key=lambda m: m["shard"])
    if [m["shard"] for m in shards] != list(range(n)):
        raise PreprocessError(f"expected shards 0..{n - 1}, got {[m['shard'] for m in shards]}")
    splits: dict[str, Any] = {}
    for m in shards:
        for name, s in m["splits"].items():
            agg = splits.setdefault(
                name,
                {
                    "kind": s["kind"],
                    "examples": 0,
                    "sequences": 0,
                    "tokens": 0,
                    "loss_tokens": 0,
                    "truncated": 0,
                    "files": [],
                },
            )
            for key in ("examples", "sequences", "tokens", "loss_tokens", "truncated"):
                agg[key] += s[key]
            agg["files"].extend(s["files"])
    seq_len = cfg.preprocess.max_seq_len
    for s in splits.values():
        s["padding_fraction"] = 1.0 - s["tokens"] / max(s["sequences"] * seq_len, 1)
    if not splits.get("train", {}).get("sequences"):
        raise PreprocessError(
            "no training sequences were produced: is the training data empty after the eval split?"
        )
    replay = [m["replay"] for m in shards if m.get("replay")]
    replay_summary = {}
    if replay:
        d = sum(r["domain_tokens"] for r in replay)
        g = sum(r["replay_tokens"] for r in replay)
        replay_summary = {
            "domain_tokens": d,
            "replay_tokens": g,
            "achieved_fraction": g / max(d + g, 1),
            "configured_fraction": cfg.preprocess.replay_fraction,
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "max_seq_len": seq_len,
        "pad_token_id": shards[0]["pad_token_id"],
        "num_shards": n,
        "splits": splits,
        "replay": replay_summary,
    }
    storage.write_json(dataset_manifest_uri(work_dir), manifest)
    return manifest


def dataset_manifest_uri(work_dir: str) -> str:
    return storage.join(work_dir, "data", "dataset.json")


def preprocess_all(cfg: RunConfig, work_dir: str) -> dict[str, Any]:
    """Every shard in this process, then gather (the library equivalent of the ParallelFor)."""
    for i in range(cfg.preprocess.num_shards):
        preprocess_shard(cfg, work_dir, i)
    return gather_shards(cfg, work_dir)
