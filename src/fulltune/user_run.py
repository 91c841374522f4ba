"""`fulltune run CONFIG`: the pipeline on this machine, on the user's own model and data.

    fulltune run my.yaml --until plan    # the dry run (also `fulltune check my.yaml`): validate the
                                         # data, check the model and tokenizer, plan; a verdict
    fulltune run my.yaml                 # the whole compiled DAG through kfp.local, training with
                                         # the local launcher (CPU, or this machine's GPUs)
    fulltune run my.yaml --resume        # the same run again, training from its newest complete
                                         # checkpoint (after a crash, a reboot, Ctrl-C)

The dry run calls the checking steps' own functions (`fulltune.steps`, what the pipeline's
components wrap) in the DAG's order and prints one line per step: its duration, the figures that
matter and where its report is; on a refusal, the step's message (every problem with its file and
line) and exit code 1. Nothing is trained and no GPU is needed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from fulltune import storage
from fulltune.config import GPU_MEMORY_SLACK, ConfigError, RunConfig
from fulltune.report_kit import format_bytes
from fulltune.train.throughput import bf16_missing

if TYPE_CHECKING:
    from fulltune.outcome import RunOutcome
    from fulltune.run_lock import Holder

CHECKING_STEPS = ("validate_data", "check_tokenizer", "plan")


@dataclass
class StepLine:
    summary: str  # the figures that matter
    report: Path | None = None
    warnings: tuple[str, ...] = ()  # each printed on a line of its own under the step's


def dry_run(cfg: RunConfig, out_dir: Path, until: str, out: IO[str]) -> int:
    """The checking steps up to and including `until`, one line each; 0 when every one passed."""
    from fulltune.registry.layout import RegistryError
    from fulltune.steps import run_inputs

    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.resources.launcher == "local":
        # where `fulltune run` with the same --dir puts what the config leaves unset, before the
        # inputs are fixed: a registry:// base is looked up in the registry the run would use, and
        # plan checks the disk the run would write to (said by the run, not by the dry run)
        cfg = with_local_locations(cfg, out_dir, say=lambda _: None)
    try:
        fixed = run_inputs(cfg)  # as the pipeline's configure step would: today's window, the base's version
    except (ValueError, OSError, RegistryError) as exc:  # RegistryError: a registry:// base not there
        out.write(f"FAILED configure\n{exc}\nverdict: refused before any step; nothing was trained\n")
        return 1
    if fixed:
        cfg = cfg.with_overrides(fixed)
        if "data" in fixed:
            out.write(f"data window: {cfg.data.window_days} day(s) to {cfg.data.as_of}\n")
        if "model" in fixed:
            out.write(
                f"base model: {cfg.model.base_model_uri} (original: {cfg.model.original_base_model_uri})\n"
            )
    steps: dict[str, Callable[[], StepLine]] = {
        "validate_data": lambda: _validate(cfg, out_dir),
        "check_tokenizer": lambda: _check_tokenizer(cfg, out_dir),
        "plan": lambda: _plan(cfg, out_dir),
    }
    for name in CHECKING_STEPS[: CHECKING_STEPS.index(until) + 1]:
        start = time.monotonic()
        try:
            line = steps[name]()
        except (ValueError, OSError) as exc:  # every step's refusal is a ValueError naming the problem
            out.write(f"FAILED {name} ({time.monotonic() - start:.1f} s)\n{exc}\n")
            out.write(f"verdict: refused at {name}; nothing was trained\n")
            return 1
        report = f"; report: {line.report}" if line.report else ""
        out.write(f"ok     {name} ({time.monotonic() - start:.1f} s): {line.summary}{report}\n")
        out.writelines(f"  warning: {warning}\n" for warning in line.warnings)
    following = CHECKING_STEPS[CHECKING_STEPS.index(until) + 1 :]
    nxt = (
        f"`fulltune run CONFIG --until {following[-1]}` checks {' and '.join(following)} too"
        if following
        else "`fulltune run CONFIG` here, or `fulltune submit` to a cluster"
    )
    out.write(f"verdict: passed {until} and every step before it; next: {nxt}\n")
    return 0


def _validate(cfg: RunConfig, out_dir: Path) -> StepLine:
    from fulltune import steps

    report_path = out_dir / "validate_data.html"
    report = steps.validate_data(cfg, str(report_path))
    parts = []
    for name, d in report["datasets"].items():
        warned = [f"{p['count']:,} {p['code']}" for p in d["problems"] if p["severity"] == "warning"]
        said = f", warnings: {', '.join(warned)}" if warned else ", no warnings"
        parts.append(f"{name} {d['records']:,} records, {d['bad_records']:,} bad{said}")
    return StepLine("; ".join(parts), report_path)


def _check_tokenizer(cfg: RunConfig, out_dir: Path) -> StepLine:
    from fulltune import steps

    report_path = out_dir / "check_tokenizer.html"
    report = steps.check_tokenizer(cfg, str(report_path))
    lengths = report.get("lengths") or {}
    warnings = sum(c["status"] == "warning" for c in report["checks"])
    figures = [f"model files complete, {report['tokenizer']['size']:,} tokens"]
    if lengths:
        if not lengths["truncated"]:
            fate = "split, not truncated"
        else:
            fate = "dropped" if cfg.preprocess.overlong == "drop" else "truncated"
        figures.append(
            f"p95 {lengths['p95']:,} tokens a record, {lengths['truncation_rate']:.1%} over max_seq_len ({fate})"
        )
    figures.append(f"{warnings} warning{'' if warnings == 1 else 's'}")
    return StepLine(", ".join(figures), report_path)


def _plan(cfg: RunConfig, out_dir: Path) -> StepLine:
    from fulltune.plan import make_plan, plan_markdown

    with _quiet("fulltune.plan"):  # its warnings go on lines of their own, below
        plan = make_plan(cfg)
    report_path = out_dir / "plan.md"
    report_path.write_text(plan_markdown(plan))
    tr = plan.config.training
    figures = [
        f"{plan.shape.params / 1e6:,.1f}M parameters",
        f"{plan.memory.total / 2**30:.1f} GiB per GPU of {plan.budget_bytes / 2**30:.1f}",
        f"micro batch {tr.per_device_train_batch_size} x {tr.gradient_accumulation_steps}",
        f"lr {tr.learning_rate:g}, {plan.length_summary()}",
    ]
    if plan.disk and (disk := plan.disk.headline()):
        figures.append(disk)
    if plan.cost:
        figures.append(plan.cost.summary())
    warnings = tuple(d.removeprefix("warning: ") for d in plan.decisions if d.startswith("warning: "))
    return StepLine(", ".join(figures), report_path, warnings)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """`logger`'s warnings held back (the dry run prints them itself)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def with_local_locations(cfg: RunConfig, out_dir: Path, say: Callable[[str], None] = print) -> RunConfig:
    """`cfg` with an unset work_dir and registry.uri under `out_dir`, as the demo keeps them: a local
    run needs somewhere for its files and its registered model, and this machine has a place for both.
    Each one filled in is said, so the user knows where to look."""
    here = {"work_dir": out_dir / "runs", "registry.uri": out_dir / "registry"}
    filled = {name: str(path.resolve()) for name, path in here.items() if cfg.missing(name)}
    for name, path in filled.items():
        say(f"{name} not set: {path}")
    return cfg.with_overrides(filled) if filled else cfg


