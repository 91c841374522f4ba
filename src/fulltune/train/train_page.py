"""The train step's page: the run's summary, the loss per optimizer step (and the eval loss, when the
run evaluated) as a line chart, and a table of the eval losses."""

from __future__ import annotations

from typing import Any

from fulltune import report_kit as kit


def training_report_html(metrics: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The page for one training run: `metrics` are the per-step records (`step` counted from 0,
    `loss`, and `eval_loss` on the steps that evaluated), `summary` the model manifest's summary."""
    evals = [(m["step"] + 1, m["eval_loss"]) for m in metrics if m.get("eval_loss") is not None]
    return kit.page(
        "fulltune training",
        "Training",
        kit.key_value_table((str(k), v) for k, v in summary.items()),
        kit.heading("Loss per optimizer step"),
        loss_chart(metrics, evals),
        _eval_table(evals),
    )


def loss_chart(metrics: list[dict[str, Any]], evals: list[tuple[int, float]]) -> str:
    """Training loss at each step and, with markers, the eval loss at the steps that evaluated."""
    if not metrics:
        return kit.note("no steps recorded")
    series = [kit.Series("train loss", [(m["step"] + 1, m["loss"]) for m in metrics])]
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
