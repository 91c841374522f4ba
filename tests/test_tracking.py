"""training.report_to: rank 0's TensorBoard event files, read back with TensorBoard's own reader, and
reporting that never fails a run."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from fulltune.config import RunConfig
from fulltune.train.metrics import StepRecord
from fulltune.train.tracking import TensorBoardTracker, build_trackers
from test_train import tensorboard_scalars


def record(step: int, eval_loss: float | None = None) -> StepRecord:
    return StepRecord(
        step=step,
        loss=3.0 - step / 10,
        lr=1e-4,
        grad_norm=0.5,
        tokens=512,
        tokens_per_s=1000.0,
        step_time_s=0.5,
        eval_loss=eval_loss,
    )


def test_scalars_land_at_their_step_and_only_what_was_measured(tmp_path):
    tracker = TensorBoardTracker(str(tmp_path / "tb"), logging_steps=2, total_steps=3)
    tracker.write_config("training:\n  learning_rate: 0.0001\n")
    for done in (1, 2, 3):
        tracker(done, 0, record(done - 1, eval_loss=2.5 if done == 2 else None))
    tracker.close()
    scalars = tensorboard_scalars(str(tmp_path / "tb"))
    assert [(s.step, round(s.value, 4)) for s in scalars["train/loss"]] == [(1, 3.0), (2, 2.9), (3, 2.8)]
    assert [(s.step, s.value) for s in scalars["eval/loss"]] == [(2, 2.5)]
    assert "train/mfu" not in scalars  # not measured on the CPU


def test_a_resumed_attempt_hides_what_the_failed_one_wrote_after_its_checkpoint(tmp_path):
    """The first attempt logs steps 1-4 and dies; the second resumes from the step-3 checkpoint and
    runs step 4 again: TensorBoard shows each step once, 4-6 with the second attempt's figures.
    (A re-run step equal to the last one logged is not out of order, which TensorBoard's readers
    would hide by themselves; only the purge hides it.)"""
    failed = TensorBoardTracker(str(tmp_path / "tb"), logging_steps=1, total_steps=6)
    for done in range(1, 5):
        failed(done, 0, record(done - 1))
    failed.writer.flush()  # what a killed attempt left on disk
    # TensorBoard reads a directory's event files in name order, which starts with the second the
    # writer opened; a real restart comes seconds later, this one may come within the same second
    [events] = (tmp_path / "tb").iterdir()
    parts = events.name.split(".")  # events.out.tfevents.<seconds>.<host>.<pid>.<n>
    parts[3] = f"{int(parts[3]) - 60:010d}"
    events.rename(events.with_name(".".join(parts)))
    resumed = TensorBoardTracker(str(tmp_path / "tb"), logging_steps=1, total_steps=6, first_step=3)
    for done in range(4, 7):
        resumed(done, 0, dataclasses.replace(record(done - 1), loss=1.0))
    resumed.close()
    scalars = tensorboard_scalars(str(tmp_path / "tb"))
    assert [(s.step, round(s.value, 4)) for s in scalars["train/loss"]] == [
        (1, 3.0),
        (2, 2.9),
        (3, 2.8),
        (4, 1.0),
        (5, 1.0),
        (6, 1.0),
    ]


def test_only_rank_0_reports_and_none_means_nothing(tmp_path):
    cfg = RunConfig.from_dict({"work_dir": str(tmp_path), "training": {"report_to": "tensorboard"}})
    assert cfg.training.report_to == ["tensorboard"]
    assert build_trackers(cfg, rank=1, total_steps=3) == []
    [tracker] = build_trackers(cfg, rank=0, total_steps=3)
    assert tracker.destination == cfg.layout.tensorboard
    tracker.close()
    assert build_trackers(RunConfig.from_dict({"work_dir": str(tmp_path)}), rank=0, total_steps=3) == []


def test_a_destination_that_cannot_be_written_is_a_warning_and_training_goes_on(
    tmp_path, monkeypatch, caplog
):
    # an S3 endpoint nobody listens on: every upload fails, after the client's bounded retries
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    from fulltune import storage

    storage.s3_client.cache_clear()
    tracker = TensorBoardTracker("s3://nowhere/run/train/tensorboard", logging_steps=1, total_steps=2)
    with caplog.at_level(logging.WARNING, logger="fulltune.train"):
        tracker(1, 0, record(0))
        tracker(2, 0, record(1))
        tracker.close()
    warnings = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warnings) == 1 and "training goes on" in warnings[0]  # once, not every step
    storage.s3_client.cache_clear()


@pytest.mark.parametrize("bad", ["wandb", ["tensorboard", "comet"]])
def test_an_unknown_destination_is_refused_naming_the_field(bad):
    from fulltune.config import ConfigError

    with pytest.raises(ConfigError, match="training.report_to"):
        RunConfig.from_dict({"training": {"report_to": bad}})
