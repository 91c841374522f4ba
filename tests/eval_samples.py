"""Small eval results for the tests that read one (registry, model card, evaluation page): the fields
every eval.json has, with the numbers a test does not care about filled in."""

from __future__ import annotations

from typing import Any

from fulltune.evaluate.result import EvalResult
from fulltune.model_identity import manifest_sha256

DOMAIN_GAIN = {
    "name": "domain_gain",
    "passed": True,
    "reason": "domain loss fell 21.4% (3.91 → 3.07) ≥ 0.0% required",
}


def loss_set(
    base: tuple[float, float], tuned: tuple[float, float], *, sequences: int = 13, loss_tokens: int = 90
):
    """A loss set's section from (loss, perplexity) of each model."""
    return {
        "sequences": sequences,
        "loss_tokens": loss_tokens,
        "base": {"loss": base[0], "perplexity": base[1]},
        "tuned": {"loss": tuned[0], "perplexity": tuned[1]},
    }


def eval_record(**fields: Any) -> dict[str, Any]:
    """An eval.json mapping: the domain set 3.91 → 3.07 and a passed domain check, unless `fields`
    say otherwise."""
    record = {
        "base_model_uri": "s3://models/base",
        "tuned_model_uri": "s3://work/run/train/model",
        "sets": {"domain_eval": loss_set((3.91, 49.9), (3.07, 21.5))},
        "checks": [DOMAIN_GAIN],
        "thresholds": {"min_domain_loss_improvement": 0.0, "max_general_ppl_increase": 0.05},
        "device": "cpu (float32)",
        "created_at": "2025-01-01T00:00:00+00:00",
        "fulltune_version": "0.1.0",
    }
    return {**record, **fields}


def eval_result(**fields: Any) -> EvalResult:
    return EvalResult.model_validate(eval_record(**fields))


def scored(result: EvalResult, model_uri: str) -> EvalResult:
    """`result` as the evaluate step writes it for the model at `model_uri`: naming that model and
    its manifest's digest, which is what register checks the model it publishes against."""
    return result.model_copy(
        update={"tuned_model_uri": model_uri, "tuned_model_manifest_sha256": manifest_sha256(model_uri)}
    )
