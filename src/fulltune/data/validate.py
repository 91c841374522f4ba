"""validate_data: read every record of every dataset once and judge it before any GPU is spent.

For each dataset (`data.train_uri`, and `data.eval_uri`, `data.general_uri` when set) every row is
parsed and normalised exactly as preprocessing will read it (`fulltune.data.records`). Each problem
has a stable code, a severity, a count and up to `data.max_examples` example locations:

errors (the record is unusable and counts as bad)
    invalid_json, invalid_utf8, not_an_object, missing_field, wrong_type, empty_text, bad_chat
errors that fail the dataset whatever the error budget
    no_data (nothing at the URI), unreadable_file (corrupt gzip or Parquet: an unknown number of
    records is lost), unknown_kind (no record names a known kind), no_records (files hold no rows)
warnings (the record is used; worth a look)
    duplicate (exact same content as an earlier record of the dataset), train_overlap (an eval
    record also in train: the eval loss would flatter the model), control_chars (C0/C1 control
    characters), mojibake (U+FFFD or UTF-8 read as Latin-1, e.g. 'Ã©'), empty_file, kind_mismatch

A dataset fails when it has a fatal error or its error rate (bad records / records) is above
`data.max_error_rate`. `report.json` and `report.html` are written to `out_dir` in every case —
also when failing, before DataValidationError is raised.

report.json (format `fulltune.validate_data/v1`):

    {"passed": bool, "max_error_rate": float,
     "datasets": {"train" | "eval" | "general": {
         "uri", "kind", "files", "records", "bad_records", "error_rate", "max_error_rate", "passed",
         "problems": [{"code", "severity", "count", "examples": [{"location", "reason"}]}],
         "length_chars": {"min", "p50", "p95", "max"} | null}},
     "metrics": {"<dataset>_records", "<dataset>_bad_records", "<dataset>_error_rate"}}

Everything streams: memory grows only by a few bytes per record (a 64-bit content hash for the
duplicate check and the record's length).
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fulltune.config import DataSection, RunConfig
from fulltune.data.records import (
    DataError,
    Location,
    Record,
    RecordError,
    data_files,
    iter_raw_file,
    normalize,
    resolve_kind,
)
from fulltune.reports import CSS, write_reports

REPORT_FORMAT = "fulltune.validate_data/v1"

# code -> (severity, what it means); "fatal" errors fail the dataset whatever the error budget.
CODES: dict[str, tuple[str, str]] = {
    "no_data": ("fatal", "nothing to read at the URI"),
    "unreadable_file": ("fatal", "a corrupt or truncated file: an unknown number of records is lost"),
    "unknown_kind": ("fatal", "the fields name no record kind (see data.text_field and friends)"),
    "no_records": ("fatal", "the data files hold no records"),
    "invalid_json": ("error", "the line is not valid JSON"),
    "invalid_utf8": ("error", "the line is not valid UTF-8"),
    "not_an_object": ("error", "the line is JSON but not an object"),
    "missing_field": ("error", "a field the record kind needs is absent"),
    "wrong_type": ("error", "a field has the wrong type"),
    "empty_text": ("error", "a text field is empty or whitespace only"),
    "bad_chat": ("error", "the messages are not a usable conversation"),
    "duplicate": ("warning", "same content as an earlier record: it is trained on twice"),
    "train_overlap": ("warning", "an eval record also in train: eval loss would flatter the model"),
    "control_chars": ("warning", "control characters, usually extraction debris"),
    "mojibake": ("warning", "garbled characters from a wrong decode upstream"),
    "empty_file": ("warning", "a data file without records"),
    "kind_mismatch": ("warning", "this dataset's record kind differs from train's"),
}
FATAL = frozenset(code for code, (severity, _) in CODES.items() if severity == "fatal")
WARNINGS = frozenset(code for code, (severity, _) in CODES.items() if severity == "warning")
MESSAGE_LINES = 20  # problem lines in the DataValidationError message; the report has them all

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_MOJIBAKE = re.compile("\ufffd|Ã[\u00a0-\u00bf]|Â[\u00a0-\u00bf]|â€")
_POSITION_BITS = 40  # packed first-seen location: file index << 40 | line or row


class DataValidationError(ValueError):
    """Data that fails validation; the message starts with a one-line summary, then lists the top
    problems as `location: code: reason`."""


def validate_data(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Validate the configured datasets, write `report.json` and `report.html`, return the report.

    Args:
        cfg: the run config; `data` names the datasets, the columns, the error budget.
        out_dir: local directory for `report.json` and `report.html` (created if needed).

    Raises:
        DataValidationError: a dataset is missing, unreadable, or over its error budget. The
            reports are written first.
    """
    out_dir = Path(out_dir)
    data = cfg.data
    datasets: dict[str, dict[str, Any]] = {}
    train_index: dict[int, int] | None = None
    train_files: list[str] = []
    for name, uri in (("train", data.train_uri), ("eval", data.eval_uri), ("general", data.general_uri)):
        if name != "train" and not uri:
            continue
        check = _DatasetCheck(name, uri, data)
        if name == "eval" and train_index is not None:
            check.compare_with(train_index, train_files, datasets["train"]["kind"])
        datasets[name] = check.run()
        if name == "train":
            train_index, train_files = check.index, check.files

    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "passed": all(d["passed"] for d in datasets.values()),
        "max_error_rate": data.max_error_rate,
        "datasets": datasets,
        "metrics": _metrics(datasets),
    }
    write_reports(report, out_dir, render_html)
    if not report["passed"]:
        raise DataValidationError(failure_message(report, out_dir / "report.html"))
    return report


