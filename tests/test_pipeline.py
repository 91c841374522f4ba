"""The compiled pipeline: fresh, well-formed, fast to compile — and the whole DAG run through kfp.local."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fulltune import storage
from fulltune.kfp.compile import PIPELINE_FILE, compile_all, component_readme
from fulltune.kfp.components import STEPS
from fulltune.kfp.local_run import without_retries

ROOT = Path(__file__).resolve().parents[1]


def test_checked_in_yaml_is_what_fulltune_compile_writes(tmp_path):
    written = compile_all(tmp_path)
    for path in written:
        rel = path.relative_to(tmp_path)
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is missing: run `fulltune compile` and commit"
        assert committed.read_text() == path.read_text(), f"{rel} is stale: run `fulltune compile` and commit"
    steps = {p.name for p in (ROOT / "components").iterdir() if p.is_dir()}
    assert steps == {f.__name__ for f in STEPS}, "components/ has a directory no step generates"


def test_a_components_readme_lists_only_the_outputs_it_has():
    # evaluate's verdict is one unnamed output, described in prose that wraps onto a line starting
    # "outputs: kfp.local ...": not an output called `outputs`
    from fulltune.kfp.components import evaluate

    readme = component_readme(evaluate)
    outputs = readme.split("## Outputs")[1].split("## Use it")[0]
    names = [line.split("`")[1] for line in outputs.splitlines() if line.startswith("- `")]
    assert names == ["report", "eval_result", "metrics", "Output"]


def test_compiling_twice_gives_identical_bytes(tmp_path):
    a = compile_all(tmp_path / "a", image="registry.example/fulltune:1.2.3")
    b = compile_all(tmp_path / "b", image="registry.example/fulltune:1.2.3")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert "registry.example/fulltune:1.2.3" in a[0].read_text()


def test_pipeline_shape(tmp_path):
    # document 1: the pipeline spec; document 2: its Kubernetes platform settings
    spec = next(yaml.safe_load_all((ROOT / PIPELINE_FILE).read_text()))
    root_tasks = spec["root"]["dag"]["tasks"]
    assert {
        "configure",
        "validate-data",
        "check-tokenizer",
        "plan",
        "list-shards",
        "gather-shards",
        "train",
        "evaluate",
    } <= set(root_tasks)
    loop = next(t for t in root_tasks.values() if "parameterIterator" in t)
    assert loop["componentRef"]["name"].startswith("comp-for-loop")
    cond = next(t for t in root_tasks.values() if "triggerPolicy" in t)
    assert "evaluate" in json.dumps(cond["triggerPolicy"]["condition"])
    assert root_tasks["train"]["cachingOptions"] == {}  # caching off: a rerun must train again
    # the long steps after plan are retried when their pod fails; a checking step's refusal reaches the
    # user at once, and train's launcher restarts retryable exits only
    retried = {name for name, t in root_tasks.items() if t.get("retryPolicy", {}).get("maxRetryCount")}
    assert {"gather-shards", "evaluate"} <= retried
    assert not retried & {"validate-data", "check-tokenizer", "plan", "train"}
    loop_tasks = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert loop_tasks["preprocess-shard"]["retryPolicy"]["backoffDuration"] == "30s"
    # a local run has no pod to lose: its definition is the same but for the retries, so a step that
    # refuses its input fails once, not three times minutes apart
    local = next(yaml.safe_load_all(without_retries(ROOT / PIPELINE_FILE, tmp_path).read_text()))
    assert "retryPolicy" not in json.dumps(local)
    assert local["deploymentSpec"] == spec["deploymentSpec"]
    for task in root_tasks.values():
        task.pop("retryPolicy", None)
    assert local["root"]["dag"]["tasks"] == root_tasks
    images = {n: e["container"]["image"] for n, e in spec["deploymentSpec"]["executors"].items()}
    # CPU steps run the runtime image; the GPU evaluate step the trainer image; never a floating tag
    assert images.pop("exec-evaluate").startswith("ghcr.io/fulltune/fulltune-trainer:")
    assert len(set(images.values())) == 1
    assert not any(image.endswith(":latest") for image in images.values())
    # nothing is pip-installed when a step starts: the image has fulltune and kfp
    for e in spec["deploymentSpec"]["executors"].values():
        assert "pip install" not in " ".join(e["container"]["command"])


def test_compiling_imports_no_heavy_library():
    code = (
        "import sys, fulltune.kfp.pipeline, fulltune.kfp.compile\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'datasets', 'pyarrow') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# Cycle 1 only needs to pass the gate (a 5% lower domain loss: 6.3% at 60 steps) so that cycle 3, the
# demo, has a promoted version to beat; the demo trains a third of its 312 steps (one epoch) there,
# enough to beat it (domain loss 6.163 at 100 steps against v1's 6.325), to keep the suite's time.
FIRST_CYCLE_STEPS, DEMO_CYCLE_STEPS = 60, 100


def assert_demo_ran_every_step_and_registered(result, out: str) -> None:
    """What `fulltune demo` shows and leaves: one console line per step, training progress with
    forgetting, TensorBoard events, and a registered version that loads and matches its checksums."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fulltune.layout import RunLayout
    from fulltune.registry.store import verify_version

    summary = result.summary("fulltune demo")
    print(summary)
    m = result.eval_result.kfp_metrics()
    assert m["domain_eval_tuned_loss"] < m["domain_eval_base_loss"]
    assert result.eval_result.verdict is True, result.eval_result.reasons
    assert result.registered and verify_version(result.registered) == []
    AutoModelForCausalLM.from_pretrained(result.registered)
    tok = AutoTokenizer.from_pretrained(result.registered)
    assert tok.pad_token != tok.eos_token
    manifest = storage.read_json(storage.join(result.registered, "manifest.json"))
    for f in manifest["files"]:
        assert storage.sha256_file(f"{result.registered}/{f['path']}") == f["sha256"]
    lineage = storage.read_json(storage.join(result.registered, "lineage.json"))
    assert lineage["pipeline_run_id"] and lineage["data"]["dataset_manifest_sha256"]
    # every step ran through kfp.local: one line each on the console, kfp.local's own output in the log
    lines = out.splitlines()
    for task in (
        "configure",
        "validate-data",
        "check-tokenizer",
        "plan",
        "preprocess-shard",
        "gather-shards",
        "train",
        "evaluate",
        "register",
    ):
        assert any(line.startswith(f"ok     {task} (") for line in lines), (task, out)
    validated = next(line for line in lines if line.startswith("ok     validate-data"))
    assert "1,500 train records, 0 bad" in validated and "report: " in validated
    assert any(line.startswith("  train: step ") for line in lines)  # progress (no terminal: plain lines)
    # forgetting measured as it trains (the demo's eval_steps), on the progress line
    assert any(line.startswith("  train: step ") and " forgetting " in line for line in lines), out
    # training wrote TensorBoard event files where the summary says
    assert list(Path(RunLayout(result.work_dir).tensorboard).glob("events.out.tfevents.*"))
    assert f"tensorboard --logdir {RunLayout(result.work_dir).tensorboard}" in summary
    assert f"registered model:   {result.registered}\n" in summary
    # the gate's decision and the version made, on the steps' own lines
    assert any(line.startswith("ok     evaluate (") and ": gate PASS, " in line for line in lines)
    assert any(line.startswith("ok     register (") and line.endswith(result.registered) for line in lines)
    log = Path(lines[-1].removeprefix("full log: "))
    assert "finished with status" in log.read_text() and "finished with status" not in out
    assert len(lines) < 80, out  # one screen, the training progress included


