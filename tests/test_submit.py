"""`fulltune submit` / `fulltune schedule` against a stand-in of the KFP v2beta1 REST API on localhost,
and the cluster settings of the compiled pipeline (S3 Secret, evaluate's GPU, caching policy).

The real kfp.Client does the HTTP; tests/kfp_standin.py answers like the KFP API server and records
every request, so these tests see what a cluster would receive.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import yaml

from fulltune import __version__, parameters, storage
from fulltune.cli import main
from fulltune.config import RunConfig
from fulltune.kfp.compile import PIPELINE_FILE, compile_all
from fulltune.kfp.pipeline import S3_SECRET, S3_SECRET_KEYS
from fulltune.launch.kubernetes import launcher_access
from fulltune.layout import RunLayout
from k8s_standin import FakeKube
from kfp_standin import KFPStandIn
from support.crd_schema import TRAINJOB_CRDS, crd_schema

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / PIPELINE_FILE
EXAMPLE = ROOT / "pipelines" / "examples" / "llama-8b-clinical.yaml"


@pytest.fixture(autouse=True)
def _no_ambient_kfp_settings(monkeypatch, tmp_path):
    for name in (
        "KFP_HOST",
        "KFP_BEARER_TOKEN",
        "KFP_NAMESPACE",
        "KF_PIPELINES_UI_ENDPOINT",
        "KUBERNETES_SERVICE_HOST",
    ):
        monkeypatch.delenv(name, raising=False)
    # never pick up a real pod's service-account token, namespace, kube context or account
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-token-here"))
    monkeypatch.setattr("fulltune.kfp.submit.POD_NAMESPACE_FILE", str(tmp_path / "no-namespace-here"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig-here"))
    monkeypatch.delenv("FULLTUNE_SERVICE_ACCOUNT", raising=False)


@pytest.fixture
def kfp():
    with KFPStandIn() as server:
        yield server


@pytest.fixture
def params(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(EXAMPLE.read_text())
    return path


def submit(kfp, params, *extra, package=PACKAGE) -> int:
    args = ["submit", "--host", kfp.url, "--poll-interval", "0.01"]
    if params is not None:
        args += ["--params", str(params)]
    if package is not None:
        args += ["--package", str(package)]
    return main([*args, *extra])


def schedule(kfp, params, *extra) -> int:
    return main(["schedule", "--host", kfp.url, "--params", str(params), "--package", str(PACKAGE), *extra])


def sent_config(sent: dict) -> dict:
    """The config a run gets from the parameters sent (what the pipeline's configure step computes),
    with fulltune's defaults filled in."""
    typed = {k: v for k, v in sent.items() if k != "config"}
    assert set(typed) == set(parameters.NAMES)  # every typed parameter explicit, whatever the defaults
    return RunConfig.from_dict(parameters.resolve(sent["config"], typed)).to_dict()


def config_of(path_or_mapping) -> dict:
    """A RunConfig file or mapping with fulltune's defaults filled in."""
    data = (
        path_or_mapping if isinstance(path_or_mapping, dict) else yaml.safe_load(path_or_mapping.read_text())
    )
    return RunConfig.from_dict(data).to_dict()


def changed_package(tmp_path) -> Path:
    """The same pipeline with one executor's image changed: different content, same name."""
    docs = list(yaml.safe_load_all(PACKAGE.read_text()))
    for executor in docs[0]["deploymentSpec"]["executors"].values():
        executor["container"]["image"] = "registry.example/fulltune:9.9.9"
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


# -- submit -----------------------------------------------------------------------------------------


def test_submit_uploads_the_pipeline_and_starts_a_run_with_the_config(kfp, params, capsys):
    assert submit(kfp, params) == 0
    out = capsys.readouterr().out

    [pipeline] = kfp.pipelines.values()
    assert pipeline["display_name"] == "full-finetune"
    [version] = kfp.versions_of("full-finetune")
    sha = hashlib.sha256(PACKAGE.read_bytes()).hexdigest()
    assert version["display_name"] == f"{__version__}-{sha[:12]}"
    assert kfp.packages[version["pipeline_version_id"]] == PACKAGE.read_bytes()
    [experiment] = kfp.experiments.values()
    assert experiment["display_name"] == "fulltune"

    [run] = kfp.runs.values()
    assert run["experiment_id"] == experiment["experiment_id"]
    assert run["pipeline_version_reference"] == {
        "pipeline_id": pipeline["pipeline_id"],
        "pipeline_version_id": version["pipeline_version_id"],
    }
    sent = run["runtime_config"]["parameters"]
    assert (
        sent["base_model_uri"] == "s3://ml-models/meta-llama/Llama-3.1-8B"
    )  # a typed parameter: the UI shows it
    assert sent_config(sent) == config_of(EXAMPLE)
    assert run["display_name"].startswith("llama-3.1-8b-clinical ")
    assert f"run id: {run['run_id']}" in out
    assert f"run url: {kfp.url}/#/runs/details/{run['run_id']}" in out


def test_a_json_params_file_and_a_named_experiment(kfp, tmp_path):
    path = tmp_path / "run.json"
    config = yaml.safe_load(EXAMPLE.read_text())
    path.write_text(json.dumps(config))
    assert submit(kfp, path, "--experiment", "clinical", "--run-name", "nightly") == 0
    [run] = kfp.runs.values()
    assert run["display_name"] == "nightly"
    assert sent_config(run["runtime_config"]["parameters"]) == config_of(config)
    assert [e["display_name"] for e in kfp.experiments.values()] == ["clinical"]


def test_a_param_fills_a_field_the_file_leaves_out_and_a_field_set_twice_differently_is_refused(
    kfp, params, capsys
):
    assert submit(kfp, params, "--param", "learning_rate=2e-5", "--param", "max_seq_len=4096") == 0
    [run] = kfp.runs.values()
    sent = run["runtime_config"]["parameters"]
    assert sent["learning_rate"] == 2e-5 and sent_config(sent)["training"]["learning_rate"] == 2e-5
    # the example sets preprocess.max_seq_len: 4096; --param max_seq_len=2048 says otherwise
    assert submit(kfp, params, "--param", "max_seq_len=2048") == 2
    err = capsys.readouterr().err
    assert f"--param max_seq_len=2048 and {params} preprocess.max_seq_len=4096" in err
    assert "nothing was submitted" in err and len(kfp.runs) == 1


def test_a_parameters_file_gives_typed_values_and_config_and_a_param_overrides_its_values(kfp, tmp_path):
    example = yaml.safe_load(EXAMPLE.read_text())
    rest = {k: v for k, v in example.items() if k not in ("model", "data")}
    path = tmp_path / "params.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base_model_uri": "s3://ml-models/qwen",
                "train_uri": "s3://ml-data/train.jsonl",
                "model_name": "from-file",
                "config": rest,
            }
        )
    )
    assert submit(kfp, path, "--param", "model_name=from-command-line") == 0
    [run] = kfp.runs.values()
    cfg = sent_config(run["runtime_config"]["parameters"])
    assert cfg["model"] == {
        **cfg["model"],
        "base_model_uri": "s3://ml-models/qwen",
        "name": "from-command-line",
    }
    assert cfg["data"]["train_uri"] == "s3://ml-data/train.jsonl"
    assert cfg["resources"]["launcher"] == "kubernetes"  # from its config
    assert run["display_name"].startswith("from-command-line ")


