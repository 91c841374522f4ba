"""The preprocessed dataset: Parquet shards of fixed-length sequences, and the manifest naming them.

Each shard file has the columns `input_ids` and `labels` (list<int32>, all `max_seq_len` long;
`labels` is -100 where no loss is taken: prompts, padding), `attention_mask` (list<int8>) and
`position_ids` (list<int32>: restarting at 0 at each document start within a packed sequence, so
attention can be reset per document where the model supports it).
The dataset manifest (written by `gather_shards`) is what `train` and `evaluate` consume:

    {
      "format": "fulltune.dataset/v1",
      "max_seq_len": 1024,
      "pad_token_id": 0,
      "splits": {
        "train":        {"kind": "text", "examples": E, "sequences": N, "tokens": T, "loss_tokens": L,
                         "truncated": 0, "dropped": 0, "padding_fraction": 0.001,
                         "files": [{"uri", "sequences", "sha256", "size"}]},
        "domain_eval":  {...},
        "general_eval": {...}     # present when a general set is configured
      },
      "replay": {"domain_tokens", "replay_tokens", "achieved_fraction", "configured_fraction",
                 "domain_loss_tokens", "replay_loss_tokens", "achieved_loss_fraction", "pool_tokens"},
      "warnings": ["..."],        # a general_eval split too small to measure forgetting, a replay
                                  # pool repeated many times an epoch, no general set at all
      ...
    }

`examples` counts the documents read; `truncated` and `dropped` count the prompt/completion and
chat examples longer than `max_seq_len` that were cut or left out (`preprocess.overlong`; a cut that
would leave no loss token drops the example).
"""

from __future__ import annotations

import io
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fulltune import storage

MANIFEST_FORMAT = "fulltune.dataset/v1"
# The dataset's splits, by the names the manifest and the shard files use.
TRAIN, DOMAIN_EVAL, GENERAL_EVAL = "train", "domain_eval", "general_eval"
IGNORE_INDEX = -100

# The forgetting figures are bootstrap intervals over the general_eval split's sequences
# (evaluate.loss): below a few dozen the resamples take few distinct values and the percentile
# interval is far narrower than the real uncertainty, so a gate on it passes or fails on noise.
MIN_GENERAL_EVAL_SEQUENCES = 50
# Repeating data up to ~4 times trains about as well as fresh data, and by ~16 repeats a further
# pass is worth almost nothing (Muennighoff et al. 2023, "Scaling Data-Constrained Language
# Models"): the model then memorises the replay pool, a poor stand-in for the general ability it
# should keep. Warned above 16, where it is clearly so (a small demo pool replayed ~5 times is not).
MAX_REPLAY_REPEATS = 16.0


class DatasetError(ValueError):
    pass


class _Record(BaseModel):
    # A newer fulltune may add keys: readers ignore them rather than refuse the dataset.
    model_config = ConfigDict(extra="ignore")


class ShardFile(_Record):
    """One Parquet file of a split, with what verifies it."""

    uri: str
    sequences: int
    sha256: str
    size: int


class SplitSummary(_Record):
    """One split's files and counts. Counts an earlier fulltune did not write read as 0."""

    kind: str = "text"
    examples: int = 0
    sequences: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0  # over-long prompt/completion and chat examples cut to max_seq_len
    dropped: int = 0  # ... and left out (`preprocess.overlong`)
    padding_fraction: float = 0.0
    files: list[ShardFile] = []


class ReplaySummary(_Record):
    """Replay's share of the training split: of its tokens (what `replay_fraction` sets) and of its
    loss tokens, which is replay's share of the gradient (the loss is a mean over loss tokens): on
    prompt/completion and chat data, whose prompts carry no loss, the second is the larger."""

    domain_tokens: int
    replay_tokens: int
    achieved_fraction: float
    configured_fraction: float
    domain_loss_tokens: int = 0  # 0 and None: written by an earlier fulltune
    replay_loss_tokens: int = 0
    achieved_loss_fraction: float | None = None
    pool_tokens: int = 0  # the replay pool's tokens (the general set less general_eval); 0: not recorded

    @property
    def repeats(self) -> float:
        """How many times each pool token is replayed over an epoch; 0 when the pool is not recorded."""
        return self.replay_tokens / self.pool_tokens if self.pool_tokens else 0.0


