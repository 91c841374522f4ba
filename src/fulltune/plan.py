"""plan: size the run before any GPU is spent on it.

- Parameter count from the model config, on the meta device (no weights are read).
- Memory per GPU under ZeRO-3 (the coefficients were measured: `benchmarks/plan_memory.py`, on an
  H200, two Llama shapes, micro batch 1-8, with and without recomputation; docs/benchmarks.md):
    model states   AdamW: 16 bytes/param (bf16 weights 2 + bf16 grads 2 + fp32 master 4 + Adam m, v 8);
                   Adafactor: 12 bytes/param (2 + 2 + fp32 master 4 + second moment 4, no first
                   moment). Adafactor factors the second moment of a matrix into a row and a column
                   vector, but under ZeRO-3 the optimizer only ever sees DeepSpeed's flat 1-D fp32
                   partitions, so the moment is stored whole: 4 bytes, not ~0. All divided by the
                   world size (optimizer offload moves the fp32 bytes to CPU; parameter offload
                   moves the 16-bit weights too),
    + 4 x the largest layer (bytes) for gathered parameters and gradients in flight, as DeepSpeed's
      own estimator assumes (`estimate_zero3_model_states_mem_needs`),
    + the larger of two transients that never coexist:
      - forward/backward: activations per layer and token ~ 24*h bytes for attention and norms plus
        8*I for a gated MLP (SwiGLU: gate, up, activation, product; 4*I ungated), I the MLP width;
        with Liger's fused kernels 16*h and 6*I (its RMSNorm keeps no fp32 copy, its SwiGLU no
        activation; 1B Llama on an H200: 8.0 GiB less expected, 8.1 measured);
        a recomputed layer keeps only its input, 2*h, and the layer being recomputed holds one
        layer's worth; and the logits at 12 bytes
        each (bf16 logits, the fp32 copy the loss takes, its log-probabilities, their gradient);
      - the optimizer step: DeepSpeed steps the fp32 partition in sub-groups of at most
        `sub_group_size` (1e9) elements, making an fp32 gradient for the one being stepped: 6 bytes
        per element measured with the fused CUDA AdamW that `train` uses (12 with torch's
        single-tensor AdamW, whose two full-size temporaries the fused kernel avoids); Adafactor
        (not measured) ~16; nothing on the GPU when the optimizer is offloaded,
    + fragmentation: 20% of all the above (the most measured was 16%, with the expandable-segments
      allocator that `train` turns on; the default allocator left up to 45% unused),
    + a fixed 1.5 GiB for the CUDA context, NCCL and cuBLAS workspaces (1.3 GiB measured on one GPU).
- If the configured micro batch does not fit, plan tries in order: the chunked loss, gradient
  checkpointing of the fewest decoder layers that fit (selective recomputation), a smaller micro batch (keeping the global batch with more accumulation), optimizer offload,
  parameter offload; if nothing fits it refuses, saying what would. `training.offload_optimizer`
  and `training.offload_param` set to true or false force that choice (in the estimate and the
  DeepSpeed JSON); None lets plan decide.
- Precision: bf16, or fp16 with DeepSpeed's dynamic loss scaling (both 2 bytes, same estimate);
  asking for both is refused. On CPU neither applies and the JSON enables neither.
- The DeepSpeed JSON has no "optimizer" or "scheduler" block: the trainer builds AdamW or
  Adafactor and the schedule itself and hands them to `deepspeed.initialize`.
- Hyper-parameter defaults from common practice, overridable in the config:
    learning rate ~ 1e-5 * sqrt(7e9 / params), clipped to [5e-6, 1e-3]: 1e-5 for 7B full
      fine-tuning, larger for smaller models;
    epochs by training tokens: < 5M tokens -> 3, < 50M -> 2, else 1.
- Training tokens (what the epochs rule goes by): the records of the data files, counted from what
  they decode to (`data.extent`: a gzipped or Parquet file holds 5-15x the text its size says; of more
  than 64 files of a format, a sample, scaled by size), x the mean tokens of the first records. Steps and cost go by the sequences an epoch makes of them
  (`epoch_sequences`: with packing off, a padded sequence per record however short).
The resolved config and the DeepSpeed JSON are written to the work directory for `train`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fulltune import storage
from fulltune.config import ConfigError, DataSection, RunConfig
from fulltune.cost import CostError, CostEstimate, check_budget, estimate_cost, planned_tokens
from fulltune.disk import DiskEstimate, checkpoint_bytes, estimate_disk, pod_scratch_request
from fulltune.preprocess.dataset import MAX_REPLAY_REPEATS, MIN_GENERAL_EVAL_SEQUENCES
from fulltune.report_kit import markdown_table
from fulltune.train import liger
from fulltune.train.recompute import layers_recomputed

if TYPE_CHECKING:
    from fulltune.layout import RunLayout

log = logging.getLogger(__name__)

GiB = 1024**3
FIXED_OVERHEAD_BYTES = int(1.5 * GiB)
FRAGMENTATION = 0.2  # of the allocated peak, with expandable segments (see the module docstring)
# Model-state bytes per parameter under ZeRO-3, and how many of them are fp32 optimizer-side bytes
# (master weights + moments) that optimizer offload moves to CPU. See the module docstring.
STATE_BYTES = {"adamw_torch": (16.0, 12.0), "adafactor": (12.0, 8.0)}
# Bytes per element of the fp32 sub-group being stepped: measured 6 with the fused AdamW `train` uses
# on GPU (its fp32 gradient and DeepSpeed's bookkeeping; 12 with the single-tensor AdamW); Adafactor,
# not measured, is given its gradient and ~3 full-size fp32 temporaries.
STEP_BYTES = {"adamw_torch": 6.0, "adafactor": 16.0}
SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed ZeRO-3's default sub_group_size, written into the JSON
ATTENTION_BYTES_PER_H = 24.0  # activation bytes per token and layer, per unit of hidden size
GATED_MLP_BYTES_PER_I = 8.0  # SwiGLU: gate, up, activation, product (per unit of MLP width)
# What Liger's fused kernels keep less, per token and layer: each of the two RMSNorms saves its bf16
# input and one fp32 number per token instead of an fp32 copy of the input (4 bytes per h each), and
# the SwiGLU saves gate and up but not the activation (2 bytes per I). On a 1B Llama on an H200
# (micro batch 8 x 2048 tokens) that is 8.0 GiB; measured 8.1 (peak allocated 68.9 -> 60.8 GiB).
LIGER_SAVED_BYTES_PER_H = 8.0
LIGER_SAVED_BYTES_PER_I = 2.0
LOGIT_BYTES = 12.0
# The chunked loss (train/chunked_loss.py) is a little slower than the plain logits (more, smaller
# kernels; measured on an H200, docs/benchmarks.md), so plan uses it only where the plain logits do
# not fit, with chunks of about this many bytes of fp32 logits.
LOSS_CHUNK_BYTES = 1 * GiB
# Bytes per element of the ZeRO-3 buckets in flight: two 16-bit reduce buckets (one filling while
# the other is reduced, with overlap_comm) and the 16-bit parameters prefetched ahead of the compute.
REDUCE_BUCKET_BYTES = 4.0
PREFETCH_BUCKET_BYTES = 2.0


class PlanError(ValueError):
    """The run cannot fit or is misconfigured; the message says what would work."""


@dataclass(frozen=True)
class ModelShape:
    params: int
    largest_layer_params: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    model_type: str
    intermediate_size: int = 0  # MLP width; 0: 4 x hidden_size
    gated_mlp: bool = False  # SwiGLU-style (gate and up projections)
    # The transformer block (the model's `_no_split_modules` class), its parameters, and DeepSpeed's
    # module granularity threshold that makes each block one ZeRO-3 leaf; 0 where none does that alone.
    block_class: str = ""
    block_params: int = 0
    block_leaf_threshold: int = 0
    # Parameters that do matrix work (`throughput.matmul_params`); 0: all of them.
    matmul_params: int = 0
    # Query heads x head size (`throughput.attention_width`), for the FLOPs; 0: the hidden size.
    attention_width: int = 0


# The components of MemoryEstimate.total, in the order reports list them (bytes per GPU), with the
# plan report's label for each.
MEMORY_LABELS = {
    "model_states": "model states / GPU",
    "secondary_params": "hpZ copy of the parameters",
    "gathered_layers": "gathered layers",
    "buckets": "ZeRO-3 buckets",
    "activations": "activations",
    "logits": "logits",
    "optimizer_step": "optimizer step (transient)",
    "fragmentation": "fragmentation",
    "overhead": "CUDA context, NCCL",
}
MEMORY_PARTS = tuple(MEMORY_LABELS)


@dataclass
class MemoryEstimate:
    model_states: float
    gathered_layers: float
    activations: float
    logits: float
    overhead: float
    micro_batch: int
    offload_optimizer: bool
    offload_params: bool
    optimizer_step: float = 0.0  # transient, never at the same time as activations and logits
    fragmentation: float = 0.0
    buckets: float = 0.0
    loss_chunk_tokens: int = 0  # 0: plain logits
    recompute_layers: int = 0  # decoder layers that recompute their activations
    # ZeRO++ hpZ: the GPUs (of one node) a second copy of the 16-bit parameters is partitioned over;
    # 1: none. `secondary_params` is that copy's bytes per GPU.
    hpz_partition_size: int = 1
    secondary_params: float = 0.0
    liger: bool = False  # Liger's fused kernels, counted in `activations`

    @property
    def gradient_checkpointing(self) -> bool:
        return self.recompute_layers > 0

    @property
    def total(self) -> float:
        return (
            self.model_states
            + self.secondary_params
            + self.gathered_layers
            + self.buckets
            + max(self.activations + self.logits, self.optimizer_step)
            + self.fragmentation
            + self.overhead
        )


@dataclass
class Plan:
    shape: ModelShape
    memory: MemoryEstimate
    budget_bytes: float
    world_size: int
    train_tokens_estimate: int
    decisions: list[str] = field(default_factory=list)
    config: RunConfig = field(default_factory=RunConfig)  # the resolved config
    deepspeed: dict[str, Any] = field(default_factory=dict)
    cost: CostEstimate | None = None  # None off a GPU
    disk: DiskEstimate | None = None
    # What an epoch of training sequences holds (`epoch_tokens`): padding and replay included; 0: the
    # dataset's tokens
    epoch_tokens: int = 0

    def length_summary(self) -> str:
        """How long the run trains, as the config sets it: max_steps wins over num_train_epochs, so
        a run with max_steps is shown in steps, with the epochs they come to over the data."""
        cfg, tr = self.config, self.config.training
        per_epoch = self.epoch_tokens or self.train_tokens_estimate
        if tr.max_steps <= 0:
            epochs = _counted(tr.num_train_epochs, "epoch")
            steps_per_epoch = per_epoch / cfg.tokens_per_step
            if steps_per_epoch < 1:  # train refuses this; plan only where clearly so (check_one_batch)
                return (
                    f"{epochs}, but the data (~{self.train_tokens_estimate:,} tokens, "
                    f"an estimate) is less than one global batch of {cfg.global_batch_size} "
                    f"sequences x {cfg.preprocess.max_seq_len} tokens"
                )
            return f"{epochs} (~{_counted(math.ceil(steps_per_epoch * tr.num_train_epochs), 'step')})"
        epochs = planned_tokens(cfg, per_epoch) / max(1, per_epoch)
        return f"{_counted(tr.max_steps, 'step')} (training.max_steps; ~{epochs:.2g} epochs)"

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "config"}  # asdict would not dump pydantic
        out["memory"]["total"] = self.memory.total
        out["memory"]["gradient_checkpointing"] = self.memory.gradient_checkpointing
        return {**out, "config": self.config.to_dict()}


def _counted(n: float, noun: str) -> str:
    """'1 epoch', '2 epochs', '0.5 epochs', '1,200 steps'."""
    figure = f"{int(n):,}" if float(n).is_integer() else f"{n:g}"
    return f"{figure} {noun}{'' if n == 1 else 's'}"


# -- model shape ----------------------------------------------------------------------------------


def load_model_config(cfg: RunConfig):
    """The base model's config; PlanError naming the file when transformers cannot read it."""
    from fulltune.hf import load_config

    uri = cfg.model.base_model_uri
    try:
        return load_config(uri, cfg.model.trust_remote_code)
    except (ValueError, KeyError, OSError) as exc:  # transformers' ways of saying "cannot read this"
        raise PlanError(
            f"{storage.join(uri, 'config.json')}: cannot read the model's configuration ({type(exc).__name__}: "
            f"{exc}); the check_tokenizer step checks the model's files and says what to do"
        ) from None


