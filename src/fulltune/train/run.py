"""The `train` step: hand the plan's config and the dataset to a launcher, then check the result."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import IO

from fulltune import storage
from fulltune.config import RunConfig
from fulltune.launch.base import Launcher, LaunchError, TrainJob
from fulltune.train.args import TrainerArgs
from fulltune.train.metrics import StepRecord, TrainingSummary
from fulltune.train.recipe import MODEL_MANIFEST, finished_by_this_run, is_complete_model

log = logging.getLogger(__name__)
CLUSTER_LAUNCHERS = ("kubernetes", "trainjob")  # the launchers that create a job on Kubernetes


@dataclass(frozen=True)
class TrainingRun:
    """What a finished training run left: the complete model, its summary, one record per step."""

    model_uri: str
    summary: TrainingSummary
    records: list[StepRecord]


def train_job(cfg: RunConfig, dataset_uri: str, name: str = "fulltune-train") -> TrainJob:
    """The trainer's inputs and outputs in the run's work directory, and the topology."""
    layout = cfg.layout
    return TrainJob(
        name=name,
        args=TrainerArgs(
            config=layout.resolved_config,
            deepspeed=layout.deepspeed_config,
            dataset=dataset_uri,
            output=layout.model,
            metrics=layout.train_metrics,
            checkpoints=layout.checkpoints,
        ),
        num_nodes=cfg.resources.num_nodes,
        nproc_per_node=cfg.resources.nproc_per_node,
        accelerator=cfg.resources.accelerator,
        max_restarts=cfg.resources.kubernetes.max_restarts,
    )


def run_training(
    cfg: RunConfig,
    dataset_uri: str,
    *,
    stream: IO[str] | None = None,
    run_id: str = "",
    task_name: str = "train",
    image: str | None = None,
    optional_secrets: tuple[str, ...] = (),
) -> TrainingRun:
    """Run training with the configured launcher; returns the model URI, summary and step records.

    `run_id` and `task_name` name the Kubernetes job: the same pipeline run and task always give the
    same name, so a restarted step follows the job it already started. Without a run id (outside a
    pipeline) a fresh one is made, so an old job of the same name is never mistaken for this run's.
    `optional_secrets` reach the training pods like `resources.kubernetes.secret_env`, but may be absent.
    """
    name = "fulltune-train"
    if cfg.resources.launcher in CLUSTER_LAUNCHERS:
        from fulltune.launch.pytorchjob import job_name

        if not run_id:
            run_id = uuid.uuid4().hex
            log.info("no pipeline run id: this training run is %s", run_id)
        name = job_name(run_id, task_name or "train")
    job = train_job(cfg, dataset_uri, name=name)
    if not finished_by_this_run(cfg, job.args):
        check_before_launch(cfg, dataset_uri)
        launcher = make_launcher(
            cfg, stream=stream, run_id=run_id, image=image, optional_secrets=optional_secrets
        )
        launcher.run(job)
        if not is_complete_model(job.args.output):
            raise LaunchError(
                f"training exited 0 but {job.args.output} has no {MODEL_MANIFEST}: the model is incomplete"
            )
        _checkpoints_after_success(cfg, job.args.checkpoints)
    summary = storage.read_json(storage.join(job.args.output, MODEL_MANIFEST))["summary"]
    lines = storage.read_text(job.args.metrics).splitlines()
    return TrainingRun(
        model_uri=job.args.output,
        summary=TrainingSummary.from_json(summary),
        records=[StepRecord.from_json(json.loads(line)) for line in lines if line],
    )


def check_before_launch(cfg: RunConfig, dataset_uri: str) -> None:
    """The trainer's refusals that need only the dataset's manifest and the checkpoints' manifests,
    made before any training pod (and GPU) is asked for: fewer training sequences than one global
    batch, no eval split for `training.eval_steps`, a checkpoint to resume written by a run with other
    settings or past this run's length. TrainInputError or CheckpointError, as the ranks would exit
    with (they check again)."""
    from fulltune.preprocess.dataset import TRAIN, load_manifest
    from fulltune.train import checkpoint
    from fulltune.train.loss import check_eval_split
    from fulltune.train.schedule import make_schedule

    manifest = load_manifest(dataset_uri)
    sched = make_schedule(cfg, manifest.sequences(TRAIN), cfg.world_size)
    if cfg.training.eval_steps:
        check_eval_split(dataset_uri)
    identity = checkpoint.run_identity(cfg, manifest)
    checkpoint.check_newest(cfg.layout.checkpoints, identity, sched.total_steps)


def _checkpoints_after_success(cfg: RunConfig, root: str) -> None:
    """Delete the checkpoints of a finished run (`training.delete_checkpoints_after_success`), or say
    what they keep: the final model is complete here, so they are only needed to continue the run."""
    try:
        files = storage.list_files(root) if root else []
    except FileNotFoundError:
        files = []
    if not files:
        return
    gib = sum(storage.size(f) for f in files) / 2**30
    if cfg.training.delete_checkpoints_after_success:
        storage.remove_tree(root)
        log.info("deleted the run's checkpoints at %s (%.2f GiB): the final model is complete", root, gib)
    else:
        log.info(
            "kept the run's checkpoints at %s: %.2f GiB of model and optimizer state, needed only to continue "
            "this run (training.delete_checkpoints_after_success: true deletes them after a run like this)",
            root,
            gib,
        )


def make_launcher(
    cfg: RunConfig,
    *,
    stream: IO[str] | None = None,
    run_id: str = "",
    image: str | None = None,
    optional_secrets: tuple[str, ...] = (),
) -> Launcher:
    """`resources.launcher`: 'local' runs torchrun here; 'kubernetes' creates a PyTorchJob, 'trainjob' a
    Trainer v2 TrainJob."""
    if cfg.resources.launcher in CLUSTER_LAUNCHERS:
        from fulltune.launch.kubernetes import KubernetesLauncher

        return KubernetesLauncher(
            cfg, run_id=run_id, image=image, stream=stream, optional_secrets=optional_secrets
        )
    from fulltune.launch.local import LocalLauncher

    return LocalLauncher(stream=stream)
