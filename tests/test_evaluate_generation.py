"""evaluate: exact-match generation tasks, one pass over the data for both models, device_map
fallback, the SVG charts of the report and the optional lm-eval backend.

The generation tests run on the demo's tiny pre-trained model (`demo_assets`): its greedy
continuations are real text, so batching, left padding, EOS and stop strings all matter.
"""

from __future__ import annotations

import json
import logging
import re
import xml.etree.ElementTree as ET
from html import escape
from pathlib import Path

import numpy as np
import pytest

from fulltune import storage
from fulltune.config import RunConfig
from fulltune.evaluate import generation as gen
from fulltune.evaluate.core import evaluate_models
from fulltune.evaluate.eval_page import render_report
from fulltune.evaluate.gate import EMComparison, decide
from fulltune.preprocess.dataset import IGNORE_INDEX, MANIFEST_FORMAT
from tiny_models import perturb_weights

PROMPTS = [
    "Return the",
    "The patient",
    "This function returns a list of",
    "If the value is",
    "Open the file and",
    "Note:",
    "Raise ValueError if",
    "the",
    "A",
    "Return True if the object is an instance of",
    "Create a new",
    "The default is",
]
MAX_NEW = 10
STOP = [",", "."]


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_models(demo_assets, tmp_path_factory) -> dict[str, Path]:
    """The demo base model and a 'tuned' copy whose weights carry seeded noise."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("demo-models")
    tuned = root / "tuned"
    model = AutoModelForCausalLM.from_pretrained(demo_assets.base_model_dir, dtype=torch.float32)
    perturb_weights(model, seed=7, scale=0.35, relative=True)
    model.save_pretrained(tuned, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (demo_assets.base_model_dir / name).exists():
            shutil.copy(demo_assets.base_model_dir / name, tuned / name)
    return {"base": demo_assets.base_model_dir, "tuned": tuned}


def _reference_outputs(model_dir: Path, prompts=PROMPTS, stop=STOP) -> list[str]:
    """One prompt at a time, no padding: BOS + prompt, model.generate greedy, decode, cut at the stop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([[tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            generated = model.generate(
                ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id
            )
        text = tok.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s in text]
        out.append(text[: min(cuts)] if cuts else text)
    return out


@pytest.fixture(scope="module")
def references(demo_models) -> dict[str, list[str]]:
    return {role: _reference_outputs(path) for role, path in demo_models.items()}


def _write_task(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _task_rows(base_refs: list[str]) -> tuple[list[dict], list[int]]:
    """Even prompts accept the base model's own answer (with untidy whitespace), odd ones a wrong one."""
    rows, right = [], []
    for i, (prompt, ref) in enumerate(zip(PROMPTS, base_refs, strict=True)):
        if i % 2 == 0 and ref.strip():
            rows.append({"prompt": prompt, "answer": ["zzz", "  " + ref.strip().replace(" ", "  ") + "\n"]})
            right.append(i)
        else:
            rows.append({"prompt": prompt, "answer": "no such answer"})
    return rows, right


def _manifest(root: Path, *, rows: int = 10, seq_len: int = 24) -> dict:
    """A domain_eval and a general_eval split like preprocess writes: masked prompt, right padding."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    splits = {}
    for split in ("domain_eval", "general_eval"):
        ids_, labels_, masks_ = [], [], []
        for _ in range(rows):
            length = int(rng.integers(seq_len // 2, seq_len + 1))
            ids = rng.integers(10, 4000, size=seq_len)
            ids[length:] = 1
            lab = ids.copy()
            lab[: length // 3] = IGNORE_INDEX
            lab[length:] = IGNORE_INDEX
            mask = (np.arange(seq_len) < length).astype(np.int8)
            ids_.append(ids.tolist())
            labels_.append(lab.tolist())
            masks_.append(mask.tolist())
        path = root / split / "part-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table(
                {
                    "input_ids": pa.array(ids_, type=pa.list_(pa.int32())),
                    "labels": pa.array(labels_, type=pa.list_(pa.int32())),
                    "attention_mask": pa.array(masks_, type=pa.list_(pa.int8())),
                }
            ),
            path,
        )
        entry = {
            "uri": str(path),
            "sequences": rows,
            "sha256": storage.sha256_file(path),
            "size": path.stat().st_size,
        }
        splits[split] = {
            "sequences": rows,
            "tokens": int(sum(map(sum, masks_))),
            "loss_tokens": int(sum(sum(x != IGNORE_INDEX for x in lab) for lab in labels_)),
            "files": [entry],
        }
    return {"format": MANIFEST_FORMAT, "max_seq_len": seq_len, "pad_token_id": 1, "splits": splits}


def _cfg(task_uri: str, **evaluation) -> RunConfig:
    return RunConfig.from_dict(
        {
            "evaluation": {
                "per_device_eval_batch_size": 3,
                "bootstrap_resamples": 200,
                "generation_tasks": [
                    {"name": "qa", "uri": task_uri, "max_new_tokens": MAX_NEW, "stop": STOP}
                ],
                **evaluation,
            }
        }
    )


# -- scoring ------------------------------------------------------------------------------------


def test_batched_greedy_generation_matches_one_prompt_at_a_time(demo_models, references, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_refs = references["base"]
    assert len(set(base_refs)) > 3, base_refs  # the prompts give varied continuations
    rows, right = _task_rows(base_refs)
    assert len(right) >= 3
    examples = gen.load_task(_write_task(tmp_path / "qa.jsonl", rows))
    tok = AutoTokenizer.from_pretrained(demo_models["base"])
    model = AutoModelForCausalLM.from_pretrained(demo_models["base"], dtype=torch.float32).eval()
    for batch_size in (1, 5, 64):  # several batches with left padding, one batch
        got = gen.evaluate_task(
            model, tok, examples, batch_size=batch_size, max_new_tokens=MAX_NEW, stop=STOP
        )
        assert got.outputs == base_refs, batch_size
        assert np.flatnonzero(got.correct).tolist() == right
        assert got.em == pytest.approx(len(right) / len(PROMPTS))


def test_the_models_own_generation_settings_do_not_change_greedy_decoding(demo_models, references, tmp_path):
    """generate() takes every setting not passed to it from the model's generation_config.json, where
    models ship a repetition penalty (Qwen2.5-Instruct) and the like: the "greedy" continuation then
    was not greedy, and base and tuned saved with different files were decoded differently."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tweaked = tmp_path / "tweaked"
    shutil.copytree(demo_models["base"], tweaked)
    settings = json.loads((tweaked / "generation_config.json").read_text())
    settings.update(repetition_penalty=3.0, no_repeat_ngram_size=2, min_new_tokens=4)
    (tweaked / "generation_config.json").write_text(json.dumps(settings))
    model = AutoModelForCausalLM.from_pretrained(tweaked, dtype=torch.float32).eval()
    examples = [gen.Example(prompt, ("x",)) for prompt in PROMPTS]
    got = gen.evaluate_task(
        model,
        AutoTokenizer.from_pretrained(tweaked),
        examples,
        batch_size=5,
        max_new_tokens=MAX_NEW,
        stop=STOP,
    )
    assert got.outputs == references["base"]
    assert model.generation_config.repetition_penalty == 3.0  # the model's own settings are given back


def test_normalisation_and_stop_strings():
    assert gen.normalize("  Paris\t is \n nice ") == "Paris is nice"
    assert gen.cut_at_stop("Paris. Rome,\nx", [",", "\n", "."]) == "Paris"
    assert gen.cut_at_stop("Paris", ["", "\n"]) == "Paris"
    assert gen.is_correct(" paris ", ["Paris"]) is False  # case counts
    assert gen.is_correct("the  city of\nRome", ["Rome", "the city of Rome"]) is True


def test_generation_task_errors_name_the_file_and_line(tmp_path):
    good = {"prompt": "q", "answer": "a"}
    cases = {
        "not JSON": "{oops",
        "'prompt' must be a string": json.dumps({"prompt": 3, "answer": "a"}),
        "'answer' must be a string or a non-empty list": json.dumps({"prompt": "q", "answer": []}),
        "empty after normalisation": json.dumps({"prompt": "q", "answer": "  \n"}),
        # one blank accepted answer would mark an empty continuation right
        "is empty after normalisation": json.dumps({"prompt": "q", "answer": ["Paris", " "]}),
    }
    for message, line in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + line + "\n")
        with pytest.raises(
            gen.GenerationTaskError, match=re.escape(f"{path} line 3: ") + ".*" + re.escape(message)
        ):
            gen.load_task(str(path))
    assert len(gen.load_task(_write_task(tmp_path / "ok.jsonl", [good] * 5), limit=2)) == 2


def test_gate_exact_match_checks():
    def run(*tasks, allowed=2.0):
        return decide(
            base_domain_loss=3.9,
            tuned_domain_loss=3.0,
            base_general_ppl=None,
            tuned_general_ppl=None,
            min_domain_loss_improvement=0.0,
            max_general_ppl_increase=0.05,
            generation=list(tasks),
            max_exact_match_drop=allowed,
        )

    ok = run(EMComparison("qa", 0.50, 0.49, (-4.0, 2.0)))
    assert ok.passed and ok.checks[2].name == "gen_qa"
    assert ok.reasons[2] == (
        "qa exact match fell 1.0 points (50.0% → 49.0%, 95% CI of the change -4.0 to +2.0 points) ≤ 2.0 allowed"
    )
    bad = run(EMComparison("qa", 0.50, 0.49), EMComparison("math", 0.30, 0.20, (-15.0, -5.0)), allowed=2.0)
    assert not bad.passed and [c.passed for c in bad.checks] == [True, True, True, False]
    assert bad.reasons[3] == (
        "math exact match fell 10.0 points (30.0% → 20.0%, 95% CI of the change -15.0 to -5.0 points) > 2.0 allowed"
    )
    assert run(EMComparison("qa", 0.2, 0.3)).reasons[2] == (
        "qa exact match rose 10.0 points (20.0% → 30.0%): no drop (2.0 allowed)"
    )
    assert not run(EMComparison("qa", 0.2, float("nan"))).passed


# -- evaluate_models ----------------------------------------------------------------------------


def test_evaluate_models_scores_exact_match_and_gates_on_it(demo_models, references, tmp_path):
    rows, right = _task_rows(references["base"])
    task = _write_task(tmp_path / "qa.jsonl", rows)
    manifest = _manifest(tmp_path / "data")
    cfg = _cfg(
        task, max_exact_match_drop=0.0, max_general_ppl_increase=100.0, min_domain_loss_improvement=-100.0
    )
    out = tmp_path / "out"
    result = evaluate_models(
        cfg, str(demo_models["base"]), str(demo_models["tuned"]), manifest, out
    ).to_json()

    tuned_right = [
        i for i in right if gen.normalize(references["tuned"][i]) == gen.normalize(references["base"][i])
    ]
    assert len(tuned_right) < len(right), "the noisy copy should lose some answers"
    m = result["metrics"]
    assert m["gen_qa_base_em"] == pytest.approx(len(right) / len(PROMPTS))
    assert m["gen_qa_tuned_em"] == pytest.approx(len(tuned_right) / len(PROMPTS))
    change = (len(tuned_right) - len(right)) / len(PROMPTS) * 100
    assert m["gen_qa_em_change"] == pytest.approx(change)
    assert m["gen_qa_em_change_ci_low"] <= change <= m["gen_qa_em_change_ci_high"]

    check = result["checks"][2]
    assert check["name"] == "gen_qa" and check["passed"] is False and result["verdict"] is False
    assert check["reason"].startswith(f"qa exact match fell {-change:.1f} points (")
    assert "95% CI of the change" in check["reason"] and check["reason"].endswith("> 0.0 allowed")

    entry = result["generation"]["qa"]
    lost = [i for i in right if i not in tuned_right]
    assert [w["index"] for w in entry["worst_regressions"]] == lost
    first = entry["worst_regressions"][0]
    assert first["base_output"] == references["base"][lost[0]]
    assert first["tuned_output"] == references["tuned"][lost[0]]

    html = (out / "report.html").read_text()
    assert "Generation tasks (exact match)" in html and escape(check["reason"]) in html
    assert escape(PROMPTS[lost[0]]) in html
    assert "<title>qa: base vs tuned</title>" in html  # the task's chart
    assert json.loads((out / "eval.json").read_text())["generation"]["qa"][
        "em_change_points"
    ] == pytest.approx(change)


def test_one_pass_gives_the_same_numbers_with_both_models_loaded_or_one_at_a_time(
    demo_models, references, tmp_path, caplog
):
    rows, _ = _task_rows(references["base"])
    task = _write_task(tmp_path / "qa.jsonl", rows)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"question": q, "choices": ["the file", "a list", "None"], "answer": i % 3}) + "\n"
            for i, q in enumerate(PROMPTS)
        )
    )
    manifest = _manifest(tmp_path / "data")
    cfg = _cfg(task, mc_tasks=[{"name": "toy", "uri": str(mc)}])
    base, tuned = str(demo_models["base"]), str(demo_models["tuned"])
    with caplog.at_level(logging.INFO, logger="fulltune.evaluate.core"):
        together = evaluate_models(cfg, base, tuned, manifest, tmp_path / "a", models_together=True)
        apart = evaluate_models(cfg, base, tuned, manifest, tmp_path / "b", models_together=False)
    assert together.kfp_metrics() == apart.kfp_metrics()  # exactly: same operations, same order
    assert together.generation == apart.generation and together.sets == apart.sets
    assert together.scoring.models_together is True and apart.scoring.models_together is False
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("scoring base and tuned together, one pass") for m in messages)
    assert any(m.startswith("scoring one model at a time over batches prepared once") for m in messages)
    # left to itself, two tiny models fit together
    auto = evaluate_models(cfg, base, tuned, manifest, tmp_path / "c")
    assert auto.scoring.models_together is True and auto.kfp_metrics() == together.kfp_metrics()


