"""Preprocessing throughput: fulltune's sharded step against the usual `run_clm.py` recipe.

Text mode (default), in one run, on the same generated text (or, `--text docstrings`, the installed
packages' docstrings) and the same tokenizer (the demo's
byte-level BPE):
  (a) baseline: `datasets.Dataset.from_json` -> `.map(tokenize, batched=True)` -> `.map(group_texts)`,
      as Hugging Face's `run_clm.py` does (`list(chain(*examples[k]))`, remainder dropped);
  (b) fulltune `preprocess_shard` with 1 shard, in one process;
  (c) fulltune with 2 shards, each in its own process (what ParallelFor does across pods);
  (w) fulltune with 1 shard and `memoize_tokens: false` (every text encoded whole, as before the
      memo), and (t) the tokenizer's batched encode alone: the floor for any pipeline that
      encodes every text whole.
SFT mode (`--sft prompt_completion|chat`): generated prompt/completion or chat records, fulltune with
1 shard, packed (best-fit decreasing) against `packing: false` (one padded example per sequence):
the share of non-pad tokens is the figure.

Each variant runs in a fresh subprocess, so its peak RSS and CPU time are its own. Reported: wall
time, CPU time (user + system of the process(es)), tokens per CPU second, peak RSS, the share of
non-pad tokens, and the ratios (b)/(a) per core and (c)/(b): measured on the wall clock, and from CPU
time (the critical path, max over (c)'s processes, which is what the wall clock gives on otherwise
idle cores; use it when the machine is shared and the wall clock is not to be trusted).

    .venv/bin/python benchmarks/preprocess_throughput.py --mb 30 --repeats 3
    .venv/bin/python benchmarks/preprocess_throughput.py --sft prompt_completion --mb 5 --repeats 1

Figures and the command that produced them go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ_LEN = 1024


def make_text(path: Path, megabytes: float, seed: int = 0) -> int:
    """JSONL of clinical notes and general prose until `megabytes`; returns the record count."""
    from fulltune.demo.assets import clinical_note, stdlib_paragraphs

    rng = random.Random(seed)
    prose = stdlib_paragraphs()
    target = int(megabytes * 1024 * 1024)
    written = records = 0
    with path.open("w") as fh:
        while written < target:
            text = clinical_note(rng) if rng.random() < 0.7 else " ".join(rng.sample(prose, 3))
            line = json.dumps({"text": text}) + "\n"
            fh.write(line)
            written += len(line.encode())
            records += 1
    return records


def make_docstrings(path: Path, megabytes: float) -> int:
    """JSONL of the installed packages' distinct docstrings (real technical prose, no document
    repeated: where memoised tokenization gains least) until `megabytes` or they run out."""
    sys.path.insert(0, str(Path(__file__).parent))
    from memo_encode import docstrings

    texts = docstrings(megabytes)
    written = records = 0
    with path.open("w") as fh:
        for text in texts:
            line = json.dumps({"text": text}) + "\n"
            fh.write(line)
            written += len(line.encode())
            records += 1
            if written >= megabytes * 1024 * 1024:
                break
    return records


def make_sft(path: Path, megabytes: float, kind: str, seed: int = 0) -> int:
    """Prompt/completion or chat records with varied lengths (a question, then 1-4 notes as the
    answer; chat: 1-2 such turns of 1-2 notes after a system prompt); returns the record count."""
    from fulltune.demo.assets import clinical_note

    rng = random.Random(seed)
    target = int(megabytes * 1024 * 1024)
    written = records = 0

    def answer(most: int) -> str:
        return " ".join(clinical_note(rng) for _ in range(rng.choice((1, 1, 2, 3, 4)[: most + 1])))

    with path.open("w") as fh:
        while written < target:
            question = f"Summarise the plan for patient {rng.randint(1, 99999)}, {rng.choice(('briefly', 'in full'))}."
            if kind == "prompt_completion":
                row = {"prompt": question, "completion": " " + answer(4)}
            else:
                msgs = [{"role": "system", "content": "You are a careful clinical assistant."}]
                for _ in range(rng.choice((1, 1, 2))):
                    msgs += [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer(2)},
                    ]
                row = {"messages": msgs}
            line = json.dumps(row) + "\n"
            fh.write(line)
            written += len(line.encode())
            records += 1
    return records


def run_baseline(data: Path, tokenizer_dir: str, workdir: Path) -> dict:
    from itertools import chain

    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ds = Dataset.from_json(str(data), cache_dir=str(workdir / "hf-cache"))

    def tokenize(batch):
        return tok(batch["text"])

    def group_texts(examples):  # as run_clm.py: concatenate, drop the remainder, cut into blocks
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // SEQ_LEN) * SEQ_LEN
        result = {k: [t[i : i + SEQ_LEN] for i in range(0, total, SEQ_LEN)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = ds.map(tokenize, batched=True, remove_columns=["text"])
    grouped = tokenized.map(group_texts, batched=True)
    return {"sequences": len(grouped), "tokens": len(grouped) * SEQ_LEN, "non_pad": 1.0}


def run_tokenizer_only(data: Path, tokenizer_dir: str) -> dict:
    """The floor for any pipeline built on this tokenizer: only the batched Rust encode of every
    text (texts read beforehand, nothing packed or written). Its CPU time is reported as `cpu`."""
    from fulltune.hf import load_tokenizer

    backend = load_tokenizer(tokenizer_dir).backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    with data.open() as fh:
        texts = [json.loads(line)["text"] for line in fh]
    start = time.process_time()
    tokens = 0
    for i in range(0, len(texts), 1000):
        tokens += sum(
            len(e.ids) + 1 for e in backend.encode_batch_fast(texts[i : i + 1000], add_special_tokens=False)
        )
    return {"tokens": tokens, "encode_cpu": time.process_time() - start}


def _cfg(data: Path, tokenizer_dir: str, shards: int, packing: bool = True, memoize: bool = True):
    from fulltune.config import RunConfig

    return RunConfig.from_dict(
        {
            "model": {"base_model_uri": tokenizer_dir},
            "data": {"train_uri": str(data)},
            "preprocess": {
                "max_seq_len": SEQ_LEN,
                "num_shards": shards,
                "eval_fraction": 0.001,
                "replay_fraction": 0.0,
                "packing": packing,
                "memoize_tokens": memoize,
            },
        }
    )


def run_shard(
    data: Path,
    tokenizer_dir: str,
    workdir: Path,
    shards: int,
    index: int,
    packing: bool = True,
    memoize: bool = True,
) -> dict:
    from fulltune.preprocess.core import preprocess_shard

    cfg = _cfg(data, tokenizer_dir, shards, packing, memoize).with_overrides(
        {"work_dir": str(workdir / "work")}
    )
    m = preprocess_shard(cfg, index)
    s = m["splits"]["train"]
    return {
        "sequences": s["sequences"],
        "tokens": s["tokens"],
        "slots": s["sequences"] * SEQ_LEN,
        "truncated": s["truncated"],
        "bytes_read": m["inputs"]["train"]["bytes_read"],
        "tokenization": m["tokenization"],
    }


def child(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    start = time.perf_counter()
    if args.variant == "baseline":
        out = run_baseline(Path(args.data), args.tokenizer, workdir)
    elif args.variant == "tokenizer":
        out = run_tokenizer_only(Path(args.data), args.tokenizer)
    else:
        out = run_shard(
            Path(args.data),
            args.tokenizer,
            workdir,
            args.shards,
            args.index,
            packing=args.variant != "unpacked",
            memoize=args.variant != "wholetext",
        )
    out["seconds"] = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu"] = out.pop("encode_cpu", usage.ru_utime + usage.ru_stime)
    out["peak_rss_mb"] = usage.ru_maxrss / 1024
    print(json.dumps(out))


def spawn(
    variant: str, data: Path, tokenizer: str, workdir: Path, shards: int = 1, index: int = 0
) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, __file__, "--child", variant, "--data", str(data), "--tokenizer", tokenizer]
    cmd += ["--workdir", str(workdir), "--shards", str(shards), "--index", str(index)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def collect(procs: list[subprocess.Popen]) -> list[dict]:
    outs = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a benchmark child failed with exit code {p.returncode}")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=50.0, help="size of the generated JSONL")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=None, help="comma-separated subset of a,b,c,w,t (default: all)")
    ap.add_argument(
        "--text",
        choices=("notes", "docstrings"),
        default="notes",
        help="text mode's data: generated notes and prose (default), or real docstrings (few repeats)",
    )
    ap.add_argument("--sft", choices=("prompt_completion", "chat"), help="SFT packing mode")
    ap.add_argument("--assets", default=".fulltune-demo/assets", help="demo assets cache (tokenizer)")
    # The child process's arguments (spawn), not for the command line.
    ap.add_argument("--child", dest="variant", default=None, help=argparse.SUPPRESS)
    for name in ("--data", "--tokenizer", "--workdir"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    return ap


def selected_variants(args: argparse.Namespace) -> dict[str, tuple[str, str, int]]:
    """The mode's variants, `--variants` of them where given: key -> (label, child variant, shards)."""
    if args.sft:
        variants = {
            "p": ("(p) fulltune packed, 1 shard", "fulltune", 1),
            "u": ("(u) packing: false", "unpacked", 1),
        }
    else:
        variants = {
            "a": ("(a) run_clm baseline", "baseline", 1),
            "b": ("(b) fulltune, 1 shard", "fulltune", 1),
            "c": ("(c) fulltune, 2 shards x 2 processes", "fulltune", 2),
            "w": ("(w) fulltune, 1 shard, texts whole", "wholetext", 1),
            "t": ("(t) the tokenizer's encode alone", "tokenizer", 1),
        }
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    return variants