# NCCL keeps its intra-node buffers in /dev/shm; in Docker's default 64 MiB its start-up fails
# ("ncclShmOpen", "unhandled system error"). PyTorch's own CI gives its multi-GPU containers 2 GB.
MIN_SHM_BYTES = 1024**3


@dataclass(frozen=True)
class LocalGpus:
    """What this machine offers a GPU run: its GPUs, each one's memory and compute capability, and
    its /dev/shm."""

    count: int
    memory_bytes: float = math.inf
    capability: tuple[int, int] = (9, 0)
    shm_bytes: float = math.inf
    name: str = "GPU"

    @classmethod
    def here(cls) -> LocalGpus:
        import torch

        if not torch.cuda.is_available() or not torch.cuda.device_count():
            return cls(0)
        props = torch.cuda.get_device_properties(0)
        return cls(
            torch.cuda.device_count(), props.total_memory, (props.major, props.minor), shm_size(), props.name
        )


def local_gpu_problem(cfg: RunConfig, here: LocalGpus) -> str | None:
    """Why `cfg`'s training cannot run on this machine's GPUs, or None. Each training process takes
    the GPU of its local rank, so the local launcher's nodes (one torchrun each, on this one machine)
    would put their ranks on the same GPUs: a GPU run here is one node of at most `here.count`."""
    res = cfg.resources
    elsewhere = "or `fulltune submit` to a cluster"
    gpus = here.count
    if gpus == 0:
        return (
            "resources.accelerator is gpu but this machine has no GPU: set resources.accelerator: cpu "
            f"to train here on the CPU, {elsewhere}"
        )
    if res.num_nodes > 1:
        return (
            f"resources.num_nodes is {res.num_nodes}: on this machine the nodes' processes would share its "
            f"{gpus} GPU(s); set resources.num_nodes: 1 to train here, {elsewhere}"
        )
    if res.nproc_per_node > gpus:
        return (
            f"resources.nproc_per_node is {res.nproc_per_node}, one GPU each, but this machine has {gpus}: "
            f"set resources.nproc_per_node: {gpus} or less to train here, {elsewhere}"
        )
    gib = here.memory_bytes / 1024**3
    if gib < GPU_MEMORY_SLACK * res.gpu_memory_gib:
        return (
            f"this machine's GPUs ({here.name}) have {gib:.1f} GiB each, and resources.gpu_memory_gib is "
            f"{res.gpu_memory_gib:g}: plan would size the micro batch for that and training would run out "
            f"of memory; set resources.gpu_memory_gib: {math.floor(gib)}"
        )
    if cfg.precision == "bf16" and (missing := bf16_missing(here.name, here.capability)):
        return missing
    if res.nproc_per_node > 1 and here.shm_bytes < MIN_SHM_BYTES:
        return (
            f"/dev/shm on this machine holds {format_bytes(here.shm_bytes)}: NCCL between the {res.nproc_per_node} "
            f"GPUs' processes needs more (at least {format_bytes(MIN_SHM_BYTES)}) and fails at start-up; in "
            "a container, start it with --shm-size=16g or --ipc=host, or set resources.nproc_per_node: 1"
        )
    return None


