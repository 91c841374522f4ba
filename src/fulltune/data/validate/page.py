"""report.html: the summary table, each dataset's length histogram and problems with examples."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from fulltune.data.validate.codes import CODES
from fulltune.data.validate.verdict import _verdict
from fulltune.reports import CSS, write_reports


def write_pages(report: dict[str, Any], out_dir: Path) -> None:
    """report.json and report.html in `out_dir`."""
    write_reports(report, out_dir, render_html)


def histogram_svg(bins: list[dict[str, int]], width: int = 480, height: int = 120) -> str:
    """Inline SVG bars, one per power-of-two length bin; each bar's title gives range and count."""
    esc = html.escape
    top = max(b["count"] for b in bins) or 1
    bar = width / len(bins)
    shapes = []
    for i, b in enumerate(bins):
        h = round((height - 20) * b["count"] / top, 1)
        x = round(i * bar, 1)
        shapes.append(
            f"<rect x='{x}' y='{height - 20 - h}' width='{max(1.0, round(bar - 2, 1))}' height='{h}' fill='#4a7bd0'>"
            f"<title>{b['lo']:,}–{b['hi']:,} chars: {b['count']:,} records</title></rect>"
        )
        if len(bins) <= 16 or i % 2 == 0:
            shapes.append(
                f"<text x='{x + bar / 2:.1f}' y='{height - 6}' font-size='9' text-anchor='middle'>{esc(_short(b['lo']))}</text>"
            )
    return (
        f"<svg class='histogram' role='img' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
        f"xmlns='http://www.w3.org/2000/svg'>{''.join(shapes)}</svg>"
    )


def _short(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("k", 1 << 10)):
        if n >= size:
            return f"{n // size}{unit}"
    return str(n)


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
        if d.get("length_histogram"):
            parts.append(
                f"<h2>{esc(name)}: record length (characters)</h2>{histogram_svg(d['length_histogram'])}"
            )
        if not d["problems"]:
            continue
        parts.append(
            f"<h2>{esc(name)}: problems</h2><table><tr><th>code</th><th>severity</th><th>action</th><th>count</th>"
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
                f"<td>{esc(p.get('action', ''))}{' (exceeded)' if p.get('exceeded') else ''}</td>"
                f"<td class='n'>{p['count']:,}</td><td>{esc(CODES.get(p['code'], ('', ''))[1])}</td>"
                f"<td><ul>{examples}</ul></td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)
