"""RunConfig: the one typed object that flows through every step of the pipeline.

Every field has a default and a description (the description is what users read in
`fulltune config --describe` and in the docs). Hyper-parameters use the names of Hugging Face
`TrainingArguments` where one exists. A config is validated once, when it is loaded; errors name
the dotted field and the problem.

`plan` turns a user config into a *resolved* one: fields left as `None` (learning rate, epochs)
are filled from well-known rules, and the resolved config is what `preprocess`, `train`,
`evaluate` and `register` receive.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fulltune import redact

if TYPE_CHECKING:
    from fulltune.layout import RunLayout

Precision = Literal["bf16", "fp16", "fp32"]


# Why a config refuses a credential: whatever it holds is shown wherever the config is.
CREDENTIALS_IN_CONFIG = (
    "holds credentials (user:secret@), which would travel with the config as a pipeline parameter and "
    "into logs, MLflow and the registered model's lineage.json: remove them"
)


def location(value: Any) -> Any:
    """A location as written, checked and expanded once, when the config is read: the config is the
    one place every reader of a location (storage, transformers, torchrun) takes it from.

    Leading or trailing whitespace is refused: pasted into the Kubeflow UI's form with the value, it
    names a path or key that does not exist, and the later "does not exist" shows the name with its
    space invisible. A local path written from the home directory (`~/data/train.jsonl`) becomes the
    path it names; s3:// and other values are left as written.

    Credentials written into a location (`s3://key:secret@bucket/...`) are refused: s3:// takes none
    there, and the config travels as a pipeline parameter and into logs, MLflow and lineage.json."""
    if isinstance(value, str) and value != value.strip():
        raise ValueError("has leading or trailing whitespace (copied with the value?): remove it")
    if isinstance(value, str) and redact.has_userinfo(value):
        raise ValueError(f"{CREDENTIALS_IN_CONFIG}; S3 credentials come from the S3 Secret (AWS_* variables)")
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field and the problem."""


# One problem a validator finds: the field's path below the validator's own place, the value
# (None: not shown) and what is wrong, with what to do.
Problem = tuple[tuple[str, ...], Any, str]


class FieldProblems(ValueError):
    """Problems a validator finds at fields other than the one it validates: a contradiction between
    two fields, a key of a mapping. Pydantic would report them at the validator's own place (a
    section, or the root); `format_validation_error` puts each at its own dotted field instead, so
    they read like every other config error."""

    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(f"{'.'.join(path)}: {msg}" for path, _, msg in problems))
        self.problems = problems


def _refuse(problems: list[Problem]) -> None:
    if problems:
        raise FieldProblems(problems)


class _Section(BaseModel):
    # allow_inf_nan: YAML's .inf is a float, and no field means anything by it: an infinite epoch
    # count or learning rate would pass here to fail in plan, or go to KFP as JSON it cannot parse
    # (Infinity); the typed pipeline parameters refuse it too (parameters.coerce)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(_Section):
    base_model_uri: str = Field(
        "",
        description="Base model: a local directory or s3:// prefix in Hugging Face format (config.json + "
        "safetensors), or a registered version: registry://NAME/production (also latest, vN) under "
        "registry.uri, fixed to one version when the run starts. Default practice: the original pre-trained "
        "model (tuning a tuned model again compounds forgetting).",
    )
    tokenizer_uri: str | None = Field(None, description="Tokenizer location; defaults to the base model's.")
    trust_remote_code: bool = Field(
        False, description="Allow model code shipped with the checkpoint to run. Off unless you trust it."
    )
    name: str = Field(
        "fulltune-model",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Name the tuned model is registered under.",
    )
    original_base_model_uri: str | None = Field(
        None,
        description="The pre-trained model a registered base descends from; forgetting is measured against "
        "it. Set by the pipeline's first step when base_model_uri is a registry:// reference (from that "
        "version's lineage); None: base_model_uri is the original.",
    )

    _location = field_validator("base_model_uri", "tokenizer_uri", "original_base_model_uri", mode="before")(
        location
    )

    @property
    def original_model_uri(self) -> str:
        """The pre-trained model that forgetting and the domain gain are measured against."""
        return self.original_base_model_uri or self.base_model_uri

    @field_validator("base_model_uri")
    @classmethod
    def _usable_reference(cls, uri: str) -> str:
        from fulltune.registry.pointers import is_ref, ref_problem

        if is_ref(uri) and (problem := ref_problem(uri)):
            raise ValueError(problem)
        return uri


class CheckPolicy(_Section):
    """What validate_data does about one problem code (see `fulltune.data.validate.CODES`)."""

    action: Literal["fail", "warn", "ignore"] = Field(
        "warn",
        description="fail: fail the run when this code's rate is above max_rate; warn: report only; "
        "ignore: neither report nor fail (unusable records are still skipped).",
    )
    max_rate: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="For action 'fail' (the action when only max_rate is given): fraction of records with this "
        "code tolerated; None: data.max_error_rate for record errors, none at all for other codes.",
    )

    @model_validator(mode="before")
    @classmethod
    def _a_rate_asks_to_fail(cls, data: Any) -> Any:
        """`{max_rate: 0.2}` alone sets the code's limit: taking the default action 'warn' with it
        would take the code off the failing list, the opposite of what a limit asks for."""
        if isinstance(data, dict) and data.get("max_rate") is not None and "action" not in data:
            return {**data, "action": "fail"}
        return data

    @model_validator(mode="after")
    def _a_rate_only_to_fail(self) -> CheckPolicy:
        if self.max_rate is not None and self.action != "fail":
            why = f"only action 'fail' has a limit; with action {self.action!r} it would be ignored"
            _refuse([(("max_rate",), self.max_rate, why)])
        return self


