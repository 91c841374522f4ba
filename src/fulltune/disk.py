"""What a run writes to disk while it trains, and whether the filesystems it writes to hold it.

Full fine-tuning's checkpoints hold the whole optimizer state: the fp32 master weights and the
optimizer's moments, 12 bytes a parameter with AdamW (measured: 12.03 on a ZeRO-3 checkpoint of a
1.4M-parameter Llama over two ranks, model states included), ~96 GB for an 8B model. A run keeps
`training.save_total_limit` of them and writes the next before it deletes the oldest. Found out at
the first save, an hour into the run, a full disk costs that hour on every GPU and, retried, the
next one too: `plan` refuses it before any data is tokenized, where it can see the filesystem.

Where plan can see it: a local `work_dir` when training runs on this machine (the local launcher:
`fulltune run`, kfp.local), checked at its nearest existing directory; a local `work_dir` of a
cluster run (a volume mounted into every step) only when the directory exists in plan's pod, which
then has the volume mounted. An s3:// `work_dir` has no limit to check. On this machine the temp
directory is checked too: the final model is written there before it is copied to `work_dir`, and
s3:// checkpoints and base models are staged there.

When a checkpoint's write fails anyway (something else filled the disk since), torch.save says only
"unexpected pos ..."; `failing_for_space` turns that into an error naming the directory, the bytes free
and the bytes needed, with errno ENOSPC: exit 1, since a restart writes the same bytes to the same
disk.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fulltune import storage
from fulltune.config import RunConfig
from fulltune.report_kit import format_bytes

GiB = 1024**3
# Bytes a parameter in a checkpoint, by optimizer: fp32 master weights and the optimizer's state
# (AdamW's two moments; Adafactor's factored second moment and its first); ZeRO-3 keeps the 16-bit
# weights out of it (they are the master weights' copy).
CHECKPOINT_BYTES_PER_PARAM = {"adamw_torch": 12.0, "adafactor": 8.0}


WORK_DIR_FIXES = "free space there, lower training.save_total_limit, or put work_dir on s3://"
# Where no checkpoint is kept beside another (none saved, or save_total_limit 1 already), a lower
# save_total_limit frees nothing.
WORK_DIR_FIXES_NO_LIMIT = "free space there, or put work_dir on s3://"
TEMP_DIR_FIXES = "free space there, or point TMPDIR at a larger disk"
# A training pod's temp directory is an emptyDir on its node's disk, sized by the request plan sets.
POD_TEMP_DIR_FIXES = (
    "raise resources.kubernetes.ephemeral_storage (the training pods' /tmp, on their node's disk), or put "
    "work_dir on a volume"
)


def temp_dir_fixes() -> str:
    """What to change when this process's temp directory is full: in a pod, its request."""
    return POD_TEMP_DIR_FIXES if os.environ.get("KUBERNETES_SERVICE_HOST") else TEMP_DIR_FIXES


def checkpoint_bytes(cfg: RunConfig, params: int) -> float:
    """One complete checkpoint of `cfg`'s run: every rank's share together."""
    return params * CHECKPOINT_BYTES_PER_PARAM[cfg.training.optim]


def checkpoint_bytes_in(cfg: RunConfig, params: int, root: str) -> float:
    """What one checkpoint under `root` writes to the filesystem a node saves it to: all of it to a
    shared directory; the node's share to its temp directory, to upload, when `root` is on S3."""
    whole = checkpoint_bytes(cfg, params)
    return whole * cfg.resources.nproc_per_node / cfg.world_size if storage.is_s3(root) else whole


def model_bytes(cfg: RunConfig, params: int) -> float:
    """The final model's weights as training saves them: 16-bit, or 32-bit where it trains in fp32."""
    return params * (4.0 if cfg.precision == "fp32" else 2.0)


