"""What a local run (`fulltune run`, `fulltune demo`) tells its user beside the steps' own work:
where it keeps what the config left unset, the gate's decision on the evaluate and register lines,
and the closing summary read from kfp.local's outputs of the run."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest

from eval_samples import DOMAIN_GAIN, eval_record, loss_set
from fulltune import steps
from fulltune.config import ConfigError, RunConfig
from fulltune.kfp.console import StepConsole
from fulltune.kfp.local_run import read_outcome
from fulltune.user_run import LocalGpus, local_gpu_problem, shm_size, with_local_locations

FORGOT = {
    "name": "forgetting",
    "passed": False,
    "reason": "general perplexity rose 20.6% (304.32 → 366.87) > 5.0% allowed",
}


def test_the_first_step_refuses_a_run_missing_what_a_later_step_needs():
    """A run with no work_dir would fail at plan, one with no registry.uri at register, after all
    its training: configure names both before any data is read."""
    config = {"model": {"base_model_uri": "s3://m/base"}, "data": {"train_uri": "s3://d/train.jsonl"}}
    with pytest.raises(ConfigError) as refused:
        steps.configure(config, {})
    message = str(refused.value)
    assert message.startswith("the run cannot start:")
    assert "work_dir: required (where the run's shards, checkpoints and tuned model go" in message
    assert "registry.uri: required (where register publishes a model that passes the gate" in message
    assert "model.base_model_uri" not in message and "data.train_uri" not in message


def test_a_local_run_keeps_what_the_config_leaves_unset_under_its_dir_and_says_so(tmp_path, capsys):
    bare = RunConfig.from_dict({"data": {"train_uri": "notes.jsonl"}})
    filled = with_local_locations(bare, tmp_path / "out")
    assert filled.work_dir == str(tmp_path / "out" / "runs")
    assert filled.registry.uri == str(tmp_path / "out" / "registry")
    assert capsys.readouterr().out.splitlines() == [
        f"work_dir not set: {tmp_path}/out/runs",
        f"registry.uri not set: {tmp_path}/out/registry",
    ]
    own = bare.with_overrides({"work_dir": "s3://w/runs", "registry.uri": "s3://w/models"})
    assert with_local_locations(own, tmp_path / "out") == own  # the user's own places win
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("resources", "gpus", "problem"),
    [
        ({"nproc_per_node": 4}, 8, None),
        ({"nproc_per_node": 8}, 8, None),
        ({"nproc_per_node": 8}, 0, "resources.accelerator is gpu but this machine has no GPU"),
        ({"nproc_per_node": 8}, 4, "resources.nproc_per_node is 8, one GPU each, but this machine has 4: set "
         "resources.nproc_per_node: 4 or less to train here"),
        ({"num_nodes": 2, "nproc_per_node": 2}, 8, "resources.num_nodes is 2: on this machine the nodes' "
         "processes would share its 8 GPU(s); set resources.num_nodes: 1"),
    ],
)  # fmt: skip
def test_a_gpu_run_here_is_refused_when_this_machine_cannot_hold_it(resources, gpus, problem):
    """A cluster config tried on a workstation: refused before any step, naming the field to change."""
    cfg = RunConfig.from_dict({"resources": {"accelerator": "gpu", **resources}})
    found = local_gpu_problem(cfg, LocalGpus(gpus))
    assert found == problem if problem is None else found.startswith(problem)


def test_a_multi_gpu_run_in_a_container_with_dockers_default_shared_memory_is_refused():
    """NCCL's start-up fails in Docker's 64 MiB /dev/shm: said before any step, with the flag to fix it."""
    two = RunConfig.from_dict({"resources": {"accelerator": "gpu", "nproc_per_node": 2}})
    problem = local_gpu_problem(two, LocalGpus(8, shm_bytes=64 * 1024**2))
    assert problem.startswith("/dev/shm on this machine holds 64.0 MiB: NCCL between the 2 GPUs' processes")
    assert "--shm-size=16g or --ipc=host" in problem
    assert local_gpu_problem(two, LocalGpus(8, shm_bytes=16 * 1024**3)) is None
    one = RunConfig.from_dict({"resources": {"accelerator": "gpu", "nproc_per_node": 1}})
    assert local_gpu_problem(one, LocalGpus(8, shm_bytes=64 * 1024**2)) is None  # one process: no NCCL peers
    assert shm_size() == shutil.disk_usage("/dev/shm").total  # this machine's, as `fulltune run` reads it


def test_a_gpu_run_here_on_gpus_smaller_than_the_memory_plan_assumed_is_refused():
    """A config planned for 80 GiB GPUs on a 24 GiB workstation GPU would run out of memory at its
    first step, after the data was tokenized: refused first, naming the value that fits."""
    cfg = RunConfig.from_dict({"resources": {"accelerator": "gpu", "gpu_memory_gib": 80}})
    a10g = LocalGpus(1, memory_bytes=23028 * 1024**2, capability=(8, 6), name="NVIDIA A10G")
    assert local_gpu_problem(cfg, a10g) == (
        "this machine's GPUs (NVIDIA A10G) have 22.5 GiB each, and resources.gpu_memory_gib is 80: plan would "
        "size the micro batch for that and training would run out of memory; set resources.gpu_memory_gib: 22"
    )
    h100 = LocalGpus(1, memory_bytes=81559 * 1024**2, capability=(9, 0), name="NVIDIA H100 80GB HBM3")
    assert local_gpu_problem(cfg, h100) is None  # sold as 80 GB: 79.6 GiB


def test_a_bf16_run_here_on_gpus_without_bf16_is_refused_naming_fp16():
    """A T4 or V100 (Colab, older workstations) has no bf16, the default precision."""
    cfg = RunConfig.from_dict({"resources": {"accelerator": "gpu", "gpu_memory_gib": 15}})
    t4 = LocalGpus(1, memory_bytes=15360 * 1024**2, capability=(7, 5), name="Tesla T4")
    assert local_gpu_problem(cfg, t4) == (
        "this machine's GPUs (Tesla T4, compute capability 7.5) have no bf16 (it needs 8.0, Ampere or "
        "newer): set training.bf16: false and training.fp16: true"
    )
    fp16 = cfg.with_overrides({"training.bf16": False, "training.fp16": True})
    assert local_gpu_problem(fp16, t4) is None


def kfp_local_run(tmp_path: Path, *, checks: list[dict], registered: str | None, registry: str = "") -> Path:
    """A kfp.local run directory as a finished run leaves it: per task its executor_output.json,
    evaluate's eval_result artifact (eval.json itself), register's output only when it ran."""
    run_dir = tmp_path / "kfp" / "full-finetune-2026-11-29-11-00-00-000000"
    cfg = RunConfig.from_dict(
        {
            "work_dir": str(tmp_path / "runs" / "4711"),
            "model": {"name": "notes"},
            "training": {"report_to": ["tensorboard"]},
            "registry": {"uri": registry},
        }
    )
    dataset = {"train_sequences": 209.0, "train_tokens": 22869.0, "train_padding_fraction": 0.1073}
    outputs = {
        "plan": {"parameterValues": {"config": cfg.to_dict()}},
        "gather-shards": {
            "artifacts": {"metrics": {"artifacts": [{"name": "metrics", "metadata": dataset}]}}
        },
    }
    metrics = {"domain_loss_improvement": 0.155, "forgetting": 0.206}
    outputs["evaluate"] = {
        "parameterValues": {"Output": all(c["passed"] for c in checks)},
        "artifacts": {"metrics": {"artifacts": [{"name": "metrics", "metadata": metrics}]}},
    }
    if registered:
        outputs["register"] = {"parameterValues": {"version_uri": registered}}
    for task, output in outputs.items():
        (run_dir / task).mkdir(parents=True)
        (run_dir / task / "executor_output.json").write_text(json.dumps(output))
    general = {"general_eval": loss_set((5.72, 304.32), (5.90, 366.87))}
    record = eval_record(checks=checks, sets={**eval_record()["sets"], **general})
    (run_dir / "evaluate" / "eval_result").write_text(json.dumps(record))
    return run_dir


def step_lines(run_dir: Path, *tasks: str) -> list[str]:
    out = io.StringIO()
    console = StepConsole(run_dir.parent / "run.log", run_dir.parent, out)
    for task in tasks:
        console._line(f"Executing task '{task}'")
        console._line(f"Task '{task}' finished with status SUCCESS")
    return out.getvalue().splitlines()


def test_a_step_killed_without_an_error_message_says_how_it_ended(tmp_path):
    """The OOM killer (or a crash in native code) leaves no traceback: the line says what the shell
    that ran the step wrote, not nothing, and not a traceback an earlier step logged."""
    log = tmp_path / "run.log"
    log.write_text(
        "04:29:40.100 - INFO - Executing task \x1b[96m'train'\x1b[0m\n"
        "    Traceback (most recent call last):\n"
        "    OSError: a rank's first try at the checkpoint, retried\n"
        "04:30:45.000 - INFO - Task \x1b[96m'train'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n"
        "04:30:45.100 - INFO - Executing task \x1b[96m'evaluate'\x1b[0m\n"
        "    Loading weights: 100%|##########| 20/20\n"
        "    Killed\n"
        "    \n"
        "\n"
        "04:30:51.612 - ERROR - Task \x1b[96m'evaluate'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m\n"
    )
    out = io.StringIO()
    StepConsole(log, tmp_path, out)._failure()
    assert out.getvalue().splitlines() == [
        "  the step's process ended without an error message; its last output: Killed (SIGKILL: most "
        "often the kernel's out-of-memory killer; `dmesg` says)",
        f"full log: {log}",
    ]


def test_a_stopped_run_still_says_where_its_full_log_is(tmp_path):
    """Ctrl-C (or SIGTERM) stops a run mid-step: the log holds what each step printed as it stopped."""
    out = io.StringIO()
    console = StepConsole(tmp_path / "run.log", tmp_path, out)
    with pytest.raises(KeyboardInterrupt), console.active():
        raise KeyboardInterrupt
    assert out.getvalue().splitlines()[-1] == f"full log: {tmp_path / 'run.log'}"


def test_without_a_terminal_training_progress_is_a_line_every_half_minute_not_every_step(
    tmp_path, monkeypatch
):
    """A CI log or a pod's: a line per logged step is hundreds for a minute of training. Each
    evaluated step's line (its forgetting) and the last step's are always printed."""
    out = io.StringIO()
    console = StepConsole(tmp_path / "run.log", tmp_path, out)
    clock = iter([0.0, 1.0, 2.0, 31.0, 32.0, 33.0])  # one reading per printed or weighed line
    monkeypatch.setattr("fulltune.kfp.console.time.monotonic", lambda: next(clock))
    for step in range(1, 7):
        forgetting = " forgetting +1.0%" if step == 5 else ""
        console._line(f"INFO step {step}/6 loss 5.{step} x tok/s 9,000 y eta 3s{forgetting}")
    assert [line.split()[2] for line in out.getvalue().splitlines()] == ["1/6", "4/6", "5/6", "6/6"]


def test_the_dataset_line_says_how_much_training_data_preprocessing_made(tmp_path):
    run_dir = kfp_local_run(tmp_path, checks=[DOMAIN_GAIN], registered=None)
    [gathered] = step_lines(run_dir, "gather-shards")
    assert gathered.endswith("s): 209 training sequences, 22,869 tokens, 10.7% padding")


def test_a_refused_model_is_said_on_the_evaluate_line_and_at_the_end(tmp_path):
    run_dir = kfp_local_run(tmp_path, checks=[DOMAIN_GAIN, FORGOT], registered=None)
    [evaluate] = step_lines(run_dir, "evaluate")
    assert evaluate.startswith("ok     evaluate (")
    assert evaluate.endswith("gate FAIL: not registered, +15.5% domain loss improvement, +20.6% forgetting")
    summary = read_outcome(run_dir).summary("fulltune run").splitlines()
    assert summary[1:] == [
        "== fulltune run ==",
        f"work directory:     {tmp_path}/runs/4711",
        f"tensorboard:        tensorboard --logdir {tmp_path}/runs/4711/train/tensorboard",
        "domain eval loss:   3.9100 -> 3.0700 (21.5% lower)",
        "general perplexity: 304.32 -> 366.87 (forgetting +20.6%)",
        "verdict:            FAIL",
        f"  - {DOMAIN_GAIN['reason']}",
        f"  - {FORGOT['reason']}",
        "registered model:   none — the gate refused this model (the pipeline run itself succeeded)",
    ]


def test_a_registered_model_is_named_on_the_register_line_and_at_the_end(tmp_path):
    version = str(tmp_path / "registry" / "notes" / "v3")
    run_dir = kfp_local_run(tmp_path, checks=[DOMAIN_GAIN], registered=version)
    evaluate, register = step_lines(run_dir, "evaluate", "register")
    assert ": gate PASS, +15.5% domain loss improvement" in evaluate
    assert register.startswith("ok     register (") and register.endswith(f"s): {version}")
    outcome = read_outcome(run_dir)
    assert outcome.eval_result.verdict and outcome.registered == version
    summary = outcome.summary("fulltune demo")
    assert "verdict:            PASS" in summary and summary.endswith(f"registered model:   {version}")


def test_the_end_says_which_version_serves_and_how_to_promote_the_new_one(tmp_path):
    """A later version that passed the gate against the base is latest, not production: the summary
    names the served version and the command that would promote this one."""
    from fulltune.registry import pointers

    registry = tmp_path / "registry"
    for version in (1, 2):  # committed versions: their manifests exist
        (registry / "notes" / f"v{version}").mkdir(parents=True)
        (registry / "notes" / f"v{version}" / "manifest.json").write_text("{}")
    pointers.move(
        str(registry), "notes", pointers.PRODUCTION, 1, expected=None, action="promote", reason="first"
    )
    v2 = str(registry / "notes" / "v2")
    run_dir = kfp_local_run(tmp_path, checks=[DOMAIN_GAIN], registered=v2, registry=str(registry))
    summary = read_outcome(run_dir).summary("fulltune run").splitlines()
    assert summary[-3:] == [
        f"registered model:   {v2}",
        "production:         v1",
        f'  to serve this version instead: fulltune registry promote --uri {registry} --name notes --version 2 --reason "..."',
    ]
    pointers.move(
        str(registry), "notes", pointers.PRODUCTION, 2, expected=1, action="promote", reason="better"
    )
    summary = read_outcome(run_dir).summary("fulltune run")
    assert summary.endswith(f"registered model:   {v2}\nproduction:         v2 (this run's)")


# -- resuming a run whose training stopped ------------------------------------------------------------


def test_a_resumed_local_run_has_the_id_of_the_run_it_continues(tmp_path):
    """Under the same id the run's steps find its work directory, and train its checkpoints."""
    from kfp import dsl

    from fulltune.kfp.local_run import as_run, init_local, kfp_local_guard

    def run_id_of(run_id: str) -> str:
        return run_id

    def one_step() -> str:
        return step(run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).output

    # KFP reads the types from the annotations, which this module's `from __future__` makes strings
    run_id_of.__annotations__ = {"run_id": str, "return": str}
    one_step.__annotations__ = {"return": str}
    step = dsl.component(run_id_of, base_image="python:3.11")
    one_step = dsl.pipeline(one_step)

    init_local(tmp_path)
    with kfp_local_guard():
        with as_run("6958269"):
            assert one_step().output == "6958269"
        assert one_step().output != "6958269"  # a new run gets an id of its own again


