"""validate_data: problem codes with file:line locations, the error budget, reports always written."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fulltune.config import RunConfig
from fulltune.data.records import iter_records, resolve_kind
from fulltune.data.validate import DataValidationError, validate_data


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows are dicts (dumped as JSON) or raw strings (written as they are)."""
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def make_cfg(train: Path | str, **data: Any) -> RunConfig:
    return RunConfig.from_dict({"data": {"train_uri": str(train), **data}})


def problems(report: dict[str, Any], dataset: str = "train") -> dict[str, dict[str, Any]]:
    return {p["code"]: p for p in report["datasets"][dataset]["problems"]}


def failing_report(cfg: RunConfig, out: Path) -> tuple[str, dict[str, Any]]:
    with pytest.raises(DataValidationError) as info:
        validate_data(cfg, out)
    return str(info.value), json.loads((out / "report.json").read_text())


GOOD = [{"text": f"document number {i} about glucose"} for i in range(5)]


def test_clean_data_passes_and_writes_reports(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    report = validate_data(make_cfg(train), tmp_path / "out")

    assert report["passed"] is True
    d = report["datasets"]["train"]
    assert (d["kind"], d["records"], d["bad_records"], d["error_rate"], d["problems"]) == (
        "text",
        5,
        0,
        0.0,
        [],
    )
    n = len(GOOD[0]["text"])
    assert d["length_chars"] == {"min": n, "p50": n, "p95": n, "max": n}
    assert report["metrics"] == {"train_records": 5, "train_bad_records": 0, "train_error_rate": 0.0}
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    page = (tmp_path / "out" / "report.html").read_text()
    assert "passed" in page and "no problems found" in page


def test_broken_json_line_names_file_line_and_code(tmp_path):
    rows: list[Any] = [GOOD[0], GOOD[1], '{"text": "unfinished', GOOD[2]]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    message, report = failing_report(make_cfg(train), tmp_path / "out")

    assert message.splitlines()[0].startswith("validate_data failed: train: 1 of 4 records bad")
    assert f"{train}:3: invalid_json: column 10: Unterminated string" in message
    assert report["passed"] is False
    assert problems(report)["invalid_json"]["examples"] == [
        {"location": f"{train}:3", "reason": "column 10: Unterminated string starting"}
    ]
    assert (tmp_path / "out" / "report.html").exists()
    assert "invalid_json" in (tmp_path / "out" / "report.html").read_text()


def test_error_budget_tolerates_a_rate_below_it(tmp_path):
    rows: list[Any] = [*GOOD, "not json", {"text": ""}]  # 2 bad of 7
    train = write_jsonl(tmp_path / "train.jsonl", rows)

    report = validate_data(make_cfg(train, max_error_rate=0.3), tmp_path / "ok")
    assert report["passed"] is True
    assert report["datasets"]["train"]["bad_records"] == 2
    assert report["datasets"]["train"]["error_rate"] == pytest.approx(2 / 7)
    assert set(problems(report)) == {"invalid_json", "empty_text"}

    message, _ = failing_report(make_cfg(train, max_error_rate=0.25), tmp_path / "fail")
    assert "2 of 7 records bad (28.57% > allowed 25.00%)" in message


def test_problem_codes_and_example_cap(tmp_path):
    rows: list[Any] = [
        {"text": "fine"},
        "[1, 2]",
        {"text": 7},
        {"body": "no text field"},
        {"text": "   "},
        {"text": "fine"},
        {"text": "bell \u0007 here"},
        {"text": "caf\u00c3\u00a9 and \ufffd"},
    ] + ["{bad"] * 4
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    _, report = failing_report(make_cfg(train, max_examples=2), tmp_path / "out")
    got = problems(report)

    assert {code: (p["severity"], p["count"]) for code, p in got.items()} == {
        "invalid_json": ("error", 4),
        "not_an_object": ("error", 1),
        "wrong_type": ("error", 1),
        "missing_field": ("error", 1),
        "empty_text": ("error", 1),
        "duplicate": ("warning", 1),
        "control_chars": ("warning", 1),
        "mojibake": ("warning", 1),
    }
    assert [e["location"] for e in got["invalid_json"]["examples"]] == [f"{train}:9", f"{train}:10"]
    assert got["duplicate"]["examples"] == [
        {"location": f"{train}:6", "reason": f"same content as {train}:1"}
    ]
    assert got["control_chars"]["examples"][0]["reason"] == "U+0007 at character 5"
    assert report["datasets"]["train"]["bad_records"] == 8
    # errors before warnings, most frequent first
    assert [p["code"] for p in report["datasets"]["train"]["problems"]][0] == "invalid_json"


def test_invalid_utf8(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    _, report = failing_report(make_cfg(train), tmp_path / "out")
    assert problems(report)["invalid_utf8"]["examples"][0]["location"] == f"{train}:2"


def test_chat_structure_errors(tmp_path):
    def chat(*turns: tuple[str, Any]) -> dict[str, Any]:
        return {"messages": [{"role": r, "content": c} for r, c in turns]}

    rows: list[Any] = [
        chat(("user", "What is HbA1c?"), ("assistant", "Glycated haemoglobin.")),
        chat(("user", "hi")),  # no assistant turn
        chat(("user", "hi"), ("robot", "beep")),  # unknown role
        chat(("user", "hi"), ("assistant", 5)),  # content not a string
        {"messages": "user: hi"},  # not a list
        {"messages": []},
        chat(("user", "hi"), ("assistant", " ")),  # empty turn
    ]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    message, report = failing_report(make_cfg(train), tmp_path / "out")

    assert report["datasets"]["train"]["kind"] == "chat"
    got = problems(report)
    assert got["bad_chat"]["count"] == 5
    assert got["empty_text"]["count"] == 1
    reasons = {e["location"]: e["reason"] for e in got["bad_chat"]["examples"]}
    assert reasons[f"{train}:2"] == "no assistant turn: nothing to learn from"
    assert reasons[f"{train}:3"] == "message 1 has unknown role 'robot'"
    assert f"{train}:4: bad_chat: message 1 must be an object with string 'role' and 'content'" in message


def test_parquet_with_a_wrong_column(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"body": ["one", "two", "three"]}), path)
    message, report = failing_report(make_cfg(path), tmp_path / "out")

    d = report["datasets"]["train"]
    assert (d["records"], d["bad_records"], d["kind"]) == (3, 3, None)
    unknown = problems(report)["unknown_kind"]
    assert unknown["count"] == 3
    assert unknown["examples"][0]["location"] == f"{path} row 0"
    assert "fields ['body'] name no record kind" in unknown["examples"][0]["reason"]
    assert message.startswith("validate_data failed: train: unknown_kind")
    # unknown_kind is fatal: no error budget lets it through
    with pytest.raises(DataValidationError):
        validate_data(make_cfg(path, max_error_rate=1.0), tmp_path / "out2")