def model_shape(model_config) -> ModelShape:
    """Count parameters by building the model on the meta device: exact, and no weights are read."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text_cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = getattr(text_cfg, "hidden_size", None) or text_cfg.n_embd
    layers = getattr(text_cfg, "num_hidden_layers", None) or text_cfg.n_layer
    inter = getattr(text_cfg, "intermediate_size", None) or getattr(text_cfg, "n_inner", None) or 4 * hidden
    gated = any(n.endswith(("gate_proj", "gate_up_proj", "w1", "w3")) for n, _ in model.named_modules())
    from fulltune.train.throughput import attention_width, matmul_params

    return ModelShape(
        params,
        largest,
        int(hidden),
        int(layers),
        int(text_cfg.vocab_size),
        model_config.model_type,
        int(inter),
        gated,
        *block_leaf(model),
        matmul_params(model),
        attention_width(text_cfg),
    )


# DeepSpeed never makes a module with more parameters than this a leaf (parameter_offload.py).
Z3_MAX_LEAF_PARAMS = 1_000_000_000


def block_leaf(model) -> tuple[str, int, int]:
    """(the transformer block's class, its parameters, the granularity threshold that makes each block
    one ZeRO-3 leaf). The threshold is ("", 0, 0) where the model names no block, and 0 where any
    threshold that reaches the blocks would also make a larger module a leaf.

    DeepSpeed walks the model top-down and makes the first module whose granularity (its parameters
    over its modules with parameters, `_granularity`) is at most the threshold a leaf: it gathers all
    of a leaf's parameters with one hook instead of one hook per linear and norm."""
    import sys

    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        return "", 0, 0
    granularity: dict[Any, int] = {}
    _granularity(model, granularity)
    threshold = max(granularity[b] for b in blocks)
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    leaves: list[Any] = []
    _leaves(model, threshold, granularity, leaves)
    if threshold == sys.maxsize or any(sum(p.numel() for p in m.parameters()) > block_params for m in leaves):
        threshold = 0
    return type(blocks[0]).__name__, block_params, threshold


def _granularity(module, out: dict) -> tuple[int, int]:
    """DeepSpeed's module granularity of `module` and of every module below it, into `out`; returns
    (modules with parameters, parameters) of the subtree, counted as DeepSpeed counts them (a tied
    weight once per module holding it; containers such as ModuleList not counted)."""
    import sys

    import torch

    if next(module.parameters(), None) is None:
        out[module] = sys.maxsize
        return 0, 0
    params = sum(p.numel() for p in module.parameters(recurse=False))
    children = list(module.children())
    if not children:
        out[module] = sys.maxsize  # a torch leaf is never made a ZeRO-3 leaf: it already is one
        return 1, params
    layers = 0
    for child in children:
        child_layers, child_params = _granularity(child, out)
        layers, params = layers + child_layers, params + child_params
    if type(module).__name__ in torch.nn.modules.container.__all__:
        out[module] = sys.maxsize
        return layers, params
    layers += 1
    out[module] = params // layers if params <= Z3_MAX_LEAF_PARAMS else sys.maxsize
    return layers, params


def _leaves(module, threshold: int, granularity: dict, out: list) -> None:
    """The modules DeepSpeed makes leaves at `threshold`, in its top-down order."""
    if next(module.parameters(), None) is None:
        return
    if granularity[module] <= threshold:
        out.append(module)
        return
    for child in module.children():
        _leaves(child, threshold, granularity, out)


# -- ZeRO-3 settings ------------------------------------------------------------------------------

# DeepSpeed's own defaults, the upper bounds below (elements).
DS_REDUCE_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
DS_PERSISTENCE = 100_000
REDUCES_PER_BACKWARD = 16  # the gradient of the whole partition in about this many reduce-scatters


@dataclass(frozen=True)
class Zero3Settings:
    """The ZeRO-3 communication settings plan chooses from the model's shape, with the reason for each."""

    reduce_bucket_size: int
    prefetch_bucket_size: int
    persistence_threshold: int
    max_live_parameters: int
    overlap_comm: bool
    reasons: tuple[str, ...]
    leaf_threshold: int = 0  # DeepSpeed's stage3_module_granularity_threshold; 0: a hook per module


