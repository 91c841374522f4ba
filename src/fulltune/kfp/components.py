"""The pipeline's components: typed signatures whose bodies make one call into `fulltune.steps`.

Each function becomes a KFP lightweight Python component with `build_components(image)`. The image
has fulltune (and kfp) installed, so nothing is pip-installed when a step runs
(`install_kfp_package=False`). Bodies import inside the function because KFP ships only the
function's source to the container. Docstring `Args:` become the descriptions the Kubeflow UI shows.

Only the standard library and kfp are imported here, so compiling stays fast.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Output


def validate_data(config: dict, report: Output[HTML], metrics: Output[Metrics]):
    """Parse every record of the train, eval and general data (JSONL or Parquet; text, prompt/completion or
    chat records) and fail the run, naming file and line of each problem, when bad records exceed the
    error budget (`data.max_error_rate`).

    Args:
        config: The run configuration (RunConfig) as a mapping; `fulltune config --describe` lists every field.
        report: HTML report: records per dataset, problems with their locations, length statistics.
        metrics: Record counts and error rates per dataset.
    """
    from fulltune import steps

    steps.validate_data(config, report.path, metrics.log_metric)


def check_tokenizer(config: dict, report: Output[HTML], metrics: Output[Metrics]):
    """Check the tokenizer against the model and the data: eos/bos/pad tokens, vocabulary size vs the
    model's embedding rows, truncation rate at `preprocess.max_seq_len`, and the domain words it splits
    into the most pieces.

    Args:
        config: The run configuration (RunConfig) as a mapping.
        report: HTML report with the checks, length percentiles and the worst-split domain terms.
        metrics: Truncation rate, fertility and related figures.
    """
    from fulltune import steps

    steps.check_tokenizer(config, report.path, metrics.log_metric)


def plan(config: dict, run_id: str, report: Output[Markdown], metrics: Output[Metrics]) -> dict:
    """Count parameters (meta device, no weights read), estimate memory per GPU under ZeRO-3, choose
    defaults for unset hyper-parameters, and refuse a run that cannot fit. Writes the resolved config and
    the DeepSpeed JSON to the run's work directory.

    Args:
        config: The run configuration (RunConfig) as a mapping.
        run_id: The pipeline run's id; the work directory is scoped to it.
        report: The plan as a Markdown table (memory breakdown, decisions).
        metrics: Parameters, memory per GPU, learning rate, epochs.

    Returns:
        The resolved config that every later step receives (work_dir scoped to this run).
    """
    from fulltune import steps

    return steps.plan(config, run_id, report.path, metrics.log_metric)


def list_shards(config: dict) -> list:
    """The work items preprocessing fans out over, one per shard: {"shard": i, "config": config}.

    Each item carries the config so a loop iteration needs nothing but its item.

    Args:
        config: The resolved run configuration from plan.

    Returns:
        One {"shard", "config"} item per shard, 0 .. preprocess.num_shards - 1.
    """
    from fulltune import steps

    return steps.list_shards(config)


def preprocess_shard(config: dict, shard: int) -> str:
    """Tokenize, pack and mask one shard of the data and mix in general replay data; skips a shard that is
    already complete (manifest present, checksums match), so a retry redoes only what is missing.

    Args:
        config: The resolved run configuration from plan.
        shard: Which shard (0-based) of `preprocess.num_shards` to produce.

    Returns:
        The URI of the shard's manifest.
    """
    from fulltune import steps

    return steps.preprocess_shard(config, shard)


def gather_shards(config: dict, shard_manifests: list, metrics: Output[Metrics]) -> str:
    """Check every shard's checksums and merge the shard manifests into the dataset manifest.

    Args:
        config: The resolved run configuration from plan.
        shard_manifests: The shard manifest URIs produced by preprocess_shard.
        metrics: Sequences, tokens, padding fraction per split; achieved replay fraction.

    Returns:
        The URI of the dataset manifest that train and evaluate read.
    """
    from fulltune import steps

    return steps.gather_shards(config, shard_manifests, metrics.log_metric)


def train(
    config: dict,
    dataset: str,
    report: Output[HTML],
    metrics: Output[Metrics],
    run_id: str = "",
    task_name: str = "train",
    image: str = "",
    s3_secret: str = "",
) -> str:
    """Full fine-tuning with DeepSpeed ZeRO-3: launch the ranks (torchrun in this pod, or a PyTorchJob
    with `resources.launcher: kubernetes`), stream their logs, wait, and check the saved model is complete.

    Args:
        config: The resolved run configuration from plan.
        dataset: URI of the dataset manifest from gather_shards.
        report: HTML report with the loss curve.
        metrics: Steps, first and final loss, training time.
        run_id: The pipeline run's id; with task_name it names the PyTorchJob, so a retried step follows
            the job it already started instead of starting another.
        task_name: This task's name in the pipeline.
        image: Image of the training pods when `resources.kubernetes.image` is not set; the pipeline
            passes the trainer image it was compiled with.
        s3_secret: Kubernetes Secret with the S3 credentials (AWS_* keys) that the training pods read
            too (optional: absent with workload identity); the pipeline passes its own. The name only.

    Returns:
        The URI of the tuned model (Hugging Face format, safetensors).
    """
    from fulltune import steps

    return steps.train(
        config,
        dataset,
        report.path,
        metrics.log_metric,
        run_id=run_id,
        task_name=task_name,
        image=image,
        s3_secret=s3_secret,
    )


def evaluate(
    config: dict,
    model_uri: str,
    dataset: str,
    report: Output[HTML],
    eval_result: Output[Artifact],
    metrics: Output[Metrics],
) -> bool:
    """Evaluate the base and the tuned model side by side: gain on the domain eval set, forgetting on the
    general set, and a verdict against the thresholds in `evaluation`. A failed gate is a successful step
    whose verdict is False; the reasons are in the log, the report and eval.json.

    Args:
        config: The resolved run configuration from plan.
        model_uri: URI of the tuned model from train.
        dataset: URI of the dataset manifest (holds the eval splits).
        report: HTML report: base vs tuned per set, the verdict and its reasons.
        eval_result: eval.json (metrics, verdict, reasons), kept with the registered model.
        metrics: Losses, perplexities, improvement and forgetting.

    Returns:
        The verdict: True when the tuned model may be registered.
    """
    from fulltune import steps

    return steps.evaluate(config, model_uri, dataset, report.path, eval_result.path, metrics.log_metric)


def register(config: dict, model_uri: str, eval_result: Input[Artifact], run_id: str) -> str:
    """Publish the tuned model as a new immutable version: weights, tokenizer, model card, lineage and a
    manifest with the SHA-256 of every file, written last.

    Args:
        config: The resolved run configuration from plan.
        model_uri: URI of the tuned model from train.
        eval_result: eval.json from evaluate.
        run_id: The pipeline run's id, recorded in the lineage.

    Returns:
        The URI of the registered version.
    """
    from fulltune import steps

    return steps.register(config, model_uri, eval_result.path, run_id)


STEPS = (
    validate_data,
    check_tokenizer,
    plan,
    list_shards,
    preprocess_shard,
    gather_shards,
    train,
    evaluate,
    register,
)


def build_components(image: str) -> dict[str, dsl.base_component.BaseComponent]:
    """Every step as a KFP component running in `image`, keyed by step name."""
    return {f.__name__: dsl.component(f, base_image=image, install_kfp_package=False) for f in STEPS}