def shm_size() -> float:
    """The size of this machine's /dev/shm; unlimited where there is none to measure."""
    try:
        return float(shutil.disk_usage("/dev/shm").total)
    except OSError:
        return math.inf


@dataclass(frozen=True)
class Unfinished:
    """A run that stopped after its training saved a complete checkpoint, or after its training
    finished, and before it was evaluated; or whose model passed its gate and failed to register."""

    run_id: str
    root: str  # the run's directory under work_dir
    step: int | None  # of its newest complete checkpoint; None: its training finished
    config: RunConfig  # as its plan step resolved it
    register_failed: str = ""  # why its register step failed, when that is where it stopped

    @property
    def where(self) -> str:
        """Where the run goes on from."""
        if self.register_failed:
            return f"its evaluated model, whose registration failed ({self.register_failed})"
        return f"its checkpoint at step {self.step}" if self.step is not None else "its finished training"


class RunStopped(RuntimeError):
    """A local run failed at a step (printed already), or was `interrupted`; `resumable` when its
    training had saved a checkpoint."""

    def __init__(self, resumable: Unfinished | None, *, interrupted: bool = False):
        super().__init__("the run was interrupted" if interrupted else "the run stopped at a failed step")
        self.resumable, self.interrupted = resumable, interrupted


def unfinished_runs(work_dir: str) -> list[Unfinished]:
    """The runs under `work_dir` that `fulltune run --resume` can continue."""
    from fulltune.layout import RunLayout
    from fulltune.train import checkpoint
    from fulltune.train.recipe import load_config, training_finished

    runs = []
    for run_id in storage.children(work_dir):
        layout = RunLayout.for_run(work_dir, run_id)
        if not storage.exists(layout.resolved_config):
            continue  # stopped before its plan
        if storage.exists(layout.eval_result):  # done, unless its passed model failed to register
            if why := _register_failure(layout):
                runs.append(Unfinished(run_id, layout.root, None, load_config(layout.resolved_config), why))
            continue
        trained = training_finished(layout.model, layout.train_metrics)
        tag = None if trained else checkpoint.newest_saved(layout.checkpoints)
        if trained or tag is not None:
            step = checkpoint.step_of(tag) if tag else None
            runs.append(Unfinished(run_id, layout.root, step, load_config(layout.resolved_config)))
    return runs


def _register_failure(layout) -> str:
    """Why the register step of an evaluated run failed, when its gate passed and its last register
    attempt failed (a resume registers it: training and preprocessing are found done); "" if not."""
    from fulltune import failure

    if not storage.read_json(layout.eval_result).get("verdict"):
        return ""
    return next((f.first_line for f in failure.failures(layout) if f.step == "register"), "")