def check_code_problem(code: str) -> str | None:
    """Why `code` cannot be a key of data.checks, or None (the codes: fulltune.data.validate.codes)."""
    import difflib

    from fulltune.data.validate.codes import CODES, FATAL

    if code in FATAL:
        return f"{code!r} is fatal and has no policy: a dataset with it always fails"
    if code in CODES:
        return None
    known = sorted(set(CODES) - FATAL)
    close = difflib.get_close_matches(code, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown code ({hint}known: {', '.join(known)})"


class DataSection(_Section):
    train_uri: str = Field(
        "",
        description="Domain training data: a JSONL (.jsonl, .jsonl.gz), Parquet or CSV (.csv, .csv.gz; header row) file, a Hugging Face "
        "save_to_disk directory (one split), or a directory or glob of them; local or s3://.",
    )
    eval_uri: str | None = Field(
        None, description="Domain evaluation data; when absent a stable hash split of train_uri is held out."
    )
    general_uri: str | None = Field(
        None, description="General-domain text: mixed into training as replay and used to measure forgetting."
    )
    record_kind: Literal["auto", "text", "prompt_completion", "chat"] = Field(
        "auto",
        description="Record kind of the train and eval data; 'auto' detects it from the first record's "
        "fields. The general set's is always detected (replay data is often plain text beside chat data).",
    )
    text_field: str = Field("text", description="Column holding plain text records.")
    general_text_field: str | None = Field(
        None,
        description="Column holding the text of general_uri's plain-text records, when it is not text_field "
        "(a general corpus keeps 'text' beside domain data in a column of its own). None: text_field.",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt of prompt/completion records.")
    completion_field: str = Field(
        "completion", description="Column holding the completion of prompt/completion records."
    )
    messages_field: str = Field(
        "messages", description="Column holding chat records: a list of {role, content}."
    )
    max_error_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of bad records tolerated before validate_data fails the run.",
    )
    max_examples: int = Field(
        10, ge=1, description="How many example locations each problem lists in reports."
    )
    checks: dict[str, CheckPolicy] = Field(
        default_factory=dict,
        description="Per-code policy overriding the defaults, e.g. {pii_email: {action: fail, max_rate: 0}}. "
        "Defaults: record errors (invalid_json, wrong_type, ...) fail above max_error_rate; secrets fail on any; "
        "exact duplicates fail above half the records (an export or join gone wrong, more often than real data); "
        "eval records also in train (train_overlap) above a tenth of the eval set (the domain gain would be "
        "measured on training data), general records also in train (general_overlap) above a tenth of the general "
        "set (forgetting would be); "
        "PII, special tokens, lengths and chat-structure findings warn. A code set to fail without max_rate fails "
        "on any occurrence (record errors: above max_error_rate). Fatal codes cannot be changed.",
    )
    min_chars: int = Field(
        1, ge=0, description="Records shorter than this many characters are reported as too_short."
    )
    max_chars: int | None = Field(
        1_000_000,
        ge=1,
        description="Records longer than this many characters are reported as too_long; None: no limit.",
    )
    near_duplicates: bool = Field(
        False,
        description="Also report near-duplicates (MinHash over word 5-shingles, Jaccard >= 0.8); costs time and some memory.",
    )
    window_days: int = Field(
        1,
        ge=1,
        le=366,
        description="With a {date} placeholder in a data URI (e.g. s3://data/notes/dt={date}/, or "
        "{date:%Y/%m/%d}): read the partitions of this many days ending at the run's date.",
    )
    as_of: str | None = Field(
        None,
        description="The run's date for {date} placeholders (ISO 8601: 2026-11-27), e.g. to backfill a missed "
        "cycle. None: the time a recurring run was scheduled for, else the run's start; the pipeline's first "
        "step writes the date it used here.",
    )
    validate_workers: int | None = Field(
        None,
        ge=1,
        description="Processes validate_data uses on one large local JSONL file (one per 64 MB at most; "
        "byte ranges of whole lines, merged in order: the same report; ~250 MB of memory each). None: the "
        "CPUs the step may use (affinity, cgroup quota), at most 8; 1: one process. S3, gzip and "
        "near_duplicates are read by one process.",
    )

    _location = field_validator("train_uri", "eval_uri", "general_uri", mode="before")(location)

    @field_validator("train_uri", "eval_uri", "general_uri")
    @classmethod
    def _usable_location(cls, uri: str | None) -> str | None:
        from fulltune.data.window import template_problem

        if uri and (problem := template_problem(uri)):
            raise ValueError(problem)
        return uri

    @field_validator("as_of")
    @classmethod
    def _a_date(cls, text: str | None) -> str | None:
        from fulltune.data.window import parse_time

        if text is not None and parse_time(text) is None:
            raise ValueError("not an ISO 8601 date or time, e.g. 2026-11-27 or 2026-11-27T03:00:00Z")
        return text

    @field_validator("checks")
    @classmethod
    def _known_codes(cls, checks: dict[str, CheckPolicy]) -> dict[str, CheckPolicy]:
        """A misspelt code would only be found by validate_data, on a cluster after the run was
        created: refused when the config is read."""
        _refuse([((code,), None, why) for code in checks if (why := check_code_problem(code))])
        return checks

    def reading(self, dataset: str) -> DataSection:
        """How `dataset` ("train", "eval" or "general") is read. The general set's kind is always
        detected: replay data is often plain text beside the chat or prompt/completion domain data
        `record_kind` names; its plain text is in general_text_field when that is set."""
        if dataset != "general":
            return self
        return self.model_copy(
            update={"record_kind": "auto", "text_field": self.general_text_field or self.text_field}
        )


class TokenizerSection(_Section):
    domain_terms: list[str] = Field(
        default_factory=list, description="Terms whose tokenization is always reported."
    )
    top_k_split_terms: int = Field(
        20, ge=1, description="How many of the worst-split domain words the report shows."
    )
    max_truncation_rate: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Fail when more than this fraction of records would be truncated at max_seq_len (unpacked text, prompt/completion, chat).",
    )


