"""The pipeline's steps as plain functions: what each KFP component body calls, in one line.

Nothing here imports KFP. Every step takes the run's `RunConfig` (the component turns the pipeline
parameter into one at the boundary) and URIs; outputs that people look at (reports, metrics) go to
local paths that KFP turns into artifacts, and `log_metric(name, value)` feeds the step's Metrics
artifact. Large data stays in the run's work directory (`cfg.layout`) and travels as URIs.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fulltune import failure, mlflow_run, storage
from fulltune.config import RunConfig
from fulltune.layout import EVAL_FILE, EVAL_REPORT_FILE, RunLayout

log = logging.getLogger("fulltune")

MetricSink = Callable[[str, float], None]


def _setup_process() -> None:
    """What each step does first: its log to stdout, a quick exit once it returns, and a stop of its
    own if the local run that started it is killed."""
    from fulltune import _logging, _process

    _logging.setup("stdout")
    _process.exit_without_final_collection()
    _process.stop_with_run_owner()


def _failure_recorded(cfg: RunConfig, step: str) -> contextlib.AbstractContextManager[None]:
    """The step's failure written into its run's directory (`fulltune.failure`); a step called
    outside a run has none to write it into: `fulltune registry register` with no work_dir, or with
    the config as written, whose work_dir is where runs are made. A record there would be listed by
    `fulltune runs` as a run named "failures"."""
    in_run = bool(cfg.work_dir) and storage.exists(cfg.layout.resolved_config)  # plan wrote it
    return failure.recorded(cfg.layout, step) if in_run else contextlib.nullcontext()


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


def _write_out(text: str, dest: str | None) -> None:
    if dest:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_text(text)


# -- configure -----------------------------------------------------------------------------------------


def configure(
    config: dict[str, Any] | None, values: dict[str, Any], scheduled_time: str = "", created_time: str = ""
) -> dict[str, Any]:
    """The pipeline's typed parameters merged into `config` (`fulltune.parameters.resolve`), with
    what must be fixed once per run fixed (`run_inputs`): the mapping every later step receives.
    A conflict, an invalid field or a field the run needs left empty fails here, before any data is read."""
    from fulltune.config import ConfigError, RunConfig, deep_merge
    from fulltune.parameters import BY_NAME, resolve

    _setup_process()
    merged = resolve(config, values)
    set_here = [f"{n}={v!r}" for n, v in values.items() if BY_NAME[n].is_set(v)]
    log.info("typed parameters set: %s", ", ".join(set_here) if set_here else "none (config only)")
    cfg = RunConfig.from_pipeline(merged)
    missing = cfg.missing_to_run()
    if missing:
        raise ConfigError("the run cannot start:\n  - " + "\n  - ".join(missing))
    return deep_merge(merged, run_inputs(cfg, scheduled_time, created_time))


def run_inputs(cfg: RunConfig, scheduled_time: str = "", created_time: str = "") -> dict[str, Any]:
    """The config changes that fix a run's inputs once, so every later step and the lineage see the
    same ones: the run's date and the partitions of `{date}` data URIs (`fulltune.data.window`: the
    scheduled time, else the creation time, else now), and a `registry://` base model resolved to
    the committed version its pointer names now, with the original base it descends from."""
    from fulltune.config import deep_merge
    from fulltune.data.window import fix_window
    from fulltune.registry import pointers

    changes = fix_window(cfg, scheduled_time, created_time)
    if changes:
        data = changes["data"]
        windows = ", ".join(f"{k}={v}" for k, v in data.items() if k != "as_of")
        log.info("data window: %d day(s) to %s: %s", cfg.data.window_days, data["as_of"], windows)
    if pointers.is_ref(cfg.model.base_model_uri):
        cfg.require("registry.uri")
        ref = pointers.resolve_ref(cfg.model.base_model_uri, cfg.registry.uri)
        log.info("base model: %s is %s v%d (%s)", cfg.model.base_model_uri, ref.name, ref.version, ref.uri)
        model = {"base_model_uri": ref.uri, "original_base_model_uri": ref.original_base_model_uri}
        changes = deep_merge(changes, {"model": model})
    return changes


def run_input_fields(cfg: RunConfig) -> list[str]:
    """The fields `run_inputs` fixes for `cfg`, named without reading the registry: what a resumed
    run takes from the config it started with (whose registry pointer may have moved or gone)."""
    from fulltune.data.window import fix_window
    from fulltune.registry import pointers

    fields = [f"data.{name}" for name in fix_window(cfg).get("data", {})]
    if pointers.is_ref(cfg.model.base_model_uri):
        fields += ["model.base_model_uri", "model.original_base_model_uri"]
    return fields


# -- validate_data / check_tokenizer --------------------------------------------------------------


def _report_step(
    run: Callable[..., dict],
    step: str,
    cfg: RunConfig,
    report_path: str | None,
    log_metric: MetricSink | None,
    run_id: str = "",
) -> dict:
    """Run a checking step that writes report.json/html. The HTML goes to the step's artifact and,
    in a pipeline run, into the run's work directory (`RunLayout.check_report`), whether the step
    passes or fails: KFP uploads a failed step's artifacts nowhere, so a failure's message points to
    the work directory's copy (the temporary directory is gone by the time anyone reads it), and the
    failure is recorded there as every later step's is (`fulltune.failure`)."""
    _setup_process()
    run_layout = RunLayout.for_run(cfg.work_dir, run_id) if run_id and cfg.work_dir else None
    kept = run_layout.check_report(step) if run_layout else None
    where = kept or (
        f"{report_path} (this step's `report` artifact)" if report_path else "not kept (no report_path)"
    )
    recorded = failure.recorded(run_layout, step) if run_layout else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix=f"fulltune-{step}-") as tmp, recorded:
        try:
            report = run(cfg, Path(tmp), report_location=where)
        finally:
            if Path(tmp, "report.html").exists():
                _copy_out(Path(tmp, "report.html"), report_path)
                if kept:
                    _keep_report(Path(tmp, "report.html"), kept)
    _log_metrics(log_metric, report["metrics"])
    return report


