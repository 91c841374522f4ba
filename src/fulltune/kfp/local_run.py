"""Run the compiled pipeline on this machine through kfp.local (what `fulltune demo` does).

The compiled YAML is loaded back, so the local run executes the same definition the Kubeflow UI
runs; kfp.local's SubprocessRunner runs every step in its own process from this environment (which
is what the image holds), with the cluster settings of the compiled pipeline ignored. So are its
retry policies: they are for step pods a cluster loses, and here would only run a refused input
again twice, minutes of backoff apart (a local run that stops goes on with `fulltune run --resume`).
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from fulltune.config import RunConfig
from fulltune.outcome import RunOutcome


@contextlib.contextmanager
def kfp_local_guard() -> Iterator[None]:
    """Undo what a kfp.local run leaves behind in this process.

    kfp.local swaps `builtins.print` for an indenting one and the root logger's handlers for one
    bound to the sys.stdout of the moment, restoring both on exit; with the tasks of a ParallelFor
    running in threads the saves and restores interleave, and the process can be left printing
    with a growing indent and logging into a stream that has since been closed.
    """
    root = logging.getLogger()
    saved_print, saved_handlers, saved_level = builtins.print, root.handlers[:], root.level
    try:
        yield
    finally:
        builtins.print = saved_print
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


# The id of the local run under way (`run_locally`); None: kfp.local's own.
_pinned_run_id: str | None = None


def _fill_run_placeholders() -> None:
    """Give kfp.local the run-time placeholders KFP's backend fills and kfp.local (2.17) fails on:
    the creation time is now (the run is starting) and the scheduled time empty (a manual run), as
    for a run started by hand on a cluster. The run id is the one `run_locally` chose: a new run's
    made before it starts, so that its directory can be locked and named at once, and a resumed run's
    that of the run it continues, as a retried run keeps its id on a cluster: its steps find their
    work directory, and train its checkpoints."""
    from kfp import dsl
    from kfp.local import placeholder_utils

    original = placeholder_utils.resolve_individual_placeholder
    if getattr(original, "fills_run_placeholders", False):
        return

    def resolve(element: str, *args, **kwargs):
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        element = element.replace(dsl.PIPELINE_JOB_CREATE_TIME_UTC_PLACEHOLDER, now)
        element = element.replace(dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER, "")
        if _pinned_run_id is not None:
            element = element.replace(dsl.PIPELINE_JOB_ID_PLACEHOLDER, _pinned_run_id)
        return original(element, *args, **kwargs)

    resolve.fills_run_placeholders = True  # type: ignore[attr-defined]
    placeholder_utils.resolve_individual_placeholder = resolve


@contextlib.contextmanager
def as_run(run_id: str) -> Iterator[None]:
    """kfp.local runs started inside the block have the id `run_id` (outside: each a new one of kfp.local's)."""
    global _pinned_run_id
    _pinned_run_id = run_id
    try:
        yield
    finally:
        _pinned_run_id = None


def new_run_id() -> str:
    """A new local run's id: when it started, so that a work_dir lists its runs in the order they ran,
    and four random hex digits, so that two started in one second differ."""
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


@contextlib.contextmanager
def owning_its_processes() -> Iterator[None]:
    """Everything the run starts inside the block stops itself when this process is gone
    (`_process.stop_with_run_owner`): a run killed outright leaves nothing training."""
    from fulltune import _process

    previous = os.environ.get(_process.RUN_OWNER_ENV)
    os.environ[_process.RUN_OWNER_ENV] = _process.owner_token()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_process.RUN_OWNER_ENV, None)
        else:
            os.environ[_process.RUN_OWNER_ENV] = previous


