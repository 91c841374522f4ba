"""check_tokenizer on a tiny byte-level BPE tokenizer built here (no hub, no weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fulltune.config import RunConfig
from fulltune.tokenizer.check import TokenizerCheckError, check_tokenizer, reservoir, word_pieces

CORPUS = [
    "hello world the patient has diabetes and high glucose",
    "the patient was treated for diabetes with insulin",
    "hello hello world world the the patient patient",
] * 40
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% if m.role == 'assistant' %}</s>{% endif %}{% endfor %}"
)


def build_tokenizer(
    path: Path,
    *,
    pad: str | None = "<pad>",
    embedding_rows: int | None = None,
    chat_template: str | None = None,
    bos_lead: bool = False,
) -> Path:
    """A byte-level BPE tokenizer trained on CORPUS, with a tiny Llama (config and weights) beside it;
    with `bos_lead` it puts <s> before every text it is asked to add special tokens to, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos_lead:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token=pad)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    save_model(
        path,
        LlamaConfig(
            vocab_size=embedding_rows or len(fast),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
        ),
    )
    return path


def save_model(path: Path, config) -> None:
    """The model's config and (random) weights: check_tokenizer checks the model files too."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(model: Path, train: Path, **sections: dict[str, Any]) -> RunConfig:
    data = {"train_uri": str(train), **sections.pop("data", {})}
    return RunConfig.from_dict({"model": {"base_model_uri": str(model)}, "data": data, **sections})


def checks(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["name"]: (c["status"], c["message"]) for c in report["checks"]}


def test_clean_tokenizer_passes_and_writes_reports(tokenizer_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in CORPUS[:3]])
    report = check_tokenizer(make_cfg(tokenizer_dir, train), tmp_path / "out")

    assert report["passed"] is True
    got = checks(report)
    assert got["eos_token"][0] == "ok" and got["pad_token"][0] == "ok" and got["embedding"][0] == "ok"
    assert got["roundtrip"][0] == "ok" and report["roundtrip"]["rate"] == 1.0
    assert report["unk"] is None  # byte-level: no unk token
    assert report["model"]["embedding_rows"] == report["tokenizer"]["size"]
    metrics = report["metrics"]
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics["errors"] == 0 and metrics["truncation_rate"] == 0.0
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    assert '<p class="banner pass" role="status">PASSED' in (tmp_path / "out" / "report.html").read_text()


def test_vocab_larger_than_embedding_fails(tmp_path):
    model = build_tokenizer(tmp_path / "tok", embedding_rows=100)
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello world"}])
    with pytest.raises(TokenizerCheckError) as info:
        check_tokenizer(make_cfg(model, train), tmp_path / "out")

    message = str(info.value)
    assert message.splitlines()[0] == "check_tokenizer failed: 1 check(s): embedding"
    assert "but the model's embedding has 100 rows" in message
    report = json.loads((tmp_path / "out" / "report.json").read_text())  # written before raising
    assert report["passed"] is False and checks(report)["embedding"][0] == "error"
    page = (tmp_path / "out" / "report.html").read_text()
    assert '<p class="banner fail" role="status">FAILED — 1 check(s): embedding</p>' in page


def test_an_id_past_the_embedding_is_refused_though_the_tokenizer_has_fewer_tokens_than_rows(tmp_path):
    """A vocabulary with a hole (a special token placed at a high id): len(tokenizer) fits the
    embedding, the token's id does not; the check compared the count and passed it."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel({**vocab, "<|tool|>": 100}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("</s>", special=True), AddedToken("<|tool|>", special=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    model = tmp_path / "model"
    fast.save_pretrained(model)
    rows = len(fast)  # 5 tokens, ids up to 100
    save_model(
        model, LlamaConfig(vocab_size=rows, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    )
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello world"}])
    with pytest.raises(TokenizerCheckError) as info:
        check_tokenizer(make_cfg(model, train), tmp_path / "out")
    assert (
        f"embedding: the tokenizer has {rows} tokens but the model's embedding has {rows} rows: 1 id(s) would "
        "index past it, up to 100: '<|tool|>' (100). Use the model's own tokenizer, or resize the embeddings first."
    ) in str(info.value)


def test_sequences_longer_than_the_models_context_are_refused_naming_both_lengths(tokenizer_dir, tmp_path):
    """The tiny Llama was trained to 2048 positions (LlamaConfig's default max_position_embeddings)."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello world"}])
    fits = check_tokenizer(make_cfg(tokenizer_dir, train, preprocess={"max_seq_len": 2048}), tmp_path / "ok")
    assert checks(fits)["context_length"][0] == "ok" and fits["model"]["context_length"] == 2048
    too_long = make_cfg(tokenizer_dir, train, preprocess={"max_seq_len": 4096})
    with pytest.raises(TokenizerCheckError) as info:
        check_tokenizer(too_long, tmp_path / "out")
    message = str(info.value)
    assert message.splitlines()[0] == "check_tokenizer failed: 1 check(s): context_length"
    assert (
        f"preprocess.max_seq_len 4096 is longer than the model's context, max_position_embeddings 2048 in "
        f"{tokenizer_dir}/config.json" in message
    )
    assert "Set preprocess.max_seq_len to 2048 or less" in message


def test_the_context_length_is_read_under_each_familys_name():
    from fulltune.tokenizer.check import context_length

    assert context_length({"n_positions": 1024, "model_type": "gpt2"}) == ("n_positions", 1024)
    assert context_length({"text_config": {"max_position_embeddings": 8192}}) == (
        "max_position_embeddings",
        8192,
    )
    assert context_length({"model_type": "bloom"}) is None  # ALiBi: no table, nothing to check


@pytest.mark.parametrize("pad", ["</s>", None])
def test_padding_with_eos_is_no_warning_because_padding_is_masked_through_the_labels(tmp_path, pad):
    """Llama 3 and Mistral ship no pad token (or pad = eos); a warning telling every such user that
    the model "never learns to stop", and to add a pad token the embedding has no row for, was
    wrong here: preprocessing masks padding through the labels, and EOS keeps its loss."""
    model = build_tokenizer(tmp_path / "tok", pad=pad)
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello world"}])
    report = check_tokenizer(make_cfg(model, train), tmp_path / "out")
    status, message = checks(report)["pad_token"]
    assert status == "info" and "every EOS keeps its loss" in message
    assert report["passed"] is True and report["metrics"]["warnings"] == 0


def test_overlong_drop_that_would_leave_nothing_is_refused_and_drops_are_called_drops(
    tokenizer_dir, tmp_path
):
    """With preprocess.overlong: drop, over-long examples are dropped, not truncated; when the sample
    says none would be left, the check fails here (as gather_shards would after tokenizing it all),
    whatever max_truncation_rate allows."""
    rows = [
        {"prompt": " ".join(["hello"] * n), "completion": " hello"} for n in (1, 4, 9, 19)
    ]  # 3, 6, 11, 21 tokens
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    drop = {"preprocess": {"max_seq_len": 8, "overlong": "drop"}, "tokenizer": {"max_truncation_rate": 1.0}}
    report = check_tokenizer(make_cfg(tokenizer_dir, train, **drop), tmp_path / "some")
    assert checks(report)["truncation"] == (
        "ok",
        "2 of 4 sampled records (50.0%) are longer than max_seq_len=8 tokens (allowed 100.0%) and would be "
        "dropped (preprocess.overlong: drop); p50 6, p95 21, max 21",
    )
    all_long = write_jsonl(tmp_path / "long.jsonl", rows[2:])
    with pytest.raises(TokenizerCheckError) as refused:
        check_tokenizer(make_cfg(tokenizer_dir, all_long, **drop), tmp_path / "none")
    assert (
        "truncation: 2 of 2 sampled records (100.0%) are longer than max_seq_len=8 tokens and preprocess.overlong "
        "is drop: none would be left to train on; raise preprocess.max_seq_len (p95 21) or set "
        "preprocess.overlong: truncate" in str(refused.value)
    )


def test_truncation_rate_on_known_lengths(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # "hello" then n-1 times " hello": one token each (checked), plus the EOS preprocessing appends
    assert len(tok.encode("hello" + " hello" * 9, add_special_tokens=False)) == 10
    words = [1, 4, 9, 19]  # prompt n tokens + completion 1 + EOS -> 3, 6, 11, 21 tokens
    rows = [{"prompt": " ".join(["hello"] * n), "completion": " hello"} for n in words]
    train = write_jsonl(tmp_path / "train.jsonl", rows)

    report = check_tokenizer(make_cfg(tokenizer_dir, train, preprocess={"max_seq_len": 8}), tmp_path / "out")
    assert report["lengths"] == {
        "records_sampled": 4,
        "max_seq_len": 8,
        "over_max_seq_len": 2,
        "truncation_rate": 0.5,
        "truncated": True,
        "p50": 6,
        "p95": 21,
        "max": 21,
    }
    assert checks(report)["truncation"][0] == "ok"  # default max_truncation_rate 0.5

    with pytest.raises(TokenizerCheckError, match="truncation: 2 of 4 sampled records"):
        check_tokenizer(
            make_cfg(
                tokenizer_dir, train, preprocess={"max_seq_len": 8}, tokenizer={"max_truncation_rate": 0.25}
            ),
            tmp_path / "out2",
        )

    # Text is split across sequences (packing) or windows (no packing), not truncated: never a failure.
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": " ".join(["hello"] * (n + 1))} for n in words])
    for packing, how in ((True, "packing splits them"), (False, "they become windows")):
        report = check_tokenizer(
            make_cfg(
                tokenizer_dir,
                text,
                preprocess={"max_seq_len": 8, "packing": packing},
                tokenizer={"max_truncation_rate": 0.0},
            ),
            tmp_path / f"out-{packing}",
        )
        status, message = checks(report)["truncation"][:2]
        assert status == "info" and how in message and "nothing is dropped" in message
        assert report["lengths"]["truncated"] is False


def test_lengths_count_the_bos_preprocessing_puts_before_each_document(tmp_path):
    """A Llama-like tokenizer leads every text with its BOS; preprocessing gives each prompt/completion
    document that BOS and fits it into max_seq_len with it. The check counted without it: a record
    of exactly max_seq_len tokens passed as fitting, then preprocessing dropped (or truncated) it."""
    model = build_tokenizer(tmp_path / "tok", bos_lead=True)
    rows = [{"prompt": " ".join(["hello"] * 6), "completion": " hello"}]  # 6 + 1 + EOS, + BOS = 9
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    drop = {"overlong": "drop"}
    fits = check_tokenizer(make_cfg(model, train, preprocess={"max_seq_len": 9, **drop}), tmp_path / "fits")
    assert fits["lengths"]["max"] == 9 and fits["lengths"]["over_max_seq_len"] == 0
    with pytest.raises(TokenizerCheckError) as info:
        check_tokenizer(make_cfg(model, train, preprocess={"max_seq_len": 8, **drop}), tmp_path / "over")
    assert "1 of 1 sampled records (100.0%) are longer than max_seq_len=8 tokens" in str(info.value)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello world"}])  # 2 + EOS, + BOS
    assert check_tokenizer(make_cfg(model, text), tmp_path / "text")["lengths"]["max"] == 4


def test_worst_split_domain_terms_with_pieces(tokenizer_dir, tmp_path):
    rows = [{"text": "the patient has HbA1c of 7 and dyslipidaemia"}, {"text": "HbA1c again, the patient"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(
        tokenizer_dir, train, tokenizer={"top_k_split_terms": 2, "domain_terms": ["HbA1c", "patient"]}
    )
    report = check_tokenizer(cfg, tmp_path / "out")

    top = report["split_terms"]
    assert len(top) == 2
    assert top[0]["word"] == "dyslipidaemia"  # the longest unseen word splits into the most pieces
    assert top[0]["num_pieces"] >= top[1]["num_pieces"] > 1
    assert "".join(top[0]["pieces"]).strip() == "dyslipidaemia"
    terms = {t["word"]: t for t in report["domain_terms"]}
    assert terms["HbA1c"]["count"] == 2
    assert "".join(terms["HbA1c"]["pieces"]).strip() == "HbA1c" and terms["HbA1c"]["num_pieces"] > 1
    assert terms["patient"]["pieces"] == ["patient"]  # a corpus word: one in-text piece
    page = (tmp_path / "out" / "report.html").read_text()
    assert "dyslipidaemia" in page and "HbA1c" in page


def test_word_pieces_are_the_in_text_form(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    [ids] = word_pieces(tok, ["patient"])
    assert ids == tok.encode(" patient", add_special_tokens=False)


def test_fertility_domain_vs_general(tokenizer_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "zygomatic osteotomy xylophone quasar"}])
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": "hello world the patient"}])
    cfg = make_cfg(tokenizer_dir, train, data={"general_uri": str(general)})
    report = check_tokenizer(cfg, tmp_path / "out")

    assert report["fertility"]["general"] == pytest.approx(1.0)
    assert report["fertility"]["domain"] > 2
    assert checks(report)["fertility"][0] == "warning"
    assert report["metrics"]["fertility_ratio"] == pytest.approx(report["fertility"]["domain"])


def test_chat_data_needs_a_template(tokenizer_dir, tmp_path):
    chat = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}
    train = write_jsonl(tmp_path / "train.jsonl", [chat])
    with pytest.raises(
        TokenizerCheckError, match="chat_template: the data is chat but the tokenizer has no chat"
    ):
        check_tokenizer(make_cfg(tokenizer_dir, train), tmp_path / "out")

    model = build_tokenizer(tmp_path / "tok", chat_template=CHAT_TEMPLATE)
    report = check_tokenizer(make_cfg(model, train), tmp_path / "out2")
    assert checks(report)["chat_template"][0] == "ok"
    assert report["chat"]["rendered"] == "<|user|>hello<|assistant|>world</s>"
    assert report["record_kind"] == "chat" and report["lengths"]["records_sampled"] == 1


def test_a_conversation_the_template_ends_with_eos_and_a_newline_gets_no_second_eos(tmp_path):
    """Qwen's template ends every turn with its EOS (<|im_end|>) and a newline; preprocessing appends
    no EOS after it. The check counted one anyway and refused a config whose every record fits."""
    qwen = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    model = build_tokenizer(tmp_path / "tok", chat_template=qwen)
    chat = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}
    train = write_jsonl(tmp_path / "train.jsonl", [chat])
    cfg = make_cfg(model, train, preprocess={"overlong": "drop"})
    n = check_tokenizer(cfg, tmp_path / "out")["lengths"]["max"]

    from fulltune.data.records import iter_records
    from fulltune.preprocess.core import Encoder, load_tokenizer, tokenize

    [record] = iter_records(str(train), cfg.data.reading("train"), "chat")
    assert tokenize([record], "chat", Encoder(load_tokenizer(cfg)), False).lengths.tolist() == [n]
    fits = check_tokenizer(cfg.with_overrides({"preprocess.max_seq_len": n}), tmp_path / "fits")
    assert fits["lengths"]["over_max_seq_len"] == 0


def test_broken_chat_template_fails(tmp_path):
    model = build_tokenizer(tmp_path / "tok", chat_template="{{ raise_exception('no system role') }}")
    chat = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}
    train = write_jsonl(tmp_path / "train.jsonl", [chat])
    with pytest.raises(TokenizerCheckError, match="no system role"):
        check_tokenizer(make_cfg(model, train), tmp_path / "out")


def test_chat_template_must_render_prefixes_stably_for_assistant_loss(tmp_path):
    reverse = "{% for m in messages | reverse %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    model = build_tokenizer(tmp_path / "tok", chat_template=reverse)
    turns = [("user", "hello"), ("assistant", "world"), ("user", "again"), ("assistant", "hello")]
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"messages": [{"role": r, "content": c} for r, c in turns]}]
    )
    with pytest.raises(TokenizerCheckError, match="does not render conversation prefixes stably .turn 1:"):
        check_tokenizer(make_cfg(model, train), tmp_path / "out")
    cfg = make_cfg(model, train, preprocess={"loss_on": "all"})
    report = check_tokenizer(cfg, tmp_path / "out2")
    assert checks(report)["chat_template"][0] == "ok"
    # and preprocessing, told the way out the check names, builds the example (it used to look for
    # the assistant turns anyway, and refuse every conversation)
    from fulltune.data.records import iter_records
    from fulltune.preprocess.core import Encoder, load_tokenizer, tokenize

    records = list(iter_records(str(train), cfg.data.reading("train"), "chat"))
    docs = tokenize(records, "chat", Encoder(load_tokenizer(cfg)), loss_all=True)
    assert docs.lengths.tolist() == [report["lengths"]["max"]]
    assert (docs.labels == docs.ids).all()


def test_a_template_that_refuses_a_conversation_prefix_fails_the_check_naming_the_record(tmp_path):
    """For loss_on: assistant preprocessing renders each conversation up to its assistant turns; a
    template that refuses such a prefix (here: one not ending with the assistant) passed the check,
    which rendered only whole conversations and skipped a prefix that failed, and preprocess_shard
    refused the first record."""
    strict = (
        "{% if messages[-1].role != 'assistant' and not add_generation_prompt %}"
        "{{ raise_exception('a conversation ends with the assistant') }}{% endif %}"
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    model = build_tokenizer(tmp_path / "tok", chat_template=strict)
    chat = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}
    train = write_jsonl(tmp_path / "train.jsonl", [chat])
    with pytest.raises(TokenizerCheckError) as info:
        check_tokenizer(make_cfg(model, train), tmp_path / "out")
    assert (
        f"chat_template: {train}:1: the chat template refuses this conversation: TemplateError: a conversation "
        "ends with the assistant: preprocessing would refuse it for preprocess.loss_on: assistant. Fix the "
        "template or set preprocess.loss_on: all"
    ) in str(info.value)
    assert check_tokenizer(make_cfg(model, train, preprocess={"loss_on": "all"}), tmp_path / "all")["passed"]


def test_a_generation_prompt_that_rewrites_the_conversation_fails_the_check(tmp_path):
    """Preprocessing would refuse it at the first record; the check says so before any shard runs."""
    dated = (
        "{% if add_generation_prompt %}Today is Monday.{% endif %}"
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    model = build_tokenizer(tmp_path / "tok", chat_template=dated)
    turns = [("user", "hello"), ("assistant", "world")]
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"messages": [{"role": r, "content": c} for r, c in turns]}]
    )
    with pytest.raises(TokenizerCheckError, match="does not render conversation prefixes stably"):
        check_tokenizer(make_cfg(model, train), tmp_path / "out")


PYTHON_TOKENIZER_PY = """
from transformers import PreTrainedTokenizer


class CharTokenizer(PreTrainedTokenizer):
    vocab_files_names = {}

    def __init__(self, **kwargs):
        tokens = ["<s>", "</s>", "<pad>", "\\n", *map(chr, range(32, 127))]
        self._ids = {t: i for i, t in enumerate(tokens)}
        self._tokens = tokens
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self._tokens)

    def get_vocab(self):
        return dict(self._ids)

    def _tokenize(self, text):
        return list(text)

    def _convert_token_to_id(self, token):
        return self._ids.get(token, 2)

    def _convert_id_to_token(self, index):
        return self._tokens[index]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()
