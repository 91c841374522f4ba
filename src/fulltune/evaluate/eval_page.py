"""The evaluation page: one self-contained HTML page (no scripts, no external assets).

It shows the verdict first, then each gate check with its reason, then base against tuned for every
eval set, multiple-choice task, generation task and lm-eval task: a table with the change and its
bootstrap interval, a bar chart of base vs tuned per metric (inline SVG from the report kit), and the
examples that got worse (loss rose most; generation: answered right by the base model, wrong by the
tuned one). It is rendered from the `EvalResult` alone, so a page can be rebuilt from any run's
`eval.json` with `render_report(EvalResult.load(uri))`.
"""

from __future__ import annotations

import math

from fulltune import report_kit as kit
from fulltune.evaluate.result import (
    CHAMPION_FORGETTING,
    CHAMPION_IMPROVEMENT,
    GENERAL,
    BootstrapSettings,
    EvalResult,
    GateCheck,
    GenerationRegression,
    GenerationSection,
    LMEvalRow,
    LossSetSection,
    MCSection,
    QuestionRegression,
    Scoring,
    SequenceRegression,
    Thresholds,
)
from fulltune.report_kit import Html

_COMPARISON = ["metric", "base", "tuned", "change"]
_CHECK_MARKS = {True: ("ok", "passed"), False: ("error", "failed")}
# Without bootstrap settings (a file from before they were written) intervals read as 95% ones.
_DEFAULT_LEVEL = 0.95

# (label, base, tuned) of one metric: a row of a comparison table and a panel of its bar chart.
Figure = tuple[str, float, float]


def render_report(result: EvalResult) -> str:
    """HTML for an evaluation result (as `evaluate_models` returns it or `EvalResult.load` reads it)."""
    verdict = (
        "PASSED — the tuned model may be registered"
        if result.verdict
        else "FAILED — the tuned model is not registered"
    )
    return kit.page(
        "fulltune evaluation",
        "fulltune evaluation: base vs tuned",
        kit.banner("pass" if result.verdict else "fail", verdict),
        _gate(result.checks),
        _champion(result),
        _eval_sets(result),
        _mc_tasks(result),
        _generation_tasks(result),
        _lm_eval_tasks(result.lm_eval),
        _run(result),
    )


def _gate(checks: list[GateCheck]) -> str:
    problems = []
    for check in checks:
        severity, label = _CHECK_MARKS[check.passed]
        problems.append(kit.Problem(severity, check.reason, label=label))
    return kit.heading("Gate") + kit.problem_list(problems)


def _champion(result: EvalResult) -> str:
    """Base, champion (the version production named) and candidate side by side on the loss sets."""
    champion = result.champion
    if champion is None or champion.compare_to != "registered":
        return ""
    head = kit.heading("Against the champion")
    if champion.version is None:
        return head + kit.note(champion.note)
    rows = []
    for name, figures in champion.sets.items():
        own = result.sets[name]
        # the general set is judged on its perplexity, as the forgetting checks are
        what = "perplexity" if name == GENERAL else "loss"
        base, theirs, tuned = (getattr(x, what) for x in (own.base, figures, own.tuned))
        rows.append((f"{name} {what}", _num(base), _num(theirs), _num(tuned), _change(theirs, tuned)))
    columns = ["metric", "base", f"champion v{champion.version}", "candidate", "candidate vs champion"]
    where = kit.note(f"champion: {champion.model_uri} ({champion.note})")
    return (
        head
        + where
        + kit.table(columns, rows, numeric=(1, 2, 3, 4))
        + _ci_line(result, (CHAMPION_IMPROVEMENT, CHAMPION_FORGETTING))
    )


def _eval_sets(result: EvalResult) -> str:
    parts = [kit.heading("Eval sets")]
    for name, section in result.sets.items():
        figures = _loss_figures(section)
        parts += [
            kit.heading(name, 3),
            kit.note(f"{section.sequences} sequences, {section.loss_tokens} loss tokens"),
            _loss_table(figures),
            _ci_line(result, LossSetSection.interval_keys(name)),
            _chart(name, figures),
            _worst_sequences(section.worst_regressions),
        ]
    return "\n".join(p for p in parts if p)


def _loss_figures(section: LossSetSection) -> list[Figure]:
    return [
        ("loss", section.base.loss, section.tuned.loss),
        ("perplexity", section.base.perplexity, section.tuned.perplexity),
    ]


