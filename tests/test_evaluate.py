"""evaluate: loss/perplexity against a hand computation, the gate's logic and wording, the outputs."""

from __future__ import annotations

import json
import math
import re
from html import escape
from pathlib import Path

import pytest

from eval_samples import eval_record, loss_set
from fulltune import storage
from fulltune.config import RunConfig
from fulltune.evaluate.core import EvaluateError, evaluate_models, load_model, pick_device
from fulltune.evaluate.eval_page import render_report
from fulltune.evaluate.gate import decide
from fulltune.evaluate.loss import sequence_loss
from fulltune.preprocess.dataset import IGNORE_INDEX, MANIFEST_FORMAT, load_split
from tiny_models import TINY_LLAMA, save_tiny_llama

VOCAB = TINY_LLAMA["vocab_size"]
SEQ_LEN = 16


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """'same' is 'base' again, file for file; 'tuned' is 'base' plus seeded noise."""
    root = tmp_path_factory.mktemp("models")
    return {
        "base": save_tiny_llama(root / "base"),
        "tuned": save_tiny_llama(root / "tuned", seed=1, perturb=0.05),
        "same": save_tiny_llama(root / "same"),
    }


def _write_split(path: Path, *, rows: int, seed: int) -> dict:
    """Rows with a masked prompt, a loss-carrying answer and right padding, like preprocess writes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    input_ids, labels, masks = [], [], []
    for _ in range(rows):
        length = int(rng.integers(SEQ_LEN // 2, SEQ_LEN + 1))
        prompt = int(rng.integers(1, length // 2))
        ids = rng.integers(3, VOCAB, size=SEQ_LEN).astype(np.int32)
        ids[length:] = 0
        lab = ids.copy()
        lab[:prompt] = IGNORE_INDEX
        lab[length:] = IGNORE_INDEX
        mask = np.zeros(SEQ_LEN, dtype=np.int8)
        mask[:length] = 1
        input_ids.append(ids.tolist())
        labels.append(lab.tolist())
        masks.append(mask.tolist())
    table = pa.table(
        {
            "input_ids": pa.array(input_ids, type=pa.list_(pa.int32())),
            "labels": pa.array(labels, type=pa.list_(pa.int32())),
            "attention_mask": pa.array(masks, type=pa.list_(pa.int8())),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    loss_tokens = sum(sum(1 for x in lab if x != IGNORE_INDEX) for lab in labels)
    entry = {
        "uri": str(path),
        "sequences": rows,
        "sha256": storage.sha256_file(path),
        "size": path.stat().st_size,
    }
    return {"entry": entry, "tokens": sum(sum(m) for m in masks), "loss_tokens": loss_tokens}


def _manifest(root: Path, *, general: bool = True) -> dict:
    splits = {}
    layout = {"domain_eval": [(7, 1), (6, 2)]}  # two files: rows, seed
    if general:
        layout["general_eval"] = [(9, 3)]
    for split, files in layout.items():
        written = [
            _write_split(root / split / f"part-{i}.parquet", rows=n, seed=s) for i, (n, s) in enumerate(files)
        ]
        splits[split] = {
            "sequences": sum(w["entry"]["sequences"] for w in written),
            "tokens": sum(w["tokens"] for w in written),
            "loss_tokens": sum(w["loss_tokens"] for w in written),
            "files": [w["entry"] for w in written],
        }
    return {"format": MANIFEST_FORMAT, "max_seq_len": SEQ_LEN, "pad_token_id": 0, "splits": splits}


@pytest.fixture
def dataset(tmp_path) -> dict:
    return _manifest(tmp_path / "data")


def _cfg(**evaluation) -> RunConfig:
    return RunConfig.from_dict({"evaluation": {"per_device_eval_batch_size": 3, **evaluation}})


def _hand_loss(model_dir: Path, data: dict) -> float:
    """Cross-entropy over shifted logits, ignoring -100, on the whole set at once (fp32)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), data["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    ).item()


# -- loss ---------------------------------------------------------------------------------------


def test_sequence_loss_matches_hand_computed_cross_entropy(models, dataset):
    data = load_split(dataset, "domain_eval")
    expected = _hand_loss(models["tuned"], data)
    device, dtype = pick_device()
    if device.type != "cpu":
        pytest.skip("the 1e-5 comparison is for fp32 on the CPU")
    with load_model(_cfg(), str(models["tuned"]), device, dtype) as model:
        for batch_size in (1, 3, 64):  # partial last batch, one batch
            result = sequence_loss(model, data, batch_size=batch_size)
            assert result.loss == pytest.approx(expected, abs=1e-5)
    assert result.tokens == dataset["splits"]["domain_eval"]["loss_tokens"]
    assert result.sequences == 13
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_sequence_loss_without_loss_tokens_is_an_error(models, dataset):
    data = load_split(dataset, "domain_eval")
    data["labels"][:] = IGNORE_INDEX
    device, dtype = pick_device()
    with load_model(_cfg(), str(models["base"]), device, dtype) as model:
        with pytest.raises(EvaluateError, match="no positions"):
            sequence_loss(model, data, batch_size=4)


# -- gate ---------------------------------------------------------------------------------------


def _decide(
    base_loss=3.91, tuned_loss=3.0732, base_ppl=12.10, tuned_ppl=12.30, min_gain=0.0, max_rise=0.05, **more
):
    """The gate on a domain loss that fell 21.4% and a general perplexity that rose 1.7%, unless the
    test says otherwise; `more` passes intervals and task comparisons through."""
    return decide(
        base_domain_loss=base_loss,
        tuned_domain_loss=tuned_loss,
        base_general_ppl=base_ppl,
        tuned_general_ppl=tuned_ppl,
        min_domain_loss_improvement=min_gain,
        max_general_ppl_increase=max_rise,
        **more,
    )


def test_gate_passes_with_a_reason_per_check():
    verdict = _decide()
    assert verdict.passed
    assert verdict.reasons == [
        "domain loss fell 21.4% (3.91 → 3.07) ≥ 0.0% required",
        "general perplexity rose 1.7% (12.10 → 12.30) ≤ 5.0% allowed",
    ]
    assert [c.passed for c in verdict.checks] == [True, True]


def test_gate_fails_on_forgetting():
    verdict = _decide(tuned_ppl=12.98)
    assert not verdict.passed
    assert verdict.checks[0].passed and not verdict.checks[1].passed
    assert verdict.reasons[1] == "general perplexity rose 7.3% (12.10 → 12.98) > 5.0% allowed"


def test_gate_fails_without_domain_gain():
    rose = _decide(tuned_loss=4.10)
    assert not rose.passed
    assert rose.reasons[0] == "domain loss rose 4.9% (3.91 → 4.10); a fall of ≥ 0.0% is required"
    too_little = _decide(tuned_loss=3.87, min_gain=0.02)
    assert not too_little.passed
    assert too_little.reasons[0] == "domain loss fell 1.0% (3.91 → 3.87) < 2.0% required"


def test_gate_without_general_set_checks_the_domain_only():
    verdict = _decide(base_ppl=None, tuned_ppl=None)
    assert verdict.passed
    assert verdict.reasons[1] == "no general eval set: forgetting was not measured"
    assert not _decide(tuned_loss=4.0, base_ppl=None, tuned_ppl=None).passed


def test_gate_wording_edge_cases():
    # a tolerated domain rise (negative threshold)
    assert _decide(tuned_loss=3.93, min_gain=-0.01).reasons[0] == (
        "domain loss rose 0.5% (3.91 → 3.93) ≤ 1.0% rise allowed"
    )
    assert not _decide(tuned_loss=4.0, min_gain=-0.01).passed
    # general perplexity fell: no forgetting
    assert (
        _decide(tuned_ppl=11.5).reasons[1]
        == "general perplexity fell 5.0% (12.10 → 11.50): no forgetting (5.0% rise allowed)"
    )
    # just over the limit prints enough digits to show it
    over = _decide(base_ppl=10.0, tuned_ppl=10.504)
    assert not over.passed
    assert over.reasons[1] == "general perplexity rose 5.04% (10.00 → 10.50) > 5.00% allowed"
    # a diverged model fails, it does not crash
    nan = _decide(tuned_loss=math.nan, tuned_ppl=math.inf)
    assert not nan.passed and [c.passed for c in nan.checks] == [False, False]
    assert "not a finite number" in nan.reasons[0]
    with pytest.raises(ValueError):
        _decide(base_ppl=None)


def test_a_diverged_base_or_champion_does_not_pass_the_gate():
    """An infinite base (or champion) figure read as a 100% fall, or as no forgetting, for any tuned
    figure: 'domain loss fell 100.0% (inf → 3.07) ≥ 0.0% required' passed."""
    from fulltune.evaluate.gate import champion_check, champion_general_check

    inf = _decide(base_loss=math.inf, base_ppl=math.inf)
    assert not inf.passed and [c.passed for c in inf.checks] == [False, False]
    assert inf.reasons == [
        "domain loss is not a finite number (inf → 3.07): cannot judge the gain",
        "general perplexity is not a finite number (inf → 12.30): cannot judge forgetting",
    ]
    assert not champion_check(math.inf, 3.07, 0.0, 4).passed
    assert not champion_general_check(math.inf, 12.3, 0.05, 4).passed


# -- evaluate_models ----------------------------------------------------------------------------


def test_evaluate_models_writes_eval_json_and_report(models, dataset, tmp_path):
    out = tmp_path / "out"
    result = evaluate_models(_cfg(), str(models["base"]), str(models["tuned"]), dataset, out).to_json()

    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert set(result["sets"]) == {"domain_eval", "general_eval"}
    domain = result["sets"]["domain_eval"]
    assert (
        domain["sequences"] == 13 and domain["loss_tokens"] == dataset["splits"]["domain_eval"]["loss_tokens"]
    )
    if pick_device()[0].type == "cpu":
        data = load_split(dataset, "domain_eval")
        assert domain["base"]["loss"] == pytest.approx(_hand_loss(models["base"], data), abs=1e-5)
        assert domain["tuned"]["loss"] == pytest.approx(_hand_loss(models["tuned"], data), abs=1e-5)

    m = result["metrics"]
    assert all(isinstance(v, float) for v in m.values())
    assert m["domain_eval_base_perplexity"] == pytest.approx(math.exp(m["domain_eval_base_loss"]))
    assert m["domain_loss_improvement"] == pytest.approx(
        1 - m["domain_eval_tuned_loss"] / m["domain_eval_base_loss"]
    )
    assert m["forgetting"] == pytest.approx(
        m["general_eval_tuned_perplexity"] / m["general_eval_base_perplexity"] - 1
    )
    assert isinstance(result["verdict"], bool) and len(result["reasons"]) == 2
    assert m["gate_passed"] == float(result["verdict"])
    assert result["base_model_uri"] == str(models["base"]) and result["tuned_model_uri"] == str(
        models["tuned"]
    )

    html = (out / "report.html").read_text()
    assert "domain_eval" in html and "general_eval" in html
    for reason in result["reasons"]:
        assert reason in html
    assert ("PASSED" if result["verdict"] else "FAILED") in html


def test_identical_models_pass_and_a_failed_gate_is_not_an_exception(models, dataset, tmp_path):
    same = evaluate_models(_cfg(), str(models["base"]), str(models["same"]), dataset, tmp_path / "a")
    assert same.verdict is True
    assert same.kfp_metrics()["domain_loss_improvement"] == pytest.approx(0.0, abs=1e-6)
    assert same.kfp_metrics()["forgetting"] == pytest.approx(0.0, abs=1e-6)

    strict = _cfg(min_domain_loss_improvement=0.5)
    failed = evaluate_models(strict, str(models["base"]), str(models["tuned"]), dataset, tmp_path / "b")
    assert failed.verdict is False
    assert failed.checks[0].passed is False and "50.0%" in failed.reasons[0]
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["verdict"] is False


def test_without_general_set_and_with_a_sequence_cap(models, tmp_path):
    manifest = _manifest(tmp_path / "data", general=False)
    result = evaluate_models(
        _cfg(max_eval_sequences=5), str(models["base"]), str(models["same"]), manifest, tmp_path / "out"
    )
    assert set(result.sets) == {"domain_eval"}
    assert result.sets["domain_eval"].sequences == 5
    assert "forgetting" not in result.kfp_metrics() and result.forgetting is None
    assert result.reasons[1] == "no general eval set: forgetting was not measured"
    assert result.verdict is True


def test_one_sequence_gives_no_interval_rather_than_a_certain_looking_one(models, dataset, tmp_path):
    """Every bootstrap resample of a single sequence is that sequence: the interval of a change had
    zero width, and the gate quoted '95% CI of the improvement -0.7% to -0.7%' for one example."""
    out = tmp_path / "out"
    result = evaluate_models(
        _cfg(max_eval_sequences=1), str(models["base"]), str(models["tuned"]), dataset, out
    )
    assert result.sets["domain_eval"].sequences == 1
    assert not any(ci.bounds for ci in result.confidence_intervals.values())
    assert not any("CI" in reason for reason in result.reasons)
    assert not [key for key in result.kfp_metrics() if "_ci_" in key]
    assert "<code>domain_loss_improvement</code>" in (out / "report.html").read_text()
    assert "(no interval)" in (out / "report.html").read_text()


def test_models_and_dataset_on_s3(models, tmp_path, s3):
    manifest = _manifest(tmp_path / "data", general=False)
    for entry in manifest["splits"]["domain_eval"]["files"]:
        uri = f"{s3}/data/{Path(entry['uri']).name}"
        storage.upload_file(entry["uri"], uri)
        entry["uri"] = uri
    storage.write_json(f"{s3}/data/manifest.json", manifest)
    storage.upload_dir(models["base"], f"{s3}/models/base")
    storage.upload_dir(models["tuned"], f"{s3}/models/tuned")
    remote = evaluate_models(
        _cfg(), f"{s3}/models/base", f"{s3}/models/tuned", f"{s3}/data/manifest.json", tmp_path / "s3out"
    )
    local = evaluate_models(_cfg(), str(models["base"]), str(models["tuned"]), manifest, tmp_path / "out")
    assert remote.kfp_metrics() == pytest.approx(local.kfp_metrics())
    assert remote.dataset_manifest == f"{s3}/data/manifest.json"


def test_report_renders_from_an_eval_json_without_the_optional_sections(tmp_path):
    """A version registered before tasks, intervals, bootstrap and scoring were written still renders."""
    from fulltune.evaluate.result import EvalResult

    old = eval_record(
        sets={"domain_eval": loss_set((3.0, 20.09), (3.3, 27.11), sequences=5, loss_tokens=60)},
        checks=[{"name": "domain_gain", "passed": False, "reason": "domain loss rose <b>"}],
    )
    (tmp_path / "eval.json").write_text(json.dumps(old))
    html = render_report(EvalResult.load(str(tmp_path / "eval.json")))
    assert 'class="banner fail"' in html and "FAILED" in html and "&lt;b&gt;" in html
    assert '<td>loss</td><td class="n">3.0000</td><td class="n">3.3000</td><td class="n">+10.0%</td>' in html
    assert "No sequence got worse." in html and "<code>off</code>" in html  # bootstrap
    assert "Multiple-choice" not in html and "Generation tasks" not in html and "% CI " not in html


# -- bootstrap intervals ------------------------------------------------------------------------


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    import numpy as np

    from fulltune.evaluate.stats import bootstrap, ratio_of_sums

    rng = np.random.default_rng(0)
    sums, counts = rng.uniform(10, 20, 200), rng.integers(5, 10, 200)
    stat = ratio_of_sums(sums, counts)
    a = bootstrap(stat, 200, resamples=500, seed=3)
    assert a == bootstrap(stat, 200, resamples=500, seed=3)
    assert a.estimate == pytest.approx(sums.sum() / counts.sum())
    assert a.low < a.estimate < a.high
    assert bootstrap(stat, 200, resamples=500, seed=4) != a
    wider = bootstrap(stat, 200, resamples=500, seed=3, level=0.99)
    assert wider.low <= a.low and wider.high >= a.high
    off = bootstrap(stat, 200, resamples=0, seed=3)
    assert off.estimate == a.estimate and not off.known
    # identical models: the paired interval of the difference collapses to zero
    same = bootstrap(lambda i: stat(i) - stat(i), 200, resamples=100, seed=0)
    assert (same.low, same.high) == (0.0, 0.0)


def test_gate_reasons_quote_the_interval_but_decide_on_the_estimate():
    verdict = _decide(tuned_ppl=12.98, domain_ci=(0.19, 0.235), forgetting_ci=(0.051, 0.096))
    assert verdict.reasons == [
        "domain loss fell 21.4% (3.91 → 3.07, 95% CI of the improvement +19.0% to +23.5%) ≥ 0.0% required",
        "general perplexity rose 7.3% (12.10 → 12.98, 95% CI of the rise +5.1% to +9.6%) > 5.0% allowed",
    ]
    # the interval reaches past the limit, the estimate does not: the estimate decides
    noisy = _decide(forgetting_ci=(-0.02, 0.08), ci_level=0.9)
    assert noisy.passed
    assert noisy.reasons[1] == (
        "general perplexity rose 1.7% (12.10 → 12.30, 90% CI of the rise -2.0% to +8.0%) ≤ 5.0% allowed"
    )


def test_gate_multiple_choice_checks():
    from fulltune.evaluate.gate import MCComparison

    def run(*tasks, allowed=2.0):  # no general set: checks 0 and 1 are the domain loss and forgetting
        return _decide(
            tuned_loss=3.0, base_ppl=None, tuned_ppl=None, mc=list(tasks), max_mc_accuracy_drop=allowed
        )

    ok = run(MCComparison("arc", 0.61, 0.60, (-3.0, 1.0)))
    assert ok.passed
    assert ok.reasons[2] == (
        "arc accuracy fell 1.0 points (61.0% → 60.0%, 95% CI of the change -3.0 to +1.0 points) ≤ 2.0 allowed"
    )
    bad = run(MCComparison("arc", 0.61, 0.60), MCComparison("mmlu", 0.50, 0.45), allowed=2.0)
    assert not bad.passed and [c.passed for c in bad.checks] == [True, True, True, False]
    assert bad.checks[3].name == "mc_mmlu"
    assert bad.reasons[3] == "mmlu accuracy fell 5.0 points (50.0% → 45.0%) > 2.0 allowed"
    assert run(MCComparison("arc", 0.5, 0.55)).reasons[2] == (
        "arc accuracy rose 5.0 points (50.0% → 55.0%): no drop (2.0 allowed)"
    )


def test_per_sequence_losses_add_up_and_sorting_changes_nothing(models, dataset):
    import numpy as np

    data = load_split(dataset, "domain_eval")
    device, dtype = pick_device()
    with load_model(_cfg(), str(models["tuned"]), device, dtype) as model:
        sorted_ = sequence_loss(model, data, batch_size=4)
        plain = sequence_loss(model, data, batch_size=1, sort_by_length=False)
    expected_tokens = (data["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).numpy()
    assert np.array_equal(sorted_.sequence_tokens, expected_tokens)
    assert sorted_.sequence_sums.sum() / sorted_.tokens == pytest.approx(sorted_.loss)
    tol = 1e-5 if device.type == "cpu" else 2e-2
    assert np.allclose(sorted_.sequence_sums, plain.sequence_sums, atol=tol * 10)
    assert sorted_.loss == pytest.approx(plain.loss, abs=tol)


# -- multiple choice ----------------------------------------------------------------------------

MC_QUESTIONS = [
    {"question": "what is the capital city", "choices": ["paris", "rome", "the city of rome"], "answer": 0},
    {"question": "the patient takes metformin", "choices": ["daily", "twice daily"], "answer": 1},
    {"question": "blood sugar is", "choices": ["low", "high", "normal", "a liver"], "answer": 2},
    {"question": "which dose", "choices": ["a low dose of insulin", "no"], "answer": 0},
]


def _write_mc(path: Path, rows=MC_QUESTIONS) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _hand_loglikelihood(model, tok, question: str, choice: str) -> float:
    """Sum of log-softmax over the choice's tokens, one unpadded sequence at a time."""
    import torch

    context = tok(question, add_special_tokens=False)["input_ids"]
    cont = tok(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.bos_token_id, *context, *cont]])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    start = 1 + len(context)
    return sum(float(logp[start - 1 + k, t]) for k, t in enumerate(cont))


def test_mc_loglikelihoods_match_a_hand_computation(models, tmp_path):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fulltune.evaluate import mc

    questions = mc.load_task(_write_mc(tmp_path / "task.jsonl"))
    tok = AutoTokenizer.from_pretrained(models["tuned"])
    model = AutoModelForCausalLM.from_pretrained(models["tuned"], dtype=torch.float32).eval()
    expected = [[_hand_loglikelihood(model, tok, q.question, c) for c in q.choices] for q in questions]
    requests = mc.encode(tok, questions)
    for batch_size in (1, 3, 64):
        got = mc.score(questions, requests, mc.loglikelihoods(model, requests, batch_size=batch_size))
        for want, have in zip(expected, got.loglikelihoods, strict=True):
            np.testing.assert_allclose(have, want, atol=1e-4, rtol=0)
    acc = np.mean([int(np.argmax(e)) == q.answer for e, q in zip(expected, questions, strict=True)])
    acc_norm = np.mean(
        [
            int(np.argmax(np.array(e) / [len(c) for c in q.choices])) == q.answer
            for e, q in zip(expected, questions, strict=True)
        ]
    )
    assert got.acc == pytest.approx(acc) and got.acc_norm == pytest.approx(acc_norm)
    assert got.answer_loglikelihood[1] == pytest.approx(expected[1][1], abs=1e-4)


def test_a_diverged_models_multiple_choice_accuracy_fails_the_gate(tmp_path):
    """argmax over NaN log-likelihoods picks the first choice: a NaN model would "score" the share of
    answers that are choice 0. It scores NaN instead, and the gate fails the task."""
    import numpy as np

    from fulltune.evaluate import mc
    from fulltune.evaluate.gate import MCComparison

    questions = mc.load_task(_write_mc(tmp_path / "task.jsonl"))
    requests = [
        mc.Request(q, c, (1, 2), 1)
        for q, question in enumerate(questions)
        for c in range(len(question.choices))
    ]
    values = np.full(len(requests), np.nan)
    diverged = mc.score(questions, requests, values)
    assert math.isnan(diverged.acc) and math.isnan(diverged.acc_norm)
    values[:] = -1.0
    values[-1] = np.inf  # one question's choice overflowed: that question alone is NaN
    assert np.isnan(mc.score(questions, requests, values).correct).sum() == 1
    verdict = _decide(
        tuned_loss=3.0, base_ppl=None, tuned_ppl=None, mc=[MCComparison("arc", 0.6, diverged.acc)]
    )
    assert not verdict.passed
    assert verdict.reasons[2].startswith("arc accuracy is not a finite number")


def test_mc_task_errors_name_the_line(tmp_path):
    from fulltune.evaluate.mc import MCTaskError, load_task

    bad = _write_mc(
        tmp_path / "bad.jsonl", [MC_QUESTIONS[0], {"question": "q", "choices": ["a", "b"], "answer": 2}]
    )
    with pytest.raises(MCTaskError, match="line 2: 'answer'"):
        load_task(bad)
    assert len(load_task(_write_mc(tmp_path / "ok.jsonl"), limit=2)) == 2


def test_a_capped_task_is_spread_over_the_whole_file(tmp_path):
    """max_eval_sequences caps a task file as it caps the loss sets, evenly over the whole file: a
    file sorted by subject capped to its first lines would be scored on its first subject only."""
    from fulltune.evaluate import generation, mc

    rows = [{"question": f"q{i}", "choices": ["a", "b"], "answer": 0} for i in range(20)]
    assert [q.question for q in mc.load_task(_write_mc(tmp_path / "mc.jsonl", rows), limit=4)] == [
        "q0",
        "q6",
        "q13",
        "q19",
    ]
    prompts = tmp_path / "qa.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": "a"}) + "\n" for i in range(9)))
    assert [e.prompt for e in generation.load_task(str(prompts), limit=3)] == ["p0", "p4", "p8"]
    rows[-1]["answer"] = 5  # past the cap, still checked
    with pytest.raises(mc.MCTaskError, match="line 20: 'answer'"):
        mc.load_task(_write_mc(tmp_path / "bad.jsonl", rows), limit=4)


