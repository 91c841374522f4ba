"""What a valid config still needs to run on a cluster: refused by `config --check --for-cluster`
(and by submit and schedule) with the field and the fix, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fulltune.cli import main
from fulltune.cluster_config import cluster_problems
from fulltune.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "pipelines" / "examples").glob("*.yaml"))
READY = {
    "work_dir": "s3://work/runs",
    "model": {"base_model_uri": "s3://models/llama"},
    "data": {"train_uri": "s3://data/train.jsonl"},
    "registry": {"uri": "s3://models/registry"},
    "resources": {"launcher": "kubernetes"},
}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_is_ready_for_a_cluster(example, capsys):
    assert main(["config", "--check", str(example), "--for-cluster"]) == 0
    assert "ready for a cluster" in capsys.readouterr().out


def test_an_empty_config_is_valid_but_not_for_a_cluster(tmp_path, capsys):
    """The chart's default `runConfig: {}` parses; scheduled, it would run with no model and no data."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert main(["config", "--check", str(empty)]) == 0
    assert main(["config", "--check", str(empty), "--for-cluster"]) == 1
    err = capsys.readouterr().err
    assert f"{empty}: cannot run on a cluster" in err
    assert "model.base_model_uri: required" in err and "data.train_uri: required" in err
    # and the two a run would otherwise fail on only at plan, or at register after all the training
    assert (
        "work_dir: required (where the run's shards" in err
        and "registry.uri: required (where register" in err
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"resources": {"launcher": "local"}}, "resources.launcher: local with resources.accelerator: gpu"),
        (
            {"resources": {"launcher": "local", "accelerator": "cpu", "num_nodes": 2}},
            "resources.num_nodes: 2 needs resources.launcher: kubernetes or trainjob",
        ),
        (
            {"resources": {"launcher": "trainjob", "kubernetes": {"affinity": {"nodeAffinity": {}}}}},
            "resources.kubernetes.affinity: a TrainJob (resources.launcher: trainjob) has no place for it; "
            "set it in the runtime (the chart: trainJob.runtime.affinity)",
        ),
        ({"work_dir": "/tmp/run"}, "work_dir: '/tmp/run' is a path on this machine"),
        ({"registry": {"uri": "./models"}}, "registry.uri: './models' is a path on this machine"),
        (
            {"evaluation": {"mc_tasks": [{"name": "med", "uri": "/data/med.jsonl"}]}},
            "evaluation.mc_tasks[0].uri: '/data/med.jsonl' is a path on this machine",
        ),
    ],
)
def test_each_laptop_only_setting_is_named_with_its_fix(change, expected):
    merged = {**READY, **change}
    if "resources" in change:
        merged["resources"] = {**READY["resources"], **change["resources"]}
    problems = cluster_problems(RunConfig.from_dict(merged))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_cpu_run_with_the_local_launcher_and_paths_on_a_shared_volume_are_fine():
    """One CPU node trains inside its step pod; a path under a volume every pod mounts is shared."""
    cfg = RunConfig.from_dict(
        {
            **READY,
            "work_dir": "/work/runs/r1",
            "model": {"base_model_uri": "/work/models/llama"},
            "resources": {
                "launcher": "local",
                "accelerator": "cpu",
                "kubernetes": {"volumes": [{"claim_name": "work", "mount_path": "/work"}]},
            },
        }
    )
    assert cluster_problems(cfg) == []
    beside = cfg.with_overrides({"work_dir": "/workspace/r1"})  # a prefix of the path, not under it
    assert [p.split(":")[0] for p in cluster_problems(beside)] == ["work_dir"]


def test_the_local_launcher_with_gpus_names_both_cluster_launchers():
    cfg = RunConfig.from_dict({**READY, "resources": {"launcher": "local"}})
    [problem] = cluster_problems(cfg)
    assert "set resources.launcher: kubernetes or trainjob" in problem and "fulltune doctor" in problem


def test_a_trainjob_config_without_runtime_only_settings_is_ready():
    assert cluster_problems(RunConfig.from_dict({**READY, "resources": {"launcher": "trainjob"}})) == []