# -- one dataset ----------------------------------------------------------------------------------


@dataclass
class _Problem:
    code: str
    severity: str
    count: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)


class _DatasetCheck:
    """One streaming pass over one dataset, collecting problems, lengths and content hashes."""

    def __init__(self, name: str, uri: str | None, cfg: DataSection):
        self.name, self.uri, self.cfg = name, uri or "", cfg
        self.problems: dict[str, _Problem] = {}
        self.files: list[str] = []
        self.index: dict[int, int] = {}  # content hash -> packed first location
        self.records = self.bad = 0
        self.lengths = array("q")
        self.kind: str | None = None
        self._other: tuple[dict[int, int], list[str], str | None] | None = None

    def compare_with(self, index: dict[int, int], files: list[str], kind: str | None) -> None:
        """Report records that also occur in another dataset (eval vs train) as train_overlap."""
        self._other = (index, files, kind)

    def add(self, code: str, reason: str, location: Location | str) -> None:
        severity = "warning" if code in WARNINGS else "error"
        problem = self.problems.setdefault(code, _Problem(code, severity))
        problem.count += 1
        if len(problem.examples) < self.cfg.max_examples:
            problem.examples.append({"location": str(location), "reason": reason})

    def run(self) -> dict[str, Any]:
        if not self.uri:
            self.add("no_data", f"data.{self.name}_uri is required", f"data.{self.name}_uri")
            return self.result()
        try:
            self.files = data_files(self.uri)
        except (DataError, OSError) as exc:
            self.add("no_data", str(exc).removeprefix(f"{self.uri}: "), self.uri)
            return self.result()
        try:
            self.kind = resolve_kind(self.uri, self.cfg)
        except (RecordError, DataError, OSError):
            pass  # no record names a kind, none parses, or a file breaks: the pass below reports it
        if self._other and self._other[2] and self.kind and self.kind != self._other[2]:
            self.add(
                "kind_mismatch", f"records are {self.kind!r}, train records are {self._other[2]!r}", self.uri
            )

        for file_index, path in enumerate(self.files):
            before = self.records
            try:
                broken = self._check_file(file_index, path)
            except OSError as exc:  # vanished or unreadable mid-run
                self.add("unreadable_file", f"{type(exc).__name__}: {exc}", path)
                broken = True
            if self.records == before and not broken:
                self.add("empty_file", "no records in this file", path)
        if self.records == 0 and not any(p.code in FATAL for p in self.problems.values()):
            self.add("no_records", "the data files hold no records", self.uri)
        return self.result()

    def _check_file(self, file_index: int, path: str) -> bool:
        """Check every row of one file; True when the file broke off (corrupt or truncated)."""
        for raw in iter_raw_file(path):
            if raw.code == "unreadable_file":  # not a record: the file broke off here
                self.add(raw.code, raw.reason or "", raw.loc)
                return True
            self.records += 1
            if self.kind is None:
                self.bad += 1
                if raw.code:
                    self.add(raw.code, raw.reason or "", raw.loc)
                else:
                    self.add("unknown_kind", _unknown_kind_reason(raw.value or {}, self.cfg), raw.loc)
                continue
            try:
                record = normalize(raw, self.kind, self.cfg)
            except RecordError as exc:
                self.bad += 1
                self.add(exc.code, exc.reason, exc.loc)
                continue
            self._check_record(record, file_index)
        return False

    def _check_record(self, record: Record, file_index: int) -> None:
        text = record.plain_text()
        self.lengths.append(len(text))
        key = _content_hash(record)
        position = record.loc.line if record.loc.line is not None else (record.loc.row or 0)
        first = self.index.get(key)
        if first is None:
            self.index[key] = (file_index << _POSITION_BITS) | position
        else:
            self.add("duplicate", f"same content as {_unpack(first, self.files)}", record.loc)
        if self._other is not None:
            other_index, other_files, _ = self._other
            if key in other_index:
                where = _unpack(other_index[key], other_files)
                self.add("train_overlap", f"same content as train record {where}", record.loc)
        if match := _CONTROL.search(text):
            self.add("control_chars", f"U+{ord(match.group()):04X} at character {match.start()}", record.loc)
        if match := _MOJIBAKE.search(text):
            if match.group() == "\ufffd":
                reason = f"U+FFFD replacement character at character {match.start()} (bytes lost in an earlier decode)"
            else:
                reason = (
                    f"{match.group()!r} at character {match.start()} looks like UTF-8 read as Latin-1/cp1252"
                )
            self.add("mojibake", reason, record.loc)

    def result(self) -> dict[str, Any]:
        problems = sorted(
            self.problems.values(),
            key=lambda p: (p.code not in FATAL, p.severity != "error", -p.count, p.code),
        )
        rate = self.bad / self.records if self.records else 0.0
        fatal = any(p.code in FATAL for p in problems)
        return {
            "uri": self.uri,
            "kind": self.kind,
            "files": len(self.files),
            "records": self.records,
            "bad_records": self.bad,
            "error_rate": rate,
            "max_error_rate": self.cfg.max_error_rate,
            "passed": not fatal and rate <= self.cfg.max_error_rate,
            "problems": [
                {"code": p.code, "severity": p.severity, "count": p.count, "examples": p.examples}
                for p in problems
            ],
            "length_chars": _length_stats(self.lengths),
        }


