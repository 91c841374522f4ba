"""What every step's report page is built from: one stylesheet, the page frame, tables, a verdict banner,
a problem list, key/value tables, charts, and writing report.json + report.html together.

Pages are read in the Kubeflow UI, often saved and mailed, so each is one self-contained file: no
scripts, no external assets, charts as inline SVG (pure Python, no plotting library). Text is
escaped wherever it lands; a caller that means markup wraps it in `Html`.

Charts carry their axes: "nice" tick values (1, 2 or 5 times a power of ten) that enclose the data,
tick labels, axis titles and a legend in its own row above the plot, so it never covers a line. Each
chart is `role="img"` with an `aria-label` that states its data in words.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from html import escape
from pathlib import Path
from typing import Any

from fulltune import storage

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}h3{font-size:1.02em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.5em 0 1em}th{background:#f4f4f4}td{max-width:36em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th.n,td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#17692d;font-weight:600}.info{color:#555;font-weight:600}.error{color:#b00020;font-weight:600}
.warning{color:#9a6700;font-weight:600}code,pre{font-size:.92em;word-break:break-all;white-space:pre-wrap}
ul{margin:0;padding-left:1.2em}.meta{color:#555;font-size:.92em}
.banner{padding:.7em 1em;border-radius:.4em;font-weight:600;border:1px solid}
.banner.pass{background:#e3f4e6;color:#11602a;border-color:#b7dfc0}
.banner.fail{background:#fbe4e4;color:#8a1c1c;border-color:#efbcbc}
.banner.warn{background:#fdf3d8;color:#7a5200;border-color:#ecd9a0}
ul.problems{list-style:none;padding-left:0}ul.problems>li{margin:.35em 0}
ul.problems .badge{display:inline-block;min-width:4.5em}ul.locations{margin:.15em 0 0 4.5em;color:#444}
svg.chart{display:block;max-width:100%;height:auto;margin:.5em 0 1em}
"""

_FONT = "system-ui, sans-serif"
_FONT_SIZE = 11
_CHAR_WIDTH = 0.6 * _FONT_SIZE  # average glyph width: enough to keep tick labels clear of the axis
_INK, _GRID, _AXIS = "#333", "#e6e6e6", "#888"
_DASH = ' stroke-dasharray="6 4"'
#: Series colours in order: the first two are base and tuned on the evaluation page.
PALETTE = ("#8e9aaf", "#3a6ea5", "#d62728", "#2ca02c", "#9467bd", "#8c564b")
HIST_COLOUR = "#4a7bd0"
MISSING = "—"


class Html(str):
    """Markup the caller vouches for: written into the page as is, where any other text is escaped."""


def html_text(value: Any) -> str:
    """`value` as page text: Html as is, None as a dash, anything else escaped."""
    if isinstance(value, Html):
        return value
    return MISSING if value is None else escape(str(value))


def write_reports(
    report: dict[str, Any], out_dir: Path, render_html: Callable[[dict[str, Any]], str]
) -> None:
    """out_dir/report.json (the machine-readable report) and out_dir/report.html (what people read)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    storage.write_json(str(out_dir / "report.json"), report)
    storage.write_text(str(out_dir / "report.html"), render_html(report))


# -- the page and its blocks ------------------------------------------------------------------------


def page(title: str, heading: str | Html, *blocks: str) -> str:
    """A whole HTML document: the stylesheet, the heading, then the blocks in order."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n"
        f"<h1>{html_text(heading)}</h1>\n" + "\n".join(b for b in blocks if b) + "\n</body></html>\n"
    )


def heading(text: str | Html, level: int = 2) -> str:
    return f"<h{level}>{html_text(text)}</h{level}>"


def note(text: str | Html) -> str:
    """A paragraph of secondary text (counts, methods, what a table means)."""
    return f'<p class="meta">{html_text(text)}</p>'


def bullet_list(items: Iterable[str | Html]) -> str:
    """A plain list of sentences (a run's summary); each item is escaped unless it is `Html`."""
    return "<ul>" + "".join(f"<li>{html_text(item)}</li>" for item in items) + "</ul>"


