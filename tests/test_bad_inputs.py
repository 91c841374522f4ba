"""A corpus of malformed inputs, generated here: each yields its exact problem code and location,
never an uncaught exception, and validate_data writes nothing to the run's work_dir."""

from __future__ import annotations

import csv
import gzip
import io
import json
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fulltune import storage
from fulltune.config import RunConfig
from fulltune.data.records import iter_raw
from fulltune.data.validate import DataValidationError, validate_data


@dataclass
class Case:
    uri: str
    code: str
    location: str  # of the first example of `code`
    passes: bool = False  # validation passes (the code is a warning)
    data: dict[str, Any] = field(default_factory=dict)  # extra data.* settings
    secret: str | None = None  # must appear nowhere in the report or the message


CASES: dict[str, Callable[[Path], Case]] = {}


def case(fn: Callable[[Path], Case]) -> Callable[[Path], Case]:
    CASES[fn.__name__] = fn
    return fn


def lines(path: Path, *rows: Any, newline: str = "\n", prefix: bytes = b"") -> str:
    body = newline.join(r if isinstance(r, str) else json.dumps(r) for r in rows) + newline
    path.write_bytes(prefix + body.encode("utf-8"))
    return str(path)


def conversation(path: Path, *roles: str) -> str:
    """One chat record whose turns come from `roles` in this order, with contents a, b, c, ..."""
    turns = [{"role": role, "content": string.ascii_lowercase[i]} for i, role in enumerate(roles)]
    return lines(path, {"messages": turns})


def parquet(path: Path, table: pa.Table) -> str:
    pq.write_table(table, path)
    return str(path)


OK = {"text": "a perfectly ordinary training document"}


