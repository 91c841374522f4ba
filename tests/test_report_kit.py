"""report_kit: the one stylesheet every page carries, escaping, and SVG charts with axes people can read."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest

from fulltune import report_kit as kit
from fulltune.data.validate import render_html as validate_page
from fulltune.evaluate.eval_page import render_report
from fulltune.evaluate.result import (
    EvalResult,
    GateCheck,
    LossFigures,
    LossSetSection,
    MCFigures,
    MCSection,
    Thresholds,
)
from fulltune.tokenizer.check import render_html as tokenizer_page
from fulltune.train.metrics import StepRecord, TrainingSummary
from fulltune.train.train_page import training_report_html

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def texts(root: ET.Element, cls: str) -> list[str]:
    return [el.text or "" for el in root.iter(f"{SVG}text") if el.get("class") == cls]


def number(label: str) -> float:
    """A tick label back to its value: '1,500' -> 1500, '40%' -> 0.4."""
    value = float(label.replace(",", "").rstrip("%"))
    return value / 100 if label.endswith("%") else value


def svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.S)


# -- ticks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lo, hi", [(0, 1), (2.07, 3.61), (0.0012, 0.0019), (-3, 7), (1, 120), (5, 5), (0, 98_765), (-0.4, -0.1)]
)
def test_nice_ticks_are_round_evenly_spaced_and_enclose_the_range(lo, hi):
    ticks = kit.nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi
    assert 3 <= len(ticks) <= 12
    steps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert len(steps) == 1
    (step,) = steps
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 6) in (1, 2, 5)
    labels = [kit.tick_label(t, step) for t in ticks]
    assert len(set(labels)) == len(labels)  # enough decimals to tell every tick apart


def test_integer_ticks_never_split_a_unit():
    assert kit.nice_ticks(1, 3, 6, integer=True) == [1, 2, 3]


# -- charts --------------------------------------------------------------------------------------------


def test_line_chart_has_axes_whose_tick_labels_span_the_data_and_a_legend():
    train = [(s, 3.5 * math.exp(-s / 30) + 1.9) for s in range(1, 121)]
    evals = [(s, 2.2 + math.exp(-s / 40)) for s in (20, 40, 60, 80, 100, 120)]
    svg = kit.line_chart(
        [kit.Series("train loss", train), kit.Series("eval loss", evals, markers=True)],
        title="Loss per optimizer step",
        x_label="optimizer step",
        y_label="loss",
        integer_x=True,
    )
    root = parse(svg)
    assert root.get("role") == "img"
    label = root.get("aria-label")
    assert "train loss: 120 points" in label and "eval loss: 6 points" in label
    assert root.find(f"{SVG}title").text == "Loss per optimizer step"
    ys = [number(t) for t in texts(root, "tick y")]
    xs = [number(t) for t in texts(root, "tick x")]
    all_y = [y for _, y in train + evals]
    assert min(ys) <= min(all_y) and max(ys) >= max(all_y) and len(ys) >= 3
    assert min(xs) <= 1 and max(xs) >= 120 and all(x == int(x) for x in xs)
    assert texts(root, "axis-title x") == ["optimizer step"] and texts(root, "axis-title y") == ["loss"]
    assert texts(root, "legend") == ["train loss", "eval loss"]
    # the eval series is drawn with a marker at each evaluation; the train series as a line only
    groups = {g.get("data-name"): g for g in root.iter(f"{SVG}g")}
    assert len(groups["eval loss"].findall(f"{SVG}circle")) == 6
    assert not groups["train loss"].findall(f"{SVG}circle")
    assert len(groups["train loss"].find(f"{SVG}polyline").get("points").split()) == 120


def test_line_chart_points_lie_inside_the_plot_area():
    svg = kit.line_chart([kit.Series("a", [(0, -5.0), (10, 250.0)])], title="t", x_label="x", y_label="y")
    root = parse(svg)
    width, height = float(root.get("width")), float(root.get("height"))
    points = [tuple(map(float, p.split(","))) for p in root.find(f".//{SVG}polyline").get("points").split()]
    assert all(0 < x < width and 0 < y < height for x, y in points)
    assert points[0][1] > points[1][1]  # larger values are higher up


def test_bar_chart_labels_percentages_as_percentages():
    svg = kit.bar_chart([("exact match", (0.42, 0.5))], title="qa: base vs tuned", percent=True)
    root = parse(svg)
    assert texts(root, "value") == ["42.0%", "50.0%"]
    ticks = texts(root, "tick y")
    assert all(t.endswith("%") for t in ticks) and ticks[0] == "0%" and number(ticks[-1]) >= 1.0
    assert "exact match: base 42.0%, tuned 50.0%" in root.get("aria-label")


def test_bar_chart_panel_per_metric_each_axis_covering_its_values():
    svg = kit.bar_chart(
        [("loss", (3.2, 2.9)), ("perplexity", (24.5, 18.2))], title="domain_eval: base vs tuned"
    )
    root = parse(svg)
    assert texts(root, "panel-title") == ["loss", "perplexity"]
    assert texts(root, "value") == ["3.2", "2.9", "24.5", "18.2"]
    ticks = [number(t) for t in texts(root, "tick y")]
    # two y axes from zero: one up to at least 3.2, the other up to at least 24.5
    assert ticks.count(0.0) == 2 and 3.2 <= max(t for t in ticks if t < 10) and max(ticks) >= 24.5
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert [b.get("data-series") for b in bars] == ["base", "tuned", "base", "tuned"]
    assert [b.get("fill") for b in bars[:2]] == list(kit.PALETTE[:2])


def test_a_missing_value_draws_no_bar_only_a_dash():
    root = parse(kit.bar_chart([("em", (0.5, None)), ("acc", (math.nan, 0.25))], title="x", percent=True))
    bars = [r.get("data-series") for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert bars == ["base", "tuned"]  # em: base only; acc: tuned only
    assert texts(root, "value") == ["50.0%", kit.MISSING, kit.MISSING, "25.0%"]


def test_histogram_bars_edges_and_count_axis():
    bins = [
        {"lo": 1 << (b - 1), "hi": (1 << b) - 1, "count": c}
        for b, c in zip(range(5, 14), [3, 40, 900, 5100, 8800, 2300, 120, 4, 1], strict=True)
    ]
    root = parse(kit.histogram(bins, title="train: record length", x_label="characters", unit="chars"))
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert len(bars) == len(bins)
    assert bars[4].find(f"{SVG}title").text == "256–511 chars: 8,800 records"
    heights = [float(b.get("height")) for b in bars]
    assert heights.index(max(heights)) == 4
    edges = texts(root, "tick x")
    assert edges[0] == "16" and edges[-1] == "8k"  # 8191 + 1
    counts = [number(t) for t in texts(root, "tick y")]
    assert counts[0] == 0 and max(counts) >= 8800
    assert texts(root, "axis-title y") == ["records"]


def test_chart_text_is_escaped_and_still_parses():
    svg = kit.line_chart(
        [kit.Series("<b>&", [(1, 1.0), (2, 2.0)])], title='a "<t>"', x_label="x<", y_label="y&"
    )
    root = parse(svg)
    assert texts(root, "legend") == ["<b>&"] and root.find(f"{SVG}title").text == 'a "<t>"'


def test_charts_without_data_say_so():
    assert "no data" in kit.line_chart([kit.Series("a", [])], title="loss", x_label="x", y_label="y")
    assert "no data" in kit.bar_chart([], title="t")
    assert "no data" in kit.histogram([], title="t", x_label="x")


# -- page blocks ---------------------------------------------------------------------------------------


def test_cells_are_escaped_unless_marked_as_html():
    html = kit.table(
        ["name", "value"], [("<script>alert(1)</script>", 1234567), (kit.Html("<b>ok</b>"), 0.5)]
    )
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<td><b>ok</b></td>" in html
    assert (
        '<td class="n">1,234,567</td>' in html and '<th class="n">value</th>' in html
    )  # numbers right-aligned


def test_numeric_columns_of_formatted_strings_are_right_aligned():
    html = kit.table(["metric", "base"], [("acc", "61.3%")], numeric=[1])
    assert '<td>acc</td><td class="n">61.3%</td>' in html


def test_banner_problem_list_and_key_value_table():
    assert kit.banner("warn", "<careful>") == '<p class="banner warn" role="status">&lt;careful&gt;</p>'
    with pytest.raises(ValueError, match="pass, fail or warn"):
        kit.banner("maybe", "x")
    problems = kit.problem_list(
        [
            kit.Problem("error", "bad JSON", ["train.jsonl:2", "a<b>.jsonl:7"], more=40),
            kit.Problem("ok", "fine"),
        ]
    )
    assert '<span class="badge error">error</span> bad JSON' in problems
    assert "<code>a&lt;b&gt;.jsonl:7</code>" in problems and "… and 40 more" in problems
    located = kit.problem_list(
        [kit.Problem("warning", "dup", [kit.Html("<code>t.jsonl:3</code>: same as <code>t.jsonl:1</code>")])]
    )
    assert "<li><code>t.jsonl:3</code>: same as <code>t.jsonl:1</code></li>" in located
    kv = kit.key_value_table([("uri", "s3://b/<k>"), ("steps", 1200)], as_code=True)
    assert "<td><code>s3://b/&lt;k&gt;</code></td>" in kv and '<td class="n">1,200</td>' in kv


def test_markdown_table_escapes_what_would_break_a_cell_or_a_row():
    md = kit.markdown_table(["item", "value"], [("model", "llama, 8,030,261,248 parameters"), ("n", 3)])
    assert md == "| item | value |\n|---|---|\n| model | llama, 8,030,261,248 parameters |\n| n | 3 |"
    escaped = kit.markdown_table(["a|b"], [["x | y"], ["line one\nline two"], ["crlf\r\nend"]])
    assert escaped.splitlines() == [
        "| a\\|b |",
        "|---|",
        "| x \\| y |",
        "| line one<br>line two |",
        "| crlf<br>end |",
    ]


def test_percent_formatting():
    assert kit.format_percent(0.2534) == "25.3%" and kit.format_percent(0.02, signed=True) == "+2.0%"
    assert kit.format_percent(None) == kit.format_percent(math.inf) == kit.MISSING
    assert (
        kit.tick_label(0.4, 0.2, percent=True) == "40%"
        and kit.tick_label(0.025, 0.005, percent=True) == "2.5%"
    )


# -- the pages -----------------------------------------------------------------------------------------


def _evaluation() -> EvalResult:
    """A passing result with a loss set and a multiple-choice task (no intervals: bootstrap off)."""
    return EvalResult(
        base_model_uri="s3://models/base",
        tuned_model_uri="s3://work/run/train/model",
        sets={
            "domain_eval": LossSetSection(
                sequences=40,
                loss_tokens=900,
                base=LossFigures(loss=3.2, perplexity=24.5),
                tuned=LossFigures(loss=2.9, perplexity=18.2),
            )
        },
        mc={
            "arc": MCSection(
                questions=100,
                base=MCFigures(acc=0.61, acc_norm=0.59),
                tuned=MCFigures(acc=0.58, acc_norm=0.57),
                acc_change_points=-3.0,
                acc_norm_change_points=-2.0,
            )
        },
        checks=[GateCheck(name="domain_gain", passed=True, reason="domain loss improved")],
        thresholds=Thresholds(min_domain_loss_improvement=0.0, max_general_ppl_increase=0.05),
        device="cpu (float32)",
        created_at="2025-01-01T00:00:00+00:00",
        fulltune_version="0.1.0",
    )


def _pages() -> dict[str, str]:
    metrics = [
        {"step": s, "loss": 3.0 - s / 20, **({"eval_loss": 2.9 - s / 25} if s % 5 == 4 else {})}
        for s in range(20)
    ]
    tokenizer = {
        "passed": True,
        "tokenizer_uri": "tok",
        "base_model_uri": "model",
        "record_kind": "text",
        "checks": [{"name": "eos_token", "status": "ok", "message": "eos is '</s>'"}],
        "metrics": {"errors": 0, "warnings": 0, "tokenizer_size": 32000},
        "split_terms": [],
        "domain_terms": [],
        "roundtrip": None,
        "chat": None,
    }
    validation = {
        "passed": True,
        "max_error_rate": 0.01,
        "checks": {"duplicate": {"action": "warn", "max_rate": None}},
        "tokenizer_special_tokens": 3,
        "datasets": {
            "train": {
                "uri": "s3://b/train.jsonl",
                "kind": "text",
                "files": 1,
                "records": 4,
                "bad_records": 0,
                "error_rate": 0.0,
                "max_error_rate": 0.01,
                "budget_bad_records": 0,
                "over_budget": False,
                "passed": True,
                "problems": [],
                "length_chars": {"min": 1, "p50": 3, "p95": 40, "max": 40},
                "length_histogram": [{"lo": 1, "hi": 1, "count": 1}, {"lo": 2, "hi": 3, "count": 3}],
            }
        },
    }
    return {
        "validate": validate_page(validation),
        "train": training_report_html(
            [
                StepRecord(m["step"], m["loss"], 1e-4, 1.0, 100, 10.0, 1.0, eval_loss=m.get("eval_loss"))
                for m in metrics
            ],
            TrainingSummary(20, 20, False, 8, 2, 3.0, 2.05, 12.0),
        ),
        "evaluate": render_report(_evaluation()),
        "tokenizer": tokenizer_page(tokenizer),
    }


def test_every_page_carries_the_one_stylesheet_and_nothing_external():
    for name, page in _pages().items():
        assert re.findall(r"<style>(.*?)</style>", page, flags=re.S) == [kit.CSS], name
        assert "<script" not in page and not re.search(r'(src|href)="', page), name
        assert page.count("style=") == 0, name  # no inline styles: the stylesheet is the one place
        for svg in svgs(page):
            parse(svg)


def test_pages_draw_their_charts_with_the_kit():
    pages = _pages()
    train = parse(svgs(pages["train"])[0])
    assert texts(train, "legend") == ["train loss", "smoothed", "eval loss"]
    evaluation = [parse(s) for s in svgs(pages["evaluate"])]
    assert [s.find(f"{SVG}title").text for s in evaluation] == [
        "domain_eval: base vs tuned",
        "arc: base vs tuned",
    ]
    assert texts(evaluation[1], "value") == ["61.0%", "58.0%", "59.0%", "57.0%"]
    assert "&lt;/s&gt;" in pages["tokenizer"] and 'class="banner pass"' in pages["tokenizer"]
    (lengths,) = [parse(s) for s in svgs(pages["validate"])]
    assert texts(lengths, "tick x") == ["1", "2", "4"]  # bin edges: 1, 2–3, then one past 3
    assert texts(lengths, "axis-title x") == ["characters per record"]
    assert 'class="banner pass"' in pages["validate"]


def test_numbers_read_without_exponents():
    assert kit.format_number(123456.7) == "123,457" and kit.format_number(3.21456) == "3.215"
    assert kit.format_number(12345678901234567890) == "12,345,678,901,234,567,890"
    assert kit.format_number(math.nan) == "nan" and kit.format_number(None) == kit.MISSING


def test_a_negative_bar_hangs_below_zero_with_its_label_above_the_axis_labels():
    root = parse(kit.bar_chart([("bits_per_byte", (0.0012, -0.0004))], title="wikitext"))
    bars = {r.get("data-series"): r for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"}
    assert (
        float(bars["tuned"].get("y")) > float(bars["base"].get("y")) + float(bars["base"].get("height")) - 1
    )
    value = next(t for t in root.iter(f"{SVG}text") if t.text == "-0.0004")
    axis_labels = [float(t.get("y")) for t in root.iter(f"{SVG}text") if t.get("class") == "tick x"]
    assert float(value.get("y")) < min(axis_labels) - 12
    assert min(number(t) for t in texts(root, "tick y")) <= -0.0004


def test_a_diverged_run_still_draws_its_finite_losses():
    root = parse(
        kit.line_chart(
            [kit.Series("train loss", [(1, 2.5), (2, 2.4), (3, math.nan), (4, math.inf)])],
            title="loss",
            x_label="step",
            y_label="loss",
        )
    )
    assert "train loss: 2 points" in root.get("aria-label")
    assert len(root.find(f".//{SVG}polyline").get("points").split()) == 2


def test_crowded_histogram_edges_are_thinned_not_overlapping():
    bins = [{"lo": 1000 * i, "hi": 1000 * i + 999, "count": i % 7} for i in range(60)]
    root = parse(kit.histogram(bins, title="t", x_label="chars"))
    xs = [float(t.get("x")) for t in root.iter(f"{SVG}text") if t.get("class") == "tick x"]
    widest = max(len(t) for t in texts(root, "tick x")) * kit._CHAR_WIDTH
    assert 3 <= len(xs) < 61 and min(b - a for a, b in zip(xs, xs[1:], strict=False)) >= widest
