"""`torchrun benchmarks/profiled_trainer.py <trainer arguments>`: the real trainer, profiled for a few steps.

The GPU check runs this instead of `python -m fulltune.train` where it wants to know where a step's
time goes. A step-end callback starts `torch.profiler` after step PROFILE_AFTER_STEP and stops it
PROFILE_STEPS steps later; rank 0 writes the operator table (sorted by device time on a GPU, CPU
time otherwise), the summary line and, on a GPU, where the device waited (`gpu_gaps`: idle gaps and
the host code that ran during them; with PROFILE_STACK=1 named by Python frame) to PROFILE_OUT. Everything else is the production code path
(`fulltune.train.recipe.main`); the steps under the profiler are slower, so the caller leaves them
out of its timings.

    PROFILE_OUT=profile.txt PROFILE_AFTER_STEP=8 PROFILE_STEPS=2 PROFILE_STACK=1 \
        torchrun ... profiled_trainer.py ...
"""

from __future__ import annotations

import os
import time

import torch
from gpu_gaps import profile_gaps

from fulltune._process import exit_now
from fulltune.train.recipe import main


class StepProfiler:
    """A step-end callback: profile steps (after, after + steps]; write the table once they are done."""

    def __init__(self, out: str, after: int, steps: int, with_stack: bool = False):
        self.out, self.after, self.steps, self.with_stack = out, after, steps, with_stack
        self.prof = None
        self.t0 = 0.0

    def __call__(self, done: int, rank: int, record) -> None:
        if done == self.after:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, with_stack=self.with_stack)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.prof is not None and done == self.after + self.steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            if rank == 0:
                self.write(wall)
            self.prof = None

    def write(self, wall_s: float) -> None:
        cuda = torch.cuda.is_available()
        events = self.prof.key_averages()
        # kernels only: an operator's own device time is the sum of its kernels', which also appear as rows
        kernels = [e for e in events if str(e.device_type).endswith("CUDA")]
        device_us = sum(e.self_device_time_total for e in kernels)
        table = events.table(
            sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=30
        )
        busy = f"device busy {device_us / 1e6 / wall_s:.1%} of the wall time" if cuda else "no device"
        t0 = time.perf_counter()
        try:
            gaps = profile_gaps(self.prof.events())
        except Exception as e:  # noqa: BLE001 - an unread gap report must not cost the run's figures
            gaps = f"gap report failed: {e!r}\n"
        gaps += f"(read from the events in {time.perf_counter() - t0:.1f} s)\n"
        with open(self.out, "w") as f:
            f.write(f"{self.steps} steps in {wall_s:.3f} s under the profiler; {busy}\n{table}\n\n{gaps}")


if __name__ == "__main__":
    profiler = StepProfiler(
        os.environ["PROFILE_OUT"],
        int(os.environ["PROFILE_AFTER_STEP"]),
        int(os.environ.get("PROFILE_STEPS", "2")),
        with_stack=os.environ.get("PROFILE_STACK") == "1",
    )
    exit_now(main(step_end=[profiler]))
