"""The train step's page and Metrics: what a user reads after paying for the run, built from hand-made
step records (no training)."""

from __future__ import annotations

import html
import math
import re
import xml.etree.ElementTree as ET

import pytest

from fulltune.train.metrics import StepRecord, TrainingSummary, training_metrics
from fulltune.train.train_page import (
    duration,
    short_count,
    smooth,
    smoothing_weight,
    training_report_html,
)

SVG = "{http://www.w3.org/2000/svg}"


def _records(n: int = 20, *, every: int = 5, general: bool = True, gpu: bool = True) -> list[StepRecord]:
    """n steps of falling loss; every `every`-th step evaluates (0: none), with the general loss and
    forgetting when `general`; MFU and memory when `gpu`."""
    out = []
    for s in range(n):
        evaluates = every and s % every == every - 1
        out.append(
            StepRecord(
                step=s,
                loss=3.0 - s / 20,
                lr=2e-5,
                grad_norm=None if s == 0 else 1.0 + s / 100,
                tokens=1000,
                tokens_per_s=500.0 if s % 2 else 1500.0,
                step_time_s=2.0 if s % 2 else 1.0,
                gpu_mem_reserved_gib=60.0 + s / 10 if gpu else None,
                mfu=0.4 if gpu else None,
                eval_loss=2.9 - s / 25 if evaluates else None,
                general_eval_loss=2.5 + s / 100 if evaluates and general else None,
                forgetting=s / 200 if evaluates and general else None,
            )
        )
    return out


def _summary(**fields) -> TrainingSummary:
    base = dict(
        steps=20,
        planned_steps=20,
        stopped_early=False,
        global_batch=64,
        world_size=8,
        first_loss=3.0,
        final_loss=2.05,
        train_seconds=4500.0,
        tokens=1_234_567,
        device="cuda",
    )
    return TrainingSummary(**(base | fields))


def _evaluated(**fields) -> TrainingSummary:
    figures = dict(final_eval_loss=2.14, best_eval_loss=2.14, best_eval_step=20)
    figures |= dict(base_general_loss=2.5, final_forgetting=0.095, max_forgetting=0.1)
    return _summary(**(figures | fields))


