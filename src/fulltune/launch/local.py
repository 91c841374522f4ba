"""The local launcher: the operator's contract on one machine.

M "nodes" x P processes: one `torchrun --nnodes M --node-rank i --nproc-per-node P` per node with
a static rendezvous on 127.0.0.1 — the same environment variables (MASTER_ADDR, MASTER_PORT,
RANK, WORLD_SIZE, LOCAL_RANK) and the same entry point that the PyTorchJob's pods get. On CPU,
DeepSpeed runs with DS_ACCELERATOR=cpu over gloo.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import subprocess
import sys
import threading
from collections import deque
from typing import IO

from fulltune.launch.base import NODE_MODULE, LaunchError, TrainJob
from fulltune.train.exit_codes import is_retryable

log = logging.getLogger(__name__)


EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
RENDEZVOUS_PORTS = 8192  # how many ports below the ephemeral range the rendezvous port is drawn from


def free_port(ephemeral: tuple[int, int] | None = None) -> int:
    """A port for the group's rendezvous: free now, and outside the kernel's ephemeral range.

    torchrun binds it a second or two later (its start-up). A port the kernel handed out for a bind
    to port 0 is an ephemeral one, which any process's outgoing connection may take in that window;
    the rendezvous then fails and the whole group restarts. A port below the range is taken only by
    another listener, so one is drawn at random there and checked free; without a usable range
    (another OS, a range that starts too low) the kernel's choice stands."""
    low, _ = ephemeral or _ephemeral_range()
    candidates = range(max(1024, low - RENDEZVOUS_PORTS), low)
    for port in random.SystemRandom().sample(candidates, min(64, len(candidates))):
        if _bindable(port):
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open(EPHEMERAL_RANGE_FILE) as f:
            low, high = (int(part) for part in f.read().split())
    except (OSError, ValueError):
        return 0, 0  # unknown: no range below it to draw from
    return low, high


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))  # every address, as torchrun's store binds it
        except OSError:
            return False
    return True


def node_command(job: TrainJob, node_rank: int, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        NODE_MODULE,
        f"--nnodes={job.num_nodes}",
        f"--node-rank={node_rank}",
        f"--nproc-per-node={job.nproc_per_node}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        *job.entry_command(),
    ]


def environment_path(path: str) -> str:
    """`path` with this Python environment's bin directory first, once, as an activated environment has
    it. DeepSpeed JIT-builds its CPU ops with whichever ninja the PATH gives, and a second ninja
    hashes the same build command differently: the op (~30 s) was rebuilt each time the other ran."""
    here = os.path.dirname(sys.executable)
    return os.pathsep.join([here, *(p for p in path.split(os.pathsep) if p and p != here)])


def node_env(job: TrainJob) -> dict[str, str]:
    env = dict(os.environ)
    env.update(job.env)
    env["PATH"] = environment_path(env.get("PATH", ""))
    if job.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // (job.num_nodes * job.nproc_per_node))))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LocalLauncher:
    """Runs the job's nodes as local torchrun processes, streaming their output."""

    def __init__(self, stream: IO[str] | None = None, tail_lines: int = 40):
        self.stream = stream or sys.stdout
        self.tail_lines = tail_lines

    def run(self, job: TrainJob) -> None:
        """Run the job; a retryable failure (every failed node exited 128+ or was killed by a signal:
        `is_retryable`) restarts the whole group, at most `job.max_restarts` times, as the
        PyTorchJob's operator does: it resumes from the newest complete checkpoint. A permanent
        failure (bad input, a bug) is never retried."""
        for attempt in range(job.max_restarts + 1):
            codes, log_tail = self._run_once(job)
            if not any(codes):
                return
            bad = next(c for c in codes if c)
            retryable = all(c == 0 or is_retryable(c) for c in codes)
            if not retryable or attempt == job.max_restarts:
                raise LaunchError(
                    f"training failed: node exit codes {codes}.\n{log_tail.summary()}", exit_code=bad
                )
            line = (
                f"fulltune: node exit codes {codes}: retryable; restarting the group "
                f"({attempt + 1} of {job.max_restarts}); it resumes from the newest complete checkpoint, or step 0 without one\n"
                f"{log_tail.errors_reported()}"
            )
            log.warning("%s", line.strip())
            self.stream.write(line)
            self.stream.flush()

    def _run_once(self, job: TrainJob) -> tuple[list[int], _LogTail]:
        port = free_port()
        env = node_env(job)
        log_tail = _LogTail(self.tail_lines)
        procs, threads = [], []
        for node in range(job.num_nodes):
            cmd = node_command(job, node, port)
            log.info("node %d: %s", node, " ".join(cmd))
            p = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            )
            procs.append(p)
            t = threading.Thread(target=self._pump, args=(p, node, log_tail), daemon=True)
            t.start()
            threads.append(t)
        codes = [p.wait() for p in procs]
        for t in threads:
            t.join(timeout=10)
        return codes, log_tail

    def _pump(self, proc: subprocess.Popen, node: int, log_tail: _LogTail) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            text = f"[node{node}] {line}"
            log_tail.add(text)
            with log_tail.lock:
                self.stream.write(text)
                self.stream.flush()


class _LogTail:
    """The last lines of the ranks' output, plus the error lines that torchrun's report would push out."""

    ERROR_MARKS = (" ERROR ", "Error:", "Traceback")

    def __init__(self, lines: int):
        self.lock = threading.Lock()
        self.tail: deque[str] = deque(maxlen=lines)
        self.errors: deque[str] = deque(maxlen=10)

    def add(self, text: str) -> None:
        with self.lock:
            self.tail.append(text)
            if any(mark in text for mark in self.ERROR_MARKS):
                self.errors.append(text)

    def errors_reported(self) -> str:
        """The error lines seen, under a heading; '' when there were none (a rank killed outright)."""
        with self.lock:
            errors = "".join(self.errors)
        return f"Errors reported:\n{errors}" if errors else ""

    def summary(self) -> str:
        with self.lock:
            tail = "".join(self.tail)
        return self.errors_reported() + "Last lines:\n" + tail