def test_parquet_column_mapping_and_wrong_type(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"body": ["one", None, "three"]}), path, row_group_size=2)
    _, report = failing_report(make_cfg(path, text_field="body"), tmp_path / "out")
    assert problems(report)["wrong_type"]["examples"] == [
        {"location": f"{path} row 1", "reason": "field 'body' must be a string, got NoneType"}
    ]
    assert report["datasets"]["train"]["length_chars"]["max"] == 5


@pytest.mark.parametrize("second", [pa.large_string(), pa.string()])
def test_prompt_completion_parquet_with_large_string_columns(tmp_path, second):
    """pandas writes its strings to Parquet as large_string: such a prompt/completion file (one
    column of each type too) is validated, its duplicate found, not a pyarrow traceback."""
    path = tmp_path / "train.parquet"
    prompts, answers = (
        ["What is HbA1c?", "Define eGFR.", "What is HbA1c?"],
        ["A marker.", "A rate.", "A marker."],
    )
    table = pa.table(
        {"prompt": pa.array(prompts, pa.large_string()), "completion": pa.array(answers, second)}
    )
    pq.write_table(table, path)
    report = validate_data(make_cfg(path), tmp_path / "out")
    d = report["datasets"]["train"]
    assert (report["passed"], d["kind"], d["records"], d["bad_records"]) == (True, "prompt_completion", 3, 0)
    assert problems(report)["duplicate"]["count"] == 1


def test_gzip_file_and_truncated_gzip(tmp_path):
    good = tmp_path / "good" / "train.jsonl.gz"
    good.parent.mkdir()
    good.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in GOOD).encode()))
    report = validate_data(make_cfg(good.parent), tmp_path / "out")
    assert report["datasets"]["train"]["records"] == 5

    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(good.read_bytes()[:-12])  # cut off the trailer
    message, report = failing_report(make_cfg(bad, max_error_rate=1.0), tmp_path / "out2")
    assert "unreadable_file" in problems(report)
    assert "unreadable_file" in message