def code(text: Any) -> Html:
    return Html(f"<code>{html_text(text)}</code>")


def badge(text: str, severity: str) -> Html:
    """`text` in the colour of a severity: ok, info, warning or error."""
    return Html(f'<span class="{escape(severity)}">{escape(text)}</span>')


def banner(status: str, text: str | Html) -> str:
    """The verdict at the top of a page; `status` is pass, fail or warn."""
    if status not in ("pass", "fail", "warn"):
        raise ValueError(f"banner status must be pass, fail or warn, not {status!r}")
    return f'<p class="banner {status}" role="status">{html_text(text)}</p>'


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, numeric: Collection[int] = ()) -> str:
    """A table with a header row. Cells are escaped unless they are `Html`; ints and floats, and the
    columns listed in `numeric` (indexes of pre-formatted numbers), are right-aligned."""
    rows = [list(row) for row in rows]
    right = set(numeric) | {i for row in rows for i, value in enumerate(row) if _is_number(value)}

    def align(i: int) -> str:
        return ' class="n"' if i in right else ""

    head = "".join(f"<th{align(i)}>{escape(h)}</th>" for i, h in enumerate(header))
    body = [
        "<tr>" + "".join(f"<td{align(i)}>{_cell(v)}</td>" for i, v in enumerate(row)) + "</tr>"
        for row in rows
    ]
    return f"<table><tr>{head}</tr>" + "".join(body) + "</table>"


def key_value_table(rows: Iterable[tuple[str, Any]], *, as_code: bool = False) -> str:
    """One row per (key, value): a run's settings or summary. Numbers are right-aligned; `as_code`
    sets the other values in monospace (URIs, versions)."""
    out = []
    for key, value in rows:
        if _is_number(value):
            out.append(f'<tr><th>{escape(key)}</th><td class="n">{_cell(value)}</td></tr>')
        else:
            shown = code(value) if as_code and not isinstance(value, Html) else value
            out.append(f"<tr><th>{escape(key)}</th><td>{html_text(shown)}</td></tr>")
    return '<table class="kv">' + "".join(out) + "</table>"


@dataclass(frozen=True)
class Problem:
    """One line of a problem list: a severity (ok, info, warning, error: its colour), what is wrong,
    where (file:line locations, set as code; an `Html` location is set as it is, for a location that
    carries its own markup such as the reason found there), how many more places were not listed,
    and the word shown for the severity when it should read differently (a gate check 'passed')."""

    severity: str
    text: str | Html
    locations: Sequence[str] = ()
    more: int = 0
    label: str | None = None


def problem_list(problems: Iterable[Problem]) -> str:
    items = []
    for p in problems:
        where = "".join(f"<li>{loc if isinstance(loc, Html) else code(loc)}</li>" for loc in p.locations)
        if p.more > 0:
            where += f"<li>… and {p.more:,} more</li>"
        items.append(
            f'<li><span class="badge {escape(p.severity)}">{escape(p.label or p.severity)}</span> '
            f"{html_text(p.text)}" + (f'<ul class="locations">{where}</ul>' if where else "") + "</li>"
        )
    return '<ul class="problems">' + "".join(items) + "</ul>"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table, one line per row (no trailing newline). A `|` in a cell is
    escaped and a line break becomes `<br>`: either would otherwise end the cell or the row."""
    lines = [_markdown_row(header), "|" + "---|" * len(header)]
    lines += [_markdown_row(row) for row in rows]
    return "\n".join(lines)


def _markdown_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_markdown_cell(c) for c in cells) + " |"


def _markdown_cell(value: Any) -> str:
    return "<br>".join(str(value).replace("|", "\\|").splitlines())


def format_number(value: Any) -> str:
    """A float to four significant digits (whole from 10,000 up, where that would need an exponent), an
    int with thousands separators, anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isfinite(value) and abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def format_bytes(n: float) -> str:
    """A size in GiB from 1 GiB up, else in MiB, one decimal, thousands separated: '2,496.9 GiB'."""
    gib = 1 << 30
    return f"{n / gib:,.1f} GiB" if abs(n) >= gib else f"{n / (1 << 20):,.1f} MiB"