def _unknown_kind_reason(value: dict[str, Any], cfg: DataSection) -> str:
    return (
        f"fields {sorted(value)[:8]} name no record kind; expected {cfg.text_field!r}, "
        f"{cfg.prompt_field!r}+{cfg.completion_field!r} or {cfg.messages_field!r} (see data.*_field)"
    )


def _content_hash(record: Record) -> int:
    if record.kind == "text":
        content = record.text or ""
    elif record.kind == "prompt_completion":
        content = f"{record.prompt}\x1f{record.completion}"
    else:
        content = json.dumps(record.messages, ensure_ascii=False, sort_keys=True)
    digest = hashlib.blake2b(content.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _unpack(packed: int, files: list[str]) -> str:
    path, position = files[packed >> _POSITION_BITS], packed & ((1 << _POSITION_BITS) - 1)
    return str(Location(path, row=position) if path.endswith(".parquet") else Location(path, line=position))


def _length_stats(lengths: array) -> dict[str, int] | None:
    if not lengths:
        return None
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "p50": percentile(ordered, 50),
        "p95": percentile(ordered, 95),
        "max": ordered[-1],
    }


def percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending, non-empty list."""
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def _metrics(datasets: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Numbers only, flat: what the KFP Metrics artifact shows."""
    out: dict[str, float] = {}
    for name, d in datasets.items():
        out[f"{name}_records"] = d["records"]
        out[f"{name}_bad_records"] = d["bad_records"]
        out[f"{name}_error_rate"] = d["error_rate"]
    return out


