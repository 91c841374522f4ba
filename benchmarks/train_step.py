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

On a GPU host (`--device cuda`: NCCL, bf16) it also prints fulltune's model FLOPs utilisation, the
peak GPU memory of both against the plan's per-GPU estimate, and with `--numerics` a float32 run of
fulltune on the same initial weights and batches, to hold the bf16 loss curve against:

    python benchmarks/train_step.py --device cuda --hidden 2048 --layers 16 --head-dim 128 \
        --vocab 32000 --seq 2048 --micro 4 --gas 2 --numerics

Three other modes compare fulltune with itself, interleaved: `--report-to-overhead` (TensorBoard and
MLflow against no reporting), `--recompute-cost` (activations kept, half of the layers recomputed,
all recomputed) and `--save-clock-cost` (checkpoints by the clock, whose decision is a collective on
every step, against checkpoints by step count; timed per loop iteration, `benchmarks/timed_trainer.py`).

The training data is a seeded Markov chain over the vocabulary (each token's successor is drawn
from 4 choices), so the loss falls within a few steps and the two precisions have a curve to agree on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fulltune.launch.local import environment_path, free_port


def markov_tokens(n_seq: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Seeded sequences where each token is followed by one of 4 fixed successors: learnable quickly."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(3, vocab, size=(vocab, 4))
    out = np.empty((n_seq, seq), dtype=np.int64)
    out[:, 0] = rng.integers(3, vocab, size=n_seq)
    choice = rng.integers(0, 4, size=(n_seq, seq))
    for t in range(1, seq):
        out[:, t] = successors[out[:, t - 1], choice[:, t]]
    return out


def build_inputs(root: Path, a: argparse.Namespace, bf16: bool = False, tag: str = "") -> dict[str, str]:
    """Model (random Llama + the demo tokenizer), dataset manifest, resolved config and DeepSpeed JSON.
    A second call with another `tag` reuses the model and data and writes another plan."""
    from fulltune.demo.assets import build_demo_assets

    assets = build_demo_assets(Path(a.assets))
    model_dir = root / "model"
    documents = getattr(a, "documents", 1)
    data_dir = root / ("data" if documents == 1 else f"data-{documents}-docs")
    dataset = str(data_dir / "dataset.json")
    if not (model_dir / "config.json").exists():
        save_random_llama(model_dir, a, assets.base_model_dir)
    if not Path(dataset).exists():
        model_config = json.loads((model_dir / "config.json").read_text())
        write_markov_dataset(data_dir, a, model_config.get("pad_token_id"), model_config["vocab_size"])
    n_seq = json.loads(Path(dataset).read_text())["splits"]["train"]["sequences"]
    plan, layout = write_run_plan(root / f"work{tag}", a, model_dir, assets.train_uri, n_seq, bf16)
    return {
        "dataset": dataset,
        "config": layout.resolved_config,
        "deepspeed": layout.deepspeed_config,
        "model": str(model_dir),
        "plan_memory": json.dumps(plan.to_json()["memory"]),
        "params": str(plan.shape.params),
    }


def save_random_llama(model_dir: Path, a: argparse.Namespace, tokenizer_dir: Path) -> None:
    """A seeded random Llama of the run's shape, saved with the demo tokenizer in `model_dir` (its
    config carries the pad token id and the vocabulary size the dataset is written with)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cuda = a.device == "cuda"
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = max(a.vocab or 0, len(tok))  # the embedding may have more rows than the tokenizer has tokens
    torch.manual_seed(0)
    heads = a.hidden // a.head_dim
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=a.hidden,
                intermediate_size=getattr(a, "intermediate", None) or a.hidden * 8 // 3,
                num_hidden_layers=a.layers,
                num_attention_heads=heads,
                num_key_value_heads=getattr(a, "kv_heads", None) or max(1, heads // 2),
                max_position_embeddings=a.seq,
                tie_word_embeddings=getattr(a, "tied", False),
                pad_token_id=tok.pad_token_id,
            )
        )
    if cuda:
        model.to(torch.bfloat16)  # what training loads; half the bytes to write and read
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    if cuda:
        torch.cuda.empty_cache()  # the training runs are other processes: leave them the memory


def write_markov_dataset(data_dir: Path, a: argparse.Namespace, pad_token_id: int, vocab: int) -> None:
    """The training sequences (`markov_tokens`) as a fulltune dataset: one Parquet file and the
    manifest `dataset.json` in `data_dir`. `--sequences` of them where given, else enough for
    `--steps` + 1 optimizer steps of every rank; each row `a.documents` documents of equal length
    (position ids restarting at each), as packing leaves real data."""
    from fulltune import storage
    from fulltune.preprocess.core import Packed, ParquetSink
    from fulltune.preprocess.dataset import MANIFEST_FORMAT

    n_seq = getattr(a, "sequences", None) or a.micro * a.gas * a.nproc * (a.steps + 1)
    packed = Packed()
    length = a.seq // getattr(a, "documents", 1)
    starts = [i % length == 0 for i in range(a.seq)]
    for row in markov_tokens(n_seq, a.seq, vocab).tolist():
        packed.add(row, row, a.seq, pad_token_id, starts=starts)
    sink = ParquetSink(str(data_dir / "train-00000.parquet"))
    sink.write(packed)
    storage.write_json(
        str(data_dir / "dataset.json"),
        {
            "format": MANIFEST_FORMAT,
            "max_seq_len": a.seq,
            "pad_token_id": pad_token_id,
            "splits": {"train": {"sequences": n_seq, "files": [sink.close()]}},
        },
    )


def write_run_plan(
    work: Path, a: argparse.Namespace, model_dir: Path, train_uri: str, n_seq: int, bf16: bool
):
    """fulltune's `plan` for this run, written under `work`: (the plan, its files' layout)."""
    from fulltune.config import RunConfig
    from fulltune.plan import make_plan, write_plan

    cuda = a.device == "cuda"
    gpu_gib = 80.0
    if cuda:
        import torch

        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    cfg = RunConfig.from_dict(
        {
            "work_dir": str(work),
            "model": {"base_model_uri": str(model_dir)},
            "data": {"train_uri": str(train_uri)},
            "preprocess": {"max_seq_len": a.seq},
            "training": {
                "learning_rate": 1e-4,
                "max_steps": a.steps,
                "per_device_train_batch_size": a.micro,
                "gradient_accumulation_steps": a.gas,
                "warmup_ratio": 0.1,
                "bf16": bf16,
                **getattr(a, "training", {}),
            },
            "resources": {
                "nproc_per_node": a.nproc,
                "accelerator": "gpu" if cuda else "cpu",
                "gpu_memory_gib": gpu_gib,
            },
        }
    )
    plan = make_plan(cfg, train_tokens=n_seq * a.seq)
    return plan, write_plan(plan)


def torchrun(nproc: int, args: list[str], env: dict[str, str], timeout: float | None = None) -> str:
    """Run `args` under torchrun; its stdout and stderr, or exit with them if it fails."""
    port = free_port()  # below the ephemeral range: a GPU slot must not lose a run to a taken port
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        *args,
    ]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stdout, stderr = stop_torchrun(proc)
            sys.exit(f"{' '.join(cmd)} ran past {timeout:.0f} s:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return stdout + stderr


def stop_torchrun(proc: subprocess.Popen, grace_s: float = 45.0) -> tuple[str, str]:
    """Stop a torchrun that ran out of time, its ranks with it; (its stdout, its stderr). The ranks run
    in sessions of their own, so killing torchrun alone would leave them running, holding the GPU
    under the next run's measurement. On SIGTERM torchrun stops them (SIGTERM, then SIGKILL after
    30 s); SIGKILL for torchrun itself only if it has not exited after `grace_s`."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
    try:  # a rank that outlived torchrun still holds the pipes: do not wait for it
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        return "", ""


