"""validate_data's per-code policies (data.checks), content checks, new inputs and the histogram."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fulltune.config import ConfigError, RunConfig
from fulltune.data.records import iter_records, resolve_kind
from fulltune.data.validate import (
    DataValidationError,
    find_sensitive,
    length_histogram,
    validate_data,
)


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def cfg(train: str, **data: Any) -> RunConfig:
    return RunConfig.from_dict({"data": {"train_uri": train, **data}})


def problems(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["code"]: p for p in report["datasets"]["train"]["problems"]}


GOOD = [{"text": f"document number {i} about glucose"} for i in range(8)]
SVG = "{http://www.w3.org/2000/svg}"


def test_default_policies_are_in_the_report(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", GOOD)
    report = validate_data(cfg(train), tmp_path / "out")
    checks = report["checks"]
    assert checks["invalid_json"] == {"action": "fail", "max_rate": None}
    assert checks["secret_aws_key"] == {"action": "fail", "max_rate": 0.0}
    assert checks["duplicate"] == {"action": "fail", "max_rate": 0.5}  # more than half repeats: refused
    assert checks["pii_email"] == {"action": "warn", "max_rate": None}
    assert "no_data" not in checks  # fatal codes have no policy


def test_per_code_fail_policy_fails_only_above_its_rate(tmp_path):
    rows = [*GOOD, {"text": "mail jane@example.org"}, {"text": "mail bob@example.org"}]  # 2 of 10
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    strict = {"pii_email": {"action": "fail", "max_rate": 0.1}}
    with pytest.raises(DataValidationError) as info:
        validate_data(cfg(train, checks=strict), tmp_path / "fail")
    message = str(info.value)
    assert message.splitlines()[0] == (
        "validate_data failed: train: pii_email in 2 of 10 records (20.00% > allowed 10.00%)"
    )
    assert f"{train}:9: pii_email: j***@e***.org at character 5" in message
    assert "jane@example.org" not in message
    p = problems(json.loads((tmp_path / "fail" / "report.json").read_text()))["pii_email"]
    assert (p["action"], p["count"], p["rate"], p["max_rate"], p["exceeded"]) == ("fail", 2, 0.2, 0.1, True)

    report = validate_data(
        cfg(train, checks={"pii_email": {"action": "fail", "max_rate": 0.2}}), tmp_path / "ok"
    )
    assert report["passed"] and problems(report)["pii_email"]["exceeded"] is False


def test_a_max_rate_alone_is_a_limit_and_a_max_rate_beside_warn_is_refused(tmp_path):
    """`{duplicate: {max_rate: 0.2}}` asks for a tighter limit than the default half; it took the
    default action 'warn' with it and passed 2 repeats in 3. A rate alone now means fail above it;
    a rate beside warn or ignore, which nothing would read, is refused naming the field."""
    train = write_jsonl(tmp_path / "t.jsonl", GOOD * 3)
    with pytest.raises(DataValidationError) as info:
        validate_data(cfg(train, checks={"duplicate": {"max_rate": 0.2}}), tmp_path / "out")
    assert str(info.value).splitlines()[0] == (
        "validate_data failed: train: duplicate in 16 of 24 records (66.67% > allowed 20.00%)"
    )
    for action in ("warn", "ignore"):
        with pytest.raises(ConfigError, match=r"  data\.checks\.duplicate\.max_rate: only action 'fail' has"):
            cfg(train, checks={"duplicate": {"action": action, "max_rate": 0.2}})


def test_warn_and_ignore_take_record_errors_out_of_the_budget(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [*GOOD, "{broken"])
    with pytest.raises(DataValidationError):
        validate_data(cfg(train), tmp_path / "a")
    report = validate_data(cfg(train, checks={"invalid_json": {"action": "warn"}}), tmp_path / "b")
    d = report["datasets"]["train"]
    assert (d["passed"], d["bad_records"], d["budget_bad_records"]) == (True, 1, 0)
    assert problems(report)["invalid_json"]["action"] == "warn"
    report = validate_data(cfg(train, checks={"invalid_json": {"action": "ignore"}}), tmp_path / "c")
    assert "invalid_json" not in problems(report) and report["datasets"]["train"]["bad_records"] == 1
    # preprocessing skips the unusable record either way
    assert len(list(iter_records(train, cfg(train).data))) == len(GOOD)


def test_secrets_fail_by_default_and_can_be_downgraded(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [*GOOD, {"text": "key AKIAIOSFODNN7EXAMPLE here"}])
    with pytest.raises(DataValidationError) as info:
        validate_data(cfg(train), tmp_path / "a")
    assert f"{train}:9: secret_aws_key: AKIA************MPLE at character 4" in str(info.value)
    report = validate_data(cfg(train, checks={"secret_aws_key": {"action": "warn"}}), tmp_path / "b")
    assert report["passed"]


@pytest.mark.parametrize(
    ("checks", "needle"),
    [({"no_data": {"action": "warn"}}, "is fatal"), ({"nonsense": {"action": "warn"}}, "unknown code")],
)
def test_bad_check_names_are_refused_when_the_config_is_read(tmp_path, checks, needle):
    """Before validate_data runs (on a cluster, after the run was created), naming the key."""
    train = write_jsonl(tmp_path / "t.jsonl", GOOD)
    with pytest.raises(ConfigError, match=rf"  data\.checks\.{next(iter(checks))}: .*{needle}"):
        cfg(train, checks=checks)


def test_policy_fields_are_validated():
    with pytest.raises(ConfigError, match="data.checks"):
        RunConfig.from_dict({"data": {"checks": {"pii_email": {"action": "explode"}}}})


def test_length_limits(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "short"}, {"text": "x" * 50}, GOOD[0]])
    report = validate_data(cfg(train, min_chars=10, max_chars=40), tmp_path / "out")
    got = problems(report)
    assert got["too_short"]["examples"] == [
        {"location": f"{train}:1", "reason": "5 characters < data.min_chars 10"}
    ]
    assert got["too_long"]["examples"] == [
        {"location": f"{train}:2", "reason": "50 characters > data.max_chars 40"}
    ]


def test_sensitive_data_is_masked():
    text = (
        "jane.doe@example.com, +1 415-555-2671, 4111-1111-1111-1111, AKIAIOSFODNN7EXAMPLE, "
        "-----BEGIN OPENSSH PRIVATE KEY-----"
    )
    found = dict(find_sensitive(text))
    assert found == {
        "secret_aws_key": "AKIA************MPLE at character 60",
        "secret_private_key": "-----BEGIN OPENSSH PRIVATE KEY----- block at character 82",
        "pii_email": "j***@e***.com at character 0",
        "pii_card": "************1111 at character 39",
        "pii_phone": "*********71 at character 22",
    }
    # numbers that are not cards (Luhn fails) or phones
    assert find_sensitive("order 4111 1111 1111 1112, version 1.2.3, year 2024") == []


def test_tokenizer_special_tokens_are_checked_when_loadable(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="<|domain_eos|>")
    tok.save_pretrained(tmp_path / "tok")
    train = write_jsonl(tmp_path / "t.jsonl", [*GOOD, {"text": "ends here<|domain_eos|>"}])
    base = {"data": {"train_uri": train}}

    report = validate_data(
        RunConfig.from_dict({**base, "model": {"tokenizer_uri": str(tmp_path / "tok")}}), tmp_path / "a"
    )
    assert report["tokenizer_special_tokens"] >= 2
    assert problems(report)["special_token_text"]["examples"] == [
        {"location": f"{train}:9", "reason": "'<|domain_eos|>' at character 9"}
    ]
    # no tokenizer there: the fixed list still applies, nothing fails
    report = validate_data(
        RunConfig.from_dict({**base, "model": {"tokenizer_uri": str(tmp_path / "none")}}), tmp_path / "b"
    )
    assert report["tokenizer_special_tokens"] == 0 and "special_token_text" not in problems(report)


def test_near_duplicates_are_optional_and_deterministic(tmp_path):
    words = [f"word{i}" for i in range(120)]
    a = " ".join(words)
    b = " ".join(words[:60] + ["changed"] + words[61:])
    c = " ".join(reversed(words))
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": a}, {"text": c}, {"text": b}])
    assert "near_duplicate" not in problems(validate_data(cfg(train), tmp_path / "off"))
    runs = [problems(validate_data(cfg(train, near_duplicates=True), tmp_path / f"on{i}")) for i in range(2)]
    assert runs[0]["near_duplicate"] == runs[1]["near_duplicate"]
    assert runs[0]["near_duplicate"]["examples"] == [
        {"location": f"{train}:3", "reason": f"nearly the same words as {train}:1"}
    ]


def test_near_duplicate_index_keeps_under_a_kilobyte_per_record():
    # Documented as ~512 bytes a record (the signature), the index took ~3 KB: a tuple key and a
    # bytes object per band in a dict, ~600 MB at NEAR_DUP_MAX_INDEXED rather than ~100.
    import random
    import tracemalloc

    from fulltune.data.validate.near_duplicates import NearDuplicates

    rng = random.Random(4)
    vocabulary = [f"w{i}" for i in range(5000)]
    texts = [" ".join(rng.choices(vocabulary, k=40)) for _ in range(8192)]  # whole signature arrays
    tracemalloc.start()
    try:
        index = NearDuplicates()
        found = [index.check(t, f"/data/train-00001.jsonl:{i + 1}") for i, t in enumerate(texts)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert found == [None] * len(texts) and len(index.locations) == len(texts)
    assert held / len(texts) < 1024
    copy = texts[7].split()
    copy[3] = "changed"
    assert index.check(" ".join(copy), "/data/eval.jsonl:1") == "/data/train-00001.jsonl:8"


def test_csv_and_hf_save_to_disk_inputs(tmp_path):
    (tmp_path / "t.csv").write_text('prompt,completion\n"What is 2+2?","4"\n"Say ""hi""",hi\n')
    data = cfg(str(tmp_path / "t.csv")).data
    assert resolve_kind(str(tmp_path / "t.csv"), data) == "prompt_completion"
    got = [(str(r.loc), r.prompt, r.completion) for r in iter_records(str(tmp_path / "t.csv"), data)]
    assert got == [
        (f"{tmp_path / 't.csv'}:2", "What is 2+2?", "4"),
        (f"{tmp_path / 't.csv'}:3", 'Say "hi"', "hi"),
    ]

    d = tmp_path / "hf"
    d.mkdir()
    table = pa.table({"text": ["first", "second", "third"]})
    with (
        pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)
    (d / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (d / "dataset_info.json").write_text("{}")
    arrow = d / "data-00000-of-00001.arrow"
    assert [(str(r.loc), r.text) for r in iter_records(str(d), data)] == [
        (f"{arrow} row 0", "first"),
        (f"{arrow} row 1", "second"),
        (f"{arrow} row 2", "third"),
    ]
    table = pa.table({"text": ["first", "first"]})
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    report = validate_data(cfg(str(d)), tmp_path / "out")
    assert problems(report)["duplicate"]["examples"] == [
        {"location": f"{arrow} row 1", "reason": f"same content as {arrow} row 0"}
    ]


def test_a_csv_header_naming_a_column_twice_is_refused_naming_it(tmp_path):
    """Which of two `text` columns holds the documents is ambiguous (the reader kept the last one,
    the other column never read); blank header cells, a spreadsheet's unnamed columns, are no name."""
    path = tmp_path / "t.csv"
    path.write_text("text,source,text\nthe title,web,the document body\n")
    with pytest.raises(DataValidationError) as info:
        validate_data(cfg(str(path)), tmp_path / "out")
    assert (
        f"{path}:1: unreadable_file: column 'text' appears more than once: which one holds the records "
        "is ambiguous" in str(info.value)
    )
    path.write_text(",text,\n1,the document body,\n")
    assert validate_data(cfg(str(path)), tmp_path / "out")["datasets"]["train"]["records"] == 1


def test_a_csv_document_longer_than_the_csv_modules_field_limit_stays_one_record(tmp_path):
    """Python's csv refuses fields over 128 KiB and reads on from inside them; a 211k-character
    document with newlines must stay one record (its length is data.max_chars' to judge), also
    gzipped, and a directory's .csv.gz files are data too."""
    import gzip

    long_doc = "\n".join(f"Line {i} of a long discharge summary, HbA1c 7.1%." for i in range(4200))
    assert len(long_doc) > 211_000
    rows = [f"document {i} about glucose" for i in range(5)]
    body = "text\n" + "".join(f'"{t}"\n' for t in [*rows[:2], long_doc, *rows[2:]])
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "t.csv").write_text(body)
    (tmp_path / "zipped").mkdir()
    (tmp_path / "zipped" / "t.csv.gz").write_bytes(gzip.compress(body.encode()))
    for folder in ("plain", "zipped"):
        uri = str(tmp_path / folder)
        texts = [r.text for r in iter_records(uri, cfg(uri).data)]
        assert texts == [*rows[:2], long_doc, *rows[2:]], folder
        report = validate_data(cfg(uri), tmp_path / f"out-{folder}")
        train = report["datasets"]["train"]
        assert (train["records"], train["bad_records"]) == (6, 0), folder


