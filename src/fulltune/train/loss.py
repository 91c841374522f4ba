"""The token-mean loss: one optimizer step over the global batch, and the evaluation loss.

- Training loss: the token-mean over the whole global batch (all ranks and accumulation
  micro-steps), not a mean of per-micro-batch means: each micro-step's summed loss is scaled by
  world*accumulation/N where N is the global count of loss tokens, so DeepSpeed's averaging yields
  exactly the gradient of sum(loss)/N.
- Evaluation: the token-mean loss over every sequence of the dataset's `domain_eval` split, spread
  over the ranks and summed across them.

Reduced tensors live on the training device: NCCL (GPU) reduces device tensors only, and keeping the
sums there avoids a host sync per micro-batch.
"""

from __future__ import annotations

import math
from typing import Any

from fulltune.preprocess.dataset import DOMAIN_EVAL
from fulltune.train.exit_codes import TrainInputError

EVAL_SPLIT = DOMAIN_EVAL  # the split training evaluates on (`training.eval_steps`)


def check_eval_split(dataset_uri: str) -> None:
    """TrainInputError unless the dataset has a non-empty eval split (checked before any rendezvous)."""
    from fulltune.preprocess.dataset import load_manifest

    if not load_manifest(dataset_uri).sequences(EVAL_SPLIT):
        raise TrainInputError(
            f"training.eval_steps is set but the dataset {dataset_uri} has no {EVAL_SPLIT} sequences: "
            "set data.eval_uri or preprocess.eval_fraction, or set training.eval_steps to 0"
        )


def token_loss_sum(engine, batch: dict[str, Any], idx, device) -> tuple[Any, Any]:
    """(summed next-token cross-entropy over the loss positions of sequences `idx`, their count), both
    tensors on the device (no host sync here: the training step counts tokens before the forward)."""
    import torch.nn.functional as F

    from fulltune.preprocess.dataset import IGNORE_INDEX

    inputs, labels = rows_on(device, batch, idx)
    count = (labels[:, 1:] != IGNORE_INDEX).sum()
    if getattr(engine.module, "loss_chunk_tokens", 0):  # chunked_loss.install: the model returns the sum
        return engine(**inputs, labels=labels, use_cache=False), count
    logits = engine(**inputs, use_cache=False).logits
    # The labels are shifted, not the logits: the logits stay one contiguous view (slicing off the last
    # position would copy them, and the backward would copy their gradient back).
    summed = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        next_token_targets(labels).reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return summed, count


def rows_on(device, batch: dict[str, Any], idx) -> tuple[dict[str, Any], Any]:
    """The model's inputs for rows `idx` of the batch (`dataset.model_inputs`: per packed document
    or across the row) and their labels, on `device`. To a GPU through pinned memory, without
    waiting: a copy from pageable memory makes the host wait until the GPU has run everything queued
    before it, once per micro-step, while ZeRO-3's step is bound by how fast the host queues work
    (docs/benchmarks.md, GPU runs 2-4). PyTorch's pinned-memory allocator keeps each buffer until its
    copy has run."""
    from fulltune.preprocess.dataset import model_inputs

    inputs = {k: v[idx] for k, v in model_inputs(batch).items()}
    labels = batch["labels"][idx]
    if device.type != "cuda":
        return inputs, labels
    moved = {k: v.pin_memory().to(device, non_blocking=True) for k, v in inputs.items()}
    return moved, labels.pin_memory().to(device, non_blocking=True)


def next_token_targets(labels):
    """The target of each position: the next position's label, IGNORE_INDEX after the last one."""
    import torch

    from fulltune.preprocess.dataset import IGNORE_INDEX

    return torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)


def loss_tokens_per_sequence(labels):
    """How many positions of each sequence carry a loss (their next token is a label)."""
    from fulltune.preprocess.dataset import IGNORE_INDEX

    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def train_step(
    engine, data: dict[str, Any], micro: list, *, n_tokens: int, world: int, device
) -> tuple[float, float]:
    """Forward, backward and DeepSpeed step for each of this rank's micro-batches `micro` (one
    optimizer step over the global batch of `n_tokens` loss positions, which every rank counts from
    its own copy of the data: no collective, no host sync before the step). Returns (token-mean loss
    over the global batch, N)."""
    import torch
    import torch.distributed as dist

    accumulation = len(micro)
    n_tokens = max(n_tokens, 1)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for m in micro:
        summed, _ = token_loss_sum(engine, data, m, device)
        engine.backward(summed * (world * accumulation / n_tokens))
        engine.step()
        loss_sum += summed.detach().double()
    dist.all_reduce(loss_sum)
    return loss_sum.item() / n_tokens, n_tokens  # .item() waits for the step's device work


def eval_loss(engine, data: dict[str, Any], *, rank: int, world: int, micro_batch: int, device) -> float:
    """Token-mean loss over every sequence of `data`, the ranks sharing the work.

    Under ZeRO-3 each forward gathers parameters collectively, so every rank runs the same number of
    forwards: a rank with nothing left scores sequence 0 and discards the result.
    """
    import torch
    import torch.distributed as dist

    n = data["input_ids"].shape[0]
    per_round = micro_batch * world
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    engine.eval()
    with torch.no_grad():
        for r in range(math.ceil(n / per_round)):
            lo = r * per_round + rank * micro_batch
            idx = torch.arange(min(lo, n), min(lo + micro_batch, n))
            real = len(idx) > 0
            summed, count = token_loss_sum(engine, data, idx if real else torch.arange(1), device)
            if real:
                totals += torch.stack([summed.double(), count.double()])
    engine.train()
    dist.all_reduce(totals)
    return totals[0].item() / max(totals[1].item(), 1.0)
