"""MLflow tracking against a real `mlflow server` on localhost (conftest's `mlflow_server`): one run per
pipeline run that train, evaluate and register all write to, and a server that is down or hangs
never failing or stalling a step. Training's own reporting is asserted in tests/test_train.py."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time

import pytest

from fulltune import mlflow_run
from fulltune.config import RunConfig
from fulltune.mlflow_run import MlflowRun
from fulltune.train.metrics import StepRecord
from fulltune.train.tracking import MlflowTracker


def run_config(tmp_path, **training) -> RunConfig:
    return RunConfig.from_dict(
        {
            "work_dir": str(tmp_path / "work" / "run-4f2a"),  # as plan scopes it: <work_dir>/<run id>
            "model": {"name": "clinical-notes"},
            "training": {"report_to": ["tensorboard", "mlflow"], "learning_rate": 2e-5, **training},
        }
    )


def runs_of(client, cfg: RunConfig) -> list:
    experiment = client.get_experiment_by_name(cfg.training.mlflow_experiment or cfg.model.name)
    query = f"tags.`fulltune.work_dir` = '{cfg.work_dir}'"
    return client.search_runs([experiment.experiment_id], filter_string=query) if experiment else []


def test_evaluate_and_register_write_to_the_run_training_started(mlflow_env, tmp_path):
    client = mlflow_env
    cfg = run_config(tmp_path)
    trained = MlflowRun.open(cfg)  # what the train step does first
    trained.log_params(mlflow_run.config_params(cfg))

    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps({"verdict": False}))
    reasons = ["forgetting: general perplexity rose 7.0% > 5.0% allowed", "domain: loss fell 12.0%"]
    metrics = {"forgetting": 0.07, "domain_loss_improvement": 0.12, "gate_passed": 0.0}
    mlflow_run.record_evaluation(cfg, metrics, False, reasons, {"eval.json": str(eval_json)})
    version = tmp_path / "registry" / "clinical-notes" / "v3"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text('{"files": []}')
    mlflow_run.record_registration(cfg, str(version))

    [run] = runs_of(client, cfg)  # one run: the steps found the one training created
    assert run.info.run_id == trained.run_id and run.info.run_name == "run-4f2a"
    assert run.data.params["training.learning_rate"] == "2e-05"
    assert run.data.params["training.report_to"] == '["tensorboard", "mlflow"]'
    assert run.data.metrics["evaluate/forgetting"] == 0.07
    tags = run.data.tags
    assert tags["fulltune.verdict"] == "fail" and tags["fulltune.verdict_reasons"] == "\n".join(reasons)
    assert tags["fulltune.registered_uri"] == str(version) and tags["fulltune.registered_version"] == "3"
    assert tags["fulltune.manifest_sha256"] == hashlib.sha256(b'{"files": []}').hexdigest()
    saved = client.download_artifacts(run.info.run_id, "evaluate/eval.json", str(tmp_path / "dl"))
    assert json.loads(open(saved).read()) == {"verdict": False}


def test_a_run_resumed_with_another_length_keeps_its_params_and_tags_what_changed(
    mlflow_env, tmp_path, caplog
):
    """MLflow never changes a param and refuses a whole batch holding a changed one: the resumed
    attempt sends only the params the run lacks, and says in tags what it changed."""
    cfg = run_config(tmp_path, max_steps=2)
    MlflowRun.open(cfg).log_params(mlflow_run.config_params(cfg))
    longer = cfg.with_overrides({"training": {"max_steps": 3}})
    params = {**mlflow_run.config_params(longer), "training.new_field": "x"}  # one the run lacks
    with caplog.at_level(logging.WARNING, "fulltune"):
        MlflowRun.open(longer, keep_trying=True).log_params(params)
    assert "failed" not in caplog.text
    [run] = runs_of(mlflow_env, cfg)
    assert run.data.params["training.max_steps"] == "2" and run.data.params["training.new_field"] == "x"
    assert run.data.tags["fulltune.changed.training.max_steps"] == "2 -> 3"


def test_each_pipeline_run_gets_its_own_run_in_the_configured_experiment(mlflow_env, tmp_path):
    first = run_config(tmp_path, mlflow_experiment="nightly-clinical", run_name="cycle 1")
    second = first.with_overrides({"work_dir": str(tmp_path / "work" / "run-77b1")})
    mlflow_run.record_evaluation(first, {"forgetting": 0.01}, True, [], {})
    mlflow_run.record_evaluation(second, {"forgetting": 0.02}, True, [], {})
    [a], [b] = runs_of(mlflow_env, first), runs_of(mlflow_env, second)
    assert a.info.run_id != b.info.run_id and a.info.run_name == "cycle 1"
    assert a.info.experiment_id == b.info.experiment_id
    assert mlflow_env.get_experiment(a.info.experiment_id).name == "nightly-clinical"
    assert a.data.tags["fulltune.verdict"] == "pass"


def test_nothing_is_reported_without_mlflow_in_report_to_or_without_a_tracking_uri(
    mlflow_env, tmp_path, monkeypatch, caplog
):
    cfg = run_config(tmp_path, report_to="tensorboard")
    assert MlflowRun.open(cfg) is None
    mlflow_run.record_evaluation(cfg, {"forgetting": 0.01}, True, [], {})
    assert runs_of(mlflow_env, cfg) == []
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with caplog.at_level(logging.WARNING, "fulltune.mlflow"):
        assert MlflowRun.open(run_config(tmp_path)) is None
    assert "MLFLOW_TRACKING_URI is not set: not reported" in caplog.text


@pytest.fixture
def silent_server():
    """A TCP server on localhost that accepts connections and never answers: a hung tracking server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def test_a_hung_server_neither_stalls_training_nor_fails_a_step(silent_server, tmp_path, monkeypatch, caplog):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", silent_server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = run_config(tmp_path)
    with caplog.at_level(logging.WARNING, "fulltune"):
        started = time.monotonic()
        assert MlflowRun.open(cfg) is None  # the step goes on unreported, after one bounded request
        mlflow_run.record_evaluation(cfg, {"forgetting": 0.01}, True, [], {})
        assert time.monotonic() - started < 10
        # a run that was reachable at the start and hangs later: the loop only appends
        run = MlflowRun(MlflowClient(tracking_uri=silent_server), "0" * 32, keep_trying=True)
        tracker = MlflowTracker(run, logging_steps=1, total_steps=50, close_timeout_s=2.0)
        started = time.monotonic()
        for step in range(50):
            tracker(step + 1, 0, StepRecord(step, 2.0, 1e-5, 1.0, 100, 1000.0, 0.1))
        assert time.monotonic() - started < 0.5
        tracker.close({"steps": 50.0})
    assert "MLflow: cannot reach the run at" in caplog.text
    assert "did not take the last metrics within 2 s; left unsent" in caplog.text


