"""A failed step says in its run's directory whether trying it again can help (`fulltune.failure`)."""

from __future__ import annotations

import pytest

from fulltune import failure, storage
from fulltune.config import ConfigError
from fulltune.evaluate.lm_eval_backend import LMEvalMissingError
from fulltune.evaluate.tasks import EvaluateError
from fulltune.launch.base import LaunchError
from fulltune.launch.kubernetes import LaunchCancelled
from fulltune.layout import RunLayout
from fulltune.storage import StorageConfigError, StorageError
from fulltune.train.checkpoint import CheckpointError
from fulltune.train.exit_codes import EXIT_RETRYABLE


@pytest.mark.parametrize(
    ("error", "permanent"),
    [
        (ConfigError("training.learning_rate: must be > 0"), True),
        (CheckpointError("training.seed: 1 when it was written, 2 in this run"), True),
        (LaunchError("training failed: node exit codes [1]", exit_code=1), True),
        (StorageConfigError("s3://gone: the bucket does not exist"), True),
        (EvaluateError("s3://w/run/train/model: no tokenizer beside the model"), True),
        (LMEvalMissingError("evaluation.lm_eval_tasks needs lm-eval in the image"), True),
        (LaunchError("training failed: node exit codes [138]", exit_code=EXIT_RETRYABLE), False),
        (LaunchError("training failed: node killed", exit_code=-9), False),
        (LaunchCancelled("the run was canceled", exit_code=143), False),
        (StorageError("s3://b/k: endpoint unreachable"), False),
        (RuntimeError("something unforeseen"), False),
    ],
)
def test_only_the_inputs_fault_is_permanent(error, permanent):
    assert failure.is_permanent(error) is permanent


def test_a_failed_attempt_is_recorded_and_a_later_successful_one_clears_it(s3):
    layout = RunLayout.for_run(f"{s3}/work", "run-1")
    with pytest.raises(ConfigError):
        with failure.recorded(layout, "evaluate"):
            raise ConfigError("evaluation.mc_tasks[0]: no such file s3://b/tasks.jsonl")
    with pytest.raises(StorageError):
        with failure.recorded(layout, "train"):
            raise StorageError("s3://b/ckpt: endpoint unreachable")
    recorded = {f.step: f for f in failure.failures(layout)}
    assert (recorded["evaluate"].permanent, recorded["train"].permanent) == (True, False)
    assert recorded["evaluate"].first_line == "evaluation.mc_tasks[0]: no such file s3://b/tasks.jsonl"
    with failure.recorded(layout, "train"):
        pass  # KFP retried it, and this attempt succeeded
    assert [f.step for f in failure.failures(layout)] == ["evaluate"]
    assert storage.list_files(layout.failures) == [layout.failure("evaluate")]


def test_no_record_is_read_from_a_work_directory_this_machine_cannot_read(s3):
    assert failure.failures(RunLayout("s3://no-such-bucket-here/work/run-1")) == []  # on the S3 stand-in
