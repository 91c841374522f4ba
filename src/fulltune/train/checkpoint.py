"""Checkpoints that count only when complete, and resuming from the newest complete one.

Layout: `<checkpoints>/step-00000040/` holds DeepSpeed's files (every rank's ZeRO-3 partition and
optimizer state) and `checkpoint.json`, written by rank 0 *last*, after a barrier: the list of files
with their sizes and SHA-256. A directory without it, or whose files do not match it, is not a
checkpoint. (DeepSpeed's own `latest` file is not written: it would name a tag before that tag is
complete, and `load_checkpoint` silently returns nothing when it is missing.)

Resume picks the newest complete checkpoint; a corrupt newer one is skipped with a warning. When
saved checkpoints exist but none is intact, training refuses to start rather than silently begin
again from step 0; when no save ever finished (the first one cut short), it starts from step 0.
The last `save_total_limit` complete checkpoints are kept.

`checkpoint.json` also records what the run that wrote it trained with (`run_identity`: the base
model, the training data, the batch, the optimizer and schedule, the world size); a run whose config
differs in any of these is refused at its resume (`check_continues`), naming each field, instead of
loading state that belongs to another run. Only the length may change: a run can train on longer,
or end earlier, but not before the checkpoint it resumes (`check_not_past`).

Checkpoints live in the work directory: a shared filesystem path (RWX volume) is written in place;
for s3:// each node stages its ranks' files locally and uploads them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fulltune import disk, storage

if TYPE_CHECKING:
    from fulltune.config import RunConfig
    from fulltune.preprocess.dataset import DatasetManifest

log = logging.getLogger("fulltune.train")

MANIFEST = "checkpoint.json"
_TAG = re.compile(r"^step-(\d{8})$")


# What training from a checkpoint depends on besides the checkpoint. With one of these changed a
# resumed run would not continue the run that wrote it: another base model, other batches or another
# order, another optimizer, precision or schedule; the learning rate and weight decay would silently
# stay the checkpoint's (the optimizer and scheduler state it restores holds them), and a ZeRO-3
# checkpoint only loads into the world size that wrote it. The training data is compared by its
# shards' checksums.
RESUME_FIELDS = (
    "model.base_model_uri",
    "resources.num_nodes",
    "resources.nproc_per_node",
    "training.per_device_train_batch_size",
    "training.gradient_accumulation_steps",
    "training.seed",
    "training.learning_rate",
    "training.lr_scheduler_type",
    "training.warmup_ratio",
    "training.optim",
    "training.weight_decay",
    "training.bf16",
    "training.fp16",
    # what shapes the training data and what each sequence attends to: named here, where the data's
    # checksum below would only say that it differs
    "preprocess.max_seq_len",
    "preprocess.packing",
    "preprocess.replay_fraction",
    "preprocess.attend_across_documents",
)
# A run may be resumed to train longer (or shorter, down to the checkpoint's step: `check_not_past`):
# the schedule is built from the config, so from the checkpoint on it follows the new length, which
# the log says.
LENGTH_FIELDS = ("training.max_steps", "training.num_train_epochs")
TRAINING_DATA = "the training data (its shards' SHA-256)"


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be used; training must not silently restart from step 0."""


def run_identity(cfg: RunConfig, dataset: DatasetManifest) -> dict[str, Any]:
    """What a checkpoint records of the run writing it, for `check_continues` to compare."""
    from fulltune.preprocess.dataset import TRAIN

    identity = {name: cfg.value(name) for name in (*RESUME_FIELDS, *LENGTH_FIELDS)}
    checksums = "".join(f.sha256 for f in dataset.split(TRAIN).files)
    identity[TRAINING_DATA] = hashlib.sha256(checksums.encode()).hexdigest()[:16]
    return identity


