"""The evaluation result, typed: this model *is* the `eval.json` schema (`format: fulltune.eval/v1`).

`evaluate_models` returns an `EvalResult` and writes it as `eval.json`; everything that reads an
`eval.json` (the `evaluate` and `register` steps, the registry's model card and Kubeflow metadata,
the demo) loads it back with `EvalResult.load`. The file holds:

- `checks`: the gate's checks (name, passed, reason); `verdict` (all passed) and `reasons` are
  written beside them for readers of the file, and derived from the checks on load;
- `sets`, `mc`, `generation`: per loss set / task the base and tuned figures, the change and the
  examples that got worse most; `lm_eval`: the harness's rows (reported, not gated);
- `confidence_intervals`: each bootstrap interval by metric name, with the `bootstrap` settings;
- `thresholds`, `device`, `scoring`, the model URIs, the dataset manifest, time and version;
- `metrics`: the flat numbers KFP Metrics shows, derived from the fields above by `kfp_metrics`
  (dashboards and the Model Registry read these names), written for readers and ignored on load.

Sections that joined format v1 after its first release (`mc`, `generation`, `lm_eval`,
`confidence_intervals`, `bootstrap`, `scoring`, two thresholds, the sets' `worst_regressions`, a
generation task's `regressions`) are
optional here, so a version an earlier fulltune registered still loads.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from fulltune import storage
from fulltune.evaluate import gate
from fulltune.evaluate.lm_eval_backend import flat_metrics

EVAL_FORMAT = "fulltune.eval/v1"
DOMAIN, GENERAL = "domain_eval", "general_eval"
ROLES = ("base", "tuned")
CHAMPION = "champion"  # the promoted version, scored beside them with evaluation.compare_to: registered
# Metric (and interval) names of what the gate's two loss checks read.
DOMAIN_LOSS_IMPROVEMENT, FORGETTING = "domain_loss_improvement", "forgetting"
# tuned vs the promoted version (evaluation.compare_to: registered): 1 - tuned / champion domain loss
CHAMPION_IMPROVEMENT = "champion_domain_loss_improvement"
# ... and on the general set: tuned / champion general perplexity - 1
CHAMPION_FORGETTING = "champion_forgetting"


class EvalResultError(ValueError):
    """A file that is not a usable eval result; the message names the file and the field."""


class _Record(BaseModel):
    # Keys a newer fulltune adds to the file are ignored, not refused: old readers keep working.
    # NaN and infinity (a diverged model, intervals with the bootstrap off) stay numbers, written as
    # json writes them (NaN, Infinity), not turned into null.
    model_config = ConfigDict(extra="ignore", frozen=True, ser_json_inf_nan="constants")


# -- gate, intervals, settings ---------------------------------------------------------------------


class GateCheck(_Record):
    name: str
    passed: bool
    reason: str


class ConfidenceInterval(_Record):
    """A point estimate and its paired bootstrap interval (NaN bounds when the bootstrap is off)."""

    estimate: float
    low: float
    high: float

    @property
    def bounds(self) -> gate.CI | None:
        """(low, high) when both are finite numbers, else None."""
        return (self.low, self.high) if math.isfinite(self.low) and math.isfinite(self.high) else None


class BootstrapSettings(_Record):
    resamples: int
    seed: int
    level: float


class Thresholds(_Record):
    min_domain_loss_improvement: float
    max_general_ppl_increase: float
    max_mc_accuracy_drop: float | None = None
    max_exact_match_drop: float | None = None
    # against the champion; None: not compared with one (compare_to base, or an older file)
    max_domain_loss_regression: float | None = None
    max_general_ppl_regression: float | None = None

    @model_serializer(mode="wrap")
    def _without_champion_when_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The champion tolerances only when there was a champion: a run with compare_to base writes
        the keys it always wrote."""
        data = handler(self)
        for key in ("max_domain_loss_regression", "max_general_ppl_regression"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class ScoringPass(_Record):
    """One pass over the prepared batches: the models loaded for it and how long it took."""

    roles: list[str]
    seconds: float


class Scoring(_Record):
    """How the models were placed and scored (see `evaluate.core`)."""

    device_map: str
    models_together: bool
    why: str
    passes: list[ScoringPass] = []


# -- sections: one per loss set, multiple-choice task and generation task --------------------------


class LossFigures(_Record):
    loss: float
    perplexity: float


class SequenceRegression(_Record):
    """A sequence whose token-mean loss rose (index into the eval set, in data order)."""

    index: int
    base_loss: float
    tuned_loss: float
    change: float


class LossSetSection(_Record):
    """A preprocessed eval split: token-mean cross-entropy and perplexity of each model."""

    sequences: int
    loss_tokens: int
    base: LossFigures
    tuned: LossFigures
    worst_regressions: list[SequenceRegression] = []

    @staticmethod
    def interval_keys(name: str) -> tuple[str, str]:
        """The interval names of set `name`: its absolute change, then its relative one (what the gate
        reads): `domain_loss_change` and `domain_loss_improvement` on domain_eval,
        `general_perplexity_change` and `forgetting` on general_eval."""
        if name == DOMAIN:
            return "domain_loss_change", DOMAIN_LOSS_IMPROVEMENT
        relative = FORGETTING if name == GENERAL else f"{name}_{FORGETTING}"
        return f"{name.removesuffix('_eval')}_perplexity_change", relative

    def metrics(self, name: str) -> dict[str, float]:
        return {
            f"{name}_{role}_{what}": getattr(getattr(self, role), what)
            for role in ROLES
            for what in ("loss", "perplexity")
        }


class Champion(_Record):
    """The version the candidate was compared with (`evaluation.compare_to`), and its figures on the
    loss sets, scored over the same batches as base and candidate."""

    compare_to: Literal["base", "registered"]
    version: int | None = None  # None: nothing promoted yet, compared to the base only
    model_uri: str | None = None
    note: str = ""
    sets: dict[str, LossFigures] = {}

    def metrics(self) -> dict[str, float]:
        out = {"compared_to_champion": 1.0 if self.version is not None else 0.0}
        for name, figures in self.sets.items():
            out[f"{name}_champion_loss"] = figures.loss
            out[f"{name}_champion_perplexity"] = figures.perplexity
        if self.version is not None:
            out["champion_version"] = float(self.version)
        return out


class MCFigures(_Record):
    acc: float
    acc_norm: float


class QuestionRegression(_Record):
    """A question whose answer loss (minus the right choice's log-likelihood) rose."""

    index: int
    question: str
    base_loss: float
    tuned_loss: float
    change: float
    base_correct: bool
    tuned_correct: bool


class MCSection(_Record):
    """A multiple-choice task: accuracy of each model and its change in percentage points."""

    questions: int
    base: MCFigures
    tuned: MCFigures
    acc_change_points: float
    acc_norm_change_points: float
    worst_regressions: list[QuestionRegression] = []

    @staticmethod
    def change_key(name: str, what: Literal["acc", "acc_norm"] = "acc") -> str:
        """The metric and interval name of the change of `what` on task `name`."""
        return f"mc_{name}_{what}_change"

    def metrics(self, name: str) -> dict[str, float]:
        out = {
            f"mc_{name}_{role}_{what}": getattr(getattr(self, role), what)
            for role in ROLES
            for what in ("acc", "acc_norm")
        }
        out[self.change_key(name)] = self.acc_change_points
        out[self.change_key(name, "acc_norm")] = self.acc_norm_change_points
        return out

    def comparison(self, name: str, intervals: dict[str, ConfidenceInterval]) -> gate.MCComparison:
        """What the gate checks for this task."""
        ci = intervals.get(self.change_key(name))
        return gate.MCComparison(name, self.base.acc, self.tuned.acc, ci.bounds if ci else None)


class EMFigures(_Record):
    em: float


class GenerationRegression(_Record):
    """A prompt the base model answered right and the tuned model wrong."""

    index: int
    prompt: str
    answers: list[str]
    base_output: str
    tuned_output: str


class GenerationSection(_Record):
    """An exact-match generation task: exact-match rate of each model and its change in points."""

    examples: int
    max_new_tokens: int
    stop: list[str]
    base: EMFigures
    tuned: EMFigures
    em_change_points: float
    worst_regressions: list[GenerationRegression] = []
    # How many prompts the base model answered right and the tuned one wrong; `worst_regressions`
    # lists only the first few. None in files written before it was recorded.
    regressions: int | None = None

    @staticmethod
    def change_key(name: str) -> str:
        """The metric and interval name of the exact-match change on task `name`."""
        return f"gen_{name}_em_change"

    def metrics(self, name: str) -> dict[str, float]:
        out = {f"gen_{name}_{role}_em": getattr(self, role).em for role in ROLES}
        out[self.change_key(name)] = self.em_change_points
        return out

    def comparison(self, name: str, intervals: dict[str, ConfidenceInterval]) -> gate.EMComparison:
        """What the gate checks for this task."""
        ci = intervals.get(self.change_key(name))
        return gate.EMComparison(name, self.base.em, self.tuned.em, ci.bounds if ci else None)


Section = LossSetSection | MCSection | GenerationSection


class LMEvalRow(_Record):
    base: float
    tuned: float
    change: float


# -- the result --------------------------------------------------------------------------------------


class EvalResult(_Record):
    """Base vs tuned, the gate's decision and everything it was decided on; see the module docstring."""

    format: Literal["fulltune.eval/v1"] = EVAL_FORMAT
    base_model_uri: str
    tuned_model_uri: str
    # sha256 of the tuned model's model_manifest.json when it was scored (`model_identity`): what
    # register checks the model it publishes against. None: a model without one, or an older file.
    tuned_model_manifest_sha256: str | None = None
    dataset_manifest: str | None = None
    sets: dict[str, LossSetSection]
    mc: dict[str, MCSection] = {}
    generation: dict[str, GenerationSection] = {}
    lm_eval: dict[str, dict[str, LMEvalRow]] = {}
    confidence_intervals: dict[str, ConfidenceInterval] = {}
    bootstrap: BootstrapSettings | None = None
    checks: list[GateCheck] = Field(min_length=1)  # no checks would be a verdict of all() == True
    thresholds: Thresholds
    device: str
    scoring: Scoring | None = None
    champion: Champion | None = None
    created_at: str
    fulltune_version: str

    @property
    def verdict(self) -> bool:
        """Whether the gate passed: every check did."""
        return all(check.passed for check in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [check.reason for check in self.checks]

    @property
    def domain_loss_improvement(self) -> float:
        """1 - tuned / base domain loss (NaN with a base loss that is not positive)."""
        domain = self.sets[DOMAIN]
        return gate.domain_loss_improvement(domain.base.loss, domain.tuned.loss)

    @property
    def forgetting(self) -> float | None:
        """tuned / base general perplexity - 1; None without a general set."""
        general = self.sets.get(GENERAL)
        return gate.forgetting(general.base.perplexity, general.tuned.perplexity) if general else None

    def kfp_metrics(self) -> dict[str, float]:
        """The flat numbers for KFP Metrics (also `metrics` in eval.json), named as dashboards read them.

        `<set>_{base,tuned}_{loss,perplexity}`, `domain_loss_improvement`, `forgetting`,
        `mc_<task>_{base,tuned}_{acc,acc_norm}`, `mc_<task>_{acc,acc_norm}_change`,
        `gen_<task>_{base,tuned}_em`, `gen_<task>_em_change`, `lm_eval_<task>_<metric>_{base,tuned,change}`,
        every interval's estimate under its own name and, when computed, `<name>_ci_{low,high}`,
        and `gate_passed` (1.0 or 0.0).
        """
        metrics: dict[str, float] = {}
        for name, loss_set in self.sets.items():
            metrics.update(loss_set.metrics(name))
        metrics[DOMAIN_LOSS_IMPROVEMENT] = self.domain_loss_improvement
        if (forgetting := self.forgetting) is not None:
            metrics[FORGETTING] = forgetting
        for sections in (self.mc, self.generation):
            for name, section in sections.items():
                metrics.update(section.metrics(name))
        metrics.update(
            flat_metrics(
                {task: {m: r.model_dump() for m, r in rows.items()} for task, rows in self.lm_eval.items()}
            )
        )
        for key, interval in self.confidence_intervals.items():
            metrics.setdefault(key, interval.estimate)
            if interval.bounds:  # no NaN placeholders in KFP Metrics when the bootstrap is off
                metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = interval.bounds
        if self.champion is not None:
            metrics.update(self.champion.metrics())
        metrics["gate_passed"] = 1.0 if self.verdict else 0.0
        return {key: float(value) for key, value in metrics.items()}

    @model_serializer(mode="wrap")
    def _with_derived(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        data.update(verdict=self.verdict, reasons=self.reasons, metrics=self.kfp_metrics())
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _verdict_agrees_with_checks(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> EvalResult:
        """`verdict` is derived from `checks`; a file where they disagree was edited by hand."""
        result = handler(data)
        stated = data.get("verdict") if isinstance(data, dict) else None
        if isinstance(stated, bool) and stated != result.verdict:
            raise ValueError(f"verdict is {stated} but the checks say {result.verdict}")
        return result

    @field_validator("sets")
    @classmethod
    def _has_domain_set(cls, sets: dict[str, LossSetSection]) -> dict[str, LossSetSection]:
        if DOMAIN not in sets:
            raise ValueError(f"no {DOMAIN} set: the gate's domain check has nothing to read")
        return sets

    @classmethod
    def load(cls, uri: str) -> EvalResult:
        """The eval result in the `eval.json` at `uri` (local or s3://)."""
        try:
            return cls.model_validate(storage.read_json(uri))
        except ValueError as exc:  # pydantic's ValidationError and json's JSONDecodeError both are
            raise EvalResultError(f"{uri}: not a fulltune eval result: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """The `eval.json` content: JSON types only (NaN and infinity stay floats, as json writes them)."""
        return self.model_dump(mode="json")

    def write(self, uri: str) -> None:
        storage.write_json(uri, self.to_json())
