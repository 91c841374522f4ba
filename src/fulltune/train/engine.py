"""Setup of one rank: the process group, the model under ZeRO-3, the optimizer and the DeepSpeed engine.

- The model is loaded with ZeRO-3 active at load time (`HfDeepSpeedConfig` is alive before
  `from_pretrained`), so weights are partitioned, never materialised whole on each rank.
- Precision is `cfg.precision`: bf16, or fp16 with DeepSpeed's dynamic loss scaling, on GPU; on CPU
  both flags are ignored (the recipe logs it) and training is float32. The model is loaded in that
  dtype; the DeepSpeed JSON that plan wrote from the same config agrees.
- Activations: recomputed in the backward pass for all decoder layers or, with
  `training.gradient_checkpointing_layers`, for as many as plan found the GPU needs (`recompute`).
- Kernels: Liger's fused RMSNorm, MLP and rotary kernels with `training.use_liger_kernel` (`liger`);
  attention through `training.attn_implementation` (sdpa by default: FlashAttention-2 or
  memory-efficient kernels on GPU); with `training.loss_chunk_tokens` the model returns its summed
  loss computed from the hidden states in chunks (`chunked_loss`), never the full logits; with
  `training.torch_compile` DeepSpeed's `engine.compile()` compiles the model after initialisation.
- Optimizer: `training.optim` "adamw_torch" (no weight decay on 1-D parameters; torch's fused CUDA
  kernel on GPU, the single-tensor version on CPU) or "adafactor" (transformers' Adafactor at the
  fixed scheduled learning rate: relative_step, scale_parameter and warmup_init off, no first
  moment). Under ZeRO-3 the optimizer steps DeepSpeed's flat fp32 partitions, so Adafactor's second
  moment is not factored and its update clipping (RMS, threshold 1) is taken per partition rather
  than per tensor: results depend slightly on the world size.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fulltune import storage
from fulltune.config import RunConfig
from fulltune.train.exit_codes import TrainInputError
from fulltune.train.throughput import bf16_missing

log = logging.getLogger("fulltune.train")


@dataclass(frozen=True)
class Ranks:
    """Where this process sits: its global rank, the actual world size, its rank on the node, its device,
    and how many processes its node runs."""

    rank: int
    world: int
    local_rank: int
    device: Any  # torch.device
    local_world: int = 1


def import_deepspeed():
    """`import deepspeed`, the first time without MLflow: DeepSpeed's autotuner imports MLflow whenever
    it is installed, 1.5-2 s of every rank's start-up (measured with -X importtime) for a module
    training never uses through DeepSpeed. While `import mlflow` fails the autotuner goes without;
    fulltune's own tracker (tracking.py) imports MLflow normally afterwards when report_to asks."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
        try:
            import deepspeed  # noqa: F401
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


def init_distributed(cfg: RunConfig) -> Ranks:
    """Join the process group (gloo on CPU, NCCL on GPU) and pick this rank's device."""
    import torch

    deepspeed = import_deepspeed()

    cpu = cfg.resources.accelerator == "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by torchrun, as is LOCAL_WORLD_SIZE
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cpu:
        # DeepSpeed's CPU accelerator counts a node's "devices" from LOCAL_SIZE, which its own launcher
        # sets and torchrun does not; without it, it runs `numactl --hardware` in a subprocess on every
        # gradient bucket ZeRO-3 reduces (a fork of this process, ~0.5 ms each, many per step).
        os.environ.setdefault("LOCAL_SIZE", str(local_world))
        without_shared_memory_allreduce(deepspeed)
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world != cfg.world_size:
        log.warning("world size %d differs from the config's %d (nodes x processes)", world, cfg.world_size)
    if cpu:
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        capability = torch.cuda.get_device_capability(local_rank)
        if cfg.precision == "bf16" and (missing := bf16_missing(torch.cuda.get_device_name(), capability)):
            raise TrainInputError(missing)  # before the model loads: cuBLAS would fail at the first step
    return Ranks(rank, world, local_rank, device, local_world)


# DeepSpeed's CPU op for tensor-parallel inference (`inference_all_reduce`), which training never calls.
SHM_COMM_OP = "deepspeed_shm_comm"


