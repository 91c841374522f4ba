"""What the step reports share: one stylesheet, and writing report.json + report.html together."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fulltune import storage

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#17692d;font-weight:600}.info{color:#555;font-weight:600}.error{color:#b00020;font-weight:600}
.warning{color:#9a6700;font-weight:600}code,pre{font-size:.92em;word-break:break-all;white-space:pre-wrap}
ul{margin:0;padding-left:1.2em}
"""


def write_reports(
    report: dict[str, Any], out_dir: Path, render_html: Callable[[dict[str, Any]], str]
) -> None:
    """out_dir/report.json (the machine-readable report) and out_dir/report.html (what people read)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    storage.write_json(str(out_dir / "report.json"), report)
    storage.write_text(str(out_dir / "report.html"), render_html(report))