# A process running `run_locally` as `fulltune run` does, on a pipeline of one step, `plan`, that
# takes $STEP_SECONDS, having created $STEP_STARTED: two of them share one --dir's kfp folder.
SHARING_A_DIR = """
import os, sys
from pathlib import Path
from typing import NamedTuple
from kfp import compiler, dsl
from fulltune.config import RunConfig
from fulltune.kfp import local_run

def plan(config: dict) -> NamedTuple("Outputs", [("config", dict)]):
    import os, pathlib, time
    pathlib.Path(os.environ["STEP_STARTED"]).touch()
    time.sleep(float(os.environ["STEP_SECONDS"]))
    return (config,)

step = dsl.component(plan, base_image="python:3.11")

@dsl.pipeline(name="full-finetune")
def pipeline(config: dict):
    step(config=config)

def compile_all(root):
    path = Path(root) / "pipelines" / "full_finetune.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(path))
    return [path]

import fulltune.kfp.compile
fulltune.kfp.compile.compile_all = compile_all
cfg = RunConfig.from_dict({"work_dir": sys.argv[2]})
outcome = local_run.run_locally(cfg, compiled_dir=Path(sys.argv[1]) / "compiled", pipeline_root=Path(sys.argv[1]) / "kfp")
print("outcome:", outcome.work_dir)
"""


