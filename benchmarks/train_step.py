"""Training step time: fulltune's training loop vs a plain Hugging Face `Trainer`, same everything.

One run builds a small random Llama (seeded, saved with the demo tokenizer), random-token training
data written as a fulltune dataset, and one DeepSpeed ZeRO-3 config (fulltune's `plan` writes it).
Then, each in its own `torchrun` with the same number of processes on CPU (gloo):

- **fulltune**: `python -m fulltune.train` (the recipe: token-mean loss over the global batch,
  DeepSpeed engine, per-step metrics); the step time is its own `step_time_s` record;
- **hf_trainer**: `transformers.Trainer(args=TrainingArguments(deepspeed=<the same JSON>, ...))` on
  the same model files and the same sequences, same micro batch, accumulation, optimizer
  (torch AdamW), schedule and clipping; the step time is taken by a callback between
  `on_step_begin` and `on_step_end`.

The first `--warmup` steps of each are dropped; the script prints both medians and
fulltune / hf_trainer (the goal is <= 1.05). No network, no downloads:

    .venv/bin/python benchmarks/train_step.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_inputs(root: Path, a: argparse.Namespace) -> dict[str, str]:
    """Model (random Llama + the demo tokenizer), dataset manifest, resolved config and DeepSpeed JSON."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fulltune import storage
    from fulltune.config import RunConfig
    from fulltune.demo.assets import build_demo_assets
    from fulltune.plan import make_plan, write_plan
    from fulltune.preprocess.core import Packed, ParquetSink
    from fulltune.preprocess.dataset import MANIFEST_FORMAT

    assets = build_demo_assets(Path(a.assets))
    tok = AutoTokenizer.from_pretrained(str(assets.base_model_dir))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=a.hidden,
            intermediate_size=a.hidden * 8 // 3,
            num_hidden_layers=a.layers,
            num_attention_heads=a.hidden // 32,
            num_key_value_heads=a.hidden // 64,
            max_position_embeddings=a.seq,
            tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
        )
    )
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    global_batch = a.micro * a.gas * a.nproc
    n_seq = global_batch * (a.steps + 1)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, len(tok), size=(n_seq, a.seq)).tolist()
    packed = Packed()
    for row in ids:
        packed.add(row, row, a.seq, tok.pad_token_id)
    sink = ParquetSink(str(root / "data" / "train-00000.parquet"))
    sink.write(packed)
    dataset = str(root / "data" / "dataset.json")
    storage.write_json(
        dataset,
        {
            "format": MANIFEST_FORMAT,
            "max_seq_len": a.seq,
            "pad_token_id": tok.pad_token_id,
            "splits": {"train": {"sequences": n_seq, "files": [sink.close()]}},
        },
    )
    cfg = RunConfig.from_dict(
        {
            "work_dir": str(root / "work"),
            "model": {"base_model_uri": str(model_dir)},
            "data": {"train_uri": str(assets.train_uri)},
            "preprocess": {"max_seq_len": a.seq},
            "training": {
                "learning_rate": 1e-4,
                "max_steps": a.steps,
                "per_device_train_batch_size": a.micro,
                "gradient_accumulation_steps": a.gas,
                "warmup_ratio": 0.1,
                "bf16": False,
            },
            "resources": {"nproc_per_node": a.nproc, "accelerator": "cpu"},
        }
    )
    uris = write_plan(make_plan(cfg, train_tokens=n_seq * a.seq), str(root / "work"))
    return {
        "dataset": dataset,
        "config": uris["config"],
        "deepspeed": uris["deepspeed"],
        "model": str(model_dir),
    }


