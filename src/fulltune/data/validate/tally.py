"""The counts of one pass over a dataset, or over one span of a file in a worker process."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field, replace
from typing import Any

from fulltune.config import CheckPolicy
from fulltune.data.records import Location
from fulltune.data.validate.codes import FATAL, reported_severity


@dataclass
class Problem:
    code: str
    severity: str
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)  # {"location", "reason"}


class Tally:
    """Records, bad records, problems by code under the dataset's policies, and record lengths.

    With `keep_locations` (a span worker) examples keep their Location, for the parent to shift
    the span's line numbers; otherwise they hold the location as text, as the report shows it."""

    def __init__(self, checks: dict[str, CheckPolicy], max_examples: int, *, keep_locations: bool = False):
        self.checks, self.max_examples, self.keep_locations = checks, max_examples, keep_locations
        self.problems: dict[str, Problem] = {}
        self.records = 0
        self.bad = 0
        self.budget_bad = 0  # bad records whose code's action is 'fail': held to max_error_rate
        self.lengths = array("q")  # characters of each good record's plain text

    def add(self, code: str, reason: str, location: Location | str) -> None:
        policy = self.checks.get(code)
        if policy is not None and policy.action == "ignore":
            return
        problem = self.problems.setdefault(code, Problem(code, reported_severity(code)))
        problem.count += 1
        if len(problem.examples) < self.max_examples:
            where = location if self.keep_locations else str(location)
            problem.examples.append({"location": where, "reason": reason})

    def bad_record(self, code: str, reason: str, location: Location | str) -> None:
        """A record that is unusable (preprocessing skips it)."""
        self.bad += 1
        policy = self.checks.get(code)
        if policy is None or policy.action == "fail":
            self.budget_bad += 1
        self.add(code, reason, location)

    def has_fatal(self) -> bool:
        return any(code in FATAL for code in self.problems)

    def merge(self, span: Tally, line_offset: int) -> None:
        """Fold in the tally of a span of a file whose first line is line `line_offset + 1`."""
        self.records += span.records
        self.bad += span.bad
        self.budget_bad += span.budget_bad
        for code, theirs in span.problems.items():
            problem = self.problems.setdefault(code, Problem(code, theirs.severity))
            problem.count += theirs.count
            for ex in theirs.examples[: max(0, self.max_examples - len(problem.examples))]:
                where = ex["location"]
                if isinstance(where, Location) and where.line is not None:
                    where = replace(where, line=where.line + line_offset)
                problem.examples.append({"location": str(where), "reason": ex["reason"]})
        self.lengths.extend(span.lengths)
