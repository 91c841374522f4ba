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
- Optimizer: `training.optim` "adamw_torch" (no weight decay on 1-D parameters; torch's fused CUDA
  kernel on GPU, the single-tensor version on CPU) or "adafactor"
  (transformers' Adafactor at the fixed scheduled learning rate: relative_step, scale_parameter and
  warmup_init off, no first moment). Under ZeRO-3 the optimizer steps DeepSpeed's flat fp32
  partitions, so Adafactor's second moment is not factored and its update clipping (RMS, threshold
  1) is taken per partition rather than per tensor: results depend slightly on the world size.
- Precision: bf16, or fp16 with DeepSpeed's dynamic loss scaling, on GPU; on CPU both are ignored
  (with a log line) and training is float32.
- Evaluation: every `eval_steps` optimizer steps the token-mean loss on the dataset's `domain_eval`
  split (every sequence, spread over the ranks, summed across them) goes into that step's metrics
  record as `eval_loss`. Early stopping: when `early_stopping_patience` evaluations in a row have
  not lowered the best eval loss by more than `early_stopping_threshold`, training stops and the
  model *as of that last step* is saved (not the best one: keeping the best would cost a full
  checkpoint per improvement; with patience P it is at most P evaluations past the best, and the
  summary names the best step and loss). The early-stopping state is recomputed from the metrics
  records, so a resumed run stops where an uninterrupted one would.
- Per-step log: loss, learning rate, grad norm, tokens/s (loss tokens), ETA and, on a GPU whose
  peak 16-bit FLOP/s is known, the model FLOPs utilisation (see throughput.py); on a GPU the
  metrics records also carry the peak memory allocated and reserved by PyTorch so far, to hold
  against the plan's per-GPU estimate.
- At the end: one consolidated Hugging Face model (safetensors) + tokenizer + the resolved config,
  with `model_manifest.json` (files, sizes, SHA-256) written last as the completeness marker.