class PreprocessSection(_Section):
    max_seq_len: int = Field(1024, ge=8, description="Tokens per training sequence.")
    packing: bool = Field(
        True, description="Pack several documents into each sequence (EOS-separated) instead of padding each."
    )
    attend_across_documents: bool = Field(
        False,
        description="Packed sequences: each document attends to the documents before it in its sequence, "
        "positions running across the sequence (pretraining's habit; sdpa keeps its causal-only kernel). Off: "
        "each document attends only to itself, at its own positions, as if trained alone (position ids; "
        "transformers builds the block-diagonal mask, flash_attention_2 attends per document). Training and "
        "evaluation alike.",
    )
    chunk_stride: int = Field(
        0,
        ge=0,
        description="Text with packing off: long documents become max_seq_len windows overlapping by this many "
        "tokens (context for the next window; overlapped tokens carry loss only once).",
    )
    num_shards: int = Field(
        2, ge=1, le=1024, description="Shards processed in parallel, one pipeline task each."
    )
    block_records: int = Field(
        2048,
        ge=1,
        description="About this many records per block (JSONL: a byte range sized from the file's mean line "
        "length; Parquet: rows of a row group), and at most 8 MiB of text: long records make smaller "
        "blocks, so a shard's memory stays bounded whatever their length. Splits, replay and packing are "
        "decided per block and blocks are keyed by their place in their file, so the output does not depend "
        "on num_shards; each block leaves at most one partly filled sequence.",
    )
    memoize_tokens: bool = Field(
        True,
        description="Encode each distinct space-delimited piece of text once per shard and reuse its ids: "
        "the tokenizer's exact ids, several times faster on repetitive domain text. Only for byte-level BPE "
        "tokenizers with a known pre-tokenizer (GPT-2, Llama 3, Qwen 2 style; others are tokenized whole); "
        "text with few repeats goes to the tokenizer whole by itself.",
    )
    replay_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of training tokens drawn from the general set (defence against forgetting). On "
        "prompt/completion and chat data, whose prompts carry no loss, replay's share of the loss tokens (of "
        "the gradient) is larger; the dataset manifest reports both shares.",
    )
    eval_fraction: float = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        description="Share of train_uri held out for evaluation when eval_uri is not set, chosen by prompt: "
        "records sharing a prompt (or a conversation before its last answer) are held out together.",
    )
    general_eval_fraction: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Share of general_uri held out to measure forgetting; the rest is the replay pool.",
    )
    loss_on: Literal["assistant", "all"] = Field(
        "assistant",
        description="Which tokens of prompt/completion and chat records carry loss: the answer only, or all.",
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Prompt/completion and chat examples longer than max_seq_len: 'truncate' keeps the answer, "
        "cutting the prompt from the left (or, when the answer alone is longer, keeps the first max_seq_len "
        "tokens), 'drop' leaves the example out; either way the manifest counts them. A truncated example "
        "left with no answer token is dropped and counted as dropped.",
    )
    seed: int = Field(0, description="Seed for splitting and replay mixing.")

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessSection:
        # Found otherwise only by preprocess_shard, after validate_data, check_tokenizer and plan ran.
        if not self.packing and self.chunk_stride >= self.max_seq_len:
            why = (
                f"must be below preprocess.max_seq_len {self.max_seq_len}: each window of unpacked text "
                "starts max_seq_len - chunk_stride tokens after the one before it"
            )
            _refuse([(("chunk_stride",), self.chunk_stride, why)])
        return self

    @property
    def documents_alone(self) -> bool:
        """Whether the model is given each packed document's own positions (training and evaluation)."""
        return not self.attend_across_documents


