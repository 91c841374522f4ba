"""What each step reports: its metrics record (one JSON line of the metrics file), its log line, and
the run's summary.

Per-step log: loss, learning rate, grad norm, tokens/s (loss tokens), ETA and, on a GPU whose peak
16-bit FLOP/s is known, the model FLOPs utilisation (see throughput.py); on a GPU the metrics
records also carry the peak memory allocated and reserved by PyTorch so far, to hold against the
plan's per-GPU estimate. The records travel in every checkpoint, so a resumed run's metrics file has
exactly one record per step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fulltune.train.cadence import EarlyStopping

# Written only when measured: on a GPU (memory), with a known peak (mfu), on evaluation steps.
_OPTIONAL = ("gpu_mem_allocated_gib", "gpu_mem_reserved_gib", "mfu", "eval_loss")


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
    eval_loss: float | None = None

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
    return line


def early_stop_line(stopping: EarlyStopping, done: int) -> str:
    assert stopping.best_loss is not None and stopping.best_step is not None
    return (
        f"early stopping after step {done}: {stopping.since_best} evaluations without an eval-loss drop "
        f"of more than {stopping.threshold:g} (best {stopping.best_loss:.4f} at step "
        f"{stopping.best_step + 1}); saving the model as of step {done}"
    )


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
    # Only when the run evaluated:
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    best_eval_step: int | None = None  # 1-based, as the log and the page count steps

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
) -> TrainingSummary:
    summary = TrainingSummary(
        steps=records[-1].step + 1,
        planned_steps=planned_steps,
        stopped_early=stopping.triggered,
        global_batch=global_batch,
        world_size=world,
        first_loss=records[0].loss,
        final_loss=records[-1].loss,
        train_seconds=seconds,
    )
    if stopping.evals:
        summary.final_eval_loss = next(r.eval_loss for r in reversed(records) if r.eval_loss is not None)
        summary.best_eval_loss = stopping.best_loss
        summary.best_eval_step = stopping.best_step + 1
    return summary