def test_two_runs_with_one_dir_at_once_each_end_with_their_own_outcome(tmp_path):
    """Two configs run at the same time with the same --dir (the default one): the one that ends
    last still ends with its own outcome, not a traceback over the other's files."""
    import subprocess
    import sys
    import time

    script = tmp_path / "run_locally.py"  # a file: KFP reads the step's source from it
    script.write_text(SHARING_A_DIR)

    def start(work: str, seconds: float) -> subprocess.Popen:
        env = {**os.environ, "STEP_SECONDS": str(seconds), "STEP_STARTED": str(tmp_path / f"{work}.started")}
        command = [sys.executable, str(script), str(tmp_path / "dir"), str(tmp_path / work)]
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)

    longer = start("runs-a", seconds=5)
    deadline = time.monotonic() + 120
    while not (tmp_path / "runs-a.started").exists():  # the other starts while this one runs
        assert time.monotonic() < deadline and longer.poll() is None
        time.sleep(0.1)
    shorter = start("runs-b", seconds=0)
    assert shorter.wait(timeout=120) == 0
    out, _ = longer.communicate(timeout=120)
    assert longer.returncode == 0, out
    (outcome,) = [line for line in out.splitlines() if line.startswith("outcome: ")]
    assert outcome == f"outcome: {tmp_path / 'runs-a'}"  # its own plan's config, not the other's


