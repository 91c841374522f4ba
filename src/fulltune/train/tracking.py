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

A restarted attempt resumes from its newest checkpoint and runs the steps after it again. Its
TensorBoard writer starts with a purge at the first of those steps, so TensorBoard hides what the
failed attempt wrote from there on and each step shows once, with the figures of the timeline the
model carries. MLflow keeps every value it was sent: a re-run step has two, and the newer is the
run's (`get_metric_history` lists them in the order they were logged). An attempt killed before its
sender ran (below) leaves steps unsent; the next attempt sends those of them up to its checkpoint
from the checkpoint's records, so MLflow has every step.

MLflow (`fulltune.mlflow_run`): the pipeline run's MLflow run gets the config as params and as
`config.yaml` at the start, the same scalars as metrics, and the final figures (`metrics.
training_metrics`) as `train_summary/*`; its status is RUNNING while training, then FINISHED or
FAILED. The loop only queues each logging step's figures: a thread sends what is queued in one
request at most every SEND_INTERVAL_S, so a slow or unreachable server never stalls training and a
short step never means a request per step. The figures of a request that failed are sent again with
the next, so a server that was away mid-run gets every step once it is back. At the end the tracker
waits at most CLOSE_TIMEOUT_S for what is left and the run's status, trying again every
CLOSE_RETRY_S while the server refuses them, then leaves them unsent with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fulltune import storage
from fulltune.train.metrics import step_scalars

if TYPE_CHECKING:
    from fulltune.config import RunConfig
    from fulltune.mlflow_run import MlflowRun
    from fulltune.train.metrics import StepRecord

CLOSE_TIMEOUT_S = 60.0
SEND_INTERVAL_S = 5.0  # MLflow: at most one request per interval, whatever the step time
CLOSE_RETRY_S = 2.0  # while closing: how often what the server refused is tried again

log = logging.getLogger("fulltune.train")


def build_trackers(
    cfg: RunConfig,
    rank: int,
    total_steps: int,
    first_step: int = 0,
    history: Sequence[StepRecord] = (),
) -> list[TensorBoardTracker | MlflowTracker]:
    """The trackers `training.report_to` asks for, on rank 0; none elsewhere or for 'none'.
    `first_step`: the optimizer steps already done (by the checkpoint this attempt resumed from);
    `history`: their records, from that checkpoint."""
    from fulltune.mlflow_run import MlflowRun, config_params

    if rank != 0:
        return []
    trackers: list[TensorBoardTracker | MlflowTracker] = []
    if (destination := cfg.tensorboard_dir) is not None:
        tensorboard = TensorBoardTracker(destination, cfg.training.logging_steps, total_steps, first_step)
        if not first_step:  # a resumed run's config is the one its first attempt wrote
            tensorboard.write_config(cfg.to_yaml())
        log.info("TensorBoard: event files at %s (tensorboard --logdir %s)", destination, destination)
        trackers.append(tensorboard)
    if (run := MlflowRun.open(cfg, keep_trying=True)) is not None:
        run.set_status("RUNNING")
        run.log_params(config_params(cfg))
        run.log_text(cfg.to_yaml(), "config.yaml")
        mlflow = MlflowTracker(run, cfg.training.logging_steps, total_steps)
        mlflow.backfill(history)
        trackers.append(mlflow)
    return trackers