def _text(page: str) -> str:
    """The page as a reader sees it: no charts, no tags, entities decoded, spaces collapsed."""
    page = re.sub(r"<svg.*?</svg>", " ", page, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def _charts(page: str) -> dict[str, ET.Element]:
    charts = [ET.fromstring(s) for s in re.findall(r"<svg.*?</svg>", page, flags=re.S)]
    return {c.find(f"{SVG}title").text: c for c in charts}


def _labels(chart: ET.Element, cls: str) -> list[str]:
    return [t.text or "" for t in chart.iter(f"{SVG}text") if t.get("class") == cls]


def test_summary_says_in_sentences_what_the_run_did():
    text = _text(training_report_html(_records(), _evaluated()))
    assert "Trained all 20 planned optimizer steps on 1.23M loss tokens." in text
    # 4500 s on 8 GPUs: 10 GPU-hours
    assert "Wall time 1 h 15 min: 10 GPU-hours." in text
    assert "Global batch of 64 sequences per step, over 8 GPUs." in text
    assert "Training loss 3.0000 at the first step, 2.0500 at the last." in text
    assert (
        "Eval loss (domain_eval split) 2.1400 at the last evaluation (step 20); best 2.1400 at step 20."
        in text
    )
    assert "Forgetting 9.5% at step 20 (the saved model's step), within the gate's budget of 10.0%" in text
    # time-weighted over the run: (1500·1 + 500·2) tokens/s·s over 3 s per pair of steps
    assert (
        "Throughput 833.3 loss tokens/s over the run; MFU 40.0%; peak GPU memory reserved 61.9 GiB." in text
    )
    assert "final_loss" not in text and "global_batch" not in text  # words, not raw keys
    assert 'class="banner' not in training_report_html(_records(), _evaluated())


def test_a_cpu_run_counts_process_hours_and_says_nothing_of_gpus():
    summary = _summary(device="cpu", world_size=2, train_seconds=12.0, tokens=0)
    text = _text(training_report_html(_records(gpu=False, every=0), summary))
    assert "Wall time 12 s: 0.00667 CPU process-hours." in text
    assert "over 2 CPU processes" in text and "GPU" not in text
    # a summary from before tokens were counted: the records (1000 per step) still know
    assert "on 20k loss tokens" in text
    assert "MFU" not in text


def test_charts_carry_titles_axis_titles_and_x_counted_from_one():
    charts = _charts(training_report_html(_records(), _evaluated()))
    assert list(charts) == [
        "Loss per optimizer step",
        "Forgetting per evaluation",
        "Learning rate",
        "Gradient norm",
        "Throughput",
        "Model FLOPs utilisation",
    ]
    for chart in charts.values():
        assert _labels(chart, "axis-title x") == ["optimizer step"]
    assert _labels(charts["Loss per optimizer step"], "legend") == [
        "train loss",
        "smoothed",
        "eval loss",
        "general eval loss",
    ]
    loss = charts["Loss per optimizer step"]
    assert _labels(loss, "axis-title y") == ["loss"]
    assert "train loss: 20 points, optimizer step 1 to 20" in loss.get("aria-label")
    # the learning rate reads as 2 ×10⁻⁵, not 0.00002000
    assert _labels(charts["Learning rate"], "axis-title y") == ["learning rate (×10⁻⁵)"]
    assert "2.0" in _labels(charts["Learning rate"], "tick y")
    # the first step reported no grad norm: 19 points
    assert "19 points" in charts["Gradient norm"].get("aria-label")
    assert all(t.endswith("%") for t in _labels(charts["Model FLOPs utilisation"], "tick y"))


def test_forgetting_chart_shows_the_budget_as_a_dashed_line_on_a_percent_axis():
    chart = _charts(training_report_html(_records(), _evaluated()))["Forgetting per evaluation"]
    assert _labels(chart, "legend") == ["forgetting", "budget 10.0%"]
    assert all(t.endswith("%") for t in _labels(chart, "tick y")) and "10%" in _labels(chart, "tick y")
    budget = next(g for g in chart.iter(f"{SVG}g") if g.get("data-name") == "budget 10.0%")
    assert budget.find(f"{SVG}polyline").get("stroke-dasharray")
    # across the run, from step 1 to step 20, at 10%
    assert "budget 10.0%: 2 points, optimizer step 1 to 20, from 10.0% to 10.0%" in chart.get("aria-label")
    assert "forgetting: 4 points" in chart.get("aria-label")


def test_forgetting_appears_only_when_it_was_measured():
    summary = _summary(final_eval_loss=2.14, best_eval_loss=2.14, best_eval_step=20)
    page = training_report_html(_records(general=False), summary)
    assert "Forgetting per evaluation" not in _charts(page)
    assert "Forgetting" not in _text(page) and "general eval loss" not in _text(page)
    # the evaluations table has only the columns measured: step, eval loss and the marks
    header = re.search(r"<h2>Evaluations</h2><table><tr>(.*?)</tr>", page).group(1)
    assert re.findall(r"<th[^>]*>([^<]*)</th>", header) == ["step", "eval loss", ""]


def test_a_run_without_evaluation_has_no_eval_table_no_forgetting_and_no_empty_chart():
    page = training_report_html(_records(every=0, gpu=False), _summary(device="cpu"))
    assert list(_charts(page)) == ["Loss per optimizer step", "Learning rate", "Gradient norm", "Throughput"]
    assert "Evaluations" not in page and "Eval loss" not in _text(page)
    assert "no data" not in page
    assert _labels(_charts(page)["Loss per optimizer step"], "legend") == ["train loss", "smoothed"]


def test_stopping_for_forgetting_is_a_banner_with_the_reason_and_the_rolled_back_step():
    reason = "forgetting 12.0% at step 20 is over the budget of 10.0%"
    summary = _evaluated(stopped_early=True, planned_steps=100, stop_reason=reason, saved_step=15)
    page = training_report_html(_records(), summary)
    assert re.search(r'class="banner warn"[^>]*>Stopped early after step 20 of 100: forgetting 12\.0%', page)
    text = _text(page)
    assert "Trained 20 of 100 planned optimizer steps" in text
    assert "The saved model is from step 15, the checkpoint training rolled back to" in text
    assert "Forgetting 9.5% at step 15 (the saved model's step)" in text
    # the evaluations table marks the saved model's step and the best one
    assert re.search(r"<td class=\"n\">15</td>(<td[^>]*>[^<]*</td>)*<td>saved model</td>", page)
    assert re.search(r"<td class=\"n\">20</td>(<td[^>]*>[^<]*</td>)*<td>best eval loss</td>", page)
    # a saved step between evaluations: forgetting is the newest one before it
    page = training_report_html(_records(), _evaluated(saved_step=17))
    assert "at step 15 (the last evaluation before the saved model's step, 17)" in _text(page)


def test_early_stopping_on_eval_loss_is_a_note_not_a_banner():
    summary = _evaluated(stopped_early=True, planned_steps=100)
    page = training_report_html(_records(), summary)
    assert 'class="banner' not in page
    assert "Stopped early after step 20 of 100: the eval loss stopped improving (early stopping)." in _text(
        page
    )
    reason = "3 evaluations without an eval-loss drop of more than 0.01"
    page = training_report_html(_records(), _evaluated(stopped_early=True, stop_reason=reason))
    assert 'class="banner' not in page and f"Stopped early after step 20 of 20: {reason}." in _text(page)


def test_forgetting_without_a_final_figure_reads_the_last_measured_one():
    page = training_report_html(_records(), _evaluated(final_forgetting=None, max_forgetting=0.05))
    assert "Forgetting 9.5% at the last measurement (step 20), over the gate's budget of 5.0%" in _text(page)


def test_ending_over_the_budget_warns_that_the_gate_will_likely_reject():
    page = training_report_html(_records(), _evaluated(final_forgetting=0.15))
    assert re.search(
        r'class="banner warn"[^>]*>Forgetting 15\.0% at step 20 \(the saved model&#x27;s step\) is over', page
    )
    assert "over the gate's budget of 10.0%" in _text(page)


def test_resume_names_the_checkpoint_and_step_and_time_counts_every_attempt():
    uri = "s3://work/run/train/checkpoints/step-10"
    page = training_report_html(_records(), _evaluated(resumed_from=uri, resumed_at_step=10))
    assert f"Resumed from checkpoint <code>{uri}</code> at step 10." in page
    assert "Wall time 1 h 15 min (all attempts together)" in _text(page)


def test_diverged_losses_still_render():
    records = _records(every=0)
    records[-1].loss = math.nan
    page = training_report_html(records, _summary(final_loss=math.nan))
    assert "2.0500 at the first step" not in _text(page) and "nan at the last" in _text(page)
    assert "Loss per optimizer step" in _charts(page)


def test_smooth_is_tensorboards_debiased_moving_average():
    assert smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 17 / 7])
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull toward 0 at the start
    assert smooth([1.0, math.nan, 3.0], 0.5)[1] != smooth([1.0, math.nan, 3.0], 0.5)[1]  # nan passes through
    assert smooth([1.0, math.nan, 3.0], 0.5)[2] == pytest.approx(smooth([1.0, 3.0], 0.5)[1])
    assert smooth([1.0, 5.0], 0.0) == [1.0, 5.0]
    assert smoothing_weight(20) == 0.6 and smoothing_weight(1000) == pytest.approx(0.9)