def test_length_histogram_in_report_and_html(tmp_path):
    rows = [{"text": "x" * n} for n in (1, 3, 3, 40)]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    report = validate_data(cfg(train), tmp_path / "out")
    assert report["datasets"]["train"]["length_histogram"] == [
        {"lo": 1, "hi": 1, "count": 1},
        {"lo": 2, "hi": 3, "count": 2},
        {"lo": 4, "hi": 7, "count": 0},
        {"lo": 8, "hi": 15, "count": 0},
        {"lo": 16, "hi": 31, "count": 0},
        {"lo": 32, "hi": 63, "count": 1},
    ]
    page = (tmp_path / "out" / "report.html").read_text()
    (svg,) = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    chart = ET.fromstring(svg)
    bars = [r for r in chart.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert [b.find(f"{SVG}title").text for b in bars][1] == "2–3 chars: 2 records" and len(bars) == 6
    labels = {t.get("class"): t.text for t in chart.iter(f"{SVG}text")}  # the axes are labelled
    assert labels["axis-title x"] == "characters per record" and labels["axis-title y"] == "records"
    assert length_histogram([]) == []


def test_csv_chat_column_holds_the_conversation_as_json(tmp_path):
    import csv

    hba1c = [
        {"role": "system", "content": "You are a clinician."},
        {"role": "user", "content": "What is HbA1c?"},
        {"role": "assistant", "content": "Glycated haemoglobin, a three-month glucose average."},
    ]
    rows = [
        ["id", "conversation"],
        ["1", json.dumps(hba1c)],
        ["2", '[{"role": "user", "content": "unfinished'],  # not valid JSON
        ["3", json.dumps({"role": "user", "content": "hi"})],  # JSON, but not a list of turns
        ["4", json.dumps([{"role": "user", "content": "hi"}])],  # no assistant turn
        [
            "5",
            json.dumps([{"role": "user", "content": "multi\nline"}, {"role": "assistant", "content": "ok"}]),
        ],
        ["6", json.dumps(hba1c)],
    ]
    path = tmp_path / "chat.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    c = cfg(str(path), messages_field="conversation", max_examples=5)

    assert [(str(r.loc), r.messages) for r in iter_records(str(path), c.data)] == [
        (f"{path}:2", hba1c),
        (f"{path}:6", [{"role": "user", "content": "multi\nline"}, {"role": "assistant", "content": "ok"}]),
        (f"{path}:7", hba1c),
    ]
    with pytest.raises(DataValidationError) as info:
        validate_data(c, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    d = report["datasets"]["train"]
    assert (d["kind"], d["records"], d["bad_records"]) == ("chat", 6, 3)
    got = problems(report)
    assert got["bad_chat"]["examples"] == [
        {
            "location": f"{path}:3",
            "reason": "field 'conversation' is not valid JSON: column 30: Unterminated string starting",
        },
        {
            "location": f"{path}:4",
            "reason": "field 'conversation' must be a non-empty list of {role, content}",
        },
        {"location": f"{path}:5", "reason": "no assistant turn: nothing to learn from"},
    ]
    assert got["duplicate"]["examples"] == [{"location": f"{path}:7", "reason": f"same content as {path}:2"}]
    assert f"{path}:3: bad_chat: field 'conversation' is not valid JSON" in str(info.value)


def test_chat_records_without_the_messages_field_say_it_is_missing_and_what_they_have(tmp_path):
    """ShareGPT-style data keeps its turns under 'conversations': with record_kind chat every record
    was 'must be a non-empty list of {role, content}', as if the turns were malformed; it is the
    field that is missing, as for the other kinds, with the fields the record has."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"conversations": turns, "id": 1}])
    with pytest.raises(DataValidationError) as info:
        validate_data(cfg(path, record_kind="chat"), tmp_path / "out")
    assert f"{path}:1: missing_field: field 'messages' is missing (have: ['conversations', 'id'])" in str(
        info.value
    )


# -- each content check defined once (fulltune.data.validate.content) --------------------------------

TRIGGERS = {
    "control_chars": "a bell \x07 here",
    "mojibake": "caf\u00c3\u00a9 garbled",
    "too_short": "ab",
    "too_long": "a very long document " * 4,
    "special_token_text": "stray <|im_end|> token",
    "secret_aws_key": "key AKIAIOSFODNN7EXAMPLE leaked",
    "secret_private_key": "-----BEGIN RSA PRIVATE KEY-----",
    "pii_email": "write to jane.doe@example.com",
    "pii_card": "card 4111 1111 1111 1111 on file",
    "pii_phone": "call (415) 555-2671 now",
}


def content_checks(**data: Any) -> tuple[Any, ...]:
    from fulltune.data.validate.content import special_token_strings, text_checks

    return text_checks(cfg("unused", **data).data, special_token_strings())


def test_every_content_check_reports_its_trigger_and_its_prefilter_clears_plain_text():
    from fulltune.data.fastcheck import Utf8Column

    plain = "An ordinary sentence about glucose, version 1.2.3, measured at 120 mg."
    checks = content_checks(min_chars=3, max_chars=70)
    assert {code for check in checks for code in check.codes} == set(TRIGGERS)
    for check in checks:
        triggers = [TRIGGERS[code] for code in check.codes]
        assert check.find(plain) == []
        assert check.rows(Utf8Column(pa.array([plain]))).tolist() == [False], check.codes
        assert check.rows(Utf8Column(pa.array(triggers))).all(), check.codes
        for code, text in zip(check.codes, triggers, strict=True):
            assert code in {c for c, _ in check.find(text)}


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.lists(
            st.sampled_from(
                list("ab 0123456789-.()+@AKISP<|>[]/\t\n\x07\x85\x7f\ufffd\u00c3\u00a9\u0665\uff15\u3000é東")
                + ["<|im_end|>", "[INST]", "AKIAIOSFODNN7EXAMPLE", "-----BEGIN PRIVATE KEY-----", "x@y.co"]
                + [
                    "555 123-4567",
                    "4111111111111111",
                    "\u00c3\u00a9",
                    "\u00e2\u20ac\u2122",
                    "\u0665\u0665\u0665 \u0661\u0662\u0663-4567",
                ]
            ),
            max_size=40,
        ).map("".join),
        min_size=1,
        max_size=20,
    )
)
def test_each_prefilter_keeps_every_row_its_exact_check_reports_on(texts):
    """The column-wise path runs a check's exact test only on the rows its prefilter keeps."""
    from fulltune.data.fastcheck import Utf8Column

    col = Utf8Column(pa.array(texts))
    for check in content_checks(min_chars=3, max_chars=30):
        kept = check.rows(col)
        for i, text in enumerate(texts):
            found = check.find(text)
            assert {code for code, _ in found} <= set(check.codes)
            assert kept[i] or not found, (check.codes, text)


@pytest.mark.parametrize("fast", [True, False])
def test_both_paths_run_the_content_checks_of_the_registry(tmp_path, monkeypatch, fast):
    """A check added to `text_checks` is run by the column-wise and the record-by-record path."""
    from fulltune.data.validate import content, rows

    def find_forbidden(text: str) -> list[tuple[str, str]]:
        at = text.find("forbidden")
        return [("control_chars", f"the word at character {at}")] if at >= 0 else []

    forbidden = content.TextCheck(
        ("control_chars",), find_forbidden, lambda col: col.literal_rows((b"forbidden",))
    )
    monkeypatch.setattr(rows, "text_checks", lambda c, special: (forbidden,))
    train = write_jsonl(tmp_path / "t.jsonl", [*GOOD[:3], {"text": "a forbidden word"}, GOOD[3]])
    report = validate_data(cfg(train), tmp_path / "out", fast=fast)
    assert problems(report)["control_chars"]["examples"] == [
        {"location": f"{train}:4", "reason": "the word at character 2"}
    ]