# -- messages and reports ---------------------------------------------------------------------------


def _verdict(d: dict[str, Any]) -> str:
    fatal = [p["code"] for p in d["problems"] if p["code"] in FATAL]
    if fatal:
        return ", ".join(fatal)
    return (
        f"{d['bad_records']} of {d['records']} records bad "
        f"({d['error_rate']:.2%} > allowed {d['max_error_rate']:.2%})"
    )


def failure_message(report: dict[str, Any], html_path: Path | str) -> str:
    """One summary line, then the top error locations as `location: code: reason`."""
    failed = {name: d for name, d in report["datasets"].items() if not d["passed"]}
    lines = ["validate_data failed: " + "; ".join(f"{name}: {_verdict(d)}" for name, d in failed.items())]
    shown = total = 0
    for d in failed.values():
        for problem in d["problems"]:
            if problem["severity"] != "error":
                continue
            total += problem["count"]
            for ex in problem["examples"]:
                if shown < MESSAGE_LINES:
                    lines.append(f"  {ex['location']}: {problem['code']}: {ex['reason']}")
                    shown += 1
    if total > shown:
        lines.append(f"  ... {total - shown} more; see {html_path}")
    else:
        lines.append(f"  report: {html_path}")
    return "\n".join(lines)


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page: the summary table, then each dataset's problems with examples."""
    esc = html.escape
    datasets = report["datasets"]
    passed = report["passed"]
    total = sum(d["records"] for d in datasets.values())
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>validate_data</title><style>{CSS}</style>"
        "</head><body><h1>Data validation: "
        + ("<span class='ok'>passed</span>" if passed else "<span class='error'>failed</span>")
        + "</h1>"
    ]
    if passed and not any(d["problems"] for d in datasets.values()):
        parts.append(
            f"<p>All {total:,} records in {len(datasets)} dataset(s) parsed cleanly; no problems found.</p>"
        )
    rows = []
    for name, d in datasets.items():
        stats = d["length_chars"] or {}
        status = (
            "<span class='ok'>passed</span>"
            if d["passed"]
            else f"<span class='error'>{esc(_verdict(d))}</span>"
        )
        numbers = [
            d["files"],
            d["records"],
            d["bad_records"],
            *(stats.get(k) for k in ("min", "p50", "p95", "max")),
        ]
        rows.append(
            f"<tr><td>{esc(name)}</td><td><code>{esc(d['uri'])}</code></td><td>{esc(str(d['kind'] or '—'))}</td>"
            + "".join(f"<td class='n'>{'—' if n is None else f'{n:,}'}</td>" for n in numbers[:3])
            + f"<td class='n'>{d['error_rate']:.2%}</td>"
            + "".join(f"<td class='n'>{'—' if n is None else f'{n:,}'}</td>" for n in numbers[3:])
            + f"<td>{status}</td></tr>"
        )
    parts.append(
        "<table><tr><th>dataset</th><th>uri</th><th>kind</th><th>files</th><th>records</th><th>bad</th>"
        "<th>error rate</th><th>chars min</th><th>p50</th><th>p95</th><th>max</th><th>status</th></tr>"
        + "".join(rows)
        + "</table>"
        + f"<p>Allowed error rate: {report['max_error_rate']:.2%} of records per dataset.</p>"
    )
    for name, d in datasets.items():
        if not d["problems"]:
            continue
        parts.append(
            f"<h2>{esc(name)}: problems</h2><table><tr><th>code</th><th>severity</th><th>count</th>"
            "<th>meaning</th><th>examples</th></tr>"
        )
        for p in d["problems"]:
            examples = "".join(
                f"<li><code>{esc(ex['location'])}</code>: {esc(ex['reason'])}</li>" for ex in p["examples"]
            )
            more = p["count"] - len(p["examples"])
            if more > 0:
                examples += f"<li>… and {more:,} more</li>"
            parts.append(
                f"<tr><td><code>{esc(p['code'])}</code></td><td class='{esc(p['severity'])}'>{esc(p['severity'])}</td>"
                f"<td class='n'>{p['count']:,}</td><td>{esc(CODES.get(p['code'], ('', ''))[1])}</td>"
                f"<td><ul>{examples}</ul></td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)