"""


def test_a_python_tokenizer_is_refused_for_assistant_loss_naming_the_way_out(tokenizer_dir, tmp_path):
    """A Python tokenizer (custom code, as tiktoken-based ones are) gives no token offsets, which
    loss_on: assistant needs; the check passed it and preprocessing failed on the first conversation,
    blaming the chat template for a KeyError."""
    tok = tmp_path / tmp_path.name  # transformers imports the code as a module named after the directory
    tok.mkdir()
    (tok / "tokenization_char.py").write_text(PYTHON_TOKENIZER_PY)
    (tok / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CharTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_char.CharTokenizer", None]},
                "eos_token": "</s>",
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    chat = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}
    train = write_jsonl(tmp_path / "train.jsonl", [chat])
    cfg = make_cfg(tokenizer_dir, train).with_overrides(
        {"model.tokenizer_uri": str(tok), "model.trust_remote_code": True}
    )
    with pytest.raises(TokenizerCheckError) as info:
        check_tokenizer(cfg, tmp_path / "out")
    said = (
        "CharTokenizer is a Python tokenizer, which gives no token offsets: preprocess.loss_on: assistant needs "
        "them to find the assistant turns' tokens. Set model.tokenizer_uri to the model's fast tokenizer "
        "(tokenizer.json), or preprocess.loss_on: all"
    )
    assert f"token_offsets: {tok}: {said}" in str(info.value)

    from fulltune.data.records import iter_records
    from fulltune.preprocess.core import Encoder, PreprocessError, load_tokenizer, tokenize

    records = list(iter_records(str(train), cfg.data.reading("train"), "chat"))
    with pytest.raises(PreprocessError) as refused:
        tokenize(records, "chat", Encoder(load_tokenizer(cfg)), loss_all=False)
    assert str(refused.value) == f"{train}:1: {said}"
    all_loss = cfg.with_overrides({"preprocess.loss_on": "all"})
    assert check_tokenizer(all_loss, tmp_path / "all")["passed"]


def test_unloadable_tokenizer_fails_with_report(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello"}])
    with pytest.raises(TokenizerCheckError, match="load: cannot load the tokenizer"):
        check_tokenizer(make_cfg(tmp_path / "missing", train), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["passed"] is False


def test_a_model_directory_without_tokenizer_files_says_so_and_names_tokenizer_uri(tokenizer_dir, tmp_path):
    """Not transformers' advice to install sentencepiece or tiktoken, which would not help."""
    import shutil

    model = tmp_path / "notok"
    shutil.copytree(tokenizer_dir, model)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (model / name).unlink(missing_ok=True)
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello world"}])
    with pytest.raises(TokenizerCheckError) as info:
        check_tokenizer(make_cfg(model, train), tmp_path / "out")
    message = str(info.value)
    assert (
        f"load: cannot load the tokenizer: {model} has no tokenizer files (looked for tokenizer.json, "
        "tokenizer_config.json, tokenizer.model, spiece.model, sentencepiece.bpe.model, vocab.json, "
        "merges.txt, vocab.txt, *.tiktoken): set model.tokenizer_uri to a directory that has them"
    ) in message
    assert "sentencepiece or tiktoken" not in message
    told = make_cfg(model, train).with_overrides({"model.tokenizer_uri": str(tokenizer_dir)})
    assert check_tokenizer(told, tmp_path / "o2")["passed"]


