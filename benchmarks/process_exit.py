"""Process exit: how long fulltune's processes take between the end of their work and their exit,
with (`frozen`) and without (`plain`) `fulltune._process.exit_without_final_collection`, and for
training ranks also leaving at once (`exit_now`, `fulltune._process.exit_now`: what
`python -m fulltune.train` does).

Three kinds of process, each variant in fresh processes, the variants interleaved `--repeats` times:

- **plan**: the pipeline's plan step on the demo config (`fulltune.steps.plan`: imports
  transformers, builds the model on the meta device);
- **check**: the check_tokenizer step on the demo config (`fulltune.steps.check_tokenizer`);
- **train**: two training ranks under torchrun (ZeRO-3 on CPU, gloo), `--steps` steps of a small
  random Llama (`benchmarks/train_step.py` builds it), the rank's own `fulltune.train.recipe.main`.

Each process writes the time its work returned; the parent takes the time the process was reaped.
Printed, per kind: the medians of work done -> exit (for train: the last rank's, up to torchrun's
exit) and of the whole process, and the ratio of each variant to plain of the whole process:

    .venv/bin/python benchmarks/process_exit.py --repeats 5

The variants run the same code and differ only in how they exit: the plain one unregisters the
freeze (where the step registered it) once its work is done. A run that fails (a rank aborting at
exit) stops the benchmark with its output. Figures and the command go in docs/benchmarks.md.
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
from collections.abc import Callable
from pathlib import Path

import train_step

from fulltune.launch.local import free_port
from fulltune.train.args import TrainerArgs

STEP_PROCESS = """
import atexit, gc, json, os, sys, time
from fulltune import steps
from fulltune._process import exit_without_final_collection
from fulltune.config import RunConfig
kind, variant, config = sys.argv[1:4]
cfg = RunConfig.from_dict(json.loads(open(config).read()))
steps.plan(cfg, f"bench-{os.getpid()}") if kind == "plan" else steps.check_tokenizer(cfg)
if variant == "frozen":
    exit_without_final_collection()
else:  # what the step may have registered
    atexit.unregister(gc.freeze)
open(os.environ["EXIT_BENCH_MARKER"], "a").write(f"{time.time()}\\n")
"""

RANK_PROCESS = """
import os, sys, time
from fulltune._process import exit_now, exit_without_final_collection
from fulltune.train.recipe import main
variant = sys.argv.pop(1)
if variant == "frozen":
    exit_without_final_collection()
code = main()
open(os.environ["EXIT_BENCH_MARKER"], "a").write(f"{time.time()}\\n")
if variant == "exit_now":
    exit_now(code)
sys.exit(code)
"""

VARIANTS = {
    "plan": ("plain", "frozen"),
    "check": ("plain", "frozen"),
    "train": ("plain", "frozen", "exit_now"),
}


def step_config(root: Path, assets: str) -> Path:
    """The demo's run config as the pipeline's steps receive it (a mapping), in a file."""
    from fulltune.demo.assets import build_demo_assets
    from fulltune.demo.run import demo_config

    cfg = demo_config(build_demo_assets(Path(assets)), root / "work", root / "registry")
    path = root / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def timed(cmd: list[str], env: dict[str, str], marker: Path) -> tuple[float, float]:
    """Run `cmd` to its exit: (the whole wall time, the time from the last work-done mark to the exit)."""
    marker.unlink(missing_ok=True)
    start = time.time()
    proc = subprocess.run(cmd, env={**env, "EXIT_BENCH_MARKER": str(marker)}, capture_output=True, text=True)
    end = time.time()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    done = max(float(line) for line in marker.read_text().split())
    return end - start, end - done


def commands(a: argparse.Namespace, root: Path, env: dict[str, str]) -> dict[str, Callable[[str], list[str]]]:
    """For each kind, a function of the variant giving the command that runs it."""
    config = step_config(root, a.assets)
    rank = root / "rank.py"
    rank.write_text(RANK_PROCESS)
    train_args = train_step.build_parser().parse_args(
        ["--nproc", "2", "--steps", str(a.steps), "--hidden", "64", "--layers", "2", "--seq", "128"]
        + ["--assets", a.assets]
    )
    inputs = train_step.build_inputs(root / "train", train_args)
    port = free_port()

    def train(variant: str) -> list[str]:
        files = {"output": str(root / f"model-{variant}"), "metrics": str(root / f"metrics-{variant}.jsonl")}
        # without its metrics the last run's model is unfinished: the ranks train, not leave at once
        Path(files["metrics"]).unlink(missing_ok=True)
        trainer = TrainerArgs(
            config=inputs["config"], deepspeed=inputs["deepspeed"], dataset=inputs["dataset"], **files
        )
        return [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1"),
            *(f"--master-port={port}", str(rank), variant, *trainer.to_argv()),
        ]

    return {
        "plan": lambda v: [sys.executable, "-c", STEP_PROCESS, "plan", v, str(config)],
        "check": lambda v: [sys.executable, "-c", STEP_PROCESS, "check", v, str(config)],
        "train": train,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="runs of each variant of each kind, interleaved")
    p.add_argument("--kinds", default="plan,check,train", help="comma-separated: plan, check, train")
    p.add_argument("--steps", type=int, default=2, help="training steps of each train run")
    p.add_argument("--assets", default=os.environ.get("FULLTUNE_TEST_ASSETS", "/tmp/fulltune-bench-assets"))
    a = p.parse_args()
    env = train_step.rank_environment(argparse.Namespace(device="cpu", nproc=2))
    with tempfile.TemporaryDirectory(prefix="fulltune-exit-bench-") as tmp:
        root = Path(tmp)
        runs = commands(a, root, env)
        print(f"load before: {os.getloadavg()[0]:.2f}; {len(os.sched_getaffinity(0))} cores")
        for kind in a.kinds.split(","):
            variants = VARIANTS[kind]
            times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
            for _ in range(a.repeats):
                for variant in variants:
                    times[variant].append(timed(runs[kind](variant), env, root / "marker"))
            med = {v: [statistics.median(t[i] for t in times[v]) for i in (0, 1)] for v in variants}
            for v in variants:
                process, exit_s = med[v]
                print(f"{kind:5s} {v:8s} median process {process:6.2f} s, work done -> exit {exit_s:5.2f} s")
            for v in variants[1:]:
                print(f"{kind:5s} ratio {v} / plain (process): {med[v][0] / med['plain'][0]:.3f}")
        print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