class TrainingSection(_Section):
    learning_rate: float | None = Field(
        None, gt=0.0, description="Peak learning rate; None lets plan choose by model size."
    )
    num_train_epochs: float | None = Field(
        None, gt=0.0, description="Epochs over the training data; None lets plan choose by data size."
    )
    max_steps: int = Field(-1, description="Optimizer steps; overrides num_train_epochs when > 0.")
    per_device_train_batch_size: int = Field(1, ge=1, description="Sequences per device per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    warmup_ratio: float = Field(
        0.03, ge=0.0, lt=1.0, description="Fraction of steps spent warming up the learning rate linearly."
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    weight_decay: float = Field(
        0.01,
        ge=0.0,
        description="AdamW weight decay on matrices (never on norms and biases). 0.01, the usual value for "
        "full fine-tuning (HF's run_clm examples, Llama and Mistral recipes): a mild pull towards "
        "zero that does not fight the pre-trained weights the way pre-training's 0.1 would.",
    )
    adam_beta1: float = Field(0.9, gt=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.95, gt=0.0, lt=1.0, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")
    bf16: bool = Field(
        True,
        description="Train in bfloat16 (GPU only; ignored on CPU). To train in float16 instead, set it false "
        "and training.fp16 true; both false trains in float32.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass to save memory: every decoder layer, "
        "unless gradient_checkpointing_layers says how many. Off: plan turns it on only where the "
        "activations do not fit otherwise.",
    )
    gradient_checkpointing_layers: int | None = Field(
        None,
        ge=1,
        description="Selective recomputation: how many decoder layers recompute their activations "
        "(spread evenly over the stack); the others keep theirs. Each recomputed layer runs its forward "
        "pass again in the backward, about a third more compute for that layer, so recomputing only as "
        "many layers as memory requires is faster than recomputing all. Setting it turns "
        "gradient_checkpointing on. None: all layers when gradient_checkpointing is set; when plan "
        "turns it on, the fewest layers that fit the GPU.",
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa",
        description="Attention kernels: sdpa (torch's scaled_dot_product_attention, which runs "
        "FlashAttention-2 or memory-efficient kernels on GPU), flash_attention_2 (needs the flash-attn "
        "package), or eager (the reference matmul-softmax, slow; for debugging).",
    )
    loss_chunk_tokens: int | None = Field(
        None,
        ge=0,
        description="Compute the loss from the final hidden states this many tokens at a time, never "
        "materialising the full logits (same loss and gradients; matters for large vocabularies at long "
        "sequences). 0: the plain path; None lets plan decide.",
    )
    torch_compile: bool = Field(
        False,
        description="Compile the model with torch.compile (DeepSpeed's engine.compile). Off unless "
        "measured faster for the model: compilation costs minutes at start-up.",
    )
    use_liger_kernel: bool | None = Field(
        None,
        description="Liger's fused Triton kernels (HF's name) for RMSNorm, the SwiGLU/GeGLU MLP and "
        "rotary embeddings: the elementwise work around the matrix products runs as one kernel each "
        "instead of many small ones, and keeps fewer activations. GPU only; needs the liger-kernel "
        "package, which the trainer image installs. The loss stays fulltune's own (plain, or chunked "
        "with loss_chunk_tokens). None lets plan decide: on for GPU runs of the dense model types it "
        "has kernels for (a 1B Llama on an H200: 12-17% faster steps, 8 GiB less memory). true on a "
        "model type Liger has no kernels for is refused when training starts.",
    )
    seed: int = Field(42, description="Seed for model initialisation of new parameters and the data order.")
    logging_steps: int = Field(
        1, ge=1, description="Log loss, learning rate and throughput every this many steps."
    )
    report_to: list[Literal["none", "tensorboard", "mlflow"]] = Field(
        default_factory=lambda: ["none"],
        description="Where the run is also reported (Hugging Face TrainingArguments' name and values), a name "
        "or a list: 'tensorboard' writes rank 0's event files (loss, learning rate, grad norm, tokens/s, "
        "MFU, eval and general loss, forgetting; the config as text) to logging_dir, on S3 uploaded at every "
        "logging step so a TensorBoard on the prefix sees the run live; 'mlflow' logs one MLflow run per "
        "pipeline run (the config as params, every step's metrics, the evaluation, the verdict and the "
        "registered version) to the server $MLFLOW_TRACKING_URI names, credentials from the MLFLOW_* "
        "environment (a Secret on the cluster); 'none' nothing. Reporting never fails a run: a write that "
        "fails is a warning.",
    )
    logging_dir: str | None = Field(
        None,
        description="Where TensorBoard event files go (local, PVC or s3://); None: <work_dir>/train/tensorboard.",
    )
    run_name: str | None = Field(
        None,
        description="report_to mlflow: the MLflow run's name; None: the pipeline run's id (the last part of "
        "the run's work_dir).",
    )
    mlflow_experiment: str | None = Field(
        None, description="report_to mlflow: the MLflow experiment (created when missing); None: model.name."
    )

    _location = field_validator("logging_dir", mode="before")(location)

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    save_steps: int | None = Field(
        None,
        ge=0,
        description="Save a complete checkpoint every this many optimizer steps; 0: not by steps. Unset: "
        "plan sets 0 and, unless save_every_minutes is set, checkpoints by time (save_every_minutes 60). "
        "With both 0, only the final model is saved.",
    )
    save_every_minutes: float | None = Field(
        None,
        ge=0,
        description="Also save a complete checkpoint once this many minutes of training have passed since "
        "the last one (or the start), on the next evaluation step when eval_steps is set (the forgetting "
        "rollback resumes from those); 0: not by time. A failure then loses at most that much of every "
        "GPU's time, however fast the run turns out to be. Unset: 60 when save_steps is unset too, else 0.",
    )
    save_total_limit: int = Field(2, ge=1, description="Complete checkpoints kept; older ones are deleted.")
    delete_checkpoints_after_success: bool = Field(
        False,
        description="Delete the run's checkpoints once the final model's manifest is written. They hold the "
        "full optimizer state (~16 bytes per parameter: ~110 GB for 7B) and are only needed to resume or "
        "continue this run; kept by default, and the train step says how much they take.",
    )
    fp16: bool = Field(
        False,
        description="Train in float16 with dynamic loss scaling (GPUs without bf16); exclusive with bf16.",
    )
    optim: Literal["adamw_torch", "adafactor"] = Field(
        "adamw_torch",
        description="Optimizer: torch AdamW (its fused CUDA kernel on GPU), or Adafactor (no first moment: "
        "4 bytes per parameter less than AdamW; under ZeRO-3 its second moment is not factored).",
    )
    offload_optimizer: bool | None = Field(
        None, description="ZeRO-3: keep optimizer states in CPU memory; None lets plan decide."
    )
    offload_param: bool | None = Field(
        None, description="ZeRO-3: keep parameters in CPU memory; None lets plan decide."
    )
    hierarchical_partitioning: bool | None = Field(
        None,
        description="ZeRO++ hierarchical partitioning (hpZ; DeepSpeed's zero_hpz_partition_size set to "
        "resources.nproc_per_node): a second copy of the 16-bit parameters partitioned over each node's "
        "GPUs, so the backward gathers the parameters over NVLink inside the node instead of across the "
        "network. Cuts each micro-step's traffic between nodes by a third, for 2 bytes per parameter "
        "divided by nproc_per_node of GPU memory. Needs several nodes of several GPUs each and no "
        "offload_param. None lets plan decide: on for multi-node GPU runs where it fits.",
    )
    eval_steps: int = Field(
        0,
        ge=0,
        description="Evaluate the loss on the domain_eval split of the preprocessed dataset every this many "
        "optimizer steps (0: never).",
    )
    early_stopping_patience: int = Field(
        0,
        ge=0,
        description="Stop after this many evaluations without an eval-loss improvement (0: no early stopping); "
        "needs eval_steps. The model saved is the one at the step training stopped, not the best one.",
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0.0, description="Smallest eval-loss decrease that counts as an improvement."
    )
    stop_on_forgetting: bool = Field(
        False,
        description="Stop early when an evaluation (eval_steps) finds the general perplexity risen past the "
        "budget the gate applies (evaluation.max_general_ppl_increase) over the base model's, measured at "
        "step 0 on the general_eval split. The model saved is the newest checkpoint still within the "
        "budget when one exists (checkpoints on evaluation steps: save_steps a multiple of eval_steps, or "
        "save_every_minutes), else the model as of the step that stopped. Needs eval_steps and a general "
        "eval set.",
    )

    def global_batch_size(self, world_size: int) -> int:
        """Sequences per optimizer step: micro batch x accumulation x ranks (the one place it is computed)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSection:
        _refuse(self.contradictions())
        return self

    def contradictions(self) -> list[Problem]:
        """Combinations of training fields that cannot work. Refused when the config is read, so
        `config --check`, `submit` and `schedule` refuse them before a run exists, not its plan step."""
        out: list[Problem] = []
        if self.bf16 and self.fp16:
            out.append(
                (
                    ("fp16",),
                    True,
                    "training.bf16 and training.fp16 are both true: choose one (set training.bf16: false "
                    "to train in float16 with loss scaling)",
                )
            )
        for name in ("early_stopping_patience", "stop_on_forgetting"):
            if getattr(self, name) and not self.eval_steps:
                out.append(((name,), getattr(self, name), _NEEDS_EVAL_STEPS[name]))
        return out


_NEEDS_EVAL_STEPS = {
    "early_stopping_patience": "set but training.eval_steps is 0: early stopping needs periodic "
    "evaluation; set training.eval_steps (e.g. 50) or early_stopping_patience: 0",
    "stop_on_forgetting": "set but training.eval_steps is 0: forgetting is measured at each evaluation; "
    "set training.eval_steps (e.g. 50) or stop_on_forgetting: false",
}


class Toleration(_Section):
    key: str | None = Field(None, description="Taint key.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal or Exists.")
    value: str | None = Field(None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; None tolerates every effect."
    )
    toleration_seconds: int | None = Field(None, ge=0, description="NoExecute: how long the pod stays bound.")


class VolumeMount(_Section):
    claim_name: str = Field(..., min_length=1, description="PersistentVolumeClaim to mount (must exist).")
    mount_path: str = Field(..., pattern=r"^/", description="Where it appears in the training containers.")
    read_only: bool = Field(False, description="Mount read-only.")


class KubernetesSection(_Section):
    """How the `kubernetes` launcher builds the PyTorchJob (Kubeflow Training Operator, kubeflow.org/v1)."""

    namespace: str | None = Field(
        None, description="Namespace of the PyTorchJob; None: the launcher pod's own namespace."
    )
    image: str | None = Field(
        None, description="Training image; None: the fulltune image the pipeline was compiled with."
    )
    service_account_name: str | None = Field(None, description="ServiceAccount of the training pods.")
    priority_class_name: str | None = Field(None, description="PriorityClass of the training pods.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the pods tolerate.")
    affinity: dict[str, Any] = Field(
        default_factory=dict, description="A Kubernetes affinity object, passed through as written."
    )
    volumes: list[VolumeMount] = Field(
        default_factory=list, description="PVCs mounted into every training pod (e.g. an RWX work directory)."
    )
    secret_env: list[str] = Field(
        default_factory=list,
        description="Names of Secrets whose keys become environment variables in the pods (S3 credentials); "
        "credentials never travel as parameters.",
    )

    @field_validator("secret_env")
    @classmethod
    def _secret_names(cls, names: list[str]) -> list[str]:
        from fulltune.kfp.cluster import NOT_A_SECRET_NAME, is_secret_name

        # the value is not shown (None): it may be the credential, pasted in place of the name
        _refuse(
            [((str(i),), None, NOT_A_SECRET_NAME) for i, name in enumerate(names) if not is_secret_name(name)]
        )
        return names

    gpu_resource_name: str = Field("nvidia.com/gpu", description="Extended resource name of one GPU.")
    cpu: str | None = Field(
        None,
        description="CPU request and limit per pod, e.g. '16'; None: 4 per process (nproc_per_node), so that "
        "a profile's ResourceQuota admits the pods.",
    )
    memory: str | None = Field(
        None,
        description="Memory request and limit per pod, e.g. '200Gi'; None: 32Gi per process. Loading a "
        "checkpoint and the data loader's copies need host memory beside the GPUs': raise it for models "
        "over ~8B parameters per node.",
    )
    shm_size: str = Field(
        "16Gi", description="Size of the memory-backed /dev/shm (NCCL needs more than 64Mi)."
    )
    ephemeral_storage: str | None = Field(
        None,
        description="Ephemeral storage each training pod requests for its /tmp (e.g. '120Gi'): the base model "
        "staged from s3://, a node's share of each checkpoint before its upload to an s3:// work_dir, the final "
        "model before its upload, compile caches. A request, not a limit: the scheduler places the pods on "
        "nodes whose disk holds it. None: plan sets it from the model's size.",
    )
    istio_sidecar: bool = Field(
        False,
        description="Let Istio inject its sidecar into the training pods. Off: the pods carry "
        "sidecar.istio.io/inject=false, since a sidecar in a Kubeflow profile namespace makes torchrun's "
        "rendezvous fail until the proxy is up and keeps finished pods running. On (meshes that require "
        "mTLS between pods): the pods wait for the proxy and the rendezvous port bypasses it; see "
        "docs/deploy.md.",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="Group restarts after a retryable failure (a lost or killed pod or rank, exit 138): the "
        "PyTorchJob's elasticPolicy.maxRestarts, and the local launcher's relaunches; each resumes from the "
        "newest complete checkpoint. Permanent failures (exit 1, 2) are never retried.",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Kill the job after this many seconds (runPolicy.activeDeadlineSeconds)."
    )
    ttl_seconds_after_finished: int | None = Field(
        86400, ge=0, description="Delete the finished job after this many seconds (runPolicy)."
    )
    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        "Running", description="Which pods the operator deletes when the job ends (runPolicy.cleanPodPolicy)."
    )
    watch_timeout_seconds: int = Field(
        300, ge=1, description="Server-side timeout of one watch request; the launcher reconnects after it."
    )


class TrainJobSection(_Section):
    runtime: str = Field(
        "fulltune-torch-distributed",
        min_length=1,
        description="launcher trainjob: the runtime the TrainJob references; default the ClusterTrainingRuntime "
        "the Helm chart installs (torch-distributed, Pod Security 'restricted', exit codes mapped to the "
        "JobSet's failure policy).",
    )
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = Field(
        "ClusterTrainingRuntime",
        description="Kind of `runtime`: cluster-wide, or a TrainingRuntime in the TrainJob's namespace.",
    )
    overrides_field: Literal["auto", "podSpecOverrides", "podTemplateOverrides", "runtimePatches"] = Field(
        "auto",
        description="The TrainJob field that carries this run's pod settings (volumes, Secrets, node "
        "selector, tolerations, service account) to the runtime's pods, which differs by Kubeflow Trainer "
        "release: podSpecOverrides (v2.0), podTemplateOverrides (v2.1), runtimePatches (v2.2 and later). "
        "'auto' reads it from the TrainJob schema the API server publishes; name it where that cannot be "
        "read. An API server drops a field its Trainer does not know, and the pods would start without "
        "those settings.",
    )


# A GPU sold as 80 GB shows 79.6 GiB (81,559 MiB): a device a little under resources.gpu_memory_gib
# still holds what plan sized for it; well under, training runs out of memory at its first step.
GPU_MEMORY_SLACK = 0.95
BF16_CAPABILITY = (8, 0)  # the CUDA compute capability from which GPUs have bf16: Ampere (A100, A10) on


class ResourcesSection(_Section):
    launcher: Literal["local", "kubernetes", "trainjob"] = Field(
        "local",
        description="Where training runs: 'local' runs torchrun on the step's own machine; 'kubernetes' "
        "creates a PyTorchJob (Kubeflow Training Operator, kubeflow.org/v1); 'trainjob' creates a TrainJob "
        "(Kubeflow Trainer v2, trainer.kubeflow.org) on `trainjob.runtime`. Both cluster launchers take "
        "their pod settings from `kubernetes`; `fulltune doctor` says which the cluster serves.",
    )
    num_nodes: int = Field(1, ge=1, description="Training nodes (pods).")
    nproc_per_node: int = Field(1, ge=1, description="Processes (GPUs) per node.")
    accelerator: Literal["gpu", "cpu"] = Field(
        "gpu", description="Device kind the ranks run on; 'cpu' uses gloo (tests, demo)."
    )
    gpu_memory_gib: float = Field(80.0, gt=0.0, description="Memory of one GPU, for the memory plan.")
    gpu_type: str = Field(
        "H100",
        min_length=1,
        description="The GPU model (H100, H200, A100, L40S, B200, MI300X, ...), for plan's cost estimate (its "
        "dense 16-bit peak) and its bf16 check (V100 and T4 have none).",
    )
    max_gpu_hours: float | None = Field(
        None,
        gt=0.0,
        description="Refuse a run whose estimated cost (plan's report: GPU-hours at an assumed MFU) is above this.",
    )
    memory_headroom: float = Field(
        0.9, gt=0.0, le=1.0, description="Fraction of GPU memory the plan may fill."
    )
    trainjob: TrainJobSection = Field(
        default_factory=TrainJobSection, description="launcher trainjob: the runtime it uses."
    )
    kubernetes: KubernetesSection = Field(
        default_factory=KubernetesSection,
        description="Training pod settings of the cluster launchers (kubernetes: PyTorchJob, trainjob: TrainJob).",
    )


class MultipleChoiceTask(_Section):
    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
        description="Task name; metrics are named mc_<name>_... .",
    )
    uri: str = Field(
        ...,
        min_length=1,
        description='JSONL file (local or s3://), one {"question", "choices": [...], "answer": index} a line.',
    )

    _location = field_validator("uri", mode="before")(location)


class GenerationTask(_Section):
    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
        description="Task name; metrics are named gen_<name>_... .",
    )
    uri: str = Field(
        ...,
        min_length=1,
        description='JSONL file (local or s3://), one {"prompt", "answer"} a line ("answer" may be a list of '
        "accepted answers); scored by exact match of the greedy continuation.",
    )

    _location = field_validator("uri", mode="before")(location)

    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per prompt.")
    stop: list[str] = Field(
        default_factory=lambda: ["\n"], description="The continuation is cut at the first of these strings."
    )


class EvaluationSection(_Section):
    max_general_ppl_increase: float = Field(
        0.05,
        ge=0.0,
        description="Largest allowed relative rise of general-set perplexity (forgetting), e.g. 0.05 = 5%.",
    )
    # lt=1: 5 meant as 5% would ask the loss to fall by 500%, a gate no model passes, found only after
    # the training; and a loss cannot fall by all of itself either. Negative: a domain loss that may rise.
    min_domain_loss_improvement: float = Field(
        0.0,
        lt=1.0,
        description="Smallest required relative drop of domain eval loss, a fraction below 1: e.g. 0.02 = 2%.",
    )
    per_device_eval_batch_size: int = Field(8, ge=1, description="Sequences per evaluation batch.")
    max_eval_sequences: int = Field(
        512,
        ge=1,
        description="Cap on sequences evaluated per set, and on questions or prompts per multiple-choice or "
        "generation task, spread evenly over the whole set or task file.",
    )
    mc_tasks: list[MultipleChoiceTask] = Field(
        default_factory=list,
        description="Multiple-choice tasks scored by log-likelihood (acc, acc_norm) on base and tuned model.",
    )
    max_mc_accuracy_drop: float = Field(
        2.0,
        ge=0.0,
        description="Largest allowed drop of multiple-choice accuracy (acc), in percentage points.",
    )
    bootstrap_resamples: int = Field(
        1000, ge=0, description="Bootstrap resamples for the confidence intervals; 0 turns them off."
    )
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap resampling.")
    confidence_level: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence level of the intervals.")
    generation_tasks: list[GenerationTask] = Field(
        default_factory=list,
        description="Exact-match generation tasks (greedy decoding) scored on base and tuned model.",
    )
    max_exact_match_drop: float = Field(
        2.0, ge=0.0, description="Largest allowed drop of exact-match accuracy, in percentage points."
    )
    compare_to: Literal["base", "registered"] = Field(
        "base",
        description="'registered': also score the version the registry's production pointer names (the "
        "champion) in the same pass; the candidate must not be worse on the domain set (within "
        "max_domain_loss_regression) nor on the general set (within max_general_ppl_regression), forgetting "
        "is still measured against the base too, and a pass promotes it. "
        "'base': the base model only; a model's first version is promoted, later ones by hand. Scheduled "
        "runs (`fulltune schedule`) default to 'registered'.",
    )
    max_domain_loss_regression: float = Field(
        0.0,
        ge=0.0,
        description="compare_to registered: largest allowed relative rise of domain eval loss against the "
        "champion, e.g. 0.01 = 1% worse still passes.",
    )
    # Not 0 like the domain tolerance: the candidate is not trained to lower the general perplexity,
    # so against a champion that forgot as little, a zero tolerance would refuse about every other
    # cycle on noise; 5% (as the forgetting budget) still stops one that forgot far more than it.
    max_general_ppl_regression: float = Field(
        0.05,
        ge=0.0,
        description="compare_to registered: largest allowed relative rise of general-set perplexity against "
        "the champion's, e.g. 0.05 = 5%; keeps a candidate that forgot much more than the serving version "
        "from replacing it for a small domain gain.",
    )
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness task names run through its API when lm-eval is installed; merged "
        "into the same table (reported, not gated).",
    )
    device_map: Literal["single", "auto"] = Field(
        "single",
        description="'single': each model on one device; 'auto': spread a model too large for one GPU over "
        "all GPUs of the node (accelerate device_map='auto').",
    )


class KubeflowRegistrySection(_Section):
    """Kubeflow Model Registry: where registered versions are also recorded (REST API)."""

    server_address: str = Field(
        ...,
        min_length=1,
        description="Model Registry REST endpoint, e.g. https://model-registry-service.kubeflow.svc.cluster.local.",
    )
    port: int = Field(8080, ge=1, le=65535, description="Port of the REST endpoint.")
    author: str = Field("fulltune", description="Author recorded on the registered model and version.")
    is_secure: bool = Field(
        True,
        description="Verify TLS; the bearer token comes from MODEL_REGISTRY_TOKEN or the pod's SA token.",
    )

    @field_validator("server_address")
    @classmethod
    def _no_credentials(cls, address: str) -> str:
        # an address without a scheme gets one (registry.kubeflow.endpoint): user:secret@host too
        if redact.has_userinfo(address if "://" in address else f"https://{address}"):
            raise ValueError(f"{CREDENTIALS_IN_CONFIG}; the token comes from MODEL_REGISTRY_TOKEN")
        return address


class RegistrySection(_Section):
    uri: str = Field(
        "", description="Registry root, local directory or s3:// prefix: models land in <uri>/<name>/v<N>/."
    )

    _location = field_validator("uri", mode="before")(location)

    checksum_algorithm: Literal["SHA256", "SHA1", "CRC32", "CRC32C", "CRC64NVME"] | None = Field(
        "SHA256",
        description="S3: the checksum S3 computes and verifies on every upload (every part of a multipart "
        "upload too); None leaves it to the client.",
    )
    sse_kms_key_id: str | None = Field(
        None, description="S3: encrypt registered objects with this KMS key (SSE-KMS)."
    )
    request_checksum_calculation: Literal["when_supported", "when_required"] | None = Field(
        None,
        description="S3 client setting; 'when_required' for S3-compatible stores that reject the checksums "
        "newer clients send by default. None: the client's default.",
    )
    kubeflow: KubeflowRegistrySection | None = Field(
        None, description="Also register in the Kubeflow Model Registry; None: S3/local registry only."
    )


# The fields a whole run cannot go without, and the step that would otherwise fail on each: checked
# by the pipeline's first step and before `fulltune submit` or `schedule` creates anything.
RUN_REQUIRES = {
    "model.base_model_uri": "the model to tune",
    "data.train_uri": "the domain training data",
    "work_dir": "where the run's shards, checkpoints and tuned model go; plan writes there first",
    "registry.uri": "where register publishes a model that passes the gate, after training",
}


class RunConfig(_Section):
    """The whole run. Sections mirror the pipeline's steps."""

    work_dir: str = Field(
        "",
        description="Run-scoped work directory (local path or s3://) for shards, checkpoints and the tuned model.",
    )

    _location = field_validator("work_dir", mode="before")(location)

    model: ModelSection = Field(default_factory=ModelSection, description="Base model.")
    data: DataSection = Field(default_factory=DataSection, description="Datasets.")
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection, description="Tokenizer checks.")
    preprocess: PreprocessSection = Field(
        default_factory=PreprocessSection, description="Tokenizing and packing."
    )
    training: TrainingSection = Field(default_factory=TrainingSection, description="Hyper-parameters.")
    resources: ResourcesSection = Field(default_factory=ResourcesSection, description="Compute.")
    evaluation: EvaluationSection = Field(
        default_factory=EvaluationSection, description="Evaluation and the gate."
    )
    registry: RegistrySection = Field(
        default_factory=RegistrySection, description="Where passing models are registered."
    )

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        _refuse(self.section_contradictions())
        return self

    def section_contradictions(self) -> list[Problem]:
        """Settings of different sections that cannot work together (a GPU kernel on the CPU, bf16 on
        a GPU without it): refused when the config is read, before a run or its pods exist."""
        tr, res = self.training, self.resources
        out: list[Problem] = []
        cpu = res.accelerator == "cpu"
        if tr.use_liger_kernel and cpu:
            why = "set but resources.accelerator is cpu: Liger's kernels are Triton kernels for GPUs"
            out.append((("training", "use_liger_kernel"), True, why))
        if tr.attn_implementation == "flash_attention_2" and cpu:
            why = (
                "training.attn_implementation is flash_attention_2 but resources.accelerator is cpu: "
                "FlashAttention is a GPU kernel; set sdpa (the default)"
            )
            out.append((("training", "attn_implementation"), tr.attn_implementation, why))
        if tr.hierarchical_partitioning and (why := self._hpz_problem()):
            out.append((("training", "hierarchical_partitioning"), True, f"set but {why}"))
        if self.precision == "bf16" and not _has_bf16(res.gpu_type):
            why = (
                f"set but resources.gpu_type {res.gpu_type} has no bf16 (it needs an Ampere or newer "
                "GPU): set training.bf16: false and training.fp16: true"
            )
            out.append((("training", "bf16"), True, why))
        if tr.stop_on_forgetting and not self.data.general_uri:
            why = (
                "set but data.general_uri is empty: forgetting is measured on the general eval set held "
                "out from it; set data.general_uri or stop_on_forgetting: false"
            )
            out.append((("training", "stop_on_forgetting"), True, why))
        return out

    def _hpz_problem(self) -> str | None:
        res = self.resources
        if res.num_nodes == 1:
            return "resources.num_nodes is 1: there is no traffic between nodes to save"
        if res.nproc_per_node == 1:
            return "resources.nproc_per_node is 1: a node of one GPU has no one to share the copy with"
        if self.training.offload_param:
            return (
                "training.offload_param is set: the copy would bring the offloaded parameters back to the GPU"
            )
        return None

    def contradictions(self) -> list[str]:
        """Every contradiction between fields, as 'FIELD: problem' (the validators refuse them when
        a config is read; plan and train ask again of the config they were given)."""
        found = [(("training", *path), value, why) for path, value, why in self.training.contradictions()]
        return [f"{'.'.join(path)}: {why}" for path, _, why in found + self.section_contradictions()]

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, source: str = "config") -> RunConfig:
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None

    @classmethod
    def from_pipeline(cls, config: dict[str, Any] | None) -> RunConfig:
        """The `config` parameter a pipeline step receives (the only place a run is a dict)."""
        return cls.from_dict(config, source="pipeline parameter 'config'")

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        """A config file: YAML, or JSON by its .json suffix (errors name the file, line and field).
        A parameters file as `fulltune submit --params` takes it ({typed parameter: value, config:
        {...}}) is the config it stands for, so the file a run is submitted with can be checked and
        run here as it is."""
        from fulltune import parameters

        return cls.from_dict(parameters.file_config(read_config_file(path), str(path)), source=str(path))

    def with_overrides(self, overrides: dict[str, Any] | None) -> RunConfig:
        """A new config with `overrides` (nested dict, or dotted keys) merged over this one."""
        merged = deep_merge(self.model_dump(), expand_dotted(overrides or {}))
        return RunConfig.from_dict(merged, source="overrides")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; unset optional fields are left out (KFP parameters cannot carry nulls)."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # -- derived values -----------------------------------------------------------------------

    @property
    def tokenizer_uri(self) -> str:
        return self.model.tokenizer_uri or self.model.base_model_uri

    @property
    def world_size(self) -> int:
        return self.resources.num_nodes * self.resources.nproc_per_node

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over the configured world size."""
        return self.training.global_batch_size(self.world_size)

    @property
    def tokens_per_step(self) -> int:
        """Token positions per optimizer step: the global batch of max_seq_len sequences."""
        return self.global_batch_size * self.preprocess.max_seq_len

    @property
    def precision(self) -> Precision:
        """What training computes in: bf16 or fp16 on a GPU as configured, float32 on the CPU (where
        both flags are ignored). The DeepSpeed JSON, the trainer's load dtype and every report read it."""
        tr = self.training
        if tr.bf16 and tr.fp16:
            raise ConfigError(
                "training.bf16 and training.fp16 are both true: choose one "
                "(set training.bf16: false to train in float16 with loss scaling)"
            )
        if self.resources.accelerator == "cpu":
            return "fp32"
        return "bf16" if tr.bf16 else "fp16" if tr.fp16 else "fp32"

    @property
    def layout(self) -> RunLayout:
        """Where this run's files live under `work_dir` (plan, shards, model, checkpoints, eval)."""
        from fulltune.layout import RunLayout

        if not self.work_dir:
            raise ConfigError(
                "work_dir: required (a local directory or s3:// prefix for this run's data and model)"
            )
        return RunLayout(self.work_dir)

    @property
    def tensorboard_dir(self) -> str | None:
        """Where rank 0 writes TensorBoard's event files; None unless report_to has tensorboard."""
        if "tensorboard" not in self.training.report_to:
            return None
        return self.training.logging_dir or self.layout.tensorboard

    def missing_to_run(self) -> list[str]:
        """Each field a whole run needs that is empty, as 'FIELD: required (what it is for)': the
        pipeline's first step refuses these, so a run never trains to fail at the step that needs it."""
        return [
            f"{name}: required ({why})" for name, why in RUN_REQUIRES.items() if not _get_dotted(self, name)
        ]

    def value(self, dotted: str) -> Any:
        """The value of one field by its dotted name ("training.seed")."""
        return _get_dotted(self, dotted)

    def missing(self, *dotted: str) -> list[str]:
        """The listed fields (dotted names) that are empty."""
        return [name for name in dotted if not _get_dotted(self, name)]

    def require(self, *dotted: str) -> None:
        """Fail with a ConfigError naming every listed field that is empty."""
        missing = self.missing(*dotted)
        if missing:
            raise ConfigError("required but empty: " + ", ".join(missing))