@dataclass(frozen=True)
class Filesystem:
    """One directory a run writes to: what it needs there at the peak, and what it has."""

    purpose: str  # "work_dir" or "temp directory"
    path: str  # the directory checked (the nearest existing one)
    needed_bytes: float
    contents: str  # what the needed bytes are
    free_bytes: float
    fixes: str = ""  # what to change when it does not fit; "": the purpose's usual fixes

    def problem(self) -> str | None:
        """Why the run cannot write here, with what to change; None when it fits."""
        if self.needed_bytes <= self.free_bytes:
            return None
        fixes = self.fixes or (WORK_DIR_FIXES if self.purpose == "work_dir" else TEMP_DIR_FIXES)
        return (
            f"the {self.purpose} {self.path} has {format_bytes(self.free_bytes)} free, and this run writes "
            f"~{format_bytes(self.needed_bytes)} there ({self.contents}): {fixes}"
        )


@dataclass(frozen=True)
class DiskEstimate:
    """The filesystems this run's training writes to that plan could check, and why the work_dir's
    was not when it was not."""

    checked: tuple[Filesystem, ...]
    not_checked: str = ""

    def summary(self) -> str:
        """The plan report's row."""
        parts = [
            f"{fs.purpose} {fs.path}: ~{format_bytes(fs.needed_bytes)} needed ({fs.contents}), "
            f"{format_bytes(fs.free_bytes)} free"
            for fs in self.checked
        ]
        if self.not_checked:
            parts.append(f"work_dir not checked: {self.not_checked}")
        return "; ".join(parts)

    def problems(self) -> list[str]:
        return [p for fs in self.checked if (p := fs.problem())]

    def headline(self) -> str | None:
        """The work_dir's figures in a few words (the dry run's line), when it was checked."""
        fs = next((fs for fs in self.checked if fs.purpose == "work_dir"), None)
        if fs is None:
            return None
        return f"work_dir needs ~{format_bytes(fs.needed_bytes)} of {format_bytes(fs.free_bytes)} free"


def estimate_disk(cfg: RunConfig, params: int) -> DiskEstimate:
    """The filesystems `cfg`'s run writes to that this process can see, with what it writes to each
    (`cfg` resolved: save_steps and save_every_minutes decided)."""
    tr = cfg.training
    ckpt, model = checkpoint_bytes(cfg, params), model_bytes(cfg, params)
    checked: list[Filesystem] = []
    here = cfg.resources.launcher == "local"
    work_dir, not_checked = _visible_dir(cfg.work_dir, here)
    if work_dir is not None:
        peak = tr.save_total_limit + 1 if _saves(cfg) else 0
        contents = f"the final model, {format_bytes(model)}"
        if peak:
            contents = (
                f"{peak} checkpoints of ~{format_bytes(ckpt)} at once: training.save_total_limit "
                f"{tr.save_total_limit} and the next being written; then {contents}"
            )
        # a resumed run's checkpoints (and model) are on the disk already: they count towards its
        # peak, not against the free space left for it
        total = ckpt * peak + model
        written = _bytes_under(cfg.layout.checkpoints) + _bytes_under(cfg.layout.model)
        if written:
            contents += f": {format_bytes(total)} in all, {format_bytes(written)} of it written already"
        fixes = WORK_DIR_FIXES if peak and tr.save_total_limit > 1 else WORK_DIR_FIXES_NO_LIMIT
        checked.append(_filesystem("work_dir", work_dir, max(0.0, total - written), contents, fixes))
    if here:
        needed, contents = max(staged_on_a_node(cfg, params))
        checked.append(_filesystem("temp directory", Path(tempfile.gettempdir()), needed, contents))
    return DiskEstimate(tuple(checked), not_checked)


def staged_on_a_node(cfg: RunConfig, params: int) -> list[tuple[float, str]]:
    """What a training node writes to its temp directory, one thing at a time (each is deleted
    before the next is written): (bytes, what)."""
    model = model_bytes(cfg, params)
    staged = [(model, "the final model before it is copied to work_dir")]
    if storage.is_s3(cfg.work_dir) and _saves(cfg):
        share = checkpoint_bytes_in(cfg, params, cfg.work_dir)
        staged.append((share, "a node's share of a checkpoint before its upload"))
    if storage.is_s3(cfg.model.base_model_uri):
        staged.append((model, "the base model, staged to load it"))
    return staged


