"""Evaluation throughput: the batched, length-sorted scoring of `fulltune.evaluate` vs a naive loop.

One run builds a small random Llama and two synthetic workloads, then times each way of scoring them
(median of `--repeats`) and prints tokens/s and the ratio:

- **loss**: `--sequences` right-padded sequences of `--seq-len` columns whose real lengths are
  spread between 1/8 and all of it (answers padded to `max_seq_len`, as preprocess writes them);
  naive = one sequence at a time over the full padded row (what `evaluate` did before);
  batched = `sequence_loss(batch_size=--batch-size)` (sorted by length, trailing padding cut);
- **mc**: `--questions` multiple-choice questions of 4 choices with questions and choices of
  varied length; naive = one (question, choice) at a time in file order; batched =
  `mc.loglikelihoods(batch_size=--batch-size)` (sorted by length).

Tokens are real (attended) tokens, the same count for both ways. Both ways give the same numbers
(checked). No network, no downloads:

    .venv/bin/python benchmarks/eval_throughput.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fulltune.evaluate import mc
from fulltune.evaluate.core import sequence_loss
from fulltune.preprocess.dataset import IGNORE_INDEX


def build_model(vocab: int, seq_len: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=max(seq_len, 512),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def loss_data(n: int, seq_len: int, vocab: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    ids = rng.integers(3, vocab, size=(n, seq_len))
    lengths = rng.integers(seq_len // 8, seq_len + 1, size=n)
    cols = np.arange(seq_len)[None, :]
    mask = cols < lengths[:, None]
    ids = np.where(mask, ids, 0)
    labels = np.where(mask & (cols >= lengths[:, None] // 4), ids, IGNORE_INDEX)  # a masked prompt
    return {
        "input_ids": torch.from_numpy(ids).long(),
        "labels": torch.from_numpy(labels).long(),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
    }


def naive_loss(model, data) -> float:
    """Per sequence, the full padded row, batch size 1: the loop one writes first."""
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for i in range(data["input_ids"].shape[0]):
            ids, labels = data["input_ids"][i : i + 1], data["labels"][i : i + 1]
            logits = model(input_ids=ids, attention_mask=data["attention_mask"][i : i + 1]).logits
            shift = labels[:, 1:]
            mask = shift != IGNORE_INDEX
            total += float(
                torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), shift[mask], reduction="sum")
            )
            tokens += int(mask.sum())
    return total / tokens


def mc_requests(questions: int, vocab: int, rng: np.random.Generator) -> list[mc.Request]:
    out = []
    for q in range(questions):
        context = [1, *rng.integers(3, vocab, size=int(rng.integers(8, 96))).tolist()]
        for c in range(4):
            choice = rng.integers(3, vocab, size=int(rng.integers(1, 24))).tolist()
            out.append(mc.Request(q, c, tuple(context + choice), len(choice)))
    return out


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    model = build_model(args.vocab, args.seq_len)
    data = loss_data(args.sequences, args.seq_len, args.vocab, rng)
    requests = mc_requests(args.questions, args.vocab, rng)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} repeats")

    loss_tokens = int(data["attention_mask"].sum())
    t_naive, naive = timed(lambda: naive_loss(model, data), args.repeats)
    t_batched, batched = timed(
        lambda: sequence_loss(model, data, batch_size=args.batch_size).loss, args.repeats
    )
    assert abs(naive - batched) < 1e-4, (naive, batched)
    print(
        f"loss: {loss_tokens} tokens; naive {loss_tokens / t_naive:,.0f} tok/s, "
        f"batched {loss_tokens / t_batched:,.0f} tok/s, ratio {t_naive / t_batched:.2f}x"
    )

    mc_tokens = sum(len(r.tokens) - 1 for r in requests)
    t_naive_mc, naive_ll = timed(
        lambda: [mc.loglikelihoods(model, [r], batch_size=1)[0] for r in requests], args.repeats
    )
    t_batched_mc, batched_ll = timed(
        lambda: mc.loglikelihoods(model, requests, batch_size=args.batch_size), args.repeats
    )
    assert np.allclose(naive_ll, batched_ll, atol=1e-3)
    print(
        f"mc:   {mc_tokens} tokens; naive {mc_tokens / t_naive_mc:,.0f} tok/s, "
        f"batched {mc_tokens / t_batched_mc:,.0f} tok/s, ratio {t_naive_mc / t_batched_mc:.2f}x"
    )


if __name__ == "__main__":
    main()
