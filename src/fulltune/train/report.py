"""The train step's HTML report: summary table, the loss curves (inline SVG, no plotting library)
and, when the run evaluated, a table of the eval losses."""

from __future__ import annotations

import html
from typing import Any

TRAIN_COLOR, EVAL_COLOR = "#1f77b4", "#d62728"


def loss_curve_svg(
    losses: list[float],
    width: int = 640,
    height: int = 240,
    pad: int = 36,
    eval_points: list[tuple[int, float]] | None = None,
) -> str:
    """Training loss per optimizer step (a line) and, when given, eval loss at (step index, loss)
    (a second line with markers), on one shared scale."""
    eval_points = eval_points or []
    if not losses:
        return "<p>no steps recorded</p>"
    values = list(losses) + [v for _, v in eval_points]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    n = max(len(losses) - 1, 1)

    def xy(i: float, v: float) -> str:
        return (
            f"{pad + (width - 2 * pad) * i / n:.1f},{height - pad - (height - 2 * pad) * (v - lo) / span:.1f}"
        )

    train_pts = " ".join(xy(i, v) for i, v in enumerate(losses))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="training loss">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
        f'<text x="{pad}" y="{pad - 8}" font-size="11">{hi:.4f}</text>',
        f'<text x="{pad}" y="{height - pad + 14}" font-size="11">{lo:.4f}</text>',
        f'<text x="{width - pad}" y="{height - pad + 14}" font-size="11" text-anchor="end">step {len(losses)}</text>',
        f'<polyline fill="none" stroke="{TRAIN_COLOR}" stroke-width="2" points="{train_pts}"/>',
    ]
    if eval_points:
        pts = [xy(i, v) for i, v in eval_points]
        parts.append(
            f'<polyline class="eval" fill="none" stroke="{EVAL_COLOR}" stroke-width="2" points="{" ".join(pts)}"/>'
        )
        parts += [
            f'<circle class="eval" cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="3" fill="{EVAL_COLOR}"/>'
            for p in pts
        ]
        parts.append(
            f'<text x="{width - pad}" y="{pad - 8}" font-size="11" text-anchor="end">'
            f'<tspan fill="{TRAIN_COLOR}">train</tspan> <tspan fill="{EVAL_COLOR}">eval</tspan></text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def training_report_html(metrics: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in summary.items()
    )
    evals = [(i, m["eval_loss"]) for i, m in enumerate(metrics) if m.get("eval_loss") is not None]
    eval_table = ""
    if evals:
        eval_rows = "".join(f"<tr><td>{metrics[i]['step'] + 1}</td><td>{v:.4f}</td></tr>" for i, v in evals)
        eval_table = (
            "<h2>Eval loss (domain eval set)</h2>"
            f"<table class='eval'><tr><th>step</th><th>eval loss</th></tr>{eval_rows}</table>"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>fulltune training</title>"
        "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:1em}"
        "td{padding-right:1em}</style></head><body>"
        f"<h1>Training</h1><table>{rows}</table><h2>Loss per optimizer step</h2>"
        f"{loss_curve_svg([m['loss'] for m in metrics], eval_points=evals)}{eval_table}</body></html>"
    )


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