# The training pods' /tmp also holds what compiles at run time there (HOME=/tmp: DeepSpeed's ops,
# Triton's and Inductor's kernels), a few GiB on a GPU node.
POD_CACHES_BYTES = 8 * GiB


def pod_scratch_request(cfg: RunConfig, params: int) -> tuple[str, str]:
    """The ephemeral storage a cluster training pod requests for its /tmp: the largest thing it
    stages plus its caches, whole GiB; and why, for the plan's decisions. Requested so that the
    scheduler puts the pod on a node whose disk holds it, instead of the kubelet evicting it when the
    first checkpoint fills the node's disk; not a limit, which would evict it at an estimate."""
    needed, what = max(staged_on_a_node(cfg, params))
    gib = math.ceil((needed + POD_CACHES_BYTES) / GiB)
    why = (
        f"resources.kubernetes.ephemeral_storage {gib}Gi chosen: each training pod's /tmp holds at most "
        f"{what} (~{format_bytes(needed)}) and compile caches (~{format_bytes(POD_CACHES_BYTES)}); requested, not limited"
    )
    return f"{gib}Gi", why


def _saves(cfg: RunConfig) -> bool:
    return bool(cfg.training.save_steps or cfg.training.save_every_minutes)


def _visible_dir(work_dir: str, here: bool) -> tuple[Path | None, str]:
    """The directory whose filesystem holds `work_dir` as this process sees it, or why there is none."""
    if not work_dir:
        return None, "work_dir is not set yet"
    if storage.is_s3(work_dir):
        return None, "work_dir is on S3"
    path = Path(work_dir).expanduser().absolute()
    if not here:
        if path.is_dir():  # a volume mounted into plan's pod as into the training pods
            return path, ""
        return None, f"{work_dir} is not mounted in this step (the training pods' volume)"
    return _nearest_dir(path), ""  # on this machine: the directory the run's will be made in


def _bytes_under(directory: str) -> int:
    """The size of the files under a local directory; 0 when it does not exist (or when `directory`
    is empty). Files removed while it counts (another rank discarding a checkpoint) count 0."""
    root = Path(directory)
    if not directory or not root.is_dir():
        return 0
    total = 0
    for f in root.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            total += f.stat().st_size if f.is_file() else 0
    return total


def _filesystem(purpose: str, path: Path, needed: float, contents: str, fixes: str = "") -> Filesystem:
    return Filesystem(purpose, str(path), needed, contents, float(shutil.disk_usage(path).free), fixes)


class DiskFullError(OSError):
    """A write its filesystem had no room for (errno ENOSPC: permanent, the trainer exits 1)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


@contextlib.contextmanager
def failing_for_space(
    directory: str | Path, needed: float, what: str, fixes: str, partial: str | Path = ""
) -> Iterator[None]:
    """Re-raise a failed write of `what` into a local `directory` as a DiskFullError naming it when its
    filesystem has less than the `needed` bytes free, counting the `partial` part written there as
    free (the caller removes it, or a new attempt overwrites it); other failures, and any on S3,
    pass unchanged."""
    try:
        yield
    except Exception as exc:
        if storage.is_s3(str(directory)):
            raise
        try:
            free = shutil.disk_usage(_nearest_dir(Path(directory))).free + _bytes_under(str(partial))
        except OSError:
            free = math.inf  # unknown: the failure is reported as it is
        if free >= needed:
            raise
        raise DiskFullError(
            f"not enough disk for {what}: {directory} has {format_bytes(free)} free and it needs "
            f"~{format_bytes(needed)}: {fixes}"
        ) from exc


def _nearest_dir(path: Path) -> Path:
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path
