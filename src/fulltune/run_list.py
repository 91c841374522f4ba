"""`fulltune runs CONFIG`: the runs under a config's work_dir, and where each one stands.

One line a run, in the order of their ids (a local run's id starts with the time it started): running now (and by which
process), evaluated (the domain loss change, forgetting, verdict and registered version: runs of
several configs side by side), stopped where `fulltune run --resume` can go on, or stopped before any
checkpoint; and the disk its checkpoints take, which only a resume needs. `--output json` gives the
same for scripts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fulltune import storage
from fulltune.config import RunConfig

if TYPE_CHECKING:
    from fulltune.layout import RunLayout
    from fulltune.user_run import Unfinished

RUNNING, EVALUATED, RESUMABLE, STOPPED = "running", "evaluated", "resumable", "stopped"


@dataclass(frozen=True)
class RunStatus:
    """Where one run under work_dir stands."""

    run_id: str
    root: str
    state: str  # RUNNING, EVALUATED, RESUMABLE or STOPPED
    detail: str  # the state in words: who runs it, the verdict, where it goes on from
    steps: int | None = None  # optimizer steps trained: its model's, or (resumable) its newest checkpoint's
    domain_loss_change: float | None = None  # tuned vs base on the domain set (negative: lower)
    forgetting: float | None = None  # general perplexity's rise over the base model's
    registered: str | None = None  # the version's URI, when the gate passed it
    checkpoints: int = 0  # complete ones
    checkpoint_bytes: int = 0  # everything under its checkpoints directory

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_statuses(work_dir: str) -> list[RunStatus]:
    """Every run directory under `work_dir`, in the order of their ids."""
    from fulltune.user_run import unfinished_runs

    resumable = {run.run_id: run for run in unfinished_runs(work_dir)}
    return [_status(work_dir, run_id, resumable.get(run_id)) for run_id in _run_ids(work_dir)]


def _run_ids(work_dir: str) -> list[str]:
    """The directories directly under `work_dir`: one per run (a file there is no run)."""
    import os

    def is_dir(uri: str) -> bool:
        return not storage.exists(uri) if storage.is_s3(uri) else os.path.isdir(uri)

    return [name for name in storage.children(work_dir) if is_dir(storage.join(work_dir, name))]


def _status(work_dir: str, run_id: str, unfinished: Unfinished | None) -> RunStatus:
    from fulltune import failure, run_lock
    from fulltune.layout import RunLayout
    from fulltune.outcome import RunOutcome
    from fulltune.train import checkpoint
    from fulltune.train.recipe import load_config

    layout = RunLayout.for_run(work_dir, run_id)
    disk = {
        "checkpoints": len(checkpoint.saved_tags(layout.checkpoints)),
        "checkpoint_bytes": sum(storage.size(f) for f in storage.list_files(layout.checkpoints)),
    }
    if holder := run_lock.holder(layout.root):
        return RunStatus(run_id, layout.root, RUNNING, f"running: {holder}", **disk)
    # the lock is this machine's: a run in a shared work_dir may be running on a cluster
    stopped = "stopped (or running elsewhere)" if storage.is_s3(layout.root) else "stopped"
    if failed := failure.failures(layout):
        stopped = "failed at " + ", ".join(f.step + (" on its input" if f.permanent else "") for f in failed)
    if unfinished is not None:
        # the steps trained so far: its newest checkpoint's, or its finished training's
        steps = unfinished.step if unfinished.step is not None else _trained_steps(layout)
        where = f"{stopped}; resumable from {unfinished.where}"
        return RunStatus(run_id, layout.root, RESUMABLE, where, steps=steps, **disk)
    if not storage.exists(layout.resolved_config):
        return RunStatus(run_id, layout.root, STOPPED, f"{stopped} before plan", **disk)
    if not storage.exists(layout.eval_result):  # no need to read the registry for it
        return RunStatus(run_id, layout.root, STOPPED, f"{stopped} before its first checkpoint", **disk)
    cfg = load_config(layout.resolved_config)
    outcome = RunOutcome.from_storage(cfg.with_overrides({"work_dir": work_dir}), run_id)
    result = outcome.eval_result
    assert result is not None
    return RunStatus(
        run_id,
        layout.root,
        EVALUATED,
        f"evaluated: {'PASS' if result.verdict else 'FAIL'}",
        steps=_trained_steps(layout),
        domain_loss_change=-result.domain_loss_improvement,
        forgetting=result.forgetting,
        registered=outcome.registered,
        **disk,
    )


def _trained_steps(layout: RunLayout) -> int | None:
    from fulltune.train.recipe import MODEL_MANIFEST

    manifest = storage.join(layout.model, MODEL_MANIFEST)
    if not storage.exists(manifest):
        return None
    return (storage.read_json(manifest).get("summary") or {}).get("steps")


def runs_table(statuses: list[RunStatus]) -> str:
    """The statuses as aligned columns, a header first."""
    header = ("RUN", "STATE", "STEPS", "DOMAIN LOSS", "FORGETTING", "REGISTERED", "CHECKPOINTS")
    rows = [header] + [
        (
            s.run_id,
            s.detail,
            _or_dash(s.steps, "{:,}"),
            _or_dash(s.domain_loss_change, "{:+.1%}"),
            _or_dash(s.forgetting, "{:+.1%}"),
            storage.basename(s.registered) if s.registered else "-",  # the version's directory: v3
            f"{s.checkpoints} ({s.checkpoint_bytes / 2**30:.2f} GiB)" if s.checkpoints else "-",
        )
        for s in statuses
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _or_dash(value: float | int | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def describe_runs(cfg: RunConfig, resume_command: str) -> str:
    """What `fulltune runs` prints for `cfg`'s work_dir; `resume_command` goes on with a resumable run
    when its id is added: each resumable run's own command follows the table, ready to paste."""
    statuses = run_statuses(cfg.work_dir)
    if not statuses:
        return f"no runs under {cfg.work_dir} (work_dir)"
    lines = [f"runs under {cfg.work_dir} (work_dir):", runs_table(statuses)]
    for run_id in (s.run_id for s in statuses if s.state == RESUMABLE):
        lines.append(f"run {run_id} goes on with: {resume_command} {run_id}")
        if storage.is_s3(cfg.work_dir):  # a run's directory is named by its KFP run id
            lines.append(f"  or, run on a cluster and failed: fulltune retry {run_id} --host URL")
    return "\n".join(lines)