def test_device_map_auto_falls_back_to_single_on_cpu(demo_models, references, tmp_path, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    rows, _ = _task_rows(references["base"])
    task = _write_task(tmp_path / "qa.jsonl", rows)
    manifest = _manifest(tmp_path / "data")
    base, tuned = str(demo_models["base"]), str(demo_models["tuned"])
    single = evaluate_models(_cfg(task), base, tuned, manifest, tmp_path / "a")
    with caplog.at_level(logging.INFO, logger="fulltune.evaluate.core"):
        auto = evaluate_models(_cfg(task, device_map="auto"), base, tuned, manifest, tmp_path / "b")
    assert any(
        "device_map is 'auto' but no CUDA GPU is visible: falling back to 'single'" in r.getMessage()
        for r in caplog.records
    )
    assert auto.scoring.device_map == "single"
    assert auto.kfp_metrics() == single.kfp_metrics()


def test_a_bad_task_file_fails_before_any_model_is_loaded(tmp_path):
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"prompt": "q", "answer": "a"}\n{"prompt": "q"}\n')
    manifest = _manifest(tmp_path / "data")
    with pytest.raises(gen.GenerationTaskError, match=re.escape(f"{bad} line 2: 'answer'")):
        evaluate_models(_cfg(str(bad)), "/nonexistent/base", "/nonexistent/tuned", manifest, tmp_path / "out")


