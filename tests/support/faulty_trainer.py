"""`python -m faulty_trainer <trainer arguments>`: the real trainer with one rank SIGKILLed after a step.

The resume tests run this entry module instead of `fulltune.train` (`TrainJob.entry_module`, with
this directory on the job's PYTHONPATH). It installs a step-end callback and calls the real
`fulltune.train.recipe.main`, so everything up to the kill is the production code path. The test
says where to strike through the job's environment:

    FAULTY_TRAINER_KILL_AFTER_STEP  optimizer steps done when the rank dies (after that step's
                                    checkpoint, if one is due, is complete)
    FAULTY_TRAINER_KILL_RANK        which rank dies (default 0)
    FAULTY_TRAINER_ONCE             a file: the rank dies only while it does not exist (it is created
                                    just before the kill), so a restarted group runs through
    FAULTY_TRAINER_KILL_IN_UPLOAD   set: the rank that writes the final model dies once its files are
                                    copied, before its manifest (the step number is then unused)
"""

from __future__ import annotations

import os
import signal

from fulltune._process import exit_now
from fulltune.train.metrics import StepRecord
from fulltune.train.recipe import main


def kill_after(step: int, rank: int, once: str | None):
    """A step-end callback that SIGKILLs `rank` once `step` optimizer steps are done: no cleanup,
    no exit code of its own, as when the OOM killer or a lost node takes a rank."""

    def callback(done: int, this_rank: int, record: StepRecord) -> None:
        if done == step and this_rank == rank:
            if once:
                if os.path.exists(once):
                    return
                open(once, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    return callback


def kill_after_upload(upload_dir):
    """`storage.upload_dir` that SIGKILLs its process once the files are copied."""

    def upload_then_die(local_dir, uri):
        upload_dir(local_dir, uri)
        os.kill(os.getpid(), signal.SIGKILL)

    return upload_then_die


if __name__ == "__main__":
    if os.environ.get("FAULTY_TRAINER_KILL_IN_UPLOAD"):
        from fulltune import storage

        storage.upload_dir = kill_after_upload(storage.upload_dir)
    after = int(os.environ["FAULTY_TRAINER_KILL_AFTER_STEP"])
    rank = int(os.environ.get("FAULTY_TRAINER_KILL_RANK", "0"))
    # leaves as `python -m fulltune.train` does: the interpreter's teardown can abort a finished gloo rank
    exit_now(main(step_end=[kill_after(after, rank, os.environ.get("FAULTY_TRAINER_ONCE"))]))
