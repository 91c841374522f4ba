"""Reading a Hugging Face model directory's small files — config and tokenizer — without its weights.

A tokenizer or config usually lives beside many GiB of weights. From s3:// only the top-level files
that are not weights are fetched; local directories are used in place.
"""

from __future__ import annotations

import importlib.util
import json
import re
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


class TokenizerFilesError(Exception):
    """The tokenizer files themselves are wrong; the message names the file and the fix."""


class NoTokenizerFiles(TokenizerFilesError, FileNotFoundError):
    """A model directory without any tokenizer file: what transformers would report as a missing
    sentencepiece or tiktoken package, though installing one would not help."""


class BrokenTokenizerFiles(TokenizerFilesError, ValueError):
    """A tokenizer file that does not parse, settings without the vocabulary they belong to, or a
    vocabulary this installation cannot read."""


# Where a SentencePiece model is saved (tokenizer.model may also be a tiktoken file: Llama 3's).
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/=]+ [0-9]+")  # a tiktoken file's lines: base64 token, rank
# The files that hold a vocabulary, as opposed to tokenizer_config.json's settings for one.
VOCABULARY_FILES = tuple(n for n in TOKENIZER_FILES if n != "tokenizer_config.json")
# The tokenizer's JSON files: transformers reports one that does not parse without naming it.
TOKENIZER_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


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
        try:
            return _load_tokenizer(path, trust_remote_code)
        except Exception as exc:
            why = _broken_tokenizer_files(uri, path)
            if why:
                raise BrokenTokenizerFiles(why) from exc
            raise


def _load_tokenizer(path: Path, trust_remote_code: bool) -> Any:
    if _tokenizer_class(path) in GENERIC_TOKENIZER_CLASSES and (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def _broken_tokenizer_files(uri: str, path: Path) -> str | None:
    """Why the tokenizer in `path` (of `uri`) failed to load, naming the file, where the files show
    it; looked at only after a failure, so a tokenizer that loads is never second-guessed."""
    for name in TOKENIZER_JSON_FILES:
        try:
            json.loads((path / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (ValueError, UnicodeDecodeError) as exc:
            return (
                f"{storage.join(uri, name)} is not valid JSON ({exc}): download or save the tokenizer again"
            )
    if not any(next(path.glob(name), None) for name in VOCABULARY_FILES):
        return (
            f"{uri} has tokenizer_config.json but no vocabulary file (looked for {', '.join(VOCABULARY_FILES)}), "
            "whatever transformers says about sentencepiece or tiktoken: copy the tokenizer's other files "
            "beside it, or set model.tokenizer_uri to a directory that has them"
        )
    return _unreadable_sentencepiece(uri, path)


def _unreadable_sentencepiece(uri: str, path: Path) -> str | None:
    """A vocabulary only as a SentencePiece model, without the sentencepiece package to read it:
    transformers then tries the file as tiktoken's and advises installing tiktoken, which would
    not help."""
    if (path / "tokenizer.json").is_file() or importlib.util.find_spec("sentencepiece") is not None:
        return None
    for name in SENTENCEPIECE_FILES:
        if (path / name).is_file() and not _is_tiktoken(path / name):
            return (
                f"{storage.join(uri, name)} is a SentencePiece model with no tokenizer.json beside it, and "
                "this installation has no sentencepiece package to read it (installing tiktoken would not "
                "help): save the tokenizer where sentencepiece is installed (AutoTokenizer.from_pretrained "
                "then save_pretrained writes tokenizer.json) and copy tokenizer.json beside it"
            )
    return None


def _is_tiktoken(file: Path) -> bool:
    with file.open("rb") as f:
        return bool(_TIKTOKEN_LINE.fullmatch(f.readline(4096).rstrip(b"\r\n")))


def _tokenizer_class(path: Path) -> str | None:
    try:
        return json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


class BadModelConfig(ValueError):
    """A config.json that parses but has values transformers refuses (text for a number, null for
    vocab_size, zero attention heads); the message names the file and the field."""


def load_config(uri: str, trust_remote_code: bool = False) -> Any:
    """The model's configuration object (AutoConfig), weights never read.

    Raises:
        BadModelConfig: transformers refuses a value of config.json. It says so with a TypeError,
            a ZeroDivisionError or huggingface_hub's StrictDataclassError, none a ValueError, so
            callers that catch transformers' "cannot read this" (ValueError, OSError) would not.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    with metadata_dir(uri) as path:
        try:
            return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (StrictDataclassError, TypeError, ArithmeticError) as exc:
            said = " ".join(str(exc).split())  # one line: the validator's message spans several
            raise BadModelConfig(f"{storage.join(uri, 'config.json')}: {type(exc).__name__}: {said}") from exc
