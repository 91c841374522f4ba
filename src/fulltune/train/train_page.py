"""The train step's page: the run's summary, the loss per optimizer step (and the eval loss, when the
run evaluated) as a line chart, and a table of the eval losses."""

from __future__ import annotations

from fulltune import report_kit as kit
from fulltune.train.metrics import StepRecord, TrainingSummary


def training_report_html(records: list[StepRecord], summary: TrainingSummary) -> str:
    """The page for one training run: its step records and its summary (steps counted from 1)."""
    evals = [(r.step + 1, r.eval_loss) for r in records if r.eval_loss is not None]
    return kit.page(
        "fulltune training",
        "Training",
        kit.key_value_table(summary.to_json().items()),
        kit.heading("Loss per optimizer step"),
        loss_chart(records, evals),
        _eval_table(evals),
    )


def loss_chart(records: list[StepRecord], evals: list[tuple[int, float]]) -> str:
    """Training loss at each step and, with markers, the eval loss at the steps that evaluated."""
    if not records:
        return kit.note("no steps recorded")
    series = [kit.Series("train loss", [(r.step + 1, r.loss) for r in records])]
    if evals:
        series.append(kit.Series("eval loss", evals, markers=True))
    title = "Training and eval loss" if evals else "Training loss"
    return kit.line_chart(series, title=title, x_label="optimizer step", y_label="loss", integer_x=True)


def _eval_table(evals: list[tuple[int, float]]) -> str:
    if not evals:
        return ""
    return kit.heading("Eval loss (domain eval set)") + kit.table(
        ["step", "eval loss"], [(step, f"{loss:.4f}") for step, loss in evals], numeric=[1]
    )