def _keep_report(src: Path, dest: str) -> None:
    """Best effort: a work directory that cannot take the report must not hide the step's own outcome."""
    try:
        storage.upload_file(src, dest)
    except Exception as exc:  # noqa: BLE001 — logged; the step's result (or its error) stands
        log.warning("could not keep the report at %s: %s", dest, exc)


def validate_data(
    cfg: RunConfig, report_path: str | None = None, log_metric: MetricSink | None = None, run_id: str = ""
) -> dict:
    """Parse every record; fail the run when the error budget is exceeded (report written first)."""
    from fulltune.data.validate import validate_data as run

    return _report_step(run, "validate_data", cfg, report_path, log_metric, run_id)


def check_tokenizer(
    cfg: RunConfig, report_path: str | None = None, log_metric: MetricSink | None = None, run_id: str = ""
) -> dict:
    """Special tokens, vocabulary vs embedding, truncation, how domain words split."""
    from fulltune.tokenizer.check import check_tokenizer as run

    return _report_step(run, "check_tokenizer", cfg, report_path, log_metric, run_id)


# -- plan ---------------------------------------------------------------------------------------------


def plan(
    cfg: RunConfig, run_id: str, report_path: str | None = None, log_metric: MetricSink | None = None
) -> RunConfig:
    """Resolve the config (defaults from rules, memory fit) and scope it to this run.

    Returns the resolved config, its work_dir now the run's own directory (`RunLayout.for_run`).
    """
    from fulltune.plan import make_plan, plan_markdown, write_plan

    _setup_process()
    scoped = cfg.with_overrides({"work_dir": RunLayout.for_run(cfg.work_dir, run_id).root})
    resolved_plan = make_plan(scoped)
    write_plan(resolved_plan)
    markdown = plan_markdown(resolved_plan)
    log.info("\n%s", markdown)
    _write_out(markdown, report_path)
    training = resolved_plan.config.training
    _log_metrics(
        log_metric,
        {
            "parameters": resolved_plan.shape.params,
            "memory_per_gpu_gib": resolved_plan.memory.total / 1024**3,
            "learning_rate": training.learning_rate,
            "num_train_epochs": training.num_train_epochs,
            "train_tokens_estimate": resolved_plan.train_tokens_estimate,
            **(
                {"estimated_gpu_hours": cost.gpu_hours, "estimated_wall_hours": cost.wall_hours}
                if (cost := resolved_plan.cost)
                else {}
            ),
        },
    )
    return resolved_plan.config


def shard_indices(cfg: RunConfig) -> list[int]:
    """The shards preprocessing fans out over: 0 .. preprocess.num_shards - 1."""
    return list(range(cfg.preprocess.num_shards))


# -- preprocess -------------------------------------------------------------------------------------


def preprocess_shard(cfg: RunConfig, shard: int) -> str:
    """Tokenize and pack one shard; returns the shard manifest URI (skips a complete shard)."""
    from fulltune.preprocess.core import preprocess_shard as run

    _setup_process()
    with _failure_recorded(cfg, f"preprocess-shard-{shard}"):
        run(cfg, shard)
        return cfg.layout.shard_manifest(shard)


