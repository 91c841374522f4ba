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
    with pytest.raises(DataValidationError, match=rf"{train}:2: invalid_json"):
        steps.validate_data(_cfg(train), str(report), lambda k, v: None)
    assert "invalid_json" in report.read_text()


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