def _mc_tasks(result: EvalResult) -> str:
    if not result.mc:
        return ""
    parts = [
        kit.heading("Multiple-choice tasks"),
        kit.note(
            "Scored by log-likelihood of each choice given the question; acc_norm divides by "
            "the choice's length in characters. Changes in percentage points."
        ),
    ]
    for name, section in result.mc.items():
        figures = _mc_figures(section)
        parts += [
            kit.heading(name, 3),
            kit.note(f"{section.questions} questions"),
            _rate_table(figures, [section.acc_change_points, section.acc_norm_change_points]),
            _ci_line(result, (MCSection.change_key(name), MCSection.change_key(name, "acc_norm"))),
            _chart(name, figures, percent=True),
            _worst_questions(section.worst_regressions),
        ]
    return "\n".join(p for p in parts if p)


def _mc_figures(section: MCSection) -> list[Figure]:
    return [
        ("acc", section.base.acc, section.tuned.acc),
        ("acc_norm", section.base.acc_norm, section.tuned.acc_norm),
    ]


def _generation_tasks(result: EvalResult) -> str:
    if not result.generation:
        return ""
    parts = [
        kit.heading("Generation tasks (exact match)"),
        kit.note(
            "Greedy decoding, cut at the first stop string; the continuation and the "
            "accepted answers are compared after stripping and collapsing whitespace. Changes in "
            "percentage points."
        ),
    ]
    for name, section in result.generation.items():
        figures: list[Figure] = [("exact match", section.base.em, section.tuned.em)]
        parts += [
            kit.heading(name, 3),
            kit.note(_generation_settings(section)),
            _rate_table(figures, [section.em_change_points]),
            _ci_line(result, (GenerationSection.change_key(name),)),
            _chart(name, figures, percent=True),
            _generation_table(section.worst_regressions, section.regressions),
        ]
    return "\n".join(p for p in parts if p)


def _generation_settings(section: GenerationSection) -> str:
    stop = ", ".join(repr(x) for x in section.stop) or "EOS only"
    return f"{section.examples} prompts, at most {section.max_new_tokens} new tokens, stop at {stop}"


def _lm_eval_tasks(lm_eval: dict[str, dict[str, LMEvalRow]]) -> str:
    if not lm_eval:
        return ""
    parts = [kit.heading("lm-evaluation-harness tasks (reported, not gated)")]
    for task, rows in lm_eval.items():
        parts += [
            kit.heading(task, 3),
            kit.table(
                _COMPARISON,
                [(metric, _num(row.base), _num(row.tuned), _num(row.change)) for metric, row in rows.items()],
                numeric=(1, 2, 3),
            ),
            _chart(task, [(metric, row.base, row.tuned) for metric, row in rows.items()]),
        ]
    return "\n".join(parts)


def _run(result: EvalResult) -> str:
    thresholds = result.thresholds
    rows = [
        ("base model", result.base_model_uri),
        ("tuned model", result.tuned_model_uri),
        ("dataset manifest", result.dataset_manifest or "(passed inline)"),
        ("min domain loss improvement", _pct(thresholds.min_domain_loss_improvement)),
        ("max general perplexity increase", _pct(thresholds.max_general_ppl_increase)),
        ("max multiple-choice accuracy drop", _points(thresholds.max_mc_accuracy_drop)),
        ("max exact-match drop", _points(thresholds.max_exact_match_drop)),
        *_champion_thresholds(thresholds),
        ("bootstrap", _bootstrap(result.bootstrap)),
        ("device", result.device),
        ("scoring", _scoring(result.scoring)),
        ("created", result.created_at),
        ("fulltune", result.fulltune_version),
    ]
    return kit.heading("Run") + kit.key_value_table(rows, as_code=True)


def _champion_thresholds(thresholds: Thresholds) -> list[tuple[str, str]]:
    """The tolerances against the champion, when the candidate was compared with one."""
    rows = [
        ("max domain loss rise over the champion", thresholds.max_domain_loss_regression),
        ("max general perplexity rise over the champion", thresholds.max_general_ppl_regression),
    ]
    return [(label, _pct(value)) for label, value in rows if value is not None]


def _loss_table(figures: list[Figure]) -> str:
    """Losses and perplexities, their change relative to the base model's."""
    rows = [(label, _num(base), _num(tuned), _change(base, tuned)) for label, base, tuned in figures]
    return kit.table(_COMPARISON, rows, numeric=(1, 2, 3))