def test_short_counts_and_durations():
    assert [short_count(n) for n in (950, 12_345, 1_234_567, 999_999, 3_400_000_000)] == [
        "950",
        "12.3k",
        "1.23M",
        "1M",
        "3.4B",
    ]
    assert [duration(s) for s in (0.4, 45, 724, 4500, 90061)] == [
        "0.4 s",
        "45 s",
        "12 min 04 s",
        "1 h 15 min",
        "25 h 01 min",
    ]


def test_training_metrics_are_the_final_figures_as_numbers():
    metrics = training_metrics(_records(), _evaluated(stopped_early=True))
    assert metrics == pytest.approx(
        {
            "steps": 20.0,
            "planned_steps": 20.0,
            "tokens": 1_234_567.0,
            "train_seconds": 4500.0,
            "device_hours": 10.0,
            "first_loss": 3.0,
            "final_loss": 2.05,
            "final_eval_loss": 2.14,
            "best_eval_loss": 2.14,
            "best_eval_step": 20.0,
            "final_forgetting": 0.095,
            "stopped_early": 1.0,
            "mean_tokens_per_s": 2500 / 3,
            "mean_mfu": 0.4,
            "peak_gpu_mem_reserved_gib": 61.9,
        }
    )
    assert all(type(v) is float for v in metrics.values())


def test_training_metrics_leave_out_what_was_not_measured():
    records = _records(every=0, gpu=False)
    metrics = training_metrics(records, _summary(device="cpu", final_loss=math.nan, tokens=0))
    assert set(metrics) == {
        "steps",
        "planned_steps",
        "tokens",
        "train_seconds",
        "device_hours",
        "first_loss",
        "stopped_early",
        "mean_tokens_per_s",
    }
    assert metrics["tokens"] == 20_000.0 and metrics["stopped_early"] == 0.0
