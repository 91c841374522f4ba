"""Data validation throughput: fulltune's validate_data against a naive json.loads loop.

In one run, on the same generated JSONL (deterministic, ~1 KB a record: text of varied lengths,
~0.1% broken or empty lines, ~9% exact duplicates (repeated records and short ones that collide),
~1% with an e-mail, phone or card number, AWS key, control character, mojibake or special token):
  (a) naive baseline: `for line in f: json.loads(line)` applying the same checks in pure Python
      (type/empty checks, lengths, a dict of content hashes for duplicates, the control, mojibake
      and special-token regexes and fulltune's `find_sensitive` PII/secret scan on every record);
  (b) fulltune `validate_data` with the precise path only (every line through json.loads);
  (c) fulltune `validate_data`'s vectorised pyarrow path in one process (`data.validate_workers:
      1`; the lines pyarrow does not take go through the precise path);
  (d) fulltune `validate_data` as shipped: (c) in byte spans of the file on worker processes, one
      per usable CPU (the parent merges them in order and judges duplicates).
Each runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own (for (d) also the largest
worker's). CPU seconds are user + sys of the variant's process and its workers. Reported:
records/s, MB/s, peak RSS, and the speed ratios against (a), by wall clock and by CPU time. The
script checks that every variant finds the same problem counts.

    .venv/bin/python benchmarks/validate_throughput.py --records 1000000

`--records 100000` for a quick run; `--variants naive,fast1,fast` skips the slow precise path.

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

WORDS = (
    "the of and to in is was for on that with as by patient dose glucose insulin trial study result "
    "measured reported increase decrease level levels blood pressure treatment group control week "
    "month year follow up baseline outcome primary secondary analysis data model training system "
    "network protocol server request response error value function return module package import "
    "über café naïve résumé 東京 数据 模型 Привет мир"
).split()


def make_data(path: Path, records: int, seed: int = 0) -> None:
    """~1 KB per record on average (lengths spread from ~20 to ~8,000 characters)."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(4000):
        n = rng.randint(6, 24)
        s = " ".join(rng.choice(WORDS) for _ in range(n))
        if rng.random() < 0.15:  # numbers that are not PII: dates, amounts, versions
            s += f" on 2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} ({rng.randint(1, 999)} mg)"
        sentences.append(s[0].upper() + s[1:] + ".")
    specials = [
        lambda: f" contact {rng.choice(['jane.doe', 'ops', 'j.smith'])}@example.org for details",
        lambda: f" call ({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)} now",
        lambda: " card 4111 1111 1111 1111 on file",
        lambda: " key AKIAIOSFODNN7EXAMPLE leaked",
        lambda: " bell \x07 in text",
        lambda: " caf\u00c3\u00a9 garbled",
        lambda: " stray <|im_end|> token",
    ]
    recent: list[str] = []
    with path.open("w", encoding="utf-8") as fh:
        for i in range(records):
            r = rng.random()
            if r < 0.0005:
                fh.write('{"text": "unterminated\n')
                continue
            if r < 0.001:
                fh.write('{"text": "   "}\n')
                continue
            if r < 0.006 and recent:
                fh.write(json.dumps({"text": rng.choice(recent), "id": i}) + "\n")
                continue
            k = max(1, min(80, int(rng.lognormvariate(1.9, 0.9))))
            text = " ".join(rng.choices(sentences, k=k))
            if rng.random() < 0.01:
                text += rng.choice(specials)()
            if len(recent) < 1000:
                recent.append(text)
            elif rng.random() < 0.01:
                recent[rng.randrange(1000)] = text
            fh.write(json.dumps({"text": text, "id": i, "source": "bench"}, ensure_ascii=False) + "\n")


def run_naive(data: Path) -> dict:
    """The same checks as validate_data's text records, in a plain Python loop."""
    import hashlib

    from fulltune.data.validate.content import CONTROL_CHARS, MOJIBAKE, find_sensitive, special_token_pattern

    special = special_token_pattern()
    counts: dict[str, int] = {}
    seen: dict[int, int] = {}
    lengths = []
    records = 0

    def add(code: str) -> None:
        counts[code] = counts.get(code, 0) + 1

    with data.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            records += 1
            try:
                value = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                add("invalid_utf8")
                continue
            except ValueError:
                add("invalid_json")
                continue
            if not isinstance(value, dict):
                add("not_an_object")
                continue
            text = value.get("text")
            if text is None:
                add("missing_field")
                continue
            if not isinstance(text, str):
                add("wrong_type")
                continue
            if not text.strip():
                add("empty_text")
                continue
            lengths.append(len(text))
            key = int.from_bytes(
                hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
            )
            if key in seen:
                add("duplicate")
            else:
                seen[key] = lineno
            if CONTROL_CHARS.search(text):
                add("control_chars")
            if MOJIBAKE.search(text):
                add("mojibake")
            if len(text) > 1_000_000:
                add("too_long")
            if special.search(text):
                add("special_token_text")
            for code, _ in find_sensitive(text):
                add(code)
    return {"records": records, "counts": counts}


