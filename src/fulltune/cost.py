"""What a run will cost before it is booked: wall time and GPU-hours, estimated by `plan`.

    tokens     trained: epochs x the token positions of an epoch's sequences (`plan.epoch_tokens`:
               about the dataset's tokens when packed, a padded max_seq_len sequence per record
               with packing off), or training.max_steps x global batch x max_seq_len when
               max_steps is set
    FLOPs      tokens x (6 N + 12 L H Q s): the model FLOPs of `train.throughput.flops_per_token`,
               N the parameters that do matrix work, H Q the query heads times their size; recomputing activations (gradient
               checkpointing) adds one forward, a third more
    wall time  FLOPs / (GPUs x the GPU's dense 16-bit peak x the assumed MFU)
    GPU-hours  wall time x GPUs

The MFU is an assumption, stated in the report: ASSUMED_MFU, below the 36-42% the GPU check measured
for 0.9-3B Llama shapes on one H200 with plan's settings and without Liger's kernels, times
LIGER_SPEEDUP when the run uses them (docs/benchmarks.md, runs 3-6). Across nodes the interconnect
lowers it (the same page's projection), and optimizer or parameter offload much more: the estimate
does not model offload. Start-up, evaluation and checkpointing are not counted.
`resources.max_gpu_hours` makes plan refuse a run estimated above it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fulltune.config import RunConfig
from fulltune.train.recompute import layers_recomputed
from fulltune.train.throughput import flops_per_token, peak_flops

ASSUMED_MFU = 0.35
# Liger's fused kernels: the smaller of the two measured step-time gains at 1B (352 -> 310 ms, run 6;
# 292 ms in run 5), so that the estimate stays on the side of more hours.
LIGER_SPEEDUP = 1.13
RECOMPUTE_FACTOR = 4.0 / 3.0  # forward 2N + backward 4N, plus the forward again: 8N over 6N


def recompute_factor(gradient_checkpointing: bool, layers: int | None, num_layers: int) -> float:
    """Hardware over model FLOPs: each recomputed layer (all with gradient_checkpointing alone) runs
    its forward pass again."""
    share = layers_recomputed(gradient_checkpointing, layers, num_layers) / max(num_layers, 1)
    return 1.0 + (RECOMPUTE_FACTOR - 1.0) * share


class CostError(ValueError):
    """The run's estimate is above resources.max_gpu_hours; the message says what would fit."""


@dataclass(frozen=True)
class CostEstimate:
    gpu_type: str
    gpus: int
    tokens: int
    flops: float
    assumed_mfu: float
    wall_hours: float
    gpu_hours: float

    def summary(self) -> str:
        return (
            f"~{self.gpu_hours:,.1f} GPU-hours ({self.wall_hours:,.1f} h on {self.gpus} x {self.gpu_type}) for "
            f"{self.tokens:,} tokens at an assumed {self.assumed_mfu:.0%} MFU"
        )


def planned_tokens(cfg: RunConfig, dataset_tokens: int) -> int:
    """The tokens the resolved config trains: max_steps full steps when set, else its epochs over
    `dataset_tokens`, the token positions of an epoch's sequences."""
    tr = cfg.training
    if tr.max_steps > 0:
        return tr.max_steps * cfg.tokens_per_step
    return int(round((tr.num_train_epochs or 1.0) * dataset_tokens))


def estimate_cost(
    cfg: RunConfig, *, matmul_params: int, num_layers: int, attention_width: int, dataset_tokens: int
) -> CostEstimate | None:
    """The estimate for the resolved config; None off a GPU or for a GPU type without a known peak."""
    res, tr = cfg.resources, cfg.training
    peak = peak_flops(res.gpu_type)
    if res.accelerator != "gpu" or peak is None:
        return None
    seq = cfg.preprocess.max_seq_len
    tokens = planned_tokens(cfg, dataset_tokens)
    flops = tokens * flops_per_token(matmul_params, num_layers, attention_width, seq)
    hardware = flops * recompute_factor(
        tr.gradient_checkpointing, tr.gradient_checkpointing_layers, num_layers
    )
    gpus = cfg.world_size
    mfu = ASSUMED_MFU * (LIGER_SPEEDUP if tr.use_liger_kernel else 1.0)
    wall_hours = hardware / (gpus * peak * mfu) / 3600.0
    return CostEstimate(res.gpu_type, gpus, tokens, flops, mfu, wall_hours, wall_hours * gpus)


def check_budget(cfg: RunConfig, estimate: CostEstimate | None) -> None:
    """CostError when the estimate is above `resources.max_gpu_hours`, saying what would fit."""
    budget = cfg.resources.max_gpu_hours
    if budget is None or estimate is None or estimate.gpu_hours <= budget:
        return
    fits = budget / estimate.gpu_hours  # the share of the planned tokens the budget pays for
    raise CostError(
        f"the run is estimated at {estimate.summary()}, above resources.max_gpu_hours {budget:g}: "
        f"{_what_fits(cfg, estimate, fits)}; more GPUs shorten the wall time, not the GPU-hours"
    )


def _what_fits(cfg: RunConfig, estimate: CostEstimate, fits: float) -> str:
    """The shorter run the budget pays for. With max_steps the length is the steps alone (less data
    changes nothing), and max_steps 0 would mean the epochs instead: below one step, say so."""
    tr = cfg.training
    if tr.max_steps <= 0:
        epochs = (tr.num_train_epochs or 1.0) * fits
        return f"{fits:.0%} of it would fit (training.num_train_epochs {epochs:.2g}, or less data)"
    if (steps := int(tr.max_steps * fits)) >= 1:
        return f"{fits:.0%} of it would fit (training.max_steps {steps})"
    return (
        f"not even one optimizer step fits (~{estimate.gpu_hours / tr.max_steps:.2g} GPU-hours each): a "
        "smaller global batch or preprocess.max_seq_len makes the steps cheaper"
    )