def test_an_answer_holding_a_stop_string_is_refused_before_any_model_is_loaded(tmp_path):
    """The continuation is cut before the first stop string: with stop [",", "."] an accepted
    "3.14" could never be matched, and every model would score 0 on it without a word."""
    task = tmp_path / "qa.jsonl"
    task.write_text('{"prompt": "e?", "answer": "2"}\n{"prompt": "pi?", "answer": ["3", "3.14"]}\n')
    manifest = _manifest(tmp_path / "data")
    message = re.escape(f"{task} line 2: accepted answer '3.14' contains the stop string '.'")
    with pytest.raises(gen.GenerationTaskError, match=message):
        evaluate_models(
            _cfg(str(task)), "/nonexistent/base", "/nonexistent/tuned", manifest, tmp_path / "out"
        )
    # whitespace stop strings never survive normalisation: a default "\n" stop refuses nothing
    assert gen.load_task(str(task), stop=["\n"])[1].answers == ("3", "3.14")


# -- report -------------------------------------------------------------------------------------


def _charts(html: str) -> list[ET.Element]:
    return [ET.fromstring(svg) for svg in re.findall(r"<svg\b.*?</svg>", html, flags=re.S)]


def _bars(chart: ET.Element) -> list[tuple[str, str]]:
    """(series, tooltip) of each bar drawn."""
    ns = "{http://www.w3.org/2000/svg}"
    return [
        (r.get("data-series"), r.find(f"{ns}title").text)
        for r in chart.iter(f"{ns}rect")
        if r.get("class") == "bar"
    ]