def without_shared_memory_allreduce(deepspeed: Any) -> None:
    """Keep DeepSpeed's process group from setting up its shared-memory allreduce on CPU: it compiles a
    C++ extension on a machine's first run (a minute on 2 cores) and leaves a 66 MB segment per rank
    in /dev/shm that nothing removes (named after the rendezvous port, so one more every run): after
    a few hundred runs, RAM is full. Marked incompatible, the op is neither built nor started."""
    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def read_deepspeed_config(uri: str, cfg: RunConfig, ranks: Ranks) -> dict[str, Any]:
    """plan's DeepSpeed JSON, its global batch taken over the actual world size (DeepSpeed checks it
    against micro batch x accumulation x world, and the world may differ from the planned one), and
    hpZ's copy of the parameters partitioned over the processes of each actual node."""
    ds_config = json.loads(storage.read_bytes(uri))
    ds_config["train_batch_size"] = cfg.training.global_batch_size(ranks.world)
    zero = ds_config.get("zero_optimization", {})
    if zero.get("zero_hpz_partition_size", 1) > 1:
        zero["zero_hpz_partition_size"] = hpz_partition_size(ranks)
    return ds_config


def hpz_partition_size(ranks: Ranks) -> int:
    """The processes of one node, which torchrun numbers consecutively and DeepSpeed's hpZ groups
    take as consecutive ranks; 1 (no copy) where the group would be the whole world or one process."""
    per_node = ranks.local_world
    if per_node in (1, ranks.world) or ranks.world % per_node:
        log.warning(
            "ZeRO++ hierarchical partitioning off: %d processes per node in a world of %d",
            per_node,
            ranks.world,
        )
        return 1
    return per_node


def hpz_groups(module) -> int:
    """The GPUs ZeRO++ hpZ's copy of the parameters is partitioned over, as DeepSpeed set it up (0:
    no copy): the setup log shows it, the copy costing memory on every GPU."""
    for p in module.parameters():
        if getattr(p, "ds_secondary_tensor", None) is not None:
            return int(p.ds_secondary_tensor_group_size)
    return 0


def load_model(cfg: RunConfig, ds_config: dict[str, Any], model_dir: Path):
    """Load with ZeRO-3 partitioning at load time. Returns (model, the live HfDeepSpeedConfig)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    ds_marker = HfDeepSpeedConfig(ds_config)  # must stay referenced while the model is built
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]
    tr = cfg.training
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=tr.attn_implementation,
    )
    model.config.use_cache = False
    from fulltune.train import chunked_loss, liger, recompute

    try:  # each refuses, naming its config field, what it cannot do for this model: exit 1
        if tr.use_liger_kernel:
            liger.apply(model)
        if tr.gradient_checkpointing:
            recompute.enable(model, tr.gradient_checkpointing_layers)
        if tr.loss_chunk_tokens:
            chunked_loss.install(model, tr.loss_chunk_tokens)
    except ValueError as exc:
        raise TrainInputError(str(exc)) from exc
    return model, ds_marker


def build_optimizer(model, cfg: RunConfig):
    """AdamW or Adafactor, with no weight decay on biases and norms (1-D parameters)."""
    import torch

    tr = cfg.training
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitions are flat; ds_shape is the real one
        (no_decay if len(shape) < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if tr.optim == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            groups, lr=tr.learning_rate, relative_step=False, scale_parameter=False, warmup_init=False
        )
    # On GPU the fused kernel: no full-size fp32 temporaries during the step (the single-tensor
    # version makes two of the sub-group being stepped) and fewer kernel launches. On CPU the
    # single-tensor version, whose results do not depend on the thread count.
    fused = cfg.resources.accelerator == "gpu"
    return torch.optim.AdamW(
        groups,
        lr=tr.learning_rate,
        betas=(tr.adam_beta1, tr.adam_beta2),
        eps=tr.adam_epsilon,
        foreach=False if not fused else None,
        fused=fused,
    )


def build_engine(model, cfg: RunConfig, ds_config: dict[str, Any], lr_factor):
    """The DeepSpeed engine around the model, its optimizer and the LambdaLR schedule `lr_factor`.
    Returns (engine, scheduler)."""
    import deepspeed
    import torch

    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if cfg.training.torch_compile:
        engine.compile()  # DeepSpeed's: compiles the module with ZeRO-3's hooks kept outside the graphs
    return engine, scheduler


def build_scoring_engine(model, ds_config: dict[str, Any]):
    """A DeepSpeed engine that only runs forwards (no optimizer, no schedule): ZeRO-3 gathers the
    partitioned parameters for them, as the training engine does. `destroy()` it when done."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    return engine


def leaf_modules(module) -> dict[str, int]:
    """The modules ZeRO-3 gathers as one unit (`stage3_module_granularity_threshold`), by class: the
    setup log shows them, since a threshold that missed the transformer blocks costs speed silently."""
    from collections import Counter

    from deepspeed.utils import z3_leaf_module

    return dict(Counter(type(m).__name__ for m in module.modules() if z3_leaf_module(m)))
