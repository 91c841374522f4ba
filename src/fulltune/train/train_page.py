"""The train step's page: what the GPU hours bought, in the order a reader asks about it.

First the run in a few sentences: steps of planned, tokens, wall time and device-hours, batch and
ranks, first to final loss, the eval loss and forgetting against the gate's budget; a banner when
training stopped for forgetting (or ended over the budget), a note for any other early stop, and the
step of the saved model after a rollback and the checkpoint of a resume. Then charts per optimizer
step, counted from 1 as the log counts them: the loss (raw, smoothed, eval and general eval), the
forgetting against its budget, learning rate, grad norm, throughput and MFU. A chart whose data the
run never measured (no evaluation, a CPU run without MFU) is left out rather than drawn empty. Then
the evaluations as a table and the run's exact figures.

The same final figures as numbers, for the step's KFP Metrics, are `metrics.training_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from fulltune import report_kit as kit
from fulltune.report_kit import Html, Series
from fulltune.train.metrics import StepRecord, TrainingSummary, run_tokens, time_mean

SMOOTHING = 0.6  # TensorBoard's default smoothing weight
# A long run's per-step noise needs a wider window than 0.6's (about 2.5 steps): about 1% of the run.
_SMOOTHING_WINDOW_FRACTION = 0.01
_RAW, _SMOOTHED, _EVAL, _GENERAL, _BUDGET = "#b4c8e0", *kit.PALETTE[1:4], "#d62728"
_X = "optimizer step"


def training_report_html(records: list[StepRecord], summary: TrainingSummary) -> str:
    """The page for one training run: its step records (one per step taken) and its summary."""
    return kit.page(
        "fulltune training",
        "fulltune training",
        _stop_notice(records, summary),
        kit.bullet_list(summary_lines(records, summary)),
        _loss_section(records),
        _forgetting_section(records, summary),
        _evaluations_section(records, summary),
        _optimizer_section(records),
        _throughput_section(records),
        kit.heading("Run") + kit.key_value_table(_run_rows(records, summary)),
    )


def smooth(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, `weight` on the running value and
    1 - weight on each new one, divided by 1 - weight**n so the first points are not pulled toward the
    zero the average starts from. A value that is not finite (a diverged step) is passed through and
    left out of the average, as TensorBoard does."""
    out, last, n = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        last = last * weight + (1 - weight) * value
        n += 1
        out.append(last / (1 - weight**n) if weight < 1 else last)
    return out


def smoothing_weight(steps: int) -> float:
    """SMOOTHING, or more for a run long enough that a window of about 1% of it is wider."""
    window = steps * _SMOOTHING_WINDOW_FRACTION
    return max(SMOOTHING, 1 - 1 / window) if window > 1 else SMOOTHING


# -- the summary at the top ---------------------------------------------------------------------------


def _stop_notice(records: list[StepRecord], summary: TrainingSummary) -> str:
    """A banner when the run stopped for forgetting or ended over the budget; a note for any other
    early stop (that is early stopping doing its job, not a problem)."""
    parts, reason = [], summary.stop_reason
    if summary.stopped_early or reason:
        where = f"Stopped early after step {summary.steps:,} of {summary.planned_steps:,}"
        if reason and "forgetting" in reason.lower():
            parts.append(kit.banner("warn", f"{where}: {reason}"))
        else:
            # Before runs recorded a reason, early stopping on the eval loss was the only one.
            parts.append(
                kit.note(f"{where}: {reason or 'the eval loss stopped improving (early stopping)'}.")
            )
    if _over_budget(summary):
        parts.append(
            kit.banner(
                "warn",
                f"Forgetting {kit.format_percent(summary.final_forgetting)}{_final_forgetting_at(records, summary)}"
                f" is over the gate's budget of {kit.format_percent(summary.max_forgetting)}: the evaluate "
                "step is likely to reject the model.",
            )
        )
    return "\n".join(parts)


def summary_lines(records: list[StepRecord], summary: TrainingSummary) -> list[str | Html]:
    """The run in sentences, the ones that apply to it."""
    lines = [
        _steps_line(records, summary),
        _time_line(summary),
        f"Global batch of {summary.global_batch:,} sequences per step, over {_ranks(summary)}.",
        f"Training loss {_loss(summary.first_loss)} at the first step, {_loss(summary.final_loss)} at "
        f"the last.",
        _saved_line(summary),
        _resume_line(summary),
        _eval_line(records, summary),
        _forgetting_line(records, summary),
        _throughput_line(records),
    ]
    return [line for line in lines if line]


