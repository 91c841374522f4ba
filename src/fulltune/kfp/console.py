"""What `fulltune run` and `fulltune demo` print while kfp.local runs the DAG.

kfp.local writes every step's executor input, output and log to the console: thousands of lines,
the useful ones at the very end. `StepConsole` sends all of that to a log file instead (the process's
stdout and stderr, its file descriptors included, so the steps' subprocesses write there too) and
prints, by following that file:

    ok     validate-data (2.1 s): 1,500 train records, 0 bad; report: <path>
    ok     plan (1.0 s): 1.6 GiB per GPU
      train: step 120/311 loss 5.9120 tok/s 2,310 eta 31s      (one line, rewritten, on a terminal)
    FAILED train (12.0 s)
      <the step's error message>
    full log: <path>

In a pod or a CI job (no terminal) the training progress is printed as lines: one every
`PROGRESS_EVERY_S` seconds, each evaluated step's (its forgetting) and the last step's, rather than
one per logged step (hundreds for a minute of training at `logging_steps: 1`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
_STEP = re.compile(r"step (\d+)/(\d+) loss (\S+) .*?tok/s (\S+).*? eta (\S+)(?:.* forgetting (\S+))?")
_STOP = re.compile(r"(stopping after step \d+: .*|rolled back to the checkpoint at step \d+).*$")
_ERROR = re.compile(r"^[\w.]*(Error|Exception)\b.*?: ")
_MODULE_PATH = re.compile(r"^(?:\w+\.)+(?=\w+: )")

# The figures each step's line shows: (metric the step logs, label, format).
FIGURES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "validate-data": (("train_records", "train records", "{:,.0f}"), ("train_bad_records", "bad", "{:,.0f}")),
    "check-tokenizer": (("tokenizer_size", "tokens", "{:,.0f}"), ("warnings", "warning(s)", "{:.0f}")),
    "plan": (
        ("memory_per_gpu_gib", "GiB per GPU", "{:.1f}"),
        ("estimated_gpu_hours", "GPU-hours (estimate)", "{:,.1f}"),
    ),
    "gather-shards": (
        ("train_sequences", "training sequences", "{:,.0f}"),
        ("train_tokens", "tokens", "{:,.0f}"),
        ("train_padding_fraction", "padding", "{:.1%}"),
    ),
    "train": (
        ("steps", "steps", "{:,.0f}"),
        ("final_loss", "final loss", "{:.4f}"),
        ("train_seconds", "s of training", "{:,.0f}"),
        ("final_forgetting", "forgetting", "{:+.1%}"),
    ),
    "evaluate": (
        # signed: a rise of the loss reads as a negative improvement, never as "-3.0% lower"
        ("domain_loss_improvement", "domain loss improvement", "{:+.1%}"),
        ("forgetting", "forgetting", "{:+.1%}"),
    ),
}
# The output parameter a step's line starts with, and how: what the step decided or made.
SHOWN_OUTPUT: dict[str, tuple[str, Callable[[Any], str]]] = {
    "evaluate": ("Output", lambda passed: "gate PASS" if passed else "gate FAIL: not registered"),
    "register": ("version_uri", str),
}


PROGRESS_EVERY_S = 30.0  # between two training progress lines without a terminal


class StepConsole:
    """While active: the process's output goes to `log_path`; `out` gets one line per step."""

    def __init__(self, log_path: Path, pipeline_root: Path, out: IO[str]):
        self.log_path, self.root, self.out = log_path, pipeline_root, out
        self.started: dict[str, float] = {}
        self.done = threading.Event()
        self.progress_open = False  # a live progress line is on the terminal, without its newline
        self.progress_said = -math.inf  # when the last progress line was printed (no terminal)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w", buffering=1) as log, _redirected(log):
            follower = threading.Thread(target=self._follow, daemon=True)
            follower.start()
            try:
                yield
            except Exception:
                self.done.set()
                follower.join(timeout=10)
                self._failure()
                raise
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what the steps printed as they stopped
                self.done.set()
                follower.join(timeout=10)
                self.say(f"full log: {self.log_path}")
                raise
            self.done.set()
            follower.join(timeout=10)
        self.say(f"full log: {self.log_path}")

    def _follow(self) -> None:
        with open(self.log_path, errors="replace") as log:
            pending = ""
            while True:
                chunk = log.read()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split("\n")
                    for line in lines:
                        self._line(_ANSI.sub("", line))
                elif self.done.is_set():
                    return
                else:
                    time.sleep(0.2)

    def _line(self, line: str) -> None:
        if m := _START.search(line):
            self.started[m.group(1)] = time.monotonic()
        elif m := _END.search(line):
            name, status = m.groups()
            took = time.monotonic() - self.started.get(name, time.monotonic())
            if status == "SUCCESS":
                self.say(f"ok     {name} ({took:.1f} s){self._figures(name)}")
            else:
                self.say(f"FAILED {name} ({took:.1f} s)")
        elif m := _STOP.search(line):  # why training ended early, and which model it kept
            self.say(f"  train: {m.group(1)}")
        elif m := _STEP.search(line):
            step, total, loss, tokens, eta, forgetting = m.groups()
            text = f"  train: step {step}/{total} loss {loss} tok/s {tokens} eta {eta}"
            text += f" forgetting {forgetting}" if forgetting else ""
            if self.out.isatty():
                self.out.write("\r" + text.ljust(72))
                self.out.flush()
                self.progress_open = True
            else:
                self._progress_line(text, last=step == total, evaluated=bool(forgetting))

    def _progress_line(self, text: str, *, last: bool, evaluated: bool) -> None:
        """Without a terminal: the line when `PROGRESS_EVERY_S` have passed since the last one, or it
        is the last step's or an evaluated step's."""
        now = time.monotonic()
        if last or evaluated or now - self.progress_said >= PROGRESS_EVERY_S:
            self.progress_said = now
            self.say(text)

    def _figures(self, task: str) -> str:
        """': <figures>; report: <path>' from the task's newest executor output, as far as there are any."""
        outputs = sorted(self.root.glob(f"*/**/{task}/executor_output.json"), key=lambda p: p.stat().st_mtime)
        if not outputs:
            return ""
        try:
            executor_output = json.loads(outputs[-1].read_text())
        except (OSError, ValueError):
            return ""
        metrics = _metadata(executor_output.get("artifacts", {}), "metrics")
        parts = []
        if task in SHOWN_OUTPUT:
            name, show = SHOWN_OUTPUT[task]
            if (value := executor_output.get("parameterValues", {}).get(name)) is not None:
                parts.append(show(value))
        parts += [
            fmt.format(metrics[key]) + f" {label}"
            for key, label, fmt in FIGURES.get(task, ())
            if key in metrics
        ]
        report = outputs[-1].parent / "report"
        if report.exists():
            parts.append(f"report: {report}")
        return ": " + ", ".join(parts) if parts else ""

    def _failure(self) -> None:
        """The failed step's own error message, from the last traceback in its part of the log; a
        step that ended without one (killed by the kernel's OOM killer, a crash in native code)
        gets its last line of output, which the shell that ran it wrote: `Killed`, `Segmentation
        fault`."""
        lines = [
            _ANSI.sub("", line).strip() for line in self.log_path.read_text(errors="replace").splitlines()
        ]
        start, end = _failed_task(lines)
        last = max((i for i in range(start, end) if lines[i].startswith("Traceback")), default=None)
        if last is not None:
            start = next((i for i in range(last, end) if _ERROR.match(lines[i])), None)
            if start is not None:
                end = next(
                    (i for i in range(start + 1, end) if not lines[i] or _START.search(lines[i])),
                    end,
                )
                lines[start] = _MODULE_PATH.sub(
                    "", lines[start]
                )  # PlanError: ..., not fulltune.plan.PlanError
                for line in lines[start : min(end, start + 20)]:
                    self.say(f"  {line}")
        elif said := next((lines[i] for i in range(end - 1, start, -1) if lines[i]), None):
            why = f" ({KILLED})" if said == "Killed" else ""
            self.say(f"  the step's process ended without an error message; its last output: {said}{why}")
        self.say(f"full log: {self.log_path}")

    def say(self, text: str) -> None:
        if self.progress_open:
            self.out.write("\n")
            self.progress_open = False
        self.out.write(text + "\n")
        self.out.flush()