def run_fulltune(
    root: Path,
    inputs: dict[str, str],
    a: argparse.Namespace,
    env: dict[str, str],
    tag: str = "",
    entry: list[str] = ("-m", "fulltune.train"),
    timeout: float | None = None,
    log: Path | None = None,
) -> list[dict]:
    """One `python -m fulltune.train` run (or another `entry` that takes the trainer's arguments);
    its per-step metrics records."""
    from fulltune.train.args import TrainerArgs

    metrics = root / f"fulltune{tag}-metrics.jsonl"
    metrics.unlink(missing_ok=True)
    args = TrainerArgs(
        config=inputs["config"],
        deepspeed=inputs["deepspeed"],
        dataset=inputs["dataset"],
        output=str(root / f"fulltune{tag}-model"),
        metrics=str(metrics),
    )
    output = torchrun(a.nproc, [*entry, *args.to_argv()], env, timeout)
    if log:
        log.write_text(output)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def run_hf_trainer(
    root: Path,
    inputs: dict[str, str],
    a: argparse.Namespace,
    env: dict[str, str],
    timeout: float | None = None,
) -> dict:
    """One Trainer run: {"times": per-step seconds, "losses", "gpu_mem_reserved_gib": peak or None, ...}."""
    out = root / "hf-step-times.json"
    spec = {**inputs, "out": str(out), "root": str(root), "device": a.device}
    torchrun(a.nproc, [__file__, "--hf-worker", json.dumps(spec)], env, timeout)
    info = json.loads(out.read_text())
    if info["zero_stage"] != 3:
        sys.exit(f"the HF Trainer did not run DeepSpeed ZeRO-3 (stage {info['zero_stage']}): not comparable")
    print(f"hf_trainer: DeepSpeed ZeRO-3, {info['threads']} torch threads per rank")
    return info


