"""report.html: the verdict, a summary row per dataset, then each dataset's length histogram and its
problems with example locations, and the policies they were judged by. Rendered from report.json
alone, with the report kit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fulltune import report_kit as kit
from fulltune.data.validate.codes import CODES, FATAL, RECORD_ERRORS
from fulltune.data.validate.verdict import failure_reason
from fulltune.report_kit import Html

_SUMMARY = [
    "dataset",
    "kind",
    "files",
    "records",
    "bad",
    "error rate",
    "allowed",
    "chars min",
    "p50",
    "p95",
    "max",
    "status",
]
_RATES = (_SUMMARY.index("error rate"), _SUMMARY.index("allowed"))  # percentages, aligned as numbers


def write_pages(report: dict[str, Any], out_dir: Path) -> None:
    """report.json and report.html in `out_dir`."""
    kit.write_reports(report, out_dir, render_html)


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page for a validate_data report.json."""
    datasets = report["datasets"]
    return kit.page(
        "validate_data",
        "Data validation",
        _banner(report),
        kit.heading("Datasets"),
        kit.table(_SUMMARY, [_summary_row(name, d) for name, d in datasets.items()], numeric=_RATES),
        kit.note(
            f"Allowed error rate: {_rate(report['max_error_rate'])} of records per dataset, counting the "
            "bad records whose code's action is fail."
        ),
        *(_dataset_section(name, d, report["checks"]) for name, d in datasets.items()),
        _policies(report),
    )


def _banner(report: dict[str, Any]) -> str:
    datasets = report["datasets"]
    if not report["passed"]:
        failed = [f"{name}: {failure_reason(d)}" for name, d in datasets.items() if not d["passed"]]
        return kit.banner("fail", "FAILED — " + "; ".join(failed))
    total = sum(d["records"] for d in datasets.values())
    codes = {p["code"] for d in datasets.values() for p in d["problems"]}
    if not codes:
        return kit.banner(
            "pass",
            f"PASSED — all {total:,} records in {len(datasets)} dataset(s) parsed cleanly; no problems found",
        )
    return kit.banner(
        "warn",
        f"PASSED — {total:,} records in {len(datasets)} dataset(s); {len(codes)} kind(s) of problem within "
        "their policies, listed below",
    )


def _summary_row(name: str, d: dict[str, Any]) -> list[Any]:
    stats = d["length_chars"] or {}
    status = kit.badge("passed", "ok") if d["passed"] else kit.badge(failure_reason(d), "error")
    return [
        name,
        d["kind"],
        d["files"],
        d["records"],
        d["bad_records"],
        _rate(d["error_rate"]),
        _rate(d["max_error_rate"]),
        *(stats.get(k) for k in ("min", "p50", "p95", "max")),
        status,
    ]


def _dataset_section(name: str, d: dict[str, Any], checks: dict[str, Any]) -> str:
    files = f"{d['files']:,} file" + ("" if d["files"] == 1 else "s")
    parts = [kit.heading(name), kit.note(Html(f"{kit.code(d['uri'])}: {files}, {d['records']:,} records"))]
    if d.get("length_histogram"):
        parts.append(
            kit.histogram(
                d["length_histogram"],
                title=f"{name}: record length",
                x_label="characters per record",
                unit="chars",
            )
        )
    if d["problems"]:
        problems = [_problem(p, d["records"], checks.get(p["code"])) for p in d["problems"]]
        parts += [kit.heading("Problems", 3), kit.problem_list(problems)]
    else:
        parts.append(kit.note("No problems found."))
    return "\n".join(parts)


def _problem(p: dict[str, Any], records: int, policy: dict[str, Any] | None) -> kit.Problem:
    """One problem: its code and meaning, how many records have it, the policy it was judged by, and
    its example locations with the reason at each."""
    code = p["code"]
    # A fatal code counts files or datasets, not records: no rate to give.
    found = f"{p['count']:,} found" if code in FATAL else f"{p['count']:,} of {records:,} records"
    rate = "" if code in FATAL else f" ({_rate(p['rate'])})"
    text = Html(
        f"{kit.code(code)} — {kit.html_text(f'{_meaning(code)}: {found}{rate}; {_judged_by(p, policy)}')}"
        + (" " + kit.badge("exceeded", "error") if p["exceeded"] and code not in FATAL else "")
    )
    locations = [Html(f"{kit.code(ex['location'])}: {kit.html_text(ex['reason'])}") for ex in p["examples"]]
    return kit.Problem(p["severity"], text, locations, more=p["count"] - len(p["examples"]))


def _judged_by(p: dict[str, Any], policy: dict[str, Any] | None) -> str:
    if p["code"] in FATAL:
        return "fatal: fails the dataset whatever the policies"
    if p["action"] != "fail":
        return f"action {p['action']}: reported, never fails"
    if p["code"] in RECORD_ERRORS and (policy is None or policy.get("max_rate") is None):
        return f"action fail: counts toward the error budget of {_rate(p['max_rate'])}"
    return f"action fail above {_rate(p['max_rate'])}"


def _policies(report: dict[str, Any]) -> str:
    rows = [
        (
            kit.code(code),
            CODES.get(code, ("", ""))[0],
            policy["action"],
            _policy_limit(code, policy),
            _meaning(code),
        )
        for code, policy in report["checks"].items()
    ]
    return (
        kit.heading("Policies")
        + kit.note(
            f"data.checks over the defaults. Fatal codes ({', '.join(sorted(FATAL))}) fail a dataset "
            "whatever the policies. " + _special_tokens(report.get("tokenizer_special_tokens", 0))
        )
        + kit.table(["code", "severity", "action", "max rate", "meaning"], rows, numeric=(3,))
    )


def _special_tokens(count: int) -> str:
    if not count:
        return "special_token_text looks for the fixed special-token strings only: no tokenizer was loaded."
    return f"special_token_text also looks for the tokenizer's {count:,} special tokens."


def _policy_limit(code: str, policy: dict[str, Any]) -> str:
    if policy["action"] != "fail":
        return kit.MISSING
    if policy.get("max_rate") is None:
        return "error budget" if code in RECORD_ERRORS else "data.max_error_rate"
    return _rate(policy["max_rate"])


def _meaning(code: str) -> str:
    return CODES.get(code, ("", ""))[1]


def _rate(value: Any) -> str:
    return kit.format_percent(value, 2)
