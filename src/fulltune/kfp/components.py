"""The pipeline's components: typed signatures whose bodies make one call into `fulltune.steps`.

Each function becomes a KFP lightweight Python component with `build_components(image)`. The image
has fulltune (and kfp) installed, so nothing is pip-installed when a step runs
(`install_kfp_package=False`). Bodies import inside the function because KFP ships only the
function's source to the container. Docstring `Args:` become the descriptions the Kubeflow UI shows.

This is the boundary where the run is a dict: `configure` merges the pipeline's typed parameters
into the `config` mapping (`fulltune.parameters`), each later body turns that mapping into a
`RunConfig` (`RunConfig.from_pipeline`) before the call, and `plan` hands the resolved one back as a
dict. Outputs are named (`NamedTuple`), so the pipeline wires `outputs["dataset"]`, not a bare
"Output" — except where kfp.local needs one (see `list_shards` and `evaluate`). Only the standard library, kfp and the config are imported here, so compiling stays fast.
"""

from dataclasses import dataclass
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Output
from kfp.dsl.base_component import BaseComponent

from fulltune import parameters


def configure(
    config: dict,
    scheduled_time: str,
    created_time: str,
    base_model_uri: str,
    train_uri: str,
    eval_uri: str,
    general_uri: str,
    model_name: str,
    registry_uri: str,
    learning_rate: float,
    num_train_epochs: float,
    max_steps: int,
    max_seq_len: int,
    replay_fraction: float,
    num_nodes: int,
    nproc_per_node: int,
    max_general_ppl_increase: float,
    min_domain_loss_improvement: float,
) -> NamedTuple("ConfigureOutputs", [("config", dict)]):
    """Merge the pipeline's typed parameters into `config` and validate the result; refuse a field that a
    typed parameter and `config` set to two different values, naming both. (The Args are generated from
    fulltune.parameters below.)"""
    values = dict(locals())  # the first statement: exactly this step's inputs
    from fulltune import steps

    config, times = values.pop("config"), (values.pop("scheduled_time"), values.pop("created_time"))
    return (steps.configure(config, values, *times),)


configure.__doc__ = parameters.docstring(
    (configure.__doc__ or "").split(" (The Args")[0],
    returns="config: The run configuration (RunConfig) every later step receives.",
    times=True,
)


def validate_data(config: dict, run_id: str, report: Output[HTML], metrics: Output[Metrics]):
    """Parse every record of the train, eval and general data (JSONL or Parquet; text, prompt/completion or
    chat records) and fail the run, naming file and line of each problem, when bad records exceed the
    error budget (`data.max_error_rate`).

    Args:
        config: The run configuration (RunConfig) as a mapping; `fulltune config --describe` lists every field.
        run_id: The pipeline run's id: the report is also kept in the run's work directory
            (`<work_dir>/<run id>/checks/`), which a failed step's message names.
        report: HTML report: records per dataset, problems with their locations, length statistics.
        metrics: Record counts and error rates per dataset.
    """
    from fulltune import steps
    from fulltune.config import RunConfig

    steps.validate_data(RunConfig.from_pipeline(config), report.path, metrics.log_metric, run_id)


def check_tokenizer(config: dict, run_id: str, report: Output[HTML], metrics: Output[Metrics]):
    """Check the tokenizer against the model and the data: eos/bos/pad tokens, vocabulary size vs the
    model's embedding rows, truncation rate at `preprocess.max_seq_len`, and the domain words it splits
    into the most pieces.

    Args:
        config: The run configuration (RunConfig) as a mapping.
        run_id: The pipeline run's id: the report is also kept in the run's work directory
            (`<work_dir>/<run id>/checks/`), which a failed step's message names.
        report: HTML report with the checks, length percentiles and the worst-split domain terms.
        metrics: Truncation rate, fertility and related figures.
    """
    from fulltune import steps
    from fulltune.config import RunConfig

    steps.check_tokenizer(RunConfig.from_pipeline(config), report.path, metrics.log_metric, run_id)


def plan(config: dict, run_id: str, report: Output[Markdown], metrics: Output[Metrics]) -> NamedTuple(
    "PlanOutputs", [("config", dict)]
):
    """Count parameters (meta device, no weights read), estimate memory per GPU under ZeRO-3, choose
    defaults for unset hyper-parameters, and refuse a run that cannot fit. Writes the resolved config and
    the DeepSpeed JSON to the run's work directory.

    Args:
        config: The run configuration (RunConfig) as a mapping.
        run_id: The pipeline run's id; the work directory is scoped to it.
        report: The plan as a Markdown table (memory breakdown, decisions).
        metrics: Parameters, memory per GPU, learning rate, epochs.

    Returns:
        config: The resolved config that every later step receives (work_dir scoped to this run).
    """
    from fulltune import steps
    from fulltune.config import RunConfig

    resolved = steps.plan(RunConfig.from_pipeline(config), run_id, report.path, metrics.log_metric)
    return (resolved.to_dict(),)


def list_shards(config: dict) -> list:
    """The work items preprocessing fans out over, one per shard: {"shard": i, "config": config}.

    Each item carries the config, and this is a step of its own rather than an output of plan,
    because kfp.local (2.17) takes a ParallelFor's items only from a task's single unnamed output
    and hands an iteration nothing from outside its item.

    Args:
        config: The resolved run configuration from plan.

    Returns:
        One {"shard", "config"} item per shard, 0 .. preprocess.num_shards - 1.
    """
    from fulltune import steps
    from fulltune.config import RunConfig

    return [{"shard": i, "config": config} for i in steps.shard_indices(RunConfig.from_pipeline(config))]


def preprocess_shard(config: dict, shard: int) -> NamedTuple("ShardOutputs", [("shard_manifest", str)]):
    """Tokenize, pack and mask one shard of the data and mix in general replay data; skips a shard that is
    already complete and built from the same settings, tokenizer and input files (manifest present,
    checksums and fingerprint match), so a retry redoes only what is missing and a changed setting
    redoes the shard.

    Args:
        config: The resolved run configuration from plan.
        shard: Which shard (0-based) of `preprocess.num_shards` to produce.

    Returns:
        shard_manifest: The URI of the shard's manifest.
    """
    from fulltune import steps
    from fulltune.config import RunConfig

    return (steps.preprocess_shard(RunConfig.from_pipeline(config), shard),)


def gather_shards(config: dict, shard_manifests: list, metrics: Output[Metrics]) -> NamedTuple(
    "GatherOutputs", [("dataset", str)]
):
    """Check every shard's checksums and that it was built from this run's settings and inputs, and merge
    the shard manifests into the dataset manifest.

    Args:
        config: The resolved run configuration from plan.
        shard_manifests: The shard manifest URIs produced by preprocess_shard.
        metrics: Sequences, tokens, padding fraction per split; achieved replay fraction.

    Returns:
        dataset: The URI of the dataset manifest that train and evaluate read.
    """
    from fulltune import steps
    from fulltune.config import RunConfig

    return (steps.gather_shards(RunConfig.from_pipeline(config), shard_manifests, metrics.log_metric),)


def train(
    config: dict,
    dataset: str,
    report: Output[HTML],
    metrics: Output[Metrics],
    run_id: str = "",
    task_name: str = "train",
    image: str = "",
    s3_secret: str = "",
    mlflow_secret: str = "",
) -> NamedTuple("TrainOutputs", [("model_uri", str)]):
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
        mlflow_secret: Kubernetes Secret with the MLflow server and credentials (MLFLOW_TRACKING_* keys)
            that the training pods read too (optional); the pipeline passes its own, "" for none.
            The name only.

    Returns:
        model_uri: The URI of the tuned model (Hugging Face format, safetensors).
    """
    from fulltune import steps
    from fulltune.config import RunConfig

    model_uri = steps.train(
        RunConfig.from_pipeline(config),
        dataset,
        report.path,
        metrics.log_metric,
        run_id=run_id,
        task_name=task_name,
        image=image,
        s3_secret=s3_secret,
        mlflow_secret=mlflow_secret,
    )
    return (model_uri,)


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
        The verdict: True when the tuned model may be registered. (Unnamed, unlike the other steps'
        outputs: kfp.local (2.17) resolves a dsl.If condition only on a task's "Output".)
    """
    from fulltune import steps
    from fulltune.config import RunConfig

    cfg = RunConfig.from_pipeline(config)
    return steps.evaluate(cfg, model_uri, dataset, report.path, eval_result.path, metrics.log_metric)


def register(config: dict, model_uri: str, eval_result: Input[Artifact], run_id: str) -> NamedTuple(
    "RegisterOutputs", [("version_uri", str)]
):
    """Publish the tuned model as a new immutable version: weights, tokenizer, model card, lineage and a
    manifest with the SHA-256 of every file, written last.

    Args:
        config: The resolved run configuration from plan.
        model_uri: URI of the tuned model from train.
        eval_result: eval.json from evaluate.
        run_id: The pipeline run's id, recorded in the lineage.

    Returns:
        version_uri: The URI of the registered version.
    """
    from fulltune import steps
    from fulltune.config import RunConfig

    return (steps.register(RunConfig.from_pipeline(config), model_uri, eval_result.path, run_id),)


STEPS = (
    configure,
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


@dataclass(frozen=True)
class Components:
    """Every step as a KFP component, one attribute per step."""

    configure: BaseComponent
    validate_data: BaseComponent
    check_tokenizer: BaseComponent
    plan: BaseComponent
    list_shards: BaseComponent
    preprocess_shard: BaseComponent
    gather_shards: BaseComponent
    train: BaseComponent
    evaluate: BaseComponent
    register: BaseComponent


def build_components(image: str) -> Components:
    """Every step as a KFP component running in `image`."""
    return Components(*(dsl.component(f, base_image=image, install_kfp_package=False) for f in STEPS))
