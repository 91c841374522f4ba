"""The evaluation gate: does the tuned model earn registration?

Two checks, both relative so they read the same for any model size:

- **domain gain**: `domain_loss_improvement = 1 - tuned_loss / base_loss` on the domain eval set
  must be at least `evaluation.min_domain_loss_improvement` (0.02 = the loss fell by 2%; a negative
  value tolerates a small rise);
- **forgetting**: `forgetting = tuned_ppl / base_ppl - 1` on the general eval set must be at most
  `evaluation.max_general_ppl_increase` (0.05 = perplexity may rise by 5%). Without a general set
  forgetting is not measured and the check passes, saying so;
- **multiple choice** (one check per configured task): the accuracy (`acc`) may fall by at most
  `evaluation.max_mc_accuracy_drop` percentage points (2.0 = from 61.0% to 59.0% still passes);
- **exact match** (one check per generation task): the exact-match rate may fall by at most
  `evaluation.max_exact_match_drop` percentage points;
- **champion** (`evaluation.compare_to: registered`, against the version in production): the domain
  loss may rise at most `evaluation.max_domain_loss_regression` above the champion's and, with a
  general set, the general perplexity at most `evaluation.max_general_ppl_regression` above the
  champion's (`champion_check`, `champion_general_check`).

The gate decides on the **point estimates**. Bootstrap confidence intervals, when given, are quoted
in the reasons so a reader can tell a real regression from noise on a small eval set, but they do
not change the decision: a gate on an interval bound would pass or fail more often just because a
set is small, and the thresholds are meant to be read as plain changes.

Everything here is pure arithmetic on numbers, so it is unit-tested without a model. Every check
yields a plain-language reason whether it passes or fails; a failed gate is a verdict, not an error.
A value that is not a finite number (a diverged model) fails its check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

CI = tuple[float, float]  # (low, high) of a bootstrap interval, in the metric's own units


class Check(NamedTuple):
    """One gate check: its name, whether it passed and a sentence a person can read."""

    name: str
    passed: bool
    reason: str


class Verdict(NamedTuple):
    """The gate's decision and a check for every condition."""

    passed: bool
    checks: tuple[Check, ...]

    @property
    def reasons(self) -> list[str]:
        return [check.reason for check in self.checks]


def domain_loss_improvement(base_loss: float, tuned_loss: float) -> float:
    """Relative drop of the domain loss: 1 - tuned / base (NaN when the base loss is not a positive
    finite number: an infinite one would read as a 100% fall for any tuned loss)."""
    if not 0 < base_loss < math.inf:
        return math.nan
    return 1.0 - tuned_loss / base_loss


def forgetting(base_ppl: float, tuned_ppl: float) -> float:
    """Relative rise of general-set perplexity: tuned / base - 1 (NaN when the base is not a positive
    finite number: an infinite one would read as no forgetting for any tuned perplexity)."""
    if not 0 < base_ppl < math.inf:
        return math.nan
    return tuned_ppl / base_ppl - 1.0


class MCComparison(NamedTuple):
    """One multiple-choice task: base and tuned accuracy (fractions) and the CI of the change in points."""

    name: str
    base_acc: float
    tuned_acc: float
    change_ci: CI | None = None


class EMComparison(NamedTuple):
    """One generation task: base and tuned exact-match rate (fractions) and the CI of the change in points."""

    name: str
    base_em: float
    tuned_em: float
    change_ci: CI | None = None


