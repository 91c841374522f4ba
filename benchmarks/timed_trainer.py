"""`torchrun benchmarks/timed_trainer.py <trainer arguments>`: the real trainer, each loop iteration timed.

The trainer's own `step_time_s` ends when the step's loss is known; what the loop does after it
(evaluation, the checkpoint decision and its collective, logging, callbacks) is not in it. A
step-end callback here takes the wall time from one step's end to the next, which is everything
one iteration of `Recipe.train` costs, and rank 0 appends `{"done": N, "loop_s": seconds}` per step
to LOOP_TIMES_OUT (JSON lines; the first step, which has no previous end, is not written).
Everything else is the production code path (`fulltune.train.recipe.main`).

    LOOP_TIMES_OUT=loop.jsonl torchrun ... timed_trainer.py ...
"""

from __future__ import annotations

import json
import os
import time

from fulltune._process import exit_now
from fulltune.train.recipe import main


class LoopTimer:
    """A step-end callback: the wall time between consecutive step ends, appended by rank 0."""

    def __init__(self, out: str):
        self.out = out
        self.last: float | None = None

    def __call__(self, done: int, rank: int, record) -> None:
        now = time.perf_counter()
        if rank == 0 and self.last is not None:
            with open(self.out, "a") as f:
                f.write(json.dumps({"done": done, "loop_s": now - self.last}) + "\n")
        self.last = now


if __name__ == "__main__":
    exit_now(main(step_end=[LoopTimer(os.environ["LOOP_TIMES_OUT"])]))
