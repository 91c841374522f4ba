"""When, step by step: log this step, evaluate now, save a checkpoint now, stop early.

The training loop asks a `Cadence` and nothing else for these decisions. Every count is of optimizer
steps done (`done` = the 0-based step + 1), as the log line and the checkpoint tags count them.

Evaluation runs every `eval_steps` steps; its loss goes into that step's metrics record. Early
stopping: when `early_stopping_patience` evaluations in a row have not lowered the best eval loss by
more than `early_stopping_threshold`, training stops and the model *as of that last step* is saved
(not the best one: keeping the best would cost a full checkpoint per improvement; with patience P it
is at most P evaluations past the best, and the summary names the best step and loss). The
early-stopping state is replayed from the metrics records a checkpoint carries, so a resumed run
stops where an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fulltune.config import TrainingSection
from fulltune.train.metrics import StepRecord


@dataclass
class EarlyStopping:
    """The evaluations so far: the best loss and its step, and how many have not improved on it."""

    patience: int  # 0: never stop early
    threshold: float  # an improvement is a drop of more than this
    best_loss: float | None = None
    best_step: int | None = None  # 0-based step of the best evaluation
    evals: int = 0
    since_best: int = 0  # evaluations since the last improvement

    def observe(self, step: int, eval_loss: float) -> None:
        self.evals += 1
        if self.best_loss is None or self.best_loss - eval_loss > self.threshold:
            self.best_loss, self.best_step, self.since_best = eval_loss, step, 0
        else:
            self.since_best += 1

    @property
    def triggered(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience


@dataclass
class Cadence:
    total_steps: int
    logging_steps: int
    eval_steps: int  # 0: never evaluate
    save_steps: int  # 0: no checkpoints (none configured, or nowhere to write them)
    early_stopping: EarlyStopping

    @classmethod
    def for_run(
        cls, tr: TrainingSection, total_steps: int, *, checkpoints: bool, history: Iterable[StepRecord] = ()
    ) -> Cadence:
        """The cadence of a run of `total_steps`, its early-stopping state replayed from `history`."""
        cadence = cls(
            total_steps,
            tr.logging_steps,
            tr.eval_steps,
            tr.save_steps if checkpoints else 0,
            EarlyStopping(tr.early_stopping_patience, tr.early_stopping_threshold),
        )
        for record in history:
            cadence.observe(record)
        return cadence

    def observe(self, record: StepRecord) -> None:
        """Take in a finished step's record (its eval loss, when it has one)."""
        if record.eval_loss is not None:
            self.early_stopping.observe(record.step, record.eval_loss)

    def should_stop(self) -> bool:
        return self.early_stopping.triggered

    def evaluate_after(self, done: int) -> bool:
        return bool(self.eval_steps) and done % self.eval_steps == 0

    def checkpoint_after(self, done: int) -> bool:
        """Save a checkpoint after `done` steps? Never after the last step or when stopping: the final
        model is saved then."""
        return (
            bool(self.save_steps)
            and done % self.save_steps == 0
            and done < self.total_steps
            and not self.should_stop()
        )

    def log_after(self, record: StepRecord) -> bool:
        """Log this step? Every `logging_steps`, the last step, and every step that was evaluated."""
        step = record.step
        return step % self.logging_steps == 0 or step == self.total_steps - 1 or record.eval_loss is not None