def format_percent(value: Any, digits: int = 1, *, signed: bool = False) -> str:
    """A fraction as a percentage (0.253 -> '25.3%', signed: '+25.3%'); a dash for anything that is
    not a finite number."""
    if not _is_number(value) or not math.isfinite(value):
        return MISSING
    return f"{value:{'+' if signed else ''}.{digits}%}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    return format_number(value) if _is_number(value) else html_text(value)


# -- ticks -------------------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, target: int = 5, *, integer: bool = False) -> list[float]:
    """Evenly spaced round values (step 1, 2 or 5 times a power of ten), about `target` intervals,
    the first at or below `lo` and the last at or above `hi`. `integer` keeps the step at least 1."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(target, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    if integer:
        step = max(step, 1.0)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    decimals = _decimals(step)
    return [round(i * step, decimals + 2) for i in range(first, last + 1)]


def _decimals(step: float) -> int:
    """Decimal places that tell ticks `step` apart."""
    return max(0, -math.floor(math.log10(step) + 1e-9))


def tick_label(value: float, step: float, *, percent: bool = False) -> str:
    if percent:
        return f"{value * 100:.{_decimals(step * 100)}f}%"
    return f"{value:,.{_decimals(step)}f}"


def _text_width(text: str) -> float:
    return len(text) * _CHAR_WIDTH


def _f(x: float) -> str:
    return f"{x:.1f}"


def _text(x: float, y: float, text: str, *, cls: str, anchor: str = "middle", extra: str = "") -> str:
    """A label; `cls` names its role (tick, value, legend, ...), which is how tests and readers of the
    SVG tell a y tick label from a bar's value."""
    return f'<text class="{cls}" x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}"{extra}>{escape(text)}</text>'


def _line(
    x1: float, y1: float, x2: float, y2: float, stroke: str, *, width: float = 1, dashed: bool = False
) -> str:
    ends = f'x1="{_f(x1)}" y1="{_f(y1)}" x2="{_f(x2)}" y2="{_f(y2)}"'
    return f'<line {ends} stroke="{stroke}" stroke-width="{width}"{_DASH if dashed else ""}/>'


def _chart_title(width: float, title: str) -> str:
    return _text(width / 2, 18, title, cls="chart-title", extra=' font-weight="600" font-size="13"')


def _svg(width: float, height: float, title: str, description: str, body: list[str]) -> str:
    return (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{escape(description)}" '
        f'font-family="{_FONT}" font-size="{_FONT_SIZE}" fill="{_INK}">'
        f"<title>{escape(title)}</title>"
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>' + "".join(body) + "</svg>"
    )


@dataclass(frozen=True)
class _Frame:
    """The plot area inside a chart and the value ranges its edges stand for."""

    left: float
    top: float
    width: float
    height: float
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def x(self, value: float) -> float:
        lo, hi = self.x_range
        return self.left + self.width * (value - lo) / ((hi - lo) or 1.0)

    def y(self, value: float) -> float:
        lo, hi = self.y_range
        return self.top + self.height * (1 - (value - lo) / ((hi - lo) or 1.0))

    @property
    def bottom(self) -> float:
        return self.top + self.height