def layer_params(shape: ModelShape) -> int:
    """Parameters of one transformer block: all but the embedding and the output head (counted as two
    vocabulary x hidden matrices, so tied models get a slight underestimate, which only errs small)."""
    body = shape.params - 2 * shape.vocab_size * shape.hidden_size
    return max(body // max(shape.num_layers, 1), shape.hidden_size)


def zero3_settings(shape: ModelShape, *, gpu: bool) -> Zero3Settings:
    """Bucket sizes that make each collective large enough to run at bandwidth rather than latency,
    and prefetching that keeps the next block's gather ahead of the compute.

    Hugging Face's "auto" values (reduce h^2, prefetch 0.9 h^2, persistence 10 h) are a few million
    elements: a 1B model's backward becomes ~200 reduce-scatters and its forward gathers each block
    in pieces, each paying launch and NCCL latency. Here:
    - reduce bucket: the model in ~16 buckets, at least one block, at most DeepSpeed's 5e8;
    - prefetch bucket: two blocks (the next one's gather overlaps this one's compute), at most 5e8;
    - persistence: parameters under max(1e5, 10 h) elements (norms, biases) stay gathered: gathering
      them costs a collective each and keeping them costs almost no memory;
    - max live parameters: room for the prefetch and the block being computed, at least 1e9;
    - leaf modules: each transformer block gathered and released as one unit. ZeRO-3's hooks on every
      linear and norm keep the host busy enough to leave the GPU idle: on one H200 a 0.9B Llama step
      took 471 ms with them and 261 ms with one hook per block (docs/benchmarks.md, GPU check run 2).
    """
    block = layer_params(shape)
    reduce_bucket = int(min(DS_REDUCE_BUCKET, max(block, shape.params // REDUCES_PER_BACKWARD)))
    prefetch = int(min(DS_REDUCE_BUCKET, 2 * block))
    persistence = int(max(DS_PERSISTENCE, 10 * shape.hidden_size))
    live = int(max(1_000_000_000, 3 * prefetch))
    reasons = (
        f"ZeRO-3 reduce bucket {reduce_bucket:,} elements: the gradients in ~"
        f"{math.ceil(shape.params / reduce_bucket)} reduce-scatters per backward, not "
        f"~{math.ceil(shape.params / shape.hidden_size**2)} with h^2 buckets",
        prefetch_reason(shape, prefetch),
        f"ZeRO-3 persistence threshold {persistence:,} elements: norms and biases stay gathered",
        "overlap_comm on: collectives run on their own stream beside the compute"
        if gpu
        else "overlap_comm off: on CPU (gloo) there is no separate stream to overlap on",
        leaf_reason(shape),
    )
    return Zero3Settings(reduce_bucket, prefetch, persistence, live, gpu, reasons, shape.block_leaf_threshold)


def prefetch_reason(shape: ModelShape, prefetch: int) -> str:
    """What the prefetch bucket holds, in blocks of their exact size where the model names them: under
    DeepSpeed's 5e8 cap (a 70B block is 8.6e8) it is less than one, and `layer_params` undercounts a
    tied model's blocks (1B Llama: 44M for 61M)."""
    block = shape.block_params or layer_params(shape)
    blocks = prefetch / block
    if blocks >= 1.95:
        ahead = f"the next two blocks ({block:,} parameters each)"
    elif blocks >= 1.0:
        ahead = f"the next ~{blocks:.1f} blocks ({block:,} parameters each)"
    else:
        ahead = f"~{blocks:.0%} of the next block ({block:,} parameters)"
    capped = " (the most plan sets)" if prefetch == DS_REDUCE_BUCKET else ""
    return f"ZeRO-3 prefetch bucket {prefetch:,} elements{capped}: {ahead} gathered while this one computes"


def leaf_reason(shape: ModelShape) -> str:
    if shape.block_leaf_threshold:
        return (
            f"ZeRO-3 leaf modules: each {shape.block_class} ({shape.block_params:,} parameters) gathered "
            f"and released as one unit (module granularity threshold {shape.block_leaf_threshold:,}): "
            "one hook per block instead of one per linear and norm"
        )
    if shape.block_class:
        return (
            f"ZeRO-3 hooks on every module: no granularity threshold makes {shape.block_class} a leaf "
            "without also making a larger module one"
        )
    return "ZeRO-3 hooks on every module: the model names no transformer block (_no_split_modules)"


# -- memory -----------------------------------------------------------------------------------


def estimate_memory(
    shape: ModelShape,
    *,
    world_size: int,
    seq_len: int,
    micro_batch: int,
    gradient_checkpointing: bool,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    optim: str = "adamw_torch",
    loss_chunk_tokens: int = 0,
    recompute_layers: int | None = None,
    hpz_partition_size: int = 1,
    liger: bool = False,
) -> MemoryEstimate:
    """`recompute_layers`: how many layers recompute with gradient_checkpointing; None: all of them.
    `hpz_partition_size`: the GPUs ZeRO++ hpZ partitions its 16-bit copy of the parameters over (1: no
    copy). `liger`: Liger's fused kernels, which keep fewer activations."""
    bytes_per_param, optimizer_bytes = STATE_BYTES[optim]
    if offload_optimizer:
        bytes_per_param -= optimizer_bytes  # fp32 master weights and moments live in CPU memory
    if offload_params:
        bytes_per_param -= 2.0  # bf16 partitions live in CPU memory too
    model_states = shape.params * bytes_per_param / world_size
    secondary = hpz_copy_bytes(shape, hpz_partition_size)
    gathered = 4.0 * max(shape.largest_layer_params, shape.block_params if shape.block_leaf_threshold else 0)
    tokens = seq_len * micro_batch
    per_layer = tokens * layer_activation_bytes(shape, liger)
    recomputed = layers_recomputed(gradient_checkpointing, recompute_layers, shape.num_layers)
    activations = per_layer * (shape.num_layers - recomputed)
    if recomputed:  # their inputs, and the one being recomputed in the backward
        activations += 2.0 * tokens * shape.hidden_size * recomputed + per_layer
    logits = logits_bytes(shape, tokens, loss_chunk_tokens)
    step = 0.0 if offload_optimizer else STEP_BYTES[optim] * min(shape.params / world_size, SUB_GROUP_SIZE)
    zero = zero3_settings(shape, gpu=True)
    buckets = (
        REDUCE_BUCKET_BYTES * zero.reduce_bucket_size + PREFETCH_BUCKET_BYTES * zero.prefetch_bucket_size
    )
    allocated = model_states + secondary + gathered + buckets + max(activations + logits, step)
    return MemoryEstimate(
        model_states=model_states,
        gathered_layers=gathered,
        activations=activations,
        logits=logits,
        overhead=FIXED_OVERHEAD_BYTES,
        micro_batch=micro_batch,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        optimizer_step=step,
        fragmentation=FRAGMENTATION * allocated,
        buckets=buckets,
        loss_chunk_tokens=loss_chunk_tokens,
        recompute_layers=recomputed,
        hpz_partition_size=hpz_partition_size,
        secondary_params=secondary,
        liger=liger,
    )


def layer_activation_bytes(shape: ModelShape, liger: bool) -> float:
    """Activation bytes one decoder layer keeps per token for its backward."""
    h, inter = shape.hidden_size, shape.intermediate_size or 4 * shape.hidden_size
    per_h = ATTENTION_BYTES_PER_H - (LIGER_SAVED_BYTES_PER_H if liger else 0.0)
    if not shape.gated_mlp:
        return per_h * h + 4.0 * inter
    return per_h * h + (GATED_MLP_BYTES_PER_I - (LIGER_SAVED_BYTES_PER_I if liger else 0.0)) * inter


def logits_bytes(shape: ModelShape, tokens: int, loss_chunk_tokens: int) -> float:
    """The loss's memory for one micro batch of `tokens`: the plain path's 12 bytes per logit, or the
    chunked loss's one chunk of fp32 logits (reused for their gradient) and its 16-bit gradient, and
    the 16-bit gradients of the head and of the hidden states."""
    if not loss_chunk_tokens:
        return LOGIT_BYTES * tokens * shape.vocab_size
    chunk = min(loss_chunk_tokens, tokens)
    return (
        6.0 * chunk * shape.vocab_size
        + 2.0 * shape.vocab_size * shape.hidden_size
        + 2.0 * tokens * shape.hidden_size
    )


def loss_chunk_size(shape: ModelShape) -> int:
    """Tokens per chunk of the chunked loss: about LOSS_CHUNK_BYTES of fp32 logits, a power of two in
    [256, 8192] (4096 for a 32k vocabulary, 1024 for 128k): few chunks, each a large matrix product."""
    tokens = LOSS_CHUNK_BYTES / (4.0 * shape.vocab_size)
    return int(min(8192, max(256, 2 ** math.floor(math.log2(max(tokens, 1.0))))))


@dataclass(frozen=True)
class Setting:
    """One way to run a micro-step: what plan weighs against the GPU's memory."""

    micro_batch: int
    recompute: bool
    loss_chunk_tokens: int = 0  # 0: plain logits
    offload_optimizer: bool = False
    offload_params: bool = False
    hpz_partition_size: int = 1  # ZeRO++ hpZ's partition of a second parameter copy; 1: none


def hpz_partition_sizes(cfg: RunConfig) -> list[int]:
    """The ZeRO++ hpZ partition sizes plan tries, fastest first. Across nodes, ZeRO-3 moves each
    micro-step's parameters twice (gathered for the forward and again for the backward) and its
    gradients once over the network; a copy of the parameters partitioned within each node keeps the
    backward's gather on the node's own links, a third less traffic between nodes (docs/benchmarks.md,
    "On paper"). One node has no network to save, a node of one GPU no one to share the copy with,
    and parameters offloaded to CPU would be brought back to the GPU by it."""
    res, tr = cfg.resources, cfg.training
    per_node = res.nproc_per_node
    if tr.hierarchical_partitioning:
        return [per_node]
    if tr.hierarchical_partitioning is False or tr.offload_param or res.accelerator == "cpu":
        return [1]
    if res.num_nodes == 1 or per_node == 1:
        return [1]
    return [per_node, 1]


def hpz_copy_bytes(shape: ModelShape, partition_size: int) -> float:
    """Bytes per GPU of hpZ's 16-bit copy of the parameters partitioned over `partition_size` GPUs
    (1: no copy)."""
    return 2.0 * shape.params / partition_size if partition_size > 1 else 0.0


def candidate_settings(
    b0: int, accumulation: int, gc0: bool, chunk: int, forced_chunk: int | None
) -> list[Setting]:
    """Settings fastest first, the global batch kept: larger micro batches in place of accumulation
    (fewer micro-steps: ZeRO-3 gathers every layer once per micro-step, and a larger matrix product
    runs nearer the device's peak), the configured micro batch, then the memory savers in order of
    what they cost: the chunked loss, recomputation, about halving the micro batch
    (`smaller_micro_batch`), optimizer offload, parameter offload. A forced training.loss_chunk_tokens is used throughout."""
    losses = [forced_chunk] if forced_chunk is not None else [0, chunk]
    per_rank = b0 * accumulation  # sequences a rank takes per optimizer step: every setting keeps it
    larger, b = [], b0
    while accumulation % 2 == 0:
        b, accumulation = b * 2, accumulation // 2
        larger.insert(0, b)
    out = [Setting(b, gc0, losses[0]) for b in larger]
    out += [Setting(b0, gc0, c) for c in losses]
    b = b0
    while True:
        out += [Setting(b, True, c) for c in losses]
        if b == 1:
            break
        b = smaller_micro_batch(b, per_rank)
    last = losses[-1]
    return out + [Setting(1, True, last, True, False), Setting(1, True, last, True, True)]


def smaller_micro_batch(b: int, per_rank: int) -> int:
    """The micro batch to try after `b`: the largest divisor of `per_rank` up to half of `b`, so that a
    whole number of micro-steps makes the rank's share of the global batch (halving 5 to 2 would make
    4 or 6 of 5)."""
    return next(d for d in range(b // 2, 0, -1) if per_rank % d == 0)


def choose_memory_settings(cfg: RunConfig, shape: ModelShape) -> tuple[MemoryEstimate, float, list[str]]:
    """The fastest setting (`candidate_settings`) that fits the GPU; or PlanError."""
    res, tr = cfg.resources, cfg.training
    budget = res.gpu_memory_gib * GiB * res.memory_headroom
    forced_opt, forced_par = tr.offload_optimizer, tr.offload_param

    forced_layers = configured_recompute_layers(cfg, shape)
    hpz_sizes = hpz_partition_sizes(cfg)
    fused = use_liger(cfg, shape)

    def est(s: Setting, layers: int | None = None, world_size: int | None = None) -> MemoryEstimate:
        # A forced offload setting (true or false) wins over whatever plan would try.
        return estimate_memory(
            shape,
            world_size=world_size or cfg.world_size,
            seq_len=cfg.preprocess.max_seq_len,
            micro_batch=s.micro_batch,
            gradient_checkpointing=s.recompute,
            offload_optimizer=s.offload_optimizer if forced_opt is None else forced_opt,
            offload_params=s.offload_params if forced_par is None else forced_par,
            optim=tr.optim,
            loss_chunk_tokens=s.loss_chunk_tokens,
            recompute_layers=layers or forced_layers,
            hpz_partition_size=s.hpz_partition_size,
            liger=fused,
        )

    def fewest_layers(s: Setting) -> MemoryEstimate:
        """Recompute only as many layers as the GPU needs (each costs about a third of its forward
        again), unless the config says how many."""
        if not s.recompute or forced_layers:
            return est(s)
        for layers in range(1, shape.num_layers + 1):
            if (estimate := est(s, layers)).total <= budget:
                return estimate
        return estimate

    b0, gc0 = tr.per_device_train_batch_size, forced_layers is not None
    configured = Setting(b0, gc0, tr.loss_chunk_tokens or 0, hpz_partition_size=hpz_sizes[-1])
    first = est(configured)
    forced = [
        f"training.{name} forced to {value}"
        for name, value in (("offload_optimizer", forced_opt), ("offload_param", forced_par))
        if value is not None
    ]
    if res.accelerator == "cpu":
        return first, budget, ["accelerator is cpu: the GPU memory check does not apply", *forced]
    candidates = [  # each setting with hpZ's copy first (never beside offloaded parameters)
        replace(s, hpz_partition_size=size)
        for s in candidate_settings(
            b0, tr.gradient_accumulation_steps, gc0, loss_chunk_size(shape), tr.loss_chunk_tokens
        )
        for size in hpz_sizes
        if size == 1 or not s.offload_params
    ]
    for candidate in candidates:
        estimate = fewest_layers(candidate)
        if estimate.total <= budget:
            notes = [f"as configured it needs {_gib(first.total)} per GPU"]
            notes += _setting_notes(
                estimate, configured, tr.gradient_accumulation_steps, shape, forced_opt, forced_par
            )
            notes += _hpz_notes(estimate, hpz_sizes, shape)
            notes += [*forced, f"fits: {_gib(estimate.total)} of {_gib(budget)} per GPU"]
            return estimate, budget, notes
    smallest = Setting(1, True, candidates[-1].loss_chunk_tokens)
    need_world = fewest_gpus(lambda world: est(smallest, world_size=world).total <= budget, cfg.world_size)
    raise _does_not_fit(cfg, shape, budget, first, need_world=need_world, offloaded=est(candidates[-1]))


def fewest_gpus(fits: Callable[[int], bool], world: int, most: int = 1 << 16) -> int | None:
    """The fewest GPUs, more than `world`, on which `fits` holds (the model states shrink as GPUs are
    added, the rest does not); None when not even `most` would do."""
    low, high = world, world * 2
    while not fits(high):
        if high >= most:
            return None
        low, high = high, high * 2
    while high - low > 1:  # fits(high), not fits(low)
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def use_liger(cfg: RunConfig, shape: ModelShape) -> bool:
    """Liger's fused kernels: as configured; unset, on for GPU runs of the model types plan knows them
    for (measured on a 1B Llama on an H200: 292 and 310 against 352 ms a step, docs/benchmarks.md)."""
    if cfg.training.use_liger_kernel is not None:
        return cfg.training.use_liger_kernel
    return cfg.resources.accelerator == "gpu" and shape.model_type in liger.PLAN_MODEL_TYPES


def liger_notes(cfg: RunConfig, shape: ModelShape, on: bool) -> list[str]:
    """Why plan turned Liger's kernels on (`on`, from `use_liger`) or left them off; nothing where the
    config decided."""
    if cfg.training.use_liger_kernel is not None or cfg.resources.accelerator != "gpu":
        return []
    if on:
        return [
            f"Liger's fused kernels on ({shape.model_type}: RMSNorm, SwiGLU and rotary embeddings as one "
            "kernel each): faster steps and fewer activations kept"
        ]
    return [
        f"Liger's fused kernels left off: plan turns them on for {', '.join(sorted(liger.PLAN_MODEL_TYPES))}, "
        f"not {shape.model_type}; training.use_liger_kernel true tries them on it if liger-kernel has "
        "kernels for it (train refuses the setting otherwise, naming the types it has them for)"
    ]


def configured_recompute_layers(cfg: RunConfig, shape: ModelShape) -> int | None:
    """The layers the config asks to recompute: training.gradient_checkpointing_layers, all of them
    with gradient_checkpointing alone, or None (plan decides)."""
    tr = cfg.training
    layers = tr.gradient_checkpointing_layers
    if layers is not None and layers > shape.num_layers:
        raise PlanError(
            f"training.gradient_checkpointing_layers is {layers} but the model has {shape.num_layers} "
            "decoder layers"
        )
    return layers or (shape.num_layers if tr.gradient_checkpointing else None)


def _setting_notes(
    e: MemoryEstimate,
    configured: Setting,
    accumulation: int,
    shape: ModelShape,
    forced_opt: bool | None,
    forced_par: bool | None,
) -> list[str]:
    """`accumulation`: the configured gradient_accumulation_steps."""
    b0 = configured.micro_batch
    notes = []
    if e.micro_batch > b0:
        notes.append(
            f"micro batch {b0} -> {e.micro_batch} with gradient accumulation /{e.micro_batch // b0}, the "
            "same global batch: fewer, larger micro-steps run faster"
        )
    if e.loss_chunk_tokens and not configured.loss_chunk_tokens:
        notes.append(f"loss computed {e.loss_chunk_tokens} tokens at a time (the full logits do not fit)")
    if e.gradient_checkpointing and not configured.recompute:
        notes.append(
            f"enabled gradient_checkpointing on {e.recompute_layers} of {shape.num_layers} layers: "
            + (
                "each recomputed layer runs its forward again, so only as many as the GPU needs"
                if e.recompute_layers < shape.num_layers
                else "the activations fit only with every layer recomputed"
            )
        )
    if e.micro_batch < b0:
        per_rank = b0 * accumulation
        notes.append(
            f"micro batch {b0} -> {e.micro_batch}, gradient accumulation {accumulation} -> "
            f"{per_rank // e.micro_batch} keeps the global batch"
        )
    if e.offload_optimizer and forced_opt is None:
        notes.append("offloads optimizer states to CPU (slower steps)")
    if e.offload_params and forced_par is None:
        notes.append("offloads parameters to CPU (much slower steps)")
    return notes


def _hpz_notes(e: MemoryEstimate, tried: list[int], shape: ModelShape) -> list[str]:
    if e.hpz_partition_size > 1:
        return [
            f"ZeRO++ hierarchical partitioning over each node's {e.hpz_partition_size} GPUs: the backward "
            "gathers the parameters inside the node, a third less traffic between nodes per micro-step, "
            f"for {_gib(e.secondary_params)} per GPU"
        ]
    if max(tried) > 1:
        return [
            f"ZeRO++ hierarchical partitioning off: its copy of the parameters ({_gib(hpz_copy_bytes(shape, max(tried)))} "
            "per GPU) does not fit beside the chosen setting"
        ]
    return []


def _does_not_fit(
    cfg: RunConfig,
    shape: ModelShape,
    budget: float,
    first: MemoryEstimate,
    *,
    need_world: int | None,
    offloaded: MemoryEstimate,
) -> PlanError:
    """The refusal, saying how many GPUs (`need_world`, from `fewest_gpus`) would fit the model
    without offload."""
    res = cfg.resources
    hint = (
        f"ZeRO-3 without offload would fit on about {need_world} GPUs of {res.gpu_memory_gib:g} GiB"
        if need_world
        else f"even one layer's activations and buffers exceed {_gib(budget)}: use GPUs with more memory or a shorter max_seq_len"
    )
    return PlanError(
        f"model with {shape.params / 1e9:.2f}B parameters does not fit on {cfg.world_size} GPU(s) of "
        f"{res.gpu_memory_gib:g} GiB at max_seq_len {cfg.preprocess.max_seq_len}: needs {_gib(first.total)} "
        f"per GPU as configured and {_gib(offloaded.total)} with micro batch 1, recomputation and "
        f"{_offload_tried(cfg, offloaded)}. {hint}."
    )


def _offload_tried(cfg: RunConfig, offloaded: MemoryEstimate) -> str:
    """The offload of the last setting plan tried, in words: not 'full' where the parameters stayed on
    the GPU because training.hierarchical_partitioning keeps a copy of them there."""
    tr = cfg.training
    if tr.offload_optimizer is not None or tr.offload_param is not None:
        return "the forced offload settings"
    if offloaded.offload_params:
        return "full CPU offload"
    return (
        "the optimizer offloaded to CPU; the parameters were not, as training.hierarchical_partitioning "
        "keeps a copy of them on the GPUs: unset it to let plan offload them too"
    )


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


# -- hyper-parameter rules ------------------------------------------------------------------------


def default_learning_rate(params: int) -> float:
    lr = 1e-5 * math.sqrt(7e9 / max(params, 1))
    return float(f"{min(max(lr, 5e-6), 1e-3):.3g}")


def default_epochs(train_tokens: int) -> float:
    if train_tokens < 5_000_000:
        return 3.0
    if train_tokens < 50_000_000:
        return 2.0
    return 1.0


def estimate_train_tokens(cfg: RunConfig, sample_records: int = 256) -> int:
    """Training tokens ~ records in the data files x mean tokens of a record measured on a sample."""
    return estimate_datasets(cfg, sample_records)[0].tokens


def estimate_datasets(cfg: RunConfig, sample_records: int = 256) -> tuple[DataEstimate, DataEstimate | None]:
    """The training data's estimate, and the general set's when data.general_uri is set."""
    from fulltune.hf import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer_uri, cfg.model.trust_remote_code)
    train = estimate_data(cfg.data.train_uri, cfg.data, tok, sample_records)
    general_uri = cfg.data.general_uri
    general = (
        estimate_data(general_uri, cfg.data.reading("general"), tok, sample_records) if general_uri else None
    )
    return train, general


@dataclass(frozen=True)
class DataEstimate:
    """A dataset's size as plan estimates it before any of it is read in full."""

    records: int
    tokens: int  # of the records' text, without chat templates or special tokens
    kind: str | None = None  # the record kind of the sample; None: no usable record in it


def estimate_data(uri: str, data: DataSection, tok, sample_records: int = 256) -> DataEstimate:
    """Records counted the cheap way for each file's format (`data.extent`: compressed and columnar
    files by what they decode to, not by their size on disk) x the mean tokens of the first
    `sample_records` usable records."""
    from fulltune.data.extent import estimate_dataset
    from fulltune.data.records import data_file_sizes, iter_records

    records = estimate_dataset(data_file_sizes(uri))
    sample = list(itertools.islice(iter_records(uri, data), sample_records))
    if not sample:
        return DataEstimate(int(records), 0)
    ids = tok([r.plain_text() for r in sample], add_special_tokens=False)["input_ids"]
    mean_tokens = sum(len(i) for i in ids) / len(sample)
    return DataEstimate(int(round(records)), int(round(records * mean_tokens)), sample[0].kind)


# -- DeepSpeed --------------------------------------------------------------------------------------


def deepspeed_config(cfg: RunConfig, shape: ModelShape) -> dict[str, Any]:
    """The DeepSpeed JSON, derived from the resolved config alone (and the model's shape: `zero3_settings`).

    Precision, batch sizes and offload come from the config's one source for each: `cfg.precision`,
    `cfg.training.global_batch_size`, and the offload settings plan wrote into the resolved config.
    """
    tr = cfg.training
    gpu = cfg.resources.accelerator == "gpu"
    precision = cfg.precision
    z = zero3_settings(shape, gpu=gpu)
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": z.reduce_bucket_size,
        "stage3_prefetch_bucket_size": z.prefetch_bucket_size,
        "stage3_param_persistence_threshold": z.persistence_threshold,
        "stage3_max_live_parameters": z.max_live_parameters,
        "stage3_max_reuse_distance": z.max_live_parameters,
        "stage3_module_granularity_threshold": z.leaf_threshold,
        "zero_hpz_partition_size": cfg.resources.nproc_per_node if tr.hierarchical_partitioning else 1,
        "stage3_gather_16bit_weights_on_model_save": True,
        "sub_group_size": SUB_GROUP_SIZE,  # the optimizer-step transient in the estimate depends on it
    }
    if tr.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if tr.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    return {
        "train_micro_batch_size_per_gpu": tr.per_device_train_batch_size,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "train_batch_size": cfg.global_batch_size,
        "gradient_clipping": tr.max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        # Dynamic loss scaling (loss_scale 0): start at 2**16, halve on overflow (the step is skipped),
        # double after 1000 clean steps.
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def check_training(cfg: RunConfig) -> None:
    """Combinations of fields that cannot work, refused before any GPU is spent. The config's
    validators refuse them when it is read (`RunConfig.contradictions`); asked again here of the
    config plan and train are given."""
    if problems := cfg.contradictions():
        raise ConfigError("; ".join(problems))


# train refuses a training split of fewer sequences than one global batch (train.schedule), after
# preprocessing. plan refuses it before, but from an estimate (records counted from a prefix or a
# footer, tokens from the mean of the first records): it could be low by tens of percent on data
# whose first records are short, and refusing a run that would train is worse than letting train
# say it. So plan refuses only below this share of a batch, and warns between it and one batch.
REFUSE_BELOW_BATCH_SHARE = 0.5


def check_one_batch(cfg: RunConfig, data: DataEstimate) -> list[str]:
    """PlanError when the data clearly makes less than one global batch; a warning when it may."""
    sequences = estimated_sequences(cfg, data)
    batch = cfg.global_batch_size
    if sequences is None or sequences >= batch:
        return []
    tr = cfg.training
    what = (
        f"data.train_uri {cfg.data.train_uri} makes ~{sequences:,.0f} training sequences of "
        f"preprocess.max_seq_len {cfg.preprocess.max_seq_len} (an estimate: ~{data.tokens:,} tokens"
        f"{f' in ~{data.records:,} records' if data.records else ''}), "
    )
    batch_fields = (
        f"one global batch of {batch} sequences (training.per_device_train_batch_size "
        f"{tr.per_device_train_batch_size} x gradient_accumulation_steps {tr.gradient_accumulation_steps} x "
        f"{cfg.world_size} GPUs: resources.num_nodes x nproc_per_node)"
    )
    if sequences < REFUSE_BELOW_BATCH_SHARE * batch:
        raise PlanError(
            f"{what}less than half of {batch_fields}; train would refuse it after preprocessing: lower "
            "the batch or add data"
        )
    return [f"warning: {what}fewer than {batch_fields}: if so, train refuses it after preprocessing"]


def estimated_sequences(cfg: RunConfig, data: DataEstimate, replay: float | None = None) -> float | None:
    """The training sequences the data makes, estimated from above; None where plan cannot bound
    them. Packed text is a stream of tokens (each document's text, its BOS and EOS, and the replay
    mixed in); anything else makes at most one sequence per record, plus the windows of a text
    document longer than max_seq_len, and an unknown number of replayed documents beside them."""
    pp = cfg.preprocess
    replay = training_replay(cfg) if replay is None else replay
    if data.kind in (None, "text") and pp.packing:
        return epoch_sequences(cfg, data, replay)
    if replay:
        return None
    return data.records + data.tokens / pp.max_seq_len


def epoch_sequences(cfg: RunConfig, data: DataEstimate, replay: float | None = None) -> float:
    """The training sequences one epoch holds, as train counts its steps by them; each is max_seq_len
    long, padded where its documents do not fill it. Packed, the data's tokens over max_seq_len (each
    text document with its BOS and EOS; whole examples best-fit into nearly full sequences); with
    packing off, one for each record (and a window for each max_seq_len of a longer text document)
    however short the record: 500-token chat examples at max_seq_len 4096 take 8x their tokens.
    Replay (`replay`: its share; None: the training split's) adds its share of the sequences."""
    pp = cfg.preprocess
    replay = training_replay(cfg) if replay is None else replay
    text = data.kind in (None, "text")
    if pp.packing:
        sequences = (data.tokens + (2 * data.records if text else 0)) / pp.max_seq_len
    else:
        sequences = data.records + (data.tokens / pp.max_seq_len if text else 0.0)
    return sequences / (1.0 - replay)


def training_replay(cfg: RunConfig) -> float:
    """Replay's share of the training split: the configured one, where there is a general set."""
    return cfg.preprocess.replay_fraction if cfg.data.general_uri else 0.0


def epoch_tokens(cfg: RunConfig, data: DataEstimate) -> int:
    """The token positions one epoch of training computes (`epoch_sequences` x max_seq_len): what its
    steps and GPU-hours are sized by."""
    return round(epoch_sequences(cfg, data) * cfg.preprocess.max_seq_len)


def general_notes(cfg: RunConfig, train: DataEstimate, general: DataEstimate | None) -> list[str]:
    """Warnings on what the general set can measure and replay: none at all without data.general_uri
    (the README's forgetting gate is then off), too few general_eval sequences for its intervals,
    a replay pool repeated many times an epoch. `general` None with a general_uri: not estimated."""
    pp = cfg.preprocess
    if not cfg.data.general_uri:
        return [
            "warning: data.general_uri is not set: forgetting will not be measured (the gate judges the "
            f"domain gain alone) and there is no replay (preprocess.replay_fraction {pp.replay_fraction:g} "
            "has nothing to draw from)"
        ]
    if general is None:
        return []
    share = pp.general_eval_fraction
    held = DataEstimate(round(general.records * share), round(general.tokens * share), general.kind)
    notes = []
    sequences = estimated_sequences(cfg, held, replay=0.0)
    if sequences is not None and sequences < MIN_GENERAL_EVAL_SEQUENCES:
        notes.append(
            f"warning: the general eval set (preprocess.general_eval_fraction {share:g} of data.general_uri, "
            f"~{general.records:,} records) makes ~{sequences:,.0f} sequences, fewer than "
            f"{MIN_GENERAL_EVAL_SEQUENCES}: the forgetting figures and their confidence interval would be "
            "noise; add general data"
        )
    return notes + replay_notes(cfg, train, general)


def eval_cap_notes(cfg: RunConfig) -> list[str]:
    """A cap on the eval sequences below what the gate's figures need: preprocess warns of a small
    eval split, but evaluate reads at most `max_eval_sequences` of any split, however large."""
    cap = cfg.evaluation.max_eval_sequences
    if cap >= MIN_GENERAL_EVAL_SEQUENCES:
        return []
    return [
        f"warning: evaluation.max_eval_sequences {cap} is fewer than {MIN_GENERAL_EVAL_SEQUENCES}: the "
        f"domain gain, forgetting, the champion comparison and their confidence intervals would rest on at "
        f"most {cap} sequence(s) per set (and question(s) per multiple-choice task), whatever the data holds; "
        "raise it"
    ]


def replay_notes(cfg: RunConfig, train: DataEstimate, general: DataEstimate) -> list[str]:
    pp = cfg.preprocess
    r = pp.replay_fraction
    pool = general.tokens * (1.0 - pp.general_eval_fraction)
    replayed = train.tokens * r / (1.0 - r)
    if r <= 0 or replayed <= MAX_REPLAY_REPEATS * pool:
        return []
    return [
        f"warning: replay draws ~{replayed:,.0f} tokens an epoch (preprocess.replay_fraction {r:g}) from a pool "
        f"of ~{pool:,.0f} (data.general_uri less its general_eval share): each general document is replayed "
        f"~{replayed / max(pool, 1):,.0f} times an epoch, which teaches the pool rather than keeping general "
        "ability; add general data or lower replay_fraction"
    ]


def check_registry(cfg: RunConfig) -> None:
    """An s3:// registry whose bucket is missing or refuses the run's credentials (the register step
    reads S3 with the same Secret) would fail at the last step, after the training; refused here."""
    from fulltune.storage import StorageConfigError

    if not storage.is_s3(cfg.registry.uri):
        return
    try:
        storage.require_bucket(cfg.registry.uri)
    except StorageConfigError as exc:
        raise PlanError(f"registry.uri {exc}") from None


def check_local_locations(cfg: RunConfig) -> None:
    """A local work_dir or registry.uri that cannot be made would fail at the step that first writes
    there: plan itself for work_dir, register (after the whole training) for the registry, each with
    an OSError naming neither field. Refused here: the nearest existing directory above each must be
    one this process may create entries in."""
    for name, uri in (("work_dir", cfg.work_dir), ("registry.uri", cfg.registry.uri)):
        if uri and not storage.is_s3(uri) and (problem := unwritable(uri)):
            raise PlanError(f"{name} {uri}: {problem}")


def unwritable(path: str) -> str | None:
    """Why nothing can be written at the local `path` (made with its parents as needed), or None."""
    target = Path(path).absolute()
    for place in (target, *target.parents):
        if not place.exists():
            continue
        if not place.is_dir():
            return f"{place} is a file, not a directory: nothing can be made under it"
        if not os.access(place, os.W_OK | os.X_OK):
            return f"{place} is a directory this user ({_user()}) may not write in"
        return None
    return None


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a name (a container's arbitrary user)
        return f"uid {os.getuid()}"


def attention_summary(cfg: RunConfig) -> str:
    """The attention kernel, and what a document in a packed sequence attends to."""
    kernel = cfg.training.attn_implementation
    if not cfg.preprocess.packing:
        return kernel
    if cfg.preprocess.attend_across_documents:
        return (
            f"{kernel}; a packed document attends to the ones before it (preprocess.attend_across_documents)"
        )
    how = "variable-length" if kernel == "flash_attention_2" else "a block-diagonal mask"
    return f"{kernel}; each packed document attends only to itself ({how})"


def check_resumed(cfg: RunConfig) -> None:
    """A run resumed with settings its checkpoints were not trained with is refused by train, naming
    each field; refused here already, before preprocessing would make (and write over) its data."""
    from fulltune.train.checkpoint import CheckpointError, check_config_continues

    if not cfg.work_dir:
        return
    try:
        check_config_continues(cfg.layout.checkpoints, cfg)
    except CheckpointError as exc:
        raise PlanError(str(exc)) from None


def check_champion(cfg: RunConfig) -> None:
    """With `evaluation.compare_to: registered` the candidate is scored beside the version in
    production on this run's token ids; one with another tokenizer cannot be, and its check would
    fail after the training: refused here (`evaluate.champion`)."""
    from fulltune.evaluate.champion import resolve

    champion = resolve(cfg) if cfg.registry.uri else None
    if champion is not None and champion.refused:
        raise PlanError(f"evaluation.compare_to: registered: {champion.refused}")


# -- the step ----------------------------------------------------------------------------------------


def make_plan(cfg: RunConfig, *, train_tokens: int | None = None) -> Plan:
    """Size the run and resolve its config: every field plan decides is set in `Plan.config`."""
    cfg.require("model.base_model_uri", "data.train_uri")
    check_training(cfg)
    check_registry(cfg)
    check_local_locations(cfg)
    check_resumed(cfg)
    check_champion(cfg)
    shape = model_shape(load_model_config(cfg))
    mem, budget, notes = choose_memory_settings(cfg, shape)
    data, general = estimate_datasets(cfg) if train_tokens is None else (DataEstimate(0, train_tokens), None)
    tokens, per_epoch = data.tokens, epoch_tokens(cfg, data)
    batch_notes = check_one_batch(cfg, data) + general_notes(cfg, data, general) + eval_cap_notes(cfg)
    over, rule_notes = resolved_fields(cfg, shape, mem, tokens)
    resolved = cfg.with_overrides(over)
    cost = estimate_cost(
        resolved,
        matmul_params=shape.matmul_params or shape.params,
        num_layers=shape.num_layers,
        attention_width=shape.attention_width or shape.hidden_size,
        dataset_tokens=per_epoch,
    )
    try:
        check_budget(resolved, cost)
    except CostError as exc:
        raise PlanError(str(exc)) from None
    if chosen := default_checkpoints(resolved):
        resolved = resolved.with_overrides(chosen)
        if chosen.get("training.save_every_minutes"):  # the user chose nothing: say what plan did
            rule_notes.append(_checkpoint_note(resolved, cost, shape.params))
    if resolved.resources.launcher != "local" and resolved.resources.kubernetes.ephemeral_storage is None:
        request, why = scratch_request(resolved, shape.params)
        resolved = resolved.with_overrides({"resources.kubernetes.ephemeral_storage": request})
        rule_notes.append(why)
    disk = estimate_disk(resolved, shape.params)
    if problems := disk.problems():
        raise PlanError("not enough disk: " + "; ".join(problems))
    rule_notes += evaluation_notes(resolved, shape)
    for note in notes + batch_notes + rule_notes:
        if note.startswith("warning: "):  # the plan step's log (`fulltune check` prints the decisions)
            log.warning("plan: %s", note.removeprefix("warning: "))
    return Plan(
        shape,
        mem,
        budget,
        cfg.world_size,
        tokens,
        notes + batch_notes + rule_notes,
        resolved,
        deepspeed_config(resolved, shape),
        cost,
        disk,
        per_epoch,
    )


# How much training a failure may cost at most when plan chooses the checkpoints: each holds the
# whole optimizer state (12 bytes a parameter with AdamW, disk.py: ~90 GiB for 8B, minutes to
# write), so saving much more often costs a noticeable share of the run; much less, and a lost node
# costs hours of every GPU in the job. By the clock rather than by steps: the run's speed is an
# estimate until it runs.
CHECKPOINT_EVERY_MINUTES = 60.0


# The evaluate step loads each model in bfloat16 on a GPU (evaluate.core.placement).
EVAL_BYTES_PER_PARAM = 2


def evaluation_notes(cfg: RunConfig, shape: ModelShape) -> list[str]:
    """What the evaluate step needs to hold the model, as a note; PlanError when its placement cannot:
    with `evaluation.device_map: single` each model goes whole onto one GPU, and a model larger than
    one GPU would fail there after the whole training (what the GPUs of a 70B run cost for days)."""
    res, ev = cfg.resources, cfg.evaluation
    if res.accelerator != "gpu":
        return []
    weights = shape.params * EVAL_BYTES_PER_PARAM
    usable = res.gpu_memory_gib * GiB * res.memory_headroom
    gpus = math.ceil(weights / usable)
    if ev.device_map == "single" and gpus > 1:
        raise PlanError(
            f"evaluation cannot hold the model: its {_gib(weights)} of bfloat16 weights go whole onto one GPU "
            f"(evaluation.device_map: single), and a GPU has {_gib(usable)} usable (resources.gpu_memory_gib "
            f"{res.gpu_memory_gib:g} x memory_headroom {res.memory_headroom:g}): set evaluation.device_map: "
            f"auto and give the evaluate step {gpus} or more GPUs (fulltune compile --eval-gpus {gpus})"
        )
    if ev.device_map == "auto":
        return [
            f"evaluation.device_map auto: each model's {_gib(weights)} of bfloat16 weights spread over the "
            f"evaluate step's GPUs, at least {gpus} of {res.gpu_memory_gib:g} GiB (fulltune compile --eval-gpus)"
        ]
    return []


def default_checkpoints(cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint fields `cfg` leaves unset (save_steps, save_every_minutes), as plan resolves
    them: with neither set, one checkpoint after every CHECKPOINT_EVERY_MINUTES of training (on an
    evaluation step when eval_steps is set: the forgetting rollback resumes from those); an unset one
    beside one the user set is 0."""
    tr = cfg.training
    chosen: dict[str, Any] = {}
    if tr.save_steps is None:
        chosen["training.save_steps"] = 0
    if tr.save_every_minutes is None:
        chosen["training.save_every_minutes"] = CHECKPOINT_EVERY_MINUTES if tr.save_steps is None else 0.0
    return chosen


def scratch_request(cfg: RunConfig, params: int) -> tuple[str, str]:
    """The ephemeral storage plan requests for each cluster training pod, and why
    (`disk.pod_scratch_request` over `cfg` with the checkpoints plan chooses when it leaves them
    unset): what the doctor counts before any plan has run."""
    return pod_scratch_request(cfg.with_overrides(default_checkpoints(cfg)), params)


def _checkpoint_note(cfg: RunConfig, cost: CostEstimate | None, params: int) -> str:
    """The plan's note on the checkpoints it chose by the clock (`cfg` resolved)."""
    tr = cfg.training
    minutes = tr.save_every_minutes
    estimated = ""
    if cost is not None:
        estimated = (
            f"; ~{cost.wall_hours:.1f} h estimated: about {int(cost.wall_hours * 60 // minutes)} of them"
        )
    return (
        f"save_every_minutes {minutes:g} chosen (save_steps unset): a checkpoint after every {minutes:g} min "
        f"of training, so a failure loses at most that; {_gib(checkpoint_bytes(cfg, params))} each, the newest "
        f"{tr.save_total_limit} kept{estimated}"
    )


def resolved_fields(
    cfg: RunConfig, shape: ModelShape, mem: MemoryEstimate, tokens: int
) -> tuple[dict[str, Any], list[str]]:
    """The fields plan decides (dotted names), and a note for each rule-chosen hyper-parameter."""
    tr = cfg.training
    over: dict[str, Any] = {
        "training.per_device_train_batch_size": mem.micro_batch,
        "training.gradient_checkpointing": mem.gradient_checkpointing,
        "training.gradient_checkpointing_layers": mem.recompute_layers or None,
        "training.offload_optimizer": mem.offload_optimizer,
        "training.offload_param": mem.offload_params,
        "training.loss_chunk_tokens": mem.loss_chunk_tokens,
        "training.hierarchical_partitioning": mem.hpz_partition_size > 1,
        "training.use_liger_kernel": mem.liger,
    }
    notes = list(zero3_settings(shape, gpu=cfg.resources.accelerator == "gpu").reasons)
    notes += alignment_notes(shape) + liger_notes(cfg, shape, mem.liger)
    if mem.micro_batch != tr.per_device_train_batch_size:  # the global batch stays as configured
        per_rank = tr.per_device_train_batch_size * tr.gradient_accumulation_steps
        over["training.gradient_accumulation_steps"] = per_rank // mem.micro_batch
    if tr.learning_rate is None:
        over["training.learning_rate"] = default_learning_rate(shape.params)
        notes.append(
            f"learning_rate {over['training.learning_rate']:g} chosen for {shape.params / 1e6:.1f}M parameters"
        )
    if tr.num_train_epochs is None:
        over["training.num_train_epochs"] = default_epochs(tokens)
        if tr.max_steps <= 0:  # with max_steps the epochs are resolved but do not set the length
            notes.append(
                f"num_train_epochs {over['training.num_train_epochs']:g} chosen for ~{tokens:,} training tokens"
            )
    return over, notes


def alignment_notes(shape: ModelShape) -> list[str]:
    """A warning for each matrix dimension that is not a multiple of 8: 16-bit rows then miss the
    16-byte alignment the Hopper/Ampere GEMM kernels need, and cuBLAS falls back to older, slower ones
    (measured on an H200: an MLP width of 5461 put 63% of a 0.9B model's GPU time in such kernels)."""
    dims = {
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "vocab_size": shape.vocab_size,
    }
    return [
        f"warning: the model's {name} {value} is not a multiple of 8: its matrix products run on slower "
        "GPU kernels"
        for name, value in dims.items()
        if value and value % 8
    ]


def plan_markdown(plan: Plan) -> str:
    m, s, tr = plan.memory, plan.shape, plan.config.training
    rows = [
        (
            "model",
            f"{s.model_type}, {s.params:,} parameters ({s.num_layers} layers, hidden {s.hidden_size}, vocab {s.vocab_size})",
        ),
        ("world size", str(plan.world_size)),
        ("launcher", launcher_summary(plan.config)),
        *(
            (label, _gib(getattr(m, part)))
            for part, label in MEMORY_LABELS.items()
            if part != "secondary_params" or m.secondary_params
        ),
        ("**total / GPU**", f"**{_gib(m.total)}** (budget {_gib(plan.budget_bytes)})"),
        (
            "micro batch x accumulation",
            f"{tr.per_device_train_batch_size} x {tr.gradient_accumulation_steps}",
        ),
        ("gradient checkpointing", recompute_summary(plan.memory, s)),
        ("attention", attention_summary(plan.config)),
        (
            "loss",
            f"chunked, {tr.loss_chunk_tokens} tokens at a time" if tr.loss_chunk_tokens else "plain logits",
        ),
        ("Liger kernels", str(tr.use_liger_kernel)),
        ("torch.compile", str(tr.torch_compile)),
        ("optimizer", tr.optim),
        ("precision", plan.config.precision),
        ("CPU offload", f"optimizer={m.offload_optimizer}, params={m.offload_params}"),
        ("learning rate", f"{tr.learning_rate:g} ({tr.lr_scheduler_type}, warmup {tr.warmup_ratio:g})"),
        ("length", plan.length_summary()),
        ("checkpoints", checkpoint_summary(plan.config)),
        ("disk", plan.disk.summary() if plan.disk else "not estimated"),
        ("dataset tokens (estimate)", dataset_summary(plan)),
        (
            "cost (estimate)",
            plan.cost.summary()
            if plan.cost
            else "not estimated (no GPU, or a GPU type without a known peak)",
        ),
    ]
    lines = ["# Training plan", "", markdown_table(["item", "value"], rows)]
    lines += ["", "## Decisions", ""] + [f"- {d}" for d in plan.decisions]
    return "\n".join(lines) + "\n"


def dataset_summary(plan: Plan) -> str:
    """The data's tokens, and the sequences an epoch makes of them (what the length and cost count)."""
    seq = plan.config.preprocess.max_seq_len
    sequences = (plan.epoch_tokens or plan.train_tokens_estimate) / seq
    return f"{plan.train_tokens_estimate:,}; an epoch ~{sequences:,.0f} sequences of {seq:,} tokens"


def checkpoint_summary(cfg: RunConfig) -> str:
    tr = cfg.training
    when = []
    if tr.save_steps:
        when.append(f"every {tr.save_steps:,} steps (training.save_steps)")
    if tr.save_every_minutes:
        on = ", on an evaluation step" if tr.eval_steps else ""
        when.append(
            f"after every {tr.save_every_minutes:g} min of training{on} (training.save_every_minutes)"
        )
    if not when:
        return "the final model only (training.save_steps and save_every_minutes 0): a failure starts again"
    return f"{' and '.join(when)}; the newest {tr.save_total_limit} kept"


def recompute_summary(m: MemoryEstimate, shape: ModelShape) -> str:
    if not m.recompute_layers:
        return "off"
    if m.recompute_layers >= shape.num_layers:
        return f"all {shape.num_layers} layers"
    return f"{m.recompute_layers} of {shape.num_layers} layers (selective)"


def launcher_summary(cfg: RunConfig) -> str:
    """Which launcher trains, what it creates on the cluster, and how to choose between the two."""
    from fulltune.launch.kubernetes import KINDS

    res = cfg.resources
    if res.launcher not in KINDS:
        return (
            f"{res.launcher}: torchrun in the train step's own pod (set kubernetes or trainjob for a cluster)"
        )
    kind = KINDS[res.launcher]
    runtime = f" on {res.trainjob.runtime_kind} {res.trainjob.runtime}" if res.launcher == "trainjob" else ""
    other, other_kind = next((name, k) for name, k in KINDS.items() if name != res.launcher)
    return (
        f"{res.launcher}: a {kind.kind} ({kind.group}/{kind.version}){runtime}; {other} would create a "
        f"{other_kind.kind} ({other_kind.group}/{other_kind.version}): `fulltune doctor` or "
        "`fulltune submit --check-cluster` says which API the cluster serves"
    )


def write_plan(plan: Plan) -> RunLayout:
    """plan.json, plan.md, the resolved config and the DeepSpeed JSON, in the resolved config's work
    directory (see `fulltune.layout`); returns that layout."""
    layout = plan.config.layout
    storage.write_json(layout.plan_json, plan.to_json())
    storage.write_text(layout.plan_markdown, plan_markdown(plan))
    storage.write_text(layout.resolved_config, plan.config.to_yaml())
    storage.write_bytes(layout.deepspeed_config, json.dumps(plan.deepspeed, indent=2).encode())
    return layout
