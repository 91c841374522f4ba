"""One interface for every place training can run (local torchrun, Kubernetes PyTorchJob).

A launcher gets a `TrainJob`: the same entry point and arguments whatever the backend, plus the
topology. It starts the ranks, streams their output into this step's log, waits, and returns the
result or raises `LaunchError` with the reason. The ranks' exit codes are those of
`fulltune.train.exit_codes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fulltune.train.args import TrainerArgs

ENTRY_MODULE = "fulltune.train"
# torchrun for one node, passing on the ranks' exit codes (see launch/node.py).
NODE_MODULE = "fulltune.launch.node"


class LaunchError(RuntimeError):
    """Training did not succeed; the message carries the reason and the last log lines."""

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class TrainJob:
    name: str
    args: TrainerArgs  # the trainer's inputs and outputs
    num_nodes: int = 1
    nproc_per_node: int = 1
    accelerator: str = "gpu"
    env: dict[str, str] = field(default_factory=dict)
    # Group restarts after a retryable failure (exit 138: a killed rank, a lost peer); each resumes
    # from the newest complete checkpoint. The PyTorchJob's elasticPolicy.maxRestarts, the local
    # launcher's relaunches.
    max_restarts: int = 0
    # The module every rank runs with `args`. Tests run a wrapper that installs step-end callbacks
    # and then calls the same `fulltune.train.recipe.main`.
    entry_module: str = ENTRY_MODULE

    def entry_command(self) -> list[str]:
        """`-m <entry module> <trainer arguments>`: what torchrun starts on every rank, on every backend."""
        return ["-m", self.entry_module, *self.args.to_argv()]


class Launcher(Protocol):
    def run(self, job: TrainJob) -> None:
        """Run the job to completion; raise LaunchError if it fails."""