def run_to_resume(cfg: RunConfig, run_id: str | None = None) -> Unfinished:
    """The unfinished run under `cfg.work_dir` to continue: `run_id`'s, or the only one there."""
    from fulltune import run_lock

    runs = unfinished_runs(cfg.work_dir)
    running = {r.run_id: run_lock.holder(r.root) for r in runs}
    listed = "; ".join(
        f"run {r.run_id} (from {r.where}{', running now' if running[r.run_id] else ''})" for r in runs
    )
    if run_id:
        chosen = [r for r in runs if r.run_id == run_id]
        if not chosen:
            raise ConfigError(
                f"--resume {run_id}: no unfinished run of that id under {cfg.work_dir} "
                f"({'unfinished: ' + listed if runs else 'none is unfinished'})"
            )
        return _not_running(chosen[0], running[run_id])
    if not runs:
        from fulltune.plan import checkpoint_summary, default_checkpoints

        defaults = default_checkpoints(cfg)  # as plan resolves them
        raise ConfigError(
            f"nothing to resume under {cfg.work_dir} (work_dir): no run there stopped after a complete "
            "checkpoint or its finished training, and before its evaluation (or after it, failing to register "
            "a model that passed). This config saves checkpoints "
            f"{checkpoint_summary(cfg.with_overrides(defaults) if defaults else cfg)}."
        )
    if len(runs) > 1:
        raise ConfigError(
            f"{len(runs)} unfinished runs under {cfg.work_dir}: {listed}; name one: --resume RUN_ID"
        )
    return _not_running(runs[0], running[runs[0].run_id])


def _not_running(run: Unfinished, holder: Holder | None) -> Unfinished:
    """`run`, unless a process on this machine runs it now (RunBusy, naming the process): two runs in
    one directory would overwrite each other's checkpoints."""
    from fulltune import run_lock

    if holder is not None:
        raise run_lock.RunBusy(run.root, holder)
    return run


def resumed_config(cfg: RunConfig, run: Unfinished) -> RunConfig:
    """`cfg` with the inputs `run` fixed when it started (`steps.run_inputs`: the data window's date
    and partitions, the version a registry:// base model named), so the run continues on the same data
    and model on another day, or after production has moved. Whatever else differs in a way training
    depends on is refused at the train step, which names each field."""
    from fulltune.steps import run_input_fields

    fixed = run_input_fields(cfg)
    return cfg.with_overrides({name: run.config.value(name) for name in fixed}) if fixed else cfg


def full_run(cfg: RunConfig, out_dir: Path, resume: str | None = None) -> RunOutcome:
    """The whole compiled DAG through kfp.local with the local launcher. `resume` ("" for the only
    unfinished run, or a run id) runs an unfinished run again under its id, so that training starts
    from its newest complete checkpoint. RunStopped when a step fails, after the step, its error
    message and the log's path are printed, or when the run is interrupted (its steps stopped)."""
    from fulltune.kfp.local_run import StepFailed, run_locally

    if cfg.resources.launcher != "local":
        cfg = cfg.with_overrides({"resources.launcher": "local"})
    cfg = with_local_locations(cfg, out_dir)
    if cfg.resources.accelerator == "gpu" and (problem := local_gpu_problem(cfg, LocalGpus.here())):
        raise ConfigError(problem)
    run_id = None
    if resume is not None:
        run = run_to_resume(cfg, resume or None)
        cfg, run_id = resumed_config(cfg, run), run.run_id
        print(f"resuming run {run_id} ({run.root}) from {run.where}", flush=True)
    before = {(r.run_id, r.step) for r in unfinished_runs(cfg.work_dir)}
    try:
        return run_locally(
            cfg, compiled_dir=out_dir / "compiled", pipeline_root=out_dir / "kfp", run_id=run_id
        )
    except (StepFailed, KeyboardInterrupt) as stopped:
        # this attempt's checkpoint: of a new run, or a newer one of the run it resumed
        saved = [r for r in unfinished_runs(cfg.work_dir) if (r.run_id, r.step) not in before]
        interrupted = isinstance(stopped, KeyboardInterrupt)
        raise RunStopped(saved[0] if saved else None, interrupted=interrupted) from None
