"""What each step reports: its metrics record (one JSON line of the metrics file), its log line, and
the run's summary.

Per-step log: loss, learning rate, grad norm, tokens/s (loss tokens), ETA and, on a GPU whose peak
16-bit FLOP/s is known, the model FLOPs utilisation (see throughput.py); on a GPU the metrics
records also carry the peak memory allocated and reserved by PyTorch so far, to hold against the
plan's per-GPU estimate. The records travel in every checkpoint, so a resumed run's metrics file has
exactly one record per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fulltune.train.cadence import EarlyStopping

# the steps a divergence's message quotes, to show how it came
DIVERGENCE_HISTORY = 5
# steps in a row with a gradient norm that is not a number before a run without loss scaling is
# taken to have diverged: one such step is skipped and training goes on, three mean it cannot
NONFINITE_GRAD_STEPS = 3

# Written only when measured: on a GPU (memory), with a known peak (mfu), on evaluation steps (the
# general loss and forgetting only when the dataset has a general_eval split).
_OPTIONAL = (
    "gpu_mem_allocated_gib",
    "gpu_mem_reserved_gib",
    "mfu",
    "eval_loss",
    "general_eval_loss",
    "forgetting",
)


@dataclass
class StepRecord:
    step: int  # 0-based
    loss: float  # token-mean training loss over the global batch
    lr: float  # the learning rate this step's update used
    grad_norm: float | None  # None when DeepSpeed does not report one
    tokens: int  # loss tokens in the global batch
    tokens_per_s: float
    step_time_s: float
    gpu_mem_allocated_gib: float | None = None  # peak since the process started
    gpu_mem_reserved_gib: float | None = None
    mfu: float | None = None
    eval_loss: float | None = None  # token-mean loss on the domain_eval split
    general_eval_loss: float | None = None  # the same on the general_eval split
    forgetting: float | None = None  # general perplexity / the base model's - 1, as the gate measures it

    def to_json(self) -> dict[str, Any]:
        """The metrics record: every field, less the optional ones that were not measured."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in _OPTIONAL}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> StepRecord:
        return cls(**record)


def gpu_memory_gib(device) -> dict[str, float]:
    """The peak memory PyTorch allocated and reserved on `device` since the process started (GiB),
    as StepRecord fields; nothing off a GPU."""
    import torch

    if device.type != "cuda":
        return {}
    return {
        "gpu_mem_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "gpu_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
    }


def step_line(record: StepRecord, total_steps: int, eta_s: float) -> str:
    """`step N/M loss ... lr ... grad_norm ... tok/s ... eta ...s` and what else the step measured."""
    grad_norm = "n/a" if record.grad_norm is None else f"{record.grad_norm:.3f}"
    line = (
        f"step {record.step + 1}/{total_steps} loss {record.loss:.4f} lr {record.lr:.3g} "
        f"grad_norm {grad_norm} tok/s {record.tokens_per_s:.0f} eta {eta_s:.0f}s"
    )
    if record.mfu is not None:
        line += f" mfu {record.mfu:.1%}"
    if record.gpu_mem_reserved_gib is not None:
        line += f" peak mem {record.gpu_mem_reserved_gib:.1f} GiB"
    if record.eval_loss is not None:
        line += f" eval_loss {record.eval_loss:.4f}"
    if record.general_eval_loss is not None and record.forgetting is not None:
        line += f" general_loss {record.general_eval_loss:.4f} forgetting {record.forgetting:+.1%}"
    return line


def step_scalars(record: StepRecord) -> dict[str, float]:
    """The step's figures under the names every tracker reports them by (TensorBoard tags, MLflow
    metric keys), less those the step did not measure."""
    values = {
        "train/loss": record.loss,
        "train/learning_rate": record.lr,
        "train/grad_norm": record.grad_norm,
        "train/tokens_per_second": record.tokens_per_s,
        "train/mfu": record.mfu,
        "eval/loss": record.eval_loss,
        "eval/general_loss": record.general_eval_loss,
        "eval/forgetting": record.forgetting,
    }
    return {name: float(value) for name, value in values.items() if value is not None}


@dataclass
class TrainingSummary:
    """The run in figures, saved with the model (training_summary.json and the model manifest)."""

    steps: int  # optimizer steps taken
    planned_steps: int
    stopped_early: bool
    global_batch: int
    world_size: int
    first_loss: float
    final_loss: float
    train_seconds: float  # every attempt's, each up to the checkpoint the next one resumed from
    tokens: int = 0  # loss tokens trained on, over every step taken
    device: str = "cpu"  # what the ranks trained on: "cuda" or "cpu" (device-hours are GPU-hours on cuda)
    stop_reason: str | None = None  # why training stopped before planned_steps, in plain words
    saved_step: int | None = None  # 1-based step of the saved model when it is not the last step taken
    resumed_from: str | None = None  # the checkpoint the last attempt resumed from
    resumed_at_step: int | None = None  # and the steps done by then
    # Only when the run evaluated:
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    best_eval_step: int | None = None  # 1-based, as the log and the page count steps
    # Only when it also measured forgetting (a general_eval split):
    base_general_loss: float | None = None  # the base model's, at step 0
    final_forgetting: float | None = None  # at the newest evaluation up to the saved model's step
    max_forgetting: float | None = None  # the gate's budget (evaluation.max_general_ppl_increase)

    @property
    def device_hours(self) -> float:
        """Training time times ranks: GPU-hours when device is cuda."""
        return self.train_seconds * self.world_size / 3600.0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, summary: dict[str, Any]) -> TrainingSummary:
        return cls(**summary)