def check_config_continues(root: str, cfg: RunConfig) -> None:
    """`check_recorded` for the newest saved checkpoint under `root`, on the config's fields alone:
    what plan checks before preprocessing makes the data again (and rewrites the run's shards)."""
    tag = newest_saved(root)
    if tag is None:
        return
    identity = {name: cfg.value(name) for name in (*RESUME_FIELDS, *LENGTH_FIELDS)}
    base = storage.join(root, tag)
    recorded = storage.read_json(storage.join(base, MANIFEST)).get("run") or {}
    check_recorded({k: v for k, v in recorded.items() if k in identity}, identity, base)


def check_continues(root: str, tag: str, identity: dict[str, Any]) -> list[str]:
    """`check_recorded` for checkpoint `tag`."""
    base = storage.join(root, tag)
    recorded = storage.read_json(storage.join(base, MANIFEST)).get("run") or {}
    return check_recorded(recorded, identity, base)


def check_recorded(recorded: dict[str, Any], identity: dict[str, Any], where: str) -> list[str]:
    """CheckpointError naming every field in which this run (`identity`) differs from the run that
    wrote `where` (a checkpoint, a model; `recorded` its `run_identity`), but its length; returns the
    length's changes, as 'FIELD: OLD when it was written, NEW in this run'. An empty record (written
    before checkpoints recorded their run) is taken as it is."""
    changed = {
        name: f"{name}: {recorded[name]!r} when it was written, {identity.get(name)!r} in this run"
        for name in recorded
        if recorded[name] != identity.get(name)
    }
    refused = [f"  - {change}" for name, change in changed.items() if name not in LENGTH_FIELDS]
    if refused:
        raise CheckpointError(
            f"{where} was written by a run that trained with other settings, so resuming it would not "
            "continue that run:\n" + "\n".join(refused) + "\nSet them back to continue that run, or train "
            "with them in a new run."
        )
    return [change for name, change in changed.items() if name in LENGTH_FIELDS]


def saved_tags(root: str) -> list[str]:
    """The checkpoints whose save finished (their manifest written; files not verified), newest first."""
    return _finished(root, list_tags(root)) if root else []


def _finished(root: str, tags: list[str]) -> list[str]:
    """The `tags` whose save finished: their manifest is written."""
    return [t for t in tags if storage.exists(storage.join(root, t, MANIFEST))]


def newest_saved(root: str) -> str | None:
    """The newest checkpoint whose save finished."""
    return next(iter(saved_tags(root)), None)


def check_newest(root: str, identity: dict[str, Any], total_steps: int) -> None:
    """`check_continues` and `check_not_past` for the newest saved checkpoint, if any: what the ranks
    will resume from, checked before any of them is started (they verify its files)."""
    tag = newest_saved(root)
    if tag is None:
        return
    longer = check_continues(root, tag, identity)
    check_not_past(root, tag, total_steps)
    if longer:
        log.info("resuming %s with another length (%s)", storage.join(root, tag), "; ".join(longer))


def check_not_past(root: str, tag: str, total_steps: int) -> None:
    """CheckpointError when checkpoint `tag` has taken more steps than a run of `total_steps` takes:
    no step would train, and the model saved would be the checkpoint's, longer than this run asks."""
    step = step_of(tag)
    if step > total_steps:
        raise CheckpointError(
            f"{storage.join(root, tag)} has trained {step} steps, more than the {total_steps} this run "
            f"is set to (training.max_steps, or training.num_train_epochs): a run cannot be resumed to "
            f"end before its checkpoint. Set a length of at least {step} steps to continue it, or train "
            "the shorter run in a new run."
        )


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def list_tags(root: str) -> list[str]:
    """Checkpoint directories under root, newest first (complete or not)."""
    return sorted((n for n in storage.children(root) if _TAG.match(n)), reverse=True)


def step_of(tag: str) -> int:
    m = _TAG.match(tag)
    if not m:
        raise ValueError(f"not a checkpoint tag: {tag}")
    return int(m.group(1))


