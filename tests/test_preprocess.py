"""Preprocessing: determinism, loss masks, resumable shards, replay mixing, the dataset manifest."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest

from fulltune import storage
from fulltune.config import RunConfig
from fulltune.data.records import Location, Record
from fulltune.layout import RunLayout
from fulltune.preprocess import core
from fulltune.preprocess.dataset import IGNORE_INDEX, load_split


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok(demo_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_assets.base_model_dir))


def make_cfg(demo_assets, tmp_path, train_rows, general_rows=None, **pp) -> RunConfig:
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    general = write_jsonl(tmp_path / "general.jsonl", general_rows) if general_rows else None
    data = {"train_uri": train}
    if general:
        data["general_uri"] = general
    return RunConfig.from_dict(
        {
            "model": {"base_model_uri": str(demo_assets.base_model_dir)},
            "data": data,
            "preprocess": {
                "max_seq_len": 64,
                "num_shards": 2,
                "replay_fraction": 0.0,
                "block_records": 16,
                **pp,
            },
        }
    )


def at(cfg: RunConfig, work_dir: str) -> RunConfig:
    """The same config with its work directory at `work_dir` (where the shards go)."""
    return cfg.with_overrides({"work_dir": work_dir})


def preprocess_all(cfg: RunConfig) -> dict:
    """Every shard in this process, then gather (what the pipeline's ParallelFor does); the dataset
    manifest as it is written."""
    for i in range(cfg.preprocess.num_shards):
        core.preprocess_shard(cfg, i)
    return core.gather_shards(cfg).to_json()


TEXTS = [
    {"text": f"Patient {i} has HbA1c {5 + i % 7}.{i % 10}% and eGFR {30 + i} on review."} for i in range(120)
]


def test_same_inputs_give_byte_identical_shards(demo_assets, tmp_path):
    cfg = make_cfg(demo_assets, tmp_path, TEXTS)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    preprocess_all(at(cfg, a))
    preprocess_all(at(cfg, b))
    files_a = sorted(p.relative_to(a) for p in Path(a).rglob("*.parquet"))
    assert files_a == sorted(p.relative_to(b) for p in Path(b).rglob("*.parquet"))
    for rel in files_a:
        assert (Path(a) / rel).read_bytes() == (Path(b) / rel).read_bytes(), rel


def test_text_packing_keeps_every_token_once_with_eos_between_documents(demo_assets, tmp_path, tok):
    cfg = make_cfg(demo_assets, tmp_path, TEXTS, num_shards=1, eval_fraction=0.01)
    manifest = preprocess_all(at(cfg, str(tmp_path / "w")))
    split = manifest["splits"]["train"]
    data = load_split(manifest, "train")
    mask = data["attention_mask"].bool()
    tokens = data["input_ids"][mask].tolist()
    eval_docs = manifest["splits"]["domain_eval"]["examples"]
    assert split["examples"] + eval_docs == len(TEXTS)
    assert tokens.count(tok.eos_token_id) == split["examples"]
    # labels equal inputs wherever there is a token (all of a text document carries loss)
    assert (data["labels"][mask] == data["input_ids"][mask]).all()
    assert (data["labels"][~mask] == IGNORE_INDEX).all()
    blocks = -(-len(TEXTS) // cfg.preprocess.block_records)
    padded = int((~mask).any(dim=1).sum())
    assert padded <= blocks  # only each block's last sequence pads


def test_chat_labels_are_exactly_the_assistant_turns(demo_assets, tmp_path, tok):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are a clinical assistant."},
                {"role": "user", "content": f"What is the eGFR of patient {i}?"},
                {"role": "assistant", "content": f"The eGFR is {40 + i} mL/min."},
                {"role": "user", "content": "And the stage?"},
                {"role": "assistant", "content": f"CKD stage {2 + i % 3}."},
            ]
        }
        for i in range(12)
    ]
    cfg = make_cfg(demo_assets, tmp_path, rows, num_shards=1, max_seq_len=256, eval_fraction=0.01)
    manifest = preprocess_all(at(cfg, str(tmp_path / "w")))
    data = load_split(manifest, "train")
    decoded = []
    for ids, labels in zip(data["input_ids"], data["labels"], strict=True):
        keep = [t for t, lab in zip(ids.tolist(), labels.tolist(), strict=True) if lab != IGNORE_INDEX]
        decoded.append(tok.decode(keep))
    text = "".join(decoded)
    assert "clinical assistant" not in text and "What is the eGFR" not in text and "And the stage" not in text
    held_out = {i for i, r in enumerate(rows) if core.stable_fraction(_chat_key(r), "0") < 0.01}
    for i, row in enumerate(rows):
        for m in row["messages"]:
            if m["role"] == "assistant":
                assert (m["content"] in text) is (i not in held_out)


def _loss_text(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


def test_a_conversation_opening_with_the_assistant_trains_on_the_answers_only(tok):
    """A canned greeting before the user speaks answers nothing: context, no loss; the answer after
    the user's turn carries loss, and the conversation's final EOS with it."""
    greeting = [
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "My eGFR is 41."},
        {"role": "assistant", "content": "That is CKD stage 3b."},
    ]
    ids, labels = core.chat_example(greeting, tok, loss_all=False)
    taught = _loss_text(tok, ids, labels)
    assert "CKD stage 3b" in taught and "how can I help" not in taught and "eGFR is 41" not in taught
    assert labels[-1] == ids[-1] == tok.eos_token_id


def test_the_eos_after_a_users_last_turn_carries_no_loss(tok):
    """A conversation that ends with the user: the model must not learn to stop where it should answer."""
    ending_with_user = [
        {"role": "user", "content": "My eGFR is 41."},
        {"role": "assistant", "content": "That is CKD stage 3b."},
        {"role": "user", "content": "Thanks."},
    ]
    ids, labels = core.chat_example(ending_with_user, tok, loss_all=False)
    assert "CKD stage 3b" in _loss_text(tok, ids, labels)
    assert ids[-1] == tok.eos_token_id and labels[-1] == IGNORE_INDEX


def _templated(tok, template: str):
    custom = copy.deepcopy(tok)
    custom.chat_template = template
    return custom


HBA1C = [
    {"role": "user", "content": "What is HbA1c?"},
    {"role": "assistant", "content": "Glycated haemoglobin."},
    {"role": "user", "content": "And eGFR?"},
    {"role": "assistant", "content": "Kidney filtration."},
]


def test_a_template_ending_each_turn_with_the_eos_and_a_newline_gets_no_second_eos(tok):
    """Qwen's template: `<|im_end|>` (its EOS) and a newline after every turn; the conversation
    ends there, learned with the answer, and nothing is appended after the newline."""
    eos = tok.eos_token
    qwen = _templated(
        tok,
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '"
        + eos
        + "' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    )
    ids, labels = core.chat_example(HBA1C, qwen, loss_all=False)
    assert ids.count(tok.eos_token_id) == len(HBA1C)  # one per turn, none appended
    assert tok.decode(ids[-2:]) == eos + "\n"
    taught = _loss_text(qwen, ids, labels)
    assert taught.count(eos) == 2 and "Kidney filtration." in taught  # each answer's EOS is learned


# Templates whose answers start other than where the turn's header ends, and each answer is still
# learned from its first character: after a generation prompt ending in a space, byte-level BPE merges
# the space into the answer's first token (" G"), which starts before the turn but is the answer's
# opening; DeepSeek-R1 distills and QwQ prompt generation with "<think>" and a newline, which history does not
# render.
ANSWER_OPENINGS = {
    "space in the generation prompt": "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ 'User: ' + m['content'] + '\\n' }}{% else %}{{ 'Assistant: ' + m['content'] + '<|end|>\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}",
    "generation prompt longer than the turn header": "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n<think>\\n' }}{% endif %}",
}


@pytest.mark.parametrize("template", ANSWER_OPENINGS.values(), ids=ANSWER_OPENINGS.keys())
def test_an_answer_is_learned_from_its_first_character_whatever_the_template(tok, template):
    templated = _templated(tok, template)
    ids, labels = core.chat_example(HBA1C, templated, loss_all=False)
    taught = _loss_text(templated, ids, labels)
    assert "Glycated haemoglobin." in taught and "Kidney filtration." in taught
    assert "HbA1c" not in taught and "eGFR" not in taught


def test_a_generation_prompt_that_rewrites_the_conversation_is_refused_naming_the_template(tok):
    rewrites = _templated(
        tok,
        "{% if add_generation_prompt %}{{ 'Today is Monday.\\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
    )
    with pytest.raises(core.PreprocessError, match=r"the chat template of .*base_model.* prefixes stably"):
        core.chat_example(HBA1C, rewrites, loss_all=False)


def test_a_template_refusing_a_conversation_is_an_error_at_its_record(tok, tmp_path):
    """Templates such as Mistral's refuse roles out of order; check_tokenizer renders a sample, so a
    refusal further in the data surfaces in preprocessing: named with the file and line, no traceback
    of jinja's."""
    from fulltune.data.records import Location, Record

    strict = copy.deepcopy(tok)
    strict.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
    )
    twice_user = [
        {"role": "user", "content": "Hi."},
        {"role": "user", "content": "My eGFR is 41."},
        {"role": "assistant", "content": "CKD stage 3b."},
    ]
    record = Record(kind="chat", loc=Location(str(tmp_path / "train.jsonl"), line=4001), messages=twice_user)
    with pytest.raises(
        core.PreprocessError, match=r"train\.jsonl:4001: the chat template refuses .*alternate"
    ):
        core.located_chat_example(record, strict, loss_all=False)
    ids, labels = core.located_chat_example(  # the same template accepts a conversation in order
        Record(kind="chat", loc=record.loc, messages=[twice_user[0], twice_user[2]]), strict, loss_all=False
    )
    assert "CKD stage 3b" in _loss_text(strict, ids, labels)