def training_summary(
    records: list[StepRecord],
    *,
    planned_steps: int,
    global_batch: int,
    world: int,
    stopping: EarlyStopping,
    seconds: float,
    **measured: Any,
) -> TrainingSummary:
    """The summary of `records`; `measured` sets the fields the records do not tell (device,
    stop_reason, saved_step, resumed_from, resumed_at_step, base_general_loss, max_forgetting)."""
    summary = TrainingSummary(
        steps=records[-1].step + 1,
        planned_steps=planned_steps,
        stopped_early=measured.get("stop_reason") is not None,
        global_batch=global_batch,
        world_size=world,
        first_loss=records[0].loss,
        final_loss=records[-1].loss,
        train_seconds=seconds,
        tokens=sum(r.tokens for r in records),
        **measured,
    )
    if stopping.evals:
        summary.final_eval_loss = next(r.eval_loss for r in reversed(records) if r.eval_loss is not None)
        summary.best_eval_loss = stopping.best_loss
        summary.best_eval_step = stopping.best_step + 1
    saved = summary.saved_step or summary.steps
    summary.final_forgetting = next(
        (r.forgetting for r in reversed(records[:saved]) if r.forgetting is not None), None
    )
    return summary


def training_metrics(records: list[StepRecord], summary: TrainingSummary) -> dict[str, float]:
    """The run's final figures for the step's KFP Metrics: only those measured and finite (a Metrics
    artifact holds numbers; a diverged run's nan loss is on the page instead). Throughput and MFU are
    averaged over the run's time, so each step weighs as long as it took (total tokens / total time)."""
    figures = {
        "steps": summary.steps,
        "planned_steps": summary.planned_steps,
        "tokens": run_tokens(records, summary) or None,
        "train_seconds": summary.train_seconds,
        "device_hours": summary.device_hours,
        "first_loss": summary.first_loss,
        "final_loss": summary.final_loss,
        "final_eval_loss": summary.final_eval_loss,
        "best_eval_loss": summary.best_eval_loss,
        "best_eval_step": summary.best_eval_step,
        "final_forgetting": summary.final_forgetting,
        "stopped_early": int(summary.stopped_early),
        "mean_tokens_per_s": time_mean(records, lambda r: r.tokens_per_s),
        "mean_mfu": time_mean(records, lambda r: r.mfu),
        "peak_gpu_mem_reserved_gib": max(
            (r.gpu_mem_reserved_gib for r in records if r.gpu_mem_reserved_gib is not None), default=None
        ),
    }
    return {k: float(v) for k, v in figures.items() if v is not None and math.isfinite(v)}


def time_mean(records: list[StepRecord], value: Callable[[StepRecord], float | None]) -> float | None:
    """The mean of a per-step rate weighted by each step's time; None when no step measured it."""
    pairs = [(v, r.step_time_s) for r in records if (v := value(r)) is not None and math.isfinite(v)]
    if not pairs:
        return None
    seconds = sum(t for _, t in pairs)
    return sum(v * t for v, t in pairs) / seconds if seconds > 0 else sum(v for v, _ in pairs) / len(pairs)


def run_tokens(records: list[StepRecord], summary: TrainingSummary) -> int:
    # A summary written before it counted tokens says 0; the records (one per step) still know.
    return summary.tokens or sum(r.tokens for r in records)


def refuse_divergence(record: StepRecord, before: list[StepRecord], *, loss_scaling: bool) -> None:
    """TrainingDiverged when `record`'s loss is not a finite number or, without fp16's loss scaling,
    when the gradient norm has not been one for NONFINITE_GRAD_STEPS steps in a row: DeepSpeed skips
    such a step's update, and with no loss scale to lower the weights then never change again.
    Every rank has the same global loss and norm, so every rank stops at the same step. Training on
    would spend the rest of the run's GPU hours on a model that no longer learns, and save it."""
    from fulltune.train.exit_codes import TrainingDiverged

    recent = [*before[-(DIVERGENCE_HISTORY - 1) :], record]
    if not math.isfinite(record.loss):
        what = f"its loss is {record.loss}"
    elif not loss_scaling and _gradients_lost(recent):
        what = (
            f"its gradient norm has not been a finite number for {NONFINITE_GRAD_STEPS} steps in a row "
            "(DeepSpeed skipped those updates: the weights no longer change)"
        )
    else:
        return
    losses = ", ".join(f"{r.loss:.4g}" for r in recent)
    norms = ", ".join("n/a" if r.grad_norm is None else f"{r.grad_norm:.4g}" for r in recent)
    steps = f"{recent[0].step + 1}-{record.step + 1}"
    where = (
        "at the first step: the base model's weights or the data give no finite loss"
        if not before
        else "check the learning rate (training.learning_rate, warmup_ratio), the precision (fp16 overflows "
        "where bf16 does not) and the data of the steps before it"
    )
    raise TrainingDiverged(
        f"training diverged at step {record.step + 1}: {what}; lr {record.lr:.3g}, the losses of steps "
        f"{steps}: {losses}, their gradient norms: {norms}. Stopped without saving a model. A restart "
        f"would resume from the last checkpoint and diverge again: {where}, then start a new run."
    )


def _gradients_lost(recent: list[StepRecord]) -> bool:
    last = recent[-NONFINITE_GRAD_STEPS:]
    return len(last) == NONFINITE_GRAD_STEPS and all(
        r.grad_norm is not None and not math.isfinite(r.grad_norm) for r in last
    )