def test_task_lines_end_at_newline_only(tmp_path):
    """JSON may hold U+2028, NEL (U+0085) and form feed unescaped (json.dumps(ensure_ascii=False)
    does): such a line is one question, not two halves refused as "not JSON"."""
    from fulltune.evaluate import generation, mc

    odd = {"question": "first\u2028second\x85third\x0cfourth", "choices": ["a", "b"], "answer": 1}
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(odd, ensure_ascii=False) + "\r\n\n" + json.dumps(MC_QUESTIONS[0]) + "\n")
    questions = mc.load_task(str(path))
    assert [q.question for q in questions] == [odd["question"], MC_QUESTIONS[0]["question"]]
    prompt = tmp_path / "prompt.jsonl"
    prompt.write_text(json.dumps({"prompt": "x\u2028y", "answer": "z"}, ensure_ascii=False) + "\n")
    assert generation.load_task(str(prompt))[0].prompt == "x\u2028y"


def test_task_errors_found_while_encoding_name_the_file_and_line(tmp_path):
    """What only the tokenizer and context can tell (an empty question or prompt without a BOS token,
    a choice longer than the model's context) is named by file and line like every other bad line."""
    from fulltune.evaluate import generation
    from fulltune.evaluate.mc import MCTaskError
    from tiny_models import word_tokenizer

    no_bos = word_tokenizer()
    no_bos.bos_token = None
    model = str(save_tiny_llama(tmp_path / "no-bos", tokenizer=no_bos))
    manifest = _manifest(tmp_path / "data", general=False)
    empty = {"question": "", "choices": ["yes", "no"], "answer": 0}
    long = {"question": "which dose", "choices": ["no", " ".join(["daily"] * 80)], "answer": 0}
    for row, message in ((empty, "an empty question needs"), (long, "choice 1: the choice is longer")):
        task = _write_mc(tmp_path / "mc.jsonl", [MC_QUESTIONS[0], row])
        cfg = _cfg(mc_tasks=[{"name": "toy", "uri": task}])
        with pytest.raises(MCTaskError, match=re.escape(f"{task} line 2") + ".*" + message):
            evaluate_models(cfg, model, model, manifest, tmp_path / "out")
    prompts = tmp_path / "qa.jsonl"
    prompts.write_text('{"prompt": "the", "answer": "a"}\n\n{"prompt": "", "answer": "a"}\n')
    cfg = _cfg(generation_tasks=[{"name": "qa", "uri": str(prompts)}])
    with pytest.raises(generation.GenerationTaskError, match=re.escape(f"{prompts} line 3: an empty prompt")):
        evaluate_models(cfg, model, model, manifest, tmp_path / "out")


