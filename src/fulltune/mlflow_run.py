"""One MLflow run per pipeline run (`training.report_to: mlflow`), written by train, evaluate and register.

Which run: the steps run in different pods, so each finds the run by the tag `fulltune.work_dir` (the
run-scoped work directory `plan` gives every pipeline run, unique to it) in the experiment
`training.mlflow_experiment` (default `model.name`, created when missing), and the first step to
report creates it, named `training.run_name` or the pipeline run's id. A retried step finds the same
run again.

What: train logs the resolved config as params (dotted field names) and as `config.yaml`, and each
step's figures under the names TensorBoard shows (`metrics.step_scalars`), then the run's final
figures as `train_summary/*`; evaluate logs its metrics as `evaluate/*`, the verdict and its reasons as
tags (`fulltune.verdict`, `fulltune.verdict_reasons`) and `eval.json` and the report as artifacts;
register tags the version it registered (`fulltune.registered_uri`, `fulltune.registered_version`,
`fulltune.manifest_sha256`: the SHA-256 of the version's manifest.json, which lists every file's).

Where: the server and credentials come from the standard environment only (MLFLOW_TRACKING_URI,
MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN, MLFLOW_TRACKING_INSECURE_TLS, ...; on a cluster a
Secret), never from parameters. Without MLFLOW_TRACKING_URI nothing is logged (a warning says so):
a pod's local ./mlruns would vanish with it.

Tracking never fails a run: every request is bounded (10 s per attempt and 2 retries unless
MLFLOW_HTTP_REQUEST_TIMEOUT / MLFLOW_HTTP_REQUEST_MAX_RETRIES say otherwise, where MLflow's defaults
are 120 s and 7 retries with exponential backoff); a failure is a warning, once per kind, and a step
that is not training stops calling the server after its first failure. The training loop never waits
on the server at all: its tracker sends from a thread (`train/tracking.py`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fulltune import redact, storage

if TYPE_CHECKING:
    from fulltune.config import RunConfig

log = logging.getLogger("fulltune.mlflow")

RUN_TAG = "fulltune.work_dir"
CHANGED_TAG = "fulltune.changed."  # a param this run resumed with another value of
# MLflow's limits on one param value and one tag value, and on the entries of one log_batch call.
MAX_PARAM_CHARS, MAX_TAG_CHARS = 6000, 8000
MAX_BATCH_PARAMS, MAX_BATCH_METRICS = 100, 1000
BOUNDED_HTTP = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}


def wanted(cfg: RunConfig) -> bool:
    return "mlflow" in cfg.training.report_to


class MlflowRun:
    """The pipeline run's MLflow run, every call guarded (see the module docstring)."""

    def __init__(self, client: Any, run_id: str, *, keep_trying: bool):
        self.client, self.run_id, self.keep_trying = client, run_id, keep_trying
        self._warned: set[str] = set()
        self._broken = False

    @classmethod
    def open(cls, cfg: RunConfig, *, keep_trying: bool = False) -> MlflowRun | None:
        """The run of `cfg`'s pipeline run, found or created; None when report_to leaves MLflow out,
        no tracking URI is set or the server cannot be reached (a warning says which)."""
        if not wanted(cfg):
            return None
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            log.warning(
                "MLflow: training.report_to has mlflow but MLFLOW_TRACKING_URI is not set: not reported"
            )
            return None
        for name, value in BOUNDED_HTTP.items():
            os.environ.setdefault(name, value)
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            run_id = _find_or_create(client, cfg)
        except Exception as exc:  # noqa: BLE001 - tracking never fails a run
            where = redact.text(uri)  # a URI may carry its credentials as user:token@
            log.warning("MLflow: cannot reach the run at %s, not reported: %s", where, _short(exc))
            return None
        log.info("MLflow: run %s at %s", run_id, redact.text(uri))
        return cls(client, run_id, keep_trying=keep_trying)

    def log_params(self, params: Mapping[str, str]) -> None:
        """`params`, less those the run holds already. MLflow never changes a param's value and
        refuses a whole batch holding one it has another value for: a run resumed with another
        length keeps the first value as its param, and the new one goes into a tag,
        `fulltune.changed.<name>`: "<first> -> <now>"."""
        from mlflow.entities import Param, RunTag

        logged = self._logged_params()
        items = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = [
            RunTag(f"{CHANGED_TAG}{k}", f"{logged[k]} -> {v}")
            for k, v in params.items()
            if logged.get(k, v) != v
        ]
        for i in range(0, len(items), MAX_BATCH_PARAMS):
            self._call(
                "params",
                lambda i=i: self.client.log_batch(self.run_id, params=items[i : i + MAX_BATCH_PARAMS]),
            )
        if changed:
            self._call("params", lambda: self.client.log_batch(self.run_id, tags=changed))
            log.info(
                "MLflow: run %s continues with other values of %s: its params keep the first, "
                "the %s* tags hold both",
                self.run_id,
                ", ".join(t.key.removeprefix(CHANGED_TAG) for t in changed),
                CHANGED_TAG,
            )

    def _logged_params(self) -> dict[str, str]:
        """The params the run holds; {} when the server cannot say (then all are sent, as before)."""
        try:
            return dict(self.client.get_run(self.run_id).data.params)
        except Exception:  # noqa: BLE001 - tracking never fails a run
            return {}

    def log_metrics(
        self, steps: Iterable[tuple[int, Mapping[str, float]]]
    ) -> list[tuple[int, Mapping[str, float]]]:
        """Each (step, {name: value}) as MLflow metrics at that step; NaN and infinities as they are.
        Returns the steps a failed request left unlogged, for the caller to send again (a request
        carries whole steps, so none is half sent)."""
        from mlflow.entities import Metric

        steps, now, start = list(steps), int(time.time() * 1000), 0
        while start < len(steps):
            end, count = start + 1, len(steps[start][1])
            while end < len(steps) and count + len(steps[end][1]) <= MAX_BATCH_METRICS:
                count += len(steps[end][1])
                end += 1
            items = [
                Metric(k, float(v), now, step) for step, values in steps[start:end] for k, v in values.items()
            ]
            if not self._call(
                "metrics", lambda items=items: self.client.log_batch(self.run_id, metrics=items)
            ):
                return steps[start:]
            start = end
        return []

    def logged_steps(self, metric: str) -> set[int] | None:
        """The steps at which the run has `metric`; None when the server cannot say."""
        try:
            return {m.step for m in self.client.get_metric_history(self.run_id, metric)}
        except Exception as exc:  # noqa: BLE001 - tracking never fails a run
            log.warning("MLflow: cannot read %s of run %s: %s", metric, self.run_id, _short(exc))
            return None

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, _clip(v, MAX_TAG_CHARS)) for k, v in tags.items()]
        self._call("tags", lambda: self.client.log_batch(self.run_id, tags=items))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("artifacts", lambda: self.client.log_text(self.run_id, text, artifact_file))

    def set_status(self, status: str) -> bool:
        """RUNNING, FINISHED or FAILED (`set_terminated` for the last two); whether it was set."""
        if status == "RUNNING":
            return self._call("status", lambda: self.client.update_run(self.run_id, status="RUNNING"))
        return self._call("status", lambda: self.client.set_terminated(self.run_id, status=status))

    def _call(self, what: str, action: Callable[[], Any]) -> bool:
        """Whether `action` was done; a failure is a warning (once per kind), never an error."""
        if self._broken:
            return False
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - tracking never fails a run
            if what not in self._warned:
                self._warned.add(what)
                goes_on = (
                    "tried again at the next logging step"
                    if self.keep_trying
                    else "no more is sent from this step"
                )
                log.warning(
                    "MLflow: logging %s to run %s failed (%s); %s", what, self.run_id, _short(exc), goes_on
                )
            self._broken = not self.keep_trying
            return False
        return True


