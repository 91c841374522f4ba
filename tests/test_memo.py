"""Memoised encoding gives exactly the tokenizer's ids, and is used only where that is provable."""

from __future__ import annotations

import logging
import os
import random
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from fulltune.tokenizer import memo

CORPUS = [
    "The patient's HbA1c was 7.2% on 2024-03-01; eGFR 45 mL/min.",
    "Metformin 500 mg twice daily, we'll review in 3 months.",
    "def main():\n    return 0\n\n\nif x  ==  1:\n\tpass",
    "Ünïcödé naïve café — 東京 🙂 ١٢٣ I'LL SEE THEY'RE",
    "  leading and trailing spaces  ",
]


def train(pre, normalizer=None, vocab: int = 400) -> Tokenizer:
    """A small byte-level BPE trained here, deterministic, with the added tokens real ones carry."""
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizer
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 20, trainer)
    tk.add_tokens([AddedToken("<mask>", lstrip=True), AddedToken("foo bar")])
    return tk


def gpt2_pre():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def split_pre(pattern: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def llama3_pre():
    return split_pre(memo.LLAMA3_PATTERN)


def qwen2_pre():
    return split_pre(memo.QWEN2_PATTERN)


def gpt2() -> Tokenizer:
    return train(gpt2_pre())


def llama3() -> Tokenizer:
    return train(llama3_pre())


def qwen2() -> Tokenizer:
    return train(qwen2_pre(), normalizers.NFC())


FLAVOURS = {"gpt2": gpt2, "llama3": llama3, "qwen2": qwen2}


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def backend(request) -> Tokenizer:
    return FLAVOURS[request.param]()


def plain(tk: Tokenizer, texts: list[str], end: tuple[int, ...] = ()) -> list[list[int]]:
    return [e.ids + list(end) for e in tk.encode_batch_fast(texts, add_special_tokens=False)]


def split(flat, lengths) -> list[list[int]]:
    out, at = [], 0
    for n in lengths.tolist():
        out.append(flat[at : at + n].tolist())
        at += n
    return out


# Characters that stress the cut rule: every kind of whitespace (incl. ones only Python calls
# whitespace), contractions, digits, combining marks, CJK, emoji and pieces of added tokens.
TRICKY = list(" \n\t\r\x0b\x0c\xa0\u3000\u2028\x1c\x85\u200b'’-.,;:!?()<|>/")
ATOMS = (
    TRICKY
    + list("aZé東🙂1٢")
    + ["\u0301", "'s", "'LL", " foo", "bar", "<mask>", "foo bar", "<|endoftext|>", "  "]
)
text_strategy = st.lists(
    st.one_of(
        st.sampled_from(ATOMS), st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=8)
    ),
    max_size=40,
).map("".join)


@settings(
    max_examples=int(os.environ.get("MEMO_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(text_strategy, min_size=1, max_size=12))
def test_memoised_ids_equal_the_tokenizers_on_any_text(backend, texts):
    m = memo.MemoEncoder(backend, capacity=64, verify_docs=0, join_chars=32)
    for _ in range(2):  # the second time most pieces come from the memo
        flat, lengths = m.encode(texts, end=(0,))
        assert split(flat, lengths) == plain(backend, texts, (0,))
    assert not m.disabled


@settings(max_examples=int(os.environ.get("MEMO_EXAMPLES", "150")), deadline=None)
@given(text_strategy)
@example("end.\n\n    Next, 'tis 12345 x  y\t z \u3000w")
@example(" lead  and trail ")
def test_every_cut_is_where_the_pre_tokenizer_starts_a_piece(text):
    """The cut rule on its own: each cut (a space the next piece starts with) is the start of a
    pre-token for every accepted pattern, whatever the vocabulary."""
    cuts, at = [], 0
    for i, piece in enumerate(memo.pieces(text)):
        if i:
            assert text[at] == " "  # the only character a cut removes
            cuts.append(at)
            at += 1
        at += len(piece)
    assert at == len(text)
    for make in (gpt2_pre, llama3_pre, qwen2_pre):
        starts = {start for _, (start, _) in make().pre_tokenize_str(text)}
        assert set(cuts) <= starts


def test_memo_is_reused_and_exact_on_repetitive_text(backend):
    rng = random.Random(0)
    words = "the patient was seen today for follow up of type 2 diabetes; HbA1c 7.2% (was 8.1%).".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(300)]
    texts += ["line one\nline two\n\n  indented", "<|endoftext|> starts", "ends with <mask>"]
    texts += ["a piece longer than the memo keeps: " + "y" * 100 + " after"] * 3
    m = memo.MemoEncoder(backend)
    got = []
    for i in range(0, len(texts), 50):
        got += split(*m.encode(texts[i : i + 50]))
    assert got == plain(backend, texts)
    assert m.verified and not m.disabled and m.batches_whole == 0
    assert m.pieces_encoded < 0.05 * m.pieces_seen  # each distinct word encoded about once


def test_text_without_repeats_goes_to_the_tokenizer_whole(backend):
    rng = random.Random(1)
    texts = [
        " ".join("".join(rng.choice(string.ascii_letters) for _ in range(10)) for _ in range(50))
        for _ in range(40)
    ]
    m = memo.MemoEncoder(backend)
    got = []
    for i in range(0, len(texts), 10):
        got += split(*m.encode(texts[i : i + 10]))
    assert got == plain(backend, texts)
    assert m.batches_whole >= 1


def test_the_guard_falls_back_to_the_tokenizer_when_the_memo_would_differ(caplog):
    tk = gpt2()
    m = memo.MemoEncoder(tk)
    # A normalizer that is not local to a piece, installed behind the encoder's back: memoised
    # pieces would each get the prefix, the tokenizer puts it only at the start of a text.
    tk.normalizer = normalizers.Prepend("^")
    texts = ["alpha beta gamma", "beta gamma delta"] * 10
    with caplog.at_level(logging.WARNING, logger="fulltune.tokenizer.memo"):
        flat, lengths = m.encode(texts)
    assert split(flat, lengths) == plain(tk, texts)
    assert m.disabled
    assert "differs from the tokenizer's" in caplog.text
    assert split(*m.encode(texts)) == plain(tk, texts)  # and from then on


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: train(pre_tokenizers.ByteLevel(add_prefix_space=True)), "pre-tokenizer"),
        (lambda: train(pre_tokenizers.Metaspace()), "pre-tokenizer"),
        (
            lambda: train(pre_tokenizers.ByteLevel(add_prefix_space=False), normalizers.Lowercase()),
            "normalizer",
        ),
        (
            lambda: train(
                pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Split(Regex(r"\w+|\s"), behavior="isolated"),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                    ]
                )
            ),
            "pre-tokenizer",
        ),
        (lambda: Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), "model"),
    ],
)
def test_tokenizers_outside_the_rules_are_refused_with_the_reason(make, reason):
    tk = make()
    why = memo.unsupported(tk)
    assert why is not None and why.startswith(reason)
    with pytest.raises(ValueError, match="not exact for this tokenizer"):
        memo.MemoEncoder(tk)


def test_known_byte_level_tokenizers_are_accepted(backend):
    assert memo.unsupported(backend) is None


def test_bpe_dropout_is_refused():
    tk = gpt2()
    tk.model.dropout = 0.1
    assert memo.unsupported(tk).startswith("model")
