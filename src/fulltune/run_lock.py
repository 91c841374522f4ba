"""One local run at a time in a run's directory.

A local run (`fulltune run`, `fulltune demo`) holds its run's lock from its first step to its last;
`fulltune run --resume` of a run whose lock is held is refused, naming the process that holds it.
Two runs in one directory would write each other's dataset shards, checkpoints and model, and
register twice. The lock is an flock(2) on a file in this machine's temporary directory, named by
the run's directory (local or s3://): the kernel releases it when its process ends, however it
ends, so a run killed outright never leaves its directory locked. It guards the runs of this machine,
which are the ones the local launcher trains; a cluster run's job name already follows its run id.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fulltune.config import ConfigError


@dataclass(frozen=True)
class Holder:
    """The process that holds a run's lock."""

    pid: int
    since: str  # UTC, to the second
    command: str

    def __str__(self) -> str:
        if not self.pid:
            return self.command
        return f"pid {self.pid} on this machine, since {self.since} UTC: {self.command}"


# A holder between taking the lock and writing down who it is.
UNSAID = Holder(0, "", "a process that has not yet said which")


class RunBusy(ConfigError):
    """The run's lock is held by another process."""

    def __init__(self, run_root: str, holder: Holder):
        super().__init__(
            f"run {Path(run_root).name} ({run_root}) is running now ({holder}); stop it (Ctrl-C in its "
            "terminal, or kill its pid) or let it finish before running it again"
        )
        self.holder = holder


def lock_path(run_root: str) -> Path:
    """Where the lock of the run in `run_root` lives: one directory per user, one file per run."""
    key = run_root if "://" in run_root else os.path.realpath(run_root)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"fulltune-{os.getuid()}" / "run-locks" / f"{digest}.lock"


@contextlib.contextmanager
def holding(run_root: str) -> Iterator[None]:
    """Hold the lock of the run in `run_root` inside the block; RunBusy when another process holds it."""
    path = lock_path(run_root)
    fd = _locked(path)
    if fd is None:
        raise RunBusy(run_root, holder(run_root) or UNSAID)
    try:
        since = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        record = {"pid": os.getpid(), "since": since, "command": " ".join(["fulltune", *sys.argv[1:]])}
        os.write(fd, json.dumps(record).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before the unlock: a process that opens it from here on gets a new file
        os.close(fd)


def holder(run_root: str) -> Holder | None:
    """Who holds the lock of the run in `run_root`; None when no process does."""
    path = lock_path(run_root)
    fd = _locked(path)
    if fd is not None:  # free: let it go again, leaving no file behind
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
        return None
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return UNSAID


def _locked(path: Path) -> int | None:
    """A descriptor of `path` holding its exclusive lock, or None when another process holds it.

    A holder that lets go unlinks the file first, so a lock taken on a file that is no longer the one
    at `path` is a stale one: it is let go and taken again on the new file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            return fd
        os.close(fd)
