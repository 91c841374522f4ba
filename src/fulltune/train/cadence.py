"""When, step by step: log this step, evaluate now, save a checkpoint now, stop early.

The training loop asks a `Cadence` and nothing else for these decisions. Every count is of optimizer
steps done (`done` = the 0-based step + 1), as the log line and the checkpoint tags count them.

Evaluation runs every `eval_steps` steps; its losses go into that step's metrics record. Two reasons
to stop early, both replayed from the metrics records a checkpoint carries, so a resumed run stops
where an uninterrupted one would:
- early stopping: when `early_stopping_patience` evaluations in a row have not lowered the best eval
  loss by more than `early_stopping_threshold`, training stops and the model *as of that last step*
  is saved (not the best one: keeping the best would cost a full checkpoint per improvement; with
  patience P it is at most P evaluations past the best, and the summary names the best step and loss);
- forgetting (`stop_on_forgetting`): the first evaluation whose forgetting (general perplexity over
  the base model's, - 1) exceeds the gate's budget stops training; the recipe then goes back to the
  newest checkpoint taken on an evaluation within the budget, when one is left.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

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
class ForgettingWatch:
    """Forgetting at each evaluation against the gate's budget; stops training when `stop` is set."""

    budget: float  # evaluation.max_general_ppl_increase
    stop: bool  # training.stop_on_forgetting
    within: list[int] = field(default_factory=list)  # 0-based steps whose evaluation was within budget
    exceeded_step: int | None = None  # 0-based step of the first evaluation over it
    exceeded_by: float | None = None  # the forgetting measured then

    def observe(self, step: int, forgetting: float) -> None:
        if forgetting <= self.budget:  # NaN (a diverged loss) is over the budget
            self.within.append(step)
        elif self.exceeded_step is None:
            self.exceeded_step, self.exceeded_by = step, forgetting

    @property
    def triggered(self) -> bool:
        return self.stop and self.exceeded_step is not None


@dataclass
class Cadence:
    total_steps: int
    logging_steps: int
    eval_steps: int  # 0: never evaluate
    save_steps: int  # 0: none by steps (none configured, or nowhere to write them)
    save_every_minutes: float  # 0: none by time
    early_stopping: EarlyStopping
    forgetting: ForgettingWatch

    @classmethod
    def for_run(
        cls,
        tr: TrainingSection,
        total_steps: int,
        *,
        checkpoints: bool,
        max_forgetting: float,
        history: Iterable[StepRecord] = (),
    ) -> Cadence:
        """The cadence of a run of `total_steps`, its stopping state replayed from `history`;
        `max_forgetting` is the gate's budget (evaluation.max_general_ppl_increase)."""
        cadence = cls(
            total_steps,
            tr.logging_steps,
            tr.eval_steps,
            (tr.save_steps or 0) if checkpoints else 0,
            (tr.save_every_minutes or 0.0) if checkpoints else 0.0,
            EarlyStopping(tr.early_stopping_patience, tr.early_stopping_threshold),
            ForgettingWatch(max_forgetting, tr.stop_on_forgetting),
        )
        for record in history:
            cadence.observe(record)
        return cadence

    def observe(self, record: StepRecord) -> None:
        """Take in a finished step's record (its eval loss, when it has one)."""
        if record.eval_loss is not None:
            self.early_stopping.observe(record.step, record.eval_loss)
        if record.forgetting is not None:
            self.forgetting.observe(record.step, record.forgetting)

    def should_stop(self) -> bool:
        return self.early_stopping.triggered or self.forgetting.triggered

    def stop_reason(self) -> str | None:
        """Why training stops before its last step, in the words the log and the report use."""
        watch, stopping = self.forgetting, self.early_stopping
        if watch.triggered:
            assert watch.exceeded_step is not None and watch.exceeded_by is not None
            return (
                f"forgetting: at step {watch.exceeded_step + 1} general perplexity rose "
                f"{watch.exceeded_by:.1%} over the base model's, past the {watch.budget:.1%} the gate allows "
                "(training.stop_on_forgetting)"
            )
        if stopping.triggered:
            assert stopping.best_loss is not None and stopping.best_step is not None
            return (
                f"early stopping: {stopping.since_best} evaluations without an eval-loss drop of more than "
                f"{stopping.threshold:g} (best {stopping.best_loss:.4f} at step {stopping.best_step + 1})"
            )
        return None

    def evaluate_after(self, done: int) -> bool:
        return bool(self.eval_steps) and done % self.eval_steps == 0

    def checkpoint_after(self, done: int, minutes_since_save: float = 0.0) -> bool:
        """Save a checkpoint after `done` steps, `minutes_since_save` after the last save (or the
        start)? Every `save_steps` steps, and on a step `watches_the_clock` once `save_every_minutes`
        have passed; never after the last step or when stopping: the final model is saved then."""
        by_steps = bool(self.save_steps) and done % self.save_steps == 0
        by_time = self.watches_the_clock(done) and minutes_since_save >= self.save_every_minutes
        return (by_steps or by_time) and done < self.total_steps and not self.should_stop()

    def watches_the_clock(self, done: int) -> bool:
        """May the time since the last save make step `done` a checkpoint? Every step, or only the
        evaluation steps when there are any (the forgetting rollback resumes from those)."""
        if not self.save_every_minutes:
            return False
        return not self.eval_steps or self.evaluate_after(done)

    def log_after(self, record: StepRecord) -> bool:
        """Log this step? The first, every `logging_steps`-th (counted as the log counts them, as
        Hugging Face's Trainer does), the last, and every step that was evaluated."""
        done = record.step + 1
        return (
            done == 1
            or done % self.logging_steps == 0
            or done == self.total_steps
            or record.eval_loss is not None
        )