def test_evaluate_models_with_mc_tasks_and_intervals(models, dataset, tmp_path):
    task = _write_mc(tmp_path / "task.jsonl", MC_QUESTIONS * 3)
    cfg = _cfg(mc_tasks=[{"name": "toy", "uri": task}], bootstrap_resamples=200)
    out = tmp_path / "out"
    result = evaluate_models(cfg, str(models["base"]), str(models["tuned"]), dataset, out).to_json()
    m = result["metrics"]
    assert all(isinstance(v, float) for v in m.values())
    for key in ("mc_toy_base_acc", "mc_toy_tuned_acc", "mc_toy_base_acc_norm", "mc_toy_tuned_acc_norm"):
        assert 0.0 <= m[key] <= 1.0
    assert m["mc_toy_acc_change"] == pytest.approx((m["mc_toy_tuned_acc"] - m["mc_toy_base_acc"]) * 100)
    for key in ("domain_loss_improvement", "forgetting", "domain_loss_change", "general_perplexity_change"):
        assert m[f"{key}_ci_low"] <= m[key] + 1e-9 and m[key] - 1e-9 <= m[f"{key}_ci_high"], key
    assert m["mc_toy_acc_change_ci_low"] <= m["mc_toy_acc_change"] <= m["mc_toy_acc_change_ci_high"]
    assert m["general_perplexity_change"] == pytest.approx(
        m["general_eval_tuned_perplexity"] - m["general_eval_base_perplexity"]
    )
    assert len(result["reasons"]) == 3 and result["checks"][2]["name"] == "mc_toy"
    assert "95% CI of the rise" in result["reasons"][1]
    assert result["mc"]["toy"]["questions"] == 12

    worst = result["sets"]["domain_eval"]["worst_regressions"]
    assert 0 < len(worst) <= 10
    assert [w["change"] for w in worst] == sorted((w["change"] for w in worst), reverse=True)
    assert all(w["tuned_loss"] - w["base_loss"] == pytest.approx(w["change"]) for w in worst)

    html = (out / "report.html").read_text()
    # one base-vs-tuned chart (inline SVG) per eval set and per task
    charts = re.findall(r'<svg class="chart"[^>]* role="img"[^>]*><title>([^<]*)</title>', html)
    assert charts == [
        "domain_eval: base vs tuned",
        "general_eval: base vs tuned",
        "toy: base vs tuned",
    ]
    assert "Multiple-choice tasks" in html and "toy" in html
    for reason in result["reasons"]:
        assert escape(reason) in html
    if result["mc"]["toy"]["worst_regressions"]:
        assert escape(result["mc"]["toy"]["worst_regressions"][0]["question"]) in html

    again = evaluate_models(cfg, str(models["base"]), str(models["tuned"]), dataset, tmp_path / "again")
    assert again.kfp_metrics() == result["metrics"]  # seeded


