"""fulltune.hf: tokenizers load without importing torch where AutoTokenizer would not need it."""

from __future__ import annotations

import subprocess
import sys

from fulltune.hf import load_tokenizer

TEXTS = ["HbA1c 7.2% and eGFR 48 mL/min; NSTEMI ruled out.", "The function returns None.\n\n  indented"]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Stage of CKD with eGFR 48?"},
    {"role": "assistant", "content": "G3a."},
]


def test_the_generic_fast_tokenizer_matches_autotokenizer(demo_assets):
    from transformers import AutoTokenizer

    ours = load_tokenizer(str(demo_assets.base_model_dir))
    auto = AutoTokenizer.from_pretrained(demo_assets.base_model_dir)
    assert type(ours) is type(auto)
    assert len(ours) == len(auto)
    assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == (
        auto.eos_token_id,
        auto.pad_token_id,
        auto.bos_token_id,
    )
    for text in TEXTS:
        assert ours(text)["input_ids"] == auto(text)["input_ids"]
    assert ours.apply_chat_template(CHAT, tokenize=False) == auto.apply_chat_template(CHAT, tokenize=False)


def test_loading_the_tokenizer_does_not_import_torch(demo_assets):
    """Every preprocess shard loads the tokenizer; importing torch cost seconds per process."""
    code = (
        "import sys; from fulltune.hf import load_tokenizer; "
        f"t = load_tokenizer({str(demo_assets.base_model_dir)!r}); t('x'); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
