"""Shared fixtures: a real S3 endpoint on localhost (moto server), a real MLflow tracking server on
localhost, and the tiny demo model and data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite in one worker process per core, which keeps every core busy already:
    # one OpenMP thread per process (and per step or rank it starts), since a second one would spin
    # waiting for a core another worker holds. torch reads it on import, after this file.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

#: Among the end-to-end tests, the files that hold the longest (three whole pipelines in one test;
#: several trainings in each), in that order.
SLOWEST_FIRST = {"test_pipeline.py": 0, "test_train.py": 1, "test_gpu_check.py": 2}
#: Files of tests that need no demo assets, ~90 s of work on one core together (launcher processes,
#: Helm renders, compiles, the bad-input catalogue): what the other workers take while the first
#: builds the assets (~80 s on one core), instead of waiting for them with a core idle.
WHILE_THE_ASSETS_BUILD = ("test_launch_node.py", "test_bad_inputs.py", "test_chart.py", "test_submit.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The order in which the workers of `make test` take the tests, each the next one as it finishes
    one: the end-to-end tests first, the files with the longest first among them, so that the
    minutes-long ones start early and the many short ones fill the gaps at the end, instead of one
    long test running alone there. The longest of all goes first, and its worker builds the demo
    assets; the tests of WHILE_THE_ASSETS_BUILD that need none come next, for the other workers. The
    sort is stable: within a file the order stays."""
    items.sort(key=lambda item: (not item.get_closest_marker("slow"), SLOWEST_FIRST.get(item.path.name, 9)))
    meanwhile = [
        item
        for item in items[1:]
        if item.path.name in WHILE_THE_ASSETS_BUILD and "demo_assets" not in getattr(item, "fixturenames", ())
    ]
    taken = set(map(id, meanwhile))
    items[:] = items[:1] + meanwhile + [item for item in items[1:] if id(item) not in taken]


def _free_port() -> int:
    """A free port below the ephemeral range: the mlflow server binds it seconds later, and an
    outgoing connection could take an ephemeral one in between (the launcher's rendezvous rule)."""
    from fulltune.launch.local import free_port

    return free_port()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server speaking real HTTP on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (sqlite backend, artifacts proxied to a local directory), started
    once per session; yields its URI.

    Without MLflow's job execution (its GenAI jobs, which fulltune never submits): with it the server
    starts eight more processes, each importing MLflow and then polling a queue, ~60 CPU-s to start
    and a fifth of a core for as long as the server runs, taken from the tests beside it."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = open(root / "server.log", "wb")  # noqa: SIM115 - open for the server's lifetime
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, server, root / "server.log")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def _wait_healthy(uri: str, server: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def mlflow_env(mlflow_server, monkeypatch):
    """MLFLOW_TRACKING_URI pointing at the session's server; yields an MlflowClient for it."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return MlflowClient(tracking_uri=mlflow_server)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Environment pointing boto3 at the moto server, and a fresh bucket; yields 's3://<bucket>'."""
    import uuid

    import boto3

    from fulltune import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    storage.s3_client.cache_clear()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    storage.s3_client.cache_clear()


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """The demo's tiny tokenizer, base model and datasets, built once per test run: the workers of
    `make test` share one copy, the first to need it building it while the others wait."""
    from filelock import FileLock

    from fulltune.demo.assets import build_demo_assets

    cache = os.environ.get("FULLTUNE_TEST_ASSETS")
    # under xdist each worker has its own base temp directory, in the run's shared one
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root = Path(cache) if cache else shared / "demo-assets"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".build.lock")):
        return build_demo_assets(root)
