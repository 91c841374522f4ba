"""Each cycle reads its own data: a `{date}` placeholder in a data URI and a window of days.

    data:
      train_uri: s3://data/notes/dt={date}/        # or {date:%Y/%m/%d}: any strftime format
      window_days: 7                               # the 7 days ending at the run's date

The run's date is `data.as_of` when set (a backfill), else the time a recurring run was scheduled
for, else the time the run started. The pipeline's first step, `configure`, fixes it once and
writes it into the config (`data.as_of`), and replaces each template by the partitions it names, as
one URI with a brace alternation that every reader expands (`storage.expand`):

    s3://data/notes/dt={2026-11-21,2026-11-22,...,2026-11-27}/

so every later step, and the lineage, see the same partitions. A missing partition contributes no
files (validate_data warns of it: empty_location); a window in which none holds data is refused by
validate_data, naming these URIs.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fulltune.config import RunConfig

PLACEHOLDER = re.compile(r"\{date(?::([^{}]*))?\}")
FIELDS = ("train_uri", "eval_uri", "general_uri")


def has_placeholder(uri: str | None) -> bool:
    return bool(uri) and PLACEHOLDER.search(uri) is not None


ALTERNATION = re.compile(r"\{[^{}]*,[^{}]*\}")


def template_problem(uri: str) -> str | None:
    """Why `uri` is not a usable location (braces that are neither `{date}`, `{date:FORMAT}` nor an
    alternation `{a,b}`, or a comma after the first placeholder, which the window's alternation
    could not hold), else None."""
    rest = ALTERNATION.sub("", PLACEHOLDER.sub("", uri))
    if "{" in rest or "}" in rest:
        return "braces other than {date}, {date:FORMAT} (e.g. {date:%Y/%m/%d}) or an alternation {a,b}"
    first = PLACEHOLDER.search(uri)
    if first and "," in uri[first.start() :]:
        return "a comma after the {date} placeholder"
    return None


def parse_time(text: str) -> dt.datetime | None:
    """An ISO 8601 date or time (`2026-11-27`, `2026-11-27T03:00:00Z`) in UTC; None when `text` is
    not one (an unresolved KFP placeholder, an empty string)."""
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return (
        value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)
    )


def partitions(template: str, as_of: dt.date, days: int) -> list[str]:
    """The URI of each day of the window ending at `as_of`, oldest first (a URI without a
    placeholder: itself)."""
    if not has_placeholder(template):
        return [template]
    return [_fill(template, as_of - dt.timedelta(days=back)) for back in range(days - 1, -1, -1)]


def resolve(template: str, as_of: dt.date, days: int) -> str:
    """The window as one URI: the part before the first placeholder, then the days as alternatives."""
    if not has_placeholder(template):
        return template
    uris = partitions(template, as_of, days)
    if len(uris) == 1:
        return uris[0]
    head = template[: PLACEHOLDER.search(template).start()]
    tails = [u[len(head) :] for u in uris]
    common = os.path.commonprefix([t[::-1] for t in tails])[::-1]
    tail = common[common.index("/") :] if "/" in common else ""  # a shared path after the date
    return head + "{" + ",".join(t[: len(t) - len(tail)] for t in tails) + "}" + tail


def run_date(cfg: RunConfig, *candidates: str) -> dt.date:
    """`data.as_of`, else the first candidate time that parses (scheduled, then start), else today (UTC)."""
    for text in (cfg.data.as_of or "", *candidates):
        if (value := parse_time(text)) is not None:
            return value.date()
    return dt.datetime.now(dt.timezone.utc).date()


def fix_window(cfg: RunConfig, *candidates: str) -> dict[str, Any]:
    """The config changes that fix the run's date (`data.as_of`) and replace each `{date}` template
    by its window, as a nested mapping to merge; empty when no data URI has a placeholder."""
    templated = [f for f in FIELDS if has_placeholder(getattr(cfg.data, f))]
    if not templated:
        return {}
    as_of = run_date(cfg, *candidates)
    data = {f: resolve(getattr(cfg.data, f), as_of, cfg.data.window_days) for f in templated}
    return {"data": {**data, "as_of": as_of.isoformat()}}


def _fill(template: str, day: dt.date) -> str:
    return PLACEHOLDER.sub(lambda m: day.strftime(m.group(1) or "%Y-%m-%d"), template)
