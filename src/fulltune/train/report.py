"""The train step's HTML report: summary table and the loss curve (inline SVG, no plotting library)."""

from __future__ import annotations

import html
from typing import Any


def loss_curve_svg(losses: list[float], width: int = 640, height: int = 240, pad: int = 36) -> str:
    if not losses:
        return "<p>no steps recorded</p>"
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    n = max(len(losses) - 1, 1)
    pts = " ".join(
        f"{pad + (width - 2 * pad) * i / n:.1f},{height - pad - (height - 2 * pad) * (v - lo) / span:.1f}"
        for i, v in enumerate(losses)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="training loss">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>'
        f'<text x="{pad}" y="{pad - 8}" font-size="11">{hi:.4f}</text>'
        f'<text x="{pad}" y="{height - pad + 14}" font-size="11">{lo:.4f}</text>'
        f'<text x="{width - pad}" y="{height - pad + 14}" font-size="11" text-anchor="end">step {len(losses)}</text>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{pts}"/></svg>'
    )


def training_report_html(metrics: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in summary.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>fulltune training</title>"
        "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:1em}</style></head><body>"
        f"<h1>Training</h1><table>{rows}</table><h2>Loss per optimizer step</h2>"
        f"{loss_curve_svg([m['loss'] for m in metrics])}</body></html>"
    )


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