def hf_worker(spec: dict[str, str]) -> None:
    """One rank of the plain Trainer run (started by torchrun)."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, Trainer

    from fulltune.preprocess.dataset import load_split

    tr = yaml.safe_load(open(spec["config"]))["training"]
    cuda = spec["device"] == "cuda"
    args = trainer_arguments(spec, tr)  # before from_pretrained: ZeRO-3 partitions at load time
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"],
        dtype=torch.bfloat16 if cuda else torch.float32,
        attn_implementation=tr.get("attn_implementation", "sdpa"),
    )
    model.config.use_cache = False
    rows = split_rows(load_split(spec["dataset"], "train"))
    timer = step_timer(cuda)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer])
    trainer.train()
    # The comparison is only fair if the Trainer really ran DeepSpeed ZeRO-3.
    stage = trainer.model_wrapped.zero_optimization_stage() if trainer.is_deepspeed_enabled else None
    if int(os.environ.get("RANK", "0")) == 0:
        info = {
            "times": timer.times,
            "losses": timer.losses,
            "zero_stage": stage,
            "threads": torch.get_num_threads(),
            "gpu_mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "gpu_mem_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        }
        Path(spec["out"]).write_text(json.dumps(info))


def trainer_arguments(spec: dict[str, str], tr: dict):
    """The Trainer's `TrainingArguments`: fulltune's resolved training settings `tr` and its DeepSpeed JSON."""
    from transformers import TrainingArguments

    from fulltune.train import liger
    from fulltune.train.engine import import_deepspeed, without_shared_memory_allreduce

    cuda = spec["device"] == "cuda"
    if not cuda:  # the process group fulltune's trainer starts on CPU (TrainingArguments starts it)
        without_shared_memory_allreduce(import_deepspeed())
    return TrainingArguments(
        output_dir=str(Path(spec["root"]) / "hf-out"),
        deepspeed=spec["deepspeed"],
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
        # torch's AdamW as fulltune's build_optimizer takes it: the fused kernel on GPU (also the
        # Trainer's own default since torch 2.8), the single-tensor one on CPU
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        # the kernels plan chose, with the switches fulltune sets (the loss stays the model's own)
        use_liger_kernel=bool(tr.get("use_liger_kernel")),
        liger_kernel_config=dict(liger.KERNELS),
        seed=tr["seed"],
        bf16=cuda,  # must match the DeepSpeed JSON's bf16.enabled (plan enables it on GPU)
        fp16=False,
        use_cpu=not cuda,
        save_strategy="no",
        report_to=[],
        logging_steps=1,  # the loss of every step, as fulltune records it (one host sync each, as there)
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def split_rows(data: dict):
    """A loaded split (`load_split`) as the torch Dataset of per-sequence rows the Trainer takes."""
    import torch

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return data["input_ids"].shape[0]

        def __getitem__(self, i):
            return {k: data[k][i] for k in ("input_ids", "attention_mask", "labels")}

    return Rows()


def step_timer(cuda: bool):
    """A Trainer callback that keeps each step's seconds (`.times`, between `on_step_begin` and
    `on_step_end`) and each logged loss (`.losses`)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()  # fulltune's step time includes the device work too
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    return StepTimer()