def gather_shards(cfg: RunConfig, shard_manifests: list[str], log_metric: MetricSink | None = None) -> str:
    """Merge shard manifests into the dataset manifest; returns its URI."""
    from fulltune.preprocess.core import PreprocessError, empty_eval_splits
    from fulltune.preprocess.core import gather_shards as run

    _setup_process()
    with _failure_recorded(cfg, "gather-shards"):
        manifest = run(cfg, sorted(shard_manifests))
        if empty := empty_eval_splits(cfg, manifest):
            raise PreprocessError("; ".join(empty))
        for name, split in manifest.splits.items():
            log.info(
                "%s: %d sequences, %d tokens, %.1f%% padding, %d over-long examples truncated, %d dropped",
                name,
                split.sequences,
                split.tokens,
                100 * split.padding_fraction,
                split.truncated,
                split.dropped,
            )
            counts = split.model_dump(
                include={"sequences", "tokens", "padding_fraction", "truncated", "dropped"}
            )
            _log_metrics(log_metric, counts, f"{name}_")
        if replay := manifest.replay:
            log.info(
                "replay: %.1f%% of the training tokens (configured %.1f%%), %.1f%% of its loss tokens",
                100 * replay.achieved_fraction,
                100 * replay.configured_fraction,
                100 * (replay.achieved_loss_fraction or 0.0),
            )
            shares = {
                "replay_fraction_achieved": replay.achieved_fraction,
                "replay_loss_fraction_achieved": replay.achieved_loss_fraction,
            }
            _log_metrics(log_metric, shares)
        return cfg.layout.dataset_manifest


# -- train --------------------------------------------------------------------------------------------


def train(
    cfg: RunConfig,
    dataset: str,
    report_path: str | None = None,
    log_metric: MetricSink | None = None,
    *,
    run_id: str = "",
    task_name: str = "train",
    image: str | None = None,
    s3_secret: str = "",
    mlflow_secret: str = "",
) -> str:
    """Launch the ranks, stream their log, return the tuned model's URI.

    `run_id` and `task_name` (the pipeline run and this task) give the Kubernetes job its stable name;
    `image` is the training image when `resources.kubernetes.image` is not set; `s3_secret` names the
    Secret the pipeline's own pods read S3 credentials from, which the training pods read too, and
    `mlflow_secret` the one with the MLflow server and credentials (both optional there, names only).
    """
    from fulltune.train.metrics import training_metrics
    from fulltune.train.run import run_training
    from fulltune.train.train_page import training_report_html

    _setup_process()
    with _failure_recorded(cfg, "train"):
        run = run_training(
            cfg,
            dataset,
            run_id=run_id,
            task_name=task_name,
            image=image or None,
            optional_secrets=tuple(s for s in (s3_secret, mlflow_secret) if s),
        )
        _log_metrics(log_metric, training_metrics(run.records, run.summary))
        _write_out(training_report_html(run.records, run.summary), report_path)
        return run.model_uri


# -- evaluate -----------------------------------------------------------------------------------------


def evaluate(
    cfg: RunConfig,
    model_uri: str,
    dataset: str,
    report_path: str | None = None,
    eval_path: str | None = None,
    log_metric: MetricSink | None = None,
) -> bool:
    """Base vs tuned on the domain and general sets and the configured multiple-choice, exact-match
    generation and lm-eval tasks; returns the verdict (reasons are logged)."""
    from fulltune.evaluate.champion import resolve as resolve_champion
    from fulltune.evaluate.core import evaluate_models

    _setup_process()
    with _failure_recorded(cfg, "evaluate"):
        champion = resolve_champion(cfg)
        with tempfile.TemporaryDirectory(prefix="fulltune-eval-") as tmp:
            # forgetting (and the domain gain) are measured against the original pre-trained model, also
            # when this run started from a registered version
            result = evaluate_models(
                cfg, cfg.model.original_model_uri, model_uri, dataset, Path(tmp), champion=champion
            )
            storage.upload_dir(tmp, cfg.layout.eval_dir)
            _copy_out(Path(tmp, EVAL_REPORT_FILE), report_path)
            _copy_out(Path(tmp, EVAL_FILE), eval_path)
            metrics = result.kfp_metrics()
            files = {name: str(Path(tmp, name)) for name in (EVAL_FILE, EVAL_REPORT_FILE)}
            mlflow_run.record_evaluation(cfg, metrics, result.verdict, result.reasons, files)
        _log_metrics(log_metric, metrics)
        log.info("verdict: %s", "PASS" if result.verdict else "FAIL (the model will not be registered)")
        for reason in result.reasons:
            log.info("  - %s", reason)
        return result.verdict


# -- register -----------------------------------------------------------------------------------------


def register(cfg: RunConfig, model_uri: str, eval_path: str, run_id: str = "", force: bool = False) -> str:
    """Publish an immutable, checksummed version; returns its URI.

    A retry with the same `run_id` returns the version that run already committed. With
    `registry.kubeflow` set, the version is also recorded in the Kubeflow Model Registry (token from
    $MODEL_REGISTRY_TOKEN or the pod's service-account token). `force` registers a model whose gate
    failed, recorded as forced in the lineage.
    """
    from fulltune.evaluate.result import EvalResult
    from fulltune.lineage import build_lineage
    from fulltune.registry.store import register_model

    _setup_process()
    with _failure_recorded(cfg, "register"):
        eval_result = EvalResult.load(eval_path)
        lineage = build_lineage(cfg, run_id=run_id, model_uri=model_uri)
        uri = register_model(cfg, model_uri, eval_result, lineage, force=force, run_id=run_id)
        log.info("registered %s", uri)
        mlflow_run.record_registration(cfg, uri)
        return uri
