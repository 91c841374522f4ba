"""The evaluation report: one self-contained HTML page (no scripts, no external assets).

It shows the verdict first, then each gate check with its reason, then base against tuned for every
eval set, multiple-choice task, generation task and lm-eval task: a table with the change and its
bootstrap interval, a bar chart of base vs tuned per metric (a matplotlib PNG, Agg backend, embedded
as base64 so the page stays one file), and the examples that got worse (loss rose most; generation:
answered right by the base model, wrong by the tuned one). It is rendered from the `eval.json` dict
alone, so a report can be rebuilt from any run. matplotlib is imported only when a report is
rendered; without it the page says so instead of showing charts.
"""

from __future__ import annotations

import base64
import io
import math
from html import escape
from typing import Any

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #1d1d1f; max-width: 60rem; }
h1 { font-size: 1.4rem; }
.verdict { padding: .8rem 1rem; border-radius: .4rem; font-weight: 600; }
.pass { background: #e3f4e6; color: #11602a; }
.fail { background: #fbe4e4; color: #8a1c1c; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; }
th, td { border: 1px solid #d0d0d5; padding: .35rem .7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f6; }
ul.checks { list-style: none; padding-left: 0; }
ul.checks li { margin: .3rem 0; }
.meta { color: #555; font-size: .9rem; }
code { font-size: .9em; }
img.chart { border: 1px solid #e4e4e8; border-radius: .3rem; max-width: 100%; }
td.text { text-align: left; max-width: 32rem; }
"""
_BASE_COLOUR, _TUNED_COLOUR = "#8e9aaf", "#3a6ea5"


def render_report(result: dict[str, Any]) -> str:
    """HTML for an `eval.json` result (as returned by `evaluate_models`)."""
    passed = bool(result.get("verdict"))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>fulltune evaluation</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>fulltune evaluation: base vs tuned</h1>",
        f'<p class="verdict {"pass" if passed else "fail"}">'
        f"{'PASSED — the tuned model may be registered' if passed else 'FAILED — the tuned model is not registered'}"
        "</p>",
        "<h2>Gate</h2>",
        '<ul class="checks">',
    ]
    checks = result.get("checks") or [{"passed": None, "reason": r} for r in result.get("reasons", [])]
    for check in checks:
        mark = {True: "✅", False: "❌"}.get(check.get("passed"), "•")
        parts.append(f"<li>{mark} {escape(str(check['reason']))}</li>")
    parts.append("</ul>")

    parts.append("<h2>Eval sets</h2>")
    for name, entry in result.get("sets", {}).items():
        base, tuned = entry.get("base", {}), entry.get("tuned", {})
        parts.append(
            f"<h3>{escape(name)}</h3>"
            f'<p class="meta">{entry.get("sequences", "?")} sequences, {entry.get("loss_tokens", "?")} loss tokens</p>'
            "<table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>"
        )
        for metric in ("loss", "perplexity"):
            b, t = base.get(metric), tuned.get(metric)
            parts.append(
                f"<tr><td>{metric}</td><td>{_num(b)}</td><td>{_num(t)}</td><td>{_change(b, t)}</td></tr>"
            )
        parts.append("</table>")
        parts.append(_ci_line(result, _set_ci_keys(name)))
        parts.append(_chart(name, [(m, base.get(m), tuned.get(m), False) for m in ("loss", "perplexity")]))
        parts.append(_worst_table(entry.get("worst_regressions") or [], "sequence"))

    mc = result.get("mc") or {}
    if mc:
        parts.append("<h2>Multiple-choice tasks</h2>")
        parts.append(
            '<p class="meta">Scored by log-likelihood of each choice given the question; acc_norm divides by '
            "the choice's length in characters. Changes in percentage points.</p>"
        )
    for name, entry in mc.items():
        base, tuned = entry.get("base", {}), entry.get("tuned", {})
        parts.append(
            f"<h3>{escape(name)}</h3>"
            f'<p class="meta">{entry.get("questions", "?")} questions</p>'
            "<table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>"
        )
        for metric in ("acc", "acc_norm"):
            b, t = base.get(metric), tuned.get(metric)
            change = entry.get(f"{metric}_change_points")
            parts.append(
                f"<tr><td>{metric}</td><td>{_pct(b)}</td><td>{_pct(t)}</td><td>{_points(change)}</td></tr>"
            )
        parts.append("</table>")
        parts.append(_ci_line(result, [f"mc_{name}_acc_change", f"mc_{name}_acc_norm_change"]))
        parts.append(_chart(name, [(m, base.get(m), tuned.get(m), True) for m in ("acc", "acc_norm")]))
        parts.append(_worst_table(entry.get("worst_regressions") or [], "question"))

    generation = result.get("generation") or {}
    if generation:
        parts.append("<h2>Generation tasks (exact match)</h2>")
        parts.append(
            '<p class="meta">Greedy decoding, cut at the first stop string; the continuation and the '
            "accepted answers are compared after stripping and collapsing whitespace. Changes in "
            "percentage points.</p>"
        )
    for name, entry in generation.items():
        b, t = (entry.get("base") or {}).get("em"), (entry.get("tuned") or {}).get("em")
        parts.append(
            f"<h3>{escape(name)}</h3>"
            f'<p class="meta">{entry.get("examples", "?")} prompts, at most {entry.get("max_new_tokens", "?")} '
            f"new tokens, stop at {escape(', '.join(repr(x) for x in entry.get('stop') or []) or 'EOS only')}</p>"
            "<table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>"
            f"<tr><td>exact match</td><td>{_pct(b)}</td><td>{_pct(t)}</td>"
            f"<td>{_points(entry.get('em_change_points'))}</td></tr></table>"
        )
        parts.append(_ci_line(result, [f"gen_{name}_em_change"]))
        parts.append(_chart(name, [("exact match", b, t, True)]))
        parts.append(_generation_table(entry.get("worst_regressions") or []))

    lm_eval = result.get("lm_eval") or {}
    if lm_eval:
        parts.append("<h2>lm-evaluation-harness tasks (reported, not gated)</h2>")
    for task, rows in lm_eval.items():
        parts.append(
            f"<h3>{escape(task)}</h3>"
            "<table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>"
        )
        for metric, row in rows.items():
            parts.append(
                f"<tr><td>{escape(metric)}</td><td>{_num(row.get('base'))}</td><td>{_num(row.get('tuned'))}</td>"
                f"<td>{_num(row.get('change'))}</td></tr>"
            )
        parts.append("</table>")
        parts.append(_chart(task, [(m, r.get("base"), r.get("tuned"), False) for m, r in rows.items()]))

    thresholds = result.get("thresholds", {})
    parts.append('<h2>Run</h2><table class="meta">')
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
    for label, value in rows:
        parts.append(f"<tr><td>{escape(label)}</td><td><code>{escape(str(value))}</code></td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts) + "\n"


def _num(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "—"


def _change(base: Any, tuned: Any) -> str:
    if not isinstance(base, (int, float)) or not isinstance(tuned, (int, float)) or not base:
        return "—"
    rel = tuned / base - 1.0
    return f"{rel:+.1%}" if math.isfinite(rel) else "—"


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
    items = []
    for key in keys:
        ci = intervals.get(key)
        if not ci:
            continue
        items.append(
            f"<code>{escape(key)}</code> {_num(ci.get('estimate'))} "
            f"({level:.0%} CI {_num(ci.get('low'))} to {_num(ci.get('high'))})"
        )
    return f'<p class="meta">{"; ".join(items)}</p>' if items else ""


def _scoring(scoring: Any) -> str:
    if not isinstance(scoring, dict):
        return "—"
    how = "both models at once" if scoring.get("models_together") else "one model at a time"
    return f"device_map {scoring.get('device_map', 'single')}, {how} ({scoring.get('why', '')})"


def _chart(title: str, metrics: list[tuple[str, Any, Any, bool]]) -> str:
    """An <img> with a base64 PNG: one panel per metric, a base and a tuned bar from zero."""
    png = bar_chart_png(title, metrics)
    if png is None:
        return '<p class="meta">(install matplotlib for the base vs tuned charts)</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="chart" alt="{escape(title)}: base vs tuned" src="data:image/png;base64,{data}">'


def bar_chart_png(title: str, metrics: list[tuple[str, Any, Any, bool]]) -> bytes | None:
    """PNG bytes of the chart (None without matplotlib); `metrics` rows: (label, base, tuned, percent)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import PercentFormatter
    except ImportError:
        return None
    fig = Figure(figsize=(max(2.6 * len(metrics), 3.2), 2.4), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.78, wspace=0.35)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (label, base, tuned, percent) in zip(axes, metrics, strict=True):
        values = [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in (base, tuned)]
        heights = [(v or 0.0) * (100.0 if percent else 1.0) for v in values]
        bars = ax.bar(["base", "tuned"], heights, color=[_BASE_COLOUR, _TUNED_COLOUR], width=0.6)
        texts = ["—" if v is None else (f"{v:.1%}" if percent else f"{v:.4g}") for v in values]
        ax.bar_label(bars, labels=texts, fontsize=8, padding=2)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, max([*heights, 100.0 if percent else 0.0, 1e-9]) * 1.18)
        ax.tick_params(labelsize=8)
        if percent:
            ax.yaxis.set_major_formatter(PercentFormatter(100.0, decimals=0))
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=10, fontweight="bold")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _generation_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="meta">No prompt answered right by the base model was answered wrong by the tuned one.</p>'
    parts = [
        f'<p class="meta">{len(rows)} prompts answered right by the base model and wrong by the tuned one:</p>',
        "<table><tr><th>prompt #</th><th>prompt</th><th>accepted</th><th>base said</th><th>tuned said</th></tr>",
    ]
    for row in rows:
        answers = " | ".join(str(a) for a in row.get("answers") or [])
        parts.append(
            f"<tr><td>{row.get('index')}</td>"
            + "".join(
                f'<td class="text">{escape(str(x))}</td>'
                for x in (
                    row.get("prompt", ""),
                    answers,
                    row.get("base_output", ""),
                    row.get("tuned_output", ""),
                )
            )
            + "</tr>"
        )
    parts.append("</table>")
    return "".join(parts)


def _worst_table(rows: list[dict[str, Any]], kind: str) -> str:
    if not rows:
        return f'<p class="meta">No {kind} got worse.</p>'
    header = f"<th>{kind}</th>" + ("<th>question</th>" if kind == "question" else "")
    parts = [
        f'<p class="meta">The {len(rows)} {kind}s whose loss rose most'
        + (" (loss = minus the log-likelihood of the right choice)" if kind == "question" else "")
        + ":</p>",
        f"<table><tr>{header}<th>base loss</th><th>tuned loss</th><th>rise</th></tr>",
    ]
    for row in rows:
        text = f'<td class="text">{escape(str(row.get("question", "")))}</td>' if kind == "question" else ""
        parts.append(
            f"<tr><td>{row.get('index')}</td>{text}<td>{_num(row.get('base_loss'))}</td>"
            f"<td>{_num(row.get('tuned_loss'))}</td><td>{_num(row.get('change'))}</td></tr>"
        )
    parts.append("</table>")
    return "".join(parts)