@pytest.mark.slow
def test_three_retraining_cycles_only_ever_move_production_forward(demo_assets, tmp_path, capsys, mlflow_env):
    """Three cycles against one registry, each comparing with the version production names:
    1. a short training run is the model's first version: promoted;
    2. a forgetting one, run by a user through `fulltune run` on a config file: training stops at
       its first evaluation past the forgetting budget, the gate refuses it, nothing is registered
       and production still names v1;
    3. `fulltune demo` (run_demo: its config and pipeline, DEMO_CYCLE_STEPS of its steps), a longer
       run, beats v1 on the domain set (forgetting still measured against the base): registered as
       v2 and promoted, from v1, and the demo's console and registered files are what its users see.
    Cycles 1 and 2 report to the MLflow server: one run per cycle, with evaluate's verdict and
    register's version."""
    from fulltune.cli import main
    from fulltune.demo.run import MODEL_NAME, demo_config, run_demo
    from fulltune.evaluate.result import EvalResult
    from fulltune.kfp.local_run import run_locally
    from fulltune.layout import RunLayout
    from fulltune.registry import pointers
    from fulltune.registry.store import list_versions

    registry = tmp_path / "registry"  # where run_demo(tmp_path) registers too
    compare_to_registered = {"evaluation.compare_to": "registered"}

    def cycle(n: int, **overrides) -> EvalResult:
        work = tmp_path / f"cycle-{n}"
        cfg = demo_config(demo_assets, work, registry, forget=overrides.pop("forget", False))
        reporting = {"training.report_to": ["mlflow"], "training.mlflow_experiment": str(tmp_path)}
        cfg = cfg.with_overrides({**compare_to_registered, **reporting, **overrides})
        if n == 2:
            config = tmp_path / "my.yaml"
            config.write_text(cfg.to_yaml())
            assert main(["run", str(config), "--dir", str(tmp_path / "local")]) == 0
        else:
            run_locally(cfg, compiled_dir=tmp_path / "compiled", pipeline_root=tmp_path / f"kfp-{n}")
        (run_dir,) = [p for p in work.iterdir() if p.is_dir()]
        return EvalResult.load(RunLayout(str(run_dir)).eval_result)

    def production() -> int:
        return pointers.current(str(registry), MODEL_NAME, pointers.PRODUCTION).version

    def mlflow_run(n: int):
        (run_dir,) = [p for p in (tmp_path / f"cycle-{n}").iterdir() if p.is_dir()]
        experiment = mlflow_env.get_experiment_by_name(str(tmp_path))
        [run] = mlflow_env.search_runs([experiment.experiment_id], f"tags.`fulltune.work_dir` = '{run_dir}'")
        return run

    first = cycle(1, **{"training.max_steps": FIRST_CYCLE_STEPS})
    assert first.verdict, first.reasons
    assert first.champion.version is None and "no promoted version" in first.champion.note
    assert production() == 1
    capsys.readouterr()
    run = mlflow_run(1)
    assert run.data.tags["fulltune.verdict"] == "pass" and run.data.tags["fulltune.registered_version"] == "1"
    assert run.data.metrics["train_summary/steps"] == FIRST_CYCLE_STEPS
    assert "evaluate/forgetting" in run.data.metrics

    forgot = cycle(2, forget=True, **{"training.max_steps": 120})
    assert forgot.verdict is False and forgot.champion.version == 1
    assert any("general perplexity rose" in r and "allowed" in r for r in forgot.reasons)
    assert [v["version"] for v in list_versions(str(registry), MODEL_NAME)] == [1]
    assert production() == 1
    out = capsys.readouterr().out
    assert not any(line.startswith("ok     register") for line in out.splitlines())
    # what `fulltune run` ends with: the refusal, its reasons, and that nothing was registered
    assert "gate FAIL: not registered" in out and "\n== fulltune run ==\n" in out
    assert "verdict:            FAIL\n" in out and "registered model:   none — the gate refused" in out
    assert "\nproduction:         v1\n" in out  # what still serves
    assert "  train: stopping after step 25: forgetting: at step 25 general perplexity rose" in out
    run = mlflow_run(2)
    assert (
        run.data.metrics["train_summary/stopped_early"] == 1 and run.data.metrics["train_summary/steps"] == 25
    )
    assert (
        run.data.tags["fulltune.verdict"] == "fail"
        and "general perplexity rose" in run.data.tags["fulltune.verdict_reasons"]
    )
    assert "fulltune.registered_uri" not in run.data.tags

    demo_cycle = {**compare_to_registered, "training.max_steps": DEMO_CYCLE_STEPS}
    demo = run_demo(tmp_path, assets=demo_assets, overrides=demo_cycle)
    assert_demo_ran_every_step_and_registered(demo, capsys.readouterr().out)
    better = demo.eval_result
    [check] = [c for c in better.checks if c.name == "champion"]
    assert check.passed and "below the promoted v1" in check.reason, better.reasons
    assert better.scoring.passes[0].roles == ["base", "tuned", "champion"]  # one pass over the batches
    assert production() == 2 and demo.registered.endswith("/v2")
    assert demo.summary("fulltune demo").endswith("production:         v2 (this run's)")
    last = pointers.current(str(registry), MODEL_NAME, pointers.PRODUCTION)
    assert (last.previous, last.reason) == (1, "passed the gate against v1")