def _has_bf16(gpu_type: str) -> bool:
    from fulltune.train.throughput import has_bf16

    return has_bf16(gpu_type)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a config file as written (YAML, or JSON by its .json suffix), not yet validated.

    Raises:
        ConfigError: the file is missing, does not parse (with line and column), or is not a mapping.
    """
    path = Path(path)
    text = _config_text(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_unique_json_object)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
        except _DuplicateKey as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    else:
        try:
            data = load_yaml(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data or {}


class _DuplicateKey(ValueError):
    pass


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once (json keeps the last of a repeated one silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(
                f"key {key!r} given twice in one object (only the last would count): remove one"
            )
        out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing a key given twice in one mapping: PyYAML keeps the last silently, so
    `work_dir` written twice would run with whichever came last, unnoticed."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys after it override by design
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, list | dict):
            continue  # unhashable: the safe constructor reports it
        if key in seen:
            first = seen[key].line + 1
            raise yaml.constructor.ConstructorError(
                problem=f"key {key!r} given twice, at lines {first} and {key_node.start_mark.line + 1} "
                "(only the last would count): remove one",
                problem_mark=key_node.start_mark,
            )
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
# Plain scalars that look like dates stay text: no field holds a date object, and YAML would read
# `as_of: 2026-11-27` (the field's own example, unquoted) as one, refused as "not a valid string",
# and a date in the `config` parameter would not serialize to the JSON a pipeline run is sent with.
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing a key given twice in one mapping (a yaml.YAMLError naming the key and
    both lines). Every config file, parameters file and cluster defaults file is read with it."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only


def _config_text(path: Path) -> str:
    """The file's text; a ConfigError naming the file (and for bytes that are not UTF-8, their line
    and offset) where it cannot be read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a config file (name a YAML or JSON file)") from None
    except OSError as exc:  # permissions, a broken mount: no traceback, the reason as the OS gives it
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{path}:{line}:{column}: not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset "
            f"{exc.start} (save the file as UTF-8)"
        ) from None


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [line for err in exc.errors() for line in _error_lines(err)]
    return "\n".join([f"{source}: {len(lines)} invalid field(s)", *lines])


