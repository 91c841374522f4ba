"""The checking steps' contract, as a property: whatever `validate_data` passes, preprocessing accepts,
with nothing lost or merged.

For generated inputs of every reader (JSONL, JSONL.gz, CSV, Parquet, `save_to_disk` Arrow) that mix
good records with the malformations users bring (escapes of every kind, lone surrogates, control
characters, NUL, BOM, CRLF, blank and very long lines, truncated and concatenated gzip members,
quotes that never close, ragged rows, other delimiters, nulls, nested and large string columns,
dictionary columns, many row groups):

1. every text the reader yields as a good record is exactly what an independent strict parser of the
   same bytes reads at the same place (json.loads per line with strict UTF-8; pyarrow's CSV reader;
   pyarrow.parquet.read_table / the IPC reader), and the two agree on how many there are;
2. when validate_data passes, `preprocess_shard` succeeds and tokenizes exactly the records
   validate_data counted as good (records - bad_records).

The error budget is opened wide (data.max_error_rate 1.0) so that every generated file without a
fatal problem passes validation and reaches preprocessing.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fulltune.config import RunConfig
from fulltune.data.records import WIDE_PEEK, iter_records, wide_encoding
from fulltune.data.validate import DataValidationError, validate_data
from fulltune.preprocess import core

SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Text users' records hold: letters, digits, punctuation, quotes, backslashes, commas, control
# characters, NUL, non-BMP characters; never surrogates (those only arrive through escapes or bytes).
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x1F9FF)
    | st.sampled_from(list('",;\\\t\r\n\x00\x1b\x7f\u2028\ufeff ')),
    max_size=40,
)


def config(uri: str, work: Path, model_dir: str) -> RunConfig:
    return RunConfig.from_dict(
        {
            "work_dir": str(work),
            "model": {"base_model_uri": model_dir},
            "data": {"train_uri": uri, "max_error_rate": 1.0, "record_kind": "text"},
            "preprocess": {"max_seq_len": 64, "num_shards": 2, "replay_fraction": 0.0, "block_records": 7},
        }
    )


def check_contract(
    tmp: Path,
    uri: str,
    strict: list[str] | None,
    model_dir: str,
    refused: tuple[str, ...] | None = ("unreadable_file",),
) -> None:
    """`strict`: the texts of the good records as the independent parser reads them, in order, or
    None where it refuses the file as a whole: then validate_data must report one of `refused` (with
    None: a bad record or a fatal problem, whichever), and what it passes must still reach
    preprocessing whole."""
    cfg = config(uri, tmp / "work", model_dir)
    try:
        report = validate_data(cfg, tmp / "out")
    except DataValidationError:
        report = json.loads((tmp / "out" / "report.json").read_text())
    d = report["datasets"]["train"]
    fatal = [p["code"] for p in d["problems"] if p["code"] in ("unreadable_file", "no_records", "no_data")]
    good = d["records"] - d["bad_records"]
    if strict is None:
        found = {p["code"] for p in d["problems"]}
        flagged = found & set(refused) if refused else (d["bad_records"] or fatal)
        assert flagged, f"the strict parser refuses the file, validate_data found only {found}"
    elif not strict:  # nothing usable: validate_data must not pass it
        assert not report["passed"]
        return
    else:
        assert not fatal, d["problems"]
        read = [r.text for r in iter_records(uri, cfg.data, "text")]
        assert read == strict, "the reader and the strict parser disagree"
        assert good == len(strict), (good, len(strict), d["problems"])
    if report["passed"]:
        examples = 0
        for i in range(cfg.preprocess.num_shards):
            manifest = core.preprocess_shard(cfg, i)
            examples += sum(s["examples"] for s in manifest["splits"].values())
        assert examples == good, "preprocessing read another number of records than validate_data counted"


def usable(text: Any) -> bool:
    """What makes a text field a good record: a string with something besides whitespace."""
    return isinstance(text, str) and bool(text.strip())


# -- JSONL and JSONL.gz ---------------------------------------------------------------------------

ESCAPES = [
    r"\n",
    r"\t",
    r"\"",
    r"\\",
    r"\/",
    r"\u0000",
    r"\u001b",
    r"\u00e9",
    r"\ud83d\ude00",
    r"\ud800",
    r"\udfff",
    r"\u2028",
]
BROKEN_LINES = [
    b"{",
    b'{"text": "no end',
    b"[1, 2]",
    b'"just a string"',
    b"\xff\xfe",
    b'{"text": 1}',
    b"{}",
    b"\x00",
]


@st.composite
def jsonl_line(draw) -> bytes:
    kind = draw(st.sampled_from(["text", "text", "escaped", "broken", "blank", "long"]))
    if kind == "text":
        return json.dumps({"text": draw(TEXT)}, ensure_ascii=draw(st.booleans())).encode(
            "utf-8", "surrogatepass"
        )
    if kind == "escaped":
        parts = draw(st.lists(st.sampled_from(ESCAPES) | st.text("ab c", max_size=3), min_size=1, max_size=5))
        return ('{"text": "' + "".join(parts) + '", "id": 1}').encode()
    if kind == "broken":
        return draw(st.sampled_from(BROKEN_LINES))
    if kind == "blank":
        return draw(st.sampled_from([b"", b"   ", b"\t"]))
    return json.dumps({"text": "long " * draw(st.integers(2_000, 20_000))}).encode()


@st.composite
def jsonl_file(draw) -> bytes:
    lines = draw(st.lists(jsonl_line(), min_size=1, max_size=14))
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    body = newline.join(lines) + (newline if draw(st.booleans()) else b"")
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + body


def strict_jsonl(data: bytes) -> list[str]:
    """The good records' texts: each line decoded as strict UTF-8 (a BOM allowed at the start),
    parsed with json.loads, an object whose "text" has something besides whitespace and encodes
    as UTF-8."""
    out = []
    for i, line in enumerate(data.split(b"\n")):
        if i == 0 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        line = line.removesuffix(b"\r")
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode("utf-8"))
            text = value["text"]
            text.encode("utf-8")
        except (UnicodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            continue
        if usable(text):
            out.append(text)
    return out


@SETTINGS
@given(data=jsonl_file())
def test_jsonl_validated_is_jsonl_preprocessed(tmp_path_factory, demo_assets, data):
    tmp = tmp_path_factory.mktemp("jsonl")
    (tmp / "d.jsonl").write_bytes(data)
    check_contract(tmp, str(tmp / "d.jsonl"), strict_jsonl(data), str(demo_assets.base_model_dir))


@SETTINGS
@given(data=jsonl_file(), members=st.integers(1, 3), cut=st.none() | st.integers(1, 40))
# a UTF-16 byte-order mark, then the cut inside the second member: what the reader has read by then
@example(data=b"\xff\xfe\r\n", members=3, cut=31)
def test_gzip_members_and_truncation(tmp_path_factory, demo_assets, data, members, cut):
    """Concatenated gzip members read as one stream; a truncated one is refused as unreadable, or as
    UTF-16 where what it holds before the cut starts like UTF-16 (a whole-file refusal at its first
    bytes, as for any UTF-16 file: the reader does not read on to where it breaks off)."""
    tmp = tmp_path_factory.mktemp("gz")
    step = max(1, len(data) // members)
    blob = b"".join(gzip.compress(data[i : i + step]) for i in range(0, len(data), step))
    if cut is not None:
        blob = blob[: max(1, len(blob) - cut)]
    (tmp / "d.jsonl.gz").write_bytes(blob)
    try:
        strict = strict_jsonl(gzip.decompress(blob))
    except (EOFError, OSError):
        strict = None
    head = readable_prefix(blob)[:WIDE_PEEK]
    refused = ("wrong_encoding",) if wide_encoding(head) else ("unreadable_file",)
    if wide_encoding(head) and len(head) < WIDE_PEEK:
        # the stream breaks off inside the bytes the reader peeks at: either diagnosis is the file's
        refused = ("wrong_encoding", "unreadable_file")
    check_contract(tmp, str(tmp / "d.jsonl.gz"), strict, str(demo_assets.base_model_dir), refused)


def readable_prefix(blob: bytes) -> bytes:
    """What a gzip stream of one or more members decompresses to before it breaks off."""
    out, rest = b"", blob
    while rest:
        member = zlib.decompressobj(wbits=31)
        out += member.decompress(rest)
        if not member.eof:
            break
        rest = member.unused_data
    return out


# -- CSV --------------------------------------------------------------------------------------------


@st.composite
def csv_file(draw) -> tuple[bytes, bool]:
    """(bytes, whether the file was written well): rows of a `text` and an `id` column written by
    csv.writer with any quoting, then maybe broken: a quote that never closes, a ragged row, another
    delimiter, a BOM, CRLF."""
    texts = draw(st.lists(TEXT, min_size=1, max_size=10))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
    delimiter = draw(st.sampled_from([",", ",", ";", "\t"]))
    buf = io.StringIO()
    writer = csv.writer(
        buf, quoting=quoting, delimiter=delimiter, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))
    )
    writer.writerow(["text", "id"])
    for i, t in enumerate(texts):
        writer.writerow([t.replace("\x00", ""), str(i)])  # csv.writer cannot write NUL
    text = buf.getvalue()
    damage = draw(st.sampled_from(["none", "none", "unclosed", "ragged", "bom"]))
    if damage == "unclosed":
        lines = text.split("\n")
        at = draw(st.integers(1, max(1, len(lines) - 1)))
        lines[at] = '"' + lines[at]
        text = "\n".join(lines)
    elif damage == "ragged":
        text += f"extra{delimiter}fields{delimiter}here\n"
    elif damage == "bom":
        text = "\ufeff" + text
    return text.encode("utf-8"), delimiter == ","


# RFC 4180's grammar: a field is quoted (a quote inside written twice) or holds no quote, comma or
# line break; fields are separated by commas, records end in CRLF or LF.
_FIELD = rb'(?:"(?:[^"]|"")*"|[^",\r\n]*)'
_RFC4180 = re.compile(rb"(?:%s(?:,%s)*(?:\r?\n|\Z))*" % (_FIELD, _FIELD))


def strict_csv(data: bytes) -> list[str] | None:
    """The good rows' texts: None unless the file follows RFC 4180's quoting (after a BOM); then
    pyarrow's CSV reader's (values may hold line breaks; rows of another width are skipped, as bad
    records)."""
    if not _RFC4180.fullmatch(data.removeprefix(b"\xef\xbb\xbf")):
        return None
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=lambda row: "skip"),
            convert_options=pacsv.ConvertOptions(
                column_types={"text": pa.string(), "id": pa.string()}, strings_can_be_null=False
            ),
            read_options=pacsv.ReadOptions(use_threads=False),
        )
    except (pa.ArrowInvalid, KeyError):
        return None
    if "text" not in table.column_names:
        return []
    return [t for t in table.column("text").to_pylist() if usable(t)]


@SETTINGS
@given(file=csv_file())
def test_csv_validated_is_csv_preprocessed(tmp_path_factory, demo_assets, file):
    data, comma = file
    tmp = tmp_path_factory.mktemp("csv")
    (tmp / "d.csv").write_bytes(data)
    strict = strict_csv(data) if comma else []  # another delimiter: no `text` column, nothing usable
    # where the bytes break RFC 4180, Python's csv module and pyarrow each read them their own way:
    # a bad record or a refused file is what counts, and what passes must reach preprocessing whole
    check_contract(tmp, str(tmp / "d.csv"), strict, str(demo_assets.base_model_dir), refused=None)


# -- Parquet and save_to_disk ---------------------------------------------------------------------


@st.composite
def text_column(draw) -> pa.Array:
    values = draw(st.lists(st.none() | TEXT, min_size=1, max_size=12))
    kind = draw(st.sampled_from(["string", "large_string", "dictionary", "nested", "binary"]))
    if kind == "large_string":
        return pa.array(values, pa.large_string())
    if kind == "dictionary":
        return pa.array(values, pa.string()).dictionary_encode()
    if kind == "nested":
        return pa.array([None if v is None else [v] for v in values], pa.list_(pa.string()))
    if kind == "binary":
        return pa.array([None if v is None else v.encode() for v in values], pa.binary())
    return pa.array(values, pa.string())


def strict_table(table: pa.Table) -> list[str]:
    col = table.column("text")
    if not (
        pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_dictionary(col.type)
    ):
        return []
    return [t for t in col.to_pylist() if usable(t)]


@SETTINGS
@given(col=text_column(), row_group=st.integers(1, 5))
def test_parquet_validated_is_parquet_preprocessed(tmp_path_factory, demo_assets, col, row_group):
    tmp = tmp_path_factory.mktemp("parquet")
    pq.write_table(pa.table({"text": col}), tmp / "d.parquet", row_group_size=row_group)
    strict = strict_table(pq.read_table(tmp / "d.parquet"))
    check_contract(tmp, str(tmp / "d.parquet"), strict, str(demo_assets.base_model_dir))


@SETTINGS
@given(col=text_column(), batches=st.integers(1, 4))
def test_save_to_disk_validated_is_save_to_disk_preprocessed(tmp_path_factory, demo_assets, col, batches):
    tmp = tmp_path_factory.mktemp("arrow")
    d = tmp / "ds"
    d.mkdir()
    table = pa.table({"text": col})
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=max(1, len(col) // batches)):
                writer.write_batch(batch)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (d / "dataset_info.json").write_text("{}")
    with pa.memory_map(str(d / "data-00000-of-00001.arrow")) as source:
        strict = strict_table(pa.ipc.open_stream(source).read_all())
    check_contract(tmp, str(d), strict, str(demo_assets.base_model_dir))


@pytest.mark.parametrize(
    "data",
    [
        b'{"text": "a \\ud800 b"}\n{"text": "fine"}\n',  # a lone surrogate escape
        b'{"text": "pair \\ud83d\\ude00 ok"}\n',  # a surrogate pair: one emoji, fine
        b'{"text": "\\\\ud800 is literal text"}\n',  # an escaped backslash: not an escape
    ],
)
def test_surrogate_escapes(tmp_path, demo_assets, data):
    (tmp_path / "d.jsonl").write_bytes(data)
    check_contract(tmp_path, str(tmp_path / "d.jsonl"), strict_jsonl(data), str(demo_assets.base_model_dir))
