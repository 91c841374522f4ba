"""The evaluation report: one self-contained HTML page (no scripts, no external assets).

It shows the verdict first, then each gate check with its reason, then base against tuned for every
eval set and multiple-choice task: a table with the change and its bootstrap interval, an inline SVG
bar chart per metric (no plotting library), and the examples whose loss rose most. It is rendered
from the `eval.json` dict alone, so a report can be rebuilt from any run.
"""

from __future__ import annotations

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
.charts { display: flex; flex-wrap: wrap; gap: 1rem; }
.charts svg { border: 1px solid #e4e4e8; border-radius: .3rem; }
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
        parts.append(
            '<div class="charts">'
            + "".join(_bar_chart(f"{name} {m}", base.get(m), tuned.get(m)) for m in ("loss", "perplexity"))
            + "</div>"
        )
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
        parts.append(
            '<div class="charts">'
            + "".join(
                _bar_chart(f"{name} {m}", base.get(m), tuned.get(m), percent=True)
                for m in ("acc", "acc_norm")
            )
            + "</div>"
        )
        parts.append(_worst_table(entry.get("worst_regressions") or [], "question"))

    thresholds = result.get("thresholds", {})
    parts.append('<h2>Run</h2><table class="meta">')
    rows = [
        ("base model", result.get("base_model_uri")),
        ("tuned model", result.get("tuned_model_uri")),
        ("dataset manifest", result.get("dataset_manifest") or "(passed inline)"),
        ("min domain loss improvement", _pct(thresholds.get("min_domain_loss_improvement"))),
        ("max general perplexity increase", _pct(thresholds.get("max_general_ppl_increase"))),
        ("max multiple-choice accuracy drop", _points(thresholds.get("max_mc_accuracy_drop"))),
        ("bootstrap", _bootstrap(result.get("bootstrap"))),
        ("device", result.get("device")),
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


def _bar_chart(title: str, base: Any, tuned: Any, *, percent: bool = False) -> str:
    """Two horizontal bars, base and tuned, on a shared scale from zero, as inline SVG."""
    values = [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in (base, tuned)]
    top = max([v for v in values if v is not None and v > 0], default=1.0)
    if percent:
        top = max(top, 1.0)
    width, bar_x, bar_w, row_h = 320, 56, 180, 26
    rows = []
    for i, (label, value, colour) in enumerate(
        (("base", values[0], _BASE_COLOUR), ("tuned", values[1], _TUNED_COLOUR))
    ):
        y = 28 + i * row_h
        length = 0.0 if value is None else max(value, 0.0) / top * bar_w
        text = "—" if value is None else (f"{value:.1%}" if percent else f"{value:.4g}")
        rows.append(
            f'<text x="8" y="{y + 13}" font-size="12">{label}</text>'
            f'<rect x="{bar_x}" y="{y}" width="{length:.1f}" height="18" fill="{colour}"/>'
            f'<text x="{bar_x + length + 6:.1f}" y="{y + 13}" font-size="12">{text}</text>'
        )
    height = 28 + 2 * row_h + 6
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}: base vs tuned">'
        f'<text x="8" y="17" font-size="13" font-weight="600">{escape(title)}</text>'
        + "".join(rows)
        + "</svg>"
    )


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