TIMED_TRAINER = Path(__file__).with_name("timed_trainer.py")
MLFLOW = Path(sys.executable).with_name("mlflow")  # the environment's own `mlflow` command


def report_to_overhead(a: argparse.Namespace, env: dict[str, str], result: dict) -> None:
    """Step time of fulltune reporting every step, to TensorBoard and to an MLflow server on localhost
    (started here; skipped when mlflow is not installed), against not reporting; interleaved."""
    variants = {
        v: {"report_to": [v], "logging_steps": 1}
        for v in ["none", "tensorboard"] + (["mlflow"] if MLFLOW.exists() else [])
    }
    with (
        tempfile.TemporaryDirectory(prefix="fulltune-bench-report-") as tmp,
        _mlflow_server(Path(tmp), "mlflow" in variants) as tracking_uri,
    ):
        run_env = {**env, "MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else env
        med = time_variants(a, run_env, Path(tmp), variants)
    for k, ratio in ratios_to_none(a, med, result).items():
        print(f"ratio {k} / none: {ratio:.3f}  (goal <= 1.03)")


def recompute_cost(a: argparse.Namespace, env: dict[str, str], result: dict) -> None:
    """Step time of fulltune keeping every layer's activations, recomputing half of the layers
    (selective) and recomputing all of them; interleaved. Each recomputed layer runs its forward
    again, about a third of its forward-and-backward, so r of L layers should cost about 1 + r / 3L
    (less where the layers are not all of the step's compute)."""
    half = max(1, a.layers // 2)
    variants = {
        "none": {},
        f"{half}-of-{a.layers}": {"gradient_checkpointing_layers": half},
        "all": {"gradient_checkpointing": True},
    }
    with tempfile.TemporaryDirectory(prefix="fulltune-bench-recompute-") as tmp:
        med = time_variants(a, env, Path(tmp), variants)
    ratios = ratios_to_none(a, med, result)
    for (k, ratio), layers in zip(ratios.items(), (half, a.layers), strict=True):
        print(f"ratio {k} / none: {ratio:.3f}  (about {1 + layers / (3 * a.layers):.3f} expected)")


def save_clock_cost(a: argparse.Namespace, env: dict[str, str], result: dict) -> None:
    """Wall time per loop iteration of fulltune checkpointing by the clock (save_every_minutes set and
    never reached: rank 0's clock is broadcast after every step and nothing is saved) against
    checkpointing by step count only (no collective); interleaved. The trainer's step_time_s ends
    before the broadcast, so each iteration is timed from one step's end to the next."""
    if a.nproc < 2:
        sys.exit("--save-clock-cost measures a collective between ranks: run it with --nproc 2 or more")
    variants = {"none": {"save_steps": 0}, "clock": {"save_steps": 0, "save_every_minutes": 1e6}}
    with tempfile.TemporaryDirectory(prefix="fulltune-bench-clock-") as tmp:
        med = time_variants(a, env, Path(tmp), variants, per_iteration=True)
    for k, ratio in ratios_to_none(a, med, result).items():
        print(f"ratio {k} / none: {ratio:.3f}  (goal <= 1.01)")


def ratios_to_none(a: argparse.Namespace, med: dict[str, float], result: dict) -> dict[str, float]:
    """Each variant's median step over the "none" variant's; with the medians, into `result` and
    --json-out."""
    ratios = {k: m / med["none"] for k, m in med.items() if k != "none"}
    result.update({"median_step_s": med, "ratio": ratios})
    write_result(a, result)
    return ratios


def write_result(a: argparse.Namespace, result: dict) -> None:
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2))


