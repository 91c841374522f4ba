"""The demo's tiny tokenizer, base model and datasets (`fulltune.demo.assets`)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from fulltune.demo import assets as demo

COMMON_WORDS = [
    "the",
    " the",
    " function",
    " return",
    " value",
    " file",
    " number",
    " string",
    " list",
    " name",
]


@pytest.fixture(scope="module")
def tokenizer(demo_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_assets.base_model_dir)


@pytest.fixture(scope="module")
def model(demo_assets):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_assets.base_model_dir)


def read_jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in Path(uri).read_text(encoding="utf-8").splitlines()]


# -- model and tokenizer ----------------------------------------------------------------------------------


def test_model_reloads_with_auto_classes(demo_assets, model, tokenizer):
    import torch

    assert (demo_assets.base_model_dir / "model.safetensors").is_file()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer) == demo.VOCAB_SIZE
    assert model.config.tie_word_embeddings
    assert model.config.max_position_embeddings >= demo.SEQ_LEN
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id

    prompt = tokenizer("The function returns", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= prompt["input_ids"].shape[1] + 4


def test_special_tokens(tokenizer):
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for marker in demo.CHAT_MARKERS:
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1, marker
    # GPT-2 style: nothing is added on encode; preprocessing appends eos between packed documents.
    assert (
        tokenizer("hello world")["input_ids"]
        == tokenizer("hello world", add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize("term", ["HbA1c", "eGFR", "NSTEMI"])
def test_clinical_terms_split_into_pieces(tokenizer, term):
    assert term in demo.DOMAIN_TERMS
    assert len(tokenizer.tokenize(term)) >= 3
    assert len(tokenizer.tokenize(" " + term)) >= 3


def test_every_domain_term_splits_but_common_words_do_not(demo_assets, tokenizer):
    assert demo_assets.domain_terms == demo.DOMAIN_TERMS
    pieces = {term: tokenizer.tokenize(term) for term in demo_assets.domain_terms}
    assert all(len(p) >= 3 for p in pieces.values()), pieces
    common = {word: tokenizer.tokenize(word) for word in COMMON_WORDS}
    assert all(1 <= len(p) <= 2 for p in common.values()), common


def test_decode_round_trips(tokenizer):
    text = "Troponin I 0.45 ng/mL, eGFR 42 mL/min/1.73m2 — the value is returned."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_renders_a_conversation(tokenizer):
    messages = [
        {"role": "system", "content": "You are a clinical assistant."},
        {"role": "user", "content": "What does NSTEMI mean?"},
        {"role": "assistant", "content": "A heart attack without ST elevation."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|system|>\nYou are a clinical assistant.<|end|>\n"
        "<|user|>\nWhat does NSTEMI mean?<|end|>\n"
        "<|assistant|>\nA heart attack without ST elevation.<|end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nWhat does NSTEMI mean?<|end|>\n<|assistant|>\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert ids.count(end_id) == 3


# -- datasets ------------------------------------------------------------------------------------------


def test_datasets_are_valid_jsonl(demo_assets):
    sizes = {"train_uri": demo.TRAIN_NOTES, "eval_uri": demo.EVAL_NOTES, "general_uri": demo.GENERAL_RECORDS}
    for attr, size in sizes.items():
        records = read_jsonl(getattr(demo_assets, attr))
        assert len(records) == size, attr
        assert all(set(r) == {"text"} and isinstance(r["text"], str) and r["text"].strip() for r in records)


def test_domain_data_uses_the_terms_and_eval_is_disjoint(demo_assets):
    train = [r["text"] for r in read_jsonl(demo_assets.train_uri)]
    eval_ = [r["text"] for r in read_jsonl(demo_assets.eval_uri)]
    assert not set(train) & set(eval_)
    assert len(set(train)) == len(train)
    for term in ["HbA1c", "eGFR", "NSTEMI", "troponin", "BNP", "LVEF", "metformin"]:
        assert sum(term in note for note in train) >= 100, term
    assert any(term in note for note in eval_ for term in demo.DOMAIN_TERMS)


def test_general_set_is_held_out_from_pretraining(demo_assets):
    corpora = demo.make_corpora()
    general = [r["text"] for r in read_jsonl(demo_assets.general_uri)]
    assert general == corpora.general
    assert not set(general) & set(corpora.pretrain)
    assert not any(term in text for text in general for term in ["HbA1c", "eGFR", "NSTEMI"])


def test_ckd_stage_follows_egfr():
    assert [demo._ckd_stage(e) for e in (95, 60, 59, 45, 44, 30, 29, 15, 14)] == [
        "1", "2", "3a", "3a", "3b", "3b", "4", "4", "5",
    ]  # fmt: skip


def test_tokenizer_and_data_are_deterministic(demo_assets, tmp_path):
    demo.build_tokenizer_and_data(tmp_path / "a")
    demo.build_tokenizer_and_data(tmp_path / "b")
    files = ["data/train.jsonl", "data/eval.jsonl", "data/general.jsonl", "base_model/tokenizer.json"]
    for rel in files:
        first = (tmp_path / "a" / rel).read_bytes()
        assert first == (tmp_path / "b" / rel).read_bytes(), rel
        assert first == (demo_assets.root / rel).read_bytes(), rel


# -- the pre-trained base model ---------------------------------------------------------------------------


def test_base_model_was_pretrained(demo_assets, model, tokenizer):
    import torch
    from transformers import LlamaForCausalLM

    general = demo.pack(tokenizer, [r["text"] for r in read_jsonl(demo_assets.general_uri)])
    assert len(general) >= 10
    trained = demo.mean_loss(model, general)
    torch.manual_seed(0)
    untrained = demo.mean_loss(LlamaForCausalLM(model.config), general)
    assert trained < untrained - 1.5, (trained, untrained)

    info = json.loads((demo_assets.root / "build_info.json").read_text())
    assert info["general_loss_after"] == pytest.approx(trained, abs=1e-3)


# -- the cache -------------------------------------------------------------------------------------------


def test_second_call_uses_the_cache(demo_assets):
    start = time.perf_counter()
    again = demo.build_demo_assets(demo_assets.root.parent)
    assert time.perf_counter() - start < 1.0
    assert again == demo_assets
    assert (demo_assets.root / demo.COMPLETE_MARKER).is_file()
    assert demo_assets.root.name == demo.CACHE_KEY


@pytest.fixture
def fake_build(monkeypatch):
    """Replace the slow build by one that writes a file naming the build; counts the builds."""
    calls: list[int] = []
    lock = threading.Lock()

    def build(out_dir: Path) -> dict:
        with lock:
            calls.append(len(calls))
            n = len(calls)
        time.sleep(0.05)
        (out_dir / "which").write_text(str(n))
        return {"timings": {}}

    monkeypatch.setattr(demo, "_build", build)
    return calls


def test_build_publishes_atomically_and_force_replaces(tmp_path, fake_build):
    first = demo.build_demo_assets(tmp_path)
    assert (first.root / "which").read_text() == "1"
    assert demo.build_demo_assets(tmp_path) == first
    assert len(fake_build) == 1
    forced = demo.build_demo_assets(tmp_path, force=True)
    assert forced == first
    assert (forced.root / "which").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.CACHE_KEY]  # no temporary dirs left


def test_incomplete_cache_is_rebuilt(tmp_path, fake_build):
    (tmp_path / demo.CACHE_KEY).mkdir()
    (tmp_path / demo.CACHE_KEY / "junk").write_text("partial copy")
    assets = demo.build_demo_assets(tmp_path)
    assert (assets.root / demo.COMPLETE_MARKER).is_file()
    assert not (assets.root / "junk").exists()


def test_concurrent_builders_agree(tmp_path, fake_build):
    results: list[demo.DemoAssets] = []
    errors: list[Exception] = []

    def worker() -> None:
        try:
            results.append(demo.build_demo_assets(tmp_path))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4 and len(set(map(str, results))) == 1
    assert (results[0].root / "which").read_text() in {"1", "2", "3", "4"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.CACHE_KEY]