def test_missing_file_names_the_uri(tmp_path):
    missing = tmp_path / "nope.jsonl"
    message, report = failing_report(make_cfg(missing), tmp_path / "out")
    assert str(missing) in message.splitlines()[0] or str(missing) in message
    assert message.startswith("validate_data failed: train: no_data")
    assert problems(report)["no_data"]["examples"][0]["location"] == str(missing)


def test_a_path_that_does_not_exist_is_named_with_its_field(tmp_path):
    """Not "no data files found (expected *.jsonl, ...)" for a path that already ends in .jsonl."""
    train = write_jsonl(tmp_path / "t.jsonl", GOOD)
    missing = tmp_path / "nope.jsonl"
    message, _ = failing_report(make_cfg(train, eval_uri=str(missing)), tmp_path / "out")
    assert f"  {missing}: no_data: data.eval_uri: does not exist" in message
    glob = f"{tmp_path}/no-such-folder/*.jsonl"
    message, _ = failing_report(make_cfg(glob), tmp_path / "out2")
    assert f"  {glob}: no_data: data.train_uri: {tmp_path}/no-such-folder does not exist" in message
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    message, _ = failing_report(make_cfg(empty), tmp_path / "out3")
    assert f"  {empty}: no_data: data.train_uri: no data files found (expected *.jsonl" in message


def test_a_folder_without_data_files_names_the_files_it_does_hold(tmp_path):
    """A folder of .json.gz or .JSONL files is not empty: "no data files found" alone sent the user
    looking for a wrong path. The no-data error names what is there and why it is not read."""
    data = tmp_path / "exports"
    (data / ".ipynb_checkpoints").mkdir(parents=True)
    for name in ("a.json.gz", "b.JSONL", "c.jsonl.zst", "d.txt", ".ipynb_checkpoints/a-checkpoint.jsonl"):
        (data / name).write_text("x")
    message, _ = failing_report(make_cfg(data), tmp_path / "out")
    assert (
        f"  {data}: no_data: data.train_uri: no data files found (expected *.jsonl, *.jsonl.gz, *.json, "
        f"*.parquet, *.csv, *.csv.gz, *.arrow); not read: 4 files whose names no reader takes: "
        f"{data}/a.json.gz, {data}/b.JSONL, {data}/c.jsonl.zst and 1 more; 1 file below a name starting "
        f"with '.' or '_': {data}/.ipynb_checkpoints/a-checkpoint.jsonl"
    ) in message


def test_a_path_from_the_home_directory_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "t.jsonl", GOOD)
    write_jsonl(tmp_path / "g.jsonl", [{"text": "the weather is nice"}])
    cfg = make_cfg("~/t.jsonl", general_uri="~/g.jsonl")
    assert (cfg.data.train_uri, cfg.data.general_uri) == (
        str(tmp_path / "t.jsonl"),
        str(tmp_path / "g.jsonl"),
    )
    assert validate_data(cfg, tmp_path / "out")["passed"]
    assert RunConfig.from_dict({"work_dir": "~/w", "registry": {"uri": "~/r"}}).work_dir == str(
        tmp_path / "w"
    )
    assert make_cfg("s3://bucket/~x.jsonl").data.train_uri == "s3://bucket/~x.jsonl"


@pytest.mark.parametrize("name", ["t.jsonl", "t.csv"])
def test_a_gzip_file_without_a_gz_name_is_named_once_with_the_rename(tmp_path, name):
    """Read as text, every line of it would be an invalid_utf8 error of its own."""
    path = tmp_path / name
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in GOOD * 50).encode()))
    message, report = failing_report(make_cfg(path), tmp_path / "out")
    assert (
        f"  {path}:1: wrong_encoding: the file is gzip-compressed but not named .gz: rename it {name}.gz"
    ) in message
    assert list(problems(report)) == ["wrong_encoding"]


def _compressed(compression: str, body: bytes) -> bytes:
    import bz2
    import io
    import lzma
    import zipfile

    if compression == "zip":
        sink = io.BytesIO()
        with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("train.jsonl", body)
        return sink.getvalue()
    if compression == "zstd":  # the frame's magic number, then what a compressor would write
        return b"\x28\xb5\x2f\xfd" + bz2.compress(body)
    return bz2.compress(body) if compression == "bzip2" else lzma.compress(body)