def decide(
    *,
    base_domain_loss: float,
    tuned_domain_loss: float,
    base_general_ppl: float | None,
    tuned_general_ppl: float | None,
    min_domain_loss_improvement: float,
    max_general_ppl_increase: float,
    domain_ci: CI | None = None,
    forgetting_ci: CI | None = None,
    mc: Sequence[MCComparison] = (),
    max_mc_accuracy_drop: float = 2.0,
    generation: Sequence[EMComparison] = (),
    max_exact_match_drop: float = 2.0,
    ci_level: float = 0.95,
) -> Verdict:
    """Apply the gate. Pass `None` for both general perplexities when there is no general set.

    Args:
        base_domain_loss: Token-mean cross-entropy of the base model on the domain eval set.
        tuned_domain_loss: The same for the tuned model.
        base_general_ppl: Perplexity of the base model on the general eval set, or None.
        tuned_general_ppl: The same for the tuned model, or None.
        min_domain_loss_improvement: Smallest required relative drop of the domain loss.
        max_general_ppl_increase: Largest allowed relative rise of the general perplexity.
        domain_ci: Bootstrap interval of `domain_loss_improvement`, quoted in the reason.
        forgetting_ci: Bootstrap interval of `forgetting`, quoted in the reason.
        mc: Multiple-choice results, one check each.
        max_mc_accuracy_drop: Largest allowed accuracy drop, in percentage points.
        generation: Exact-match results of the generation tasks, one check each.
        max_exact_match_drop: Largest allowed exact-match drop, in percentage points.
        ci_level: Confidence level of the intervals, for the wording.
    """
    if (base_general_ppl is None) != (tuned_general_ppl is None):
        raise ValueError("give both general perplexities or neither")
    checks = [
        _domain_check(base_domain_loss, tuned_domain_loss, min_domain_loss_improvement, domain_ci, ci_level)
    ]
    if base_general_ppl is None or tuned_general_ppl is None:
        checks.append(Check("forgetting", True, "no general eval set: forgetting was not measured"))
    else:
        checks.append(
            _forgetting_check(
                base_general_ppl, tuned_general_ppl, max_general_ppl_increase, forgetting_ci, ci_level
            )
        )
    checks.extend(_mc_check(task, max_mc_accuracy_drop, ci_level) for task in mc)
    checks.extend(_em_check(task, max_exact_match_drop, ci_level) for task in generation)
    return Verdict(all(check.passed for check in checks), tuple(checks))


def _domain_check(
    base: float, tuned: float, required: float, ci: CI | None = None, level: float = 0.95
) -> Check:
    change = f"({base:.2f} → {tuned:.2f}{_ci_pct(ci, 'improvement', level)})"
    improvement = domain_loss_improvement(base, tuned)
    if not math.isfinite(improvement):
        return Check(
            "domain_gain", False, f"domain loss is not a finite number {change}: cannot judge the gain"
        )
    passed = improvement >= required
    got, need = _percentages(improvement, required)
    if required >= 0:
        if improvement >= 0:
            op = "≥" if passed else "<"
            reason = f"domain loss fell {got} {change} {op} {need} required"
        else:
            reason = f"domain loss rose {_neg(got)} {change}; a fall of ≥ {need} is required"
    else:  # a tolerated rise
        if improvement >= 0:
            reason = f"domain loss fell {got} {change}; a rise of up to {_neg(need)} is allowed"
        else:
            op = "≤" if passed else ">"
            reason = f"domain loss rose {_neg(got)} {change} {op} {_neg(need)} rise allowed"
    return Check("domain_gain", passed, reason)


def champion_check(
    champion: float, tuned: float, allowed: float, version: int, ci: CI | None = None, level: float = 0.95
) -> Check:
    """The candidate against the promoted version on the domain set: its loss may rise at most
    `allowed` (relative) above the champion's."""
    change = f"({champion:.2f} → {tuned:.2f}{_ci_pct(ci, 'improvement', level)})"
    improvement = domain_loss_improvement(champion, tuned)
    if not math.isfinite(improvement):
        return Check("champion", False, f"domain loss against v{version} is not a finite number {change}")
    passed = improvement >= -allowed
    got, limit = _percentages(abs(improvement), allowed)
    if improvement >= 0:
        reason = f"domain loss {got} below the promoted v{version} {change}: the candidate is better"
    else:
        op = "≤" if passed else ">"
        reason = f"domain loss {got} above the promoted v{version} {change} {op} {limit} allowed"
    return Check("champion", passed, reason)


