"""Evaluation throughput: fulltune's one-pass, batched, length-sorted scoring vs a naive loop.

One run builds a small random Llama as the "base" model and a noisy copy as the "tuned" model, and
three synthetic workloads, then times each way of scoring them with **both** models (median of
`--repeats`) and prints tokens/s and the ratios:

- **loss**: `--sequences` right-padded sequences of `--seq-len` columns whose real lengths are
  spread between 1/8 and all of it (answers padded to `max_seq_len`, as preprocess writes them);
  naive = one sequence at a time over the full padded row, per model; two passes = what `evaluate`
  did before the one-pass change, `sequence_loss(batch_size=--batch-size)` per model (each model
  sorts, cuts and batches the data again); one pass = `loss_batches` once, then `score_loss` with
  both models over each batch;
- **mc**: `--questions` multiple-choice questions of 4 choices with questions and choices of
  varied length; naive = one (question, choice) at a time in file order, per model; two passes =
  `mc.loglikelihoods` per model; one pass = `mc.prepare_batches` once, `mc.score_batches` with
  both models;
- **gen**: `--prompts` prompts of 8-64 tokens continued greedily for `--new-tokens` tokens;
  naive = `model.generate` on one prompt at a time, per model; two passes = batched generation per
  model, batches built each time; one pass = `generation.prompt_batches` once (left-padded,
  longest first), `generation.generate` with both models.

The ways take turns within each repeat (naive, two passes, one pass, naive, ...), so load from
other processes lands on all of them alike; the figure is the median of `--repeats`.

Tokens are real (attended or generated) tokens, the same count for every way, summed over both
models. Every way gives the same numbers (checked; generation: the same continuations). No network,
no downloads:

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

from fulltune.evaluate import generation as gen
from fulltune.evaluate import mc
from fulltune.evaluate.loss import loss_batches, score_loss, sequence_loss
from fulltune.preprocess.dataset import IGNORE_INDEX


def build_model(vocab: int, seq_len: int, *, noise: float = 0.0) -> LlamaForCausalLM:
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
    model = LlamaForCausalLM(config).eval()
    if noise:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise)
    model.generation_config.eos_token_id = None  # random weights: always generate --new-tokens
    return model


def word_tokenizer(vocab: int):
    """A whitespace word-level tokenizer over 'w3' .. 'w<vocab-1>' (pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


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


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, object]]:
    """Median seconds and last value of each way; the ways take turns, so a noisy neighbour hits all."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    values: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            values[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), values[name]) for name in fns}


def naive_generate(model, tok, prompts: list[list[int]], new_tokens: int) -> list[str]:
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            g = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            out.append(tok.decode(g[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    return parser


def report(name: str, tokens: int, naive: float, one_pass: float, two_pass: float | None = None) -> None:
    """One workload's line: tokens/s of each way (from its median seconds) and the ratios."""
    extra = "" if two_pass is None else f"two passes {tokens / two_pass:,.0f} tok/s, "
    ratio = "" if two_pass is None else f", one pass vs two passes {two_pass / one_pass:.2f}x"
    print(
        f"{name:5} {tokens} tokens; naive {tokens / naive:,.0f} tok/s, {extra}"
        f"one pass {tokens / one_pass:,.0f} tok/s; batched vs naive {naive / one_pass:.2f}x{ratio}"
    )


def compare_loss(models: dict, data: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
    """The loss workload: time the three ways, check they agree, print its line."""
    loss_tokens = int(data["attention_mask"].sum()) * len(models)
    got = timed(
        {
            "naive": lambda: {r: naive_loss(m, data) for r, m in models.items()},
            "two": lambda: {
                r: sequence_loss(m, data, batch_size=args.batch_size).loss for r, m in models.items()
            },
            "one": lambda: {
                r: x.loss
                for r, x in score_loss(models, loss_batches(data, batch_size=args.batch_size)).items()
            },
        },
        args.repeats,
    )
    (t_naive, naive), (t_two, two), (t_one, one) = got["naive"], got["two"], got["one"]
    for r in models:
        assert abs(naive[r] - one[r]) < 1e-4 and two[r] == one[r], (naive, two, one)
    report("loss:", loss_tokens, t_naive, t_one, t_two)


def compare_mc(models: dict, requests: list[mc.Request], args: argparse.Namespace) -> None:
    """The multiple-choice workload: time the three ways, check they agree, print its line."""
    mc_tokens = sum(len(r.tokens) - 1 for r in requests) * len(models)
    got = timed(
        {
            "naive": lambda: {
                r: [mc.loglikelihoods(m, [q], batch_size=1)[0] for q in requests] for r, m in models.items()
            },
            "two": lambda: {
                r: mc.loglikelihoods(m, requests, batch_size=args.batch_size) for r, m in models.items()
            },
            "one": lambda: mc.score_batches(
                models, requests, mc.prepare_batches(requests, batch_size=args.batch_size, max_len=512)
            ),
        },
        args.repeats,
    )
    (t_naive_mc, naive_ll), (t_two_mc, two_ll), (t_one_mc, one_ll) = got["naive"], got["two"], got["one"]
    for r in models:
        assert np.allclose(naive_ll[r], one_ll[r], atol=1e-3) and np.array_equal(two_ll[r], one_ll[r])
    report("mc:", mc_tokens, t_naive_mc, t_one_mc, t_two_mc)


def compare_gen(models: dict, args: argparse.Namespace, rng: np.random.Generator) -> None:
    """The generation workload (prompts drawn from `rng`): time the three ways, check the batched
    ones agree, print its line and how many naive continuations match."""
    tok = word_tokenizer(args.vocab)
    prompts = [
        [1, *rng.integers(3, args.vocab, size=int(rng.integers(8, 65))).tolist()] for _ in range(args.prompts)
    ]
    gen_tokens = (sum(len(p) for p in prompts) + args.new_tokens * len(prompts)) * len(models)

    def batched(which: dict) -> dict[str, list[str]]:
        return gen.generate(
            which,
            tok,
            gen.prompt_batches(prompts, batch_size=args.batch_size, pad_id=0),
            examples=len(prompts),
            max_new_tokens=args.new_tokens,
            stop=[],
            pad_token_id=0,
        )

    got = timed(
        {
            "naive": lambda: {r: naive_generate(m, tok, prompts, args.new_tokens) for r, m in models.items()},
            "two": lambda: {r: batched({r: m})[r] for r, m in models.items()},
            "one": lambda: batched(models),
        },
        args.repeats,
    )
    (t_naive_gen, naive_out), (t_two_gen, two_out), (t_one_gen, one_out) = (
        got["naive"],
        got["two"],
        got["one"],
    )
    assert two_out == one_out
    same = sum(a == b for r in models for a, b in zip(naive_out[r], one_out[r], strict=True))
    report("gen:", gen_tokens, t_naive_gen, t_one_gen, t_two_gen)
    print(f"       identical greedy continuations: {same}/{len(prompts) * len(models)}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    rng = np.random.default_rng(0)  # drawn from in this order: loss data, mc requests, prompts
    models = {
        "base": build_model(args.vocab, args.seq_len),
        "tuned": build_model(args.vocab, args.seq_len, noise=0.02),
    }
    data = loss_data(args.sequences, args.seq_len, args.vocab, rng)
    requests = mc_requests(args.questions, args.vocab, rng)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} repeats, "
        "base + tuned models"
    )
    compare_loss(models, data, args)
    compare_mc(models, requests, args)
    compare_gen(models, args, rng)


if __name__ == "__main__":
    main()