@pytest.mark.parametrize("compression", ["bzip2", "xz", "zstd", "zip"])
@pytest.mark.parametrize("name", ["t.jsonl", "t.csv"])
def test_a_file_compressed_otherwise_than_gzip_is_named_once_with_the_fix(tmp_path, compression, name):
    """A corpus shipped as .jsonl.zst (or bz2, xz, a .zip export) named by a glob or path: read as
    text it was an invalid_utf8 error per 'line' of compressed bytes and 'none of the N records is
    usable', records that do not exist; it is one error naming the compression."""
    path = tmp_path / name
    path.write_bytes(_compressed(compression, "".join(json.dumps(r) + "\n" for r in GOOD * 50).encode()))
    message, report = failing_report(make_cfg(path), tmp_path / "out")
    assert (
        f"  {path}:1: wrong_encoding: the file is {compression}-compressed; only gzip is read (.jsonl.gz, "
        ".csv.gz): decompress it, or recompress it with gzip"
    ) in message
    assert list(problems(report)) == ["wrong_encoding"]


@pytest.mark.parametrize(
    ("name", "document", "reason"),
    [
        ("t.json", {"data": GOOD}, "one JSON document over several lines (pretty-printed), not JSON Lines"),
        ("t.jsonl", GOOD, "one JSON document over several lines (pretty-printed), not JSON Lines"),
        ("t.json", GOOD, "a JSON array, not JSON Lines"),
    ],
)
def test_a_pretty_printed_json_document_is_named_once_not_an_error_per_line(tmp_path, name, document, reason):
    """json.dump(..., indent=2) of 5 records: read as JSON Lines it was 'none of the 19 records is
    usable' and an invalid_json error for each of its lines."""
    path = tmp_path / name
    path.write_text(json.dumps(document, indent=2))
    message, report = failing_report(make_cfg(path), tmp_path / "out")
    assert f"  {path}:1: unreadable_file: {reason}: write one object per line" in message
    assert list(problems(report)) == ["unreadable_file"]


def test_a_stray_opening_brace_before_records_is_one_broken_line(tmp_path):
    """Not one pretty-printed document: the records after it are read, the line held to the budget."""
    train = write_jsonl(tmp_path / "t.jsonl", ["{", *GOOD])
    report = validate_data(make_cfg(train, max_error_rate=0.2), tmp_path / "out")
    assert problems(report)["invalid_json"]["examples"][0]["location"] == f"{train}:1"
    assert (report["datasets"]["train"]["records"], report["datasets"]["train"]["bad_records"]) == (6, 1)


def test_unset_train_uri(tmp_path):
    message, _ = failing_report(RunConfig(), tmp_path / "out")
    assert "data.train_uri is required" in message


def test_empty_file(tmp_path):
    empty = tmp_path / "train.jsonl"
    empty.write_text("\n\n")
    message, report = failing_report(make_cfg(empty), tmp_path / "out")
    assert set(problems(report)) == {"empty_file", "no_records"}
    assert "no_records" in message

    # one empty file beside a good one is only a warning
    data = tmp_path / "dir"
    data.mkdir()
    write_jsonl(data / "a.jsonl", GOOD)
    (data / "b.jsonl").write_text("")
    report = validate_data(make_cfg(data), tmp_path / "out2")
    assert report["passed"] and problems(report)["empty_file"]["severity"] == "warning"


def test_files_the_readers_skip_in_a_data_folder_are_named(tmp_path):
    """A folder's .txt or upper-case .PARQUET is not read: a warning names each, so a user who
    expected them in training finds out before it; Spark's bookkeeping files are not reported."""
    data = tmp_path / "dir"
    data.mkdir()
    write_jsonl(data / "a.jsonl", GOOD)
    for name in ("notes.txt", "B.PARQUET", "_SUCCESS", ".a.jsonl.crc"):
        (data / name).write_text("x")
    report = validate_data(make_cfg(data), tmp_path / "out")
    skipped = problems(report)["skipped_file"]
    assert report["passed"] and skipped["severity"] == "warning"
    assert sorted(e["location"] for e in skipped["examples"]) == [
        str(data / "B.PARQUET"),
        str(data / "notes.txt"),
    ]


