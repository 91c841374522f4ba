"""The `full_finetune` pipeline: the whole DAG on one screen.

    validate_data -> check_tokenizer -> plan -> list_shards -> ParallelFor: preprocess_shard
        -> gather_shards -> train -> evaluate -> If(verdict): register

Only kfp is imported here; `fulltune compile` turns this into pipelines/full_finetune.yaml.

Cluster settings (ignored by kfp.local, so `fulltune demo` runs the same DAG): every step pod gets the
S3 credentials from a Kubernetes Secret as the standard AWS environment variables, and `evaluate`
asks for a GPU. Caching is off for the steps that read outside data or must run again; the policy
and its reasons are in pipelines/README.md.
"""

from kfp import dsl, kubernetes

from fulltune._image import default_image, default_trainer_image
from fulltune.kfp.components import build_components

PIPELINE_NAME = "full-finetune"
DESCRIPTION = (
    "Full (all-parameter) fine-tuning of a causal language model with DeepSpeed ZeRO-3: validate the data, "
    "check the tokenizer, plan memory, preprocess in shards, train, evaluate gain and forgetting against the "
    "base model, and register the model only when the verdict passes."
)


# The Secret's keys are the environment variable names boto3 reads; a key missing from the Secret
# leaves its variable unset (region and endpoint are often absent on AWS proper).
S3_SECRET = "fulltune-s3"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
GPU_RESOURCE = "nvidia.com/gpu"


def build_pipeline(
    image: str | None = None,
    *,
    trainer_image: str | None = None,
    s3_secret: str | None = S3_SECRET,
    eval_gpus: int = 1,
    work_pvc: str | None = None,
):
    """The pipeline function, ready to compile.

    Args:
        image: Container image of the CPU steps; default from `fulltune._image`.
        trainer_image: Image (CUDA, DeepSpeed) of the PyTorchJob's pods and, when it has GPUs, of
            `evaluate`; default from `fulltune._image`.
        s3_secret: Kubernetes Secret whose S3_SECRET_KEYS reach every step pod as environment
            variables (marked optional, so a cluster using workload identity needs no Secret);
            None or "" adds none.
        eval_gpus: GPUs the evaluate step requests (`nvidia.com/gpu`); 0 runs it on CPU.
        work_pvc: "CLAIM:/mount/path" mounts an RWX PersistentVolumeClaim into every step pod, for a
            `work_dir` on a shared volume instead of S3 (the training pods mount it through
            `resources.kubernetes.volumes`, at the same path).
    """
    pvc = _parse_pvc(work_pvc) if work_pvc else None
    image = image or default_image()
    trainer_image = trainer_image or default_trainer_image()
    c = build_components(image)
    # A GPU evaluate step needs CUDA torch: the trainer image; on CPU the runtime image does.
    evaluate_component = build_components(trainer_image)["evaluate"] if eval_gpus else c["evaluate"]

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
    def full_finetune(config: dict = {}):  # noqa: B006 — KFP reads the default as the UI's default
        """Full fine-tuning with a forgetting gate.

        Args:
            config: The run configuration (RunConfig) as a JSON mapping: model, data, tokenizer, preprocess, training, resources, evaluation and registry sections. Unset fields take their documented defaults; `fulltune config --describe` lists every field and pipelines/examples/ has complete configs.
        """
        validated = c["validate_data"](config=config).set_caching_options(False)
        checked = c["check_tokenizer"](config=config).after(validated).set_caching_options(False)
        planned = c["plan"](config=config, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).after(checked)
        planned.set_caching_options(False)
        resolved = planned.outputs["Output"]
        shards = c["list_shards"](config=resolved)
        with dsl.ParallelFor(shards.output, name="shards") as item:
            shard_task = c["preprocess_shard"](config=item.config, shard=item.shard)
        gathered = c["gather_shards"](config=resolved, shard_manifests=dsl.Collected(shard_task.output))
        trained = c["train"](
            config=resolved,
            dataset=gathered.outputs["Output"],
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
            image=trainer_image,
            s3_secret=s3_secret or "",
        ).set_caching_options(False)
        # launcher: kubernetes makes the run's Argo Workflow own the PyTorchJob (deleted with the run).
        kubernetes.use_field_path_as_env(
            trained,
            env_name="FULLTUNE_WORKFLOW_NAME",
            field_path="metadata.labels['workflows.argoproj.io/workflow']",
        )
        evaluated = evaluate_component(
            config=resolved, model_uri=trained.outputs["Output"], dataset=gathered.outputs["Output"]
        ).set_caching_options(False)
        with dsl.If(evaluated.outputs["Output"] == True, name="verdict-passed"):  # noqa: E712 — a KFP condition
            registered = c["register"](
                config=resolved,
                model_uri=trained.outputs["Output"],
                eval_result=evaluated.outputs["eval_result"],
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            ).set_caching_options(False)

        # list_shards only reads its input; every other step may touch S3.
        for task in (validated, checked, planned, shard_task, gathered, trained, evaluated, registered):
            _s3_credentials(task, s3_secret)
        _gpus(evaluated, eval_gpus)
        if pvc:
            for task in (
                validated,
                checked,
                planned,
                shards,
                shard_task,
                gathered,
                trained,
                evaluated,
                registered,
            ):
                kubernetes.mount_pvc(task, pvc_name=pvc[0], mount_path=pvc[1])

    return full_finetune


def _parse_pvc(spec: str) -> tuple[str, str]:
    claim, sep, path = spec.partition(":")
    if not (claim and sep and path.startswith("/")):
        raise ValueError(f"work_pvc {spec!r}: expected CLAIM:/mount/path, e.g. fulltune-work:/work")
    return claim, path


def _s3_credentials(task: dsl.PipelineTask, secret: str | None) -> None:
    if secret:
        kubernetes.use_secret_as_env(task, secret, {k: k for k in S3_SECRET_KEYS}, optional=True)


def _gpus(task: dsl.PipelineTask, count: int) -> None:
    if count:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(count)
        # GPU nodes are commonly tainted so that only pods asking for GPUs land there.
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
