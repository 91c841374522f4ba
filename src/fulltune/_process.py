"""What every fulltune process does on its way out (the CLI, each pipeline step, each training rank
and its node's launcher), and how a local run's processes go with the run."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import sys
import threading
import time
from typing import NoReturn

_registered = False


def exit_without_final_collection() -> None:
    """At exit, leave the objects alive now out of the interpreter's last garbage collections.

    A process that imported torch and transformers holds a few million objects, and the collections
    that run while the interpreter tears its modules down walk every one of them: about 2 s of each
    step's and each CLI command's exit on a 2-core machine (`benchmarks/process_exit.py`).
    Frozen (`gc.freeze`), they are skipped; their memory goes back with the process all the same.
    Nothing fulltune owns depends on a collection at exit: files, process groups and trackers are
    closed, and completeness markers written, before the entry point returns."""
    global _registered
    if not _registered:
        atexit.register(gc.freeze)
        _registered = True


def exit_now(code: int) -> NoReturn:
    """Leave with `code` once what was written is flushed, skipping the interpreter's teardown.

    For a training rank, whose entry point returns only after its work is recorded: model and
    completeness marker written, trackers closed, process group destroyed. Tearing the interpreter
    down after that destroyed gloo's C++ threads in an order that aborted a rank ("terminate called
    without an active exception", SIGABRT) in about 1 of 20 two-rank CPU runs (docs/reliability.md):
    torchrun then reports a finished run as failed, and a PyTorchJob restarts it as retryable.
    Nothing is left for the teardown to do but free memory, which goes back with the process."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach the reader
            pass
    os._exit(code)


# Set by a local run (`fulltune run`, `fulltune demo`) for everything it starts: "pid:start time" of
# the process that owns the run. Absent on a cluster, where a step's container goes with its pod.
RUN_OWNER_ENV = "FULLTUNE_RUN_OWNER"
OWNER_POLL_S = 1.0
STOP_GRACE_S = 30.0  # for the process's own SIGTERM handling (torchrun stops its ranks) before it exits


def owner_token() -> str:
    """The value of RUN_OWNER_ENV naming this process: its id and start time, so that another process
    given the same id later is not taken for it."""
    import psutil

    return f"{os.getpid()}:{psutil.Process().create_time()}"


def _owner_alive(token: str) -> bool:
    import psutil

    pid, created = token.split(":", 1)
    try:
        return str(psutil.Process(int(pid)).create_time()) == created
    except psutil.NoSuchProcess:
        return False


_watching = False


def stop_with_run_owner(poll_s: float = OWNER_POLL_S) -> None:
    """Stop this process when the local run that started it is gone.

    kfp.local runs each step as `sh -c` around a Python process, and the train step runs a torchrun
    per node and the ranks under those. A handler in the run (Ctrl-C, SIGTERM) stops them all, but a
    run killed outright (`kill -9`, the OOM killer) runs no handler, and its steps and ranks went on
    training, holding the GPUs and writing into the run's directory. Each of them watches the run's
    owner instead and, once it is gone, stops itself as a SIGTERM would (torchrun's handler stops its
    ranks), then exits if that has not ended it within STOP_GRACE_S."""
    global _watching
    token = os.environ.get(RUN_OWNER_ENV, "")
    if _watching or not token or token.split(":", 1)[0] == str(os.getpid()):
        return
    _watching = True
    watcher = threading.Thread(target=_watch_owner, args=(token, poll_s), name="run-owner-watch", daemon=True)
    watcher.start()
    # Ended before the interpreter finalizes: a daemon thread still asleep then wakes into a runtime
    # being freed, and about 1 exit in 900 of a pipeline step segfaulted after its work was done,
    # its outputs written (kfp.local reported the step FAILED).
    atexit.register(_end_watch, watcher)


_stop_watch = threading.Event()


def _end_watch(watcher: threading.Thread) -> None:
    _stop_watch.set()
    watcher.join(timeout=5.0)


def _watch_owner(token: str, poll_s: float) -> None:
    while _owner_alive(token):
        if _stop_watch.wait(poll_s):
            return
    print(
        f"fulltune: the local run that started this process (pid {token.split(':')[0]}) is gone: stopping",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_S)
    os._exit(128 + signal.SIGTERM)