def a_run(
    work: Path, run_id: str, *, checkpoint_steps=(), saved=True, trained=False, evaluated=False, **config
) -> RunConfig:
    """A run's directory as its steps leave it: plan's resolved config, checkpoints (the newest one's
    save finished when `saved`), the final model and metrics once `trained`, evaluate's result once
    `evaluated`."""
    from fulltune.layout import RunLayout
    from fulltune.train import checkpoint
    from fulltune.train.recipe import MODEL_MANIFEST

    layout = RunLayout.for_run(str(work), run_id)
    cfg = RunConfig.from_dict({"work_dir": layout.root, **config})
    Path(layout.resolved_config).parent.mkdir(parents=True, exist_ok=True)
    Path(layout.resolved_config).write_text(cfg.to_yaml())
    for i, step in enumerate(checkpoint_steps):
        tag = Path(layout.checkpoints) / checkpoint.tag_for(step)
        tag.mkdir(parents=True)
        if saved or i < len(checkpoint_steps) - 1:
            (tag / checkpoint.MANIFEST).write_text(json.dumps({"step": step, "files": []}))
    if trained:
        Path(layout.model).mkdir(parents=True)
        (Path(layout.model) / MODEL_MANIFEST).write_text("{}")
        Path(layout.train_metrics).write_text("")
    if evaluated:
        Path(layout.eval_result).parent.mkdir(parents=True)
        Path(layout.eval_result).write_text("{}")
    return cfg


