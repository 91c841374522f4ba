"""The node wrapper turns the ranks' failures into exit codes the PyTorchJob's ExitCode policy reads.

torchrun itself exits 1 for any worker failure, which `restartPolicy: ExitCode` treats as permanent,
so an OOM-killed rank would never be restarted. These run real torchrun with two local processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from fulltune._process import RUN_OWNER_ENV
from fulltune.launch.node import node_exit_code
from fulltune.launch.secret_env import SECRET_ENV_DIRS, export_secret_env
from fulltune.train.exit_codes import EXIT_RETRYABLE

WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    if os.environ["RANK"] == "1":
        how = os.environ["HOW"]
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(int(how))
    time.sleep(0.5 if os.environ["HOW"] == "0" else 60)  # rank 0 is stopped by torchrun when rank 1 fails
    """
)


def run_node(tmp_path, how: str) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "HOW": how, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    cmd = [sys.executable, "-m", "fulltune.launch.node", "--standalone", "--nnodes=1", "--nproc-per-node=2"]
    return subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("how", "expected"),
    [("0", 0), ("1", 1), ("2", 2), (str(EXIT_RETRYABLE), EXIT_RETRYABLE), ("kill", EXIT_RETRYABLE)],
)
def test_node_exit_code_follows_the_rank_that_failed(tmp_path, how, expected):
    result = run_node(tmp_path, how)
    assert result.returncode == expected, result.stderr[-2000:]
    if expected:
        assert "rank 1 failed first" in result.stderr
    assert list((tmp_path / "tmp").iterdir()) == []  # torchrun's log directory goes with the node


