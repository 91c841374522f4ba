"""The pipeline's steps as plain functions: what each KFP component body calls, in one line.

Nothing here imports KFP. Inputs are the config dict (a RunConfig as the pipeline carries it) and
URIs; outputs that people look at (reports, metrics) go to local paths that KFP turns into
artifacts, and `log_metric(name, value)` feeds the step's Metrics artifact. Large data stays in
the run-scoped work directory and travels as URIs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fulltune import storage
from fulltune.config import ConfigError, RunConfig

log = logging.getLogger("fulltune")

MetricSink = Callable[[str, float], None]


def _setup_logging() -> None:
    from fulltune import _logging

    _logging.setup("stdout")


def _log_metrics(log_metric: MetricSink | None, metrics: dict[str, Any], prefix: str = "") -> None:
    if log_metric is None:
        return
    for key, value in sorted(metrics.items()):
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)):
            log_metric(f"{prefix}{key}", float(value))


def _copy_out(src: Path, dest: str | None) -> None:
    if dest:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)


def load_config(config: dict[str, Any]) -> RunConfig:
    return RunConfig.from_dict(config, source="pipeline parameter 'config'")


# -- validate_data / check_tokenizer --------------------------------------------------------------


def _report_step(
    run: Callable[[RunConfig, Path], dict],
    prefix: str,
    config: dict[str, Any],
    report_path: str | None,
    log_metric: MetricSink | None,
) -> dict:
    """Run a checking step that writes report.json/html; the HTML reaches KFP even when the step fails."""
    _setup_logging()
    cfg = load_config(config)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        try:
            report = run(cfg, Path(tmp))
        finally:
            if Path(tmp, "report.html").exists():
                _copy_out(Path(tmp, "report.html"), report_path)
    _log_metrics(log_metric, report.get("metrics", {}))
    return report


def validate_data(
    config: dict[str, Any], report_path: str | None = None, log_metric: MetricSink | None = None
) -> dict:
    """Parse every record; fail the run when the error budget is exceeded (report written first)."""
    from fulltune.data.validate import validate_data as run

    return _report_step(run, "fulltune-validate-", config, report_path, log_metric)


def check_tokenizer(
    config: dict[str, Any], report_path: str | None = None, log_metric: MetricSink | None = None
) -> dict:
    """Special tokens, vocabulary vs embedding, truncation, how domain words split."""
    from fulltune.tokenizer.check import check_tokenizer as run

    return _report_step(run, "fulltune-tokenizer-", config, report_path, log_metric)


# -- plan ---------------------------------------------------------------------------------------------


def run_work_dir(cfg: RunConfig, run_id: str) -> str:
    if not cfg.work_dir:
        raise ConfigError(
            "work_dir: required (a local directory or s3:// prefix for this run's data and model)"
        )
    if not run_id:
        raise ConfigError("run_id is empty: cannot scope the work directory to this run")
    return storage.join(cfg.work_dir, run_id)


def plan(
    config: dict[str, Any], run_id: str, report_path: str | None = None, log_metric: MetricSink | None = None
) -> dict[str, Any]:
    """Resolve the config (defaults from rules, memory fit) and scope it to this run.

    Returns the resolved config, its work_dir now scoped to the run.
    """
    from fulltune.plan import make_plan, plan_markdown, write_plan

    _setup_logging()
    cfg = load_config(config)
    work_dir = run_work_dir(cfg, run_id)
    p = make_plan(cfg)
    p.config["work_dir"] = work_dir
    write_plan(p, work_dir)
    md = plan_markdown(p)
    log.info("\n%s", md)
    if report_path:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(md)
    _log_metrics(
        log_metric,
        {
            "parameters": p.shape.params,
            "memory_per_gpu_gib": p.memory.total / 1024**3,
            "learning_rate": p.config["training"]["learning_rate"],
            "num_train_epochs": p.config["training"]["num_train_epochs"],
            "train_tokens_estimate": p.train_tokens_estimate,
        },
    )
    return p.config


def list_shards(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One work item per shard; each carries the config, so a loop iteration needs only its item."""
    return [{"shard": i, "config": config} for i in range(load_config(config).preprocess.num_shards)]


# -- preprocess -------------------------------------------------------------------------------------


def preprocess_shard(config: dict[str, Any], shard: int) -> str:
    """Tokenize and pack one shard; returns the shard manifest URI (skips a complete shard)."""
    from fulltune.preprocess.core import preprocess_shard as run
    from fulltune.preprocess.core import shard_manifest_uri

    _setup_logging()
    cfg = load_config(config)
    run(cfg, cfg.work_dir, shard)
    return shard_manifest_uri(cfg.work_dir, shard)