Exit codes: 0 trained and saved; 1 bad input (permanent); 2 a bug (permanent); 138 retryable, the
restarted job resumes. exit_codes.py has the table and the classifier.
"""

from __future__ import annotations

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
from fulltune.config import RunConfig
from fulltune.train import checkpoint
from fulltune.train.args import TrainerArgs
from fulltune.train.exit_codes import TrainInputError, log_failure
from fulltune.train.throughput import mfu, model_flops_per_token, peak_flops

log = logging.getLogger("fulltune.train")
MODEL_MANIFEST = "model_manifest.json"


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
    if ds_config.get("bf16", {}).get("enabled"):
        dtype = torch.bfloat16
    elif ds_config.get("fp16", {}).get("enabled"):
        dtype = torch.float16
    else:
        dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, use_safetensors=True, trust_remote_code=cfg.model.trust_remote_code
    )
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
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


# -- evaluation and early stopping -----------------------------------------------------------------

EVAL_SPLIT = "domain_eval"


def check_eval_split(dataset_uri: str) -> None:
    """TrainInputError unless the dataset has a non-empty eval split (checked before any rendezvous)."""
    from fulltune.preprocess.dataset import load_manifest

    splits = load_manifest(dataset_uri)["splits"]
    if not splits.get(EVAL_SPLIT, {}).get("sequences"):
        raise TrainInputError(
            f"training.eval_steps is set but the dataset {dataset_uri} has no {EVAL_SPLIT} sequences: "
            "set data.eval_uri or preprocess.eval_fraction, or set training.eval_steps to 0"
        )


def token_loss_sum(engine, batch: dict[str, Any], idx, device) -> tuple[Any, Any]:
    """(summed next-token cross-entropy over the loss positions of sequences `idx`, their count), both
    tensors on the device (no host sync here: the training loop counts tokens before the forward)."""
    import torch.nn.functional as F

    from fulltune.preprocess.dataset import IGNORE_INDEX

    out = engine(
        input_ids=batch["input_ids"][idx].to(device), attention_mask=batch["attention_mask"][idx].to(device)
    )
    logits = out.logits[:, :-1].float()
    target = batch["labels"][idx][:, 1:].to(device)
    summed = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return summed, (target != IGNORE_INDEX).sum()


def eval_loss(engine, data: dict[str, Any], *, rank: int, world: int, micro_batch: int, device) -> float:
    """Token-mean loss over every sequence of `data`, the ranks sharing the work.

    Under ZeRO-3 each forward gathers parameters collectively, so every rank runs the same number of
    forwards: a rank with nothing left scores sequence 0 and discards the result.
    """
    import torch
    import torch.distributed as dist

    n = data["input_ids"].shape[0]
    per_round = micro_batch * world
    # On the device: NCCL reduces only device tensors, and no host sync per micro-batch.
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


@dataclass
class EarlyStopping:
    best_loss: float | None = None
    best_step: int | None = None
    evals: int = 0
    since_best: int = 0  # evaluations since the last improvement

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.since_best >= patience


def early_stopping_state(records: list[dict[str, Any]], threshold: float) -> EarlyStopping:
    """Replay the eval losses in the metrics records: an improvement is a drop of more than threshold."""
    st = EarlyStopping()
    for r in records:
        if r.get("eval_loss") is None:
            continue
        st.evals += 1
        if st.best_loss is None or st.best_loss - r["eval_loss"] > threshold:
            st.best_loss, st.best_step, st.since_best = r["eval_loss"], r["step"], 0
        else:
            st.since_best += 1
    return st


# -- train ----------------------------------------------------------------------------------------


def train(cfg: RunConfig, paths: TrainerArgs) -> dict[str, Any]:
    import deepspeed
    import torch
    import torch.distributed as dist

    from fulltune.plan import check_training
    from fulltune.preprocess.dataset import IGNORE_INDEX, load_split

    tr = cfg.training
    check_training(cfg)
    if tr.eval_steps:
        check_eval_split(paths.dataset)
    torch.manual_seed(tr.seed)
    rank, world, device = init_distributed(cfg)
    if rank == 0:
        log.info("process group ready: %d ranks (%s)", world, "gloo" if device.type == "cpu" else "nccl")
        if device.type == "cpu" and (tr.bf16 or tr.fp16):
            log.info(
                "accelerator is cpu: training.%s ignored, training in float32", "bf16" if tr.bf16 else "fp16"
            )
    ds_config = json.loads(storage.read_bytes(paths.deepspeed))
    ds_config["train_batch_size"] = tr.per_device_train_batch_size * tr.gradient_accumulation_steps * world

    data = load_split(paths.dataset, "train")
    n_seq, seq_len = data["input_ids"].shape
    sched = make_schedule(cfg, n_seq, world)
    eval_data = load_split(paths.dataset, EVAL_SPLIT) if tr.eval_steps else None

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
    sixteen_bit = ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" and sixteen_bit else None
    flops_tok = model_flops_per_token(engine.module, seq_len)
    if rank == 0:
        log.info(
            "training %d steps (%d per epoch, global batch %d sequences of %d tokens, %d ranks, %s)%s",
            sched.total_steps,
            sched.steps_per_epoch,
            sched.global_batch,
            seq_len,
            world,
            tr.optim,
            f"; evaluating on {eval_data['input_ids'].shape[0]} {EVAL_SPLIT} sequences every {tr.eval_steps} steps"
            if eval_data is not None
            else "",
        )

    b, gas = tr.per_device_train_batch_size, tr.gradient_accumulation_steps
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    first_step, records = resume(engine, paths, rank, local_rank)
    fault_step = int(os.environ.get("FULLTUNE_FAULT_AFTER_STEP", "-1"))
    stopper = early_stopping_state(records, tr.early_stopping_threshold)
    start = time.time()
    done = first_step
    for step in range(first_step, sched.total_steps):
        if stopper.should_stop(tr.early_stopping_patience):
            break
        t0 = time.time()
        idx = batch_indices(step, sched, tr.seed, n_seq)
        # Rank r takes micro-batches r, r+world, ... of the global batch.
        micro = [idx[(k * world + rank) * b : (k * world + rank + 1) * b] for k in range(gas)]
        # The reduced tensors live on the training device: NCCL (GPU) reduces device tensors only.
        counts = torch.tensor(
            [float(sum((data["labels"][m][:, 1:] != IGNORE_INDEX).sum().item() for m in micro))],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(counts)
        n_tokens = max(counts.item(), 1.0)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        for m in micro:
            summed, _ = token_loss_sum(engine, data, m, device)
            engine.backward(summed * (world * gas / n_tokens))
            engine.step()
            loss_sum += summed.detach().double()
        dist.all_reduce(loss_sum)
        loss = loss_sum.item() / n_tokens  # waits for the step's device work: step_time includes it
        step_time = time.time() - t0
        rec: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": _float(engine.get_global_grad_norm()),
            "tokens": int(n_tokens),
            "tokens_per_s": n_tokens / max(step_time, 1e-9),
            "step_time_s": step_time,
        }
        if device.type == "cuda":
            # peak since the process started: compare with the plan's per-GPU estimate
            rec["gpu_mem_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            rec["gpu_mem_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        if peak:
            # every position of the global batch is computed (packing leaves little padding)
            rec["mfu"] = mfu(sched.global_batch * seq_len / max(step_time, 1e-9), flops_tok, peak, world)
        done = step + 1
        if eval_data is not None and done % tr.eval_steps == 0:
            rec["eval_loss"] = eval_loss(
                engine, eval_data, rank=rank, world=world, micro_batch=b, device=device
            )
        records.append(rec)
        stopper = early_stopping_state(records, tr.early_stopping_threshold)
        stopping = stopper.should_stop(tr.early_stopping_patience)
        if (
            paths.checkpoints
            and tr.save_steps
            and done % tr.save_steps == 0
            and done < sched.total_steps
            and not stopping
        ):
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
        if rank == 0 and (
            step % tr.logging_steps == 0 or step == sched.total_steps - 1 or "eval_loss" in rec
        ):
            eta = (time.time() - start) / (step + 1 - first_step) * (sched.total_steps - step - 1)
            log.info(
                "step %d/%d loss %.4f lr %.3g grad_norm %s tok/s %.0f eta %.0fs%s%s%s",
                step + 1,
                sched.total_steps,
                rec["loss"],
                rec["lr"],
                _fmt(rec["grad_norm"]),
                rec["tokens_per_s"],
                eta,
                f" mfu {rec['mfu']:.1%}" if "mfu" in rec else "",
                f" peak mem {rec['gpu_mem_reserved_gib']:.1f} GiB" if "gpu_mem_reserved_gib" in rec else "",
                f" eval_loss {rec['eval_loss']:.4f}" if "eval_loss" in rec else "",
            )
        if stopping:
            if rank == 0:
                log.info(
                    "early stopping after step %d: %d evaluations without an eval-loss drop of more than %g "
                    "(best %.4f at step %d); saving the model as of step %d",
                    done,
                    stopper.since_best,
                    tr.early_stopping_threshold,
                    stopper.best_loss,
                    stopper.best_step + 1,
                    done,
                )
            break
    summary: dict[str, Any] = {
        "steps": records[-1]["step"] + 1 if records else done,
        "planned_steps": sched.total_steps,
        "stopped_early": stopper.should_stop(tr.early_stopping_patience),
        "global_batch": sched.global_batch,
        "world_size": world,
        "first_loss": records[0]["loss"],
        "final_loss": records[-1]["loss"],
        "train_seconds": time.time() - start,
    }
    if stopper.evals:
        summary["final_eval_loss"] = next(r["eval_loss"] for r in reversed(records) if "eval_loss" in r)
        summary["best_eval_loss"] = stopper.best_loss
        summary["best_eval_step"] = stopper.best_step + 1
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


def resume(engine, paths: TrainerArgs, rank: int, local_rank: int) -> tuple[int, list[dict[str, Any]]]:
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
    engine, cfg: RunConfig, paths: TrainerArgs, rank: int, records: list[dict[str, Any]], summary: dict
) -> None:
    """Consolidate the ZeRO-3 partitions (every rank takes part); rank 0 writes the model."""
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return
    from fulltune.hf import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="fulltune-model-") as tmp:
        out = Path(tmp)
        engine.module.save_pretrained(out, state_dict=state_dict, max_shard_size="5GB")
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
    paths = TrainerArgs.from_argv(argv)
    # Before the first CUDA allocation: the caching allocator with expandable segments left at most
    # ~20% of the allocated peak unused where the default left up to 45% (benchmarks/plan_memory.py);
    # plan's estimate assumes it. A value the user set wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        cfg = RunConfig.from_dict(_load_yaml(paths.config), source=paths.config)
        train(cfg, paths)
    except Exception as exc:  # noqa: BLE001 - every failure leaves with the exit code that says what to do
        return log_failure(exc)
    return 0


def _load_yaml(uri: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(storage.read_text(uri)) or {}


if __name__ == "__main__":
    sys.exit(main())