def test_report_draws_an_svg_bar_chart_per_section():
    from fulltune.evaluate.result import (
        EMFigures,
        EvalResult,
        GenerationRegression,
        GenerationSection,
        LMEvalRow,
        LossFigures,
        LossSetSection,
    )

    sample = EvalResult.load(str(Path(__file__).parent / "data" / "eval_v1.json"))
    result = sample.model_copy(
        update={
            "sets": {
                "domain_eval": LossSetSection(
                    sequences=5,
                    loss_tokens=60,
                    base=LossFigures(loss=3.2, perplexity=24.5),
                    tuned=LossFigures(loss=2.9, perplexity=18.2),
                ),
                # a tuned model that diverged: no number to draw
                "general_eval": LossSetSection(
                    sequences=5,
                    loss_tokens=60,
                    base=LossFigures(loss=2.5, perplexity=12.18),
                    tuned=LossFigures(loss=float("nan"), perplexity=float("nan")),
                ),
            },
            "mc": {},
            "confidence_intervals": {},  # the sample's would not match these numbers
            "generation": {
                "qa": GenerationSection(
                    examples=4,
                    max_new_tokens=8,
                    stop=["\n"],
                    base=EMFigures(em=0.5),
                    tuned=EMFigures(em=0.25),
                    em_change_points=-25.0,
                    worst_regressions=[
                        GenerationRegression(
                            index=2, prompt="<q>", answers=["a"], base_output="a", tuned_output="b"
                        )
                    ],
                )
            },
            "lm_eval": {"arc_easy": {"acc": LMEvalRow(base=0.41, tuned=0.45, change=0.04)}},
        }
    )
    html = render_report(result)
    assert "<img" not in html  # no embedded pictures: the charts are inline SVG
    charts = _charts(html)
    assert [c.find("{http://www.w3.org/2000/svg}title").text for c in charts] == [
        "domain_eval: base vs tuned",
        "general_eval: base vs tuned",
        "qa: base vs tuned",
        "arc_easy: base vs tuned",
    ]
    assert all(c.get("role") == "img" for c in charts)
    # one panel per metric, a base and a tuned bar in each, labelled with their values
    assert _bars(charts[0]) == [
        ("base", "base loss: 3.2"),
        ("tuned", "tuned loss: 2.9"),
        ("base", "base perplexity: 24.5"),
        ("tuned", "tuned perplexity: 18.2"),
    ]
    # a tuned value that is not a number draws no tuned bar
    assert _bars(charts[1]) == [("base", "base loss: 2.5"), ("base", "base perplexity: 12.18")]
    # exact match is a rate: shown as a percentage
    assert _bars(charts[2]) == [("base", "base exact match: 50.0%"), ("tuned", "tuned exact match: 25.0%")]
    assert "exact match: base 50.0%, tuned 25.0%" in charts[2].get("aria-label")
    assert _bars(charts[3]) == [("base", "base acc: 0.41"), ("tuned", "tuned acc: 0.45")]
    assert "&lt;q&gt;" in html and "reported, not gated" in html


def test_the_page_counts_every_regressed_prompt_not_only_those_it_lists():
    """eval.json lists the first 10 prompts the tuned model got wrong; the page said "10 prompts
    answered right by the base model and wrong by the tuned one" when 25 were."""
    from fulltune.config import GenerationTask
    from fulltune.evaluate.result import BootstrapSettings, EvalResult
    from fulltune.evaluate.tasks import Pair, Shared

    examples = [gen.Example(f"q{i}", ("right",)) for i in range(30)]
    task = gen.ExactMatchTask("qa", GenerationTask(name="qa", uri="qa.jsonl"), examples, Shared({}))
    scores = Pair(gen.score(examples, ["right"] * 30), gen.score(examples, ["wrong"] * 25 + ["right"] * 5))
    section = task.section(scores, task.intervals(scores, BootstrapSettings(resamples=0, seed=0, level=0.95)))
    assert section.regressions == 25 and len(section.worst_regressions) == gen.WORST
    sample = EvalResult.load(str(Path(__file__).parent / "data" / "eval_v1.json"))
    html = render_report(sample.model_copy(update={"generation": {"qa": section}}))
    assert "25 prompts answered right by the base model and wrong by the tuned one; the first 10:" in html
    older = section.model_copy(update={"regressions": None})  # an eval.json written before the count
    html = render_report(sample.model_copy(update={"generation": {"qa": older}}))
    assert "wrong by the tuned one (the first 10):" in html