def gather_shards(
    config: dict[str, Any], shard_manifests: list[str], log_metric: MetricSink | None = None
) -> str:
    """Merge shard manifests into the dataset manifest; returns its URI."""
    from fulltune.preprocess.core import dataset_manifest_uri
    from fulltune.preprocess.core import gather_shards as run

    _setup_logging()
    cfg = load_config(config)
    manifest = run(cfg, cfg.work_dir, sorted(shard_manifests))
    for split, s in manifest["splits"].items():
        log.info(
            "%s: %d sequences, %d tokens, %.1f%% padding, %d over-long examples truncated, %d dropped",
            split,
            s["sequences"],
            s["tokens"],
            100 * s["padding_fraction"],
            s.get("truncated", 0),
            s.get("dropped", 0),
        )
        _log_metrics(
            log_metric,
            {
                "sequences": s["sequences"],
                "tokens": s["tokens"],
                "padding_fraction": s["padding_fraction"],
                "truncated": s.get("truncated", 0),
                "dropped": s.get("dropped", 0),
            },
            f"{split}_",
        )
    if manifest.get("replay"):
        _log_metrics(log_metric, {"replay_fraction_achieved": manifest["replay"]["achieved_fraction"]})
    return dataset_manifest_uri(cfg.work_dir)


# -- train --------------------------------------------------------------------------------------------


def train(
    config: dict[str, Any],
    dataset: str,
    report_path: str | None = None,
    log_metric: MetricSink | None = None,
    *,
    run_id: str = "",
    task_name: str = "train",
    image: str | None = None,
    s3_secret: str = "",
) -> str:
    """Launch the ranks, stream their log, return the tuned model's URI.

    `run_id` and `task_name` (the pipeline run and this task) give the Kubernetes job its stable name;
    `image` is the training image when `resources.kubernetes.image` is not set; `s3_secret` names the
    Secret the pipeline's own pods read S3 credentials from, which the training pods read too.
    """
    from fulltune.train.report import training_report_html
    from fulltune.train.run import run_training

    _setup_logging()
    cfg = load_config(config)
    result = run_training(
        cfg,
        cfg.work_dir,
        dataset,
        run_id=run_id,
        task_name=task_name,
        image=image or None,
        optional_secrets=(s3_secret,) if s3_secret else (),
    )
    summary = result["summary"]
    _log_metrics(log_metric, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
    if report_path:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(training_report_html(result["metrics"], summary))
    return result["model_uri"]


# -- evaluate -----------------------------------------------------------------------------------------


def eval_dir(work_dir: str) -> str:
    return storage.join(work_dir, "eval")


def evaluate(
    config: dict[str, Any],
    model_uri: str,
    dataset: str,
    report_path: str | None = None,
    eval_path: str | None = None,
    log_metric: MetricSink | None = None,
) -> bool:
    """Base vs tuned on the domain and general sets and the configured multiple-choice, exact-match
    generation and lm-eval tasks; returns the verdict (reasons are logged)."""
    from fulltune.evaluate.core import evaluate_models

    _setup_logging()
    cfg = load_config(config)
    with tempfile.TemporaryDirectory(prefix="fulltune-eval-") as tmp:
        result = evaluate_models(cfg, cfg.model.base_model_uri, model_uri, dataset, Path(tmp))
        storage.upload_dir(tmp, eval_dir(cfg.work_dir))
        _copy_out(Path(tmp, "report.html"), report_path)
        _copy_out(Path(tmp, "eval.json"), eval_path)
    _log_metrics(log_metric, result["metrics"])
    log.info("verdict: %s", "PASS" if result["verdict"] else "FAIL (the model will not be registered)")
    for reason in result["reasons"]:
        log.info("  - %s", reason)
    return bool(result["verdict"])


# -- register -----------------------------------------------------------------------------------------


def register(
    config: dict[str, Any], model_uri: str, eval_path: str, run_id: str = "", force: bool = False
) -> str:
    """Publish an immutable, checksummed version; returns its URI.

    A retry with the same `run_id` returns the version that run already committed. With
    `registry.kubeflow` set, the version is also recorded in the Kubeflow Model Registry (token from
    $MODEL_REGISTRY_TOKEN or the pod's service-account token). `force` registers a model whose gate
    failed, recorded as forced in the lineage.
    """
    from fulltune.lineage import build_lineage
    from fulltune.registry.store import register_model

    _setup_logging()
    cfg = load_config(config)
    eval_result = storage.read_json(eval_path)
    lineage = build_lineage(cfg, run_id=run_id, model_uri=model_uri)
    uri = register_model(cfg, model_uri, eval_result, lineage, force=force, run_id=run_id)
    log.info("registered %s", uri)
    return uri