def _error_lines(err: Any) -> list[str]:
    """One error's lines, '  FIELD: what is wrong (got VALUE)'; a FieldProblems error has a line per
    problem, each at its own field."""
    problem = err.get("ctx", {}).get("error")
    if isinstance(problem, FieldProblems):
        return [
            f"  {'.'.join(_loc_part(p) for p in (*err['loc'], *path))}: {msg}"
            + ("" if value is None else f" (got {value!r})")
            for path, value, msg in problem.problems
        ]
    return [_error_line(err)]


def _error_line(err: Any) -> str:
    field = ".".join(_loc_part(p) for p in err["loc"]) or "<root>"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = _unknown_field(err["loc"])
    if _a_percentage_for_a_fraction(err):
        msg += ": a fraction, 0.05 = 5%"
    got = err.get("input")
    shown = (
        ""
        # a refused credential is not shown either
        if err["type"] in ("extra_forbidden", "missing")
        or isinstance(got, dict)
        or CREDENTIALS_IN_CONFIG in msg
        else f" (got {got!r})"
    )
    return f"  {field}: {msg}{shown}"


def _unknown_field(loc: tuple[Any, ...]) -> str:
    """Why a key is not a field. A dotted name ("training.learning_rate", as messages and docs name
    fields) is no key of a config, which nests its sections: say how to write it, rather than to
    check a spelling that may well be right."""
    parts = [str(p) for p in loc[:-1]] + (str(loc[-1]).split(".") if loc else [])
    if len(parts) == len(loc) or not _is_field(parts):
        return "unknown field (check the spelling; `fulltune config --describe` lists the fields)"
    nested = "".join(f'{{"{part}": ' for part in parts) + "..." + "}" * len(parts)
    return f"a dotted name: a config nests its sections, {nested}"