def _y_axis(frame: _Frame, ticks: list[float], *, percent: bool = False) -> list[str]:
    """Grid lines, the axis line and the tick labels at each of `ticks`."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    parts = []
    for t in ticks:
        y = frame.y(t)
        parts.append(_line(frame.left, y, frame.left + frame.width, y, _GRID))
        parts.append(
            _text(frame.left - 6, y + 4, tick_label(t, step, percent=percent), cls="tick y", anchor="end")
        )
    parts.append(_line(frame.left, frame.top, frame.left, frame.bottom, _AXIS))
    return parts


def _x_axis_line(frame: _Frame) -> str:
    return _line(frame.left, frame.bottom, frame.left + frame.width, frame.bottom, _AXIS)


def _axis_titles(frame: _Frame, x_label: str, y_label: str) -> list[str]:
    y_mid = frame.top + frame.height / 2
    return [
        _text(frame.left + frame.width / 2, frame.bottom + 34, x_label, cls="axis-title x"),
        _text(14, y_mid, y_label, cls="axis-title y", extra=f' transform="rotate(-90 14 {_f(y_mid)})"'),
    ]


def _y_labels_width(ticks: list[float], percent: bool = False) -> float:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    return max(_text_width(tick_label(t, step, percent=percent)) for t in ticks)


# -- line chart --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One line: (x, y) points in x order; `markers` draws a dot at each point (a line through a few
    sparse points, such as periodic evaluations, is hard to read without them); `dashed` draws a
    reference line (a limit, a budget) apart from the measured ones; `colour` overrides the palette's
    turn (a faint raw line under its smoothed one)."""

    name: str
    points: Sequence[tuple[float, float]]
    markers: bool = False
    dashed: bool = False
    colour: str | None = None


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 680,
    height: int = 300,
    integer_x: bool = False,
    percent: bool = False,
) -> str:
    """Lines on shared axes, x and y ticks around the data, a legend row above the plot. `percent`
    reads the y values as fractions and labels them as percentages."""
    # A diverged run logs nan or inf losses: they have no place on an axis, the rest of the line does.
    finite = [replace(s, points=[(x, y) for x, y in s.points if math.isfinite(y)]) for s in series]
    drawn = [s for s in finite if s.points]
    if not drawn:
        return note(f"{title}: no data")
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    x_ticks = nice_ticks(min(xs), max(xs), 6, integer=integer_x)
    y_ticks = nice_ticks(min(ys), max(ys), 5)
    left = 28 + _y_labels_width(y_ticks, percent)
    frame = _Frame(
        left, 52, width - left - 16, height - 52 - 44, (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])
    )
    body = [_chart_title(width, title)]
    body += _legend(drawn, frame.left, 38)
    body += _y_axis(frame, y_ticks, percent=percent)
    body += _x_ticks(frame, x_ticks)
    body += _axis_titles(frame, x_label, y_label)
    for colour, s in zip(_colours(drawn), drawn, strict=True):
        body.append(_series_marks(frame, s, colour))
    return _svg(width, height, title, _describe_lines(title, x_label, drawn, percent), body)


def _colours(series: Sequence[Series]) -> list[str]:
    # Grey first is for the base model in bar charts; lines start at the strong blue.
    return [s.colour or PALETTE[(i + 1) % len(PALETTE)] for i, s in enumerate(series)]


def _x_ticks(frame: _Frame, ticks: list[float]) -> list[str]:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    parts = [_x_axis_line(frame)]
    for t in ticks:
        x = frame.x(t)
        parts.append(_line(x, frame.bottom, x, frame.bottom + 4, _AXIS))
        parts.append(_text(x, frame.bottom + 16, tick_label(t, step), cls="tick x"))
    return parts


def _legend(series: Sequence[Series], left: float, y: float) -> list[str]:
    parts, x = [], left
    for colour, s in zip(_colours(series), series, strict=True):
        parts.append(_line(x, y - 4, x + 18, y - 4, colour, width=2, dashed=s.dashed))
        if s.markers:
            parts.append(f'<circle cx="{_f(x + 9)}" cy="{_f(y - 4)}" r="3" fill="{colour}"/>')
        parts.append(_text(x + 24, y, s.name, cls="legend", anchor="start"))
        x += 24 + _text_width(s.name) + 18
    return parts


def _series_marks(frame: _Frame, s: Series, colour: str) -> str:
    points = [(frame.x(x), frame.y(y)) for x, y in s.points]
    parts = [f'<g class="series" data-name="{escape(s.name)}">']
    if len(points) > 1:
        coords = " ".join(f"{_f(x)},{_f(y)}" for x, y in points)
        dash = _DASH if s.dashed else ""
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{coords}"/>')
    if s.markers or len(points) == 1:
        parts += [f'<circle cx="{_f(x)}" cy="{_f(y)}" r="3" fill="{colour}"/>' for x, y in points]
    parts.append("</g>")
    return "".join(parts)