KILLED = "SIGKILL: most often the kernel's out-of-memory killer; `dmesg` says"


def _failed_task(lines: list[str]) -> tuple[int, int]:
    """Where the last failed task's output is in `lines`: from its start line to its end line; the
    whole log when no task is said to have failed."""
    failed = [i for i, line in enumerate(lines) if (m := _END.search(line)) and m.group(2) != "SUCCESS"]
    if not failed:
        return 0, len(lines)
    end = failed[-1]
    name = _END.search(lines[end]).group(1)
    starts = [i for i in range(end) if (m := _START.search(lines[i])) and m.group(1) == name]
    return (starts[-1] if starts else 0), end


def _metadata(artifacts: dict, name: str) -> dict:
    try:
        return artifacts[name]["artifacts"][0].get("metadata") or {}
    except (KeyError, IndexError, TypeError):
        return {}


@contextlib.contextmanager
def _redirected(log: IO[str]) -> Iterator[None]:
    """stdout and stderr, the Python objects and the file descriptors, into `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        yield
    finally:
        log.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        os.close(saved_fds[0])
        os.close(saved_fds[1])


def console_stream() -> IO[str]:
    """Where the step lines go: the terminal (or pipe) stdout is now, unaffected by the redirection.
    A stdout without a file descriptor (a test's capture) is not redirected, so it is used as it is."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and ValueError
        return sys.stdout
    return os.fdopen(os.dup(fd), "w", buffering=1)
