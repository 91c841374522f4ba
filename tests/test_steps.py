"""The step functions the components call: reports reach KFP even on failure; the work dir is run-scoped."""

from __future__ import annotations

import json

import pytest

from fulltune import steps
from fulltune.config import ConfigError
from fulltune.data.validate import DataValidationError


def test_failed_validation_still_delivers_its_html_report(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "ok"}\n{"text": broken\n')
    report = tmp_path / "artifacts" / "report.html"
    with pytest.raises(DataValidationError, match=rf"{train}:2: invalid_json"):
        steps.validate_data({"data": {"train_uri": str(train)}}, str(report), lambda k, v: None)
    assert "invalid_json" in report.read_text()


def test_passing_validation_logs_numeric_metrics(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"note {i}"}) + "\n" for i in range(5)))
    metrics = {}
    steps.validate_data({"data": {"train_uri": str(train)}}, str(tmp_path / "r.html"), metrics.__setitem__)
    assert metrics["train_records"] == 5.0 and metrics["train_bad_records"] == 0.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_bad_config_parameter_names_the_field():
    with pytest.raises(ConfigError, match=r"(?s)pipeline parameter .config.*training\.learning_rate"):
        steps.load_config({"training": {"learning_rate": "high"}})


def test_work_dir_is_scoped_to_the_run():
    cfg = steps.load_config({"work_dir": "s3://bucket/work"})
    assert steps.run_work_dir(cfg, "run-123") == "s3://bucket/work/run-123"
    with pytest.raises(ConfigError, match="work_dir: required"):
        steps.run_work_dir(steps.load_config({}), "run-123")


def test_list_shards_hands_each_iteration_its_config():
    items = steps.list_shards({"preprocess": {"num_shards": 3}})
    assert [i["shard"] for i in items] == [0, 1, 2]
    assert all(i["config"]["preprocess"]["num_shards"] == 3 for i in items)