def _steps_line(records: list[StepRecord], summary: TrainingSummary) -> str:
    if summary.steps == summary.planned_steps:
        done = f"Trained all {summary.steps:,} planned optimizer steps"
    else:
        done = f"Trained {summary.steps:,} of {summary.planned_steps:,} planned optimizer steps"
    tokens = run_tokens(records, summary)
    return done + (f" on {short_count(tokens)} loss tokens." if tokens else ".")


def _time_line(summary: TrainingSummary) -> str:
    unit = "GPU-hours" if summary.device == "cuda" else "CPU process-hours"
    attempts = " (all attempts together)" if summary.resumed_from else ""
    return f"Wall time {duration(summary.train_seconds)}{attempts}: {_hours(summary.device_hours)} {unit}."


def _saved_line(summary: TrainingSummary) -> str:
    if summary.saved_step is None or summary.saved_step == summary.steps:
        return ""
    return (
        f"The saved model is from step {summary.saved_step:,}, the checkpoint training rolled back to, "
        f"not from the last step taken ({summary.steps:,})."
    )


def _resume_line(summary: TrainingSummary) -> Html | str:
    if not summary.resumed_from:
        return ""
    at = "" if summary.resumed_at_step is None else f" at step {summary.resumed_at_step:,}"
    return Html(f"Resumed from checkpoint {kit.code(summary.resumed_from)}{at}.")


def _eval_line(records: list[StepRecord], summary: TrainingSummary) -> str:
    if summary.final_eval_loss is None:
        return ""
    evals = [r.step + 1 for r in records if r.eval_loss is not None]
    last = f" (step {evals[-1]:,})" if evals else ""
    line = f"Eval loss (domain_eval split) {_loss(summary.final_eval_loss)} at the last evaluation{last}"
    if summary.best_eval_loss is not None and summary.best_eval_step is not None:
        line += f"; best {_loss(summary.best_eval_loss)} at step {summary.best_eval_step:,}"
    return line + "."


def _forgetting_line(records: list[StepRecord], summary: TrainingSummary) -> str:
    """Forgetting at the newest evaluation up to the saved model's step against the budget; the last
    one measured when the summary has none."""
    value, where = summary.final_forgetting, _final_forgetting_at(records, summary)
    if value is None:
        measured = [r for r in records if r.forgetting is not None]
        if not measured:
            return ""
        value, where = measured[-1].forgetting, f" at the last measurement (step {measured[-1].step + 1:,})"
    line = f"Forgetting {kit.format_percent(value)}{where}"
    if summary.max_forgetting is not None:
        within = "over" if value > summary.max_forgetting else "within"
        line += f", {within} the gate's budget of {kit.format_percent(summary.max_forgetting)}"
    return line + " (forgetting: the general_eval perplexity over the base model's, minus 1)."


def _final_forgetting_at(records: list[StepRecord], summary: TrainingSummary) -> str:
    """' at step N (the saved model's step)': where the summary's final forgetting was measured, the
    newest evaluation up to the saved model's step (the last step's unless a rollback says otherwise)."""
    saved = summary.saved_step or summary.steps
    steps = [r.step + 1 for r in records if r.forgetting is not None and r.step + 1 <= saved]
    if not steps:
        return ""
    if steps[-1] == saved:
        return f" at step {saved:,} (the saved model's step)"
    return f" at step {steps[-1]:,} (the last evaluation before the saved model's step, {saved:,})"


def _throughput_line(records: list[StepRecord]) -> str:
    tokens_per_s = time_mean(records, lambda r: r.tokens_per_s)
    if tokens_per_s is None:
        return ""
    parts = [f"Throughput {kit.format_number(tokens_per_s)} loss tokens/s over the run"]
    mfu = time_mean(records, lambda r: r.mfu)
    if mfu is not None:
        parts.append(f"MFU {kit.format_percent(mfu)}")
    peak = [r.gpu_mem_reserved_gib for r in records if r.gpu_mem_reserved_gib is not None]
    if peak:
        parts.append(f"peak GPU memory reserved {max(peak):.1f} GiB")
    return "; ".join(parts) + "."


# -- charts -------------------------------------------------------------------------------------------


