"""The trainer's command line, defined once: `TrainerArgs` is what `python -m fulltune.train` is given.

The launchers build the command with `TrainerArgs.to_argv()` and the entry point reads it back with
`TrainerArgs.from_argv()`; both are derived from the dataclass fields (a field's name is its
`--flag`, its `help` metadata the flag's help, a field without a default a required flag), so a new
input or output is added in one place. Every value is a URI: a local path or an s3:// location.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

PROG = "python -m fulltune.train"
DESCRIPTION = (
    "The training entry point every rank runs: `python -m fulltune.train` (under torchrun locally, in "
    "every pod of the PyTorchJob on a cluster)."
)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class TrainerArgs:
    """The trainer's inputs and outputs (URIs), identical on every rank and every backend."""

    config: str = field(metadata=_help("resolved RunConfig YAML (URI), written by plan"))
    deepspeed: str = field(metadata=_help("DeepSpeed JSON (URI), written by plan"))
    dataset: str = field(metadata=_help("dataset manifest (URI), written by gather_shards"))
    output: str = field(metadata=_help("URI for the final Hugging Face model"))
    metrics: str = field(metadata=_help("URI for per-step metrics (JSON lines)"))
    checkpoints: str | None = field(
        default=None,
        metadata=_help("URI for checkpoints; training resumes from the newest complete one"),
    )

    def to_argv(self) -> list[str]:
        """`--flag value` for every required field, and for every optional one that is set."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.default is MISSING or value:
                argv += [f"--{f.name}", value]
        return argv

    @classmethod
    def from_argv(cls, argv: list[str] | None) -> TrainerArgs:
        """Parse the command line (`None`: sys.argv); a bad one exits 2 with argparse's usage message."""
        parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
        for f in fields(cls):
            required = f.default is MISSING
            parser.add_argument(
                f"--{f.name}",
                required=required,
                default=None if required else f.default,
                help=f.metadata["help"],
            )
        return cls(**vars(parser.parse_args(argv)))