@pytest.mark.parametrize("suffix", ["", "/*.jsonl"])
def test_data_below_hidden_or_bookkeeping_folders_is_not_read_and_is_named(tmp_path, suffix):
    """Jupyter's stale copy and a failed Spark task's partial output look like data but are not:
    reading them would train on both (a folder's listing and a glob's `*` go below folders). They
    are skipped as Hadoop and Spark skip them, each named; `_SUCCESS` stays unreported."""
    data = tmp_path / "dir"
    data.mkdir()
    write_jsonl(data / "a.jsonl", GOOD)
    stale = data / ".ipynb_checkpoints" / "a-checkpoint.jsonl"
    partial = data / "_temporary" / "0" / "part-00000.jsonl"
    for path in (stale, partial):
        path.parent.mkdir(parents=True)
        write_jsonl(path, [{"text": "an older version of a document"}])
    (data / "_SUCCESS").write_text("")
    report = validate_data(make_cfg(f"{data}{suffix}"), tmp_path / "out")

    assert report["passed"] and report["datasets"]["train"]["records"] == len(GOOD)
    assert [e["location"] for e in problems(report)["skipped_file"]["examples"]] == [str(stale), str(partial)]
    assert (
        "below a name starting with '.' or '_'" in problems(report)["skipped_file"]["examples"][0]["reason"]
    )
    assert [r.text for r in iter_records(f"{data}{suffix}", make_cfg(data).data)] == [g["text"] for g in GOOD]


def test_s3_data_below_bookkeeping_prefixes_is_not_read(tmp_path, s3):
    from fulltune import storage

    storage.write_bytes(f"{s3}/_staging/data/a.jsonl", b'{"text": "the one document"}\n')
    storage.write_bytes(f"{s3}/_staging/data/_temporary/0/part-0.jsonl", b'{"text": "partial"}\n')
    report = validate_data(make_cfg(f"{s3}/_staging/data/"), tmp_path / "out")
    assert report["datasets"]["train"]["records"] == 1  # a named folder may itself be under '_'
    assert [e["location"] for e in problems(report)["skipped_file"]["examples"]] == [
        f"{s3}/_staging/data/_temporary/0/part-0.jsonl"
    ]


def test_s3_folder_markers_are_folders_not_empty_data_files(tmp_path, s3):
    """The S3 console's "Create folder" (and Hadoop's s3a) write an empty object 'data/': the URI
    s3://b/data/ was taken for that one file and failed as no_records; without the slash each
    marker was a skipped_file warning. They are the folders, and the data below them is read."""
    import boto3

    from fulltune import storage

    bucket = s3.removeprefix("s3://")
    for marker in ("data/", "data/sub/"):
        boto3.client("s3").put_object(Bucket=bucket, Key=marker, Body=b"")
    storage.write_bytes(f"{s3}/data/a.jsonl", b'{"text": "one document"}\n{"text": "another"}\n')
    storage.write_bytes(f"{s3}/data/sub/b.jsonl", b'{"text": "a third"}\n')
    for uri in (f"{s3}/data/", f"{s3}/data"):
        report = validate_data(make_cfg(uri), tmp_path / "out")
        assert report["datasets"]["train"]["records"] == 3, uri
        assert report["datasets"]["train"]["problems"] == [], uri


def test_files_skipped_in_each_folder_of_a_brace_alternation_are_named(tmp_path):
    """`{day1,day2}` names two folders: a stray file in either is reported, the data in both read."""
    for day, stray in (("day1", "README.md"), ("day2", "rows.JSONL")):
        (tmp_path / day).mkdir()
        write_jsonl(tmp_path / day / "a.jsonl", GOOD)
        (tmp_path / day / stray).write_text("x")
    report = validate_data(make_cfg(f"{tmp_path}/{{day1,day2}}"), tmp_path / "out")
    assert report["passed"] and report["datasets"]["train"]["files"] == 2
    assert sorted(e["location"] for e in problems(report)["skipped_file"]["examples"]) == [
        str(tmp_path / "day1" / "README.md"),
        str(tmp_path / "day2" / "rows.JSONL"),
    ]


