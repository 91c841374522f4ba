"""Each cycle reads its own data: `{date}` URIs, a window of days, the run's date fixed once."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from fulltune import steps, storage
from fulltune.config import ConfigError, RunConfig
from fulltune.data.window import fix_window, partitions, resolve
from fulltune.lineage import build_lineage

DAY = dt.date(2026, 11, 27)


def write_partitions(root: Path, days: list[str], records: int = 3) -> None:
    for day in days:
        part = root / f"dt={day}"
        part.mkdir(parents=True)
        lines = [json.dumps({"text": f"note {i} of {day}: HbA1c 7.1% on metformin"}) for i in range(records)]
        (part / "notes.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("template", "days", "expected"),
    [
        ("s3://d/notes/dt={date}/", 1, "s3://d/notes/dt=2026-11-27/"),
        ("s3://d/notes/dt={date}/", 3, "s3://d/notes/dt={2026-11-25,2026-11-26,2026-11-27}/"),
        ("s3://d/{date:%Y/%m/%d}/notes.jsonl", 2, "s3://d/{2026/11/26,2026/11/27}/notes.jsonl"),
        ("/data/notes-{date:%Y%m%d}.jsonl", 2, "/data/notes-{20261126.jsonl,20261127.jsonl}"),
        ("s3://d/notes/", 7, "s3://d/notes/"),  # no placeholder: the URI as written
    ],
)
def test_a_template_becomes_the_windows_partitions_as_one_uri(template, days, expected):
    assert resolve(template, DAY, days) == expected
    assert storage.alternatives(expected) == partitions(template, DAY, days)


def test_the_window_crosses_month_and_year_ends():
    assert partitions("s3://d/{date}/", dt.date(2027, 1, 1), 3) == [
        "s3://d/2026-12-30/",
        "s3://d/2026-12-31/",
        "s3://d/2027-01-01/",
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train_uri": "s3://d/dt={dt}/"}, "data.train_uri: Value error, braces other than {date}"),
        ({"train_uri": "s3://d/{date}/a,b"}, "a comma after the {date} placeholder"),
        (
            {"train_uri": "s3://d/{date}/", "as_of": "last tuesday"},
            "data.as_of: Value error, not an ISO 8601",
        ),
        ({"train_uri": "s3://d/{date}/", "window_days": 0}, "data.window_days"),
    ],
)
def test_a_bad_template_or_date_is_refused_naming_the_field(data, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"data": data})
    assert message in str(err.value)


def cycle(**data) -> RunConfig:
    return RunConfig.from_dict({"data": {"train_uri": "s3://d/dt={date}/", "window_days": 7, **data}})


def test_the_runs_date_is_as_of_else_the_scheduled_time_else_the_start():
    scheduled, created = "2026-11-22T03:00:00Z", "2026-11-24T09:12:00+00:00"
    assert fix_window(cycle(as_of="2026-10-01"), scheduled, created)["data"]["as_of"] == "2026-10-01"
    assert fix_window(cycle(), scheduled, created)["data"]["as_of"] == "2026-11-22"
    # a manual run: KFP leaves the scheduled time empty (kfp.local an unresolved placeholder)
    assert fix_window(cycle(), "", created)["data"]["as_of"] == "2026-11-24"
    assert (
        fix_window(cycle(), "{{$.pipeline_job_schedule_time_utc}}", created)["data"]["as_of"] == "2026-11-24"
    )
    assert fix_window(RunConfig.from_dict({"data": {"train_uri": "s3://d/all/"}}), scheduled) == {}


def test_configure_fixes_the_window_once_and_the_lineage_records_it(tmp_path):
    config = {
        "model": {"base_model_uri": str(tmp_path / "base")},
        "data": {"train_uri": str(tmp_path / "dt={date}"), "window_days": 2},
        "work_dir": str(tmp_path / "w"),
        "registry": {"uri": str(tmp_path / "registry")},
    }
    merged = steps.configure(config, {}, "2026-11-28T03:00:00Z", "2026-11-28T03:00:05Z")
    cfg = RunConfig.from_pipeline(merged)
    assert cfg.data.train_uri == f"{tmp_path}/dt={{2026-11-27,2026-11-28}}"
    assert cfg.data.as_of == "2026-11-28"
    # a retried configure (or any later step) sees no template left: the same partitions
    assert steps.configure(merged, {}, "2026-12-05T03:00:00Z", "") == merged
    lineage = build_lineage(cfg, run_id="r1", model_uri="m")
    assert lineage["data"]["train_uri"] == cfg.data.train_uri and lineage["data"]["as_of"] == "2026-11-28"
    assert lineage["data"]["window_days"] == 2


def test_validate_reads_the_partitions_of_the_window_and_no_others(tmp_path):
    write_partitions(tmp_path / "notes", ["2026-11-20", "2026-11-25", "2026-11-27", "2026-11-28"])
    cfg = cycle(train_uri=str(tmp_path / "notes" / "dt={date}"), as_of="2026-11-27", window_days=3)
    cfg = cfg.with_overrides(fix_window(cfg))
    report = steps.validate_data(cfg)
    assert report["datasets"]["train"]["records"] == 6  # 11-25 and 11-27; 11-26 has no partition
    # a day of the window with nothing in it (an upstream export that did not run) is said
    [missing] = [p for p in report["datasets"]["train"]["problems"] if p["code"] == "empty_location"]
    assert missing["count"] == 1 and missing["examples"][0]["location"] == f"{tmp_path}/notes/dt=2026-11-26"


def test_an_empty_window_is_refused_naming_every_resolved_uri(tmp_path):
    write_partitions(tmp_path / "notes", ["2026-11-01"])
    cfg = cycle(train_uri=str(tmp_path / "notes" / "dt={date}"), as_of="2026-11-27", window_days=2)
    cfg = cfg.with_overrides(fix_window(cfg))
    with pytest.raises(ValueError) as err:
        steps.validate_data(cfg)
    text = str(err.value)
    assert f"{tmp_path}/notes/dt=2026-11-26" in text and f"{tmp_path}/notes/dt=2026-11-27" in text
    assert "no data files found in any of 2 locations" in text


def test_a_window_on_s3_lists_each_partition(s3):
    for day in ("2026-11-26", "2026-11-27"):
        storage.write_text(f"{s3}/notes/dt={day}/a.jsonl", json.dumps({"text": day}) + "\n")
    storage.write_text(f"{s3}/notes/dt=2026-11-28/a.jsonl", json.dumps({"text": "later"}) + "\n")
    files = storage.expand(resolve(f"{s3}/notes/dt={{date}}/", DAY, 3))
    assert files == [f"{s3}/notes/dt=2026-11-26/a.jsonl", f"{s3}/notes/dt=2026-11-27/a.jsonl"]
