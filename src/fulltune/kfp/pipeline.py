"""The `full_finetune` pipeline: the whole DAG on one screen.

    validate_data -> check_tokenizer -> plan -> list_shards -> ParallelFor: preprocess_shard
        -> gather_shards -> train -> evaluate -> If(verdict): register

Only kfp is imported here; `fulltune compile` turns this into pipelines/full_finetune.yaml.
"""

from kfp import dsl

from fulltune._image import default_image
from fulltune.kfp.components import build_components

PIPELINE_NAME = "full-finetune"
DESCRIPTION = (
    "Full (all-parameter) fine-tuning of a causal language model with DeepSpeed ZeRO-3: validate the data, "
    "check the tokenizer, plan memory, preprocess in shards, train, evaluate gain and forgetting against the "
    "base model, and register the model only when the verdict passes."
)


def build_pipeline(image: str | None = None):
    c = build_components(image or default_image())

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
    def full_finetune(config: dict = {}):  # noqa: B006 — KFP reads the default as the UI's default
        """Full fine-tuning with a forgetting gate.

        Args:
            config: The run configuration (RunConfig): model, data, preprocess, training, resources, evaluation
                and registry sections. Unset fields take their documented defaults.
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
        trained = c["train"](config=resolved, dataset=gathered.outputs["Output"]).set_caching_options(False)
        evaluated = c["evaluate"](
            config=resolved, model_uri=trained.outputs["Output"], dataset=gathered.outputs["Output"]
        ).set_caching_options(False)
        with dsl.If(evaluated.outputs["Output"] == True, name="verdict-passed"):  # noqa: E712 — a KFP condition
            c["register"](
                config=resolved,
                model_uri=trained.outputs["Output"],
                eval_result=evaluated.outputs["eval_result"],
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            ).set_caching_options(False)

    return full_finetune