def test_a_resumed_attempt_sends_the_steps_a_killed_one_left_unsent(mlflow_env, tmp_path):
    """The first attempt's sender got step 1 out, then the attempt was killed with steps 2-4 still
    queued (its checkpoint at step 4 holds their records). The next attempt sends those three from
    the checkpoint's records, not step 1 again, then its own: MLflow has steps 1-6 once each."""
    cfg = run_config(tmp_path)
    records = [StepRecord(step, 3.0 - step / 10, 1e-5, 1.0, 100, 1000.0, 0.1) for step in range(6)]
    killed = MlflowRun.open(cfg, keep_trying=True)
    killed.log_metrics([(1, {"train/loss": records[0].loss})])

    resumed = MlflowRun.open(cfg, keep_trying=True)
    assert resumed.run_id == killed.run_id
    tracker = MlflowTracker(resumed, logging_steps=1, total_steps=6, send_interval_s=0.1)
    tracker.backfill(records[:4])
    for record in records[4:]:
        tracker(record.step + 1, 0, record)
    tracker.close()
    history = mlflow_env.get_metric_history(resumed.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(r.step + 1, r.loss) for r in records]
    assert sorted(m.step for m in mlflow_env.get_metric_history(resumed.run_id, "train/grad_norm")) == [
        2,
        3,
        4,
        5,
        6,
    ]  # the killed attempt had sent step 1's loss alone