def time_variants(
    a: argparse.Namespace, env: dict[str, str], root: Path, variants: dict, per_iteration: bool = False
) -> dict[str, float]:
    """Median step time of fulltune under each variant's training settings, the runs interleaved
    (`--repeats` rounds) so that the machine's drift falls on all of them alike. `per_iteration`:
    the whole loop iteration's wall time (`loop_times`) instead of the trainer's step_time_s."""
    inputs = {}
    for name, training in variants.items():
        a.training = training
        inputs[name] = build_inputs(root, a, tag=f"-{name}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(a.repeats):
        for name in variants:
            if per_iteration:
                times[name] += loop_times(root, inputs[name], a, env, tag=f"-{name}")[a.warmup :]
                continue
            run = run_fulltune(root, inputs[name], a, env, tag=f"-{name}")
            times[name] += [r["step_time_s"] for r in run[a.warmup :]]
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:11s} median step {med[k] * 1000:8.1f} ms  (n={len(v)})")
    return med


def loop_times(root: Path, inputs: dict[str, str], a: argparse.Namespace, env: dict[str, str], tag: str):
    """One fulltune run under `benchmarks/timed_trainer.py`: the wall time of each loop iteration
    from the second step on (one step's end to the next), in seconds."""
    out = root / f"loop{tag}.jsonl"
    out.unlink(missing_ok=True)
    run_fulltune(root, inputs, a, {**env, "LOOP_TIMES_OUT": str(out)}, tag=tag, entry=[str(TIMED_TRAINER)])
    return [json.loads(line)["loop_s"] for line in out.read_text().splitlines()]


