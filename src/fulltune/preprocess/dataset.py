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
      "replay": {"domain_tokens", "replay_tokens", "achieved_fraction", "configured_fraction"},
      ...
    }

`examples` counts the documents read; `truncated` and `dropped` count the prompt/completion and
chat examples longer than `max_seq_len` that were cut or left out (`preprocess.overlong`).
"""

from __future__ import annotations

import io
from typing import Any

from fulltune import storage

MANIFEST_FORMAT = "fulltune.dataset/v1"
# The dataset's splits, by the names the manifest and the shard files use.
TRAIN, DOMAIN_EVAL, GENERAL_EVAL = "train", "domain_eval", "general_eval"
IGNORE_INDEX = -100


class DatasetError(ValueError):
    pass


def load_manifest(uri_or_manifest: str | dict[str, Any]) -> dict[str, Any]:
    manifest = storage.read_json(uri_or_manifest) if isinstance(uri_or_manifest, str) else uri_or_manifest
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"not a fulltune dataset manifest (format={manifest.get('format')!r})")
    return manifest


def read_table(uri: str):
    import pyarrow.parquet as pq

    if storage.is_s3(uri):
        return pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    return pq.read_table(uri)


def load_split(manifest: str | dict[str, Any], split: str, *, limit: int | None = None) -> dict[str, Any]:
    """The split's sequences as int64 tensors: input_ids, labels, attention_mask (and position_ids), each [N, L].

    Files are read in manifest order, so the result is the same on every rank and every run.
    """
    import numpy as np
    import torch

    manifest = load_manifest(manifest)
    if split not in manifest["splits"]:
        raise DatasetError(f"split {split!r} not in the dataset (have: {sorted(manifest['splits'])})")
    columns: dict[str, list[Any]] = {"input_ids": [], "labels": [], "attention_mask": []}
    count = 0
    for entry in manifest["splits"][split]["files"]:
        if limit is not None and count >= limit:
            break
        table = read_table(entry["uri"])
        if "position_ids" in table.column_names:
            columns.setdefault("position_ids", [])
        for name in columns:
            col = table.column(name).combine_chunks()
            values = col.flatten().to_numpy(zero_copy_only=False)
            columns[name].append(values.reshape(len(col), -1))
        count += table.num_rows
    seq_len = manifest["max_seq_len"]
    out = {}
    for name, parts in columns.items():
        arr = np.concatenate(parts, axis=0) if parts else np.zeros((0, seq_len), dtype=np.int64)
        if limit is not None:
            arr = arr[:limit]
        out[name] = torch.from_numpy(arr.astype(np.int64))
    return out