@pytest.mark.slow
def test_a_broken_record_stops_the_run_at_validate_data(demo_assets, tmp_path, capfd):
    from kfp import components

    from fulltune.demo.run import demo_config
    from fulltune.kfp.local_run import init_local, kfp_local_guard

    lines = Path(demo_assets.train_uri).read_text().splitlines()
    lines[6] = lines[6][:-5]  # line 7: truncated JSON
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    config = demo_config(demo_assets, tmp_path / "work", tmp_path / "registry").to_dict()
    del config["data"]["train_uri"]  # given as the typed parameter, as in the Kubeflow UI's form

    pipeline = components.load_component_from_file(str(compile_all(tmp_path / "compiled")[0]))
    init_local(tmp_path / "root")
    with kfp_local_guard(), pytest.raises(RuntimeError, match="validate-data"):
        pipeline(config=config, train_uri=str(bad))
    out = capfd.readouterr()
    text = out.out + out.err
    assert f"{bad}:7: invalid_json" in text
    for later in ("check-tokenizer", "plan", "train", "register"):
        assert f"Executing task \x1b[96m'{later}'" not in text
    # what the refused run leaves: its report and why it failed (KFP uploads no artifact of a
    # failed step), nothing else
    (run,) = (tmp_path / "work").iterdir()
    kept = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert kept == ["checks/validate_data.html", "failures/validate_data.json"]
    assert "invalid_json" in (run / "checks" / "validate_data.html").read_text()
    assert not (tmp_path / "registry").exists()