def test_eval_and_general_sets(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    held_out = [{"text": f"held out {i}"} for i in range(10)]
    evalset = write_jsonl(tmp_path / "eval.jsonl", [GOOD[3], *held_out])  # 1 of 11 in train: a warning
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": "the weather is nice"}, "oops"])
    cfg = make_cfg(train, eval_uri=str(evalset), general_uri=str(general))
    message, report = failing_report(cfg, tmp_path / "out")

    assert set(report["datasets"]) == {"train", "eval", "general"}
    assert report["datasets"]["train"]["passed"] and report["datasets"]["eval"]["passed"]
    assert problems(report, "eval")["train_overlap"]["examples"] == [
        {"location": f"{evalset}:1", "reason": f"same content as train record {train}:4"}
    ]
    assert message.startswith("validate_data failed: general: 1 of 2 records bad")
    assert report["metrics"]["general_error_rate"] == 0.5


def test_record_kind_names_the_domain_data_and_a_plain_text_general_set_is_read_as_text(tmp_path):
    """Chat SFT data with plain-text replay (a web corpus) is the usual pair: record_kind: chat
    names the train and eval sets' kind; the general set's is read from its own fields."""
    chat = [
        {"messages": [{"role": "user", "content": f"dose {i}?"}, {"role": "assistant", "content": "5 mg."}]}
        for i in range(5)
    ]
    train = write_jsonl(tmp_path / "train.jsonl", chat)
    general = write_jsonl(
        tmp_path / "general.jsonl", [{"text": f"the weather is nice, day {i}"} for i in range(4)]
    )
    cfg = make_cfg(train, general_uri=str(general), record_kind="chat")
    report = validate_data(cfg, tmp_path / "out")
    assert report["datasets"]["general"]["passed"] and not report["datasets"]["general"]["problems"]
    assert resolve_kind(str(general), cfg.data.reading("general")) == "text"
    assert resolve_kind(str(general), cfg.data) == "chat"  # as train or eval data: what the config says
    assert [r.text for r in iter_records(str(general), cfg.data, "text")][0] == "the weather is nice, day 0"


def test_a_general_corpus_in_another_column_than_the_domain_text_is_named_by_general_text_field(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"note": f"potassium {i} mmol/L"} for i in range(5)])
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"the weather, day {i}"} for i in range(4)])
    cfg = make_cfg(train, general_uri=str(general), text_field="note")
    message, report = failing_report(cfg, tmp_path / "out")
    assert message.startswith("validate_data failed: general: unknown_kind")
    assert "data.general_text_field for general_uri's text" in message
    cfg = make_cfg(train, general_uri=str(general), text_field="note", general_text_field="text")
    report = validate_data(cfg, tmp_path / "out2")
    assert report["passed"] and not report["datasets"]["general"]["problems"]


def test_an_eval_set_that_is_mostly_the_train_set_fails_saying_what_the_gain_would_measure(tmp_path):
    """An eval set that repeats the training data passes the gate on memorisation: above a tenth of
    it in train, validation fails by default; data.checks.train_overlap can say it is meant."""
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    evalset = write_jsonl(tmp_path / "eval.jsonl", [*GOOD[:2], *({"text": f"new {i}"} for i in range(8))])
    message, report = failing_report(make_cfg(train, eval_uri=str(evalset)), tmp_path / "out")
    assert message.splitlines()[0] == (
        "validate_data failed: eval: train_overlap in 2 of 10 records (20.00% > allowed 10.00%): "
        "the domain gain would be measured on training data"
    )
    assert message.splitlines()[1] == f"  {evalset}:1: train_overlap: same content as train record {train}:1"
    assert report["datasets"]["train"]["passed"] and not report["datasets"]["eval"]["passed"]
    meant = make_cfg(train, eval_uri=str(evalset), checks={"train_overlap": {"action": "warn"}})
    assert validate_data(meant, tmp_path / "meant")["passed"]


