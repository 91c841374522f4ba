"""benchmarks/fsdp2_step.py, the FSDP2 baseline of the GPU benchmark, as its CPU dry run: gloo, float32,
a tiny random Llama and a tiny fulltune dataset, under torchrun with 1 and 2 processes."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

from tiny_models import save_tiny_llama, tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fsdp2_step.py"
SEQ, VOCAB = 32, 128


@functools.cache
def _bench():
    """benchmarks/train_step.py (a script, not a package): its learnable token chains and its torchrun."""
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset(root: Path, n_seq: int) -> str:
    """A fulltune dataset as train_step.py's build_inputs writes one; every third sequence has its
    first 8 labels masked, so the ranks' micro-batches hold different numbers of loss tokens."""
    from fulltune import storage
    from fulltune.preprocess.core import Packed, ParquetSink
    from fulltune.preprocess.dataset import IGNORE_INDEX, MANIFEST_FORMAT

    packed = Packed()
    for i, row in enumerate(_bench().markov_tokens(n_seq, SEQ, VOCAB).tolist()):
        labels = [IGNORE_INDEX] * 8 + row[8:] if i % 3 == 0 else row
        packed.add(row, labels, SEQ, 0)
    sink = ParquetSink(str(root / "data" / "train-00000.parquet"))
    sink.write(packed)
    manifest = str(root / "data" / "dataset.json")
    storage.write_json(
        manifest,
        {
            "format": MANIFEST_FORMAT,
            "max_seq_len": SEQ,
            "pad_token_id": 0,
            "splits": {"train": {"sequences": n_seq, "files": [sink.close()]}},
        },
    )
    return manifest


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp2")
    config = tiny_llama_config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    model_dir = save_tiny_llama(root / "model", config=config)
    return {"root": root, "model_dir": str(model_dir), "dataset": _dataset(root, n_seq=24)}


def _run(inputs: dict, nproc: int, micro: int, name: str) -> dict:
    out = inputs["root"] / f"{name}.json"
    spec = {
        "model_dir": inputs["model_dir"],
        "dataset": inputs["dataset"],
        "micro": micro,
        "gas": 2,
        "steps": 3,
        "device": "cpu",
        "lr": 1e-2,
        "weight_decay": 0.1,
        "max_grad_norm": 1.0,
        "out": str(out),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # the benchmark's own torchrun (a free port; it exits with the ranks' output if they fail)
    _bench().torchrun(nproc, [str(SCRIPT), "--spec", json.dumps(spec)], env, timeout=300)
    return json.loads(out.read_text())


def test_fsdp2_step_cpu_two_ranks_match_one(inputs):
    two = _run(inputs, nproc=2, micro=2, name="two")
    assert two["world"] == 2 and two["profile"] is None and two["gpu_mem_reserved_gib"] is None
    assert two["tokens_per_step"] == 2 * 2 * 2 * SEQ
    assert len(two["losses"]) == len(two["times"]) == 3
    assert all(math.isfinite(x) for x in two["losses"] + two["grad_norms"])
    assert two["losses"][-1] < two["losses"][0]

    # One rank with the same global batch sees the same sequences: the same token-mean loss, and
    # the same gradient norm (which a missing or doubled factor of the world size would change).
    one = _run(inputs, nproc=1, micro=4, name="one")
    assert one["world"] == 1 and one["tokens_per_step"] == two["tokens_per_step"]
    assert one["losses"][0] == pytest.approx(two["losses"][0], rel=1e-5)
    assert one["grad_norms"][0] == pytest.approx(two["grad_norms"][0], rel=1e-4)