def init_local(pipeline_root: Path) -> None:
    """kfp.local with subprocesses from this interpreter, failing on the first failed step."""
    from kfp import local

    _fill_run_placeholders()

    # The steps run as subprocesses of this interpreter; make sure they find its tools (torchrun).
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    for name, value in (
        ("DS_ACCELERATOR", "cpu"),
        ("HF_HUB_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(name, value)
    # kfp.local warns for every step that its image is not a plain Python one; here the steps run from
    # this very environment, which is what the image holds, so the warning is noise.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom")
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True
    )


def read_outcome(run_dir: Path) -> RunOutcome:
    """What the run came to, from `run_dir`, kfp.local's directory of one pipeline run (a directory
    per task): plan's resolved config, evaluate's eval.json, register's version."""
    from fulltune.evaluate.result import EvalResult

    def parameter(task: str, name: str):
        out = run_dir / task / "executor_output.json"
        return json.loads(out.read_text())["parameterValues"][name] if out.exists() else None

    evaluated = run_dir / "evaluate" / "eval_result"  # the artifact is eval.json itself
    cfg = RunConfig.from_pipeline(parameter("plan", "config"))  # resolved, work_dir this run's
    eval_result = EvalResult.load(str(evaluated)) if evaluated.exists() else None
    return RunOutcome.of(cfg, eval_result, parameter("register", "version_uri"))


@contextlib.contextmanager
def stopping_steps_when_stopped() -> Iterator[None]:
    """A local run that is stopped (Ctrl-C, or SIGTERM from `kill` or a CI job's cancel, taken as
    Ctrl-C) stops the processes under it before KeyboardInterrupt goes on: kfp.local runs each step
    as a child process and the train step runs the training processes under that; left behind they
    would train on, holding the GPUs, and write into the work directory a resumed run then uses."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _as_interrupt) if in_main_thread else None
    try:
        yield
    except KeyboardInterrupt:
        stop_descendants()
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_descendants(grace_s: float = 10.0) -> None:
    """SIGTERM to every process under this one, SIGKILL to those still there after `grace_s`."""
    import psutil

    processes = psutil.Process().children(recursive=True)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def without_retries(compiled: Path, into: Path) -> Path:
    """A copy of the compiled pipeline `compiled` in folder `into`, without its tasks' retry policies."""
    import yaml

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "retryPolicy"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    documents = [strip(d) for d in yaml.safe_load_all(compiled.read_text(encoding="utf-8"))]
    into.mkdir(parents=True, exist_ok=True)
    local = into / compiled.name
    local.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")
    return local


def _make_run_directory(root: str) -> None:
    """The run's directory in a local work_dir, made as the run starts: `fulltune runs` lists the
    directories there, and would miss a run in its first steps (plan writes the first file), or
    one refused before plan. One that cannot be made is left to plan, which says why."""
    from fulltune import storage

    if not storage.is_s3(root):
        with contextlib.suppress(OSError):
            os.makedirs(root, exist_ok=True)


class StepFailed(RuntimeError):
    """A step of a local run failed; the step, its error message and the log's path are printed."""


def run_locally(
    cfg: RunConfig,
    *,
    compiled_dir: Path,
    pipeline_root: Path,
    out: IO[str] | None = None,
    run_id: str | None = None,
) -> RunOutcome:
    """Compile the pipeline into `compiled_dir`, load it back and run it with `cfg` as its config:
    as a new run, or with `run_id` as that run again (a resumed run: the same work directory and
    checkpoints). The run holds its directory's lock throughout (`run_lock`): RunBusy, before any step,
    when another process runs it now.

    `out` (default: this process's stdout) gets one line per step and the training progress; the
    whole kfp.local output goes to a log file under `pipeline_root`/<run id>, whose path is printed
    last (also when a step fails: then after the step's error message, and StepFailed is raised).
    Each run keeps kfp.local's files in a folder of its own there: runs sharing `pipeline_root` (two
    configs run at once with one --dir) neither take each other's outputs for their own nor show
    each other's figures."""
    from kfp import components

    from fulltune import run_lock
    from fulltune.kfp.compile import compile_all
    from fulltune.kfp.console import StepConsole, console_stream
    from fulltune.layout import RunLayout

    run_id = run_id or new_run_id()
    root = RunLayout.for_run(cfg.work_dir, run_id).root
    pipeline_root = pipeline_root / run_id  # a resumed run's attempts side by side, no other run's
    with run_lock.holding(root):
        _make_run_directory(root)
        compiled = compile_all(compiled_dir)
        pipeline = components.load_component_from_file(str(without_retries(compiled[0], pipeline_root)))
        init_local(pipeline_root)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        console = StepConsole(pipeline_root / f"run-{stamp}.log", pipeline_root, out or console_stream())
        console.say(f"running the compiled pipeline {compiled[0]} through kfp.local as run {run_id}")
        console.say(f"the run's directory: {root}")
        earlier = set(pipeline_root.iterdir()) if pipeline_root.exists() else set()
        with kfp_local_guard(), console.active(), as_run(run_id), owning_its_processes():
            with stopping_steps_when_stopped():
                try:
                    pipeline(config=cfg.to_dict())
                except RuntimeError as exc:  # kfp.local's: the console said which step and why
                    raise StepFailed(str(exc)) from None
    (run_dir,) = [p for p in pipeline_root.iterdir() if p.is_dir() and p not in earlier]
    return read_outcome(run_dir)
