"""The evaluation page: one self-contained HTML page (no scripts, no external assets).

It shows the verdict first, then each gate check with its reason, then base against tuned for every
eval set, multiple-choice task, generation task and lm-eval task: a table with the change and its
bootstrap interval, a bar chart of base vs tuned per metric (inline SVG from the report kit), and the
examples that got worse (loss rose most; generation: answered right by the base model, wrong by the
tuned one). It is rendered from the `eval.json` dict alone, so a page can be rebuilt from any run.
"""

from __future__ import annotations

import math
from typing import Any

from fulltune import report_kit as kit
from fulltune.report_kit import Html

_COMPARISON = ["metric", "base", "tuned", "change"]
_CHECK_MARKS = {True: ("ok", "passed"), False: ("error", "failed"), None: ("info", "note")}


def render_report(result: dict[str, Any]) -> str:
    """HTML for an `eval.json` result (as returned by `evaluate_models`)."""
    passed = bool(result.get("verdict"))
    verdict = (
        "PASSED — the tuned model may be registered"
        if passed
        else "FAILED — the tuned model is not registered"
    )
    return kit.page(
        "fulltune evaluation",
        "fulltune evaluation: base vs tuned",
        kit.banner("pass" if passed else "fail", verdict),
        _gate(result),
        _eval_sets(result),
        _mc_tasks(result),
        _generation_tasks(result),
        _lm_eval_tasks(result),
        _run(result),
    )


def _gate(result: dict[str, Any]) -> str:
    checks = result.get("checks") or [{"passed": None, "reason": r} for r in result.get("reasons", [])]
    problems = []
    for check in checks:
        severity, label = _CHECK_MARKS.get(check.get("passed"), _CHECK_MARKS[None])
        problems.append(kit.Problem(severity, str(check["reason"]), label=label))
    return kit.heading("Gate") + kit.problem_list(problems)


def _eval_sets(result: dict[str, Any]) -> str:
    parts = [kit.heading("Eval sets")]
    for name, entry in result.get("sets", {}).items():
        base, tuned = entry.get("base", {}), entry.get("tuned", {})
        metrics = ("loss", "perplexity")
        parts += [
            kit.heading(name, 3),
            kit.note(f"{entry.get('sequences', '?')} sequences, {entry.get('loss_tokens', '?')} loss tokens"),
            kit.table(
                _COMPARISON,
                [
                    (m, _num(base.get(m)), _num(tuned.get(m)), _change(base.get(m), tuned.get(m)))
                    for m in metrics
                ],
                numeric=(1, 2, 3),
            ),
            _ci_line(result, _set_ci_keys(name)),
            _chart(name, [(m, base.get(m), tuned.get(m)) for m in metrics]),
            _worst_table(entry.get("worst_regressions") or [], "sequence"),
        ]
    return "\n".join(p for p in parts if p)


def _mc_tasks(result: dict[str, Any]) -> str:
    mc = result.get("mc") or {}
    if not mc:
        return ""
    parts = [
        kit.heading("Multiple-choice tasks"),
        kit.note(
            "Scored by log-likelihood of each choice given the question; acc_norm divides by "
            "the choice's length in characters. Changes in percentage points."
        ),
    ]
    for name, entry in mc.items():
        base, tuned = entry.get("base", {}), entry.get("tuned", {})
        metrics = ("acc", "acc_norm")
        rows = [
            (m, _pct(base.get(m)), _pct(tuned.get(m)), _points(entry.get(f"{m}_change_points")))
            for m in metrics
        ]
        parts += [
            kit.heading(name, 3),
            kit.note(f"{entry.get('questions', '?')} questions"),
            kit.table(_COMPARISON, rows, numeric=(1, 2, 3)),
            _ci_line(result, [f"mc_{name}_acc_change", f"mc_{name}_acc_norm_change"]),
            _chart(name, [(m, base.get(m), tuned.get(m)) for m in metrics], percent=True),
            _worst_table(entry.get("worst_regressions") or [], "question"),
        ]
    return "\n".join(p for p in parts if p)


def _generation_tasks(result: dict[str, Any]) -> str:
    generation = result.get("generation") or {}
    if not generation:
        return ""
    parts = [
        kit.heading("Generation tasks (exact match)"),
        kit.note(
            "Greedy decoding, cut at the first stop string; the continuation and the "
            "accepted answers are compared after stripping and collapsing whitespace. Changes in "
            "percentage points."
        ),
    ]
    for name, entry in generation.items():
        b, t = (entry.get("base") or {}).get("em"), (entry.get("tuned") or {}).get("em")
        stop = ", ".join(repr(x) for x in entry.get("stop") or []) or "EOS only"
        parts += [
            kit.heading(name, 3),
            kit.note(
                f"{entry.get('examples', '?')} prompts, at most {entry.get('max_new_tokens', '?')} "
                f"new tokens, stop at {stop}"
            ),
            kit.table(
                _COMPARISON,
                [("exact match", _pct(b), _pct(t), _points(entry.get("em_change_points")))],
                numeric=(1, 2, 3),
            ),
            _ci_line(result, [f"gen_{name}_em_change"]),
            _chart(name, [("exact match", b, t)], percent=True),
            _generation_table(entry.get("worst_regressions") or []),
        ]
    return "\n".join(p for p in parts if p)


