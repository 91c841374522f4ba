"""Tiny models for the tests: one Llama shape, its word-level tokenizer, seeded weight noise, and the
"files only" model directory the registry copies without ever loading.

Tests whose numbers depend on the exact weights (the evaluate tests) rely on these builders being
deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# A Llama of a few thousand parameters: one layer, grouped-query attention (4 heads, 2 KV heads),
# ids 0-2 for pad/bos/eos as the word tokenizer below numbers them.
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# The word tokenizer's vocabulary after its four special tokens.
WORDS = (
    "the a patient doctor takes gives dose of metformin insulin daily twice kidney liver heart "
    "is has low high normal blood sugar pressure what which answer yes no paris rome city capital"
).split()


def tiny_llama_config(**overrides: Any):
    """TINY_LLAMA as a LlamaConfig, with the sizes a test needs instead."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, **overrides})


def word_tokenizer():
    """A word-level tokenizer whose ids fit TINY_LLAMA's vocabulary (pad 0, bos 1, eos 2, unk 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    assert len(vocab) <= TINY_LLAMA["vocab_size"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def perturb_weights(model, *, seed: int, scale: float, relative: bool = False) -> None:
    """Add seeded Gaussian noise to every weight: `scale` absolute, or times each tensor's own
    standard deviation when `relative`. Tensors are visited in parameter order, so the noise is
    the same for the same seed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=gen)
            if relative:
                noise = noise * param.std()
            param.add_(noise * scale)


def save_tiny_llama(path: Path, *, seed: int = 0, perturb: float = 0.0, config=None, tokenizer=None) -> Path:
    """A random TINY_LLAMA (or `config`) saved as safetensors with `tokenizer` (the word tokenizer
    by default) beside it. The initial weights always come from torch seed 0, so two models differ
    only by the noise of `perturb` (seeded with `seed`); perturb 0 gives the same files every time."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config or tiny_llama_config())
    if perturb:
        perturb_weights(model, seed=seed, scale=perturb)
    model.save_pretrained(path, safe_serialization=True)
    (tokenizer or word_tokenizer()).save_pretrained(path)
    return path


def fake_model_dir(path: Path, *, weights_bytes: int = 16 * 1024) -> Path:
    """A model directory as the registry sees it, without building a model: a config, weights that
    are only bytes, and tokenizer files."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "model.safetensors").write_bytes(bytes(range(256)) * (weights_bytes // 256))
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return path
