"""What a failed step leaves in its run's directory: which step, why, and whether trying it again
can help.

A run on a cluster fails at a step; the way on is KFP's Retry (`fulltune retry RUN_ID`), which runs
the failed steps again with the same parameters over the same work directory. That helps when the
failure was the infrastructure's (a lost node, a storage outage: train resumes from its newest
checkpoint), and never when it was the input's (data or config refused, checkpoints of another run,
ranks exiting 1): the retry asks for the GPUs again, loads the checkpoint, and fails the same way.
Only the step knows which it was, so each step of a pipeline run (from validate_data, which is
given the run's id) writes `failures/<step>.json` as it fails and deletes it when an attempt of it
succeeds; `fulltune retry` and `submit --wait` read them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from fulltune import storage
from fulltune.layout import RunLayout

log = logging.getLogger(__name__)
MESSAGE_CHARS = 2000  # enough for the error and its location; the step's log has the rest


@dataclass(frozen=True)
class StepFailure:
    step: str
    permanent: bool  # the input's fault: the same attempt fails the same way
    error: str  # the exception's type
    message: str
    at: str  # UTC, ISO 8601

    @property
    def first_line(self) -> str:
        return self.message.strip().splitlines()[0] if self.message.strip() else self.error


def is_permanent(exc: BaseException) -> bool:
    """Whether `exc` is the input's fault: a refusal (every step's is a ValueError naming the problem),
    checkpoints this run cannot use, a missing bucket, a model or eval set evaluation cannot use, an
    image without lm-eval for lm_eval_tasks, training whose ranks exited 1-127. A lost node, a storage
    or network error, a cancel, anything unforeseen: not permanent."""
    from fulltune.evaluate.lm_eval_backend import LMEvalMissingError
    from fulltune.evaluate.tasks import EvaluateError
    from fulltune.launch.base import LaunchError
    from fulltune.launch.kubernetes import LaunchCancelled
    from fulltune.storage import StorageConfigError
    from fulltune.train.checkpoint import CheckpointError
    from fulltune.train.exit_codes import is_retryable

    if isinstance(exc, LaunchCancelled):
        return False
    if isinstance(exc, LaunchError):
        return exc.exit_code is not None and not is_retryable(exc.exit_code)
    permanent = (ValueError, CheckpointError, StorageConfigError, EvaluateError, LMEvalMissingError)
    return isinstance(exc, permanent)


@contextlib.contextmanager
def recorded(layout: RunLayout, step: str) -> Iterator[None]:
    """Run a step's body: on an exception, write why into `layout` before it goes on; on success,
    delete what an earlier attempt of the step wrote. Nothing here hides the step's own error."""
    try:
        yield
    except Exception as exc:  # an interrupt is no failure of the step's: nothing to record
        _write(layout, step, exc)
        raise
    with _not_hiding("clear"):
        storage.remove(layout.failure(step))


def _write(layout: RunLayout, step: str, exc: Exception) -> None:
    failure = StepFailure(
        step=step,
        permanent=is_permanent(exc),
        error=type(exc).__name__,
        message=str(exc)[:MESSAGE_CHARS],
        at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    with _not_hiding("record"):
        storage.write_text(layout.failure(step), json.dumps(asdict(failure), indent=2))


@contextlib.contextmanager
def _not_hiding(what: str) -> Iterator[None]:
    """A record that cannot be written (storage down: often the failure itself) is logged, not raised."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the step's own outcome matters more than its record
        log.warning("could not %s the step's failure record: %s", what, exc)


def failures(layout: RunLayout) -> list[StepFailure]:
    """The steps of the run whose last attempt failed, with why (empty when none said, or when the
    work directory cannot be read here)."""
    try:
        files = [f for f in storage.list_files(layout.failures) if f.endswith(".json")]
        return [StepFailure(**json.loads(storage.read_text(f))) for f in files]
    except (OSError, ValueError, TypeError):
        return []
