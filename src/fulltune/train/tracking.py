"""Reporting a run as it trains (`training.report_to`): TensorBoard event files from rank 0.

A tracker is a step-end callback (`recipe.StepEnd`) with a `close`. It writes on rank 0 only; other
ranks get none. Reporting must never fail a run: every write is guarded, and the first failure of
each kind is a warning in the log, after which the run goes on (the tracker keeps trying, so a
destination that comes back is written again).

TensorBoard: `torch.utils.tensorboard.SummaryWriter` writes event files to a local directory. When
the destination (`training.logging_dir`, else `<work_dir>/train/tensorboard`) is on S3, that
directory is a temporary one and its files are uploaded at every logging step and at the end, so a
TensorBoard pointed at the prefix follows the run. Scalars, by their TensorBoard names: train/loss,
train/learning_rate, train/grad_norm, train/tokens_per_second, train/mfu (when measured) and
eval/loss (on evaluation steps), at the optimizer step (1-based) they belong to; the resolved
config as text at the start.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fulltune import storage

if TYPE_CHECKING:
    from fulltune.config import RunConfig
    from fulltune.train.metrics import StepRecord

log = logging.getLogger("fulltune.train")


def build_trackers(cfg: RunConfig, rank: int, total_steps: int) -> list[TensorBoardTracker]:
    """The trackers `training.report_to` asks for, on rank 0; none elsewhere or for 'none'."""
    if rank != 0 or "tensorboard" not in cfg.training.report_to:
        return []
    destination = cfg.training.logging_dir or cfg.layout.tensorboard
    tracker = TensorBoardTracker(destination, cfg.training.logging_steps, total_steps)
    tracker.write_config(cfg.to_yaml())
    log.info("TensorBoard: event files at %s (tensorboard --logdir %s)", destination, destination)
    return [tracker]


class TensorBoardTracker:
    """Rank 0's TensorBoard writer; see the module docstring."""

    def __init__(self, destination: str, logging_steps: int, total_steps: int):
        from torch.utils.tensorboard import SummaryWriter

        self.destination, self.logging_steps, self.total_steps = destination, logging_steps, total_steps
        self._remote = storage.is_s3(destination)
        self._tmp = tempfile.TemporaryDirectory(prefix="fulltune-tb-") if self._remote else None
        local = Path(self._tmp.name) if self._tmp else Path(destination)
        self._local = local
        self._warned: set[str] = set()
        self.writer = self._guard("open", lambda: SummaryWriter(log_dir=str(local)))

    def write_config(self, text: str) -> None:
        # Markdown in TensorBoard's text tab: a code block keeps the YAML's indentation.
        self._guard("write", lambda: self.writer.add_text("config", f"```\n{text}\n```", 0))

    def __call__(self, done: int, rank: int, record: StepRecord) -> None:
        self._guard("write", lambda: self._scalars(done, record))
        if done % self.logging_steps == 0 or done == self.total_steps:
            self._guard("flush", self._publish)

    def close(self) -> None:
        self._guard("flush", self._publish)
        self._guard("close", lambda: self.writer.close())
        if self._tmp:
            self._tmp.cleanup()

    def _scalars(self, done: int, record: StepRecord) -> None:
        values = {
            "train/loss": record.loss,
            "train/learning_rate": record.lr,
            "train/grad_norm": record.grad_norm,
            "train/tokens_per_second": record.tokens_per_s,
            "train/mfu": record.mfu,
            "eval/loss": record.eval_loss,
        }
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, done)

    def _publish(self) -> None:
        """Flush the event files and, for an S3 destination, upload them (whole: they are small)."""
        self.writer.flush()
        if self._remote:
            for path in sorted(self._local.rglob("*")):
                if path.is_file():
                    storage.upload_file(
                        path, storage.join(self.destination, str(path.relative_to(self._local)))
                    )

    def _guard(self, what: str, action: Any) -> Any:
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - reporting never fails a run
            if what not in self._warned:
                self._warned.add(what)
                log.warning("TensorBoard: %s to %s failed, training goes on: %s", what, self.destination, exc)
            return None
