"""Pipeline compile time from a deep call stack against a shallow one, in one process.

`fulltune compile` runs from a shallow stack; tests, notebooks and tools that import fulltune compile
from deep ones, often with torch and transformers loaded. kfp's task setters each walk the whole
call stack (inspect.stack), at a cost that grows with the frames and the loaded modules, so the same
compile can take many times longer there. `kfp/pipeline.build_pipeline` builds the graph on a
thread of its own to keep that walk short; this measures whether it does.

In one process with torch, transformers and DeepSpeed imported: `compile_pipeline` called directly
(the baseline: the CLI's situation) and from `--depth` nested frames of code compiled from a string
(as `python -c`, a notebook cell or generated test code has), alternating, `--repeats` times. Printed:
the medians and the ratio deep / shallow (1.0: the stack does not matter).

    .venv/bin/python benchmarks/compile_time.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

NESTED = """
def nested(depth, work):
    return work() if depth == 0 else nested(depth - 1, work)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--depth", type=int, default=40, help="frames between the caller and the compile")
    a = p.parse_args()

    import sys

    import deepspeed  # noqa: F401  # the modules a test or notebook process has loaded
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from fulltune.kfp.compile import compile_pipeline

    scope: dict = {}
    exec(compile(NESTED, "<generated>", "exec"), scope)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "pipeline.yaml")

        def timed(run) -> float:
            start = time.perf_counter()
            run()
            return time.perf_counter() - start

        compile_pipeline(out)  # imports and kfp's first-use caches, in neither figure
        shallow, deep = [], []
        for _ in range(a.repeats):
            shallow.append(timed(lambda: compile_pipeline(out)))
            deep.append(timed(lambda: scope["nested"](a.depth, lambda: compile_pipeline(out))))
    s, d = statistics.median(shallow), statistics.median(deep)
    print(f"modules loaded: {len(sys.modules)}; depth {a.depth}; {a.repeats} repeats")
    print(f"compile, shallow stack (baseline): median {s:.2f} s")
    print(f"compile, deep stack:               median {d:.2f} s")
    print(f"ratio deep / shallow: {d / s:.2f}")


if __name__ == "__main__":
    main()
