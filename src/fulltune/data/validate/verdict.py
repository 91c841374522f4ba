"""The verdict: each dataset judged against its policies, the whole assembled, and the message of
the DataValidationError when it fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fulltune.config import CheckPolicy, DataSection
from fulltune.data.validate.codes import CONSEQUENCES, FATAL, RECORD_ERRORS
from fulltune.data.validate.stats import length_histogram, length_stats
from fulltune.data.validate.tally import Tally

REPORT_FORMAT = "fulltune.validate_data/v1"
MESSAGE_LINES = 20  # problem lines in the DataValidationError message; the report has them all


class DataValidationError(ValueError):
    """Data that fails validation; the message starts with a one-line summary, then lists the top
    problems as `location: code: reason`."""


def dataset_report(uri: str, kind: str | None, files: int, tally: Tally, cfg: DataSection) -> dict[str, Any]:
    """One dataset's section of the report: its problems judged against their policies."""
    problems = sorted(
        tally.problems.values(),
        key=lambda p: (p.code not in FATAL, p.severity != "error", -p.count, p.code),
    )
    records = tally.records
    rate = tally.bad / records if records else 0.0
    budget_rate = tally.budget_bad / records if records else 0.0
    fatal = any(p.code in FATAL for p in problems)
    listed = []
    exceeded_any = False
    for p in problems:
        policy = tally.checks.get(p.code)
        action = "fail" if policy is None else policy.action
        limit = None if policy is None else policy.max_rate
        if action == "fail" and limit is None and p.code not in RECORD_ERRORS:
            limit = 0.0  # a finding that is not a bad record, set to fail without a rate: any occurrence
        p_rate = p.count / records if records else 0.0
        # record errors without their own max_rate are held to max_error_rate as a sum (below)
        exceeded = p.code in FATAL or (action == "fail" and limit is not None and p_rate > limit)
        exceeded_any = exceeded_any or (exceeded and p.code not in FATAL)
        listed.append(
            {
                "code": p.code,
                "severity": p.severity,
                "action": action,
                "count": p.count,
                "rate": p_rate,
                "max_rate": cfg.max_error_rate if limit is None and action == "fail" else limit,
                "exceeded": exceeded,
                "examples": p.examples,
            }
        )
    over_budget = budget_rate > cfg.max_error_rate
    return {
        "uri": uri,
        "kind": kind,
        "files": files,
        "records": records,
        "bad_records": tally.bad,
        "error_rate": rate,
        "max_error_rate": cfg.max_error_rate,
        "budget_bad_records": tally.budget_bad,
        "over_budget": over_budget,
        "passed": not fatal and not over_budget and not exceeded_any,
        "problems": listed,
        "length_chars": length_stats(tally.lengths),
        "length_histogram": length_histogram(tally.lengths),
    }


def full_report(
    datasets: dict[str, dict[str, Any]],
    cfg: DataSection,
    checks: dict[str, CheckPolicy],
    tokenizer_special_tokens: int,
) -> dict[str, Any]:
    """report.json: the datasets' sections, the policies, and the metrics."""
    return {
        "format": REPORT_FORMAT,
        "passed": all(d["passed"] for d in datasets.values()),
        "max_error_rate": cfg.max_error_rate,
        "checks": {code: policy.model_dump() for code, policy in sorted(checks.items())},
        "tokenizer_special_tokens": tokenizer_special_tokens,
        "datasets": datasets,
        "metrics": _metrics(datasets),
    }


def _metrics(datasets: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Numbers only, flat: what the KFP Metrics artifact shows."""
    out: dict[str, float] = {}
    for name, d in datasets.items():
        out[f"{name}_records"] = d["records"]
        out[f"{name}_bad_records"] = d["bad_records"]
        out[f"{name}_error_rate"] = d["error_rate"]
    return out


def failure_reason(d: dict[str, Any]) -> str:
    """Why a dataset failed, in one line (also the status of a failed dataset in report.html)."""
    fatal = [p["code"] for p in d["problems"] if p["code"] in FATAL]
    if fatal:
        return ", ".join(fatal)
    parts = []
    if d.get("over_budget", True):
        bad = d.get("budget_bad_records", d["bad_records"])
        rate = bad / d["records"] if d["records"] else 0.0
        parts.append(f"{bad} of {d['records']} records bad ({rate:.2%} > allowed {d['max_error_rate']:.2%})")
    for p in d["problems"]:
        if p.get("exceeded"):
            why = f": {CONSEQUENCES[p['code']]}" if p["code"] in CONSEQUENCES else ""
            parts.append(
                f"{p['code']} in {p['count']} of {d['records']} records "
                f"({p['rate']:.2%} > allowed {p['max_rate']:.2%}){why}"
            )
    return "; ".join(parts)


def failure_message(report: dict[str, Any], html_path: Path | str) -> str:
    """One summary line, then the top error locations as `location: code: reason`."""
    failed = {name: d for name, d in report["datasets"].items() if not d["passed"]}
    lines = [
        "validate_data failed: " + "; ".join(f"{name}: {failure_reason(d)}" for name, d in failed.items())
    ]
    shown = total = 0
    for d in failed.values():
        for problem in d["problems"]:
            if problem.get("action", "fail") != "fail":
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