@contextlib.contextmanager
def _mlflow_server(root: Path, wanted: bool):
    """`mlflow server` on a free localhost port (sqlite, local artifacts) while the block runs; yields
    its URI, or None when not wanted."""
    if not wanted:
        yield None
        return
    port = free_port()
    command = [
        str(MLFLOW),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        str(root / "mlflow-artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # without MLflow's job execution, as the tests' server (tests/conftest.py): its job runner and
    # queue consumers would poll beside the training this measures
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.25)
        else:
            raise SystemExit("mlflow server did not come up in 60 s")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _attempt(what: str, fn):
    """fn(), or None after printing why it failed: one failed comparison run keeps the others' figures."""
    try:
        return fn()
    except SystemExit as exc:
        print(f"{what} failed: {exc}", file=sys.stderr)
        return None


class TrainerComparison(NamedTuple):
    """What the fulltune and Trainer runs of the default mode leave to report. (Not a dataclass:
    that fails where the script is loaded without a sys.modules entry, as tests/test_fsdp2_step.py does.)"""

    inputs: dict[str, str]  # build_inputs' answer for the bf16 (GPU) or float32 (CPU) runs
    records: list[dict]  # fulltune's step records past the warmup steps, every repeat
    hf: list[dict]  # each Trainer run's info (run_hf_trainer); failed runs left out
    first: list[dict]  # every step of the first fulltune run, for the precision comparison
    fp32: list[dict] | None  # the float32 fulltune run (--numerics on cuda); empty or None if none


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cpu: gloo, float32; cuda: NCCL, bf16"
    )
    p.add_argument("--nproc", type=int, default=1, help="processes (ranks) per run")
    p.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--repeats", type=int, default=1, help="runs of each trainer, interleaved")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32, help="attention head size (heads = hidden / head_dim)")
    p.add_argument("--vocab", type=int, default=0, help="embedding rows (default: the demo tokenizer's size)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=4, help="per-device micro batch")
    p.add_argument("--gas", type=int, default=2, help="gradient accumulation steps")
    p.add_argument(
        "--numerics", action="store_true", help="(cuda) also a float32 fulltune run: bf16 vs fp32 loss"
    )
    p.add_argument(
        "--report-to-overhead",
        action="store_true",
        help="instead of the Trainer: fulltune with training.report_to tensorboard, and mlflow to a local "
        "server, logging every step, vs none, interleaved; prints each / none (the goal is <= 1.03)",
    )
    p.add_argument(
        "--recompute-cost",
        action="store_true",
        help="instead of the Trainer: fulltune keeping all activations, recomputing half of the layers "
        "(training.gradient_checkpointing_layers) and all of them, interleaved; prints each / none",
    )
    p.add_argument(
        "--save-clock-cost",
        action="store_true",
        help="instead of the Trainer: fulltune checkpointing by the clock (training.save_every_minutes, "
        "never reached) vs by step count, each loop iteration timed, interleaved; needs --nproc >= 2",
    )
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    p.add_argument("--assets", default=os.environ.get("FULLTUNE_TEST_ASSETS", "/tmp/fulltune-bench-assets"))
    p.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    return p


def rank_environment(a: argparse.Namespace) -> dict[str, str]:
    """The environment of the torchrun ranks: offline, DeepSpeed on `--device`, the cores shared
    out between the ranks unless OMP_NUM_THREADS is set."""
    env = {
        **os.environ,
        "PATH": environment_path(os.environ.get("PATH", "")),  # the ranks build DeepSpeed's op as tests do
        "DS_ACCELERATOR": a.device,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cores = len(os.sched_getaffinity(0))
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // a.nproc)))
    if a.device == "cpu":
        # as DeepSpeed's own launcher sets it, for the Trainer too (fulltune's trainer sets it itself):
        # without it DeepSpeed's CPU accelerator forks `numactl` on every gradient bucket
        env.setdefault("LOCAL_SIZE", str(a.nproc))
    return env


def run_fulltune_and_trainer(a: argparse.Namespace, env: dict[str, str]) -> TrainerComparison:
    """`--repeats` rounds of one fulltune run and one Trainer run, then (--numerics on cuda) fulltune
    in float32 on the same initial weights and data."""
    cuda = a.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="fulltune-bench-train-") as tmp:
        root = Path(tmp)
        inputs = build_inputs(root, a, bf16=cuda)
        records: list[dict] = []
        hf: list[dict] = []
        first: list[dict] = []
        for _ in range(a.repeats):
            run = run_fulltune(root, inputs, a, env)
            first = first or run
            records += run[a.warmup :]
            info = _attempt("the Trainer run", lambda: run_hf_trainer(root, inputs, a, env))
            if info:
                hf.append(info)
        fp32: list[dict] | None = []
        if cuda and a.numerics:
            fp32 = _attempt(
                "the float32 run",
                lambda: run_fulltune(
                    root, build_inputs(root, a, bf16=False, tag="-fp32"), a, env, tag="-fp32"
                ),
            )
    return TrainerComparison(inputs, records, hf, first, fp32)


def report_step_times(
    a: argparse.Namespace, env: dict[str, str], runs: TrainerComparison, result: dict
) -> dict[str, float]:
    """Print the model, both trainers' step times and their ratio, add them to `result`; the medians."""
    times = {
        "fulltune": [r["step_time_s"] for r in runs.records],
        "hf_trainer": [t for h in runs.hf for t in h["times"][a.warmup :]],
    }
    med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    precision = "bf16, NCCL" if a.device == "cuda" else "float32, CPU (gloo)"
    params = int(runs.inputs["params"])
    print(
        f"model: Llama {params / 1e6:.1f}M parameters, hidden {a.hidden}, {a.layers} layers, "
        f"seq {a.seq}; {a.nproc} rank(s) x micro batch {a.micro} x accumulation {a.gas}; ZeRO-3, {precision}, "
        f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    )
    for k, v in times.items():
        if not v:  # its runs failed (printed above, `_attempt`): the other's figures still stand
            print(f"{k:11s} no timed steps (its runs failed)")
            continue
        print(
            f"{k:11s} median step {med[k] * 1000:8.1f} ms  (n={len(v)}, min {min(v) * 1000:.1f}, max {max(v) * 1000:.1f})"
        )
    ratio = med["fulltune"] / med["hf_trainer"]
    print(f"ratio fulltune / hf_trainer: {ratio:.3f}  (goal <= 1.05)")
    result.update({"params": params, "median_step_s": med, "ratio": ratio})
    return med


def report_gpu(a: argparse.Namespace, runs: TrainerComparison, med: dict[str, float], result: dict) -> None:
    """Print (and add to `result`) the GPU figures: throughput, fulltune's MFU, the plan's per-GPU
    memory estimate against both trainers' measured peaks."""
    import torch

    from fulltune.plan import MEMORY_PARTS

    records, gib = runs.records, 2**30
    result["device_name"] = torch.cuda.get_device_name(0)
    tokens = a.micro * a.gas * a.nproc * a.seq
    mfus = [r["mfu"] for r in records if "mfu" in r]
    plan = json.loads(runs.inputs["plan_memory"])
    ours = max(r.get("gpu_mem_reserved_gib", 0.0) for r in records)
    ours_alloc = max(r.get("gpu_mem_allocated_gib", 0.0) for r in records)
    theirs = max((h["gpu_mem_reserved_gib"] for h in runs.hf), default=float("nan"))
    print(
        f"device: {result['device_name']}; {tokens:,} tokens per step: fulltune "
        f"{tokens / med['fulltune']:,.0f} tok/s, Trainer {tokens / med['hf_trainer']:,.0f} tok/s"
    )
    if mfus:
        print(
            f"fulltune MFU: median {statistics.median(mfus):.1%} (min {min(mfus):.1%}, max {max(mfus):.1%})"
        )
    print(
        "plan per GPU: "
        + ", ".join(f"{k} {plan[k] / gib:.2f}" for k in MEMORY_PARTS)
        + f" -> total {plan['total'] / gib:.2f} GiB (micro batch {plan['micro_batch']}, "
        f"recomputation {plan['gradient_checkpointing']})"
    )
    print(
        f"measured peak: fulltune reserved {ours:.2f} GiB (allocated {ours_alloc:.2f}), Trainer reserved "
        f"{theirs:.2f} GiB; plan total / fulltune reserved {plan['total'] / gib / ours:.2f}, plan without "
        f"the fixed overhead / allocated {(plan['total'] - plan['overhead']) / gib / ours_alloc:.2f}"
    )
    result.update(
        {
            "mfu": mfus,
            "plan_memory": plan,
            "fulltune_mem_reserved_gib": ours,
            "fulltune_mem_allocated_gib": ours_alloc,
            "hf_mem_reserved_gib": theirs,
            "losses_bf16": {r["step"]: r["loss"] for r in runs.first},
        }
    )


def report_numerics(a: argparse.Namespace, runs: TrainerComparison, result: dict) -> None:
    """Print (and add to `result`) the bf16 loss curve against the float32 run's, step by step."""
    bf = {r["step"]: r["loss"] for r in runs.first}
    fp32 = runs.fp32
    diffs = [abs(bf[r["step"]] - r["loss"]) / r["loss"] for r in fp32 if r["step"] in bf]
    print("step  loss bf16  loss fp32")
    for r in fp32:
        if r["step"] in bf:
            print(f"{r['step']:4d}  {bf[r['step']]:9.4f}  {r['loss']:9.4f}")
    print(f"bf16 vs fp32 loss: max relative difference {max(diffs):.2%}, mean {statistics.mean(diffs):.2%}")
    result.update(
        {
            "losses_fp32": {r["step"]: r["loss"] for r in fp32},
            "fp32_step_s": statistics.median([r["step_time_s"] for r in fp32[a.warmup :]]),
        }
    )


def main() -> None:
    a = build_parser().parse_args()
    if a.hf_worker:
        from fulltune._process import exit_now

        hf_worker(json.loads(a.hf_worker))
        exit_now(0)  # as fulltune's ranks leave: the interpreter's teardown can abort a finished gloo rank
    env = rank_environment(a)
    result: dict = {"args": {k: v for k, v in vars(a).items() if k != "hf_worker"}}
    if a.report_to_overhead:
        report_to_overhead(a, env, result)
        return
    if a.recompute_cost:
        recompute_cost(a, env, result)
        return
    if a.save_clock_cost:
        save_clock_cost(a, env, result)
        return
    runs = run_fulltune_and_trainer(a, env)
    med = report_step_times(a, env, runs, result)
    if a.device == "cuda":
        report_gpu(a, runs, med, result)
        if runs.fp32:
            report_numerics(a, runs, result)
    write_result(a, result)


if __name__ == "__main__":
    main()