def _lm_eval_tasks(result: dict[str, Any]) -> str:
    lm_eval = result.get("lm_eval") or {}
    if not lm_eval:
        return ""
    parts = [kit.heading("lm-evaluation-harness tasks (reported, not gated)")]
    for task, rows in lm_eval.items():
        parts += [
            kit.heading(task, 3),
            kit.table(
                _COMPARISON,
                [
                    (metric, _num(row.get("base")), _num(row.get("tuned")), _num(row.get("change")))
                    for metric, row in rows.items()
                ],
                numeric=(1, 2, 3),
            ),
            _chart(task, [(m, r.get("base"), r.get("tuned")) for m, r in rows.items()]),
        ]
    return "\n".join(parts)


def _run(result: dict[str, Any]) -> str:
    thresholds = result.get("thresholds", {})
    rows = [
        ("base model", result.get("base_model_uri")),
        ("tuned model", result.get("tuned_model_uri")),
        ("dataset manifest", result.get("dataset_manifest") or "(passed inline)"),
        ("min domain loss improvement", _pct(thresholds.get("min_domain_loss_improvement"))),
        ("max general perplexity increase", _pct(thresholds.get("max_general_ppl_increase"))),
        ("max multiple-choice accuracy drop", _points(thresholds.get("max_mc_accuracy_drop"))),
        ("max exact-match drop", _points(thresholds.get("max_exact_match_drop"))),
        ("bootstrap", _bootstrap(result.get("bootstrap"))),
        ("device", result.get("device")),
        ("scoring", _scoring(result.get("scoring"))),
        ("created", result.get("created_at")),
        ("fulltune", result.get("fulltune_version")),
    ]
    return kit.heading("Run") + kit.key_value_table(((k, str(v)) for k, v in rows), as_code=True)


def _num(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _pct(value: Any) -> str:
    return kit.format_percent(value)


def _change(base: Any, tuned: Any) -> str:
    if not isinstance(base, (int, float)) or not isinstance(tuned, (int, float)) or not base:
        return "—"
    return kit.format_percent(tuned / base - 1.0, signed=True)


def _points(value: Any) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    return f"{value:+.1f} pts" if value else "0.0 pts"


def _bootstrap(boot: Any) -> str:
    if not isinstance(boot, dict) or not boot.get("resamples"):
        return "off"
    return f"{boot['resamples']} paired resamples, seed {boot.get('seed')}, {boot.get('level', 0.95):.0%} percentile CI"


def _set_ci_keys(name: str) -> list[str]:
    if name == "domain_eval":
        return ["domain_loss_change", "domain_loss_improvement"]
    if name == "general_eval":
        return ["general_perplexity_change", "forgetting"]
    return []


def _ci_line(result: dict[str, Any], keys: list[str]) -> str:
    """'domain_loss_improvement: 0.2140 (95% CI 0.19 to 0.23)' for the intervals in the result."""
    intervals = result.get("confidence_intervals") or {}
    level = (result.get("bootstrap") or {}).get("level", 0.95)
    items = [
        f"{kit.code(key)} {_num(ci.get('estimate'))} "
        f"({level:.0%} CI {_num(ci.get('low'))} to {_num(ci.get('high'))})"
        for key in keys
        if (ci := intervals.get(key))
    ]
    return kit.note(Html("; ".join(items))) if items else ""


def _scoring(scoring: Any) -> str:
    if not isinstance(scoring, dict):
        return "—"
    how = "both models at once" if scoring.get("models_together") else "one model at a time"
    return f"device_map {scoring.get('device_map', 'single')}, {how} ({scoring.get('why', '')})"


def _chart(title: str, metrics: list[tuple[str, Any, Any]], *, percent: bool = False) -> str:
    """Base vs tuned, one panel per metric; `metrics` rows are (label, base, tuned)."""
    return kit.bar_chart(
        [(label, (base, tuned)) for label, base, tuned in metrics],
        title=f"{title}: base vs tuned",
        percent=percent,
    )


def _generation_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return kit.note("No prompt answered right by the base model was answered wrong by the tuned one.")
    return kit.note(
        f"{len(rows)} prompts answered right by the base model and wrong by the tuned one:"
    ) + kit.table(
        ["prompt #", "prompt", "accepted", "base said", "tuned said"],
        [
            (
                row.get("index"),
                str(row.get("prompt", "")),
                " | ".join(str(a) for a in row.get("answers") or []),
                str(row.get("base_output", "")),
                str(row.get("tuned_output", "")),
            )
            for row in rows
        ],
    )


def _worst_table(rows: list[dict[str, Any]], kind: str) -> str:
    if not rows:
        return kit.note(f"No {kind} got worse.")
    questions = kind == "question"
    header = [kind, *(["question"] if questions else []), "base loss", "tuned loss", "rise"]
    lead = f"The {len(rows)} {kind}s whose loss rose most" + (
        " (loss = minus the log-likelihood of the right choice)" if questions else ""
    )
    body = [
        (
            row.get("index"),
            *([str(row.get("question", ""))] if questions else []),
            _num(row.get("base_loss")),
            _num(row.get("tuned_loss")),
            _num(row.get("change")),
        )
        for row in rows
    ]
    return kit.note(lead + ":") + kit.table(header, body, numeric=range(len(header) - 3, len(header)))