def verify(root: str, tag: str) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    base = storage.join(root, tag)
    manifest_uri = storage.join(base, MANIFEST)
    if not storage.exists(manifest_uri):
        return "no checkpoint.json: the save did not finish"
    try:
        manifest = storage.read_json(manifest_uri)
        for f in manifest["files"]:
            uri = storage.join(base, f["path"])
            if not storage.exists(uri):
                return f"{f['path']} is missing"
            if storage.sha256_uri(uri) != f["sha256"]:
                return f"{f['path']} does not match its SHA-256"
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable manifest: {exc}"
    return None


def find_resume(root: str) -> str | None:
    """The newest complete checkpoint's tag; None when no save ever finished; CheckpointError when
    saves finished but none of their checkpoints is usable.

    Only a finished save (its manifest written) holds progress a restart from step 0 would lose.
    Directories without one are saves cut short (a rank preempted while the first checkpoint was
    written): refusing on them would make the restart of such a run fail for good (exit 1), where
    starting again loses nothing a checkpoint held."""
    tags = list_tags(root)
    for tag in tags:
        problem = verify(root, tag)
        if problem is None:
            return tag
        log.warning("checkpoint %s is not usable (%s); trying an older one", storage.join(root, tag), problem)
    if saved := saved_tags(root):
        raise CheckpointError(
            f"{root}: {len(saved)} saved checkpoint(s) ({', '.join(saved)}) but none is complete and "
            "intact; refusing to start again from step 0. Remove the directory to start over deliberately."
        )
    if tags:
        log.warning(
            "%s: no checkpoint save finished (%s cut short before its manifest): starting from step 0",
            root,
            ", ".join(tags),
        )
    return None


def newest_complete(root: str, steps: set[int]) -> str | None:
    """The newest complete checkpoint among those of `steps` (steps done); None when none is left."""
    for tag in list_tags(root):
        if step_of(tag) in steps:
            problem = verify(root, tag)
            if problem is None:
                return tag
            log.warning("checkpoint %s is not usable (%s)", storage.join(root, tag), problem)
    return None


def _staging(root: str) -> Path:
    """A node-local directory for s3:// checkpoints, the same path for every rank of the node and
    another for each node (torchrun's GROUP_RANK): nodes that share a machine (the local launcher's)
    must not upload or remove each other's files. Removed whole once uploaded or loaded: DeepSpeed
    also writes its zero_to_fp32 scripts beside the tag."""
    digest = hashlib.sha256(root.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir(), f"fulltune-ckpt-{digest}-node{os.environ.get('GROUP_RANK', '0')}")


def save(
    engine,
    root: str,
    step: int,
    client_state: dict[str, Any],
    *,
    identity: dict[str, Any],
    rank: int,
    local_rank: int,
    keep: int,
    needed_bytes: float,
) -> str:
    """Every rank writes its part; after a barrier rank 0 writes the manifest (last, with the run's
    `identity`) and rotates. `needed_bytes`: what the checkpoint takes where this node writes it
    (`disk.checkpoint_bytes_in`), to tell a full disk from another failure."""
    import torch.distributed as dist

    tag = tag_for(step)
    remote = storage.is_s3(root)
    target = _staging(root) if remote else Path(root)
    fixes = disk.temp_dir_fixes() if remote else disk.WORK_DIR_FIXES
    try:
        with disk.failing_for_space(target, needed_bytes, f"checkpoint {tag}", fixes, partial=target / tag):
            engine.save_checkpoint(str(target), tag=tag, client_state=client_state, save_latest=False)
    except disk.DiskFullError:
        # the part written would keep the disk full until the next save rotated it away
        shutil.rmtree(target / tag, ignore_errors=True)
        raise
    dist.barrier()
    if remote and local_rank == 0:
        storage.upload_dir(target / tag, storage.join(root, tag))
        shutil.rmtree(target, ignore_errors=True)
    dist.barrier()
    if rank == 0:
        base = storage.join(root, tag)
        prefix = base.rstrip("/") + "/"
        files = [f for f in storage.list_files(base) if not f.endswith("/" + MANIFEST)]
        entries = [
            {
                "path": f[len(prefix) :] if remote else str(Path(f).relative_to(base)),
                "size": storage.size(f),
                "sha256": storage.sha256_uri(f),
            }
            for f in files
        ]
        storage.write_json(storage.join(base, MANIFEST), {"step": step, "run": identity, "files": entries})
        rotate(root, keep, step)
        log.info("checkpoint %s complete (%d files)", base, len(entries))
    dist.barrier()
    return tag