def test_a_file_mixing_parameters_and_config_sections_is_refused_naming_both(kfp, tmp_path, capsys):
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump({"learning_rate": 1e-5, "training": {"max_steps": 10}}))
    assert submit(kfp, path) == 2
    err = capsys.readouterr().err
    assert "mixes pipeline parameters (learning_rate) and RunConfig fields (training)" in err
    assert kfp.requests == []


@pytest.fixture
def cluster_defaults(tmp_path) -> Path:
    """What the Helm chart knows about its cluster: where to work and register, how to train."""
    path = tmp_path / "cluster.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "work_dir": "s3://team/work",
                "registry": {"uri": "s3://team/registry"},
                "resources": {
                    "launcher": "kubernetes",
                    "kubernetes": {
                        "image": "ghcr.io/fulltune/fulltune-trainer:1",
                        "secret_env": ["fulltune-s3"],
                    },
                },
            }
        )
    )
    return path


def test_defaults_make_the_uploaded_pipeline_a_form_needing_only_model_data_and_name(kfp, cluster_defaults):
    form = ["--param", "base_model_uri=s3://m/qwen", "--param", "train_uri=s3://d/t.jsonl"]
    assert submit(kfp, None, "--defaults", str(cluster_defaults), *form, "--param", "model_name=support") == 0
    # the uploaded version: the cluster's settings are the defaults of the form and of `config`
    [version] = kfp.versions_of("full-finetune")
    uploaded = next(yaml.safe_load_all(kfp.packages[version["pipeline_version_id"]]))
    inputs = uploaded["root"]["inputDefinitions"]["parameters"]
    assert inputs["registry_uri"]["defaultValue"] == "s3://team/registry"
    assert inputs["config"]["defaultValue"]["resources"]["launcher"] == "kubernetes"
    assert "registry" not in inputs["config"]["defaultValue"]  # a typed field lives in its own parameter
    assert uploaded["deploymentSpec"] == next(yaml.safe_load_all(PACKAGE.read_text()))["deploymentSpec"]
    # the run gave only the model, the data and a name, and runs with the cluster's settings
    [run] = kfp.runs.values()
    cfg = sent_config(run["runtime_config"]["parameters"])
    assert cfg["registry"]["uri"] == "s3://team/registry" and cfg["work_dir"] == "s3://team/work"
    assert cfg["resources"]["kubernetes"]["image"] == "ghcr.io/fulltune/fulltune-trainer:1"
    assert cfg["model"]["name"] == "support" and cfg["data"]["train_uri"] == "s3://d/t.jsonl"
    # the same defaults again: the same bytes, the same version
    assert submit(kfp, None, "--defaults", str(cluster_defaults), *form) == 0
    assert len(kfp.versions_of("full-finetune")) == 1


