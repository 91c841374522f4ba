"""What the trainer's exit code tells the operator, and the classifier that picks it for a failure.

The Training Operator's `restartPolicy: ExitCode` retries 128-255 and treats 1-127 as permanent; the
kernel's SIGKILL/SIGTERM give 137/143. `python -m fulltune.train` exits:

    0    trained and saved
    1    bad config, bad data, or checkpoints exist but none is loadable, CUDA out of memory, a
         loss that is no longer a finite number (diverged), or a full disk or quota (retrying
         cannot help: fix the input or the plan, or free space)
    2    unexpected error (a bug: retrying would repeat it), or bad command-line arguments
    138  retryable: a torch.distributed / NCCL / gloo failure or timeout, a storage or network
         error (OSError, botocore); the restarted job resumes from the newest complete checkpoint

A node (`fulltune.launch.node`) passes these on as its own exit code. Nothing heavy is imported at
module level: the node wrapper imports this module before torchrun starts.
"""

from __future__ import annotations

import errno
import json
import logging
import re

log = logging.getLogger("fulltune.train")

EXIT_BAD_INPUT = 1
EXIT_UNEXPECTED = 2
EXIT_RETRYABLE = 138

_RETRYABLE_TEXT = re.compile(
    r"nccl|gloo|timed ?out|timeout|connection (?:reset|refused|closed)|broken pipe|socket|rendezvous",
    re.IGNORECASE,
)


def is_retryable(code: int) -> bool:
    """Whether a process's exit status is worth a restart, as the Training Operator's ExitCode policy
    reads it: killed by a signal (negative from subprocess, 128+n from a shell or a container) or
    exiting 128+ itself; 1-127 are permanent."""
    return code < 0 or code >= 128


class TrainInputError(ValueError):
    """Config or data the trainer cannot use; exit code 1, no retry."""


class TrainingDiverged(TrainInputError):
    """The training loss stopped being a finite number; exit code 1: a restart would resume from
    the same checkpoint, data order and rate, and diverge again."""


def exit_code_for(exc: BaseException) -> int:
    """The exit code for a failure (see the table above); causes are followed when the exception
    itself says nothing."""
    from fulltune.config import ConfigError
    from fulltune.preprocess.dataset import DatasetError
    from fulltune.storage import StorageConfigError
    from fulltune.train.checkpoint import CheckpointError

    permanent = (
        ConfigError,
        TrainInputError,
        DatasetError,
        CheckpointError,
        StorageConfigError,  # a missing bucket, refused credentials: retrying cannot help
        FileNotFoundError,
        PermissionError,
    )
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        module = type(e).__module__ or ""
        if isinstance(e, permanent):
            return EXIT_BAD_INPUT
        if isinstance(e, json.JSONDecodeError) or module.startswith("yaml"):
            return EXIT_BAD_INPUT  # an unreadable config or DeepSpeed JSON
        if name == "OutOfMemoryError" and module.startswith("torch"):
            return EXIT_BAD_INPUT  # deterministic for a given plan: lower the micro batch
        if module.startswith("torch.distributed") or (name.startswith("Dist") and module.startswith("torch")):
            return EXIT_RETRYABLE  # DistBackendError, DistNetworkError, DistStoreError
        if module.startswith(("botocore", "urllib3", "requests")):
            return EXIT_RETRYABLE
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return EXIT_BAD_INPUT  # a restart writes the same checkpoint to the same full disk
        if isinstance(e, OSError):  # storage.StorageError, ConnectionError, TimeoutError, ...
            return EXIT_RETRYABLE
        if isinstance(e, RuntimeError) and _RETRYABLE_TEXT.search(str(e)):
            return EXIT_RETRYABLE
        e = e.__cause__ or e.__context__
    return EXIT_UNEXPECTED


def log_failure(exc: BaseException) -> int:
    """Log a failure the way the operator needs to read it; returns its exit code."""
    code = exit_code_for(exc)
    if code == EXIT_BAD_INPUT:
        log.error("cannot train (exit %d, retrying cannot help): %s", code, exc)
    elif code == EXIT_RETRYABLE:
        log.exception(
            "retryable failure (exit %d; a restart resumes from the newest complete checkpoint, or step 0 without one)",
            code,
        )
    else:
        log.exception("unexpected error (exit %d)", code)
    return code