def rotate(root: str, keep: int, saved_step: int) -> None:
    """After the save of step `saved_step`: keep the newest `keep` complete checkpoints up to it;
    remove older ones, stale incomplete ones, and any of a later step. Those are checkpoints the run
    resumed past because they were unusable (corrupt, or cut short): counted among the newest, they
    would have pushed out the intact ones, even the one just written."""
    tags = list_tags(root)
    for tag in tags:
        if step_of(tag) > saved_step:
            log.warning("removing %s: resuming passed over it as unusable", storage.join(root, tag))
            storage.remove_tree(storage.join(root, tag))
    kept = [t for t in tags if step_of(t) <= saved_step]
    complete = _finished(root, kept)
    if not complete:
        return
    newest = step_of(complete[0])
    for tag in kept:
        stale_incomplete = tag not in complete and step_of(tag) < newest
        if (tag in complete and complete.index(tag) >= keep) or stale_incomplete:
            storage.remove_tree(storage.join(root, tag))


def load(engine, root: str, tag: str, *, local_rank: int) -> dict[str, Any]:
    """Load model, optimizer and scheduler state; returns the client state saved with it.

    The files are read without unpickling anything but tensors, plain containers and the few
    DeepSpeed types its checkpoints hold (`weights_only_checkpoint_engine`): whoever can write the work
    directory must not be able to run code in the training pods. Staged s3:// copies are removed
    once loaded (they hold the full optimizer state).
    """
    import torch.distributed as dist

    remote = storage.is_s3(root)
    path = _staging(root) if remote else Path(root)
    if remote:
        if local_rank == 0:
            with storage.local_dir(storage.join(root, tag)) as src:
                shutil.copytree(src, path / tag, dirs_exist_ok=True)
        dist.barrier()
    engine.checkpoint_engine = weights_only_checkpoint_engine(storage.join(root, tag))
    try:
        loaded, client_state = engine.load_checkpoint(
            str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    finally:
        if remote:
            dist.barrier()  # every rank of the node has read its files
            if local_rank == 0:
                shutil.rmtree(path, ignore_errors=True)
    if loaded is None:
        raise CheckpointError(f"{storage.join(root, tag)}: DeepSpeed could not load this checkpoint")
    return client_state or {}


def _safe_globals() -> list[type]:
    """The classes DeepSpeed pickles into its ZeRO checkpoints besides tensors and containers
    (seen in 0.19: the ZeRO stage enum and the loss scaler)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def weights_only_checkpoint_engine(where: str):
    """(A factory, so that deepspeed is imported only by the trainer.) DeepSpeed's torch checkpoint
    engine, loading with `torch.load(weights_only=True)` and only
    `_safe_globals()` allowed; anything else in a file is a CheckpointError naming it."""
    import pickle

    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class _Engine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(_safe_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as exc:
                reason = str(exc).split("\n")[0].split(". ")[-1] if str(exc) else type(exc).__name__
                raise CheckpointError(
                    f"{where}: refused to load {Path(path).name}: it holds more than tensors and DeepSpeed's "
                    f"own state ({reason}). Someone may have written into the work directory; check it, "
                    "and remove the checkpoint to resume from an older one."
                ) from None

    return _Engine()
