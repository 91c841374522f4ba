"""Memory-plan accuracy: `plan`'s per-GPU estimate against what fulltune's training step really takes.

For one model shape (a random model, seeded, built from a config: no weights are downloaded) the
script sets up training exactly as `python -m fulltune.train` does — the DeepSpeed ZeRO-3 JSON that
`plan` writes, ZeRO-3 partitioning at model construction, bf16, fulltune's optimizer
(`build_optimizer`) and loss (`token_loss_sum`) — and then, for each micro batch size with and
without recomputation (gradient checkpointing), runs 2 optimizer steps on random tokens after
resetting the allocator's peak statistics. Per configuration it prints:

- plan: the estimate `plan` makes for that configuration (`estimate_memory`), with its components;
- allocated: `torch.cuda.max_memory_allocated` (tensors alive at the peak);
- device: the peak PyTorch reserved plus what else the process holds on the device (the CUDA
  context, NCCL and cuBLAS workspaces), i.e. what `nvidia-smi` would show at the peak;
- plan / device: above 1 means the plan was safe for that configuration.

One process per shape; run it twice to compare allocator settings (PYTORCH_CUDA_ALLOC_CONF):

    python benchmarks/plan_memory.py --shape llama-0.9b --json-out mem.json
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmarks/plan_memory.py --shape llama-0.9b

Needs a GPU for the measurements; on a CPU host (`--device cpu`, gloo, float32) it only runs the
same steps as a smoke test and prints the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30

# name: (hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings)
SHAPES = {
    "llama-0.9b": (2048, 16, 16, 8, 5461, 32000, False),  # the shape of train_step.py's GPU run
    "llama3-1b": (2048, 16, 32, 8, 8192, 128256, True),  # Llama 3.2 1B's shape: a 128k vocabulary, tied
    "wide-1.5b": (3072, 12, 24, 8, 8192, 50000, False),  # held out: not used to set the coefficients
    "tiny": (64, 2, 4, 2, 160, 4096, False),  # CPU smoke test
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-0.9b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro", default="1,2,4,8", help="micro batch sizes, comma-separated")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--assets", default=os.environ.get("FULLTUNE_TEST_ASSETS", "/tmp/fulltune-bench-assets"))
    p.add_argument("--json-out", default=None)
    return p


def single_rank_environment(device: str) -> None:
    """What `torchrun` would set for one rank, so that fulltune's `init_distributed` runs without it;
    and DeepSpeed's accelerator, before deepspeed is imported."""
    os.environ["DS_ACCELERATOR"] = device
    from fulltune.launch.local import free_port

    port = free_port()
    for key, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(port)),
    ):
        os.environ.setdefault(key, value)


def run_config(a: argparse.Namespace, work: Path, model_dir: Path):
    """fulltune's RunConfig for the shape's model in `model_dir`: every step an optimizer step."""
    import torch

    from fulltune.config import RunConfig
    from fulltune.demo.assets import build_demo_assets

    cuda = a.device == "cuda"
    assets = build_demo_assets(Path(a.assets))
    return RunConfig.from_dict(
        {
            "work_dir": str(work),
            "model": {"base_model_uri": str(model_dir), "tokenizer_uri": str(assets.base_model_dir)},
            "data": {"train_uri": str(assets.train_uri)},
            "preprocess": {"max_seq_len": a.seq},
            "training": {
                "learning_rate": 1e-5,
                "max_steps": 2,
                "per_device_train_batch_size": 1,  # every step is an optimizer step
                "gradient_accumulation_steps": 1,
                "bf16": cuda,
            },
            "resources": {
                "accelerator": "gpu" if cuda else "cpu",
                "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / GiB if cuda else 80.0,
            },
        }
    )