class DatasetManifest(_Record):
    """The dataset manifest (see the module docstring): what `train` and `evaluate` read."""

    format: Literal["fulltune.dataset/v1"] = MANIFEST_FORMAT
    max_seq_len: int
    pad_token_id: int | None = None
    num_shards: int | None = None
    splits: dict[str, SplitSummary]
    replay: ReplaySummary | None = None  # written as {} when nothing was replayed
    # What the evaluation and replay this dataset allows cannot do (`gather_shards`), in words.
    warnings: list[str] = []

    @field_validator("replay", mode="before")
    @classmethod
    def _no_replay(cls, value: Any) -> Any:
        return value or None

    def split(self, name: str) -> SplitSummary:
        if name not in self.splits:
            raise DatasetError(f"split {name!r} not in the dataset (have: {sorted(self.splits)})")
        return self.splits[name]

    def sequences(self, name: str) -> int:
        """Sequences in split `name`; 0 when the dataset has no such split."""
        return self.splits[name].sequences if name in self.splits else 0

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["replay"] = data["replay"] or {}
        return data


def load_manifest(manifest: str | dict[str, Any] | DatasetManifest) -> DatasetManifest:
    """The manifest at a URI, or given as a mapping; DatasetError when it is not one."""
    if isinstance(manifest, DatasetManifest):
        return manifest
    data = storage.read_json(manifest) if isinstance(manifest, str) else manifest
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"not a fulltune dataset manifest (format={found!r})")
    try:
        return DatasetManifest.model_validate(data)
    except ValidationError as exc:
        where = manifest if isinstance(manifest, str) else "dataset manifest"
        raise DatasetError(f"{where}: {exc}") from None


def read_table(uri: str):
    import pyarrow.parquet as pq

    if storage.is_s3(uri):
        return pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    return pq.read_table(uri)


def load_split(
    manifest: str | dict[str, Any] | DatasetManifest,
    split: str,
    *,
    limit: int | None = None,
    positions: bool = True,
) -> dict[str, Any]:
    """The split's sequences as int64 tensors: input_ids, labels, attention_mask (and position_ids,
    when stored and `positions`), each [N, L]. A model given the position ids (`model_inputs`) attends
    within each packed document only; without them, across the whole sequence.

    Files are read in manifest order, so the result is the same on every rank and every run. With
    `limit` below the split's size, that many sequences spread evenly over the whole split: the
    first ones would all come from the first shard, i.e. the first files (in a data window, its
    first days), and an evaluation capped so would judge the model on a corner of the set.
    """
    import numpy as np
    import torch

    manifest = load_manifest(manifest)
    columns: dict[str, list[Any]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for entry in manifest.split(split).files:
        table = read_table(entry.uri)
        if positions and "position_ids" in table.column_names:
            columns.setdefault("position_ids", [])
        for name in columns:
            col = table.column(name).combine_chunks()
            values = col.flatten().to_numpy(zero_copy_only=False)
            columns[name].append(values.reshape(len(col), -1))
    seq_len = manifest.max_seq_len
    out = {}
    for name, parts in columns.items():
        arr = np.concatenate(parts, axis=0) if parts else np.zeros((0, seq_len), dtype=np.int64)
        if limit is not None and limit < len(arr):
            arr = arr[spread(len(arr), limit)]
        out[name] = torch.from_numpy(arr.astype(np.int64))
    return out


def spread(total: int, count: int):
    """`count` row indices of `total`, evenly spaced from the first to the last, in order."""
    import numpy as np

    return np.linspace(0, total - 1, count).round().astype(np.int64)


def model_inputs(rows: dict[str, Any]) -> dict[str, Any]:
    """The keyword inputs of a causal LM for `rows` of a loaded split (or a slice of it).

    With position ids (restarting at each packed document): the ids and the position ids and no
    attention mask, from which transformers builds the mask in which each document attends only to
    itself (with flash_attention_2, variable-length attention). Rows are right-padded, so no real
    token sees padding without a mask. Without them: the attention mask, positions running across
    the row. Call the model with `use_cache=False` as well: transformers reads packed documents from
    the position ids only when no key/value cache is made, and a loss never needs one.
    """
    if "position_ids" in rows:
        return {"input_ids": rows["input_ids"], "position_ids": rows["position_ids"]}
    return {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}
