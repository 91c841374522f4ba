"""The training entry point every rank runs: `python -m fulltune.train` (under torchrun locally, in
every pod of the PyTorchJob on a cluster).

    setup -> train -> save -> cleanup

- The model is loaded with ZeRO-3 active at load time (`HfDeepSpeedConfig` is alive before
  `from_pretrained`), so weights are partitioned, never materialised whole on each rank.
- Data order: a seeded permutation per epoch; global step s takes the s-th slice of it, split by
  rank and micro-step. The order depends only on (seed, step), so a resumed run sees the same data.
- Loss: the token-mean over the whole global batch (all ranks and accumulation micro-steps), not a
  mean of per-micro-batch means: each micro-step's summed loss is scaled by world*accumulation/N
  where N is the global count of loss tokens, so DeepSpeed's averaging yields exactly the gradient
  of sum(loss)/N.
- Every `save_steps` steps a complete checkpoint (see checkpoint.py); a (re)started run resumes from
  the newest complete one and refuses to start over when checkpoints exist but none is usable.
  `FULLTUNE_FAULT_AFTER_STEP=N` (with `FULLTUNE_FAULT_RANK`) SIGKILLs a rank after step N: fault
  injection for the resume tests.
- At the end: one consolidated Hugging Face model (safetensors) + tokenizer + the resolved config,
  with `model_manifest.json` (files, sizes, SHA-256) written last as the completeness marker.

Exit codes: 1 for a bad config or data (retrying cannot help); anything else propagates as a crash
so the launcher or the operator can retry.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fulltune import storage
from fulltune.config import ConfigError, RunConfig
from fulltune.train import checkpoint

log = logging.getLogger("fulltune.train")

EXIT_BAD_INPUT = 1
MODEL_MANIFEST = "model_manifest.json"


class TrainInputError(ValueError):
    """Config or data the trainer cannot use; exit code 1, no retry."""


@dataclass
class Paths:
    config: str
    deepspeed: str
    dataset: str
    output: str  # where the final model goes
    metrics: str  # per-step metrics, JSON lines
    checkpoints: str | None = None  # where complete checkpoints go and resume comes from


def parse_args(argv: list[str] | None) -> Paths:
    p = argparse.ArgumentParser(prog="python -m fulltune.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="resolved RunConfig YAML (URI), written by plan")
    p.add_argument("--deepspeed", required=True, help="DeepSpeed JSON (URI), written by plan")
    p.add_argument("--dataset", required=True, help="dataset manifest (URI), written by gather_shards")
    p.add_argument("--output", required=True, help="URI for the final Hugging Face model")
    p.add_argument("--metrics", required=True, help="URI for per-step metrics (JSON lines)")
    p.add_argument(
        "--checkpoints",
        default=None,
        help="URI for checkpoints; training resumes from the newest complete one",
    )
    a = p.parse_args(argv)
    return Paths(a.config, a.deepspeed, a.dataset, a.output, a.metrics, a.checkpoints)


# -- setup ----------------------------------------------------------------------------------------


def init_distributed(cfg: RunConfig) -> tuple[int, int, Any]:
    import deepspeed
    import torch

    cpu = cfg.resources.accelerator == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world != cfg.world_size:
        log.warning("world size %d differs from the config's %d (nodes x processes)", world, cfg.world_size)
    if cpu:
        device = torch.device("cpu")
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return rank, world, device


def load_model(cfg: RunConfig, ds_config: dict[str, Any], model_dir: Path):
    """Load with ZeRO-3 partitioning at load time. Returns (model, the live HfDeepSpeedConfig)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    ds_marker = HfDeepSpeedConfig(ds_config)  # must stay referenced while the model is built
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, use_safetensors=True, trust_remote_code=cfg.model.trust_remote_code
    )
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, ds_marker


def build_optimizer(model, cfg: RunConfig):
    """AdamW with no weight decay on biases and norms (1-D parameters)."""
    import torch

    tr = cfg.training
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitions are flat; ds_shape is the real one
        (no_decay if len(shape) < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=tr.learning_rate, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_epsilon, foreach=False
    )


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
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


# -- data order -----------------------------------------------------------------------------------


@dataclass
class Schedule:
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_schedule(cfg: RunConfig, num_sequences: int, world: int) -> Schedule:
    tr = cfg.training
    global_batch = tr.per_device_train_batch_size * tr.gradient_accumulation_steps * world
    steps_per_epoch = num_sequences // global_batch
    if steps_per_epoch == 0:
        raise TrainInputError(
            f"the training split has {num_sequences} sequences, fewer than one global batch of {global_batch} "
            f"(per_device_train_batch_size x gradient_accumulation_steps x world size): lower them or add data"
        )
    if tr.max_steps > 0:
        total = tr.max_steps
    elif tr.num_train_epochs:
        total = max(1, math.ceil(tr.num_train_epochs * steps_per_epoch))
    else:
        raise TrainInputError(
            "neither training.max_steps nor training.num_train_epochs is set (plan resolves epochs)"
        )
    return Schedule(global_batch, steps_per_epoch, total, int(tr.warmup_ratio * total))


def batch_indices(step: int, sched: Schedule, seed: int, num_sequences: int):
    """The sequence indices of global step `step`: depends on (seed, step) only."""
    import torch

    epoch, within = divmod(step, sched.steps_per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_sequences, generator=gen)
    return perm[within * sched.global_batch : (within + 1) * sched.global_batch]


# -- train ----------------------------------------------------------------------------------------


def train(cfg: RunConfig, paths: Paths) -> dict[str, Any]:
    import deepspeed
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from fulltune.preprocess.dataset import IGNORE_INDEX, load_split

    tr = cfg.training
    torch.manual_seed(tr.seed)
    rank, world, device = init_distributed(cfg)
    if rank == 0:
        log.info("process group ready: %d ranks (%s)", world, "gloo" if device.type == "cpu" else "nccl")
    ds_config = json.loads(storage.read_bytes(paths.deepspeed))
    ds_config["train_batch_size"] = tr.per_device_train_batch_size * tr.gradient_accumulation_steps * world

    data = load_split(paths.dataset, "train")
    n_seq = data["input_ids"].shape[0]
    sched = make_schedule(cfg, n_seq, world)

    if rank == 0:
        log.info("loaded %d training sequences; loading the model under ZeRO-3", n_seq)
    with storage.local_dir(cfg.model.base_model_uri) as model_dir:
        model, ds_marker = load_model(cfg, ds_config, model_dir)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tr.lr_scheduler_type, sched.warmup_steps, sched.total_steps)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if rank == 0:
        log.info(
            "training %d steps (%d per epoch, global batch %d sequences of %d tokens, %d ranks)",
            sched.total_steps,
            sched.steps_per_epoch,
            sched.global_batch,
            data["input_ids"].shape[1],
            world,
        )

    b, gas = tr.per_device_train_batch_size, tr.gradient_accumulation_steps
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    first_step, records = resume(engine, paths, rank, local_rank)
    fault_step = int(os.environ.get("FULLTUNE_FAULT_AFTER_STEP", "-1"))
    start = time.time()
    for step in range(first_step, sched.total_steps):
        t0 = time.time()
        idx = batch_indices(step, sched, tr.seed, n_seq)
        # Rank r takes micro-batches r, r+world, ... of the global batch.
        micro = [idx[(k * world + rank) * b : (k * world + rank + 1) * b] for k in range(gas)]
        labels = [data["labels"][m] for m in micro]
        counts = torch.tensor(
            [float(sum((lab[:, 1:] != IGNORE_INDEX).sum().item() for lab in labels))], dtype=torch.float64
        )
        dist.all_reduce(counts)
        n_tokens = max(counts.item(), 1.0)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        for m, lab in zip(micro, labels, strict=True):
            out = engine(
                input_ids=data["input_ids"][m].to(device), attention_mask=data["attention_mask"][m].to(device)
            )
            logits = out.logits[:, :-1].float()
            target = lab[:, 1:].to(device)
            summed = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                target.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            engine.backward(summed * (world * gas / n_tokens))
            engine.step()
            loss_sum += summed.detach().double().cpu()
        dist.all_reduce(loss_sum)
        step_time = time.time() - t0
        rec = {
            "step": step,
            "loss": loss_sum.item() / n_tokens,
            "lr": lr,
            "grad_norm": _float(engine.get_global_grad_norm()),
            "tokens": int(n_tokens),
            "tokens_per_s": n_tokens / max(step_time, 1e-9),
            "step_time_s": step_time,
        }
        records.append(rec)
        done = step + 1
        if paths.checkpoints and tr.save_steps and done % tr.save_steps == 0 and done < sched.total_steps:
            state = {"step": done, "records": records}
            checkpoint.save(
                engine,
                paths.checkpoints,
                done,
                state,
                rank=rank,
                local_rank=local_rank,
                keep=tr.save_total_limit,
            )
        if done == fault_step and rank == int(os.environ.get("FULLTUNE_FAULT_RANK", "0")):
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume tests
        if rank == 0 and (step % tr.logging_steps == 0 or step == sched.total_steps - 1):
            eta = (time.time() - start) / (step + 1 - first_step) * (sched.total_steps - step - 1)
            log.info(
                "step %d/%d loss %.4f lr %.3g grad_norm %s tok/s %.0f eta %.0fs",
                step + 1,
                sched.total_steps,
                rec["loss"],
                rec["lr"],
                _fmt(rec["grad_norm"]),
                rec["tokens_per_s"],
                eta,
            )
    summary = {
        "steps": sched.total_steps,
        "global_batch": sched.global_batch,
        "world_size": world,
        "first_loss": records[0]["loss"],
        "final_loss": records[-1]["loss"],
        "train_seconds": time.time() - start,
    }
    save(engine, cfg, paths, rank, records, summary)
    del ds_marker
    dist.barrier()
    return summary


def _float(x: Any) -> float | None:
    if x is None:
        return None
    return float(x.item() if hasattr(x, "item") else x)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def resume(engine, paths: Paths, rank: int, local_rank: int) -> tuple[int, list[dict[str, Any]]]:
    """(first step, metrics so far): from the newest complete checkpoint, or (0, []) when there is none.

    Rank 0 decides (verifying checksums once) and tells the others, so every rank loads the same tag.
    """
    import torch.distributed as dist

    if not paths.checkpoints:
        return 0, []
    decision: list[Any] = [None, None]
    if rank == 0:
        try:
            decision[0] = checkpoint.find_resume(paths.checkpoints)
        except checkpoint.CheckpointError as exc:
            decision[1] = str(exc)
    dist.broadcast_object_list(decision, src=0)
    tag, error = decision
    if error:
        raise checkpoint.CheckpointError(error)
    if tag is None:
        return 0, []
    state = checkpoint.load(engine, paths.checkpoints, tag, local_rank=local_rank)
    if rank == 0:
        log.info("resumed from %s at step %d", storage.join(paths.checkpoints, tag), state["step"])
    return int(state["step"]), list(state.get("records", []))


# -- save -----------------------------------------------------------------------------------------


def save(
    engine, cfg: RunConfig, paths: Paths, rank: int, records: list[dict[str, Any]], summary: dict
) -> None:
    """Consolidate the ZeRO-3 partitions (every rank takes part); rank 0 writes the model."""
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return
    from fulltune.hf import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="fulltune-model-") as tmp:
        out = Path(tmp)
        engine.module.save_pretrained(out, state_dict=state_dict)
        load_tokenizer(cfg.tokenizer_uri, cfg.model.trust_remote_code).save_pretrained(out)
        (out / "fulltune_config.yaml").write_text(cfg.to_yaml())
        (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
        files = storage.file_manifest(out)
        storage.upload_dir(out, paths.output)
        storage.write_json(storage.join(paths.output, MODEL_MANIFEST), {"files": files, "summary": summary})
    storage.write_text(paths.metrics, "".join(json.dumps(r) + "\n" for r in records))
    log.info("saved the tuned model to %s", paths.output)


def is_complete_model(uri: str) -> bool:
    return storage.exists(storage.join(uri, MODEL_MANIFEST))


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    # torch.distributed deprecation notices fire on every collective DeepSpeed issues; they drown the log.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    logging.basicConfig(
        level=logging.INFO,
        format=f"[rank{os.environ.get('RANK', '0')}] %(asctime)s %(name)s %(levelname)s %(message)s",
    )
    paths = parse_args(argv)
    try:
        cfg = RunConfig.from_dict(_load_yaml(paths.config), source=paths.config)
        train(cfg, paths)
    except (ConfigError, TrainInputError, FileNotFoundError, checkpoint.CheckpointError) as exc:
        log.error("cannot train: %s", exc)
        return EXIT_BAD_INPUT
    return 0


def _load_yaml(uri: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(storage.read_text(uri)) or {}


if __name__ == "__main__":
    sys.exit(main())