def build_engine(a: argparse.Namespace):
    """The shape's random model in fulltune's DeepSpeed engine, set up as `python -m fulltune.train`
    does: (engine, plan, device, the HfDeepSpeedConfig that must stay alive while the engine runs)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.integrations import HfDeepSpeedConfig

    from fulltune.plan import make_plan
    from fulltune.train.engine import build_optimizer, init_distributed

    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[a.shape]
    with tempfile.TemporaryDirectory(prefix="fulltune-plan-memory-") as tmp:
        model_dir = Path(tmp) / "model"
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            intermediate_size=inter,
            max_position_embeddings=a.seq,
            tie_word_embeddings=tied,
            pad_token_id=0,
        ).save_pretrained(model_dir)
        cfg = run_config(a, Path(tmp) / "work", model_dir)
        plan = make_plan(cfg, train_tokens=1_000_000)
        device = init_distributed(cfg).device
        ds_marker = HfDeepSpeedConfig(plan.deepspeed)  # ZeRO-3 partitioning while the model is built
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            LlamaConfig.from_pretrained(model_dir),
            dtype=torch.bfloat16 if a.device == "cuda" else torch.float32,
        )
        model.config.use_cache = False
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, cfg), config=plan.deepspeed
        )
    return engine, plan, device, ds_marker


def print_header(a: argparse.Namespace, params: int) -> None:
    hidden, layers, _, _, inter, vocab, tied = SHAPES[a.shape]
    print(
        f"shape {a.shape}: {params / 1e9:.3f}B parameters, hidden {hidden}, {layers} layers, "
        f"intermediate {inter}, vocabulary {vocab}{' (tied)' if tied else ''}; seq {a.seq}; "
        f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r}"
    )
    print(
        f"{'micro':>5} {'recompute':>9} {'plan GiB':>9} {'allocated':>9} {'device':>8} {'plan/device':>11}  plan parts"
    )


def measure_all(engine, plan, device, a: argparse.Namespace, micro_sizes: list[int]) -> list[dict]:
    """Each micro batch size without, then with recomputation: one row each (measure), printed as it comes."""
    import torch

    gen = torch.Generator().manual_seed(0)
    rows = []
    for gc in (False, True):
        if gc:
            engine.module.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            engine.module.gradient_checkpointing_disable()
        for b in micro_sizes:
            row = measure(engine, plan, device, a, b, gc, gen)
            rows.append(row)
            print_row(row, cuda=a.device == "cuda")
    return rows


def measure(engine, plan, device, a: argparse.Namespace, micro_batch: int, recompute: bool, gen) -> dict:
    """The plan's estimate for one configuration and (cuda) the peak memory of 2 optimizer steps on
    random tokens, the allocator's peak statistics reset first."""
    import torch

    from fulltune.plan import MEMORY_PARTS, estimate_memory
    from fulltune.train.loss import token_loss_sum

    _, _, _, _, _, vocab, _ = SHAPES[a.shape]
    cuda, b = a.device == "cuda", micro_batch
    est = estimate_memory(
        plan.shape, world_size=1, seq_len=a.seq, micro_batch=b, gradient_checkpointing=recompute
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        for _ in range(2):
            ids = torch.randint(3, vocab, (b, a.seq), generator=gen)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            summed, _ = token_loss_sum(engine, batch, torch.arange(b), device)
            engine.backward(summed / (b * a.seq))
            engine.step()
        oom = False
    except torch.OutOfMemoryError:
        oom = True
    row = {
        "micro_batch": b,
        "recompute": recompute,
        "plan": est.total,
        "plan_parts": {k: getattr(est, k) for k in MEMORY_PARTS},
        "oom": oom,
        "seconds": time.perf_counter() - t0,
    }
    if cuda:
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info(device)
        other = (total - free) - torch.cuda.memory_reserved(device)  # context, NCCL, cuBLAS
        row["allocated"] = torch.cuda.max_memory_allocated(device)
        row["reserved"] = torch.cuda.max_memory_reserved(device)
        row["device"] = row["reserved"] + other
    return row


def print_row(row: dict, cuda: bool) -> None:
    b, gc, plan = row["micro_batch"], row["recompute"], row["plan"]
    parts = " ".join(f"{k[:6]} {v / GiB:.2f}" for k, v in row["plan_parts"].items())
    if cuda:
        print(
            f"{b:5d} {str(gc):>9} {plan / GiB:9.2f} {row['allocated'] / GiB:9.2f} "
            f"{row['device'] / GiB:8.2f} {plan / row['device']:11.2f}  {parts}"
            + ("  OUT OF MEMORY" if row["oom"] else "")
        )
    else:
        print(f"{b:5d} {str(gc):>9} {plan / GiB:9.2f} {'n/a':>9} {'n/a':>8} {'n/a':>11}  {parts}")


def write_json(path: str, a: argparse.Namespace, params: int, device, rows: list[dict]) -> None:
    import torch

    out = {
        "shape": a.shape,
        "params": params,
        "seq": a.seq,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "device_name": torch.cuda.get_device_name(device) if a.device == "cuda" else "cpu",
        "rows": rows,
    }
    Path(path).write_text(json.dumps(out, indent=1))


def main() -> None:
    a = build_parser().parse_args()
    single_rank_environment(a.device)
    micro_sizes = [int(x) for x in a.micro.split(",")]
    engine, plan, device, ds_marker = build_engine(a)
    print_header(a, plan.shape.params)
    rows = measure_all(engine, plan, device, a, micro_sizes)
    del ds_marker
    if a.json_out:
        write_json(a.json_out, a, plan.shape.params, device, rows)
    sys.stdout.flush()
    os._exit(0)  # skip the process group teardown: one rank, nothing to flush


if __name__ == "__main__":
    main()
