"""The `full_finetune` pipeline: the whole DAG on one screen.

    configure -> validate_data -> check_tokenizer -> plan -> list_shards -> ParallelFor: preprocess_shard
        -> gather_shards -> train -> evaluate -> If(verdict): register

Its parameters are the form the Kubeflow UI shows: the fields set on every run as typed parameters,
and `config` for the rest (`fulltune.parameters` has the table and the precedence); the first step,
`configure`, merges them into the one config the later steps read.

Only kfp and the config are imported here; `fulltune compile` turns this into
pipelines/full_finetune.yaml.

Cluster settings (ignored by kfp.local, so `fulltune demo` runs the same DAG) are applied to every
task in one place, `ClusterSettings.apply`: CPU and memory requests and limits (a profile's
ResourceQuota rejects pods without them), the S3 credentials from a Kubernetes Secret as the standard
AWS environment variables, the work-directory PVC and, on the steps that report to MLflow, the
optional MLflow Secret as the MLFLOW_TRACKING_* variables; `evaluate` also asks for a GPU.
Caching is off for the steps that read outside data or must run again; the policy and its reasons
are in pipelines/README.md.
"""

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kfp import dsl, kubernetes

from fulltune import parameters
from fulltune._image import default_image, default_trainer_image
from fulltune.kfp.cluster import (
    GPU_RESOURCE,
    MLFLOW_SECRET_KEYS,
    MLFLOW_STEPS,
    REGISTRY_SECRET,
    REGISTRY_SECRET_KEYS,
    S3_SECRET,
    S3_SECRET_KEYS,
    STEP_RESOURCES,
    StepResources,
)
from fulltune.kfp.components import build_components

PIPELINE_NAME = "full-finetune"
DESCRIPTION = (
    "Full (all-parameter) fine-tuning of a causal language model with DeepSpeed ZeRO-3: validate the data, "
    "check the tokenizer, plan memory, preprocess in shards, train, evaluate gain and forgetting against the "
    "base model, and register the model only when the verdict passes."
)


@dataclass(frozen=True)
class ClusterSettings:
    """What every step pod gets on a cluster (kfp.local ignores all of it).

    s3_secret: Kubernetes Secret whose S3_SECRET_KEYS reach every step pod as environment variables
        (marked optional, so a cluster using workload identity needs no Secret); "" adds none.
    work_pvc: (claim, mount path) of an RWX PersistentVolumeClaim mounted into every step pod, for a
        `work_dir` on a shared volume instead of S3; None mounts nothing.
    resources: CPU and memory requests and limits of each step's pod, by step name.
    registry_secret: Kubernetes Secret whose REGISTRY_SECRET_KEYS reach the register step's pod
        (optional); "" adds none.
    mlflow_secret: Kubernetes Secret whose MLFLOW_SECRET_KEYS reach the MLFLOW_STEPS' pods (optional,
        like the S3 one); "" adds none.
    """

    s3_secret: str = ""
    work_pvc: tuple[str, str] | None = None
    resources: Mapping[str, StepResources] = field(default_factory=lambda: dict(STEP_RESOURCES))
    registry_secret: str = ""
    mlflow_secret: str = ""

    def apply(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        step = task.component_spec.name.replace("-", "_")
        r = self.resources[step]
        task.set_cpu_request(r.cpu).set_cpu_limit(r.cpu_limit)
        task.set_memory_request(r.memory).set_memory_limit(r.memory_limit)
        if self.s3_secret:
            kubernetes.use_secret_as_env(task, self.s3_secret, {k: k for k in S3_SECRET_KEYS}, optional=True)
        if self.registry_secret and step == "register":
            keys = {k: k for k in REGISTRY_SECRET_KEYS}
            kubernetes.use_secret_as_env(task, self.registry_secret, keys, optional=True)
        if self.work_pvc:
            kubernetes.mount_pvc(task, pvc_name=self.work_pvc[0], mount_path=self.work_pvc[1])
        # Last of the task's Secrets: run_parameters.write_cluster_package appends it there too.
        if self.mlflow_secret and step in MLFLOW_STEPS:
            keys = {k: k for k in MLFLOW_SECRET_KEYS}
            kubernetes.use_secret_as_env(task, self.mlflow_secret, keys, optional=True)
        return task


def build_pipeline(
    image: str | None = None,
    *,
    trainer_image: str | None = None,
    s3_secret: str | None = S3_SECRET,
    eval_gpus: int = 1,
    work_pvc: str | None = None,
    step_resources: Mapping[str, StepResources] | None = None,
    registry_secret: str | None = REGISTRY_SECRET,
    mlflow_secret: str | None = None,
):
    """The pipeline function, ready to compile.

    Args:
        image: Container image of the CPU steps; default from `fulltune._image`.
        trainer_image: Image (CUDA, DeepSpeed) of the PyTorchJob's pods and, when it has GPUs, of
            `evaluate`; default from `fulltune._image`.
        s3_secret: Kubernetes Secret with the S3 credentials for every step pod (see
            `ClusterSettings`); None or "" adds none.
        eval_gpus: GPUs the evaluate step requests (`nvidia.com/gpu`); 0 runs it on CPU.
        work_pvc: "CLAIM:/mount/path" mounts an RWX PersistentVolumeClaim into every step pod, for a
            `work_dir` on a shared volume instead of S3 (the training pods mount it through
            `resources.kubernetes.volumes`, at the same path).
        step_resources: CPU and memory of each step's pod; default `cluster.STEP_RESOURCES`.
        registry_secret: Kubernetes Secret whose MODEL_REGISTRY_TOKEN reaches the register step
            (optional); None or "" adds none.
        mlflow_secret: Kubernetes Secret with the MLflow server and credentials (MLFLOW_SECRET_KEYS)
            for the train, evaluate and register steps and the training pods (optional); None or ""
            adds none.
    """
    cluster = ClusterSettings(
        s3_secret=s3_secret or "",
        work_pvc=parse_pvc(work_pvc) if work_pvc else None,
        resources=dict(step_resources or STEP_RESOURCES),
        registry_secret=registry_secret or "",
        mlflow_secret=mlflow_secret or "",
    )
    trainer_image = trainer_image or default_trainer_image()
    full_finetune = _dag(build_components(image or default_image()), cluster, trainer_image, eval_gpus)
    # The form the Kubeflow UI shows: the typed parameters and their descriptions, from one table.
    full_finetune.__signature__ = parameters.signature()
    full_finetune.__doc__ = parameters.docstring("Full fine-tuning with a forgetting gate.")
    # `dsl.pipeline` builds the graph by calling full_finetune, where kfp's task setters
    # (set_cpu_request and the like, ~40 calls) each take inspect.stack() to name their caller in an
    # error message. That reads the source of every frame on the stack and, for a frame whose file
    # no module has, scans all of sys.modules: O(frames x loaded modules) a call. Under pytest with
    # torch loaded a compile took 2.4 s (0.2 s from a shallow stack), from 40 frames of `python -c` 43 s.
    # On a thread of its own the stack it walks is the few frames of this build.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fulltune-compile") as thread:
        return thread.submit(
            dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION), full_finetune
        ).result()


