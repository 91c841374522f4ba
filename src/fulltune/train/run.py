"""The `train` step: hand the plan's config and the dataset to a launcher, then check the result."""

from __future__ import annotations

import json
from typing import IO, Any

from fulltune import storage
from fulltune.config import RunConfig
from fulltune.launch.base import LaunchError, TrainJob
from fulltune.plan import plan_uris
from fulltune.train.recipe import MODEL_MANIFEST, is_complete_model


def train_job(cfg: RunConfig, work_dir: str, dataset_uri: str, name: str = "fulltune-train") -> TrainJob:
    uris = plan_uris(work_dir)
    return TrainJob(
        name=name,
        config_uri=uris["config"],
        deepspeed_uri=uris["deepspeed"],
        dataset_uri=dataset_uri,
        output_uri=model_uri(work_dir),
        metrics_uri=storage.join(work_dir, "train", "metrics.jsonl"),
        checkpoints_uri=storage.join(work_dir, "train", "checkpoints"),
        num_nodes=cfg.resources.num_nodes,
        nproc_per_node=cfg.resources.nproc_per_node,
        accelerator=cfg.resources.accelerator,
    )


def model_uri(work_dir: str) -> str:
    return storage.join(work_dir, "train", "model")


def run_training(
    cfg: RunConfig, work_dir: str, dataset_uri: str, *, stream: IO[str] | None = None
) -> dict[str, Any]:
    """Run training with the configured launcher; returns the model URI, summary and step metrics."""
    from fulltune.launch.local import LocalLauncher

    job = train_job(cfg, work_dir, dataset_uri)
    LocalLauncher(stream=stream).run(job)
    if not is_complete_model(job.output_uri):
        raise LaunchError(
            f"training exited 0 but {job.output_uri} has no {MODEL_MANIFEST}: the model is incomplete"
        )
    summary = storage.read_json(storage.join(job.output_uri, MODEL_MANIFEST))["summary"]
    metrics = [json.loads(line) for line in storage.read_text(job.metrics_uri).splitlines() if line]
    return {"model_uri": job.output_uri, "summary": summary, "metrics": metrics}