def test_resume_takes_the_run_that_stopped_after_a_complete_checkpoint(tmp_path):
    from fulltune.user_run import run_to_resume

    work = tmp_path / "runs"
    cfg = RunConfig.from_dict({"work_dir": str(work), "training": {"save_steps": 50}})
    with pytest.raises(ConfigError, match=f"nothing to resume under {work} \\(work_dir\\)") as nothing:
        run_to_resume(cfg)
    assert "This config saves checkpoints every 50 steps (training.save_steps)" in str(nothing.value)
    a_run(
        work, "111", checkpoint_steps=(50, 100), trained=True, evaluated=True
    )  # done, as far as resuming goes
    a_run(work, "222", checkpoint_steps=(50,), saved=False)  # stopped while saving its first
    a_run(work, "333")  # stopped before its first checkpoint
    a_run(work, "444", checkpoint_steps=(50, 100), saved=False, training={"learning_rate": 3e-4})
    run = run_to_resume(cfg)
    assert (run.run_id, run.step, run.root) == ("444", 50, str(work / "444"))
    assert run.config.training.learning_rate == 3e-4  # as its plan resolved it

    a_run(work, "555", checkpoint_steps=(200,), trained=True)  # its evaluate failed
    with pytest.raises(ConfigError, match="2 unfinished runs under .*: run 444 \\(from its checkpoint at step "
                       "50\\); run 555 \\(from its finished training\\); name one: --resume RUN_ID"):  # fmt: skip
        run_to_resume(cfg)
    assert run_to_resume(cfg, "555").step is None
    with pytest.raises(ConfigError, match="--resume 111: no unfinished run of that id"):
        run_to_resume(cfg, "111")


def test_a_run_whose_model_passed_and_failed_to_register_is_resumed_to_register_it(tmp_path, capsys):
    """A registry that could not be written fails the last step after the whole training: the run is
    not done, `runs` says so, and --resume goes on (training and preprocessing are found done)."""
    from fulltune import failure
    from fulltune.cli import main
    from fulltune.layout import RunLayout
    from fulltune.user_run import run_to_resume

    work = tmp_path / "runs"
    cfg = RunConfig.from_dict({"work_dir": str(work)})
    a_run(work, "passed", checkpoint_steps=(50,), trained=True, evaluated=True)
    layout = RunLayout.for_run(str(work), "passed")
    Path(layout.eval_result).write_text(json.dumps({"verdict": True}))
    with pytest.raises(NotADirectoryError), failure.recorded(layout, "register"):
        raise NotADirectoryError(20, "Not a directory", "/data/train.csv/registry/notes/v1")
    run = run_to_resume(cfg)
    assert run.run_id == "passed" and run.where == (
        "its evaluated model, whose registration failed "
        "([Errno 20] Not a directory: '/data/train.csv/registry/notes/v1')"
    )
    config = tmp_path / "my.yaml"
    config.write_text(cfg.to_yaml())
    assert main(["runs", str(config)]) == 0
    assert (
        "failed at register; resumable from its evaluated model, whose registration failed"
        in capsys.readouterr().out
    )

    Path(layout.eval_result).write_text(json.dumps({"verdict": False}))  # nothing to register: done
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_to_resume(cfg)