def test_reservoir_is_deterministic_and_bounded():
    a = reservoir(range(10_000), 100, seed=3)
    assert a == reservoir(range(10_000), 100, seed=3)
    assert len(a) == 100 and a == sorted(a) and a != list(range(100))
    assert reservoir(range(5), 100, seed=0) == [0, 1, 2, 3, 4]


def test_tokenizer_from_s3_skips_weights(tokenizer_dir, tmp_path, s3):
    from fulltune import storage

    storage.upload_dir(tokenizer_dir, f"{s3}/model")  # the weights' headers are read, never the weights
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello world"}])
    cfg = RunConfig.from_dict({"model": {"base_model_uri": f"{s3}/model"}, "data": {"train_uri": str(train)}})
    report = check_tokenizer(cfg, tmp_path / "out")
    assert report["passed"] and report["model"]["embedding_rows"] == report["tokenizer"]["size"]


def test_partial_character_pieces_show_as_bytes(tokenizer_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "the patient drank café"}])
    cfg = make_cfg(tokenizer_dir, train, tokenizer={"domain_terms": ["café"]})
    [term] = check_tokenizer(cfg, tmp_path / "out")["domain_terms"]
    assert term["pieces"][-2:] == ["<0xC3>", "<0xA9>"]  # é is two bytes the tiny vocabulary never merged