def test_plain_torchrun_would_have_hidden_the_retryable_code(tmp_path):
    """Why the wrapper exists: torchrun reports 1 for a rank that exited 138."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "HOW": str(EXIT_RETRYABLE), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2"]
    result = subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1


def test_exit_code_mapping():
    assert node_exit_code(1) == 1 and node_exit_code(2) == 2 and node_exit_code(7) == 7
    assert node_exit_code(-9) == EXIT_RETRYABLE  # SIGKILL (OOM killer)
    assert node_exit_code(-15) == EXIT_RETRYABLE  # SIGTERM (eviction)
    assert node_exit_code(137) == EXIT_RETRYABLE and node_exit_code(138) == EXIT_RETRYABLE


def test_local_ranks_find_this_environments_tools_first(monkeypatch):
    """DeepSpeed JIT-builds its CPU ops with whichever `ninja` the PATH gives; two different ninjas
    rebuild the op (~30 s) each time the other ran. The local launcher's ranks (and the benchmarks'
    torchrun, through the same `environment_path`) get this Python environment's bin directory
    first, once, as an activated environment has it."""
    from fulltune.launch.base import TrainJob
    from fulltune.launch.local import node_env
    from fulltune.train.args import TrainerArgs

    here = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/local/bin", here, "/usr/bin"]))
    args = TrainerArgs(
        config="c.yaml", deepspeed="ds.json", dataset="d.json", output="out", metrics="m.jsonl"
    )
    env = node_env(TrainJob(name="t", args=args, accelerator="cpu"))
    assert env["PATH"].split(os.pathsep) == [here, "/usr/local/bin", "/usr/bin"]
    assert env["DS_ACCELERATOR"] == "cpu"


FLAKY_ENTRY = textwrap.dedent(
    """
    import os, sys
    marker = os.path.join(os.environ["FLAKY_DIR"], "failed-once")
    if not os.path.exists(marker):
        open(marker, "w").close()
        print("RuntimeError: gloo pair.cc: Connection reset by peer", flush=True)
        sys.exit(138)
    """
)


def test_a_restart_says_what_the_failed_attempt_reported(tmp_path, caplog):
    """An operator reading the local launcher's restart line learns why the group failed, not only
    that it did: the error lines of the attempt come with it."""
    import io
    import logging

    from fulltune.launch.base import TrainJob
    from fulltune.launch.local import LocalLauncher
    from fulltune.train.args import TrainerArgs

    (tmp_path / "flaky_entry.py").write_text(FLAKY_ENTRY)
    args = TrainerArgs(config="c.yaml", deepspeed="ds.json", dataset="d.json", output="o", metrics="m.jsonl")
    env = {"PYTHONPATH": str(tmp_path), "FLAKY_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    job = TrainJob(
        name="t", args=args, accelerator="cpu", env=env, max_restarts=1, entry_module="flaky_entry"
    )
    stream = io.StringIO()
    with caplog.at_level(logging.WARNING, logger="fulltune.launch.local"):
        LocalLauncher(stream=stream).run(job)  # the second attempt succeeds
    restart = stream.getvalue().split(f"node exit codes [{EXIT_RETRYABLE}]: retryable; restarting the group")[
        1
    ]
    assert restart.splitlines()[1:3] == [
        "Errors reported:",
        "[node0] RuntimeError: gloo pair.cc: Connection reset by peer",
    ]
    assert "Connection reset by peer" in caplog.text


def test_the_rendezvous_port_is_free_and_never_one_an_outgoing_connection_could_take():
    """The local launcher picks the port torchrun binds a second or two later. A port below the
    kernel's ephemeral range cannot be taken by an outgoing connection in between; one that a
    listener holds is never picked."""
    import socket

    from fulltune.launch import local

    for _ in range(20):
        port = local.free_port((32768, 60999))
        assert 32768 - local.RENDEZVOUS_PORTS <= port < 32768 and local._bindable(port)

    # two candidate ports, one of them held by a listener: the other every time
    held = socket.socket()
    held.bind(("", 0))
    held.listen()
    try:
        taken = held.getsockname()[1]
        other = taken - 1 if local._bindable(taken - 1) else taken + 1
        low = max(taken, other) + 1  # the candidates: the two ports just below `low`
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(local, "RENDEZVOUS_PORTS", 2)
            assert {local.free_port((low, low + 1000)) for _ in range(20)} == {other}
    finally:
        held.close()
    # an unknown range: the kernel's choice, still free
    assert local._bindable(local.free_port((0, 0)))


SLEEPER = textwrap.dedent(
    """
    import os, pathlib, sys, time
    pathlib.Path(sys.argv[1], f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    time.sleep(120)  # a rank that would train on, unless its node stops it
    """
)


def test_a_node_stops_its_ranks_when_the_local_run_that_started_it_is_killed_outright(tmp_path):
    """`kill -9` of `fulltune run` runs no handler: the node (under a step's `sh -c`, as kfp.local runs
    it) sees its run's owner gone, and stops as on SIGTERM, torchrun stopping its ranks first."""
    import psutil

    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    node = " ".join(
        [sys.executable, "-m", "fulltune.launch.node", "--standalone", "--nnodes=1", "--nproc-per-node=2"]
    )
    owner = textwrap.dedent(
        f"""
        import os, subprocess, time
        from fulltune import _process
        os.environ[_process.RUN_OWNER_ENV] = _process.owner_token()
        subprocess.Popen(["sh", "-ec", "{node} {script} {tmp_path}; echo the step goes on"])
        time.sleep(120)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-c", owner], env=env)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"rank{r}.pid").exists() for r in (0, 1)):
        assert run.poll() is None and time.monotonic() < deadline, "the node's ranks did not start"
        time.sleep(0.1)
    started = psutil.Process(run.pid).children(recursive=True)
    assert len(started) >= 4, started  # sh, the node, its two ranks
    run.kill()
    run.wait()
    _, alive = psutil.wait_procs(started, timeout=20)
    assert not [p.cmdline() for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_the_run_owner_watch_has_ended_before_the_interpreter_finalizes(tmp_path):
    """A step or node exits through the interpreter's finalization. The thread watching the run's
    owner is a daemon: still asleep then, it woke into a runtime being freed, and about 1 step exit
    in 900 segfaulted after its work was done. It is ended at exit, before finalization begins."""
    child = textwrap.dedent(
        """
        import atexit, threading
        from fulltune import _process
        # runs after the module's own exit handlers (atexit is last in, first out)
        atexit.register(lambda: print("alive at exit:", sorted(t.name for t in threading.enumerate())))
        _process.stop_with_run_owner()
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        token = f"{owner.pid}:{psutil.Process(owner.pid).create_time()}"
        env = {**os.environ, RUN_OWNER_ENV: token}
        done = subprocess.run(
            [sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        owner.kill()
    assert done.returncode == 0, done.stderr
    assert "alive at exit: ['MainThread']" in done.stdout


def _secret_volume(root, name: str, keys: dict[str, bytes]):
    """A Secret as the kubelet mounts it: each key a link into a timestamped `..data` directory."""
    volume = root / name
    data = volume / "..2026_11_30_06_00_00.000000001"
    data.mkdir(parents=True)
    for key, value in keys.items():
        (data / key).write_bytes(value)
    (volume / "..data").symlink_to(data.name)
    for key in keys:
        (volume / key).symlink_to(f"..data/{key}")
    return volume


def test_the_ranks_see_the_mounted_secrets_keys_as_variables(tmp_path):
    """A TrainJob's pod cannot take envFrom: its Secrets are mounted, and the node exports their keys
    before torchrun starts the ranks, as envFrom would have set them."""
    s3 = _secret_volume(tmp_path, "s3", {"AWS_ACCESS_KEY_ID": b"AKIA1", "AWS_SECRET_ACCESS_KEY": b"s3cr3t\n"})
    script = tmp_path / "worker.py"
    script.write_text(
        "import json, os\n"
        "keys = ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY')\n"
        "print('ENV', json.dumps({k: os.environ.get(k) for k in keys}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", SECRET_ENV_DIRS: f"{s3}:{tmp_path / 'absent'}"}
    env.pop("AWS_ACCESS_KEY_ID", None), env.pop("AWS_SECRET_ACCESS_KEY", None)
    cmd = [sys.executable, "-m", "fulltune.launch.node", "--standalone", "--nnodes=1", "--nproc-per-node=1"]
    result = subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("ENV "))
    assert json.loads(line[4:]) == {"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "s3cr3t\n"}


def test_secret_keys_are_exported_with_envfroms_precedence(tmp_path):
    first = _secret_volume(tmp_path, "hf-token", {"HF_TOKEN": b"one", "SHARED": b"first", "not a name": b"x"})
    second = _secret_volume(tmp_path, "s3", {"SHARED": b"second", "OWN": b"secret's"})
    environ = {"OWN": "container's", SECRET_ENV_DIRS: f"{first}:{tmp_path / 'optional-absent'}:{second}"}
    assert export_secret_env(environ) == ["HF_TOKEN", "SHARED"]
    assert environ["HF_TOKEN"] == "one"
    assert environ["SHARED"] == "second"  # a later Secret wins, as in envFrom
    assert environ["OWN"] == "container's"  # the container's own variable wins over every Secret
    assert "not a name" not in environ and not any(k.startswith("..") for k in environ)
    assert export_secret_env({}) == []
