"""Reading a Hugging Face model directory's small files — config and tokenizer — without its weights.

A tokenizer or config usually lives beside many GiB of weights. From s3:// only the top-level files
that are not weights are fetched; local directories are used in place.
"""

from __future__ import annotations

import json
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


# tokenizer_config.json classes that mean "the generic tokenizers-library tokenizer": AutoTokenizer
# would resolve them to PreTrainedTokenizerFast anyway, but only after importing torch (seconds per
# process, paid by every preprocess shard); loading the class directly skips that.
GENERIC_TOKENIZER_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})


def load_tokenizer(uri: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer at `uri` (local directory or s3:// prefix): the generic fast tokenizer when its
    config names it (no torch import), else AutoTokenizer."""
    with metadata_dir(uri) as path:
        if _tokenizer_class(path) in GENERIC_TOKENIZER_CLASSES and (path / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def _tokenizer_class(path: Path) -> str | None:
    try:
        return json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def load_config(uri: str, trust_remote_code: bool = False) -> Any:
    """The model's configuration object (AutoConfig), weights never read."""
    from transformers import AutoConfig

    with metadata_dir(uri) as path:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