def test_unk_rate_and_roundtrip_on_a_lossy_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = tmp_path / "tok"
    fast.save_pretrained(model)
    save_model(
        model, LlamaConfig(vocab_size=len(fast), hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    )
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "the patient"}, {"text": "the Zürich patient"}])

    report = check_tokenizer(make_cfg(model, train), tmp_path / "out")
    got = checks(report)
    assert got["unk"][0] == "warning" and "'Zürich'" in got["unk"][1]
    assert report["unk"]["count"] >= 1 and 0 < report["metrics"]["unk_rate"] < 1
    assert got["roundtrip"][0] == "warning"
    assert report["roundtrip"] == {
        "checked": 2,
        "exact": 1,
        "rate": 0.5,
        "examples": [
            {
                "at": "4",
                "original": "the Zürich patient",
                "decoded": report["roundtrip"]["examples"][0]["decoded"],
            }
        ],
    }
    assert "<unk>" in report["roundtrip"]["examples"][0]["decoded"]


def test_a_generation_config_that_is_not_an_object_is_refused_naming_the_file(tokenizer_dir, tmp_path):
    """from_pretrained fails on it in train; the check used to crash with an AttributeError."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tokenizer_dir, model)
    (model / "generation_config.json").write_text("[1]")
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello world"}])
    with pytest.raises(TokenizerCheckError) as info:
        check_tokenizer(make_cfg(model, train), tmp_path / "out")
    assert (
        f"generation_config: {model / 'generation_config.json'} is not a JSON object (it holds a list)"
        in str(info.value)
    )


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_tokenizer_file_that_is_not_json_is_named(tokenizer_dir, tmp_path, name):
    """transformers' own message ("Expecting property name ...") says neither which file nor what to do."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tokenizer_dir, model)
    (model / name).write_text("{")
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello world"}])
    with pytest.raises(TokenizerCheckError) as info:
        check_tokenizer(make_cfg(model, train), tmp_path / "out")
    assert f"load: cannot load the tokenizer: {model / name} is not valid JSON (" in str(info.value)