@pytest.mark.slow
def test_a_field_set_by_a_typed_parameter_and_differently_in_config_stops_the_run_at_configure(
    demo_assets, tmp_path, capfd
):
    from kfp import components

    from fulltune.demo.run import demo_config
    from fulltune.kfp.local_run import init_local, kfp_local_guard

    config = demo_config(demo_assets, tmp_path / "work", tmp_path / "registry").to_dict()
    pipeline = components.load_component_from_file(str(compile_all(tmp_path / "compiled")[0]))
    init_local(tmp_path / "root")
    with kfp_local_guard(), pytest.raises(RuntimeError, match="configure"):
        pipeline(config=config, train_uri="s3://elsewhere/train.jsonl", learning_rate=3e-4)
    out = capfd.readouterr()
    text = out.out + out.err
    assert (
        "pipeline parameter train_uri='s3://elsewhere/train.jsonl' and pipeline parameter 'config' " in text
    )
    assert f"data.train_uri={demo_assets.train_uri!r}" in text
    assert "Executing task \x1b[96m'validate-data'" not in text
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_a_cycle_with_no_data_in_its_window_stops_at_validate_data_naming_the_partitions(
    demo_assets, tmp_path, capfd
):
    """configure fixes the run's date (kfp.local: the run's start, as a manual run on a cluster) and
    the window's partitions; validate_data refuses the window, naming them."""
    import datetime as dt

    from kfp import components

    from fulltune.demo.run import demo_config
    from fulltune.kfp.local_run import init_local, kfp_local_guard

    config = demo_config(demo_assets, tmp_path / "work", tmp_path / "registry").to_dict()
    config["data"].update(train_uri=str(tmp_path / "notes" / "dt={date}"), window_days=2)
    pipeline = components.load_component_from_file(str(compile_all(tmp_path / "compiled")[0]))
    init_local(tmp_path / "root")
    with kfp_local_guard(), pytest.raises(RuntimeError, match="validate-data"):
        pipeline(config=config)
    out = capfd.readouterr()
    text = out.out + out.err
    today = dt.datetime.now(dt.timezone.utc).date()
    days = [(today - dt.timedelta(days=1)).isoformat(), today.isoformat()]
    assert f"no data files found in any of 2 locations: {tmp_path}/notes/dt={days[0]}, " in text
    assert f"data window: 2 day(s) to {days[1]}" in text