def _find_or_create(client: Any, cfg: RunConfig) -> str:
    name = cfg.training.mlflow_experiment or cfg.model.name
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{_quoted(cfg.work_dir)}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run_name = cfg.training.run_name or storage.basename(cfg.work_dir) or None
    return client.create_run(experiment_id, run_name=run_name, tags={RUN_TAG: cfg.work_dir}).info.run_id


def config_params(cfg: RunConfig) -> dict[str, str]:
    """The resolved config as MLflow params: one per leaf field under its dotted name (lists and
    empty mappings as JSON), each value clipped to MLflow's limit."""
    params: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            params[prefix] = _clip(text, MAX_PARAM_CHARS)

    walk("", cfg.to_dict())
    return params


# -- what the steps after training report -------------------------------------------------------------


def record_evaluation(
    cfg: RunConfig, metrics: Mapping[str, float], verdict: bool, reasons: list[str], files: Mapping[str, str]
) -> None:
    """evaluate's metrics (as evaluate/<name>), its verdict and reasons as tags, and `files`
    (artifact name -> local path) as artifacts."""
    run = MlflowRun.open(cfg)
    if run is None:
        return
    run.log_metrics([(0, {f"evaluate/{k}": v for k, v in metrics.items()})])
    run.set_tags(
        {"fulltune.verdict": "pass" if verdict else "fail", "fulltune.verdict_reasons": "\n".join(reasons)}
    )
    for name, path in files.items():
        with open(path, encoding="utf-8") as f:
            run.log_text(f.read(), f"evaluate/{name}")


def record_registration(cfg: RunConfig, version_uri: str) -> None:
    """register's version: its URI, number and the SHA-256 of its manifest as tags."""
    from fulltune.registry.layout import MANIFEST

    run = MlflowRun.open(cfg)
    if run is None:
        return
    tags = {
        "fulltune.registered_uri": version_uri,
        "fulltune.registered_version": storage.basename(version_uri).removeprefix("v"),
    }
    try:
        tags["fulltune.manifest_sha256"] = storage.sha256_uri(storage.join(version_uri, MANIFEST))
    except Exception as exc:  # noqa: BLE001 - the version is committed; tracking never fails the step
        log.warning("MLflow: cannot read %s's manifest for its digest: %s", version_uri, _short(exc))
    run.set_tags(tags)


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short(exc: Exception) -> str:
    """The first line of an exception, clipped: MLflow's carry whole HTTP responses, and the request's
    URL with any credentials it holds (hidden here)."""
    message = redact.text(exc).strip()
    text = message.splitlines()[0] if message else type(exc).__name__
    return _clip(f"{type(exc).__name__}: {text}", 300)