def _loss_section(records: list[StepRecord]) -> str:
    if not records:
        return kit.heading("Loss") + kit.note("No steps recorded.")
    steps, losses = [r.step + 1 for r in records], [r.loss for r in records]
    weight = smoothing_weight(len(records))
    series = [Series("train loss", list(zip(steps, losses, strict=True)), colour=_RAW)]
    if len(records) > 2:  # a smoothed line through one or two points says nothing the raw one doesn't
        series.append(
            Series("smoothed", list(zip(steps, smooth(losses, weight), strict=True)), colour=_SMOOTHED)
        )
    why = [f"Smoothed: exponential moving average of the training loss, weight {weight:.2f}, debiased."]
    if evals := _points(records, lambda r: r.eval_loss):
        series.append(Series("eval loss", evals, markers=True, colour=_EVAL))
        why.append("Eval loss: token-mean loss on the domain_eval split.")
    if general := _points(records, lambda r: r.general_eval_loss):
        series.append(Series("general eval loss", general, markers=True, colour=_GENERAL))
        why.append("General eval loss: the same on the general_eval split.")
    chart = kit.line_chart(
        series, title="Loss per optimizer step", x_label=_X, y_label="loss", integer_x=True
    )
    return kit.heading("Loss") + chart + kit.note(" ".join(why))


def _forgetting_section(records: list[StepRecord], summary: TrainingSummary) -> str:
    points = _points(records, lambda r: r.forgetting)
    if not points:
        return ""
    series = [Series("forgetting", points, markers=True, colour=_SMOOTHED)]
    if summary.max_forgetting is not None:
        # Across the whole run, so a single evaluation still has a line to be read against.
        span = (1, max(summary.steps, points[-1][0]))
        budget = [(x, summary.max_forgetting) for x in span]
        name = f"budget {kit.format_percent(summary.max_forgetting)}"
        series.append(Series(name, budget, dashed=True, colour=_BUDGET))
    chart = kit.line_chart(
        series,
        title="Forgetting per evaluation",
        x_label=_X,
        y_label="forgetting",
        integer_x=True,
        percent=True,
    )
    base = (
        f" The base model's general eval loss: {_loss(summary.base_general_loss)}."
        if summary.base_general_loss is not None
        else ""
    )
    why = (
        "Forgetting: the general_eval perplexity over the base model's, minus 1, as the gate measures "
        "it (evaluation.max_general_ppl_increase is its budget, the dashed line)." + base
    )
    return kit.heading("Forgetting") + chart + kit.note(why)


def _optimizer_section(records: list[StepRecord]) -> str:
    lr = _points(records, lambda r: r.lr)
    grad = _points(records, lambda r: r.grad_norm)
    charts = []
    if lr:
        exponent = _exponent(max(abs(y) for _, y in lr))
        scaled = [(x, y / 10.0**exponent) for x, y in lr]
        label = "learning rate" + (f" (×10{_superscript(exponent)})" if exponent else "")
        charts.append(_chart("Learning rate", scaled, label))
    if grad:
        charts.append(_chart("Gradient norm", grad, "grad norm"))
    return kit.heading("Optimizer") + "".join(charts) if charts else ""


def _throughput_section(records: list[StepRecord]) -> str:
    tokens = _points(records, lambda r: r.tokens_per_s)
    mfu = _points(records, lambda r: r.mfu)
    charts = []
    if tokens:
        charts.append(_chart("Throughput", tokens, "loss tokens per second"))
    if mfu:
        charts.append(_chart("Model FLOPs utilisation", mfu, "MFU", percent=True))
    return kit.heading("Throughput") + "".join(charts) if charts else ""


def _chart(title: str, points: list[tuple[int, float]], y_label: str, *, percent: bool = False) -> str:
    """One measured figure per optimizer step."""
    return kit.line_chart(
        [Series(y_label, points)], title=title, x_label=_X, y_label=y_label, integer_x=True, percent=percent
    )


# -- tables -------------------------------------------------------------------------------------------