def _rate_table(figures: list[Figure], changes: list[float]) -> str:
    """Rates as percentages, their change in percentage points (as the result holds it)."""
    rows = [
        (label, _pct(base), _pct(tuned), _points(change))
        for (label, base, tuned), change in zip(figures, changes, strict=True)
    ]
    return kit.table(_COMPARISON, rows, numeric=(1, 2, 3))


def _num(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _pct(value: float | None) -> str:
    return kit.format_percent(value)


def _change(base: float, tuned: float) -> str:
    if not base:
        return kit.MISSING
    return kit.format_percent(tuned / base - 1.0, signed=True)


def _points(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return kit.MISSING
    return f"{value:+.1f} pts" if value else "0.0 pts"


def _bootstrap(boot: BootstrapSettings | None) -> str:
    if boot is None or not boot.resamples:
        return "off"
    return f"{boot.resamples} paired resamples, seed {boot.seed}, {boot.level:.0%} percentile CI"


def _ci_line(result: EvalResult, keys: tuple[str, ...]) -> str:
    """'domain_loss_improvement: 0.2140 (95% CI 0.19 to 0.23)' for the intervals in the result;
    '(no interval)' where none was computed (bootstrap off, a single example)."""
    level = result.bootstrap.level if result.bootstrap else _DEFAULT_LEVEL
    items = [
        f"{kit.code(key)} {_num(ci.estimate)} "
        + (f"({level:.0%} CI {_num(ci.low)} to {_num(ci.high)})" if ci.bounds else "(no interval)")
        for key in keys
        if (ci := result.confidence_intervals.get(key))
    ]
    return kit.note(Html("; ".join(items))) if items else ""


def _scoring(scoring: Scoring | None) -> str:
    if scoring is None:
        return kit.MISSING
    how = "all models at once" if scoring.models_together else "one model at a time"
    passes = "; ".join(f"{'+'.join(p.roles)} {p.seconds:.1f} s" for p in scoring.passes)
    return f"device_map {scoring.device_map}, {how} ({scoring.why})" + (
        f"; passes: {passes}" if passes else ""
    )


def _chart(title: str, figures: list[Figure], *, percent: bool = False) -> str:
    """Base vs tuned, one panel per metric."""
    return kit.bar_chart(
        [(label, (base, tuned)) for label, base, tuned in figures],
        title=f"{title}: base vs tuned",
        percent=percent,
    )


def _generation_table(rows: list[GenerationRegression], total: int | None) -> str:
    """The prompts that regressed; `rows` are only the first of the `total` (None: not recorded)."""
    if not rows:
        return kit.note("No prompt answered right by the base model was answered wrong by the tuned one.")
    if total is None:
        lead = f"Prompts answered right by the base model and wrong by the tuned one (the first {len(rows)}):"
    elif total > len(rows):
        lead = (
            f"{total} prompts answered right by the base model and wrong by the tuned one; "
            f"the first {len(rows)}:"
        )
    else:
        lead = f"{total} prompts answered right by the base model and wrong by the tuned one:"
    return kit.note(lead) + kit.table(
        ["prompt #", "prompt", "accepted", "base said", "tuned said"],
        [(row.index, row.prompt, " | ".join(row.answers), row.base_output, row.tuned_output) for row in rows],
    )


def _worst_sequences(rows: list[SequenceRegression]) -> str:
    body = [(row.index, _num(row.base_loss), _num(row.tuned_loss), _num(row.change)) for row in rows]
    return _loss_rise_table("sequence", [], body)


def _worst_questions(rows: list[QuestionRegression]) -> str:
    body = [
        (row.index, row.question, _num(row.base_loss), _num(row.tuned_loss), _num(row.change)) for row in rows
    ]
    return _loss_rise_table(
        "question", ["question"], body, why=" (loss = minus the log-likelihood of the right choice)"
    )


def _loss_rise_table(
    kind: str, text_columns: list[str], body: list[tuple[object, ...]], why: str = ""
) -> str:
    """The examples whose loss rose most: index, `text_columns`, base loss, tuned loss, rise."""
    if not body:
        return kit.note(f"No {kind} got worse.")
    header = [kind, *text_columns, "base loss", "tuned loss", "rise"]
    lead = f"The {len(body)} {kind}s whose loss rose most{why}:"
    return kit.note(lead) + kit.table(header, body, numeric=range(len(header) - 3, len(header)))
