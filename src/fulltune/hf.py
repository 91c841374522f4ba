"""Reading a Hugging Face model directory's small files — config and tokenizer — without its weights.

A tokenizer or config usually lives beside many GiB of weights. From s3:// only the top-level files
that are not weights are fetched; local directories are used in place.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fulltune import storage

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


@contextmanager
def metadata_dir(uri: str) -> Iterator[Path]:
    """A local directory with the model directory's top-level non-weight files (config, tokenizer)."""
    if not storage.is_s3(uri):
        with storage.local_dir(uri) as path:
            yield path
        return
    prefix = uri.rstrip("/") + "/"
    files = [f for f in storage.list_files(uri) if "/" not in f[len(prefix) :]]
    files = [f for f in files if not f.endswith(WEIGHT_SUFFIXES)]
    if not files:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
    with tempfile.TemporaryDirectory(prefix="fulltune-meta-") as tmp:
        for f in files:
            storage.download_file(f, Path(tmp, storage.basename(f)))
        yield Path(tmp)


def load_tokenizer(uri: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer at `uri` (local directory or s3:// prefix), via AutoTokenizer."""
    from transformers import AutoTokenizer

    with metadata_dir(uri) as path:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def load_config(uri: str, trust_remote_code: bool = False) -> Any:
    """The model's configuration object (AutoConfig), weights never read."""
    from transformers import AutoConfig

    with metadata_dir(uri) as path:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
