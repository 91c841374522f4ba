"""The step functions the components call: reports reach KFP even on failure; the work dir is run-scoped."""

from __future__ import annotations

import json

import pytest

from fulltune import steps
from fulltune.config import ConfigError, RunConfig
from fulltune.data.validate import DataValidationError
from fulltune.layout import RunLayout


def _cfg(train) -> RunConfig:
    return RunConfig.from_dict({"data": {"train_uri": str(train)}})


def test_failed_validation_still_delivers_its_html_report(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "ok"}\n{"text": broken\n')
    report = tmp_path / "artifacts" / "report.html"
    with pytest.raises(DataValidationError, match=rf"{train}:2: invalid_json") as exc:
        steps.validate_data(_cfg(train), str(report), lambda k, v: None)
    assert "invalid_json" in report.read_text()
    # the message sends the reader to the report where it stays, not to the deleted temporary copy
    assert f"report: {report} (this step's `report` artifact)" in str(exc.value)
    assert "/fulltune-validate_data-" not in str(exc.value)


def test_in_a_pipeline_run_the_checking_reports_are_kept_in_the_runs_work_directory(tmp_path, s3):
    """KFP uploads no artifact of a failed step: on a cluster the failure's message must point to a
    copy that outlives the pod, the run's work directory (here on S3)."""
    from fulltune import failure, storage

    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "ok"}\n{"text": broken\n')
    cfg = RunConfig.from_dict({"work_dir": f"{s3}/runs", "data": {"train_uri": str(train)}})
    kept = f"{s3}/runs/run-7/checks/validate_data.html"
    with pytest.raises(DataValidationError) as exc:
        steps.validate_data(cfg, str(tmp_path / "artifact.html"), lambda k, v: None, "run-7")
    assert f"report: {kept}" in str(exc.value)
    assert "invalid_json" in storage.read_text(kept)
    (failed,) = failure.failures(RunLayout.for_run(cfg.work_dir, "run-7"))  # what retry and --wait read
    assert (failed.step, failed.permanent) == ("validate_data", True)

    train.write_text('{"text": "ok"}\n')
    steps.validate_data(cfg, str(tmp_path / "artifact.html"), lambda k, v: None, "run-8")
    assert "passed" in storage.read_text(f"{s3}/runs/run-8/checks/validate_data.html")
    assert (
        RunLayout.for_run(cfg.work_dir, "run-8")
        .check_report("validate_data")
        .endswith("checks/validate_data.html")
    )


def test_a_failed_tokenizer_check_points_to_its_report_artifact(tmp_path):
    from fulltune.tokenizer.check import TokenizerCheckError

    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "ok"}\n')
    cfg = RunConfig.from_dict(
        {"model": {"base_model_uri": str(tmp_path / "no-model")}, "data": {"train_uri": str(train)}}
    )
    report = tmp_path / "artifacts" / "tokenizer.html"
    with pytest.raises(TokenizerCheckError) as exc:
        steps.check_tokenizer(cfg, str(report), lambda k, v: None)
    assert report.exists()
    assert f"report: {report} (this step's `report` artifact)" in str(exc.value)


def test_passing_validation_logs_numeric_metrics(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"note {i}"}) + "\n" for i in range(5)))
    metrics = {}
    steps.validate_data(_cfg(train), str(tmp_path / "r.html"), metrics.__setitem__)
    assert metrics["train_records"] == 5.0 and metrics["train_bad_records"] == 0.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_bad_config_parameter_names_the_field():
    with pytest.raises(ConfigError, match=r"(?s)pipeline parameter .config.*training\.learning_rate"):
        RunConfig.from_pipeline({"training": {"learning_rate": "high"}})


def test_work_dir_is_scoped_to_the_run():
    assert RunLayout.for_run("s3://bucket/work", "run-123").root == "s3://bucket/work/run-123"
    assert RunLayout("s3://bucket/work/run-123").eval_result == "s3://bucket/work/run-123/eval/eval.json"
    with pytest.raises(ConfigError, match="work_dir: required"):
        RunLayout.for_run("", "run-123")
    with pytest.raises(ConfigError, match="work_dir: required"):
        RunConfig().layout  # noqa: B018


def test_preprocessing_fans_out_over_every_shard():
    assert steps.shard_indices(RunConfig.from_dict({"preprocess": {"num_shards": 3}})) == [0, 1, 2]