def test_tokenizer_config_without_a_vocabulary_says_so_not_install_sentencepiece(tokenizer_dir, tmp_path):
    """An upload that left out tokenizer.json: transformers blames a missing sentencepiece or tiktoken."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tokenizer_dir, model)
    (model / "tokenizer.json").unlink()
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello world"}])
    with pytest.raises(TokenizerCheckError) as info:
        check_tokenizer(make_cfg(model, train), tmp_path / "out")
    assert f"{model} has tokenizer_config.json but no vocabulary file (looked for tokenizer.json, " in str(
        info.value
    )


def write_sentencepiece_model(path: Path) -> None:
    """A SentencePiece model file, written with transformers' copy of its protobuf schema (no
    sentencepiece package needed)."""
    from transformers.utils import sentencepiece_model_pb2_new as pb

    model = pb.ModelProto()
    for piece, kind in [("<unk>", 2), ("<s>", 3), ("</s>", 3), *((c, 1) for c in "▁dehlorw")]:
        model.pieces.add(piece=piece, score=0.0, type=kind)
    model.trainer_spec.model_type = 2  # BPE
    path.write_bytes(model.SerializeToString())


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("sentencepiece") is not None, reason="sentencepiece reads it"
)
def test_a_sentencepiece_only_tokenizer_without_sentencepiece_says_so_not_install_tiktoken(
    tokenizer_dir, tmp_path
):
    """A tokenizer saved as tokenizer.model alone (no tokenizer.json): without the sentencepiece
    package transformers tries it as a tiktoken file and said to install tiktoken, which cannot help."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tokenizer_dir, model)
    for name in ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
        (model / name).unlink(missing_ok=True)
    write_sentencepiece_model(model / "tokenizer.model")
    (model / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello world"}])
    with pytest.raises(TokenizerCheckError) as info:
        check_tokenizer(make_cfg(model, train), tmp_path / "out")
    assert (
        f"load: cannot load the tokenizer: {model / 'tokenizer.model'} is a SentencePiece model with no "
        "tokenizer.json beside it, and this installation has no sentencepiece package to read it"
    ) in str(info.value)
    # a tiktoken file under the same name (Llama 3's original/tokenizer.model) is what transformers says
    (model / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(TokenizerCheckError) as info:
        check_tokenizer(make_cfg(model, train), tmp_path / "out2")
    assert "SentencePiece" not in str(info.value)


def test_a_chat_template_that_drops_the_assistant_turns_is_refused(tmp_path):
    """Preprocessing would find every answer empty and train on the EOS alone: a model that stops at once."""
    no_answers = "{% for m in messages %}{% if m.role != 'assistant' %}<|{{ m.role }}|>{{ m.content }}{% endif %}{% endfor %}"
    model = build_tokenizer(tmp_path / "tok", chat_template=no_answers)
    chat = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}
    train = write_jsonl(tmp_path / "train.jsonl", [chat])
    for loss_on in ("assistant", "all"):
        with pytest.raises(TokenizerCheckError) as info:
            check_tokenizer(make_cfg(model, train, preprocess={"loss_on": loss_on}), tmp_path / loss_on)
        assert (
            "chat_template: rendering drops or changes the content of assistant turns in 1 of 1 sampled "
            f"conversations, first {train}:1 (turns ['assistant']): training would not teach the data's answers"
        ) in str(info.value)


def test_every_sampled_conversation_is_rendered_and_the_one_that_loses_an_answer_is_named(tmp_path):
    """Only the first sampled conversation was checked for dropped turns: a template that keeps only
    the last answer's content passed on single-turn conversations and the multi-turn one was trained
    without its first answer (loss_on: all, where no prefix is rendered to notice)."""
    last_answer_only = (
        "{% for m in messages %}<|{{ m.role }}|>"
        "{% if m.role != 'assistant' or loop.last %}{{ m.content }}{% endif %}{% endfor %}"
    )
    model = build_tokenizer(tmp_path / "tok", chat_template=last_answer_only)
    turns = [("user", "hello"), ("assistant", "world"), ("user", "again"), ("assistant", "hello")]
    convs = [turns[:2], turns[:2], turns]
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"messages": [{"role": r, "content": c} for r, c in t]} for t in convs]
    )
    with pytest.raises(TokenizerCheckError) as info:
        check_tokenizer(make_cfg(model, train, preprocess={"loss_on": "all"}), tmp_path / "out")
    assert (
        "rendering drops or changes the content of assistant turns in 1 of 3 sampled conversations, first "
        f"{train}:3 (turns ['assistant'])"
    ) in str(info.value)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["chat"]["sample_location"] == f"{train}:3"  # the rendering that shows it
    assert report["chat"]["rendered"] == "<|user|>hello<|assistant|><|user|>again<|assistant|>hello"

    fine = write_jsonl(
        tmp_path / "fine.jsonl", [{"messages": [{"role": r, "content": c} for r, c in turns[:2]]}] * 3
    )
    assert checks(check_tokenizer(make_cfg(model, fine), tmp_path / "fine"))["chat_template"] == (
        "ok",
        "renders all 3 sampled conversations with all their turns",
    )