def _is_field(parts: list[str]) -> bool:
    """Whether `parts` name a field of RunConfig, section by section (an optional section too)."""
    model: type[BaseModel] | None = RunConfig
    for part in parts:
        info = model.model_fields.get(part) if model is not None else None
        if info is None:
            return False
        model, kind = _section_of(info.annotation)
        model = model if kind in ("section", "optional") else None
    return True


def _a_percentage_for_a_fraction(err: Any) -> bool:
    """A value above 1 for a field that is at most 1 (a rate, a ratio, a share): most likely a
    percentage written where the field takes a fraction."""
    limit = err.get("ctx", {})
    bound = limit.get("le", limit.get("lt"))
    try:
        got = float(err.get("input"))  # a number, or a string of one (YAML's 5%-as-"5")
    except (TypeError, ValueError):
        return False
    return bound == 1 and got > 1


def _loc_part(part: Any) -> str:
    """A key of the error's path as written: quoted where it is empty, has spaces, dots, colons or
    characters that do not print (a stray '\\r' key would otherwise break the message's lines)."""
    text = str(part)
    return text if text and text.isprintable() and not any(c in text for c in " .:") else repr(text)


def expand_dotted(data: dict[str, Any]) -> dict[str, Any]:
    """{'training.learning_rate': 1e-5} -> {'training': {'learning_rate': 1e-5}}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            value = expand_dotted(value)
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _get_dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def describe() -> str:
    """Every field with its default and description, as a YAML-like listing; optional sections
    (None unless set) and lists of sections (evaluation tasks, tolerations, volumes) included, with
    the fields of one item."""
    lines: list[str] = []

    def walk(model: type[BaseModel], indent: str) -> None:
        for name, field in model.model_fields.items():
            section, kind = _section_of(field.annotation)
            default = "<required>" if field.is_required() else field.get_default(call_default_factory=True)
            if section is None:
                shown = default if default == "<required>" else repr(default)
                lines.append(f"{indent}{name}: {shown}  # {field.description}")
            elif kind == "section":
                lines.append(f"{indent}{name}:  # {field.description}")
                walk(section, indent + "  ")
            elif kind == "optional":
                lines.append(f"{indent}{name}: None  # {field.description} (optional section; its fields:)")
                walk(section, indent + "  ")
            else:
                lines.append(f"{indent}{name}: {default!r}  # {field.description} (a list; each item has:)")
                walk(section, indent + "    ")

    walk(RunConfig, "")
    return "\n".join(lines)


def _section_of(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """(the section model, "section" | "optional" | "list") of a field's type, or (None, "")."""
    import typing

    def model_in(args) -> type[BaseModel] | None:
        return next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, "section"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and model_in(args):
        return model_in(args), "list"
    if type(None) in args and model_in(args):
        return model_in(args), "optional"
    return None, ""