def test_mc_gate_fails_on_an_accuracy_drop(models, dataset, tmp_path):
    task = _write_mc(tmp_path / "task.jsonl", MC_QUESTIONS * 3)
    cfg = _cfg(mc_tasks=[{"name": "toy", "uri": task}], max_mc_accuracy_drop=0.0)
    same = evaluate_models(cfg, str(models["base"]), str(models["same"]), dataset, tmp_path / "a")
    assert same.verdict is True and same.kfp_metrics()["mc_toy_acc_change"] == 0.0
    assert "no drop" in same.reasons[2]


def test_mc_tokenizer_falls_back_to_the_runs_tokenizer(models, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(models["same"] / name, bare / name)
    manifest = _manifest(tmp_path / "data", general=False)
    task = _write_mc(tmp_path / "task.jsonl")
    evaluation = {"per_device_eval_batch_size": 3, "mc_tasks": [{"name": "toy", "uri": task}]}
    cfg = RunConfig.from_dict({"model": {"tokenizer_uri": str(models["base"])}, "evaluation": evaluation})
    result = evaluate_models(cfg, str(models["base"]), str(bare), manifest, tmp_path / "out")
    assert result.kfp_metrics()["mc_toy_acc_change"] == 0.0
    no_fallback = RunConfig.from_dict({"model": {"tokenizer_uri": str(bare)}, "evaluation": evaluation})
    with pytest.raises(EvaluateError, match="no tokenizer"):
        evaluate_models(no_fallback, str(models["base"]), str(bare), manifest, tmp_path / "out2")