def write_data(data: Path, args: argparse.Namespace) -> int:
    """The mode's input JSONL at `data`; its record count."""
    if args.sft:
        return make_sft(data, args.mb, args.sft)
    if args.text == "docstrings":
        return make_docstrings(data, args.mb)
    return make_text(data, args.mb)


def run_variants(args: argparse.Namespace, variants: dict, tokenizer: str) -> dict[str, list[dict]]:
    """Each variant `--repeats` times, taking turns, on one input written here: per variant, a
    `run_variant` record per repeat."""
    results: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory(prefix="fulltune-bench-") as tmp:
        data = Path(tmp, "data.jsonl")
        records = write_data(data, args)
        print(
            f"{records} {args.sft or 'text'} records, {data.stat().st_size / 2**20:.1f} MiB, "
            f"max_seq_len {SEQ_LEN}, {args.repeats} repeats, load average {os.getloadavg()[0]:.1f}"
        )
        for r in range(args.repeats):
            for key, (_, variant, shards) in variants.items():
                results[key].append(run_variant(variant, data, tokenizer, Path(tmp, f"{key}-{r}"), shards))
        print(f"input {data.stat().st_size:,} bytes; load average after {os.getloadavg()[0]:.1f}")
    return results


def run_variant(variant: str, data: Path, tokenizer: str, work: Path, shards: int) -> dict:
    """One run of a variant, each shard in its own child process at once; its figures summed over them."""
    start = time.perf_counter()
    outs = collect([spawn(variant, data, tokenizer, work, shards, i) for i in range(shards)])
    wall = time.perf_counter() - start
    tokens = sum(o["tokens"] for o in outs)
    return {
        "wall": wall,
        "cpu": sum(o["cpu"] for o in outs),
        "cpu_max": max(o["cpu"] for o in outs),
        "tokens": tokens,
        "non_pad": tokens / sum(o.get("slots", o["tokens"]) for o in outs),
        "rss": max(o["peak_rss_mb"] for o in outs),
        "truncated": sum(o.get("truncated", 0) for o in outs),
        "read": [o.get("bytes_read") for o in outs],
        "tokenization": outs[0].get("tokenization"),
    }


def print_variants(args: argparse.Namespace, variants: dict, results: dict, med: dict) -> None:
    """One line per variant: median wall and CPU time, throughput, peak RSS, share of non-pad tokens."""
    for key, (label, _, _) in variants.items():
        first = results[key][0]
        tokens = first["tokens"]
        print(
            f"{label:38s} wall {med[key]['wall']:6.1f}s  cpu {med[key]['cpu']:6.1f}s  "
            f"{tokens / med[key]['wall']:10,.0f} tok/s  {tokens / med[key]['cpu']:10,.0f} tok/cpu-s  "
            f"peak RSS {max(x['rss'] for x in results[key]):6.0f} MiB  non-pad {first['non_pad']:.4f}"
            + (f"  truncated {first['truncated']}" if args.sft else "")
            + (f"  bytes read per process {first['read']}" if first["read"][0] is not None else "")
        )


def print_ratios(variants: dict, results: dict, med: dict) -> None:
    """Text mode's ratios of the variants run, and (b)'s tokenization record."""
    tok = {k: results[k][0]["tokens"] for k in variants}

    def ratio(x: str, y: str, m: str, m2: str | None = None) -> float:
        return (tok[x] / med[x][m]) / (tok[y] / med[y][m2 or m])

    lines = []
    if {"a", "b"} <= set(variants):
        lines.append(
            f"(b)/(a) per core: wall clock {ratio('b', 'a', 'wall'):.2f}x, CPU time {ratio('b', 'a', 'cpu'):.2f}x"
        )
    if {"b", "c"} <= set(variants):
        lines.append(
            f"(c)/(b): wall clock {ratio('c', 'b', 'wall'):.2f}x, CPU critical path "
            f"{ratio('c', 'b', 'cpu_max', 'cpu'):.2f}x (total CPU (c)/(b) {med['c']['cpu'] / med['b']['cpu']:.2f})"
        )
    if {"a", "w", "t"} <= set(variants):
        lines.append(
            f"whole texts: (w)/(a) per core {ratio('w', 'a', 'cpu'):.2f}x, (t)/(a) {ratio('t', 'a', 'cpu'):.2f}x "
            "(the ceiling when every text is encoded whole)"
        )
    if {"b", "w"} <= set(variants):
        lines.append(f"memo gain (b)/(w) per core {ratio('b', 'w', 'cpu'):.2f}x")
    if "b" in variants:
        lines.append(f"(b) tokenization: {results['b'][0]['tokenization']}")
    print("\n".join(lines))


def main() -> None:
    args = build_parser().parse_args()
    if args.variant:
        child(args)
        return

    from fulltune.demo.assets import build_demo_assets

    tokenizer = str(build_demo_assets(Path(args.assets)).base_model_dir)
    variants = selected_variants(args)
    results = run_variants(args, variants, tokenizer)
    med = {
        k: {m: statistics.median(x[m] for x in v) for m in ("wall", "cpu", "cpu_max")}
        for k, v in results.items()
    }
    print_variants(args, variants, results, med)
    if not args.sft:
        print_ratios(variants, results, med)


if __name__ == "__main__":
    main()