def test_a_work_directory_on_a_pvc_is_mounted_into_every_step(tmp_path):
    from fulltune.kfp.compile import compile_pipeline

    path = compile_pipeline(tmp_path / "p.yaml", work_pvc="fulltune-work:/work")
    spec, platform = yaml.safe_load_all(path.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(spec["deploymentSpec"]["executors"]) <= set(executors)
    for name in spec["deploymentSpec"]["executors"]:
        mounts = executors[name]["pvcMount"]
        assert [(m["constant"], m["mountPath"]) for m in mounts] == [("fulltune-work", "/work")], name
    with pytest.raises(ValueError, match="CLAIM:/mount/path"):
        compile_pipeline(tmp_path / "q.yaml", work_pvc="fulltune-work")


def test_a_kfp_local_run_leaves_print_and_logging_as_they_were():
    """kfp.local's own print/log swapping can leak out of concurrent tasks; the guard undoes it."""
    import builtins
    import logging

    from fulltune.kfp.local_run import kfp_local_guard

    root = logging.getLogger()
    before = (builtins.print, root.handlers[:], root.level)
    with kfp_local_guard():
        builtins.print = lambda *a, **k: None  # what a leaked indented_print looks like
        root.handlers[:] = [logging.StreamHandler()]
        root.setLevel(logging.DEBUG)
    assert (builtins.print, root.handlers[:], root.level) == before


def test_every_step_pod_has_cpu_and_memory_requests_and_limits():
    """A Kubeflow profile's ResourceQuota rejects pods without requests (and, with limits.* in the
    quota, without limits): every executor of the checked-in pipeline carries both, as configured."""
    from fulltune.kfp.cluster import STEP_RESOURCES

    spec = next(yaml.safe_load_all((ROOT / PIPELINE_FILE).read_text()))
    executors = spec["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        step = name.removeprefix("exec-").replace("-", "_")
        want = STEP_RESOURCES[step]
        got = executor["container"]["resources"]
        assert (
            got["resourceCpuRequest"],
            got["resourceCpuLimit"],
            got["resourceMemoryRequest"],
            got["resourceMemoryLimit"],
        ) == (want.cpu, want.cpu_limit, want.memory, want.memory_limit), name
    assert len(executors) == len(STEP_RESOURCES)


def test_step_resources_are_overridden_from_a_file_and_a_wrong_step_is_named(tmp_path):
    overrides = tmp_path / "resources.yaml"
    overrides.write_text("evaluate: {cpu: '6', memory: 200Gi, memory_limit: 300Gi}\n")
    root = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "fulltune.cli",
        "compile",
        "--root",
        str(root),
        "--step-resources",
        str(overrides),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    spec = next(yaml.safe_load_all((root / PIPELINE_FILE).read_text()))
    got = spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]
    assert (got["resourceCpuRequest"], got["resourceMemoryRequest"], got["resourceMemoryLimit"]) == (
        "6",
        "200Gi",
        "300Gi",
    )
    assert got["resourceCpuLimit"] == "8"  # not overridden: the default stays

    overrides.write_text("evaluation: {cpu: '16'}\n")
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown step 'evaluation'" in bad.stderr and str(overrides) in bad.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["--work-pvc", "fulltune-work"], "--work-pvc fulltune-work: expected CLAIM:/mount/path"),
        (["--eval-gpus", "-1"], "--eval-gpus: '-1': a whole number, 0 or more"),
        (["--step-resources", "{file}"], "{file}: evaluate: cpu '16' is more than cpu_limit '8'"),
    ],
)
def test_compile_refuses_a_bad_option_as_a_usage_error_writing_nothing(tmp_path, capsys, args, says):
    """A mistyped --work-pvc or --eval-gpus, or a step's request above its limit (Kubernetes would
    refuse that step's pod in every run), ends `fulltune compile` with exit 2 and the option named,
    not a traceback, and leaves no pipeline behind."""
    from fulltune.cli import main

    overrides = tmp_path / "resources.yaml"
    overrides.write_text("evaluate: {cpu: '16'}\n")  # evaluate's default cpu_limit is 8
    args = [a.format(file=overrides) for a in args]
    try:
        code = main(["compile", "--root", str(tmp_path / "out"), *args])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2
    assert says.format(file=overrides) in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.yaml"))