def test_a_server_away_when_training_ends_still_gets_the_runs_status_once_it_is_back(
    mlflow_env, tmp_path, monkeypatch
):
    """The status is the last thing sent: a server that refuses it for a moment (restarting) must
    not leave the finished run RUNNING in the MLflow UI."""
    from mlflow import MlflowClient

    from fulltune.train import tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(tracking, "CLOSE_RETRY_S", 0.2)
    run = MlflowRun.open(run_config(tmp_path), keep_trying=True)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        up, run.client = run.client, MlflowClient(tracking_uri=f"http://127.0.0.1:{closed.getsockname()[1]}")
        tracker = MlflowTracker(run, logging_steps=1, total_steps=1, send_interval_s=0.1, close_timeout_s=20)
        back = threading.Timer(1.0, lambda: setattr(run, "client", up))
        back.start()
        tracker.close()
        back.join()
    assert mlflow_env.get_run(run.run_id).info.status == "FINISHED"


def test_steps_logged_while_the_server_was_down_reach_it_once_it_is_back(
    mlflow_env, tmp_path, monkeypatch, caplog
):
    """The server goes away after the run started (restarted, a network outage) and comes back: the
    figures of the steps in between are sent once it answers again, each once."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run = MlflowRun.open(run_config(tmp_path), keep_trying=True)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: refused
        up, run.client = run.client, MlflowClient(tracking_uri=down)
        tracker = MlflowTracker(run, logging_steps=1, total_steps=6, send_interval_s=0.1)
        records = [StepRecord(step, 3.0 - step / 10, 1e-5, 1.0, 100, 1000.0, 0.1) for step in range(6)]
        with caplog.at_level(logging.WARNING, "fulltune"):
            for record in records[:3]:
                tracker(record.step + 1, 0, record)
            deadline = time.monotonic() + 20
            while "logging metrics" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "logging metrics" in caplog.text  # the sender tried while the server was down
            run.client = up
            for record in records[3:]:
                tracker(record.step + 1, 0, record)
            tracker.close()
    history = mlflow_env.get_metric_history(run.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(r.step + 1, r.loss) for r in records]


def test_credentials_in_the_tracking_uri_never_reach_the_log(mlflow_server, tmp_path, monkeypatch, caplog):
    """MLFLOW_TRACKING_URI may carry Basic-auth credentials (https://user:token@host, from the MLflow
    Secret): the step's log names the server without them, whether it answers or not, and so do the
    errors MLflow raises, which quote the request's URL."""
    secret = "FAKE-mlflow-t0ken"  # noqa: S105 - a made-up credential the log must not show
    with_secret = mlflow_server.replace("http://", f"http://ci-bot:{secret}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", with_secret)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with caplog.at_level(logging.INFO, "fulltune"):
        assert MlflowRun.open(run_config(tmp_path)) is not None  # the server ignores the userinfo
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
            monkeypatch.setenv(
                "MLFLOW_TRACKING_URI", f"http://ci-bot:{secret}@127.0.0.1:{closed.getsockname()[1]}"
            )
            assert MlflowRun.open(run_config(tmp_path)) is None
    assert "MLflow: run " in caplog.text and "cannot reach the run at http://***@127.0.0.1:" in caplog.text
    assert "API request to http://***@127.0.0.1:" in caplog.text  # MLflow's own message, hidden too
    assert secret not in caplog.text
