"""The evaluation report: one self-contained HTML page (no scripts, no external assets).

It shows the verdict first, then each gate check with its reason, then base against tuned for every
eval set. It is rendered from the `eval.json` dict alone, so a report can be rebuilt from any run.
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
"""


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

    thresholds = result.get("thresholds", {})
    parts.append('<h2>Run</h2><table class="meta">')
    rows = [
        ("base model", result.get("base_model_uri")),
        ("tuned model", result.get("tuned_model_uri")),
        ("dataset manifest", result.get("dataset_manifest") or "(passed inline)"),
        ("min domain loss improvement", _pct(thresholds.get("min_domain_loss_improvement"))),
        ("max general perplexity increase", _pct(thresholds.get("max_general_ppl_increase"))),
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