def torchrun(nproc: int, args: list[str], env: dict[str, str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def run_fulltune(
    root: Path, inputs: dict[str, str], a: argparse.Namespace, env: dict[str, str]
) -> list[float]:
    metrics = root / "fulltune-metrics.jsonl"
    torchrun(
        a.nproc,
        [
            "-m",
            "fulltune.train",
            "--config",
            inputs["config"],
            "--deepspeed",
            inputs["deepspeed"],
            "--dataset",
            inputs["dataset"],
            "--output",
            str(root / "fulltune-model"),
            "--metrics",
            str(metrics),
        ],
        env,
    )
    return [json.loads(line)["step_time_s"] for line in metrics.read_text().splitlines()]


def run_hf_trainer(
    root: Path, inputs: dict[str, str], a: argparse.Namespace, env: dict[str, str]
) -> list[float]:
    out = root / "hf-step-times.json"
    torchrun(
        a.nproc, [__file__, "--hf-worker", json.dumps({**inputs, "out": str(out), "root": str(root)})], env
    )
    info = json.loads(out.read_text())
    if info["zero_stage"] != 3:
        sys.exit(f"the HF Trainer did not run DeepSpeed ZeRO-3 (stage {info['zero_stage']}): not comparable")
    print(f"hf_trainer: DeepSpeed ZeRO-3, {info['threads']} torch threads per rank")
    return info["times"]


def hf_worker(spec: dict[str, str]) -> None:
    """One rank of the plain Trainer run (started by torchrun)."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from fulltune.preprocess.dataset import load_split

    tr = yaml.safe_load(open(spec["config"]))["training"]
    args = TrainingArguments(
        output_dir=str(Path(spec["root"]) / "hf-out"),
        deepspeed=spec["deepspeed"],  # before from_pretrained: ZeRO-3 partitions at load time
        per_device_train_batch_size=tr["per_device_train_batch_size"],
        gradient_accumulation_steps=tr["gradient_accumulation_steps"],
        max_steps=tr["max_steps"],
        learning_rate=tr["learning_rate"],
        lr_scheduler_type=tr["lr_scheduler_type"],
        warmup_steps=int(tr["warmup_ratio"] * tr["max_steps"]),
        weight_decay=tr["weight_decay"],
        adam_beta1=tr["adam_beta1"],
        adam_beta2=tr["adam_beta2"],
        adam_epsilon=tr["adam_epsilon"],
        max_grad_norm=tr["max_grad_norm"],
        optim="adamw_torch",
        seed=tr["seed"],
        bf16=False,
        fp16=False,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        logging_steps=1_000_000,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.config.use_cache = False
    data = load_split(spec["dataset"], "train")

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return data["input_ids"].shape[0]

        def __getitem__(self, i):
            return {k: data[k][i] for k in ("input_ids", "attention_mask", "labels")}

    class StepTimer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[timer])
    trainer.train()
    # The comparison is only fair if the Trainer really ran DeepSpeed ZeRO-3.
    stage = trainer.model_wrapped.zero_optimization_stage() if trainer.is_deepspeed_enabled else None
    if int(os.environ.get("RANK", "0")) == 0:
        info = {"times": timer.times, "zero_stage": stage, "threads": torch.get_num_threads()}
        Path(spec["out"]).write_text(json.dumps(info))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=1, help="processes (ranks) per run")
    p.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--repeats", type=int, default=1, help="runs of each trainer, interleaved")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=4, help="per-device micro batch")
    p.add_argument("--gas", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--assets", default=os.environ.get("FULLTUNE_TEST_ASSETS", "/tmp/fulltune-bench-assets"))
    p.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.hf_worker:
        hf_worker(json.loads(a.hf_worker))
        return

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cores = len(os.sched_getaffinity(0))
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // a.nproc)))
    with tempfile.TemporaryDirectory(prefix="fulltune-bench-train-") as tmp:
        root = Path(tmp)
        inputs = build_inputs(root, a)
        times: dict[str, list[float]] = {"fulltune": [], "hf_trainer": []}
        for _ in range(a.repeats):
            times["fulltune"] += run_fulltune(root, inputs, a, env)[a.warmup :]
            times["hf_trainer"] += run_hf_trainer(root, inputs, a, env)[a.warmup :]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"model: Llama hidden {a.hidden}, {a.layers} layers, seq {a.seq}; {a.nproc} rank(s) x micro batch "
        f"{a.micro} x accumulation {a.gas}; ZeRO-3 on CPU (gloo), float32, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    )
    for k, v in times.items():
        print(
            f"{k:11s} median step {med[k] * 1000:8.1f} ms  (n={len(v)}, min {min(v) * 1000:.1f}, max {max(v) * 1000:.1f})"
        )
    print(f"ratio fulltune / hf_trainer: {med['fulltune'] / med['hf_trainer']:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
