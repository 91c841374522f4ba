"""How many steps, which sequences each step trains on, and the learning rate of each step.

Data order: a seeded permutation per epoch, the epochs' permutations back to back; global step s
takes the s-th global batch of that stream, and rank r takes micro-batches r, r+world, ... of it.
Every sequence is trained once per epoch: an epoch's last sequences that do not fill a global batch
share a step with the next epoch's first (a step may span two epochs), rather than being left out,
which would drop up to a global batch from every epoch (a third of a small dataset). The order
depends only on (seed, step), so a resumed run sees the same data, and a run on another world size
with the same global batch sees the same global batches.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from fulltune.config import RunConfig
from fulltune.train.exit_codes import TrainInputError


@dataclass
class Schedule:
    global_batch: int
    num_sequences: int
    total_steps: int
    warmup_steps: int

    @property
    def steps_per_epoch(self) -> float:
        return self.num_sequences / self.global_batch


def make_schedule(cfg: RunConfig, num_sequences: int, world: int) -> Schedule:
    """The run's length for `num_sequences` training sequences on `world` ranks (the actual world size)."""
    tr = cfg.training
    global_batch = tr.global_batch_size(world)
    if num_sequences < global_batch:
        raise TrainInputError(
            f"the training split has {num_sequences} sequences, fewer than one global batch of {global_batch} "
            f"(per_device_train_batch_size x gradient_accumulation_steps x world size): lower them or add data"
        )
    if tr.max_steps > 0:
        total = tr.max_steps
    elif tr.num_train_epochs:
        # the epochs' sequences in whole steps, the last reaching into the epoch after where they do
        # not fill it (rounded first: a product the float arithmetic makes 25.000000001 is 25 steps)
        total = max(1, math.ceil(round(tr.num_train_epochs * num_sequences / global_batch, 9)))
    else:
        raise TrainInputError(
            "neither training.max_steps nor training.num_train_epochs is set (plan resolves epochs)"
        )
    return Schedule(global_batch, num_sequences, total, int(tr.warmup_ratio * total))


def batch_indices(step: int, sched: Schedule, seed: int, num_sequences: int):
    """The sequence indices of global step `step`: depends on (seed, step) only. A view of the
    epoch's order, or the end of one epoch's and the start of the next's."""
    import torch

    start, end = step * sched.global_batch, (step + 1) * sched.global_batch
    parts = []
    while start < end:
        epoch, offset = divmod(start, num_sequences)
        part = epoch_order(seed, epoch, num_sequences)[offset : offset + end - start]
        parts.append(part)
        start += len(part)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, num_sequences: int):
    """The epoch's seeded permutation of the sequences, drawn once per epoch rather than once per step:
    a million sequences take ~6 ms to permute, time the GPU waits between two steps. Read-only: the
    steps' index slices are views of it."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_sequences, generator=gen)


def rank_micro_batches(indices, *, rank: int, world: int, micro_batch: int, accumulation: int) -> list:
    """This rank's share of a global batch: micro-batches rank, rank+world, ... (one per micro-step)."""
    return [
        indices[(k * world + rank) * micro_batch : (k * world + rank + 1) * micro_batch]
        for k in range(accumulation)
    ]


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """The factor on the peak learning rate at each step: linear warm-up, then `kind`'s decay."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def follow_lr_schedule(scheduler) -> None:
    """Set the rate of the next step from `scheduler`'s own schedule at the step it is at. A restored
    LambdaLR keeps the rate that the run which saved it computed for that step: after a resume with
    another length, the first step would train at the old schedule's rate (half the new one, 4
    steps into a linear decay over 6 resumed as 12), and only the steps after it at the new one."""
    step = scheduler.last_epoch
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports
