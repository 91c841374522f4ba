"""Preprocessing throughput: fulltune's sharded step against the usual `run_clm.py` recipe.

In one run, on the same generated text and the same tokenizer (the demo's byte-level BPE):
  (a) baseline: `datasets.Dataset.from_json` -> `.map(tokenize, batched=True)` -> `.map(group_texts)`,
      as Hugging Face's `run_clm.py` does;
  (b) fulltune `preprocess_shard` with 1 shard, in one process;
  (c) fulltune with 2 shards, each in its own process (what ParallelFor does across pods).
Each variant runs in a fresh subprocess, so its peak RSS is its own. Reported: tokens/s, tokens/s per
core used, peak RSS, the share of non-pad tokens, and the ratios (b)/(a) per core and (c)/(b).

    .venv/bin/python benchmarks/preprocess_throughput.py --mb 50 --repeats 3

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


def run_baseline(data: Path, tokenizer_dir: str, workdir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ds = Dataset.from_json(str(data), cache_dir=str(workdir / "hf-cache"))

    def tokenize(batch):
        return tok(batch["text"])

    def group_texts(examples):  # as run_clm.py: concatenate, drop the remainder, cut into blocks
        concatenated = {k: sum(examples[k], []) for k in examples}
        total = (len(concatenated["input_ids"]) // SEQ_LEN) * SEQ_LEN
        result = {k: [t[i : i + SEQ_LEN] for i in range(0, total, SEQ_LEN)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = ds.map(tokenize, batched=True, remove_columns=["text"])
    grouped = tokenized.map(group_texts, batched=True)
    return {"sequences": len(grouped), "tokens": len(grouped) * SEQ_LEN, "non_pad": 1.0}


def _cfg(data: Path, tokenizer_dir: str, shards: int):
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
            },
        }
    )


def run_shard(data: Path, tokenizer_dir: str, workdir: Path, shards: int, index: int) -> dict:
    from fulltune.preprocess.core import preprocess_shard

    m = preprocess_shard(_cfg(data, tokenizer_dir, shards), str(workdir / "work"), index)
    s = m["splits"]["train"]
    return {"sequences": s["sequences"], "tokens": s["tokens"], "slots": s["sequences"] * SEQ_LEN}


def child(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    start = time.perf_counter()
    if args.variant == "baseline":
        out = run_baseline(Path(args.data), args.tokenizer, workdir)
    else:
        out = run_shard(Path(args.data), args.tokenizer, workdir, args.shards, args.index)
    out["seconds"] = time.perf_counter() - start
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def spawn(
    variant: str, data: Path, tokenizer: str, workdir: Path, shards: int = 1, index: int = 0
) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1")
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--data",
        str(data),
        "--tokenizer",
        tokenizer,
        "--workdir",
        str(workdir),
        "--shards",
        str(shards),
        "--index",
        str(index),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def collect(procs: list[subprocess.Popen]) -> list[dict]:
    outs = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a benchmark child failed with exit code {p.returncode}")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=50.0, help="size of the generated JSONL")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--assets", default=".fulltune-demo/assets", help="demo assets cache (tokenizer)")
    ap.add_argument("--child", dest="variant", default=None, help=argparse.SUPPRESS)
    for name in ("--data", "--tokenizer", "--workdir"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        child(args)
        return

    from fulltune.demo.assets import build_demo_assets

    tokenizer = str(build_demo_assets(Path(args.assets)).base_model_dir)
    results: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
    with tempfile.TemporaryDirectory(prefix="fulltune-bench-") as tmp:
        data = Path(tmp, "text.jsonl")
        records = make_text(data, args.mb)
        print(
            f"{records} records, {data.stat().st_size / 2**20:.1f} MiB, max_seq_len {SEQ_LEN}, {args.repeats} repeats"
        )
        for r in range(args.repeats):
            for key, shards in (("a", 0), ("b", 1), ("c", 2)):
                work = Path(tmp, f"{key}-{r}")
                start = time.perf_counter()
                if key == "a":
                    outs = collect([spawn("baseline", data, tokenizer, work)])
                else:
                    outs = collect(
                        [spawn("fulltune", data, tokenizer, work, shards, i) for i in range(shards)]
                    )
                wall = time.perf_counter() - start
                tokens = sum(o["tokens"] for o in outs)
                slots = sum(o.get("slots", o["tokens"]) for o in outs)
                results[key].append(
                    {
                        "wall": wall,
                        "tokens": tokens,
                        "non_pad": tokens / slots,
                        "rss": max(o["peak_rss_mb"] for o in outs),
                    }
                )
    cores = {"a": 1, "b": 1, "c": 2}
    summary = {}
    for key, label in (
        ("a", "(a) run_clm baseline"),
        ("b", "(b) fulltune, 1 shard"),
        ("c", "(c) fulltune, 2 shards x 2 processes"),
    ):
        wall = statistics.median(x["wall"] for x in results[key])
        tokens = results[key][0]["tokens"]
        summary[key] = tokens / wall / cores[key]
        print(
            f"{label:40s} median {wall:7.1f}s  {tokens / wall:12,.0f} tok/s  {summary[key]:12,.0f} tok/s/core  "
            f"peak RSS {max(x['rss'] for x in results[key]):7.0f} MiB  non-pad {results[key][0]['non_pad']:.4f}"
        )
    print(
        f"(b)/(a) per core: {summary['b'] / summary['a']:.2f}x   (c)/(b) total: {2 * summary['c'] / summary['b']:.2f}x"
    )


if __name__ == "__main__":
    main()