# -- lm-eval ------------------------------------------------------------------------------------


def test_configured_lm_eval_without_the_package_fails_fast_with_the_fix(tmp_path):
    from fulltune.evaluate.lm_eval_backend import LMEvalMissingError, available

    if available():
        pytest.skip("lm-eval is installed here")
    cfg = RunConfig.from_dict({"evaluation": {"lm_eval_tasks": ["hellaswag"]}})
    with pytest.raises(
        LMEvalMissingError,
        match=r"lm_eval_tasks is set \(\['hellaswag'\]\).*pip install 'fulltune\[lm-eval\]' or lm-eval",
    ):
        # nothing is read or loaded first: the URIs and the manifest do not exist
        evaluate_models(
            cfg, "/nonexistent/base", "/nonexistent/tuned", "/nonexistent/manifest.json", tmp_path
        )
    assert not (tmp_path / "eval.json").exists()


def test_lm_eval_results_merge_into_reported_rows():
    from fulltune.evaluate.lm_eval_backend import flat_metrics, merge

    # the shape of simple_evaluate(...)["results"] (lm-eval 0.4)
    base = {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.40, "acc_stderr,none": 0.01, "acc_norm,none": 0.38},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.10, "exact_match,flexible-extract": 0.12},
        "other": {"acc,none": 0.9},
    }
    tuned = {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.45, "acc_stderr,none": 0.01, "acc_norm,none": "N/A"},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.05, "exact_match,flexible-extract": 0.08},
        "other": {"acc,none": 0.8},
    }
    merged = merge({"base": base, "tuned": tuned}, ["arc_easy", "gsm8k"])
    assert merged == {
        "arc_easy": {"acc": {"base": 0.40, "tuned": 0.45, "change": pytest.approx(0.05)}},
        "gsm8k": {
            "exact_match_strict-match": {"base": 0.10, "tuned": 0.05, "change": pytest.approx(-0.05)},
            "exact_match_flexible-extract": {"base": 0.12, "tuned": 0.08, "change": pytest.approx(-0.04)},
        },
    }
    flat = flat_metrics(merged)
    assert flat["lm_eval_arc_easy_acc_tuned"] == 0.45
    assert flat["lm_eval_gsm8k_exact_match_strict_match_change"] == pytest.approx(-0.05)
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", key) for key in flat)
    assert merge({}) == {}