class MlflowTracker:
    """Rank 0's MLflow reporting; see the module docstring."""

    def __init__(
        self,
        run: MlflowRun,
        logging_steps: int,
        total_steps: int,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        send_interval_s: float = SEND_INTERVAL_S,
    ):
        self.run, self.logging_steps, self.total_steps = run, logging_steps, total_steps
        self.close_timeout_s, self.send_interval_s = close_timeout_s, send_interval_s
        self._steps: list[tuple[int, dict[str, float]]] = []
        self._unsent: list[tuple[int, dict[str, float]]] = []  # held back by a failed request
        self._status: str | None = None  # the newest status queued and not set yet
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._sender = threading.Thread(target=self._send, name="fulltune-mlflow", daemon=True)
        self._sender.start()

    def __call__(self, done: int, rank: int, record: StepRecord) -> None:
        self._steps.append((done, step_scalars(record)))
        if done % self.logging_steps == 0 or done == self.total_steps:
            self._outbox.put(("metrics", self._steps))
            self._steps = []

    def backfill(self, history: Sequence[StepRecord]) -> None:
        """Send the records of the steps before this attempt's first that the run lacks: a failed
        attempt's sender may not have sent its last ones. Which are missing is asked of the server
        from the sender thread, as every request is."""
        if history:
            self._outbox.put(("backfill", [(r.step + 1, step_scalars(r)) for r in history]))

    def close(self, final: dict[str, float] | None = None, failed: bool = False) -> None:
        """Send what is left, the final figures and the run's status; wait at most close_timeout_s."""
        if self._steps:
            self._outbox.put(("metrics", self._steps))
        if final:
            self._outbox.put(("metrics", [(0, {f"train_summary/{k}": v for k, v in final.items()})]))
        self._outbox.put(("status", "FAILED" if failed else "FINISHED"))
        self._outbox.put(None)
        self._closing.set()
        self._sender.join(self.close_timeout_s)
        if self._sender.is_alive():
            log.warning(
                "MLflow: the server did not take the last metrics within %.0f s; left unsent",
                self.close_timeout_s,
            )

    def _send(self) -> None:
        """Everything queued since the last request in one request, then a pause of send_interval_s
        (cut short by close): a short step time must not mean a request per step, each of which
        costs the server (and, on a shared node, the training) CPU time."""
        closing = False
        while not closing:
            items = [self._outbox.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._outbox.get_nowait())
            closing = None in items
            items = [item for item in items if item is not None]
            steps = [step for kind, payload in items if kind == "backfill" for step in self._missing(payload)]
            steps += [step for kind, payload in items if kind == "metrics" for step in payload]
            self._deliver(steps)
            self._status = next((p for kind, p in reversed(items) if kind == "status"), self._status)
            self._set_status()
            if not closing:
                self._closing.wait(self.send_interval_s)
        self._finish()

    def _set_status(self) -> None:
        if self._status is not None and self.run.set_status(self._status):
            self._status = None

    def _finish(self) -> None:
        """The last figures and the run's status, tried again until the server takes them or the
        close timeout passes: a server away at the end would otherwise leave the run RUNNING."""
        deadline = time.monotonic() + self.close_timeout_s
        while (self._unsent or self._status) and time.monotonic() + CLOSE_RETRY_S < deadline:
            time.sleep(CLOSE_RETRY_S)
            self._deliver([])
            self._set_status()
        if self._unsent:
            log.warning("MLflow: %d step(s) of figures could not be sent; left unsent", len(self._unsent))
        if self._status:
            log.warning(
                "MLflow: run %s could not be marked %s; it shows the last status the server took",
                self.run.run_id,
                self._status,
            )

    def _deliver(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        """Send `steps` after those a failed request held back: a server that was away for a while
        gets every step's figures once it answers again, each once."""
        held, steps = len(self._unsent), self._unsent + steps
        if not steps:
            return
        self._unsent = self.run.log_metrics(steps)
        if held and not self._unsent:
            log.info("MLflow: the server answers again; sent the %d step(s) held back", held)

    def _missing(self, steps: list[tuple[int, dict[str, float]]]) -> list[tuple[int, dict[str, float]]]:
        """The `steps` the run has no train/loss for; all of them if the server cannot say (a step
        sent twice keeps its value)."""
        logged = self.run.logged_steps("train/loss") or set()
        return [(step, values) for step, values in steps if step not in logged]


class TensorBoardTracker:
    """Rank 0's TensorBoard writer; see the module docstring."""

    def __init__(self, destination: str, logging_steps: int, total_steps: int, first_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.destination, self.logging_steps, self.total_steps = destination, logging_steps, total_steps
        self._remote = storage.is_s3(destination)
        self._tmp = tempfile.TemporaryDirectory(prefix="fulltune-tb-") if self._remote else None
        local = Path(self._tmp.name) if self._tmp else Path(destination)
        self._local = local
        self._warned: set[str] = set()
        # The purge event hides every event at or after the first step this attempt runs, written by
        # an attempt that failed after it (on a fresh directory there is nothing to hide).
        purge_step = first_step + 1
        self.writer = self._guard("open", lambda: SummaryWriter(log_dir=str(local), purge_step=purge_step))

    def write_config(self, text: str) -> None:
        # Markdown in TensorBoard's text tab: a code block keeps the YAML's indentation.
        self._guard("write", lambda: self.writer.add_text("config", f"```\n{text}\n```", 0))

    def __call__(self, done: int, rank: int, record: StepRecord) -> None:
        self._guard("write", lambda: self._scalars(done, record))
        if done % self.logging_steps == 0 or done == self.total_steps:
            self._guard("flush", self._publish)

    def close(self, final: dict[str, float] | None = None, failed: bool = False) -> None:
        self._guard("flush", self._publish)
        self._guard("close", lambda: self.writer.close())
        if self._tmp:
            self._tmp.cleanup()

    def _scalars(self, done: int, record: StepRecord) -> None:
        for tag, value in step_scalars(record).items():
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