def test_a_general_set_that_is_the_train_set_fails_saying_what_forgetting_would_measure(tmp_path):
    """general_uri naming the domain data (a copy-pasted URI): the general loss falls as training
    goes, so the gate's forgetting check passes whatever the model forgot, and replay repeats domain
    records. Above a tenth of the general set in train, validation fails; a chat train set beside a
    plain-text general set is no kind_mismatch (the general set's kind is its own)."""
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    message, report = failing_report(make_cfg(train, general_uri=str(train)), tmp_path / "out")
    assert message.splitlines()[0] == (
        "validate_data failed: general: general_overlap in 5 of 5 records (100.00% > allowed 10.00%): "
        "forgetting would be measured on training data"
    )
    assert message.splitlines()[1] == f"  {train}:1: general_overlap: same content as train record {train}:1"
    assert report["datasets"]["train"]["passed"] and not report["datasets"]["general"]["passed"]
    general = write_jsonl(
        tmp_path / "general.jsonl", [GOOD[0], *({"text": f"weather {i}"} for i in range(9))]
    )
    report = validate_data(make_cfg(train, general_uri=str(general)), tmp_path / "tenth")
    assert report["passed"] and problems(report, "general")["general_overlap"]["count"] == 1
    meant = make_cfg(train, general_uri=str(train), checks={"general_overlap": {"action": "warn"}})
    assert validate_data(meant, tmp_path / "meant")["passed"]


def test_first_record_of_another_shape_does_not_decide_the_kind(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"title": "x"}, *GOOD])
    cfg = make_cfg(train, max_error_rate=0.2)
    assert resolve_kind(str(train), cfg.data) == "text"
    report = validate_data(cfg, tmp_path / "out")
    assert problems(report)["missing_field"]["examples"][0]["location"] == f"{train}:1"
    assert [r.loc.line for r in iter_records(str(train), cfg.data)] == [2, 3, 4, 5, 6]


def test_utf8_bom_is_accepted(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"\xef\xbb\xbf" + b'{"text": "with a byte order mark"}\n')
    assert validate_data(make_cfg(train), tmp_path / "out")["passed"]


def test_streams_a_larger_file_quickly(tmp_path):
    import time

    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"record {i} " * 20} for i in range(20_000)])
    start = time.perf_counter()
    report = validate_data(make_cfg(train), tmp_path / "out")
    assert report["datasets"]["train"]["records"] == 20_000
    assert time.perf_counter() - start < 5


def test_s3_jsonl_and_parquet(tmp_path, s3):
    import io

    from fulltune import storage

    lines = [json.dumps({"text": f"line {i} " + "x" * (i * 97 % 3000)}) for i in range(300)]  # > 1 read chunk
    storage.write_bytes(f"{s3}/data/a.jsonl", ("\n".join(lines) + "\n").encode())
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["three", "four", ""]}), buf)
    storage.write_bytes(f"{s3}/data/b.parquet", buf.getvalue())
    storage.write_bytes(f"{s3}/data/c.jsonl.gz", gzip.compress(b'{"text": "zipped"}\n'))

    message, report = failing_report(make_cfg(f"{s3}/data"), tmp_path / "out")
    d = report["datasets"]["train"]
    assert (d["files"], d["records"], d["bad_records"]) == (3, 304, 1)
    assert f"{s3}/data/b.parquet row 2: empty_text: field 'text' is empty or whitespace" in message


def test_task_files_evaluate_would_refuse_are_refused_before_training(tmp_path):
    """A typo in a task file's path, or a bad line in it, used to surface at the evaluate step,
    after every hour of training; validate_data reads them as evaluate will, first."""
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "2+2?", "choices": ["3", "4"], "answer": 1}])
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Capital of France?", "answer": "Paris"}])
    evaluation = {
        "mc_tasks": [{"name": "arith", "uri": str(mc)}],
        "generation_tasks": [{"name": "capitals", "uri": str(gen)}],
    }
    cfg = make_cfg(train).with_overrides({"evaluation": evaluation})
    assert validate_data(cfg, tmp_path / "ok")["passed"]

    write_jsonl(gen, [{"prompt": "Capital of France?", "answer": "Paris"}, {"prompt": "Capital of Peru?"}])
    missing = {"name": "typo", "uri": str(tmp_path / "mcq.jsonl")}
    broken = cfg.with_overrides({"evaluation.mc_tasks": [*evaluation["mc_tasks"], missing]})
    with pytest.raises(DataValidationError) as exc:
        validate_data(broken, tmp_path / "out")
    lines = str(exc.value).splitlines()
    assert lines[0].startswith("2 evaluation task file problem(s)")
    assert f"  evaluation.mc_tasks[1].uri: {tmp_path / 'mcq.jsonl'}: no such file" in lines
    assert any(
        line.startswith(f"  evaluation.generation_tasks[0] (capitals): {gen} line 2:") for line in lines
    ), lines
    assert not (tmp_path / "out").exists()  # refused before any dataset was read