def test_upload_puts_the_pipeline_with_its_defaults_on_kfp_and_starts_nothing(kfp, cluster_defaults, capsys):
    command = ["upload", "--host", kfp.url, "--package", str(PACKAGE), "--defaults", str(cluster_defaults)]
    assert main([*command, "--dry-run"]) == 0
    out = capsys.readouterr().out
    shown = json.loads(
        next(line for line in out.splitlines() if line.startswith("parameter defaults: "))[20:]
    )
    assert shown["registry_uri"] == "s3://team/registry" and "dry run: nothing was sent" in out
    assert kfp.requests == []
    # a CI job gets the same as one JSON object on stdout, the progress lines on stderr
    assert main([*command, "--dry-run", "--output", "json"]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert got["dry_run"] is True and got["parameters"] == shown and got["kfp_host"] == kfp.url
    assert got["would_create"] == "pipeline version" and "dry run: nothing was sent" in captured.err
    assert kfp.requests == []

    assert main([*command, "--output", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    [version] = kfp.versions_of("full-finetune")
    assert result["pipeline_version"]["version_id"] == version["pipeline_version_id"] and result["uploaded"]
    assert result["url"].endswith(
        f"/#/pipelines/details/{version['pipeline_id']}/version/{version['pipeline_version_id']}"
    )
    uploaded = next(yaml.safe_load_all(kfp.packages[version["pipeline_version_id"]]))
    assert (
        uploaded["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]["work_dir"]
        == "s3://team/work"
    )
    assert kfp.runs == {} and kfp.experiments == {}  # nothing started, no experiment made
    assert main(command) == 0 and "already there" in capsys.readouterr().out


def test_upload_takes_a_parameters_file_as_defaults_as_submit_params_does(kfp, tmp_path, capsys):
    # the file a run is submitted with, {typed parameter: value, config: {...}}, as the form's defaults
    path = tmp_path / "team.yaml"
    path.write_text(
        "registry_uri: s3://team/registry\nlearning_rate: 2.0e-5\n"
        "config:\n  work_dir: s3://team/work\n  resources:\n    launcher: kubernetes\n"
    )
    command = ["upload", "--host", kfp.url, "--package", str(PACKAGE), "--defaults", str(path)]
    assert main([*command, "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    shown = json.loads(
        next(line for line in out.splitlines() if line.startswith("parameter defaults: "))[20:]
    )
    assert shown["registry_uri"] == "s3://team/registry" and shown["learning_rate"] == 2e-5
    assert shown["config"] == {"work_dir": "s3://team/work", "resources": {"launcher": "kubernetes"}}
    assert kfp.requests == []


def test_upload_refuses_defaults_that_are_not_a_valid_config(kfp, tmp_path, capsys):
    bad = tmp_path / "cluster.yaml"
    bad.write_text("resources:\n  launcher: slurm\n")
    assert main(["upload", "--host", kfp.url, "--package", str(PACKAGE), "--defaults", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: 1 invalid field(s)" in err and "resources.launcher" in err
    assert "nothing was uploaded" in err and "submitted" not in err  # upload starts no run
    assert kfp.requests == []


def test_resubmitting_the_same_package_reuses_its_version(kfp, params, capsys):
    assert submit(kfp, params) == 0
    assert submit(kfp, params) == 0
    assert "already there" in capsys.readouterr().out
    assert len(kfp.versions_of("full-finetune")) == 1
    assert len(kfp.calls("POST", r"/apis/v2beta1/pipelines/upload_version")) == 1
    assert len(kfp.pipelines) == 1 and len(kfp.experiments) == 1
    first, second = kfp.runs.values()
    assert first["pipeline_version_reference"] == second["pipeline_version_reference"]


def test_a_changed_package_becomes_a_new_version_of_the_same_pipeline(kfp, params, tmp_path):
    changed = changed_package(tmp_path)
    assert submit(kfp, params) == 0
    assert submit(kfp, params, package=changed) == 0
    assert len(kfp.pipelines) == 1
    versions = kfp.versions_of("full-finetune")
    assert len(versions) == 2
    by_id = {v["pipeline_version_id"]: v for v in versions}
    first, second = (by_id[r["pipeline_version_reference"]["pipeline_version_id"]] for r in kfp.runs.values())
    assert first["display_name"].endswith(hashlib.sha256(PACKAGE.read_bytes()).hexdigest()[:12])
    assert second["display_name"].endswith(hashlib.sha256(changed.read_bytes()).hexdigest()[:12])
    assert "registry.example/fulltune:9.9.9" in json.dumps(second["pipeline_spec"])


def test_without_package_the_pipeline_is_compiled_and_matches_the_checked_in_yaml(kfp, params):
    assert submit(kfp, params, package=None) == 0
    [version_id] = kfp.packages
    assert kfp.packages[version_id] == PACKAGE.read_bytes()


def test_wait_returns_0_when_the_run_succeeds(kfp, params, capsys):
    kfp.script_runs(["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"])
    assert submit(kfp, params, "--wait") == 0
    [run] = kfp.runs.values()
    assert f"run {run['run_id']}: SUCCEEDED" in capsys.readouterr().out
    assert len(kfp.calls("GET", rf"/apis/v2beta1/runs/{run['run_id']}")) == 4


def pipeline_outputs(bucket: str, *, passed: bool):
    """What the pipeline's evaluate and register steps leave in S3 for a run (the stand-in calls it
    as the run is created): eval.json under the run's work directory, and for a model that passed,
    a committed version whose manifest names the run, which production then names."""
    from eval_samples import DOMAIN_GAIN, eval_record
    from fulltune import storage
    from fulltune.layout import RunLayout
    from fulltune.registry import pointers

    def write(run: dict) -> None:
        layout = RunLayout.for_run(f"{bucket}/work", run["run_id"])
        check = {**DOMAIN_GAIN, "passed": passed}
        storage.write_json(layout.eval_result, eval_record(checks=[check]))
        if passed:
            manifest = {"name": "clinic", "version": 1, "run_id": run["run_id"], "files": []}
            storage.write_json(f"{bucket}/registry/clinic/v1/manifest.json", manifest)
            pointers.move(
                f"{bucket}/registry", "clinic", pointers.PRODUCTION, 1, action="promote", reason="first"
            )

    return write


def params_in_s3(tmp_path, s3: str) -> Path:
    """The example's params with the run's work directory and the registry in the `s3` bucket, which
    the stand-in's runs write into and the CLI reads back."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config.update(work_dir=f"{s3}/work", registry={"uri": f"{s3}/registry"})
    config["model"]["name"] = "clinic"
    params = tmp_path / "run.yaml"
    params.write_text(yaml.safe_dump(config))
    return params


def run_that_fails_in_training(kfp, params: Path, capsys, on_run, *, exit_code: int) -> tuple[str, str]:
    """`submit --wait` of a run that fails at train after `on_run` wrote its outputs: its id, and what
    the CLI said on stderr."""
    kfp.on_run = on_run
    kfp.script_runs(["RUNNING", "FAILED"], error=f"train: exit code {exit_code}", failed_task="train")
    assert submit(kfp, params, "--wait") == 1
    [failed] = kfp.runs.values()
    return failed["run_id"], capsys.readouterr().err


def test_wait_ends_with_the_verdict_and_the_version_the_run_registered(kfp, tmp_path, s3, capsys):
    """CI waits on a run: a run whose gate refused the model succeeds too, so the end says which it
    was, from the run's own outputs (read with this machine's S3 credentials)."""
    params = params_in_s3(tmp_path, s3)
    kfp.on_run = pipeline_outputs(s3, passed=True)
    assert submit(kfp, params, "--wait", "--output", "json") == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert (got["verdict"], got["registered"], got["production"]) == ("pass", f"{s3}/registry/clinic/v1", 1)
    assert (
        "verdict:            PASS\n" in captured.err and "production:         v1 (this run's)" in captured.err
    )

    kfp.on_run = pipeline_outputs(s3, passed=False)
    assert submit(kfp, params, "--wait") == 0
    out = capsys.readouterr().out
    assert "verdict:            FAIL\n" in out and "registered model:   none — the gate refused" in out


def test_retry_runs_a_failed_run_again_as_the_same_run_and_ends_with_its_verdict(kfp, tmp_path, s3, capsys):
    """A run that failed in training (its node lost past the job's restarts) is retried from CI:
    the same run id, so the same work directory, where train resumes from the run's checkpoints;
    --wait ends as submit --wait does. A run that did not fail is not retried."""
    params = params_in_s3(tmp_path, s3)
    outputs = pipeline_outputs(s3, passed=True)

    def checkpointed(run: dict) -> None:  # training got to step 40 before it failed
        outputs(run)
        root = RunLayout.for_run(f"{s3}/work", run["run_id"]).checkpoints
        storage.write_json(f"{root}/step-00000040/checkpoint.json", {"step": 40, "files": []})

    run_id, said = run_that_fails_in_training(kfp, params, capsys, checkpointed, exit_code=138)
    assert (
        "training saved a complete checkpoint at step 40; to go on from it: "
        f"fulltune retry {run_id} --host {kfp.url} --wait" in said
    )

    kfp.script_runs(["RUNNING", "SUCCEEDED"])
    retry = ["retry", run_id, "--host", kfp.url, "--poll-interval", "0.01"]
    printed = said.split("to go on from it: ")[1].splitlines()[0].split()  # pasted, KFP_HOST unset
    assert main([*printed[1:], "--poll-interval", "0.01", "--output", "json"]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert (got["run_id"], got["state"], got["verdict"], got["production"]) == (
        run_id,
        "SUCCEEDED",
        "pass",
        1,
    )
    assert f"retrying run {run_id} (FAILED): " in captured.err and "verdict:            PASS" in captured.err
    assert len(kfp.runs) == 1 and len(kfp.calls("POST", rf"/apis/v2beta1/runs/{run_id}:retry")) == 1

    assert main(retry) == 1
    assert (
        f"run {run_id} is SUCCEEDED: only a failed or canceled run can be retried" in capsys.readouterr().err
    )
    assert len(kfp.calls("POST", rf"/apis/v2beta1/runs/{run_id}:retry")) == 1


def test_a_run_that_failed_on_its_input_is_not_retried_unless_forced(kfp, tmp_path, s3, capsys):
    """Retrying a run whose train step refused its checkpoints (or data, or config) asks for the GPUs
    again and fails the same way: submit --wait says so instead of suggesting a retry, and retry
    refuses, naming the step and the error, unless --force."""
    from fulltune import failure
    from fulltune.train.checkpoint import CheckpointError

    params = params_in_s3(tmp_path, s3)
    refusal = "training.learning_rate: 0.0001 when it was written, 0.0003 in this run"

    def refused_its_checkpoint(run: dict) -> None:  # what the train step leaves as it fails
        layout = RunLayout.for_run(f"{s3}/work", run["run_id"])
        storage.write_json(f"{layout.checkpoints}/step-00000040/checkpoint.json", {"step": 40, "files": []})
        with pytest.raises(CheckpointError), failure.recorded(layout, "train"):
            raise CheckpointError(f"{layout.checkpoints}/step-00000040 was written by another run: {refusal}")

    run_id, said = run_that_fails_in_training(kfp, params, capsys, refused_its_checkpoint, exit_code=1)
    assert "train failed on its input (CheckpointError: " in said and refusal in said
    assert "a retry would fail the same way; fix it and submit a new run" in said
    assert "fulltune retry" not in said

    retry = ["retry", run_id, "--host", kfp.url]
    assert main(retry) == 1
    err = capsys.readouterr().err
    assert f"run {run_id}: train failed on its input (CheckpointError: " in err and refusal in err
    assert "retry with --force" in err
    assert not kfp.calls("POST", rf"/apis/v2beta1/runs/{run_id}:retry")
    assert main([*retry, "--force"]) == 0
    assert len(kfp.calls("POST", rf"/apis/v2beta1/runs/{run_id}:retry")) == 1


def test_wait_says_when_the_verdict_cannot_be_read_here_and_still_succeeds(kfp, tmp_path, s3, capsys):
    """The work directory in a bucket this machine cannot see (another account, another endpoint)."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config.update(work_dir="s3://elsewhere-team-bucket/work")
    params = tmp_path / "run.yaml"
    params.write_text(yaml.safe_dump(config))
    assert submit(kfp, params, "--wait", "--output", "json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["verdict"] is None
    assert "the run's verdict was not read here (" in captured.err and "elsewhere-team-bucket" in captured.err


def test_wait_fails_with_the_state_and_the_error_when_the_run_fails(kfp, params, capsys):
    kfp.script_runs(["RUNNING", "FAILED"], error="train: exit code 1 (out of memory)", failed_task="train")
    assert submit(kfp, params, "--wait") == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out
    assert "FAILED" in captured.err
    assert "error: train: exit code 1 (out of memory)" in captured.err
    assert "task train: train: exit code 1 (out of memory)" in captured.err


def test_output_json_gives_ci_one_object_on_stdout_also_for_a_failed_run(kfp, params, capsys):
    kfp.script_runs(["RUNNING", "SUCCEEDED"])
    assert submit(kfp, params, "--wait", "--output", "json") == 0
    captured = capsys.readouterr()
    [run] = kfp.runs.values()
    got = json.loads(captured.out)  # stdout is exactly one JSON object; the progress went to stderr
    assert got["run_id"] == run["run_id"] and got["state"] == "SUCCEEDED"
    assert got["url"].endswith(f"/#/runs/details/{run['run_id']}") and got["pipeline_version"]["version_id"]
    assert f"run id: {run['run_id']}" in captured.err

    kfp.script_runs(["FAILED"], error="train: exit code 1", failed_task="train")
    assert submit(kfp, params, "--wait", "--output", "json") == 1
    failed = json.loads(capsys.readouterr().out)
    assert failed["state"] == "FAILED" and failed["run_id"] != run["run_id"]

    assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * * 0", "--output", "json") == 0
    got = json.loads(capsys.readouterr().out)
    assert got["action"] == "created" and got["recurring_run_id"] and got["cron"]


def test_wait_treats_a_canceled_run_as_finished_and_failed(kfp, params, capsys):
    kfp.script_runs(["RUNNING", "CANCELED"])
    assert submit(kfp, params, "--wait", "--timeout", "30") == 1
    assert "CANCELED" in capsys.readouterr().err


def test_wait_gives_up_after_the_timeout(kfp, params, capsys):
    kfp.script_runs(["RUNNING"])
    assert submit(kfp, params, "--wait", "--timeout", "0.2") == 3
    assert "still RUNNING after 0.2s" in capsys.readouterr().err

    # the run goes on without the wait: CI still gets its id, to look at or cancel it later
    assert submit(kfp, params, "--wait", "--timeout", "0.2", "--output", "json") == 3
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert got["run_id"] in kfp.runs and got["state"] == "RUNNING" and got["verdict"] is None
    assert f"run {got['run_id']}: still RUNNING after 0.2s" in captured.err


@pytest.mark.parametrize("option", ["--poll-interval", "--timeout"])
def test_a_wait_duration_below_zero_is_a_usage_error_before_any_run_exists(kfp, params, capsys, option):
    """The wait reads these only after the run is created: a negative --poll-interval used to end
    in time.sleep's traceback there, leaving a started run that nobody followed."""
    args = ["submit", "--host", kfp.url, "--params", str(params), "--package", str(PACKAGE), "--wait"]
    with pytest.raises(SystemExit) as exited:
        main([*args, option, "-1"])
    assert exited.value.code == 2
    assert f"{option}: '-1': a number of seconds above 0" in capsys.readouterr().err
    assert not kfp.runs


# -- schedule ---------------------------------------------------------------------------------------


def test_scheduling_twice_under_one_name_keeps_one_recurring_run_with_the_new_cron(kfp, params, capsys):
    assert schedule(kfp, params, "--name", "weekly-clinical", "--cron", "0 3 * * 0") == 0
    [first] = kfp.recurring_runs.values()
    assert first["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0"  # KFP's cron: seconds first
    assert schedule(kfp, params, "--name", "weekly-clinical", "--cron", "30 4 * * 1") == 0
    [rr] = kfp.recurring_runs.values()
    assert rr["recurring_run_id"] != first["recurring_run_id"]
    assert rr["display_name"] == "weekly-clinical"
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * 1"
    assert rr["status"] == "ENABLED"
    # a scheduled run is a cycle: judged against the version in production (SCHEDULED_DEFAULTS)
    cycle = config_of(EXAMPLE)
    cycle["evaluation"]["compare_to"] = "registered"
    assert sent_config(rr["runtime_config"]["parameters"]) == cycle
    assert rr["no_catchup"] is True and rr["max_concurrency"] == "1"
    [version] = kfp.versions_of("full-finetune")
    assert rr["pipeline_version_reference"]["pipeline_version_id"] == version["pipeline_version_id"]
    assert "replaced" in capsys.readouterr().out


def test_a_scheduled_run_is_a_cycle_judged_against_production_unless_the_config_says_base(
    kfp, params, tmp_path, capsys
):
    assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * * 0") == 0
    [rr] = kfp.recurring_runs.values()
    assert sent_config(rr["runtime_config"]["parameters"])["evaluation"]["compare_to"] == "registered"
    assert "judged against the version in production" in capsys.readouterr().out
    # a run submitted by hand is compared with the base, as configured
    assert submit(kfp, params) == 0
    [run] = kfp.runs.values()
    assert sent_config(run["runtime_config"]["parameters"])["evaluation"]["compare_to"] == "base"
    # a schedule told otherwise keeps it, and a {date} template travels unresolved: each run fixes its own
    config = yaml.safe_load(EXAMPLE.read_text())
    config["evaluation"]["compare_to"] = "base"
    config["data"].update(train_uri="s3://ml-data/notes/dt={date}/", window_days=7)
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump(config))
    assert schedule(kfp, own, "--name", "weekly", "--cron", "0 3 * * 0") == 0
    [rr] = kfp.recurring_runs.values()
    sent = rr["runtime_config"]["parameters"]
    assert sent["train_uri"] == "s3://ml-data/notes/dt={date}/"
    assert sent_config(sent)["evaluation"]["compare_to"] == "base"
    assert "reads the 7 day(s) of train_uri ending at its scheduled date" in capsys.readouterr().out


def test_scheduling_the_same_thing_again_changes_nothing(kfp, params, capsys):
    for _ in range(2):
        assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * * 0") == 0
    assert len(kfp.recurring_runs) == 1
    assert len(kfp.calls("POST", r"/apis/v2beta1/recurringruns")) == 1
    assert not kfp.calls("DELETE", r"/apis/v2beta1/recurringruns/.*")
    assert "unchanged" in capsys.readouterr().out


def test_paused_then_resumed_in_place(kfp, params):
    assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * * 0") == 0
    [rr_id] = kfp.recurring_runs
    assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * * 0", "--paused") == 0
    assert list(kfp.recurring_runs) == [rr_id]
    assert kfp.recurring_runs[rr_id]["status"] == "DISABLED"
    assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * * 0") == 0
    assert kfp.recurring_runs[rr_id]["status"] == "ENABLED"
    assert kfp.calls("POST", rf"/apis/v2beta1/recurringruns/{rr_id}:disable")
    assert kfp.calls("POST", rf"/apis/v2beta1/recurringruns/{rr_id}:enable")


def test_a_new_schedule_can_start_paused_and_other_names_are_left_alone(kfp, params):
    assert schedule(kfp, params, "--name", "daily", "--cron", "0 0 1 * * *") == 0  # six fields: as given
    assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * * 0", "--paused") == 0
    by_name = {rr["display_name"]: rr for rr in kfp.recurring_runs.values()}
    assert by_name["daily"]["trigger"]["cron_schedule"]["cron"] == "0 0 1 * * *"
    assert by_name["daily"]["status"] == "ENABLED"
    assert by_name["weekly"]["status"] == "DISABLED"


def test_concurrency_catchup_and_a_time_window_reach_the_schedule_and_a_change_replaces_it(
    kfp, params, capsys
):
    window = ["--start-time", "2026-12-01T03:00", "--end-time", "2030-06-01T00:00+02:00"]
    args = ["--name", "weekly", "--cron", "0 3 * * 0", "--max-concurrency", "2", "--catchup", *window]
    assert schedule(kfp, params, *args) == 0
    [rr] = kfp.recurring_runs.values()
    assert rr["max_concurrency"] == "2" and rr["no_catchup"] is False
    cron = rr["trigger"]["cron_schedule"]
    assert (cron["start_time"], cron["end_time"]) == ("2026-12-01T03:00:00Z", "2030-05-31T22:00:00Z")
    assert schedule(kfp, params, *args) == 0
    assert "'weekly': unchanged" in capsys.readouterr().out and len(kfp.recurring_runs) == 1
    assert schedule(kfp, params, *args[:-1], "2031-01-01") == 0  # another end: replaced
    assert "'weekly': replaced" in capsys.readouterr().out
    [rr] = kfp.recurring_runs.values()
    assert rr["trigger"]["cron_schedule"]["end_time"] == "2031-01-01T00:00:00Z"
    # the defaults: one at a time, no catch-up, no window
    assert schedule(kfp, params, "--name", "daily", "--cron", "0 1 * * *") == 0
    daily = next(r for r in kfp.recurring_runs.values() if r["display_name"] == "daily")
    assert daily["max_concurrency"] == "1" and daily["no_catchup"] is True
    assert not daily["trigger"]["cron_schedule"].get("end_time")


def test_a_bad_window_or_concurrency_is_refused_before_any_request(kfp, params, capsys):
    base = ["--name", "weekly", "--cron", "0 3 * * 0"]
    for extra, said in (
        (["--end-time", "2001-01-01"], "is in the past"),
        (["--start-time", "2030-02-01", "--end-time", "2030-01-01"], "is not after --start-time"),
        (["--start-time", "next tuesday"], "expected an ISO 8601 time"),
        (["--max-concurrency", "0"], "at least 1"),
    ):
        assert schedule(kfp, params, *base, *extra) == 2
        assert said in capsys.readouterr().err
    assert kfp.requests == []


def test_a_cron_with_the_wrong_number_of_fields_is_refused_before_any_request(kfp, params, capsys):
    assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * *") == 2
    assert "expected 5 fields" in capsys.readouterr().err
    assert kfp.requests == []


# -- credentials ------------------------------------------------------------------------------------


def test_the_bearer_token_comes_from_the_environment_and_is_sent_as_a_header(
    kfp, params, monkeypatch, capsys
):
    token = "s3cr3t-token-from-ci"
    monkeypatch.setenv("KFP_BEARER_TOKEN", token)
    assert submit(kfp, params) == 0
    assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * * 0") == 0
    assert kfp.requests
    assert {r.headers.get("authorization") for r in kfp.requests} == {f"Bearer {token}"}
    captured = capsys.readouterr()
    assert token not in captured.out + captured.err
    # and there is no option to put it on the command line, where `ps` would show it
    for flag in ("--token", "--bearer-token", "--existing-token"):
        with pytest.raises(SystemExit):
            main(["submit", "--params", str(params), flag, token])


def test_the_kubeflow_service_account_token_file_is_used_in_a_pod(kfp, params, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("projected-sa-token\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    assert submit(kfp, params) == 0
    assert {r.headers.get("authorization") for r in kfp.requests} == {"Bearer projected-sa-token"}


def test_no_credentials_no_authorization_header(kfp, params):
    assert submit(kfp, params) == 0
    assert all("authorization" not in r.headers for r in kfp.requests)


def test_the_host_can_come_from_kfp_host(kfp, params, monkeypatch):
    monkeypatch.setenv("KFP_HOST", kfp.url)
    assert main(["submit", "--params", str(params), "--package", str(PACKAGE)]) == 0
    assert len(kfp.runs) == 1


def test_in_a_pod_without_a_host_the_standard_in_cluster_service_is_used(monkeypatch):
    from fulltune.kfp.submit import resolve_host

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert resolve_host(None) == "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
    assert resolve_host("https://kfp.example.com/pipeline/") == "https://kfp.example.com/pipeline"


def test_no_host_is_a_usage_error(params, capsys):
    assert main(["submit", "--params", str(params), "--package", str(PACKAGE)]) == 2
    assert "--host" in capsys.readouterr().err


def test_an_unreachable_host_is_one_line_not_a_traceback(params, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    assert (
        main(
            [
                "submit",
                "--host",
                f"http://127.0.0.1:{port}",
                "--params",
                str(params),
                "--package",
                str(PACKAGE),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "cannot reach the KFP API" in err and "Traceback" not in err


# -- refusing bad input before anything is created --------------------------------------------------


def test_a_bad_params_file_names_file_and_field_and_creates_nothing(kfp, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    config = yaml.safe_load(EXAMPLE.read_text())
    config["training"]["learning_rate"] = "fast"
    config["evaluation"]["max_general_ppl_increse"] = 0.1  # misspelt
    bad.write_text(yaml.safe_dump(config))
    assert submit(kfp, bad, "--wait") == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert "training.learning_rate" in err
    assert "evaluation.max_general_ppl_increse" in err and "unknown field" in err
    assert "nothing was submitted" in err
    assert kfp.requests == []


@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_a_config_that_only_runs_on_a_laptop_is_refused_before_any_request(kfp, tmp_path, capsys, command):
    """The local launcher with GPUs would train in the CPU step image; a local path is invisible to
    the step pods: both named, nothing sent to KFP."""
    laptop = tmp_path / "laptop.yaml"
    config = yaml.safe_load(EXAMPLE.read_text())
    config["resources"]["launcher"] = "local"
    config["data"]["train_uri"] = "/home/me/notes.jsonl"
    laptop.write_text(yaml.safe_dump(config))
    code = (
        submit(kfp, laptop)
        if command == "submit"
        else schedule(kfp, laptop, "--name", "w", "--cron", "0 3 * * 1")
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"{laptop}: cannot run on a cluster" in err
    assert "set resources.launcher: kubernetes" in err
    assert "data.train_uri: '/home/me/notes.jsonl' is a path on this machine" in err
    undone = "nothing was submitted" if command == "submit" else "no recurring run was created or changed"
    assert undone in err
    assert kfp.requests == []


def test_a_broken_json_params_file_names_the_line(kfp, tmp_path, capsys):
    bad = tmp_path / "run.json"
    bad.write_text('{"model": {"name": "x"},\n "training": {"learning_rate": }\n}')
    assert submit(kfp, bad) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    assert kfp.requests == []


def test_a_bad_schedule_params_file_creates_nothing(kfp, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: 'has spaces'\n")
    assert schedule(kfp, bad, "--name", "weekly", "--cron", "0 3 * * 0") == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "model.name" in err
    assert "no recurring run was created or changed" in err
    assert kfp.requests == [] and kfp.recurring_runs == {}


def test_a_package_that_is_not_the_pipeline_is_refused(kfp, params, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"pipelineInfo": {"name": "x"}, "root": {"dag": {}}}))
    assert submit(kfp, params, package=other) == 2
    assert "no `config` parameter" in capsys.readouterr().err
    assert kfp.requests == []


# -- cluster settings of the compiled pipeline ------------------------------------------------------


def _platform(spec_docs) -> dict:
    return (
        spec_docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(spec_docs) > 1 else {}
    )


def test_the_ui_shows_a_description_of_the_config_parameter():
    spec = next(yaml.safe_load_all(PACKAGE.read_text()))
    description = spec["root"]["inputDefinitions"]["parameters"]["config"]["description"]
    assert "RunConfig" in description and "fulltune config --describe" in description
    assert "\n" not in description


def test_step_pods_get_s3_credentials_from_the_secret_and_evaluate_a_gpu():
    docs = list(yaml.safe_load_all(PACKAGE.read_text()))
    executors = _platform(docs)
    steps = {
        "configure",
        "validate-data",
        "check-tokenizer",
        "plan",
        "list-shards",
        "preprocess-shard",
        "gather-shards",
        "train",
        "evaluate",
        "register",
    }
    assert {f"exec-{s}" for s in steps} == set(executors)  # every step, from one place
    for name in steps:
        secrets = executors[f"exec-{name}"]["secretAsEnv"]
        [secret] = [s for s in secrets if s["secretName"] != "fulltune-model-registry"]  # register: both
        assert secret["secretName"] == S3_SECRET == "fulltune-s3"
        assert secret["optional"] is True
        assert {(m["secretKey"], m["envVar"]) for m in secret["keyToEnv"]} == {(k, k) for k in S3_SECRET_KEYS}
    accelerators = {
        name: e["container"]["resources"]["accelerator"]
        for name, e in docs[0]["deploymentSpec"]["executors"].items()
        if "accelerator" in e["container"].get("resources", {})
    }
    assert accelerators == {
        "exec-evaluate": {
            "count": "1",
            "resourceCount": "1",
            "resourceType": "nvidia.com/gpu",
            "type": "nvidia.com/gpu",
        }
    }
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in executors[
        "exec-evaluate"
    ]["tolerations"]


def test_caching_is_off_for_steps_that_read_outside_data_or_must_rerun():
    spec = next(yaml.safe_load_all(PACKAGE.read_text()))
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    cached = {name for name, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"configure", "list-shards", "preprocess-shard", "gather-shards"}
    for name in ("validate-data", "check-tokenizer", "plan", "train", "evaluate", "register"):
        assert tasks[name]["cachingOptions"] == {}, name


def test_compile_options_name_the_secret_or_drop_it_and_the_gpu(tmp_path):
    assert main(["compile", "--root", str(tmp_path / "a"), "--s3-secret", "team-s3", "--eval-gpus", "0"]) == 0
    docs = list(yaml.safe_load_all((tmp_path / "a" / PIPELINE_FILE).read_text()))
    executors = _platform(docs)
    assert {e["secretAsEnv"][0]["secretName"] for e in executors.values()} == {"team-s3"}
    assert "tolerations" not in executors["exec-evaluate"]
    # no GPU asked for (CPU and memory, as every step has, stay)
    assert (
        "accelerator" not in docs[0]["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]
    )

    bare = list(
        yaml.safe_load_all(
            compile_all(tmp_path / "b", s3_secret="", registry_secret="", eval_gpus=2)[0].read_text()
        )
    )
    assert all("secretAsEnv" not in e for e in _platform(bare).values())
    assert (
        bare[0]["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]["accelerator"][
            "count"
        ]
        == "2"
    )


def test_the_command_line_is_built_without_importing_kfp():
    """`fulltune --help` and the parser's defaults (the S3 Secret's name) must not pay for kfp."""
    import subprocess
    import sys

    code = "import sys; from fulltune.cli import build_parser; build_parser(); print('kfp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- identities: namespace and service account --------------------------------------------------------


@pytest.fixture
def multi_user_kfp():
    with KFPStandIn(multi_user=True) as server:
        yield server


def test_on_multi_user_kfp_the_pipeline_lives_in_the_namespace_and_runs_use_the_account(
    multi_user_kfp, params, capsys
):
    kfp = multi_user_kfp
    assert submit(kfp, params, "--namespace", "team-a", "--service-account", "fulltune") == 0
    [pipeline] = kfp.pipelines.values()
    assert pipeline["namespace"] == "team-a"  # not shared with every profile
    [experiment] = kfp.experiments.values()
    assert experiment["namespace"] == "team-a"
    [run] = kfp.runs.values()
    assert run["service_account"] == "fulltune"  # the account the chart's Role binds
    out = capsys.readouterr().out
    assert "namespace: team-a (from --namespace)" in out and "runs' service account: fulltune" in out
    assert "full-finetune in namespace team-a" in out
    assert submit(kfp, params, "--namespace", "team-a", "--service-account", "fulltune") == 0
    assert len(kfp.pipelines) == 1 and len(kfp.versions) == 1  # found again in its namespace


def test_multi_user_kfp_without_a_namespace_is_refused_before_anything_is_created(
    multi_user_kfp, params, capsys
):
    assert submit(multi_user_kfp, params) == 2
    err = capsys.readouterr().err
    assert "multi-user" in err and "--namespace" in err and "nothing was created" in err
    assert {r.method for r in multi_user_kfp.requests} == {"GET"}
    assert not multi_user_kfp.pipelines and not multi_user_kfp.runs


def test_the_namespace_comes_from_the_pod_or_the_kube_context(multi_user_kfp, params, tmp_path, monkeypatch):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [
                    {"name": "team-b-ctx", "context": {"cluster": "c", "user": "u", "namespace": "team-b"}}
                ],
                "current-context": "team-b-ctx",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert schedule(multi_user_kfp, params, "--name", "weekly", "--cron", "0 3 * * 0") == 0
    assert [p["namespace"] for p in multi_user_kfp.pipelines.values()] == ["team-b"]
    pod_file = tmp_path / "namespace"
    pod_file.write_text("team-c\n")
    monkeypatch.setattr("fulltune.kfp.submit.POD_NAMESPACE_FILE", str(pod_file))  # a pod wins over a context
    assert submit(multi_user_kfp, params) == 0
    assert sorted(p["namespace"] for p in multi_user_kfp.pipelines.values()) == ["team-b", "team-c"]


def test_a_changed_service_account_replaces_the_schedule(kfp, params, monkeypatch):
    monkeypatch.setenv("FULLTUNE_SERVICE_ACCOUNT", "fulltune")  # as the chart's hook sets it
    assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * * 0") == 0
    [first] = kfp.recurring_runs.values()
    assert first["service_account"] == "fulltune"
    assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * * 0", "--service-account", "other") == 0
    [rr] = kfp.recurring_runs.values()
    assert rr["service_account"] == "other" and rr["recurring_run_id"] != first["recurring_run_id"]


@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_dry_run_prints_where_and_as_whom_and_sends_nothing(kfp, params, capsys, command):
    extra = ["--dry-run", "--namespace", "team-a", "--service-account", "fulltune"]
    if command == "schedule":
        extra += ["--name", "weekly", "--cron", "0 3 * * 0"]
        assert schedule(kfp, params, *extra) == 0
    else:
        assert submit(kfp, params, *extra) == 0
    out = capsys.readouterr().out
    assert f"KFP API: {kfp.url}" in out
    assert "namespace: team-a (from --namespace)" in out and "runs' service account: fulltune" in out
    assert "pipeline full-finetune version " in out and "dry run: nothing was sent" in out
    sent = json.loads(next(line for line in out.splitlines() if line.startswith("parameters: "))[12:])
    # the request, printed as it would be sent (a schedule's runs are cycles: compared with production)
    assert sent_config(sent)["model"] == config_of(EXAMPLE)["model"]
    assert sent_config(sent)["evaluation"]["compare_to"] == (
        "registered" if command == "schedule" else "base"
    )
    assert kfp.requests == []
    # with --output json: the same request, as one object a CI job parses
    run = schedule if command == "schedule" else submit
    assert run(kfp, params, *extra, "--output", "json") == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["dry_run"], got["namespace"], got["parameters"]) == (True, "team-a", sent)
    assert got["would_create"].startswith("recurring run 'weekly'" if command == "schedule" else "run ")
    assert kfp.requests == []


# -- lifecycle: renames and uninstalls leave no schedule firing ---------------------------------------


def test_a_renamed_schedule_replaces_the_old_one_of_the_same_owner(kfp, params, capsys):
    """The chart passes --owner <namespace>/<release>: renaming its schedule deletes the old one once
    the new one exists; another owner's schedule and an unowned one are left alone."""
    assert schedule(kfp, params, "--name", "theirs", "--cron", "0 1 * * 0", "--owner", "team-b/other") == 0
    assert schedule(kfp, params, "--name", "by-hand", "--cron", "0 2 * * 0") == 0
    assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * * 0", "--owner", "team-a/ft") == 0
    assert schedule(kfp, params, "--name", "weekly-v2", "--cron", "0 3 * * 0", "--owner", "team-a/ft") == 0
    assert sorted(r["display_name"] for r in kfp.recurring_runs.values()) == [
        "by-hand",
        "theirs",
        "weekly-v2",
    ]
    assert "'weekly' of team-a/ft: deleted (renamed to 'weekly-v2')" in capsys.readouterr().out


def test_unschedule_by_owner_deletes_only_what_that_owner_made(kfp, params, capsys):
    assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * * 0", "--owner", "team-a/ft") == 0
    assert schedule(kfp, params, "--name", "by-hand", "--cron", "0 2 * * 0") == 0
    assert main(["unschedule", "--host", kfp.url, "--owner", "team-a/ft"]) == 0
    assert [r["display_name"] for r in kfp.recurring_runs.values()] == ["by-hand"]
    assert main(["unschedule", "--host", kfp.url, "--name", "by-hand"]) == 0
    assert not kfp.recurring_runs
    assert main(["unschedule", "--host", kfp.url, "--owner", "team-a/ft"]) == 0  # again: nothing left, fine
    out = capsys.readouterr().out
    assert "'weekly': deleted" in out and "no recurring run of team-a/ft" in out


def test_unschedule_in_an_experiment_that_never_existed_deletes_nothing(kfp, capsys):
    assert main(["unschedule", "--host", kfp.url, "--owner", "team-a/ft", "--experiment", "never"]) == 0
    assert "does not exist: nothing to delete" in capsys.readouterr().out
    assert all(r.method == "GET" for r in kfp.requests)


# -- --check-cluster: the launcher's doctor checks before a run is created ------------------------------

TRAINER_V2 = {"trainer.kubeflow.org/v1alpha1": ["trainjobs"]}


@pytest.fixture
def kube(tmp_path, monkeypatch):
    """A Kubernetes API stand-in that the kube context (namespace team-a) points at; it serves the
    Training Operator's PyTorchJob and allows every verb."""
    with FakeKube() as server:
        server.trainjob_schema = crd_schema(TRAINJOB_CRDS["v2.3.0"], "v1alpha1")  # read for launcher trainjob
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": server.host}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [
                        {"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}
                    ],
                    "current-context": "x",
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        yield server


def trainjob_params(tmp_path) -> Path:
    path = tmp_path / "trainjob.yaml"
    config = yaml.safe_load(EXAMPLE.read_text())
    config["resources"]["launcher"] = "trainjob"
    path.write_text(yaml.safe_dump(config))
    return path


def test_check_cluster_refuses_a_launcher_the_cluster_does_not_serve_and_creates_nothing(
    kfp, kube, params, capsys
):
    kube.api_resources = dict(TRAINER_V2)  # a current Kubeflow: Trainer v2, no Training Operator
    assert submit(kfp, params, "--check-cluster") == 1
    captured = capsys.readouterr()
    assert "cluster checks for resources.launcher: kubernetes, namespace team-a" in captured.out
    assert "[   FAIL] PyTorchJob API: pytorchjobs.kubeflow.org/v1 is not served" in captured.out
    assert (
        "this cluster serves TrainJob (Kubeflow Trainer v2), not PyTorchJob: set resources.launcher: trainjob"
        in captured.out
    )
    assert "the cluster cannot run this config (PyTorchJob API" in captured.err
    assert "nothing was submitted" in captured.err
    assert kfp.requests == [] and not kfp.runs


def test_check_cluster_submits_when_the_cluster_serves_the_launcher(kfp, kube, params, capsys):
    assert submit(kfp, params, "--check-cluster") == 0
    out = capsys.readouterr().out
    assert "[     ok] PyTorchJob API: pytorchjobs.kubeflow.org/v1 is served" in out
    assert "[     ok] launcher RBAC: all " in out and "(checked as the caller)" in out
    assert len(kfp.runs) == 1
    assert kube.calls("GET", "/apis/kubeflow.org/v1") and kube.calls(
        "GET", "/apis/trainer.kubeflow.org/v1alpha1"
    )


def test_check_cluster_warns_of_pods_no_node_could_hold_and_still_submits(kfp, kube, params, capsys):
    """No node fits now, but an autoscaler may add one: the run is told why and goes ahead."""
    kube.nodes = [
        {
            "metadata": {"name": "gpu-a"},
            "spec": {"taints": [{"key": "dedicated", "value": "research", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "96", "memory": "1Ti"}},
        }
    ]
    assert submit(kfp, params, "--check-cluster") == 0
    out = capsys.readouterr().out
    assert "[   warn] nodes: 0 of 1 nodes can each hold a training pod" in out
    assert "gpu-a: taint dedicated=research:NoSchedule not tolerated" in out
    assert len(kfp.runs) == 1


def test_check_cluster_refuses_a_trainjob_whose_runtime_is_missing(kfp, kube, tmp_path, capsys):
    kube.api_resources = dict(TRAINER_V2)
    path = trainjob_params(tmp_path)
    assert submit(kfp, path, "--check-cluster") == 1
    out = capsys.readouterr().out
    assert "[     ok] TrainJob API: trainjobs.trainer.kubeflow.org/v1alpha1 is served" in out
    assert (
        "[   FAIL] TrainJob runtime: ClusterTrainingRuntime fulltune-torch-distributed does not exist" in out
    )
    assert "install the chart's runtime" in out
    assert kfp.requests == []
    kube.put_runtime(
        {
            "apiVersion": "trainer.kubeflow.org/v1alpha1",
            "kind": "ClusterTrainingRuntime",
            "metadata": {"name": "fulltune-torch-distributed"},
            "spec": {},
        }
    )
    assert submit(kfp, path, "--check-cluster") == 0
    assert len(kfp.runs) == 1


def test_check_cluster_reviews_the_access_of_the_runs_service_account(kfp, kube, params, capsys):
    user = "system:serviceaccount:team-a:fulltune"
    assert submit(kfp, params, "--check-cluster", "--service-account", "fulltune") == 1
    assert f"(checked as {user})" in capsys.readouterr().out
    kube.allowed_for[user] = set(launcher_access("kubernetes"))
    assert submit(kfp, params, "--check-cluster", "--service-account", "fulltune") == 0
    [run] = kfp.runs.values()
    assert run["service_account"] == "fulltune"


def test_dry_run_with_check_cluster_checks_and_sends_nothing(kfp, kube, params, capsys):
    assert submit(kfp, params, "--dry-run", "--check-cluster") == 0
    out = capsys.readouterr().out
    assert "[     ok] PyTorchJob API" in out and "dry run: nothing was sent" in out
    assert kfp.requests == []
    assert all(r.method == "GET" or r.path.endswith("accessreviews") for r in kube.requests)
    kube.api_resources = dict(TRAINER_V2)
    assert submit(kfp, params, "--dry-run", "--check-cluster") == 1
    assert "set resources.launcher: trainjob" in capsys.readouterr().out


def test_check_cluster_refuses_a_schedule_too(kfp, kube, params, capsys):
    kube.api_resources = dict(TRAINER_V2)
    assert schedule(kfp, params, "--name", "weekly", "--cron", "0 3 * * 0", "--check-cluster") == 1
    assert "set resources.launcher: trainjob" in capsys.readouterr().out
    assert kfp.requests == [] and not kfp.recurring_runs


def test_check_cluster_without_a_reachable_kubernetes_api_refuses_in_one_line(kfp, params, capsys):
    """No kubeconfig here (the autouse fixture) and not in a pod."""
    assert submit(kfp, params, "--check-cluster") == 1
    err = capsys.readouterr().err
    assert "--check-cluster: cannot reach the Kubernetes API" in err and "Traceback" not in err
    assert "nothing was submitted" in err
    assert kfp.requests == []


def test_submit_refuses_config_contradictions_before_creating_anything(kfp, tmp_path, capsys):
    """bf16 with fp16, early stopping without evaluations, a misspelt check code: the pipeline's
    plan or validate_data step would refuse them after the run was created; submit refuses them."""
    from test_config import example_with_contradictions

    assert submit(kfp, example_with_contradictions(tmp_path), "--dry-run") == 2
    err = capsys.readouterr().err
    for field in ("data.checks.pii_emial", "training.fp16", "training.early_stopping_patience"):
        assert f"  {field}: " in err
    assert kfp.requests == []


def test_a_schedule_whose_config_fixes_the_date_is_refused(kfp, tmp_path, capsys):
    config = yaml.safe_load(EXAMPLE.read_text())
    config["data"].update(train_uri="s3://ml-data/notes/dt={date}/", window_days=7, as_of="2026-11-27")
    fixed = tmp_path / "backfill.yaml"
    fixed.write_text(yaml.safe_dump(config))
    assert schedule(kfp, fixed, "--name", "weekly", "--cron", "0 3 * * 0") == 2
    err = capsys.readouterr().err
    assert "data.as_of: 2026-11-27 would be the date of every run of this schedule" in err
    assert kfp.requests == [] and kfp.recurring_runs == {}
    # a one-off backfill with the same file is what as_of is for
    assert submit(kfp, fixed) == 0
