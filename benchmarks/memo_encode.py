"""Memoised encoding against the tokenizer's own batched encode, on text that repeats to different
degrees — where `tokenizer.memo` pays off and where it steps aside.

Corpora (all built here, nothing downloaded):
  notes      the preprocessing benchmark's generated text (templated clinical notes + prose);
  docstrings every distinct docstring (>= 200 chars) of the installed packages: real English
             technical prose with code samples and indentation, no document repeated;
  code       Python source files of the installed packages (indentation, identifiers);
  random     words of random letters and digits: nothing repeats (the worst case).

For each, in the same process, alternating, `--repeats` times: the tokenizer's
`encode_batch_fast` over batches of `--batch` texts (the ids as lists, as the tokenizer gives
them), and `MemoEncoder.encode` over the same batches
with a fresh memo (warm-up included). Reported: CPU-second medians, their ratio, the share of
pieces the memo had to encode, batches it left to the tokenizer whole, and whether every id matched.

    .venv/bin/python benchmarks/memo_encode.py --mb 20 --repeats 3 --assets <demo assets>
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import statistics
import string
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np


def notes(mb: float) -> list[str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from preprocess_throughput import make_text

    path = Path(f"/tmp/fulltune-memo-notes-{mb}.jsonl")
    if not path.exists():
        make_text(path, mb)
    with path.open() as fh:
        return [json.loads(line)["text"] for line in fh]


def _sources() -> list[Path]:
    files = sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py"))
    random.Random(0).shuffle(files)
    return files


def docstrings(mb: float) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    size = 0
    for f in _sources():
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200 and doc not in seen:
                    seen.add(doc)
                    out.append(doc)
                    size += len(doc)
        if size >= mb * 1e6:
            break
    return out


def code(mb: float) -> list[str]:
    out, size = [], 0
    for f in _sources():
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(text)
        size += len(text)
        if size >= mb * 1e6:
            break
    return out


def random_words(mb: float) -> list[str]:
    rng = random.Random(1)
    alphabet = string.ascii_letters + string.digits
    out, size = [], 0
    while size < mb * 1e6:
        text = " ".join("".join(rng.choices(alphabet, k=rng.randint(3, 12))) for _ in range(100))
        out.append(text)
        size += len(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=20.0, help="characters per corpus, in millions")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2048, help="texts per call (preprocess block_records)")
    ap.add_argument("--corpora", default="notes,docstrings,code,random")
    ap.add_argument("--assets", default=".fulltune-demo/assets", help="demo assets cache (tokenizer)")
    args = ap.parse_args()

    from tokenizers import Tokenizer

    from fulltune.demo.assets import build_demo_assets
    from fulltune.tokenizer.memo import MemoEncoder

    tokenizer = build_demo_assets(Path(args.assets)).base_model_dir / "tokenizer.json"
    backend = Tokenizer.from_file(str(tokenizer))
    makers = {"notes": notes, "docstrings": docstrings, "code": code, "random": random_words}
    print(f"tokenizer {tokenizer}; batches of {args.batch} texts; {args.repeats} repeats; CPU seconds")
    for name in args.corpora.split(","):
        texts = makers[name](args.mb)
        batches = [texts[i : i + args.batch] for i in range(0, len(texts), args.batch)]
        whole, memo, exact = [], [], True
        for _ in range(args.repeats):
            start = time.process_time()
            ids = [[e.ids for e in backend.encode_batch_fast(b, add_special_tokens=False)] for b in batches]
            mid = time.process_time()
            enc = MemoEncoder(backend)
            got = [enc.encode(b)[0] for b in batches]
            end = time.process_time()
            whole.append(mid - start)
            memo.append(end - mid)
            want = [
                np.concatenate([np.asarray(x, np.int32) for x in b] or [np.zeros(0, np.int32)]) for b in ids
            ]
            exact &= all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
        w, m = statistics.median(whole), statistics.median(memo)
        print(
            f"{name:10s} {len(texts):7,d} texts {sum(map(len, texts)) / 1e6:5.1f} M chars   "
            f"whole {w:6.2f} s   memo {m:6.2f} s   ratio {w / m:5.2f}x   "
            f"pieces encoded {enc.pieces_encoded / max(enc.pieces_seen, 1):6.1%} of {enc.pieces_seen:,}   "
            f"batches whole {enc.batches_whole}/{len(batches)}   exact {exact}",
            flush=True,
        )


if __name__ == "__main__":
    main()