def _chat_key(row: dict) -> str:
    """What the chat row's split is decided by."""
    from fulltune.data.records import Location, Record

    return core.split_key(Record(kind="chat", loc=Location("train.jsonl"), messages=row["messages"]))


def test_prompt_completion_masks_the_prompt_unless_loss_on_all(demo_assets, tmp_path, tok):
    rows = [
        {"prompt": f"Q{i}: dose of metformin?", "completion": f" {500 * (i % 3 + 1)} mg twice daily"}
        for i in range(20)
    ]
    for loss_on, prompt_visible in (("assistant", False), ("all", True)):
        cfg = make_cfg(demo_assets, tmp_path, rows, num_shards=1, eval_fraction=0.01, loss_on=loss_on)
        manifest = preprocess_all(at(cfg, str(tmp_path / f"w-{loss_on}")))
        data = load_split(manifest, "train")
        labels = data["labels"][data["labels"] != IGNORE_INDEX].tolist()
        text = tok.decode(labels)
        assert ("dose of metformin" in text) is prompt_visible
        assert "mg twice daily" in text


def test_complete_shards_are_skipped_and_corrupt_ones_redone(demo_assets, tmp_path):
    cfg = make_cfg(demo_assets, tmp_path, TEXTS)
    work = str(tmp_path / "w")
    first = core.preprocess_shard(at(cfg, work), 0)
    again = core.preprocess_shard(at(cfg, work), 0)
    assert again.get("skipped") is True
    # Simulate a shard killed midway: data written, manifest missing -> redone, same bytes.
    shard1 = core.preprocess_shard(at(cfg, work), 1)
    f = Path(shard1["splits"]["train"]["files"][0]["uri"])
    before = f.read_bytes()
    Path(RunLayout(work).shard_manifest(1)).unlink()
    f.write_bytes(before[: len(before) // 2])
    redone = core.preprocess_shard(at(cfg, work), 1)
    assert "skipped" not in redone and f.read_bytes() == before
    # A corrupted file behind an existing manifest is detected by its checksum.
    f.write_bytes(b"garbage")
    assert not core.shard_is_complete(RunLayout(work).shard_manifest(1))
    assert core.preprocess_shard(at(cfg, work), 1).get("skipped") is None
    assert f.read_bytes() == before
    assert first["splits"]["train"]["files"]


def test_shards_built_with_other_settings_are_redone_not_reused(demo_assets, tmp_path):
    """The same work dir after num_shards, max_seq_len or the input changed: every shard whose
    content would differ is redone, so the dataset is the one a fresh run gives (2 -> 3 shards used
    to keep the old shards 0 and 1, covering the whole input, beside a new shard 2)."""
    work = str(tmp_path / "w")
    fresh = preprocess_all(at(make_cfg(demo_assets, tmp_path, TEXTS, num_shards=3), str(tmp_path / "fresh")))
    preprocess_all(at(make_cfg(demo_assets, tmp_path, TEXTS, num_shards=2), work))
    cfg = at(make_cfg(demo_assets, tmp_path, TEXTS, num_shards=3), work)
    assert not any(core.preprocess_shard(cfg, i).get("skipped") for i in range(3))
    assert (
        core.gather_shards(cfg).to_json()["splits"]["train"]["examples"]
        == fresh["splits"]["train"]["examples"]
    )
    wider = at(make_cfg(demo_assets, tmp_path, TEXTS, num_shards=3, max_seq_len=128), work)
    rows = load_split(preprocess_all(wider), "train")["input_ids"]
    assert rows.shape[1] == 128
    more = at(make_cfg(demo_assets, tmp_path, TEXTS + TEXTS[:30], num_shards=3, max_seq_len=128), work)
    assert not core.preprocess_shard(more, 2).get("skipped")  # the input file grew
    assert core.preprocess_shard(more, 2).get("skipped")  # and is reused once built from it


def test_gather_refuses_shards_built_with_other_settings_naming_them(demo_assets, tmp_path):
    work = str(tmp_path / "w")
    preprocess_all(at(make_cfg(demo_assets, tmp_path, TEXTS), work))
    cfg = at(make_cfg(demo_assets, tmp_path, TEXTS, max_seq_len=128, eval_fraction=0.2), work)
    with pytest.raises(core.PreprocessError, match="shard-00000.json: the shard was built from other") as err:
        core.gather_shards(cfg)
    assert "preprocess.max_seq_len: 64 (now 128)" in str(err.value)
    assert "preprocess.eval_fraction: 0.05 (now 0.2)" in str(err.value)


def test_gather_refuses_a_missing_shard(demo_assets, tmp_path):
    cfg = make_cfg(demo_assets, tmp_path, TEXTS)
    work = str(tmp_path / "w")
    core.preprocess_shard(at(cfg, work), 0)
    with pytest.raises(core.PreprocessError, match="shard-00001.json: shard missing"):
        core.gather_shards(at(cfg, work))


def test_replay_fraction_is_achieved_within_one_percent(demo_assets, tmp_path):
    general = [
        {"text": f"The {w} module provides functions for working with {w} objects."} for w in "abcdefghij" * 8
    ]
    cfg = make_cfg(demo_assets, tmp_path, TEXTS, general, replay_fraction=0.2)
    manifest = preprocess_all(at(cfg, str(tmp_path / "w")))
    assert manifest["replay"]["achieved_fraction"] == pytest.approx(0.2, abs=0.01)
    assert manifest["splits"]["general_eval"]["sequences"] > 0


def test_a_general_corpus_keeps_its_own_text_column(demo_assets, tmp_path):
    """Domain text in a column of its own (data.text_field) beside a general corpus in 'text': the
    general set is replayed and held out from data.general_text_field, as if both used one name."""
    general = [{"text": f"The {w} module provides functions for {w} objects."} for w in "abcdefghij" * 8]
    same = make_cfg(demo_assets, tmp_path, TEXTS, general, replay_fraction=0.2)
    expected = preprocess_all(at(same, str(tmp_path / "same")))
    notes = [{"note": row["text"]} for row in TEXTS]
    own = make_cfg(demo_assets, tmp_path, notes, general, replay_fraction=0.2)
    own = own.with_overrides({"data": {"text_field": "note", "general_text_field": "text"}})
    manifest = preprocess_all(at(own, str(tmp_path / "own")))
    assert manifest["replay"] == expected["replay"] and manifest["replay"]["replay_tokens"] > 0
    for split in ("train", "general_eval"):
        assert manifest["splits"][split]["tokens"] == expected["splits"][split]["tokens"] > 0, split


def test_replay_is_a_share_of_the_examples_that_survive_and_is_counted_apart(demo_assets, tmp_path):
    """Replay is sized from the domain tokens left after over-long examples are cut or dropped; the
    manifest's replay figures (shares of tokens and of loss tokens) are what the training split holds, and the split's examples, truncated
    and dropped counts are its own examples only (long replay documents are split, never cut)."""
    long_note = " ".join(f"day {i}: potassium {4 + i % 3}.{i % 10} mmol/L." for i in range(12))
    rows = [
        {"prompt": f"Q{i}: {long_note if i % 2 else 'next step?'}", "completion": f" Recheck in {i} days."}
        for i in range(60)
    ]
    general = [
        {"text": f"The {w} module: " + " ".join(["functions for objects."] * (3 + 20 * (k % 2)))}
        for k, w in enumerate("abcdefghij" * 4)
    ]
    for policy in ("drop", "truncate"):
        common = {"num_shards": 2, "eval_fraction": 0.01, "overlong": policy}
        cfgs = [
            make_cfg(demo_assets, tmp_path, rows, general, replay_fraction=r, **common) for r in (0.0, 0.3)
        ]
        base, mixed = (preprocess_all(at(c, str(tmp_path / f"{policy}{i}"))) for i, c in enumerate(cfgs))
        domain, train = base["splits"]["train"], mixed["splits"]["train"]
        replay = mixed["replay"]
        assert replay["domain_tokens"] == domain["tokens"], policy
        assert replay["replay_tokens"] == train["tokens"] - domain["tokens"], policy
        assert replay["achieved_fraction"] == pytest.approx(0.3, abs=0.01), policy
        # the share of the gradient: prompts carry no loss, so replay's share of loss tokens is larger
        assert replay["domain_loss_tokens"] == domain["loss_tokens"], policy
        assert replay["replay_loss_tokens"] == train["loss_tokens"] - domain["loss_tokens"], policy
        loss_share = replay["replay_loss_tokens"] / train["loss_tokens"]
        assert replay["achieved_loss_fraction"] == pytest.approx(loss_share) and loss_share > 0.35, policy
        for count in ("examples", "truncated", "dropped"):
            assert train[count] == domain[count], (policy, count)
        assert domain["dropped" if policy == "drop" else "truncated"] > 0, policy


def test_split_assignment_is_stable_and_disjoint(demo_assets, tmp_path, tok):
    cfg = make_cfg(demo_assets, tmp_path, TEXTS, eval_fraction=0.2, num_shards=1)
    manifest = preprocess_all(at(cfg, str(tmp_path / "w")))
    expected_eval = sum(1 for r in TEXTS if core.stable_fraction(r["text"], "0") < 0.2)
    assert manifest["splits"]["domain_eval"]["examples"] == expected_eval
    assert manifest["splits"]["train"]["examples"] == len(TEXTS) - expected_eval


def _prompts_by_split(manifest: dict, tok, pattern: str) -> dict[str, set[str]]:
    import re

    out = {}
    for name in ("train", "domain_eval"):
        ids = load_split(manifest, name)["input_ids"].tolist()
        out[name] = {m for row in ids for m in re.findall(pattern, tok.decode(row))}
    return out


def test_records_sharing_a_prompt_share_a_split(demo_assets, tmp_path, tok):
    """Several completions of one prompt, or one conversation with different last answers, are held
    out together: domain eval never scores a prompt that training saw."""
    pc = [
        {"prompt": f"PROMPT{i}: eGFR threshold?", "completion": f" variant {j}: {30 + j} mL/min."}
        for i in range(40)
        for j in range(4)
    ]
    chat = [
        {
            "messages": [
                {"role": "user", "content": f"CHAT{i}: my eGFR is {20 + i}."},
                {"role": "assistant", "content": "Which stage?"},
                {"role": "user", "content": "Stage it, please."},
                {"role": "assistant", "content": f"Answer variant {j}."},
            ]
        }
        for i in range(40)
        for j in range(4)
    ]
    for rows, pattern in ((pc, r"PROMPT\d+:"), (chat, r"CHAT\d+:")):
        cfg = make_cfg(
            demo_assets, tmp_path, rows, num_shards=1, max_seq_len=128, eval_fraction=0.3, packing=False
        )
        split = _prompts_by_split(preprocess_all(at(cfg, str(tmp_path / pattern[:4]))), tok, pattern)
        assert split["train"] and split["domain_eval"], pattern
        assert not split["train"] & split["domain_eval"], pattern
        assert len(split["train"] | split["domain_eval"]) == 40, pattern


def test_dataset_manifest_lists_checksummed_files(demo_assets, tmp_path):
    cfg = make_cfg(demo_assets, tmp_path, TEXTS)
    manifest = preprocess_all(at(cfg, str(tmp_path / "w")))
    on_disk = storage.read_json(RunLayout(str(tmp_path / "w")).dataset_manifest)
    assert on_disk == manifest
    for split in manifest["splits"].values():
        for f in split["files"]:
            assert storage.sha256_uri(f["uri"]) == f["sha256"]
    counts = Counter(len(r) for r in load_split(manifest, "train")["input_ids"].tolist())
    assert set(counts) == {64}
    # a capped read (evaluation.max_eval_sequences) spreads over every shard's file, not the first
    whole = load_split(manifest, "train")["input_ids"]
    files = manifest["splits"]["train"]["files"]
    assert len(files) == 2 and files[0]["sequences"] < len(whole) - 1
    capped = load_split(manifest, "train", limit=4)["input_ids"]
    assert capped.tolist() == whole[[0, *[round(i * (len(whole) - 1) / 3) for i in (1, 2)], -1]].tolist()


def test_one_shard_and_four_shards_give_the_same_multiset_of_sequences(demo_assets, tmp_path):
    general = [
        {"text": f"The {w} module provides functions for working with {w} objects."} for w in "abcdefghij" * 8
    ]
    common = {"block_records": 8, "replay_fraction": 0.2}
    one = preprocess_all(
        at(make_cfg(demo_assets, tmp_path, TEXTS, general, num_shards=1, **common), str(tmp_path / "n1"))
    )
    four = preprocess_all(
        at(make_cfg(demo_assets, tmp_path, TEXTS, general, num_shards=4, **common), str(tmp_path / "n4"))
    )
    for split in ("train", "domain_eval", "general_eval"):
        seqs = [Counter(map(tuple, load_split(m, split)["input_ids"].tolist())) for m in (one, four)]
        assert seqs[0] == seqs[1], split
        assert sum(seqs[0].values()) > 0


def test_position_ids_restart_at_every_document(demo_assets, tmp_path, tok):
    cfg = make_cfg(demo_assets, tmp_path, TEXTS, num_shards=1, eval_fraction=0.01)
    data = load_split(preprocess_all(at(cfg, str(tmp_path / "w"))), "train")
    rows = zip(
        data["input_ids"].tolist(),
        data["position_ids"].tolist(),
        data["attention_mask"].tolist(),
        strict=True,
    )
    for ids, pos, mask in rows:
        assert pos[0] == 0
        for i in range(1, sum(mask)):
            # a new document starts right after an EOS; inside a document positions count up
            assert pos[i] == (0 if ids[i - 1] == tok.eos_token_id else pos[i - 1] + 1)


def test_unpacked_text_becomes_overlapping_windows_with_each_token_learned_once(demo_assets, tmp_path, tok):
    long_doc = " ".join(f"HbA1c {i}.{i % 10}% on day {i}." for i in range(60))
    cfg = make_cfg(
        demo_assets,
        tmp_path,
        [{"text": long_doc}],
        num_shards=1,
        eval_fraction=0.001,
        packing=False,
        chunk_stride=16,
    )
    data = load_split(preprocess_all(at(cfg, str(tmp_path / "w"))), "train")
    doc = tok(long_doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    windows = data["input_ids"].tolist()
    assert len(windows) == 1 + -(-(len(doc) - 64) // (64 - 16))
    for w, ids in enumerate(windows):  # window w starts 48 tokens after the previous one
        n = int(data["attention_mask"][w].sum())
        assert ids[:n] == doc[w * 48 : w * 48 + n]
    learned = [t for lab in data["labels"].tolist() for t in lab if t != IGNORE_INDEX]
    assert learned == doc  # every token carries loss exactly once, in order


def test_chunk_stride_must_leave_room():
    with pytest.raises(core.PreprocessError, match="chunk_stride 64 must be"):
        core.chunk_windows(core.Docs.from_lists([[1] * 100]), 64, 64, 0)


# -- splitting the input: each shard reads only its part ---------------------------------------------


def _shard_blocks(uri: str, n: int, block_records: int = 64) -> list[dict]:
    """Per shard: its blocks {key: [texts]} and the bytes it read."""
    from fulltune.config import DataSection
    from fulltune.preprocess import inputs

    out = []
    for i in range(n):
        stats = inputs.ReadStats()
        units = inputs.plan_shard(uri, block_records, i, n, stats)
        blocks = {
            key: [r.text for r in recs]
            for key, recs in inputs.read_blocks(
                units, DataSection(train_uri=uri), "text", block_records, stats
            )
        }
        out.append({"blocks": blocks, "bytes_read": stats.bytes_read})
    return out


def _notes(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = ["HbA1c", "eGFR", "potassium", "creatinine", "review", "stable", "dose", "mg", "daily", "patient"]
    return [{"text": f"note {i}: " + " ".join(rng.choices(words, k=rng.randint(4, 60)))} for i in range(n)]


def test_each_shard_reads_only_its_byte_range_of_a_jsonl_file(tmp_path):
    rows = _notes(24_000)
    uri = write_jsonl(tmp_path / "big.jsonl", rows)
    size = Path(uri).stat().st_size
    one = _shard_blocks(uri, 1)[0]
    four = _shard_blocks(uri, 4)
    # every record is read exactly once, in the same blocks whatever the number of shards
    merged = {k: v for s in four for k, v in s["blocks"].items()}
    assert sum(len(s["blocks"]) for s in four) == len(merged)
    assert merged == one["blocks"]
    assert sorted(t for v in merged.values() for t in v) == sorted(r["text"] for r in rows)
    # a shard's read cost falls to about 1/4: its quarter, the head sample and the read-ahead
    assert one["bytes_read"] >= size
    for s in four:
        assert s["bytes_read"] < 0.35 * size, (s["bytes_read"], size)
    assert sum(s["bytes_read"] for s in four) < 1.2 * size


def test_files_row_groups_and_unsplittable_files_split_the_same_way_for_any_n(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _notes(3000, seed=1)
    d = tmp_path / "mixed"
    d.mkdir()
    write_jsonl(d / "a.jsonl", rows[:1000])
    (d / "b.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps(r) + "\n" for r in rows[1000:1500]).encode())
    )
    pq.write_table(pa.Table.from_pylist(rows[1500:2700]), d / "c.parquet", row_group_size=100)
    write_jsonl(d / "d.jsonl", rows[2700:])
    reference = _shard_blocks(str(d), 1, block_records=40)[0]["blocks"]
    assert sorted(t for v in reference.values() for t in v) == sorted(r["text"] for r in rows)
    for n in (2, 3, 7):
        shards = _shard_blocks(str(d), n, block_records=40)
        merged = {k: v for s in shards for k, v in s["blocks"].items()}
        assert sum(len(s["blocks"]) for s in shards) == len(merged), n
        assert merged == reference, n
        assert all(s["blocks"] for s in shards), n  # every shard has work
    # the Parquet file: a shard reads its own row groups, not the whole file
    pq_only = tmp_path / "pq"
    pq_only.mkdir()
    many = _notes(12_000, seed=3)
    pq.write_table(pa.Table.from_pylist(many), pq_only / "x.parquet", row_group_size=500)
    size = (pq_only / "x.parquet").stat().st_size
    for s in _shard_blocks(str(pq_only), 4, block_records=50):
        assert s["bytes_read"] < 0.4 * size


def test_shards_read_byte_ranges_and_row_groups_from_s3(tmp_path, s3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _notes(4000, seed=2)
    local = tmp_path / "in"
    local.mkdir()
    write_jsonl(local / "a.jsonl", rows[:2500])
    pq.write_table(pa.Table.from_pylist(rows[2500:]), local / "b.parquet", row_group_size=100)
    for name in ("a.jsonl", "b.parquet"):
        storage.upload_file(local / name, f"{s3}/in/{name}")
    expected = _shard_blocks(str(local), 1, block_records=50)[0]["blocks"]
    shards = _shard_blocks(f"{s3}/in", 3, block_records=50)
    merged = {k: v for s in shards for k, v in s["blocks"].items()}
    assert merged == expected
    total = sum(p.stat().st_size for p in local.iterdir())
    assert all(s["bytes_read"] < 0.5 * total for s in shards)


def _long_notes(n: int, chars: int) -> list[dict]:
    words = ["HbA1c", "eGFR", "potassium", "creatinine", "review", "stable", "dose", "mg", "daily"]
    return [
        {"text": f"note {i}: " + " ".join(words[(i + j) % 9] for j in range(chars // 7))} for i in range(n)
    ]


@pytest.mark.parametrize("name", ["long.jsonl", "long.parquet", "long.jsonl.gz"])
def test_a_block_of_long_records_holds_at_most_the_text_cap(tmp_path, name):
    # block_records 2048 of ~600 KB records was one 24 MB block, tokenized and packed at once: a
    # shard's memory grew with the records' length (5 GB for 2,500 records of 50 KB).
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from fulltune.preprocess import inputs

    rows = _long_notes(40, 600_000)
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(body, compresslevel=1) if name.endswith(".gz") else body)
    blocks = _shard_blocks(str(path), 1, block_records=2048)[0]["blocks"]
    assert sorted(t for v in blocks.values() for t in v) == sorted(r["text"] for r in rows)
    assert len(blocks) >= 3
    for texts in blocks.values():
        assert sum(map(len, texts)) <= inputs.BLOCK_TEXT_CAP + 600_000


def test_long_records_give_the_same_sequences_for_any_number_of_shards(demo_assets, tmp_path, monkeypatch):
    from fulltune.preprocess import inputs

    monkeypatch.setattr(inputs, "BLOCK_TEXT_CAP", 20_000)  # blocks of 2-3 records, not 64
    general = [{"text": f"The {w} module provides functions for {w} objects."} for w in "abcdefgh" * 8]
    rows = _long_notes(30, 8_000)
    common = {"block_records": 64, "replay_fraction": 0.2, "max_seq_len": 128, "eval_fraction": 0.2}
    out = {
        n: preprocess_all(
            at(
                make_cfg(demo_assets, tmp_path, rows, general, num_shards=n, **common),
                str(tmp_path / f"n{n}"),
            )
        )
        for n in (1, 3)
    }
    reads = [storage.read_json(RunLayout(str(tmp_path / "n1")).shard_manifest(0))["inputs"]["train"]]
    assert reads[0]["blocks"] >= 10
    for split in ("train", "domain_eval", "general_eval"):
        seqs = [Counter(map(tuple, load_split(m, split)["input_ids"].tolist())) for m in out.values()]
        assert seqs[0] == seqs[1], split
        assert sum(seqs[0].values()) > 0


def test_shards_and_gather_size_s3_inputs_from_the_listing_not_a_head_per_file(demo_assets, tmp_path, s3):
    # A data folder of thousands of objects: every shard (fingerprint, then planning) and gather
    # sized each with a HEAD of its own, minutes of requests per step; the listing holds the sizes.
    rows = _notes(120, seed=3)
    for i in range(40):
        storage.write_bytes(
            f"{s3}/many/part-{i:03d}.jsonl",
            "".join(json.dumps(r) + "\n" for r in rows[i * 3 : i * 3 + 3]).encode(),
        )
    cfg = RunConfig.from_dict(
        {
            "work_dir": str(tmp_path / "work"),
            "model": {"base_model_uri": str(demo_assets.base_model_dir)},
            "data": {"train_uri": f"{s3}/many/"},
            "preprocess": {"max_seq_len": 64, "num_shards": 2, "replay_fraction": 0.0, "block_records": 16},
        }
    )
    heads: list[str] = []
    storage.s3_client().meta.events.register("before-call.s3.HeadObject", lambda **_: heads.append("HEAD"))
    manifest = preprocess_all(cfg)
    assert heads == []
    files = storage.read_json(RunLayout(cfg.work_dir).shard_manifest(0))["fingerprint"]["input_files"][
        "train"
    ]
    assert files[0] == [f"{s3}/many/part-000.jsonl", storage.size(f"{s3}/many/part-000.jsonl")]
    assert len(files) == 40 and sum(m["examples"] for m in manifest["splits"].values()) == 120


def test_shard_manifest_reports_what_the_shard_read(demo_assets, tmp_path):
    one = core.preprocess_shard(
        at(make_cfg(demo_assets, tmp_path, TEXTS, num_shards=1), str(tmp_path / "n1")), 0
    )
    size = (tmp_path / "train.jsonl").stat().st_size
    assert one["inputs"]["train"]["bytes_read"] >= size
    cfg = make_cfg(demo_assets, tmp_path, TEXTS, num_shards=3)
    reads = [core.preprocess_shard(at(cfg, str(tmp_path / "n3")), i)["inputs"]["train"] for i in range(3)]
    assert all(r["blocks"] > 0 and r["bytes_read"] > 0 for r in reads)
    assert sum(r["blocks"] for r in reads) == one["inputs"]["train"]["blocks"]
    assert one["tokenization"]["memoized"] and one["tokenization"]["pieces"] > 0


# -- over-long prompt/completion and chat examples ------------------------------------------------------


def test_overlong_examples_are_truncated_or_dropped_and_counted(demo_assets, tmp_path, tok):
    long_answer = " ".join(f"step {i}: check the potassium level." for i in range(40))
    rows = [{"prompt": f"Q{i}: next step?", "completion": f" Recheck in {i} days."} for i in range(30)]
    rows += [{"prompt": f"L{i}: full protocol?", "completion": f" MARK{i} " + long_answer} for i in range(5)]
    assert len(tok(rows[-1]["prompt"] + rows[-1]["completion"])["input_ids"]) > 64
    results = {}
    for policy in ("truncate", "drop"):
        cfg = make_cfg(demo_assets, tmp_path, rows, num_shards=2, eval_fraction=0.01, overlong=policy)
        work = str(tmp_path / policy)
        manifest = preprocess_all(at(cfg, work))
        shard_counts = [storage.read_json(RunLayout(work).shard_manifest(i))["splits"] for i in range(2)]
        data = load_split(manifest, "train")
        text = tok.decode(data["labels"][data["labels"] != IGNORE_INDEX].tolist())
        results[policy] = (manifest, shard_counts, text)
    manifest, shards, text = results["truncate"]
    long_seen = sum(s[split]["truncated"] for s in shards for split in s)
    assert long_seen == 5 and sum(m["truncated"] for m in manifest["splits"].values()) == 5
    assert all(m["dropped"] == 0 for m in manifest["splits"].values())
    assert "MARK" in text  # the start of a truncated answer is kept
    manifest, shards, text = results["drop"]
    assert sum(s[split]["dropped"] for s in shards for split in s) == 5
    assert sum(m["dropped"] for m in manifest["splits"].values()) == 5
    assert all(m["truncated"] == 0 for m in manifest["splits"].values())
    assert "MARK" not in text and "Recheck in" in text
    train = manifest["splits"]["train"]
    assert train["examples"] - train["dropped"] > 0


def test_every_example_dropped_as_overlong_is_said_so_not_blamed_on_the_eval_split(demo_assets, tmp_path):
    """gather_shards said "is the training data empty after the eval split?" when overlong: drop had
    left nothing, with eval_uri set (no eval split at all): it names what the shards counted."""
    long_answer = " ".join(f"step {i}: check the potassium level." for i in range(40))
    rows = [{"prompt": f"L{i}: full protocol?", "completion": long_answer} for i in range(6)]
    evalset = write_jsonl(tmp_path / "eval.jsonl", rows[:2])
    cfg = make_cfg(demo_assets, tmp_path, rows, overlong="drop").with_overrides(
        {"data.eval_uri": evalset, "work_dir": str(tmp_path / "work")}
    )
    with pytest.raises(core.PreprocessError) as empty:
        preprocess_all(cfg)
    assert str(empty.value) == (
        f"no training sequences were produced from data.train_uri {cfg.data.train_uri}: every one of its 6 "
        "examples is longer than preprocess.max_seq_len 64 and preprocess.overlong is drop; raise max_seq_len "
        "or set overlong: truncate"
    )


def test_every_example_dropped_under_truncate_is_not_told_to_set_truncate(demo_assets, tmp_path):
    """With overlong: truncate an example is dropped only when its prompt fills max_seq_len before an
    answer too long to fit; when that empties the training split, the message said "overlong is drop;
    ... set overlong: truncate", the setting already in force."""
    history = " ".join(f"day {i}: potassium {4 + i % 3}.{i % 10} mmol/L." for i in range(40))
    long_answer = " ".join(f"step {i}: recheck." for i in range(60))
    rows = [{"prompt": f"{history} L{i}:", "completion": long_answer} for i in range(6)]
    evalset = write_jsonl(tmp_path / "eval.jsonl", rows[:2])
    cfg = make_cfg(demo_assets, tmp_path, rows).with_overrides(
        {"data.eval_uri": evalset, "work_dir": str(tmp_path / "work")}
    )
    assert cfg.preprocess.overlong == "truncate"
    with pytest.raises(core.PreprocessError) as empty:
        preprocess_all(cfg)
    assert str(empty.value) == (
        f"no training sequences were produced from data.train_uri {cfg.data.train_uri}: every one of its 6 "
        "examples is longer than preprocess.max_seq_len 64 with a prompt that fills it before an answer too "
        "long to fit, so truncating leaves no answer token to learn from; raise max_seq_len or shorten the "
        "prompts"
    )


def test_the_dataset_manifest_warns_of_a_general_set_too_small_to_measure_or_replay(
    demo_assets, tmp_path, caplog
):
    """A 4-record general set: general_eval is a sequence or two (forgetting's interval is noise) and
    replay repeats the rest hundreds of times an epoch; without one, forgetting is not measured."""
    rows = [
        {"text": f"note {i}: the patient takes metformin twice daily and the kidney is normal."}
        for i in range(400)
    ]
    general = [{"text": f"rome is a city number {i}"} for i in range(4)]
    cfg = make_cfg(demo_assets, tmp_path, rows, general, replay_fraction=0.2, general_eval_fraction=0.5)
    manifest = preprocess_all(at(cfg, str(tmp_path / "tiny")))
    few, small, repeated = manifest["warnings"]
    # the domain eval set, 5% of 400 short notes packed, is a sequence or two as well
    assert few == (
        f"domain_eval has {manifest['splits']['domain_eval']['sequences']} sequences, fewer than 50: the "
        "domain gain, the champion comparison and their confidence intervals rest on a handful of "
        "sequences; set data.eval_uri or raise preprocess.eval_fraction"
    )
    held = manifest["splits"]["general_eval"]["sequences"]
    assert small == (
        f"general_eval has {held} sequences, fewer than 50: the forgetting figures and their confidence "
        "interval are noise; add general data"
    )
    replay = manifest["replay"]
    assert replay["pool_tokens"] and replay["replay_tokens"] / replay["pool_tokens"] > 100
    assert repeated.startswith(f"replay: the pool of {replay['pool_tokens']:,} tokens is replayed ~")
    assert small in caplog.text and repeated in caplog.text

    without = preprocess_all(at(make_cfg(demo_assets, tmp_path, rows), str(tmp_path / "none")))
    assert without["warnings"] == [
        few,
        "no general set (data.general_uri): forgetting will not be measured and nothing is replayed",
    ]


def test_truncation_cuts_the_prompt_so_the_answer_is_learned(demo_assets, tmp_path, tok):
    """An over-long example whose answer fits loses the start of its prompt, not its answer; one whose
    prompt alone fills max_seq_len before an answer too long to fit would keep no loss token: it is
    dropped and counted as dropped, never trained on."""
    history = " ".join(f"day {i}: potassium {4 + i % 3}.{i % 10} mmol/L." for i in range(40))
    long_answer = " ".join(f"step {i}: recheck." for i in range(60))
    answers = [f" ANSWER{i} recheck in {i} days." for i in range(10)]
    rows = [{"prompt": f"{history} Q{i}: next step?", "completion": a} for i, a in enumerate(answers)]
    rows += [{"prompt": f"{history} L{i}:", "completion": " NOLOSS " + long_answer} for i in range(3)]
    assert len(tok(history)["input_ids"]) > 64 and len(tok(long_answer)["input_ids"]) > 64
    cfg = make_cfg(demo_assets, tmp_path, rows, num_shards=1, eval_fraction=0.01, packing=False)
    manifest = preprocess_all(at(cfg, str(tmp_path / "w")))
    splits = manifest["splits"]
    assert sum(s["truncated"] for s in splits.values()) == 10
    assert sum(s["dropped"] for s in splits.values()) == 3
    text = ""
    for name in ("train", "domain_eval"):
        data = load_split(manifest, name)
        assert ((data["labels"] != IGNORE_INDEX).sum(dim=1) > 0).all(), name  # no sequence without loss
        text += tok.decode(data["labels"][data["labels"] != IGNORE_INDEX].tolist())
    assert all(a in text for a in answers) and "NOLOSS" not in text


def _tokenizer_adding_bos(tok, path: Path) -> str:
    """The demo tokenizer as Llama's behaves: its own call puts a BOS before every text."""
    from tokenizers import processors

    bos = copy.deepcopy(tok)
    bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.eos_token_id)]
    )
    bos.save_pretrained(path)
    return str(path)


def test_documents_start_with_the_bos_the_tokenizer_adds(demo_assets, tmp_path, tok):
    """What `tok(text)` gives a model at the start of every document in pretraining, each text and
    prompt/completion document starts with (Llama, Mistral, Gemma): also one whose prompt was cut
    from the left to fit. The BOS is context, never a target."""
    bos_tok = _tokenizer_adding_bos(tok, tmp_path / "bos-tokenizer")
    bos = tok.eos_token_id  # GPT-2's habit: one token for both
    history = " ".join(f"day {i}: potassium {4 + i % 3}.{i % 10} mmol/L." for i in range(40))
    kinds = {
        "text": TEXTS[:40],
        "prompt_completion": [{"prompt": f"Q{i}: dose?", "completion": " 5 mg daily."} for i in range(20)]
        + [{"prompt": f"{history} Q{i}:", "completion": " recheck."} for i in range(5)],
    }
    for kind, rows in kinds.items():
        (tmp_path / kind).mkdir()
        cfg = make_cfg(demo_assets, tmp_path / kind, rows, num_shards=1, eval_fraction=0.01, packing=False)
        cfg = cfg.with_overrides({"model.tokenizer_uri": bos_tok})
        data = load_split(preprocess_all(at(cfg, str(tmp_path / kind / "w"))), "train")
        starts = (data["position_ids"] == 0) & (data["attention_mask"] == 1)
        assert starts[:, 0].all(), kind  # one document a row: each starts the row
        assert (data["input_ids"][:, 0] == bos).all(), kind
        assert (data["labels"][:, 0] == IGNORE_INDEX).all(), kind
        assert (data["input_ids"][:, 1] != bos).all(), kind  # not twice
    chat = core.Encoder(core.load_tokenizer(cfg))
    assert chat.lead == [bos] and core.document_lead("chat", chat) == []  # a chat template renders its own
    assert core.Encoder(tok).lead == []  # a tokenizer adding none: documents as before


def test_a_tokenizer_adding_bos_and_eos_still_starts_documents_with_its_bos(tok, tmp_path):
    """Llama 2's tokenizer with add_eos_token puts a BOS before a text and an EOS after it: its
    documents start with the BOS as well (they were left without one, unlike pretraining's)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    both = copy.deepcopy(tok)
    bos = tok.pad_token_id  # an id of its own, to tell the BOS from the EOS
    both.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|pad|> $A <|endoftext|>",
        special_tokens=[("<|pad|>", bos), ("<|endoftext|>", tok.eos_token_id)],
    )
    both.save_pretrained(tmp_path / "both")
    both = AutoTokenizer.from_pretrained(tmp_path / "both")
    assert both("a")["input_ids"][0] == bos and both("a")["input_ids"][-1] == tok.eos_token_id
    enc = core.Encoder(both)
    assert enc.lead == [bos]
    docs = core.tokenize([Record("text", Location("x"), text="HbA1c 7.2%")], "text", enc, False)
    ids = docs.prefixed(core.document_lead("text", enc)).ids.tolist()
    assert ids == both("HbA1c 7.2%")["input_ids"]  # BOS, the text, one EOS: what pretraining saw


def _sentencepiece_style_tokenizer():
    """A BPE tokenizer whose pre-tokenizer puts SentencePiece's space marker before every text it is
    given, as Llama 2's and Mistral's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Q: what is the dose?\nA: 12 mg daily. Summarize: the dose is 5 mg of metformin."] * 20
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize(
    ("prompt", "completion"),
    [("Q: what is the dose?\n", "12 mg daily."), ("A:", "12"), ("Summarize:", "\nthe dose is 5 mg.")],
)
def test_a_completion_is_tokenized_as_it_follows_its_prompt(prompt, completion):
    """Encoded alone, a completion got the space marker a SentencePiece-style tokenizer puts before
    every text: the model learned "dose?\n 12 mg" and to start each answer with a space the data
    does not have. The document is now the prompt and its completion as one text gives them."""
    sp = _sentencepiece_style_tokenizer()
    record = Record("prompt_completion", Location("x"), prompt=prompt, completion=completion)
    docs = core.tokenize([record], "prompt_completion", core.Encoder(sp), False)
    ids, labels = docs.ids.tolist(), docs.labels.tolist()
    assert sp.decode(ids) == prompt + completion + "</s>"
    assert ids[:-1] == sp(prompt + completion, add_special_tokens=False)["input_ids"]
    assert (
        sp.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
        == completion + "</s>"
    )


def test_best_fit_packs_sft_lengths_to_at_least_95_percent():
    import random

    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(5.0, 0.6)) + 8 for _ in range(2048)]
    lengths = [min(n, 1024) for n in lengths]
    bins = core.best_fit_decreasing(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert sum(lengths) / (len(bins) * 1024) >= 0.95


def test_encoder_gives_the_tokenizer_call_ids(tok):
    texts = ["HbA1c 7.2% <|endoftext|> eGFR 45", "  leading spaces", "ünïcödé — dash", "a\nb\n\n"]
    assert core.Encoder(tok)(texts) == [list(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]


def test_memoised_tokenization_gives_the_tokenizers_documents(tok):
    from fulltune.demo.assets import clinical_notes, stdlib_paragraphs

    texts = clinical_notes(300, 7) + stdlib_paragraphs()[:200] + ["a\n\n  b <|endoftext|> c", " x  y "]
    fast = core.Encoder(tok)
    assert fast.memo is not None  # the demo's byte-level BPE qualifies
    docs = fast.documents(texts)
    want = core.Encoder(tok, memoize=False).documents(texts)
    assert docs.ids.tolist() == want.ids.tolist() and docs.offsets.tolist() == want.offsets.tolist()
    assert docs.ids.flags.writeable
    stats = fast.stats()
    assert stats["memoized"] and stats["pieces_encoded"] < stats["pieces"]


def test_the_gather_step_refuses_a_dataset_with_an_empty_eval_split_before_training(demo_assets, tmp_path):
    """evaluate refuses a dataset whose domain_eval (or, with a general set, general_eval) split has no
    sequences, which it learned only after training: the gather step refuses it, saying why."""
    from fulltune import steps

    rows = [{"text": f"note {i}: potassium stable."} for i in range(10)]
    general = [{"text": f"rome is a city number {i}"} for i in range(3)]
    cfg = make_cfg(demo_assets, tmp_path, rows, general, eval_fraction=0.01, general_eval_fraction=0.01)
    assert all(core.stable_fraction(r["text"], "0") >= 0.01 for r in rows)
    assert all(core.stable_fraction(g["text"], "0/general") >= 0.01 for g in general)
    cfg = at(cfg, str(tmp_path / "w"))
    manifests = [steps.preprocess_shard(cfg, i) for i in range(cfg.preprocess.num_shards)]
    with pytest.raises(core.PreprocessError) as empty:
        steps.gather_shards(cfg, manifests)
    assert str(empty.value) == (
        "domain_eval has no sequences: preprocess.eval_fraction 0.01 held out 0 of the 10 examples of "
        "data.train_uri (each by the hash of its prompt); evaluate measures the domain gain on it: set "
        "data.eval_uri or raise preprocess.eval_fraction; general_eval has no sequences: "
        f"preprocess.general_eval_fraction 0.01 held out 0 records of data.general_uri {cfg.data.general_uri}; "
        "evaluate measures forgetting on it: add general data or raise preprocess.general_eval_fraction"
    )
    from fulltune.evaluate.core import EvaluateError, _read_splits
    from fulltune.preprocess.dataset import load_manifest

    with pytest.raises(EvaluateError, match="the domain_eval split has no sequences"):
        _read_splits(load_manifest(cfg.layout.dataset_manifest), 100, True)  # what training would reach

    evalset = write_jsonl(tmp_path / "eval.jsonl", [{"text": "note: potassium 4.1."}])
    held = cfg.with_overrides({"data.eval_uri": evalset, "preprocess.general_eval_fraction": 0.9})
    manifests = [steps.preprocess_shard(held, i) for i in range(held.preprocess.num_shards)]
    assert steps.gather_shards(held, manifests) == held.layout.dataset_manifest


def _random_words(chars: int, seed: int) -> str:
    """Words that hardly repeat: the memo hands such texts to the tokenizer whole."""
    import random

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(chars // 7))


@pytest.mark.parametrize("memoize", [True, False])
def test_a_block_of_long_texts_is_tokenized_a_bounded_number_of_characters_at_a_time(tok, memoize):
    # A block went to the tokenizer in one call, whose encodings take ~150 bytes a character: 8 MB
    # of text took 1.2 GB at once. Calls now get at most memo.ENCODE_CHARS characters; with the memo,
    # a longer text too, cut where the memo cuts, which keeps the tokenizer's ids.
    from fulltune.tokenizer import memo

    texts = [_random_words(400_000, i) for i in range(4)]
    if memoize:
        texts.append(_random_words(1_500_000, 99))
    enc = core.Encoder(tok, memoize=memoize)
    calls: list[int] = []

    def counted(call):
        def run(batch, **kw):
            calls.append(sum(map(len, batch)))
            return call(batch, **kw)

        return run

    if memoize:
        enc.memo._batch = counted(enc.memo._batch)
    else:
        enc._encode = counted(enc._encode)
    docs = enc.documents(texts)
    assert sum(calls) >= sum(map(len, texts)) and max(calls) <= memo.ENCODE_CHARS
    for i, text in enumerate(texts):
        want = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert docs.ids[docs.offsets[i] : docs.offsets[i + 1]].tolist() == want, i