def _describe_lines(title: str, x_label: str, series: Sequence[Series], percent: bool = False) -> str:
    shown = format_percent if percent else format_number
    parts = []
    for s in series:
        (x0, y0), (x1, y1) = s.points[0], s.points[-1]
        ys = [y for _, y in s.points]
        parts.append(
            f"{s.name}: {len(s.points)} points, {x_label} {format_number(x0)} to {format_number(x1)}, "
            f"from {shown(y0)} to {shown(y1)} (min {shown(min(ys))}, max {shown(max(ys))})"
        )
    return f"Line chart, {title}. " + "; ".join(parts)


# -- grouped bar chart -------------------------------------------------------------------------------


def bar_chart(
    groups: Sequence[tuple[str, Sequence[Any]]],
    *,
    title: str,
    series: Sequence[str] = ("base", "tuned"),
    percent: bool = False,
    panel_width: int = 190,
    height: int = 240,
) -> str:
    """One panel per group (a metric), a bar per series (base and tuned) with its value above it.

    Each panel has its own y axis from zero: the metrics of one chart are in different units (loss and
    perplexity), so a shared scale would flatten the smaller one. `percent` reads the values as
    fractions, labels them as percentages and scales every panel to at least 100%. A value that is
    missing or not finite draws no bar, only a dash."""
    if not groups:
        return note(f"{title}: no data")
    panels = []
    for label, values in groups:
        finite = [v for v in values if _is_number(v) and math.isfinite(v)]
        top = max([*finite, 1.0 if percent else 0.0]) * (1.0 if percent else 1.1)
        ticks = nice_ticks(min([0.0, *finite]), top or 1.0, 5)
        panels.append((label, values, ticks))
    left = 28 + max(_y_labels_width(t, percent) for _, _, t in panels)
    width = max(len(panels) * (panel_width + left) + 8, _text_width(title) * 13 / _FONT_SIZE + 24)
    body = [_chart_title(width, title)]
    for i, (label, values, ticks) in enumerate(panels):
        x0 = 8 + i * (panel_width + left)
        frame = _Frame(x0 + left, 60, panel_width - 8, height - 60 - 40, (0, 1), (ticks[0], ticks[-1]))
        body += _bar_panel(frame, label, values, ticks, series, percent)
    return _svg(width, height, title, _describe_bars(title, groups, series, percent), body)


def _bar_panel(
    frame: _Frame, label: str, values: Sequence[Any], ticks: list[float], series: Sequence[str], percent: bool
) -> list[str]:
    parts = [_text(frame.left + frame.width / 2, 40, label, cls="panel-title", extra=' font-weight="600"')]
    parts += _y_axis(frame, ticks, percent=percent)
    parts.append(_x_axis_line(frame))
    slot = frame.width / len(series)
    zero = frame.y(0.0)
    if ticks[0] < 0:  # bars hang from zero, not from the bottom of the axis
        parts.append(_line(frame.left, zero, frame.left + frame.width, zero, _AXIS))
    for j, (name, value) in enumerate(zip(series, values, strict=True)):
        centre = frame.left + slot * (j + 0.5)
        shown = _bar_value(value, percent)
        parts.append(_text(centre, frame.bottom + 16, name, cls="tick x"))
        if shown == MISSING:
            parts.append(_text(centre, zero - 5, MISSING, cls="value"))
            continue
        top, bottom = sorted((frame.y(value), zero))
        colour = PALETTE[j % len(PALETTE)]
        parts.append(
            f'<rect class="bar" data-series="{escape(name)}" x="{_f(centre - slot * 0.3)}" y="{_f(top)}" '
            f'width="{_f(slot * 0.6)}" height="{_f(bottom - top)}" fill="{colour}"><title>{escape(name)} '
            f"{escape(label)}: {escape(shown)}</title></rect>"
        )
        # Above the bar; a negative bar's label sits above the zero line, clear of the x labels below.
        parts.append(_text(centre, (top if value >= 0 else zero) - 5, shown, cls="value"))
    return parts