def run_fulltune(data: Path, workdir: Path, fast: bool, workers: int | None = None) -> dict:
    from fulltune.config import RunConfig
    from fulltune.data.validate import DataValidationError, validate_data

    cfg = RunConfig.from_dict(
        {"data": {"train_uri": str(data), "max_error_rate": 0.01, "validate_workers": workers}}
    )
    try:
        report = validate_data(cfg, workdir, fast=fast)
    except DataValidationError:
        report = json.loads((workdir / "report.json").read_text())
    d = report["datasets"]["train"]
    return {"records": d["records"], "counts": {p["code"]: p["count"] for p in d["problems"]}}


def child(args: argparse.Namespace) -> None:
    data, workdir = Path(args.data), Path(args.workdir)
    start = time.perf_counter()
    if args.variant == "naive":
        out = run_naive(data)
    elif args.variant == "precise":
        out = run_fulltune(data, workdir, fast=False)
    else:
        out = run_fulltune(data, workdir, fast=True, workers=1 if args.variant == "fast1" else None)
    out["seconds"] = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)  # validate_data's worker processes
    out["cpu_seconds"] = usage.ru_utime + usage.ru_stime + workers.ru_utime + workers.ru_stime
    out["peak_rss_mb"] = usage.ru_maxrss / 1024
    out["worker_peak_rss_mb"] = workers.ru_maxrss / 1024
    print(json.dumps(out))


def spawn(variant: str, data: Path, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--data", str(data), "--workdir", str(workdir)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"benchmark child {variant} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def usable_cpus() -> int:
    from fulltune.data.validate import usable_cpus as cpus

    return cpus()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000, help="records in the generated JSONL")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "fulltune-bench"),
        help="directory keeping the generated file between runs (outside the repository: ~1 GB)",
    )
    ap.add_argument(
        "--variants", default="naive,precise,fast1,fast", help="which of naive,precise,fast1,fast to run"
    )
    ap.add_argument("--child", dest="variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        child(args)
        return

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    data = cache / f"validate-{args.records}.jsonl"
    if not data.exists():
        start = time.perf_counter()
        part = data.with_suffix(".part")
        make_data(part, args.records)
        part.rename(data)
        print(f"generated {data} in {time.perf_counter() - start:.0f}s")
    size_mb = data.stat().st_size / 2**20
    variants = args.variants.split(",")
    print(
        f"{args.records:,} records, {size_mb:,.0f} MiB JSONL, {args.repeats} repeat(s), variants {variants}"
    )
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="fulltune-bench-") as tmp:
        for r in range(args.repeats):
            for v in variants:
                results[v].append(spawn(v, data, Path(tmp, f"{v}-{r}")))
    counts = {v: results[v][0]["counts"] for v in variants}
    base: tuple[float, float] | None = None
    labels = {
        "naive": "(a) naive json.loads loop",
        "precise": "(b) fulltune, precise path",
        "fast1": "(c) fulltune, 1 process",
        "fast": f"(d) fulltune, {usable_cpus()} processes",
    }
    for v in variants:
        secs = statistics.median(x["seconds"] for x in results[v])
        cpu = statistics.median(x["cpu_seconds"] for x in results[v])
        records = results[v][0]["records"]
        if v == "naive":
            base = (secs, cpu)
        ratio = f"  {base[0] / secs:5.2f}x (wall)  {base[1] / cpu:5.2f}x (CPU)" if base else ""
        rss = max(x["peak_rss_mb"] for x in results[v])
        worker_rss = max(x["worker_peak_rss_mb"] for x in results[v])
        workers = f" + workers {worker_rss:4.0f} MiB each" if worker_rss > 0 else ""
        print(
            f"{labels[v]:28s} wall {secs:7.1f}s  CPU {cpu:7.1f}s  {records / secs:9,.0f} records/s  "
            f"{size_mb / secs:6.1f} MiB/s  peak RSS {rss:6.0f} MiB{workers}{ratio}"
        )
    print("problem counts:", json.dumps(counts, sort_keys=True))
    codes = {c for v in counts.values() for c in v}
    same = all(len({counts[v].get(c, 0) for v in variants}) == 1 for c in codes)
    print("same problem counts in every variant:", same)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
