"""A plain PyTorch FSDP2 training loop: the baseline a user would pick instead of fulltune.

The GPU benchmark sets this next to fulltune (DeepSpeed ZeRO-3) on the same model files and the same
fulltune dataset. It is one rank of a `torchrun`, configured by one JSON object:

    python -m torch.distributed.run --nproc-per-node=N benchmarks/fsdp2_step.py --spec '{"model_dir": ...}'
    python -m torch.distributed.run --nproc-per-node=N benchmarks/fsdp2_step.py --spec-file spec.json

Spec keys: model_dir (Hugging Face model directory), dataset (fulltune dataset manifest; its train
split is read), micro (micro batch per rank), gas (accumulation steps), steps (optimizer steps),
device ("cpu": gloo, float32; "cuda": NCCL, bf16 compute over float32 master weights), lr,
weight_decay, max_grad_norm, out (the JSON file rank 0 writes); optional attn_implementation
("sdpa"), liger (false: fulltune's Liger kernels, `fulltune.train.liger.apply`), activation_checkpointing
(false), compile (false: torch.compile each decoder layer),
profile_steps (0: extra steps under torch.profiler after the timed ones) and seed (absent: the
sequences in file order; an int: fulltune's own order for `training.seed` = seed, see `global_rows`).

What it does, as a user would write it with FSDP2 (`fully_shard`):
- every decoder layer is sharded, then the root (embeddings, final norm, LM head);
- the loss is fulltune's: the token-mean next-token cross-entropy over the whole global batch (all
  ranks, all accumulation micro-steps), so the first steps' losses of the two are comparable;
- AdamW (betas 0.9/0.95, eps 1e-8, weight decay on matrices only) at a constant learning rate (no
  warm-up or decay: step time does not depend on it), with gradient-norm clipping.

Output (rank 0): {"times": seconds per optimizer step, "losses": loss per step, "grad_norms": the
gradient norm before clipping per step, "tokens_per_step", "gpu_mem_reserved_gib",
"gpu_mem_allocated_gib" (peaks, None on CPU), "world", "profile": the profiler table or None}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def read_spec(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", help="the spec as a JSON string")
    src.add_argument("--spec-file", help="the spec as a JSON file")
    a = p.parse_args(argv)
    return json.loads(a.spec if a.spec is not None else Path(a.spec_file).read_text())


def setup(spec: dict[str, Any]) -> tuple[int, int, torch.device]:
    """Join the process group; (rank, world, this rank's device)."""
    cuda = spec["device"] == "cuda"
    device = torch.device("cpu")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by torchrun
        torch.cuda.set_device(local_rank)  # before the group: NCCL binds to the current device
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def load_model(spec: dict[str, Any], device: torch.device, world: int):
    """The model from `model_dir`, each decoder layer and then the root sharded with FSDP2.

    Every rank loads the whole float32 model on the host first (the simple route a user takes);
    `fully_shard` then keeps each rank's shard and moves it to the device mesh's device.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"],
        dtype=torch.float32,  # the master weights; on cuda the policy below computes in bf16
        attn_implementation=spec.get("attn_implementation", "sdpa"),
    )
    model.config.use_cache = False  # no KV cache in training: it only costs memory
    model.train()
    if spec.get("liger"):  # the same kernels as fulltune's run, patched as fulltune patches them
        from fulltune.train import liger

        liger.apply(model)
    if spec.get("activation_checkpointing"):
        # Non-reentrant checkpointing is the variant that composes with FSDP2's hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy()  # CPU: no casting, float32 throughout
    if device.type == "cuda":
        # Reduce gradients in float32, as DeepSpeed's bf16 mode accumulates them.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        if spec.get("compile"):
            layer.compile()  # per layer, before sharding: FSDP2's hooks stay outside the graphs
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def make_optimizer(model, spec: dict[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (>= 2-D) only, as fulltune's recipe groups them."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": spec["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel per step on GPU; foreach off on CPU (the DTensor shards gain nothing there).
    impl = {"fused": True} if device.type == "cuda" else {"foreach": False}
    return torch.optim.AdamW(groups, lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8, **impl)


def global_rows(step: int, spec: dict[str, Any], world: int, n_seq: int) -> torch.Tensor:
    """The sequence indices of optimizer step `step`, in the order micro-steps and ranks take them.

    Without a seed: the sequences in file order, wrapping around. With one: fulltune's seeded
    permutation per epoch (`batch_indices`), i.e. exactly the batches fulltune trains on.
    """
    global_batch = spec["micro"] * spec["gas"] * world
    if spec.get("seed") is None:
        return torch.arange(step * global_batch, (step + 1) * global_batch) % n_seq
    from fulltune.train.schedule import Schedule, batch_indices

    if n_seq < global_batch:  # fulltune refuses this too: its epoch would hold no step
        raise ValueError(f"{n_seq} training sequences, fewer than one global batch of {global_batch}")
    sched = Schedule(
        global_batch=global_batch, num_sequences=n_seq, total_steps=spec["steps"], warmup_steps=0
    )
    return batch_indices(step, sched, spec["seed"], n_seq)


def micro_batches(step: int, spec: dict[str, Any], rank: int, world: int, n_seq: int) -> list[torch.Tensor]:
    """This rank's rows per micro-step: micro-step m, rank r takes slot (m * world + r) of the step."""
    rows, micro = global_rows(step, spec, world, n_seq), spec["micro"]
    return [rows[(m * world + rank) * micro : (m * world + rank + 1) * micro] for m in range(spec["gas"])]


def loss_sum(model, data: dict[str, torch.Tensor], idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Summed next-token cross-entropy over the loss positions of sequences `idx`."""
    from fulltune.preprocess.dataset import IGNORE_INDEX

    out = model(
        input_ids=data["input_ids"][idx].to(device), attention_mask=data["attention_mask"][idx].to(device)
    )
    logits = out.logits[:, :-1].float()  # the softmax in float32, as fulltune computes it
    target = data["labels"][idx][:, 1:].to(device)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def train_step(model, opt, data, micro: list[torch.Tensor], spec, world: int, device) -> tuple[float, Any]:
    """One optimizer step over the global batch: (token-mean loss, gradient norm before clipping)."""
    from fulltune.preprocess.dataset import IGNORE_INDEX

    # N, the global count of loss tokens, is known before any forward: every micro-step's gradient
    # is then already scaled for the token mean over the whole global batch.
    count = sum(int((data["labels"][m][:, 1:] != IGNORE_INDEX).sum()) for m in micro)
    counts = torch.tensor([float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    n_tokens = max(counts.item(), 1.0)
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for m in micro:
        summed = loss_sum(model, data, m, device)
        # FSDP2 averages gradients over the ranks: times world gives d(sum of losses)/N.
        (summed * (world / n_tokens)).backward()
        total += summed.detach().double()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec["max_grad_norm"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    dist.all_reduce(total)
    return total.item() / n_tokens, norm.detach()  # .item() waits for the step's work on the device


def run_steps(model, opt, data, spec, ranks: tuple[int, int, torch.device], first: int, count: int) -> dict:
    """Optimizer steps first .. first+count-1: their times, losses and gradient norms."""
    rank, world, device = ranks
    n_seq = data["input_ids"].shape[0]
    times, losses, norms = [], [], []
    for step in range(first, first + count):
        t0 = time.perf_counter()
        micro = micro_batches(step, spec, rank, world, n_seq)
        loss, norm = train_step(model, opt, data, micro, spec, world, device)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the clock stops when the device work is done
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        norms.append(norm)
    # The norms are DTensors over the mesh; made plain numbers after the timed steps.
    full = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    return {"times": times, "losses": losses, "grad_norms": [float(n) for n in full]}


def profile_steps(model, opt, data, spec, ranks: tuple[int, int, torch.device]) -> str | None:
    """The profiler's table over `profile_steps` extra steps after the timed ones (None when 0)."""
    count = int(spec.get("profile_steps") or 0)
    if count <= 0:
        return None
    from torch.profiler import ProfilerActivity, profile

    cuda = ranks[2].type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run_steps(model, opt, data, spec, ranks, spec["steps"], count)
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25)


def main(argv: list[str] | None = None) -> None:
    from fulltune.preprocess.dataset import load_split

    spec = read_spec(argv)
    ranks = setup(spec)
    rank, world, device = ranks
    try:
        data = load_split(spec["dataset"], "train")
        model = load_model(spec, device, world)
        opt = make_optimizer(model, spec, device)
        result = run_steps(model, opt, data, spec, ranks, 0, spec["steps"])
        profile = profile_steps(model, opt, data, spec, ranks)
        cuda = device.type == "cuda"
        gib = 2**30
        result.update(
            {
                "tokens_per_step": spec["micro"] * spec["gas"] * world * data["input_ids"].shape[1],
                "gpu_mem_reserved_gib": torch.cuda.max_memory_reserved() / gib if cuda else None,
                "gpu_mem_allocated_gib": torch.cuda.max_memory_allocated() / gib if cuda else None,
                "world": world,
                "profile": profile,
            }
        )
        if rank == 0:
            Path(spec["out"]).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from fulltune._process import exit_now

    main()
    exit_now(0)  # as fulltune's ranks leave: the interpreter's teardown can abort a finished gloo rank
