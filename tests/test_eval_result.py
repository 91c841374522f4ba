"""EvalResult: the typed eval.json loads what evaluate writes, writes it back key for key, and derives
the KFP metrics (names dashboards and the Model Registry read) from its typed fields.

`data/eval_v1.json` was written by the `evaluate_models` of b8c58a0, which built eval.json as a dict
(two loss sets, a multiple-choice task, a generation task with a regression, lm-eval rows, 50
bootstrap resamples): what registered versions hold. Only the two model URIs were made readable.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

import pytest

from fulltune.config import RunConfig
from fulltune.evaluate import lm_eval_backend
from fulltune.evaluate.core import evaluate_models
from fulltune.evaluate.eval_page import render_report
from fulltune.evaluate.result import EvalResult, EvalResultError

SAMPLE = Path(__file__).parent / "data" / "eval_v1.json"

# Every KFP metric of the sample run, by name.
SAMPLE_METRICS = {
    "domain_eval_base_loss",
    "domain_eval_base_perplexity",
    "domain_eval_tuned_loss",
    "domain_eval_tuned_perplexity",
    "general_eval_base_loss",
    "general_eval_base_perplexity",
    "general_eval_tuned_loss",
    "general_eval_tuned_perplexity",
    "domain_loss_improvement",
    "domain_loss_improvement_ci_low",
    "domain_loss_improvement_ci_high",
    "domain_loss_change",
    "domain_loss_change_ci_low",
    "domain_loss_change_ci_high",
    "forgetting",
    "forgetting_ci_low",
    "forgetting_ci_high",
    "general_perplexity_change",
    "general_perplexity_change_ci_low",
    "general_perplexity_change_ci_high",
    "mc_toy_base_acc",
    "mc_toy_base_acc_norm",
    "mc_toy_tuned_acc",
    "mc_toy_tuned_acc_norm",
    "mc_toy_acc_change",
    "mc_toy_acc_change_ci_low",
    "mc_toy_acc_change_ci_high",
    "mc_toy_acc_norm_change",
    "mc_toy_acc_norm_change_ci_low",
    "mc_toy_acc_norm_change_ci_high",
    "gen_qa_base_em",
    "gen_qa_tuned_em",
    "gen_qa_em_change",
    "gen_qa_em_change_ci_low",
    "gen_qa_em_change_ci_high",
    "lm_eval_arc_easy_acc_base",
    "lm_eval_arc_easy_acc_tuned",
    "lm_eval_arc_easy_acc_change",
    "lm_eval_arc_easy_acc_norm_base",
    "lm_eval_arc_easy_acc_norm_tuned",
    "lm_eval_arc_easy_acc_norm_change",
    "gate_passed",
}


def _sample() -> dict:
    return json.loads(SAMPLE.read_text())


def test_an_eval_json_loads_and_writes_back_key_for_key(tmp_path):
    raw = _sample()
    result = EvalResult.load(str(SAMPLE))
    assert result.to_json() == raw
    assert result.kfp_metrics() == raw["metrics"]
    assert set(result.kfp_metrics()) == SAMPLE_METRICS
    assert result.verdict is raw["verdict"] is False and result.reasons == raw["reasons"]
    assert result.sets["domain_eval"].tuned.loss == raw["sets"]["domain_eval"]["tuned"]["loss"]
    assert result.generation["qa"].worst_regressions[0].base_output == "capital"
    result.write(str(tmp_path / "eval.json"))
    assert EvalResult.load(str(tmp_path / "eval.json")) == result


def test_the_evaluation_page_renders_from_the_sample_file():
    """A registered version's page can be rebuilt from its eval.json: every check, section and interval."""
    raw = _sample()
    html = render_report(EvalResult.load(str(SAMPLE)))
    assert 'class="banner fail"' in html
    assert all(escape(check["reason"]) in html for check in raw["checks"])
    for section in ("domain_eval", "general_eval", "toy", "qa", "arc_easy"):
        assert f"<h3>{section}</h3>" in html
    for key, ci in raw["confidence_intervals"].items():
        assert f"<code>{key}</code> {ci['estimate']:.4f} (95% CI {ci['low']:.4f} to {ci['high']:.4f})" in html
    assert "The 9 questions whose loss rose most" in html
    assert "4 prompts answered right by the base model and wrong by the tuned one" in html
    assert "50 paired resamples, seed 0, 95% percentile CI" in html


def test_with_the_bootstrap_off_intervals_are_nan_and_no_ci_metric_is_reported(tmp_path):
    raw = _sample()
    for interval in raw["confidence_intervals"].values():
        interval["low"] = interval["high"] = float("nan")
    raw["bootstrap"]["resamples"] = 0
    result = EvalResult.model_validate(raw)
    metrics = result.kfp_metrics()
    assert not [key for key in metrics if "_ci_" in key]
    assert metrics["domain_loss_change"] == raw["confidence_intervals"]["domain_loss_change"]["estimate"]
    result.write(str(tmp_path / "eval.json"))
    assert '"low": NaN' in (tmp_path / "eval.json").read_text()  # as json writes it, not null
    again = EvalResult.load(str(tmp_path / "eval.json"))
    assert math.isnan(again.confidence_intervals["forgetting"].low)
    assert again.kfp_metrics() == metrics


def test_an_eval_json_without_the_later_sections_still_loads():
    """The first v1 files had no tasks, intervals, bootstrap or scoring, and two thresholds."""
    raw = _sample()
    for key in ("mc", "generation", "lm_eval", "confidence_intervals", "bootstrap", "scoring"):
        del raw[key]
    del raw["thresholds"]["max_mc_accuracy_drop"], raw["thresholds"]["max_exact_match_drop"]
    for entry in raw["sets"].values():
        del entry["worst_regressions"]
    raw["checks"] = raw["checks"][:2]
    raw["verdict"], raw["reasons"] = False, [c["reason"] for c in raw["checks"]]
    raw["metrics"] = {
        k: v
        for k, v in raw["metrics"].items()
        if k.startswith(("domain_eval_", "general_eval_")) or k in ("domain_loss_improvement", "forgetting")
    }
    raw["metrics"]["gate_passed"] = 0.0
    result = EvalResult.model_validate(raw)
    assert result.kfp_metrics() == raw["metrics"]
    assert result.mc == {} and result.bootstrap is None and result.scoring is None


def test_a_file_that_is_not_an_eval_result_is_refused_naming_file_and_field(tmp_path):
    broken = _sample()
    broken["verdict"] = True  # the checks say False
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(
        EvalResultError,
        match=rf"(?s){path}: not a fulltune eval result.*verdict is True but the checks say False",
    ):
        EvalResult.load(str(path))
    del broken["sets"]
    del broken["verdict"]
    path.write_text(json.dumps(broken))
    with pytest.raises(EvalResultError, match=r"sets\n"):
        EvalResult.load(str(path))
    general_only = _sample()
    del general_only["sets"]["domain_eval"]
    path.write_text(json.dumps(general_only))
    with pytest.raises(EvalResultError, match="sets\n  Value error, no domain_eval set"):
        EvalResult.load(str(path))
    no_checks = {**_sample(), "checks": [], "verdict": True}
    path.write_text(json.dumps(no_checks))
    with pytest.raises(EvalResultError, match="checks"):  # an empty gate passes nothing
        EvalResult.load(str(path))


# -- a fixed run: evaluate writes the same keys as the sample --------------------------------------


def _key_shape(value, path="") -> set[str]:
    """Every key path of a JSON value; list items are described by their first element."""
    if isinstance(value, dict):
        return {f"{path}.{k}" for k in value} | {
            p for k, v in value.items() for p in _key_shape(v, f"{path}.{k}")
        }
    if isinstance(value, list) and value:
        return _key_shape(value[0], f"{path}[]")
    return set()


def test_a_fixed_run_writes_the_keys_of_the_sample(tmp_path, monkeypatch):
    from test_evaluate import MC_QUESTIONS, _manifest, _write_mc
    from tiny_models import save_tiny_llama

    base = save_tiny_llama(tmp_path / "base")
    tuned = save_tiny_llama(tmp_path / "tuned", seed=1, perturb=0.05)
    raw = _sample()
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(
            json.dumps({"prompt": w.prompt, "answer": w.answers}) + "\n"
            for w in EvalResult.model_validate(raw).generation["qa"].worst_regressions
        )
    )
    harness = {"arc_easy": {"acc,none": 0.4, "acc_stderr,none": 0.01, "acc_norm,none": 0.38}}
    monkeypatch.setattr(lm_eval_backend, "available", lambda: True)
    monkeypatch.setattr(lm_eval_backend, "run", lambda *a, **kw: {"base": harness, "tuned": harness})
    cfg = RunConfig.from_dict(
        {
            "evaluation": {
                "per_device_eval_batch_size": 3,
                "bootstrap_resamples": 50,
                "mc_tasks": [{"name": "toy", "uri": _write_mc(tmp_path / "mc.jsonl", MC_QUESTIONS * 3)}],
                "generation_tasks": [{"name": "qa", "uri": str(qa), "max_new_tokens": 4}],
                "lm_eval_tasks": ["arc_easy"],
            }
        }
    )
    result = evaluate_models(cfg, str(base), str(tuned), _manifest(tmp_path / "data"), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert written == result.to_json()
    expected = _key_shape(raw)
    if not written["generation"]["qa"]["worst_regressions"]:  # greedy outputs can differ by platform
        expected = {k for k in expected if not k.startswith(".generation.qa.worst_regressions[]")}
    assert _key_shape(written) == expected
    assert set(written["metrics"]) == SAMPLE_METRICS
    assert EvalResult.load(str(tmp_path / "out" / "eval.json")).to_json() == written