def _bar_value(value: Any, percent: bool) -> str:
    if not _is_number(value) or not math.isfinite(value):
        return MISSING
    return format_percent(value) if percent else format_number(value)


def _describe_bars(
    title: str, groups: Sequence[tuple[str, Sequence[Any]]], series: Sequence[str], percent: bool
) -> str:
    parts = [
        f"{label}: "
        + ", ".join(f"{name} {_bar_value(v, percent)}" for name, v in zip(series, values, strict=True))
        for label, values in groups
    ]
    return f"Bar chart, {title}. " + "; ".join(parts)


# -- histogram ---------------------------------------------------------------------------------------


def histogram(
    bins: Sequence[Mapping[str, int]],
    *,
    title: str,
    x_label: str,
    unit: str = "",
    count_label: str = "records",
    width: int = 680,
    height: int = 260,
) -> str:
    """Bars of equal width, one per bin in order, each a `{"lo", "hi", "count"}` (inclusive bounds, as
    validate_data's power-of-two length bins); the x axis is labelled at bin edges, so unequal bins
    read correctly. Each bar's tooltip gives its exact range and count."""
    if not bins:
        return note(f"{title}: no data")
    counts = [b["count"] for b in bins]
    ticks = nice_ticks(0, max(max(counts), 1) * 1.08, 4, integer=True)
    left = 28 + _y_labels_width(ticks)
    frame = _Frame(left, 36, width - left - 20, height - 36 - 46, (0, len(bins)), (ticks[0], ticks[-1]))
    body = [_chart_title(width, title)]
    body += _y_axis(frame, ticks)
    body += _histogram_bars(frame, bins, unit, count_label)
    body += _histogram_edges(frame, bins)
    body += _axis_titles(frame, x_label, count_label)
    described = ", ".join(f"{b['lo']:,}–{b['hi']:,}: {b['count']:,}" for b in bins)
    return _svg(
        width, height, title, f"Histogram, {title}. {count_label} per {x_label} bin: {described}", body
    )


def _histogram_bars(
    frame: _Frame, bins: Sequence[Mapping[str, int]], unit: str, count_label: str
) -> list[str]:
    parts = [_x_axis_line(frame)]
    zero = frame.y(0)
    bar_width = max(frame.x(1) - frame.x(0) - 2, 1)
    for i, b in enumerate(bins):
        x, top = frame.x(i), frame.y(b["count"])
        tip = f"{b['lo']:,}–{b['hi']:,}{' ' + unit if unit else ''}: {b['count']:,} {count_label}"
        parts.append(
            f'<rect class="bar" x="{_f(x + 1)}" y="{_f(top)}" width="{_f(bar_width)}" '
            f'height="{_f(zero - top)}" fill="{HIST_COLOUR}"><title>{escape(tip)}</title></rect>'
        )
    return parts


def _histogram_edges(frame: _Frame, bins: Sequence[Mapping[str, int]]) -> list[str]:
    """Labels at the bin edges: each bin's lower bound and, at the end, one past the last upper bound;
    only every n-th edge when they would crowd."""
    edges = [b["lo"] for b in bins] + [bins[-1]["hi"] + 1]
    labels = [short_number(e) for e in edges]
    room = frame.width / len(bins)
    every = math.ceil((max(_text_width(s) for s in labels) + 6) / room)
    parts = []
    for i, text in enumerate(labels):
        if i % every:
            continue
        x = frame.x(i)
        parts.append(_line(x, frame.bottom, x, frame.bottom + 4, _AXIS))
        parts.append(_text(x, frame.bottom + 16, text, cls="tick x"))
    return parts


def short_number(n: int) -> str:
    """A bin edge in few characters: multiples of 1024 as 'k' and of 1024² as 'M' (edges of power-of-two
    bins), other numbers with thousands separators."""
    for suffix, size in (("M", 1 << 20), ("k", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{suffix}"
    return f"{n:,}"
