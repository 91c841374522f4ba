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


# The files a Hugging Face tokenizer loads from; any one can be enough (tokenizer.json alone is a fast
# tokenizer, tokenizer.model a SentencePiece one, vocab.json with merges.txt a BPE one).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "*.tiktoken",
)


class NoTokenizerFiles(FileNotFoundError):
    """A model directory without any tokenizer file: what transformers would report as a missing
    sentencepiece or tiktoken package, though installing one would not help."""


def require_tokenizer_files(uri: str, path: Path) -> None:
    """NoTokenizerFiles naming what was looked for when the directory `path` (of `uri`) holds none."""
    if not path.is_dir() or any(next(path.glob(name), None) for name in TOKENIZER_FILES):
        return  # a missing directory is reported by whoever reads it
    raise NoTokenizerFiles(
        f"{uri} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}): set "
        "model.tokenizer_uri to a directory that has them (e.g. the original model's)"
    )


def load_tokenizer(uri: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer at `uri` (local directory or s3:// prefix): the generic fast tokenizer when its
    config names it (no torch import), else AutoTokenizer."""
    with metadata_dir(uri) as path:
        require_tokenizer_files(uri, path)
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