def champion_general_check(
    champion: float, tuned: float, allowed: float, version: int, ci: CI | None = None, level: float = 0.95
) -> Check:
    """The candidate against the promoted version on the general set: its perplexity may rise at most
    `allowed` (relative) above the champion's. The forgetting check bounds the rise over the base; this
    one keeps a candidate that forgot much more than the serving version from replacing it for a
    small domain gain."""
    change = f"({champion:.2f} → {tuned:.2f}{_ci_pct(ci, 'rise', level)})"
    rise = forgetting(champion, tuned)
    if not math.isfinite(rise):
        return Check(
            "champion_general",
            False,
            f"general perplexity against v{version} is not a finite number {change}",
        )
    passed = rise <= allowed
    got, limit = _percentages(abs(rise), allowed)
    if rise <= 0:
        reason = f"general perplexity {got} below the promoted v{version} {change}: the candidate forgot less"
    else:
        op = "≤" if passed else ">"
        reason = f"general perplexity {got} above the promoted v{version} {change} {op} {limit} allowed"
    return Check("champion_general", passed, reason)


def _forgetting_check(
    base: float, tuned: float, allowed: float, ci: CI | None = None, level: float = 0.95
) -> Check:
    change = f"({base:.2f} → {tuned:.2f}{_ci_pct(ci, 'rise', level)})"
    rise = forgetting(base, tuned)
    if not math.isfinite(rise):
        return Check(
            "forgetting",
            False,
            f"general perplexity is not a finite number {change}: cannot judge forgetting",
        )
    passed = rise <= allowed
    got, limit = _percentages(rise, allowed)
    if rise > 0:
        op = "≤" if passed else ">"
        reason = f"general perplexity rose {got} {change} {op} {limit} allowed"
    else:
        reason = f"general perplexity fell {_neg(got)} {change}: no forgetting ({limit} rise allowed)"
    return Check("forgetting", passed, reason)


def _mc_check(task: MCComparison, allowed: float, level: float = 0.95) -> Check:
    return _points_check(
        f"mc_{task.name}",
        f"{task.name} accuracy",
        task.base_acc,
        task.tuned_acc,
        task.change_ci,
        allowed,
        level,
    )


def _em_check(task: EMComparison, allowed: float, level: float = 0.95) -> Check:
    return _points_check(
        f"gen_{task.name}",
        f"{task.name} exact match",
        task.base_em,
        task.tuned_em,
        task.change_ci,
        allowed,
        level,
    )


def _points_check(
    name: str, what: str, base: float, tuned: float, ci: CI | None, allowed: float, level: float
) -> Check:
    """A rate (fraction) that may fall by at most `allowed` percentage points."""
    points = (tuned - base) * 100.0
    quoted = ""
    if ci is not None and all(math.isfinite(x) for x in ci):
        quoted = f", {_level(level)} CI of the change {ci[0]:+.1f} to {ci[1]:+.1f} points"
    change = f"({base:.1%} → {tuned:.1%}{quoted})"
    if not math.isfinite(points):
        return Check(name, False, f"{what} is not a finite number {change}")
    drop = -points
    passed = drop <= allowed
    if drop > 0:
        op = "≤" if passed else ">"
        reason = f"{what} fell {drop:.1f} points {change} {op} {allowed:.1f} allowed"
    else:
        reason = f"{what} rose {points:.1f} points {change}: no drop ({allowed:.1f} allowed)"
    return Check(name, passed, reason)


def _ci_pct(ci: CI | None, what: str, level: float = 0.95) -> str:
    """', 95% CI of the rise +5.1% to +9.6%' or '' when there is no (finite) interval."""
    if ci is None or not all(math.isfinite(x) for x in ci):
        return ""
    return f", {_level(level)} CI of the {what} {ci[0]:+.1%} to {ci[1]:+.1%}"


def _level(level: float) -> str:
    return f"{level:.0%}" if round(level * 100, 6).is_integer() else f"{level:.1%}"


def _percentages(value: float, threshold: float) -> tuple[str, str]:
    """Both as percentages, with enough decimals that unequal numbers never print the same."""
    for digits in range(1, 5):
        a, b = f"{value:.{digits}%}", f"{threshold:.{digits}%}"
        if a != b or value == threshold:
            break
    return a, b


def _neg(pct: str) -> str:
    return pct[1:] if pct.startswith("-") else pct