@pytest.mark.parametrize(
    "command",
    [
        ["compile", "--mlflow-secret", "{secret}"],
        ["compile", "--s3-secret", "{secret}"],
        ["compile", "--registry-secret", "{secret}"],
        ["upload", "--mlflow-secret", "{secret}"],
        ["doctor", "--config", "c.yaml", "--s3-secret", "{secret}"],
    ],
)
def test_a_credential_given_where_a_secret_name_belongs_is_refused_unshown(tmp_path, capsys, command):
    """The value of --*-secret is written into the compiled pipeline (and doctor prints it): a
    credential pasted in place of the Secret's name would be published with the package. It is
    refused as a usage error, without being echoed, before anything is written."""
    from fulltune.cli import main

    secret = "https://ci-bot:FAKE-t0ken@mlflow.example.com"  # noqa: S105 - a made-up credential
    argv = [a.format(secret=secret) for a in command]
    if argv[0] == "compile":
        argv += ["--root", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {command[-2]}: is not a Kubernetes Secret name" in err and "FAKE-t0ken" not in err
    assert not (tmp_path / "out").exists()


def test_compile_takes_a_secret_name_or_none():
    from fulltune.kfp.cluster import secret_name_argument

    assert secret_name_argument("team-a.fulltune-s3") == "team-a.fulltune-s3"
    assert secret_name_argument("") == ""  # none: workload identity


def test_step_resources_name_a_value_that_is_no_quantity():
    from fulltune.kfp.cluster import step_resources

    with pytest.raises(ValueError, match=r"r.yaml: train: memory '4GB' is not a quantity"):
        step_resources({"train": {"memory": "4GB"}}, "r.yaml")
    with pytest.raises(ValueError, match=r"evaluate: expected a mapping"):
        step_resources({"evaluate": None}, "r.yaml")
    ok = step_resources({"train": {"cpu": "1500m", "memory": "2Gi", "memory_limit": "4G"}})
    assert (ok["train"].cpu, ok["train"].memory_limit) == ("1500m", "4G")


def test_optional_secrets_reach_the_steps_that_need_them(tmp_path):
    """Temporary S3 credentials (AWS_SESSION_TOKEN) reach every step with the other S3 keys; the
    Model Registry token only the register step; both optional, so a cluster without them runs."""
    spec = list(yaml.safe_load_all((ROOT / PIPELINE_FILE).read_text()))
    executors = spec[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        secrets = {s["secretName"]: s for s in executor.get("secretAsEnv", [])}
        s3 = secrets["fulltune-s3"]
        assert s3["optional"] is True
        assert "AWS_SESSION_TOKEN" in {k["secretKey"] for k in s3["keyToEnv"]}, name
        registry = secrets.get("fulltune-model-registry")
        if name == "exec-register":
            assert registry["optional"] is True
            assert [k["envVar"] for k in registry["keyToEnv"]] == ["MODEL_REGISTRY_TOKEN"]
        else:
            assert registry is None, name

    from fulltune.kfp.compile import compile_pipeline

    none = compile_pipeline(tmp_path / "p.yaml", registry_secret="")
    assert "fulltune-model-registry" not in none.read_text()


def test_the_mlflow_secret_reaches_train_evaluate_and_register_only_when_named(tmp_path):
    """`--mlflow-secret` gives the steps that report to MLflow (and, through the train step's
    parameter, the training pods) the MLFLOW_TRACKING_* variables, optionally; by default nothing."""
    from fulltune.cli import main
    from fulltune.kfp.cluster import MLFLOW_SECRET_KEYS, MLFLOW_STEPS

    def mlflow_of(path: Path) -> tuple[dict, str]:
        spec, platform = yaml.safe_load_all(path.read_text())
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        got = {
            name: entry
            for name, executor in executors.items()
            for entry in executor.get("secretAsEnv", [])
            if "MLFLOW_TRACKING_URI" in {k["secretKey"] for k in entry["keyToEnv"]}
        }
        train = spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
        return got, train["mlflow_secret"]["runtimeValue"]["constant"]

    assert mlflow_of(ROOT / PIPELINE_FILE) == ({}, "")  # the shipped pipeline reads none

    assert main(["compile", "--root", str(tmp_path), "--mlflow-secret", "team-mlflow"]) == 0
    got, constant = mlflow_of(tmp_path / PIPELINE_FILE)
    assert (
        set(got)
        == {f"exec-{step}" for step in MLFLOW_STEPS}
        == {"exec-train", "exec-evaluate", "exec-register"}
    )
    assert constant == "team-mlflow"  # the train step hands it to the training pods
    for entry in got.values():
        assert entry["secretName"] == "team-mlflow" and entry["optional"] is True
        assert [(k["secretKey"], k["envVar"]) for k in entry["keyToEnv"]] == [
            (k, k) for k in MLFLOW_SECRET_KEYS
        ]
    _, platform = yaml.safe_load_all((tmp_path / PIPELINE_FILE).read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # the S3 Secret (and the register step's registry token) stay as they were, the MLflow one last
    assert [s["secretName"] for s in executors["exec-register"]["secretAsEnv"]] == [
        "fulltune-s3",
        "fulltune-model-registry",
        "team-mlflow",
    ]
    assert [s["secretName"] for s in executors["exec-plan"]["secretAsEnv"]] == ["fulltune-s3"]