def hold_run_lock(run_root: str):
    """A process of its own holding the lock of the run in `run_root`, as a `fulltune run` of it does."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fulltune import run_lock\n"
         "with run_lock.holding(sys.argv[1]): print('held', flush=True); time.sleep(120)", run_root],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_run_that_is_running_is_not_resumed_beside_itself(tmp_path, capsys):
    """Two runs in one directory would write each other's checkpoints: a resume of a run that a process
    on this machine runs now is refused, naming the process; once that process is gone (killed
    outright too), the run resumes."""
    from fulltune import run_lock
    from fulltune.cli import main
    from fulltune.user_run import run_to_resume

    work = tmp_path / "out" / "runs"
    cfg = a_run(work, "444", checkpoint_steps=(50,), resources={"accelerator": "cpu"})
    config = tmp_path / "my.yaml"
    config.write_text(cfg.with_overrides({"work_dir": str(work)}).to_yaml())
    holder = hold_run_lock(str(work / "444"))
    try:
        assert main(["run", str(config), "--dir", str(tmp_path / "out"), "--resume"]) == 1
        err = capsys.readouterr().err
        assert f"error: run 444 ({work}/444) is running now (pid {holder.pid} on this machine, since " in err
        assert "stop it (Ctrl-C in its terminal, or kill its pid) or let it finish" in err
        a_run(work, "555", checkpoint_steps=(50,))
        with pytest.raises(ConfigError, match="run 444 \\(from its checkpoint at step 50, running now\\); "
                           "run 555 \\(from its checkpoint at step 50\\); name one"):  # fmt: skip
            run_to_resume(RunConfig.from_dict({"work_dir": str(work)}))
    finally:
        holder.kill()
        holder.wait()
    assert run_to_resume(RunConfig.from_dict({"work_dir": str(work)}), "444").run_id == "444"
    assert not run_lock.lock_path(str(work / "444")).exists()  # the killed holder's file is gone too


def test_a_run_lock_is_held_by_one_process_at_a_time(tmp_path):
    from fulltune import run_lock

    root = str(tmp_path / "runs" / "444")
    assert run_lock.holder(root) is None
    with run_lock.holding(root):
        assert run_lock.holder(root).pid == os.getpid()
        with pytest.raises(
            run_lock.RunBusy, match=f"run 444 \\({root}\\) is running now \\(pid {os.getpid()}"
        ):
            with run_lock.holding(root):
                pass  # pragma: no cover
        assert run_lock.holder(str(tmp_path / "runs" / "555")) is None  # each run its own lock
    assert run_lock.holder(root) is None
    assert not run_lock.lock_path(root).exists()


def test_runs_says_where_each_run_under_work_dir_stands(tmp_path, capsys):
    """Runs of several configs side by side: what each evaluated run came to and which version it
    registered, which run can be resumed and how, which one runs now, and what their checkpoints take."""
    from eval_samples import eval_record
    from fulltune import failure
    from fulltune.cli import main
    from fulltune.evaluate.result import EvalResult
    from fulltune.layout import RunLayout
    from fulltune.registry.store import register_model
    from tiny_models import save_tiny_llama

    work, registry = tmp_path / "out" / "runs", tmp_path / "registry"
    common = {
        "model": {"name": "notes"},
        "registry": {"uri": str(registry)},
        "resources": {"accelerator": "cpu"},
    }
    done = a_run(
        work, "20261129-100000-aaaa", checkpoint_steps=(50, 100), trained=True, evaluated=True, **common
    )
    layout = RunLayout(done.work_dir)
    general = {"general_eval": loss_set((5.72, 304.32), (5.75, 313.4))}
    Path(layout.eval_result).write_text(json.dumps(eval_record(sets={**eval_record()["sets"], **general})))
    Path(layout.model, "model_manifest.json").write_text(json.dumps({"summary": {"steps": 120}}))
    tuned = save_tiny_llama(tmp_path / "tuned")
    evaluated = EvalResult.load(layout.eval_result).model_copy(update={"tuned_model_uri": str(tuned)})
    register_model(done, str(tuned), evaluated, {}, run_id="20261129-100000-aaaa")
    a_run(work, "20261129-110000-bbbb", checkpoint_steps=(50,), **common)
    a_run(work, "20261129-120000-cccc", **common)  # stopped before its first checkpoint
    failed = a_run(work, "20261129-123000-eeee", **common)
    with pytest.raises(ConfigError), failure.recorded(RunLayout(failed.work_dir), "preprocess-shard-1"):
        raise ConfigError("preprocess.max_seq_len: 8 is shorter than the chat template's prompt")
    (work / "20261129-130000-dddd").mkdir()  # running, its configure step not yet done
    (work / "notes.txt").write_text("not a run")
    config = tmp_path / "my.yaml"
    config.write_text(RunConfig.from_dict({**common, "work_dir": str(work)}).to_yaml())

    holder = hold_run_lock(str(work / "20261129-130000-dddd"))
    try:
        assert main(["runs", str(config), "--dir", str(tmp_path / "out")]) == 0
        out = capsys.readouterr().out.splitlines()
        assert main(["runs", str(config), "--output", "json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert main(["runs", str(config)]) == 0  # --dir left out: it changes nothing for this config
        without_dir = capsys.readouterr().out.splitlines()[-1]
    finally:
        holder.kill()
        holder.wait()
    assert out[0] == f"runs under {work} (work_dir):"
    # without a config: the runs `fulltune run --dir` keeps, or those of a work_dir named on its own
    for no_config in (["--dir", str(tmp_path / "out")], ["--work-dir", str(work)]):
        assert main(["runs", *no_config]) == 0
        listing = capsys.readouterr().out.splitlines()
        assert listing[0] == out[0] and [row.split()[0] for row in listing[2:-1]] == [
            row.split()[0] for row in out[2:-1]
        ]
    assert out[1].split() == [
        "RUN",
        "STATE",
        "STEPS",
        "DOMAIN",
        "LOSS",
        "FORGETTING",
        "REGISTERED",
        "CHECKPOINTS",
    ]
    rows = {line.split()[0]: line for line in out[2:-1]}
    assert list(rows) == [
        "20261129-100000-aaaa",
        "20261129-110000-bbbb",
        "20261129-120000-cccc",
        "20261129-123000-eeee",
        "20261129-130000-dddd",
    ]
    change, rise = f"{-evaluated.domain_loss_improvement:+.1%}", f"{evaluated.forgetting:+.1%}"
    assert rows["20261129-100000-aaaa"].split()[1:8] == ["evaluated:", "PASS", "120", change, rise, "v1", "2"]
    assert "stopped; resumable from its checkpoint at step 50" in rows["20261129-110000-bbbb"]
    assert "stopped before its first checkpoint" in rows["20261129-120000-cccc"]
    assert (
        "failed at preprocess-shard-1 on its input before its first checkpoint"
        in rows["20261129-123000-eeee"]
    )
    assert f"running: pid {holder.pid} on this machine, since " in rows["20261129-130000-dddd"]
    # the resumable run's own id, and the --dir named (work_dir and registry.uri are the config's)
    resume = f"fulltune run {config} --dir {tmp_path / 'out'} --resume 20261129-110000-bbbb"
    assert out[-1] == f"run 20261129-110000-bbbb goes on with: {resume}"
    assert without_dir == (
        f"run 20261129-110000-bbbb goes on with: fulltune run {config} --resume 20261129-110000-bbbb"
    )
    assert [(r["run_id"][-4:], r["state"]) for r in listed] == [
        ("aaaa", "evaluated"), ("bbbb", "resumable"), ("cccc", "stopped"), ("eeee", "stopped"),
        ("dddd", "running"),
    ]  # fmt: skip
    assert listed[0]["registered"] == str(registry / "notes" / "v1") and listed[0]["checkpoints"] == 2
    assert listed[1]["steps"] == 50  # a resumable run: the steps its newest checkpoint trained
    assert listed[0]["forgetting"] == pytest.approx(evaluated.forgetting)


def test_runs_in_an_s3_work_dir_are_found_and_listed_as_maybe_running_elsewhere(s3, tmp_path):
    from fulltune import storage
    from fulltune.run_list import describe_runs
    from fulltune.user_run import unfinished_runs

    local = tmp_path / "runs"
    a_run(local, "444", checkpoint_steps=(50,))
    a_run(local, "555", checkpoint_steps=(50,), trained=True)
    storage.upload_dir(local, f"{s3}/runs")
    storage.write_text(f"{s3}/runs/notes.txt", "not a run")
    [run, trained] = unfinished_runs(f"{s3}/runs")
    assert (run.run_id, run.step, run.root) == ("444", 50, f"{s3}/runs/444")
    # the lock is this machine's: a run there may be running on a cluster
    listed = describe_runs(RunConfig.from_dict({"work_dir": f"{s3}/runs"}), "fulltune run my.yaml --resume")
    assert "stopped (or running elsewhere); resumable from its checkpoint at step 50" in listed
    assert "stopped (or running elsewhere); resumable from its finished training" in listed
    assert "notes.txt" not in listed
    assert listed.endswith(
        "run 444 goes on with: fulltune run my.yaml --resume 444\n"
        "  or, run on a cluster and failed: fulltune retry 444 --host URL\n"
        "run 555 goes on with: fulltune run my.yaml --resume 555\n"
        "  or, run on a cluster and failed: fulltune retry 555 --host URL"
    )


def test_a_resumed_run_keeps_the_data_window_and_base_model_its_run_started_with(tmp_path):
    """Resumed on another day, a run whose data URIs name a {date} window still trains on the
    partitions it started on (its checkpoint's batches come from them)."""
    from fulltune.user_run import Unfinished, resumed_config

    data = {"train_uri": str(tmp_path / "notes" / "dt={date}"), "window_days": 2}
    cfg = RunConfig.from_dict({"work_dir": str(tmp_path / "runs"), "data": data})
    started = steps.run_inputs(cfg, "2026-11-20T06:00:00+00:00")["data"]
    assert started["as_of"] == "2026-11-20"
    run = Unfinished("444", str(tmp_path / "runs" / "444"), 50, cfg.with_overrides({"data": started}))
    resumed = resumed_config(cfg, run)
    assert (resumed.data.as_of, resumed.data.train_uri) == ("2026-11-20", started["train_uri"])
    assert resumed_config(cfg.with_overrides({"data.train_uri": "notes.jsonl"}), run).data.as_of is None

    # the version its registry:// base named when it started, even once that pointer is gone
    model = {"base_model_uri": "registry://notes/production"}
    cfg = cfg.with_overrides({"model": model, "registry.uri": str(tmp_path / "registry-now-empty")})
    version = {"base_model_uri": "s3://r/notes/v3", "original_base_model_uri": "s3://m/base"}
    run = Unfinished("445", str(tmp_path / "runs" / "445"), 50, cfg.with_overrides({"model": version}))
    resumed = resumed_config(cfg, run)
    assert (resumed.model.base_model_uri, resumed.model.original_base_model_uri) == tuple(version.values())


def test_resume_from_the_command_line_says_what_it_needs(tmp_path, capsys):
    from fulltune.cli import main

    config = tmp_path / "my.yaml"
    cpu = {"data": {"train_uri": "notes.jsonl"}, "resources": {"accelerator": "cpu"}}
    config.write_text(RunConfig.from_dict(cpu).to_yaml())
    assert main(["run", str(config), "--dir", str(tmp_path / "out"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"error: nothing to resume under {tmp_path}/out/runs (work_dir)" in err
    assert "This config saves checkpoints after every 60 min of training (training.save_every_minutes)" in err
    with pytest.raises(SystemExit) as usage:
        main(["run", str(config), "--until", "plan", "--resume"])
    assert usage.value.code == 2


def test_a_stopped_run_names_itself_in_the_command_that_resumes_it(tmp_path, capsys, monkeypatch):
    """An earlier stopped run in the same work_dir makes a bare --resume ambiguous (refused): the
    command printed when a run stops goes on with that run, pasted as it is."""
    import shlex

    from fulltune.cli import main

    work = tmp_path / "out" / "runs"
    a_run(work, "20261129-100000-aaaa", checkpoint_steps=(50,))  # stopped yesterday, not resumed
    config = tmp_path / "my.yaml"
    config.write_text(RunConfig.from_dict({"resources": {"accelerator": "cpu"}}).to_yaml())
    started = []

    def interrupted_after_a_checkpoint(cfg, *, run_id=None, **_):  # Ctrl-C at step 60 of a new run
        started.append(run_id)
        if run_id is None:
            a_run(work, "20261130-100000-bbbb", checkpoint_steps=(60,))
        raise KeyboardInterrupt

    monkeypatch.setattr("fulltune.kfp.local_run.run_locally", interrupted_after_a_checkpoint)
    assert main(["run", str(config), "--dir", str(tmp_path / "out")]) == 130
    said = capsys.readouterr().out.splitlines()[-1]
    prefix = "run 20261130-100000-bbbb can go on from its checkpoint at step 60: "
    assert said.startswith(prefix)
    command = shlex.split(said.removeprefix(prefix))
    assert command[:2] == ["fulltune", "run"]
    assert main(command[1:]) == 130  # resumed, not refused as one of two unfinished runs
    assert started == [None, "20261130-100000-bbbb"]


def test_a_stopped_local_run_stops_the_processes_it_started():
    """SIGTERM (a `kill`, a CI job's cancel) is taken as Ctrl-C, and the step and the training
    processes under it are stopped with the run, not left training on the GPUs. The run is a process
    of its own here, as the CLI is: it stops every process under it."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    import psutil

    run = textwrap.dedent(
        """
        import signal, subprocess, sys, time
        from fulltune.kfp.local_run import stopping_steps_when_stopped
        training = "import time; time.sleep(120)"
        step = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {training!r}]); time.sleep(120)"
        try:
            with stopping_steps_when_stopped():
                subprocess.Popen([sys.executable, "-c", step])
                time.sleep(120)
        except KeyboardInterrupt:
            print("interrupted; SIGTERM handled as before:", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
        """
    )
    stopped = subprocess.Popen([sys.executable, "-c", run], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(started := psutil.Process(stopped.pid).children(recursive=True)) < 2:
        assert time.monotonic() < deadline, "the step and its training process did not start"
        time.sleep(0.1)
    stopped.send_signal(signal.SIGTERM)
    out, _ = stopped.communicate(timeout=60)
    assert out == "interrupted; SIGTERM handled as before: True\n"
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def start_fulltune_run(tmp_path: Path, demo_assets):
    """`fulltune run` on the demo's model and data as a process of its own, read up to its configure
    step's line: (the process, its lines so far, its run's directory)."""
    import re
    import subprocess
    import sys

    config = tmp_path / "my.yaml"
    config.write_text(
        RunConfig.from_dict(
            {
                "model": {"base_model_uri": str(demo_assets.base_model_dir)},
                "data": {"train_uri": demo_assets.train_uri},
                "preprocess": {"max_seq_len": 128},
                "resources": {"accelerator": "cpu"},
            }
        ).to_yaml()
    )
    run = subprocess.Popen(
        [sys.executable, "-m", "fulltune.cli", "run", str(config), "--dir", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in run.stdout:  # stopped while validate-data or a later step runs
        lines.append(line)
        if line.startswith("ok     configure"):
            break
    (root,) = [m.group(1) for line in lines if (m := re.match(r"the run's directory: (.*)$", line))]
    return run, lines, root


def test_fulltune_run_stopped_by_sigterm_says_so_and_leaves_no_step_running(tmp_path, demo_assets):
    import signal
    import time

    import psutil

    run, lines, _ = start_fulltune_run(tmp_path, demo_assets)
    steps = psutil.Process(run.pid).children(recursive=True)
    run.send_signal(signal.SIGTERM)
    lines += run.stdout.readlines()
    assert run.wait(timeout=60) == 130, lines
    assert "interrupted: the run's steps were stopped\n" in lines
    time.sleep(0.5)
    assert not [p for p in steps if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_runs_lists_a_run_from_its_first_step(tmp_path, demo_assets, capsys):
    """Before plan writes the first file into the run's directory, as after."""
    import signal

    from fulltune.cli import main

    run, lines, root = start_fulltune_run(tmp_path, demo_assets)
    try:
        assert main(["runs", str(tmp_path / "my.yaml"), "--dir", str(tmp_path / "out")]) == 0
        listed = capsys.readouterr().out.splitlines()
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
    (row,) = [line for line in listed if line.startswith(Path(root).name)]
    assert row.startswith(f"{Path(root).name}  running: pid {run.pid} on this machine"), lines


def test_fulltune_run_killed_outright_leaves_no_step_running_and_its_run_unlocked(tmp_path, demo_assets):
    """`kill -9` (or the OOM killer) runs no handler in the run: its steps and training processes
    notice it is gone and stop themselves; the kernel lets its run's lock go."""

    import psutil

    from fulltune import run_lock

    run, lines, root = start_fulltune_run(tmp_path, demo_assets)
    assert run_lock.holder(root).pid == run.pid, lines
    steps = psutil.Process(run.pid).children(recursive=True)
    assert steps, "the step after configure is not running"
    run.kill()
    run.wait()
    _, alive = psutil.wait_procs(steps, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline()[:3] for p in alive]
    assert run_lock.holder(root) is None