@case
def truncated_gzip(tmp: Path) -> Case:
    body = "".join(json.dumps({"text": f"record {i} " * 8}) + "\n" for i in range(2000)).encode()
    p = tmp / "t.jsonl.gz"
    data = gzip.compress(body)
    p.write_bytes(data[: len(data) // 2])
    return Case(str(p), "unreadable_file", "")  # location checked in the test: the line after the last read


@case
def not_gzip_at_all(tmp: Path) -> Case:
    p = tmp / "t.jsonl.gz"
    p.write_bytes(b'{"text": "plain, not gzip"}\n')
    return Case(str(p), "unreadable_file", f"{p}:1")


@case
def parquet_wrong_schema(tmp: Path) -> Case:
    p = parquet(tmp / "t.parquet", pa.table({"body": ["x", "y"], "n": [1, 2]}))
    return Case(p, "unknown_kind", f"{p} row 0")


@case
def parquet_number_column(tmp: Path) -> Case:
    p = parquet(tmp / "t.parquet", pa.table({"text": [1, 2, 3]}))
    return Case(p, "wrong_type", f"{p} row 0")


@case
def parquet_column_named_twice(tmp: Path) -> Case:
    """Two `text` columns: validate_data read the first, check_tokenizer the second."""
    table = pa.Table.from_arrays(
        [pa.array(["a document", "another"]), pa.array([1, 2])], names=["text", "text"]
    )
    p = parquet(tmp / "t.parquet", table)
    return Case(p, "unreadable_file", p)


@case
def csv_column_named_twice(tmp: Path) -> Case:
    """`text,text`: the csv reader's dict kept the second column silently, the first never read;
    refused as the Parquet case is."""
    p = tmp / "t.csv"
    p.write_text("text,text\nthe title,the document body\n")
    return Case(str(p), "unreadable_file", f"{p}:1")


@case
def pretty_printed_json(tmp: Path) -> Case:
    p = tmp / "t.json"
    p.write_text(json.dumps({"records": [OK, OK]}, indent=2))
    return Case(str(p), "unreadable_file", f"{p}:1")


@case
def parquet_garbage_bytes(tmp: Path) -> Case:
    p = tmp / "t.parquet"
    p.write_bytes(b"PAR1 this is not really parquet")
    return Case(str(p), "unreadable_file", str(p))


@case
def csv_ragged_row(tmp: Path) -> Case:
    p = tmp / "t.csv"
    p.write_text('text,source\nhello there,web\n"two\nlines",web\none,two,three\n')
    return Case(str(p), "csv_ragged_row", f"{p}:5")


@case
def csv_invalid_utf8(tmp: Path) -> Case:
    p = tmp / "t.csv"
    p.write_bytes(b"text\nfine row\nbad \xff\xfe row\n")
    return Case(str(p), "invalid_utf8", f"{p}:3")


@case
def fifty_megabyte_line(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", {"text": "a" * 50_000_000})
    return Case(p, "too_long", f"{p}:1", passes=True)


@case
def raw_nul_byte(tmp: Path) -> Case:
    p = tmp / "t.jsonl"
    p.write_bytes(json.dumps(OK).encode() + b'\n{"text": "a\x00b"}\n')
    return Case(str(p), "invalid_json", f"{p}:2")


@case
def escaped_nul_character(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, {"text": "nul \u0000 inside"})
    return Case(p, "control_chars", f"{p}:2", passes=True)


@case
def bom_then_invalid_json(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, "{oops", prefix=b"\xef\xbb\xbf")  # the BOM is accepted; line 2 is not
    return Case(p, "invalid_json", f"{p}:2")


@case
def crlf_line_endings_accepted(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, {"text": "another line"}, {"text": "tiny"}, newline="\r\n")
    return Case(p, "too_short", f"{p}:3", passes=True, data={"min_chars": 5})


@case
def json_array_in_json_file(tmp: Path) -> Case:
    p = tmp / "t.json"
    p.write_text(json.dumps([OK, OK]) + "\n")
    return Case(str(p), "unreadable_file", f"{p}:1")


@case
def json_array_in_jsonl_file(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, json.dumps([OK, OK]))
    return Case(p, "not_an_object", f"{p}:2")


@case
def number_where_string_belongs(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, {"text": 42})
    return Case(p, "wrong_type", f"{p}:2")


@case
def prompt_completion_number(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", {"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": 1.5})
    return Case(p, "wrong_type", f"{p}:2")


@case
def deeply_nested_json(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, '{"text": ' + "[" * 10_000 + "]" * 10_000 + "}")
    return Case(p, "too_deep", f"{p}:2")


@case
def mixed_formats_directory(tmp: Path) -> Case:
    d = tmp / "mixed"
    d.mkdir()
    lines(d / "a.jsonl", OK, {"text": "second"})
    parquet(d / "b.parquet", pa.table({"prompt": ["q"], "completion": ["a"]}))
    (d / "c.csv").write_text("text\nfrom csv\n")
    (d / "notes.txt").write_text("ignored: not a data file\n")
    return Case(str(d), "missing_field", f"{d / 'b.parquet'} row 0")


@case
def empty_file(tmp: Path) -> Case:
    p = tmp / "t.jsonl"
    p.write_bytes(b"")
    return Case(str(p), "no_records", str(p))


@case
def blank_lines_only(tmp: Path) -> Case:
    p = tmp / "t.jsonl"
    p.write_bytes(b"\n\n   \n")
    return Case(str(p), "no_records", str(p))


@case
def missing_file(tmp: Path) -> Case:
    p = tmp / "absent.jsonl"
    return Case(str(p), "no_data", str(p))


@case
def utf16_jsonl_saved_by_a_windows_editor(tmp: Path) -> Case:
    """Notepad's "Unicode": UTF-16 with a byte-order mark; one problem for the file, not one per line."""
    p = tmp / "t.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(50)) + "\n", encoding="utf-16")
    return Case(str(p), "wrong_encoding", f"{p}:1")


@case
def utf16be_csv_without_a_byte_order_mark(tmp: Path) -> Case:
    p = tmp / "t.csv"
    p.write_bytes("text\nhello\nworld\n".encode("utf-16-be"))
    return Case(str(p), "wrong_encoding", f"{p}:1")


@case
def utf32_gzipped_jsonl(tmp: Path) -> Case:
    p = tmp / "t.jsonl.gz"
    p.write_bytes(gzip.compress((json.dumps(OK) + "\n").encode("utf-32")))
    return Case(str(p), "wrong_encoding", f"{p}:1")


@case
def stray_utf16_marks_on_lines_of_utf8(tmp: Path) -> Case:
    """UTF-16's byte-order mark alone on the first lines, UTF-8 records after: a file with broken
    lines, not a UTF-16 file; each bad line is reported where it is and the records are read."""
    p = tmp / "t.jsonl"
    p.write_bytes(b"\xff\xfe\n\xff\xfe\n" + json.dumps(OK).encode() + b"\n")
    return Case(str(p), "invalid_utf8", f"{p}:1")


@case
def invalid_utf8(tmp: Path) -> Case:
    p = tmp / "t.jsonl"
    p.write_bytes(json.dumps(OK).encode() + b'\n{"text": "caf\xe9"}\n')
    return Case(str(p), "invalid_utf8", f"{p}:2")


@case
def missing_field(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, {"body": "no text here"})
    return Case(p, "missing_field", f"{p}:2")


@case
def whitespace_text(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, {"text": " \t\n "})
    return Case(p, "empty_text", f"{p}:2")


@case
def chat_unknown_role(tmp: Path) -> Case:
    p = lines(
        tmp / "t.jsonl",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    )
    return Case(p, "bad_chat", f"{p}:2")


@case
def chat_two_user_turns(tmp: Path) -> Case:
    p = conversation(tmp / "t.jsonl", "user", "user", "assistant")
    return Case(p, "chat_order", f"{p}:1", passes=True)


@case
def chat_assistant_first(tmp: Path) -> Case:
    p = conversation(tmp / "t.jsonl", "assistant", "user", "assistant")
    return Case(p, "chat_order", f"{p}:1", passes=True)


@case
def chat_system_late(tmp: Path) -> Case:
    p = conversation(tmp / "t.jsonl", "user", "system", "assistant")
    return Case(p, "chat_system_not_first", f"{p}:1", passes=True)


@case
def pii_email(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, {"text": "write to jane.doe@example.com today"})
    return Case(p, "pii_email", f"{p}:2", passes=True, secret="jane.doe@example.com")


@case
def pii_card(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", {"text": "card 4111 1111 1111 1111 exp 12/29"})
    return Case(p, "pii_card", f"{p}:1", passes=True, secret="4111 1111 1111 1111")


@case
def pii_phone(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, OK, {"text": "call me at (415) 555-2671"})
    return Case(p, "pii_phone", f"{p}:3", passes=True, secret="555-2671")


@case
def aws_key(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, {"text": "aws_access_key_id = AKIAIOSFODNN7EXAMPLE"})
    return Case(p, "secret_aws_key", f"{p}:2", secret="AKIAIOSFODNN7EXAMPLE")


@case
def private_key(tmp: Path) -> Case:
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq98secretbody\n-----END RSA PRIVATE KEY-----"
    p = lines(tmp / "t.jsonl", {"text": key})
    return Case(p, "secret_private_key", f"{p}:1", secret="MIIEowIBAAKCAQEA7bq98secretbody")


@case
def special_token_injection(tmp: Path) -> Case:
    p = lines(
        tmp / "t.jsonl", {"prompt": "x", "completion": "y"}, {"prompt": "ok", "completion": "a</s>[INST] b"}
    )
    return Case(p, "special_token_text", f"{p}:2", passes=True)


@case
def hf_arrow_truncated(tmp: Path) -> Case:
    d = tmp / "hf"
    d.mkdir()
    table = pa.table({"text": [f"row {i} text" for i in range(3000)]})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=1000):
            writer.write_batch(batch)
    data = sink.getvalue()
    (d / "data-00000-of-00001.arrow").write_bytes(data[: len(data) // 2])
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (d / "dataset_info.json").write_text("{}")
    return Case(str(d), "unreadable_file", f"{d / 'data-00000-of-00001.arrow'} row 1000")


@case
def hf_dataset_dict(tmp: Path) -> Case:
    d = tmp / "dd"
    for split in ("train", "test"):
        (d / split).mkdir(parents=True)
        table = pa.table({"text": [f"{split} row"]})
        with pa.OSFile(str(d / split / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        (d / split / "state.json").write_text("{}")
    (d / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    return Case(str(d), "no_data", str(d))


# -- found by the input contract (tests/test_input_contract.py) and by trying each reader -----------


@case
def lone_surrogate_escape(tmp: Path) -> Case:
    p = tmp / "t.jsonl"
    p.write_bytes(json.dumps(OK).encode() + b'\n{"text": "half an emoji \\ud83d here"}\n')
    return Case(str(p), "invalid_utf8", f"{p}:2")


@case
def lone_low_surrogate_in_prompt(tmp: Path) -> Case:
    p = tmp / "t.jsonl"
    p.write_bytes(b'{"prompt": "q", "completion": "a"}\n{"prompt": "\\udc00", "completion": "a"}\n')
    return Case(str(p), "invalid_utf8", f"{p}:2")


@case
def surrogate_pair_escape_accepted(tmp: Path) -> Case:
    p = tmp / "t.jsonl"
    p.write_bytes(b'{"text": "an emoji \\ud83d\\ude00 escaped"}\n' * 2)  # one code point: a good record
    return Case(str(p), "duplicate", f"{p}:2", passes=True)


@case
def csv_quote_never_closes(tmp: Path) -> Case:
    p = tmp / "t.csv"
    p.write_text('text\nfirst row\n"second row opens a quote\nthird row\nfourth row\n')
    return Case(str(p), "unreadable_file", f"{p}:3")


@case
def csv_text_after_closing_quote(tmp: Path) -> Case:
    p = tmp / "t.csv"
    p.write_text('text\nfine row\n"quoted" then more\nlast row\n')
    return Case(str(p), "invalid_csv", f"{p}:3")


@case
def csv_semicolon_delimiter(tmp: Path) -> Case:
    p = tmp / "t.csv"
    p.write_text("text;source\nhello;web\nthere;web\n")
    return Case(str(p), "unknown_kind", f"{p}:2")


@case
def csv_header_only(tmp: Path) -> Case:
    p = tmp / "t.csv"
    p.write_text("text,source\n")
    return Case(str(p), "no_records", str(p))


@case
def csv_bom_and_crlf_accepted(tmp: Path) -> Case:
    p = tmp / "t.csv"
    p.write_bytes(b"\xef\xbb\xbftext,source\r\nfirst,web\r\nfirst,web\r\n")
    return Case(str(p), "duplicate", f"{p}:3", passes=True)


@case
def csv_empty_cell(tmp: Path) -> Case:
    p = tmp / "t.csv"
    p.write_text('text,source\nfine,web\n"",web\n')
    return Case(str(p), "empty_text", f"{p}:3")


@case
def csv_chat_cell_not_json(tmp: Path) -> Case:
    p = tmp / "t.csv"
    good = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    rows = [["messages"], [good], ["[{'role': 'user'}]"]]
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    p.write_text(buf.getvalue())
    return Case(str(p), "bad_chat", f"{p}:3")


@case
def gzip_concatenated_members_accepted(tmp: Path) -> Case:
    p = tmp / "t.jsonl.gz"
    p.write_bytes(
        gzip.compress(json.dumps(OK).encode() + b"\n") + gzip.compress(json.dumps(OK).encode() + b"\n")
    )
    return Case(str(p), "duplicate", f"{p}:2", passes=True)


@case
def gzip_trailing_garbage(tmp: Path) -> Case:
    p = tmp / "t.jsonl.gz"
    p.write_bytes(gzip.compress(json.dumps(OK).encode() + b"\n") + b"not gzip at all")
    return Case(str(p), "unreadable_file", f"{p}:2")


@case
def gzip_empty_member(tmp: Path) -> Case:
    p = tmp / "t.jsonl.gz"
    p.write_bytes(gzip.compress(b""))
    return Case(str(p), "no_records", str(p))


@case
def every_record_empty(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", {"text": ""}, {"text": "   "}, {"text": "\n\t"})
    return Case(p, "no_records", p, data={"max_error_rate": 1.0})


@case
def every_record_unparseable_within_budget(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", "{", "[1]", '"s"')
    return Case(p, "no_records", p, data={"max_error_rate": 1.0, "record_kind": "text"})


@case
def null_text(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, {"text": None})
    return Case(p, "wrong_type", f"{p}:2")


@case
def list_text(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, {"text": ["a", "list"]})
    return Case(p, "wrong_type", f"{p}:2")


@case
def prompt_without_completion(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", {"prompt": "q", "completion": "a"}, {"prompt": "q only"})
    return Case(p, "missing_field", f"{p}:2")


@case
def chat_content_not_a_string(tmp: Path) -> Case:
    p = lines(
        tmp / "t.jsonl",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]},
    )
    return Case(p, "bad_chat", f"{p}:2")


@case
def chat_without_assistant(tmp: Path) -> Case:
    p = lines(
        tmp / "t.jsonl",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
    )
    return Case(p, "bad_chat", f"{p}:2")


@case
def chat_empty_turn(tmp: Path) -> Case:
    p = lines(
        tmp / "t.jsonl",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
    )
    return Case(p, "empty_text", f"{p}:2")


@case
def replacement_characters(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, {"text": "caf\ufffd au lait, d\ufffdj\ufffd vu"})
    return Case(p, "mojibake", f"{p}:2", passes=True)


@case
def two_objects_on_one_line(tmp: Path) -> Case:
    p = tmp / "t.jsonl"
    p.write_bytes(json.dumps(OK).encode() + b'\n{"text": "one"} {"text": "two"}\n')
    return Case(str(p), "invalid_json", f"{p}:2")


@case
def lone_carriage_returns(tmp: Path) -> Case:
    p = tmp / "t.jsonl"
    p.write_bytes(json.dumps(OK).encode() + b'\r{"text": "old mac line ending"}\n')
    return Case(str(p), "invalid_json", f"{p}:1")


@case
def parquet_null_text(tmp: Path) -> Case:
    p = parquet(tmp / "t.parquet", pa.table({"text": ["fine", None, "also fine"]}))
    return Case(p, "wrong_type", f"{p} row 1")


@case
def parquet_nested_text(tmp: Path) -> Case:
    p = parquet(tmp / "t.parquet", pa.table({"text": pa.array([["a"], ["b"]], pa.list_(pa.string()))}))
    return Case(p, "wrong_type", f"{p} row 0")


@case
def parquet_no_rows(tmp: Path) -> Case:
    p = parquet(tmp / "t.parquet", pa.table({"text": pa.array([], pa.string())}))
    return Case(p, "no_records", p)


@case
def parquet_truncated_footer(tmp: Path) -> Case:
    p = tmp / "t.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(100)]}), p)
    p.write_bytes(p.read_bytes()[:-20])
    return Case(str(p), "unreadable_file", str(p))


@case
def parquet_large_string_many_row_groups_accepted(tmp: Path) -> Case:
    p = tmp / "t.parquet"
    table = pa.table({"text": pa.array(["same text"] * 3 + ["other"], pa.large_string())})
    pq.write_table(table, p, row_group_size=1)
    return Case(str(p), "duplicate", f"{p} row 1", passes=True)


@case
def arrow_garbage(tmp: Path) -> Case:
    d = tmp / "hf"
    d.mkdir()
    (d / "data-00000-of-00001.arrow").write_bytes(b"ARROW1 but nothing after")
    return Case(str(d), "unreadable_file", str(d / "data-00000-of-00001.arrow"))


@case
def mostly_duplicates(tmp: Path) -> Case:
    p = lines(tmp / "t.jsonl", OK, {"text": "another document"}, OK, OK, OK)
    return Case(p, "duplicate", f"{p}:3")


@case
def a_warning_set_to_fail_without_a_rate(tmp: Path) -> Case:
    rows = [{"text": f"document {i}"} for i in range(200)] + [{"text": "write to ann@example.org"}]
    p = lines(tmp / "t.jsonl", *rows)
    return Case(p, "pii_email", f"{p}:201", data={"checks": {"pii_email": {"action": "fail"}}})


def run_case(tmp_path: Path, c: Case) -> tuple[dict[str, Any], str]:
    work = tmp_path / "work"
    cfg = RunConfig.from_dict({"work_dir": str(work), "data": {"train_uri": c.uri, **c.data}})
    out = tmp_path / "out"
    message = ""
    if c.passes:
        report = validate_data(cfg, out)
    else:
        with pytest.raises(DataValidationError) as info:
            validate_data(cfg, out)
        message = str(info.value)
        report = json.loads((out / "report.json").read_text())
    assert not work.exists() or not any(work.iterdir()), "validate_data wrote to work_dir"
    return report, message


def test_corpus_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(tmp_path, name):
    c = CASES[name](tmp_path)
    report, message = run_case(tmp_path, c)
    d = report["datasets"]["train"]
    got = {p["code"]: p for p in d["problems"]}
    assert c.code in got, f"{name}: {sorted(got)}"
    location = got[c.code]["examples"][0]["location"]
    if name == "truncated_gzip":
        assert location == f"{c.uri}:{d['records'] + 1}" and 0 < d["records"] < 2000
    else:
        assert location == c.location
    assert report["passed"] is c.passes
    if not c.passes:
        assert message.startswith("validate_data failed: train:")
        assert f"{c.location or location}: {c.code}" in message or c.code in message.splitlines()[0]
    if c.secret:
        page = (tmp_path / "out" / "report.html").read_text()
        assert c.secret not in json.dumps(report) and c.secret not in page and c.secret not in message


def test_s3_missing_key(tmp_path, s3):
    storage.write_bytes(f"{s3}/data/present.jsonl", b'{"text": "here"}\n')
    c = Case(f"{s3}/data/absent.jsonl", "no_data", f"{s3}/data/absent.jsonl")
    report, message = run_case(tmp_path, c)
    assert report["datasets"]["train"]["problems"][0]["examples"][0]["location"] == c.location
    assert "no_data" in message


def test_s3_csv_and_arrow(tmp_path, s3):
    storage.write_bytes(f"{s3}/d/a.csv", b"text\nfrom s3 csv\nsecond row\n")
    sink = io.BytesIO()
    table = pa.table({"text": ["arrow one", ""]})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    storage.write_bytes(f"{s3}/d/b.arrow", sink.getvalue())
    report, message = run_case(tmp_path, Case(f"{s3}/d", "empty_text", f"{s3}/d/b.arrow row 1"))
    assert report["datasets"]["train"]["records"] == 4
    assert f"{s3}/d/b.arrow row 1: empty_text" in message


# -- property: arbitrary bytes never escape as an exception -----------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=400),
        st.lists(
            st.one_of(
                st.sampled_from(
                    [b'{"text": "x"}', b"{", b"[]", b'{"text": 1}', b"\xff", b'"s"', b"\x00", b"\r"]
                ),
                st.binary(max_size=30),
            ),
            max_size=12,
        ).map(b"\n".join),
    ),
    st.sampled_from(["t.jsonl", "t.csv", "t.jsonl.gz"]),
)
def test_any_bytes_yield_records_or_coded_problems(tmp_path, data, name):
    path = tmp_path / name
    path.write_bytes(data)
    for raw in iter_raw(str(path)):
        assert (raw.value is None) != (raw.code is None)
        assert raw.code is None or raw.code.isidentifier()
    cfg = RunConfig.from_dict({"data": {"train_uri": str(path)}})
    try:
        report = validate_data(cfg, tmp_path / "out")
    except DataValidationError:
        report = json.loads((tmp_path / "out" / "report.json").read_text())
    for p in report["datasets"]["train"]["problems"]:
        assert p["code"] and p["examples"]


# -- the vectorised path reports exactly what the precise path reports ------------------------------


def both_reports(tmp_path: Path, uri: str, **data: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """validate_data's report.json with the vectorised path and with the precise path only."""
    reports = []
    for fast in (True, False):
        cfg = RunConfig.from_dict({"data": {"train_uri": uri, **data}})
        out = tmp_path / f"out-{fast}"
        try:
            validate_data(cfg, out, fast=fast)
        except DataValidationError:
            pass
        reports.append(json.loads((out / "report.json").read_text()))
    return reports[0], reports[1]


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks and pyarrow pieces of a few hundred bytes: many block and piece boundaries."""
    from fulltune.data import fastcheck, records

    monkeypatch.setattr(records, "JSONL_BLOCK_BYTES", 700)
    monkeypatch.setattr(fastcheck, "PIECE_BYTES", 200)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_and_precise_paths_agree_on_every_bad_input(tmp_path, name, small_blocks):
    c = CASES[name](tmp_path)
    fast, precise = both_reports(tmp_path, c.uri, **c.data)
    assert fast == precise


MIXED_LINES: list[Any] = [
    {"text": "an ordinary document about insulin dosing"},
    '{"text": "unterminated',
    {"text": 7},
    {"body": "no text field"},
    {"text": None},
    "[1, 2]",
    '"just a string"',
    {"text": "   \t "},
    {"text": "\u3000\u2003"},  # Unicode spaces only: empty
    {"text": "\u00a0x"},
    "",
    "   ",
    {"text": "an ordinary document about insulin dosing"},  # duplicate of line 1
    {"text": "mail jane.doe@example.com today"},
    {"text": "call (555) 123-4567 or +1 555.123.4567"},
    {"text": "card 4111 1111 1111 1111 and 4111 1111 1111 1112"},
    {"text": "arabic-indic \u0665\u0665\u0665 \u0665\u0665\u0665-\u0661\u0662\u0663\u0664 and 9"},
    {"text": "fullwidth \uff15\uff15\uff15 \uff15\uff15\uff15-\uff11\uff12\uff13\uff14 and 9"},
    {"text": "key AKIAIOSFODNN7EXAMPLE and ASIA1234567890ABCDEF"},
    {"text": "-----BEGIN RSA PRIVATE KEY-----\nMIIEow"},
    {"text": "a <|im_end|> token and [INST] and </s>"},
    {"text": "bell \u0007 and \u0085 next line and DEL \u007f"},
    {"text": "caf\u00c3\u00a9 and \ufffd and \u00e2\u20ac\u2122"},
    {"text": "dates 2024-01-15 and 2024-02-16 and amounts 1,234,567.89"},
    {"text": "x"},  # too short with min_chars 2
    '{"text": "two"} {"text": "objects"}',
    '{"text": "an object split",',  # with the line above: as many rows as lines for pyarrow
    '"over two lines": 1}',
    '{"text": "dup", "text": "keys"}',
    '{"text": "lone \\ud800 surrogate"}',
    '{"text": "pair \\ud83d\\ude00 emoji"}',
    '{"text": "nan", "n": NaN}',
    '{"text": "big", "n": 1e400}',
    '{"text": "deep", "n": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"text": "escaped \\u003c|im_end|\\u003e and \\u0041KIAIOSFODNN7EXAMPLE"}',
    '{"text": "crlf line"}\r',
    '{"text": "lone cr"}\r{"text": "in the middle"}',
    '\ufeff{"text": "a BOM mid-file"}',
    '  {"text": "indented"}',
    {"text": "long " + "word " * 400},  # longer than a block
    {"text": "an ordinary document about insulin dosing"},  # duplicate again
    {"text": "tokens <s>hello</s> and <<SYS>>"},
    # one trigger a record, so that a prefilter missing any one of them shows
    {"text": "call 555 123-4567 now"},
    {"text": "card 4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 end"},
    {"text": "only a bell \u0007 here"},
    {"text": "only a C1 \u0085 here"},
    {"text": "only a DEL \u007f here"},
    {"text": "only a \ufffd here"},
    {"text": "only caf\u00c3\u00a9 here"},
    {"text": "only \u00e2\u20ac\u2122 here"},
    {"text": "only ASIA1234567890ABCDEF here"},
    {"text": "only [INST] here"},
]


def write_mixed(path: Path, repeats: int = 3) -> str:
    lines = []
    for r in range(repeats):
        for i, row in enumerate(MIXED_LINES):
            lines.append(row if isinstance(row, str) else json.dumps(row, ensure_ascii=bool((i + r) % 2)))
            lines.append(json.dumps({"text": f"filler document {r}-{i} with nothing special in it", "id": i}))
    body = "\n".join(lines).encode("utf-8") + b"\n"
    body += (
        b'{"text": "invalid \xff utf-8"}\n{"text": "after the bad bytes"}\n{"text": "no newline at the end"}'
    )
    path.write_bytes(body)
    return str(path)


def test_fast_and_precise_paths_agree_on_a_mixed_jsonl_corpus(tmp_path, small_blocks):
    uri = write_mixed(tmp_path / "mixed.jsonl")
    fast, precise = both_reports(tmp_path, uri, max_examples=50, min_chars=2, max_chars=1500)
    assert fast == precise
    got = {p["code"]: p["count"] for p in fast["datasets"]["train"]["problems"]}
    # the corpus reaches every check, so a prefilter that misses one shows up as a difference
    for code in (
        "invalid_json",
        "invalid_utf8",
        "wrong_type",
        "missing_field",
        "not_an_object",
        "empty_text",
        "too_deep",
        "duplicate",
        "pii_email",
        "pii_phone",
        "pii_card",
        "secret_aws_key",
        "secret_private_key",
        "special_token_text",
        "control_chars",
        "mojibake",
        "too_short",
        "too_long",
    ):
        assert got.get(code), code
    assert got["pii_phone"] == 12  # 4 a repeat: the Arabic-Indic and fullwidth digits count too


def test_fast_and_precise_paths_agree_on_gzip_csv_parquet_and_eval(tmp_path, small_blocks):
    raw = Path(write_mixed(tmp_path / "mixed.jsonl")).read_bytes()
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    fast, precise = both_reports(tmp_path, str(tmp_path / "gz"))
    assert fast == precise

    texts = [r["text"] if isinstance(r, dict) and isinstance(r.get("text"), str) else "" for r in MIXED_LINES]
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet", row_group_size=7)
    pq.write_table(pa.table({"text": [*texts[:5], None, "x"]}), tmp_path / "nulls.parquet")
    pq.write_table(pa.table({"text": [1.5, 2.5]}), tmp_path / "floats.parquet")
    for uri in (
        str(tmp_path / "t.parquet"),
        str(tmp_path / "nulls.parquet"),
        str(tmp_path / "floats.parquet"),
    ):
        fast, precise = both_reports(tmp_path, uri, max_examples=50)
        assert fast == precise, uri

    rows = "\n".join(f'"{t.replace(chr(34), chr(34) * 2)}",{i}' for i, t in enumerate(texts))
    (tmp_path / "t.csv").write_text("text,id\n" + rows + '\n"only one field"\n"x",1,2\n', encoding="utf-8")
    fast, precise = both_reports(tmp_path, str(tmp_path / "t.csv"), max_examples=50)
    assert fast == precise

    pc_rows = [{"prompt": t or " ", "completion": texts[-1 - i] or "ok"} for i, t in enumerate(texts)]
    lines(tmp_path / "pc.jsonl", *pc_rows, *pc_rows[:3], {"prompt": "only a prompt"})
    fast, precise = both_reports(tmp_path, str(tmp_path / "pc.jsonl"), max_examples=50)
    assert fast == precise

    lines(tmp_path / "eval.jsonl", MIXED_LINES[0], {"text": "new in eval"}, MIXED_LINES[13])
    fast, precise = both_reports(
        tmp_path, str(tmp_path / "mixed.jsonl"), eval_uri=str(tmp_path / "eval.jsonl"), max_examples=50
    )
    assert fast == precise
    assert fast["datasets"]["eval"]["problems"][0]["code"] == "train_overlap"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.lists(
            st.sampled_from(
                list("ab 0123456789-.()+@AKISP<|>[]/\t\n\x07\x85\x7f\ufffd\u00c3\u00a9\u0665\uff15\u3000é東")
                + ["<|im_end|>", "AKIA", "PRIVATE KEY-----", "x@y.co", "555 123-4567", "4111111111111111"]
            ),
            max_size=40,
        ).map("".join),
        min_size=1,
        max_size=30,
    )
)
def test_fast_and_precise_paths_agree_on_random_text(tmp_path, texts):
    path = tmp_path / "t.jsonl"
    lines(path, *({"text": t} for t in texts))
    fast, precise = both_reports(tmp_path, str(path), max_examples=100, min_chars=3, max_chars=30)
    assert fast == precise


def test_a_file_checked_in_parallel_spans_gives_the_one_process_report(tmp_path, monkeypatch):
    """Large local JSONL files are cut into byte spans checked by worker processes; duplicates and
    train/eval overlap across spans, line numbers and example order must come out as one process
    reports them."""
    from fulltune.data.validate import parallel as validate_mod

    train = write_mixed(tmp_path / "train.jsonl", repeats=4)
    ev = tmp_path / "eval.jsonl"
    ev.write_bytes(
        Path(write_mixed(tmp_path / "e.jsonl", repeats=2)).read_bytes().replace(b"filler", b"other")
    )
    size = Path(train).stat().st_size
    monkeypatch.setattr(validate_mod, "PARALLEL_MIN_BYTES", size // 8)  # up to 8 workers' worth
    monkeypatch.setattr(validate_mod, "PARALLEL_SPAN_BYTES", size // 11)  # 11+ spans: more than workers
    reports = []
    for workers in (1, 3):
        cfg = RunConfig.from_dict(
            {
                "data": {
                    "train_uri": train,
                    "eval_uri": str(ev),
                    "validate_workers": workers,
                    "max_examples": 1000,
                    "min_chars": 2,
                    "max_chars": 1500,
                }
            }
        )
        out = tmp_path / f"out-{workers}"
        with pytest.raises(DataValidationError):
            validate_data(cfg, out)
        reports.append(json.loads((out / "report.json").read_text()))
    one, spans = reports
    assert spans == one
    problems = {p["code"]: p for p in one["datasets"]["train"]["problems"]}
    # the spans really split the file: duplicates of line 1 are found in later spans
    dup_lines = [int(e["location"].rsplit(":", 1)[1]) for e in problems["duplicate"]["examples"]]
    assert max(dup_lines) > len(Path(train).read_bytes().splitlines()) * 3 // 4
    assert {p["code"] for p in one["datasets"]["eval"]["problems"]} >= {"train_overlap", "duplicate"}
    assert validate_mod.jsonl_spans(train, 11) == validate_mod.jsonl_spans(train, 11)  # deterministic


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=40),
    st.booleans(),
    st.integers(min_value=1, max_value=12),
)
def test_spans_cover_the_file_in_whole_lines(tmp_path, lines_, trailing_newline, parts):
    from fulltune.data.records import WIDE_PEEK, RawRecord, encoding_problem, iter_jsonl_blocks, jsonl_spans

    body = b"\n".join(lines_) + (b"\n" if trailing_newline else b"")
    path = tmp_path / "f.jsonl"
    path.write_bytes(body)
    # UTF-16/32, gzip or another compression (bytes UTF-8 text never starts with): refused whole, at once
    if encoding_problem(str(path), body[:WIDE_PEEK]):
        [refused] = list(iter_jsonl_blocks(str(path), 64))
        assert isinstance(refused, RawRecord) and refused.code == "wrong_encoding"
        return
    spans = jsonl_spans(str(path), parts)
    assert len(spans) <= parts
    if not body:
        assert spans == []
        return
    assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]]  # contiguous, in order
    assert spans[-1][1] == len(body)
    for a, _ in spans[1:]:
        assert body[a - 1 : a] == b"\n"  # every span starts a line
    # reading the spans gives the file's lines, numbered from 1 in each span
    got = b"".join(block.data for span in spans for block in iter_jsonl_blocks(str(path), 64, span=span))
    assert got == body