def _evaluations_section(records: list[StepRecord], summary: TrainingSummary) -> str:
    """One row per evaluation; a column only for what the run measured, and a mark at the best step
    and at the saved model's step."""
    evaluated = [
        r
        for r in records
        if r.eval_loss is not None or r.general_eval_loss is not None or r.forgetting is not None
    ]
    if not evaluated:
        return ""
    columns = [
        ("eval loss", lambda r: _loss(r.eval_loss)),
        ("general eval loss", lambda r: _loss(r.general_eval_loss)),
        ("forgetting", lambda r: kit.format_percent(r.forgetting)),
    ]
    shown = [(name, cell) for name, cell in columns if any(cell(r) != kit.MISSING for r in evaluated)]
    rows = [(r.step + 1, *(cell(r) for _, cell in shown), _marks(r.step + 1, summary)) for r in evaluated]
    return kit.heading("Evaluations") + kit.table(
        ["step", *(name for name, _ in shown), ""], rows, numeric=range(1, len(shown) + 1)
    )


def _marks(step: int, summary: TrainingSummary) -> str:
    marks = []
    if step == summary.best_eval_step:
        marks.append("best eval loss")
    if step == summary.saved_step:
        marks.append("saved model")
    return ", ".join(marks)


def _run_rows(records: list[StepRecord], summary: TrainingSummary) -> list[tuple[str, object]]:
    """The summary's exact figures, labelled; the ones the run did not measure are left out."""
    rows: list[tuple[str, object]] = [
        ("optimizer steps taken", summary.steps),
        ("planned steps", summary.planned_steps),
        ("stopped early", "yes" if summary.stopped_early else "no"),
        ("stop reason", summary.stop_reason),
        ("saved model's step", summary.saved_step),
        ("resumed from", kit.code(summary.resumed_from) if summary.resumed_from else None),
        ("resumed at step", summary.resumed_at_step),
        ("global batch (sequences)", summary.global_batch),
        ("ranks", summary.world_size),
        ("device", summary.device),
        ("loss tokens", run_tokens(records, summary) or None),
        ("training time (s)", round(summary.train_seconds, 1)),
        ("GPU-hours" if summary.device == "cuda" else "CPU process-hours", summary.device_hours),
        ("first loss", _loss_or_none(summary.first_loss)),
        ("final loss", _loss_or_none(summary.final_loss)),
        ("final eval loss", _loss_or_none(summary.final_eval_loss)),
        ("best eval loss", _loss_or_none(summary.best_eval_loss)),
        ("best eval step", summary.best_eval_step),
        ("base model's general eval loss", _loss_or_none(summary.base_general_loss)),
        ("final forgetting", _percent_or_none(summary.final_forgetting)),
        ("forgetting budget", _percent_or_none(summary.max_forgetting)),
    ]
    return [(key, value) for key, value in rows if value is not None]


# -- figures and words --------------------------------------------------------------------------------


def _points(
    records: list[StepRecord], value: Callable[[StepRecord], float | None]
) -> list[tuple[int, float]]:
    """(1-based step, value) where the step measured it."""
    return [(r.step + 1, v) for r in records if (v := value(r)) is not None]


def _over_budget(summary: TrainingSummary) -> bool:
    final, budget = summary.final_forgetting, summary.max_forgetting
    return final is not None and budget is not None and final > budget


def _ranks(summary: TrainingSummary) -> str:
    one, many = ("GPU", "GPUs") if summary.device == "cuda" else ("CPU process", "CPU processes")
    return f"{summary.world_size:,} {one if summary.world_size == 1 else many}"


def _loss(value: float | None) -> str:
    return kit.MISSING if value is None else f"{value:.4f}"


def _loss_or_none(value: float | None) -> str | None:
    return None if value is None else _loss(value)


def _percent_or_none(value: float | None) -> str | None:
    return None if value is None else kit.format_percent(value)


def _hours(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}"


def _exponent(largest: float) -> int:
    """The power of ten to plot values below 0.01 in (a learning rate of 2e-5 reads as 2 ×10⁻⁵); 0 for
    larger ones, which read as they are."""
    return math.floor(math.log10(largest)) if 0 < largest < 0.01 else 0


def _superscript(n: int) -> str:
    return str(n).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))


def short_count(n: int) -> str:
    """A count in few characters, to three significant digits: 950, 12.3k, 1.2M, 3.4B."""
    rounded = float(f"{n:.3g}")
    for suffix, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if rounded >= size:
            return f"{rounded / size:g}{suffix}"
    return f"{n:,}"


def duration(seconds: float) -> str:
    """'2 h 05 min', '12 min 04 s', '45 s' or '0.4 s'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours:,} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