class _CountingTokenizer:
    """The real tokenizer, noting how many characters each encoding call was handed."""

    def __init__(self, tok: Any, calls: list[int]):
        self._tok, self._calls = tok, calls

    def __call__(self, texts, *args, **kwargs):
        self._calls.append(sum(map(len, texts)) if isinstance(texts, list) else len(texts))
        return self._tok(texts, *args, **kwargs)

    def __len__(self) -> int:
        return len(self._tok)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def test_records_of_megabytes_are_measured_on_a_bounded_prefix(tokenizer_dir, tmp_path, monkeypatch):
    # The tokenizer's encodings take ~150 bytes a character: a sample holding a few records of
    # megabytes, all handed to one call and all their ids kept, took gigabytes (a 4 GiB pod).
    from fulltune.hf import load_tokenizer
    from fulltune.tokenizer import check
    from fulltune.tokenizer.memo import ENCODE_CHARS

    long_text = " ".join(CORPUS) * 100  # ~600,000 characters
    rows = [{"text": long_text + f" record {i}"} for i in range(4)] + [{"text": t} for t in CORPUS[:20]]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    calls: list[int] = []
    monkeypatch.setattr(
        check, "load_tokenizer", lambda uri, trust: _CountingTokenizer(load_tokenizer(uri, trust), calls)
    )
    report = check_tokenizer(
        make_cfg(tokenizer_dir, train, preprocess={"max_seq_len": 128}), tmp_path / "out"
    )

    assert calls and max(calls) <= ENCODE_CHARS
    exact = len(load_tokenizer(str(tokenizer_dir), False)(rows[0]["text"])["input_ids"]) + 1
    assert abs(report["lengths"]["max"] - exact) < 0.01 * exact  # extrapolated from its first part
    assert report["lengths"]["over_max_seq_len"] == 4 and report["roundtrip"]["rate"] == 1.0