def _dag(steps, cluster: ClusterSettings, trainer_image: str, eval_gpus: int):
    """The DAG itself: the function `dsl.pipeline` compiles, taking the typed parameters in order."""
    # A GPU evaluate step needs CUDA torch: the trainer image; on CPU the runtime image does.
    evaluate = build_components(trainer_image).evaluate if eval_gpus else steps.evaluate
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

    def full_finetune(*values):
        params = dict(zip(parameters.signature().parameters, values, strict=True))
        times = {
            "scheduled_time": dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER,
            "created_time": dsl.PIPELINE_JOB_CREATE_TIME_UTC_PLACEHOLDER,
        }
        configured = cluster.apply(steps.configure(**params, **times))
        config = configured.outputs["config"]
        validated = cluster.apply(steps.validate_data(config=config, run_id=run_id))
        checked = cluster.apply(steps.check_tokenizer(config=config, run_id=run_id).after(validated))
        planned = cluster.apply(steps.plan(config=config, run_id=run_id).after(checked))
        resolved = planned.outputs["config"]
        shards = cluster.apply(steps.list_shards(config=resolved))
        with dsl.ParallelFor(shards.output, name="shards") as item:
            shard_task = cluster.apply(steps.preprocess_shard(config=item.config, shard=item.shard))
        manifests = dsl.Collected(shard_task.outputs["shard_manifest"])
        gathered = cluster.apply(steps.gather_shards(config=resolved, shard_manifests=manifests))
        dataset = gathered.outputs["dataset"]
        trained = cluster.apply(
            steps.train(
                config=resolved,
                dataset=dataset,
                run_id=run_id,
                task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
                image=trainer_image,
                s3_secret=cluster.s3_secret,
                mlflow_secret=cluster.mlflow_secret,
            )
        )
        # launcher: kubernetes makes the run's Argo Workflow own the PyTorchJob (deleted with the run).
        kubernetes.use_field_path_as_env(
            trained,
            env_name="FULLTUNE_WORKFLOW_NAME",
            field_path="metadata.labels['workflows.argoproj.io/workflow']",
        )
        model_uri = trained.outputs["model_uri"]
        evaluated = cluster.apply(evaluate(config=resolved, model_uri=model_uri, dataset=dataset))
        _gpus(evaluated, eval_gpus)
        verdict = evaluated.outputs["Output"]  # unnamed: see components.evaluate
        with dsl.If(verdict == True, name="verdict-passed"):  # noqa: E712 — a KFP condition
            registered = cluster.apply(
                steps.register(
                    config=resolved,
                    model_uri=model_uri,
                    eval_result=evaluated.outputs["eval_result"],
                    run_id=run_id,
                )
            )
        # Every step but gather_shards and preprocess_shard reads outside data or must run again.
        for task in (validated, checked, planned, trained, evaluated, registered):
            task.set_caching_options(False)
        for task in (shard_task, gathered, evaluated, registered):
            task.set_retry(**POD_RETRY)

    return full_finetune


# The long steps after plan are retried when their pod fails (evicted, its node lost, the S3 endpoint
# down for longer than the client's own retries, 5 attempts with backoff, cover): each is idempotent
# (a retried shard finds its completed files, `register` finds the version its run committed).
# Not the checking steps: their failure is nearly always a refusal of bad input, which must reach
# the user at once, not after minutes of backoff. Not `train`: its launcher restarts the training
# group on retryable exits only, and a KFP retry would start a permanent failure over.
POD_RETRY = {
    "num_retries": 2,
    "backoff_duration": "30s",
    "backoff_factor": 2.0,
    "backoff_max_duration": "300s",
}


def parse_pvc(spec: str) -> tuple[str, str]:
    """(claim, mount path) of a `--work-pvc` value, CLAIM:/mount/path."""
    claim, sep, path = spec.partition(":")
    if not (claim and sep and path.startswith("/")):
        raise ValueError(f"--work-pvc {spec}: expected CLAIM:/mount/path, e.g. fulltune-work:/work")
    return claim, path


def _gpus(task: dsl.PipelineTask, count: int) -> None:
    if count:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(count)
        # GPU nodes are commonly tainted so that only pods asking for GPUs land there.
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
