"""`fulltune submit` and `fulltune schedule`: put the pipeline on a Kubeflow Pipelines cluster.

Both talk to the KFP v2beta1 REST API through `kfp.Client`:

- the pipeline package is uploaded as a *version* of the `full-finetune` pipeline (the pipeline is
  created on first use). The version is named `<fulltune version>-<first 12 hex of the package's
  SHA-256>`, so submitting the same package again reuses that version and a changed package adds a
  new one; the UI's version list then says which code every run used.
- the run's parameters (a RunConfig or parameters file, `--param NAME=VALUE`, the package's own
  defaults; `fulltune.kfp.run_parameters`) are resolved and validated here before anything is
  created on the cluster, and sent as the pipeline's typed parameters plus `config` (hyper-parameter
  defaults are filled in by the pipeline's own `plan` step, from the image's fulltune).
- `submit` creates a run in an experiment (created when missing) and can wait for it to finish.
- with `--check-cluster`, before anything is created, the launcher's checks of `fulltune doctor`
  (the training API of `resources.launcher`, a TrainJob's runtime, the launcher's RBAC) run against
  the Kubernetes API (in-cluster or the kubeconfig), and a failed one refuses the run.
- `schedule` keeps one recurring run per name. The v2beta1 API has no update for recurring runs
  (create, get, list, enable, disable, delete only), so a changed schedule is created anew and the
  old one deleted afterwards (if the create fails, the old schedule stays); an identical one is
  left alone, and when only paused/active differs it is disabled or enabled in place.

KFP's cron has six fields, seconds first (robfig/cron); a standard five-field expression such as
"0 3 * * 0" would be misread (as second 0, minute 3, any hour, ...), so it is given a leading "0".

Credentials never come from the command line: a bearer token from the environment variable
KFP_BEARER_TOKEN, else the Kubeflow Pipelines service-account token that kfp reads in a pod
(KF_PIPELINES_SA_TOKEN_PATH, default /var/run/secrets/kubeflow/pipelines/token), else none (a
port-forward or an unauthenticated endpoint). The host comes from --host or KFP_HOST, else (in a
pod) the API service of a standard Kubeflow install.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fulltune import __version__, parameters
from fulltune.config import ConfigError, RunConfig
from fulltune.kfp.cluster import secret_name_argument
from fulltune.kfp.run_parameters import (
    AS_COMPILED,
    ClusterPackage,
    RunRequest,
    build_request,
    write_cluster_package,
)

if TYPE_CHECKING:
    from fulltune.outcome import RunOutcome

log = logging.getLogger("fulltune.submit")

ENV_HOST = "KFP_HOST"
KFP_ENV_HOST = "KF_PIPELINES_ENDPOINT"  # the kfp SDK's own variable, honoured after ours
ENV_TOKEN = "KFP_BEARER_TOKEN"
ENV_NAMESPACE = "KFP_NAMESPACE"
OWNER_MARK = "owner: "  # in a recurring run's description: who manages it (see schedule_description)
ENV_SERVICE_ACCOUNT = "FULLTUNE_SERVICE_ACCOUNT"  # the chart's upload hook sets it to the chart's account
POD_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
ENV_UI = "KF_PIPELINES_UI_ENDPOINT"  # kfp's own variable for a UI that is not at the API's address
DEFAULT_EXPERIMENT = "fulltune"
CONFIG_PARAMETER = parameters.CONFIG

EXIT_OK = 0
EXIT_FAILED = 1  # the run failed or was canceled, or the KFP API refused a request
EXIT_USAGE = 2  # bad arguments or parameters file; nothing was created
EXIT_TIMEOUT = 3  # --wait gave up while the run was still going

TERMINAL_STATES = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"}


class SubmitError(Exception):
    """Something the user can fix; the message says what. `exit_code` is what the CLI returns;
    `result`, when a run was created before the failure (a run that failed under --wait)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, result: Any = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.result = result


# -- inputs -----------------------------------------------------------------------------------------


def build_run_request(
    package: Package, params_file: str | Path | None, assignments: list[str], *, scheduled: bool = False
) -> RunRequest:
    """The parameters a run of `package` is created with, validated as a RunConfig that can run on a
    cluster (`fulltune.cluster_config`); see `fulltune.kfp.run_parameters` for the layers.

    Raises:
        ConfigError: naming the file (and line), the `--param` or the dotted field and the problem.
    """
    from fulltune.cluster_config import check_for_cluster

    request = build_request(package.parameters, params_file, assignments, scheduled=scheduled)
    # the checks and messages of `fulltune config --check --for-cluster`
    check_for_cluster(request.config, str(params_file or "the run's parameters"))
    return request


@dataclass(frozen=True)
class Recurrence:
    """When and how a recurring run fires, besides its cron: at most `max_concurrency` runs at once,
    missed slots back-filled only with `catchup`, and only between `start_time` and `end_time`
    (RFC 3339, UTC) when they are set."""

    max_concurrency: int = 1
    catchup: bool = False
    start_time: str | None = None
    end_time: str | None = None


def recurrence(
    max_concurrency: int = 1, catchup: bool = False, start: str | None = None, end: str | None = None
) -> Recurrence:
    """A Recurrence from the command line's values; SubmitError (usage) naming the bad one."""
    if max_concurrency < 1:
        raise SubmitError(f"--max-concurrency {max_concurrency}: at least 1", EXIT_USAGE)
    start_at, end_at = _utc(start, "--start-time"), _utc(end, "--end-time")
    if start_at and end_at and end_at <= start_at:
        raise SubmitError(f"--end-time {end} is not after --start-time {start}", EXIT_USAGE)
    if end_at and end_at <= dt.datetime.now(dt.timezone.utc):
        raise SubmitError(f"--end-time {end} is in the past: the schedule would never fire", EXIT_USAGE)
    return Recurrence(max_concurrency, catchup, _rfc3339(start_at), _rfc3339(end_at))


def _rfc3339(t: dt.datetime | None) -> str | None:
    """A time as Recurrence holds it (and compares it with the recurring run's): UTC, seconds, Z."""
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


def _utc(text: str | None, flag: str) -> dt.datetime | None:
    """An ISO 8601 date or time (no zone: UTC) as an aware UTC datetime."""
    if not text:
        return None
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SubmitError(
            f"{flag} {text!r}: expected an ISO 8601 time, e.g. 2026-12-01T03:00Z", EXIT_USAGE
        ) from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)


def to_kfp_cron(expression: str) -> str:
    """A cron expression as KFP's scheduler reads it: six fields, seconds first.

    Five fields (standard cron: minute hour day-of-month month day-of-week) get "0" seconds; six are
    taken as KFP's own format.
    """
    fields = expression.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise SubmitError(
        f"--cron {expression!r}: expected 5 fields (minute hour day-of-month month day-of-week) "
        f"or KFP's 6 (seconds first), got {len(fields)}",
        EXIT_USAGE,
    )


@dataclass(frozen=True)
class Package:
    """A compiled pipeline file and what identifies it."""

    path: Path
    pipeline_name: str
    description: str
    sha256: str
    parameters: dict[str, Any]  # the root input definitions: name -> {parameterType, defaultValue, ...}

    @property
    def version_name(self) -> str:
        return f"{__version__}-{self.sha256[:12]}"


def read_package(path: str | Path) -> Package:
    """A compiled pipeline YAML (KFP v2 IR) with a `config` parameter; refuses anything else."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SubmitError(f"{path}: pipeline package not found", EXIT_USAGE) from None
    try:
        spec = next(yaml.safe_load_all(raw), None)
    except yaml.YAMLError as exc:
        raise SubmitError(f"{path}: not a compiled pipeline (YAML error: {exc})", EXIT_USAGE) from None
    info = spec.get("pipelineInfo") if isinstance(spec, dict) else None
    if not isinstance(info, dict) or not info.get("name"):
        raise SubmitError(f"{path}: not a compiled pipeline (no pipelineInfo.name)", EXIT_USAGE)
    params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    if CONFIG_PARAMETER not in params:
        raise SubmitError(f"{path}: pipeline has no `{CONFIG_PARAMETER}` parameter", EXIT_USAGE)
    sha = hashlib.sha256(raw).hexdigest()
    return Package(path, info["name"], info.get("description", ""), sha, params)


@contextlib.contextmanager
def package_file(path: str | Path | None, cluster: ClusterPackage = AS_COMPILED) -> Iterator[Package]:
    """The package at `path`, or the pipeline compiled from this fulltune into a temporary file;
    with `cluster` settings, a copy carrying them (`write_cluster_package`).

    The compiled bytes equal the checked-in pipelines/full_finetune.yaml for the same source, image
    (FULLTUNE_IMAGE or the package version) and kfp, so both give the same pipeline version; a
    stamped copy is a version of its own, named by its own bytes.
    """
    with tempfile.TemporaryDirectory(prefix="fulltune-package-") as tmp:
        if path is None:
            from fulltune.kfp.compile import compile_pipeline

            path = compile_pipeline(Path(tmp) / "full_finetune.yaml")
        package = read_package(path)
        if cluster:
            package = read_package(
                write_cluster_package(package.path, cluster, Path(tmp) / "for_cluster.yaml")
            )
        yield package


# -- the client -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """kfp.Client prints links on stdout and warns on every construction; keep our output ours."""
    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.simplefilter("ignore", FutureWarning)
        yield
    if out.getvalue().strip():
        log.debug("kfp: %s", out.getvalue().strip())


def resolve_host(host: str | None) -> str:
    """--host, else KFP_HOST, else KF_PIPELINES_ENDPOINT (the kfp SDK's), else inside a pod the KFP
    API service of a standard install.

    (kfp.Client finds the in-cluster address itself only when given neither host nor token, so it
    is named here.)
    """
    host = host or os.environ.get(ENV_HOST) or os.environ.get(KFP_ENV_HOST)
    if host:
        return host.rstrip("/")
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return IN_CLUSTER_HOST
    raise SubmitError(
        f"no Kubeflow Pipelines address: pass --host URL or set {ENV_HOST} (or {KFP_ENV_HOST})", EXIT_USAGE
    )


def _auth() -> dict[str, Any]:
    """kfp.Client keyword arguments for the credentials found in the environment (never argv)."""
    from kfp import client as kfp_client

    token = os.environ.get(ENV_TOKEN)
    if token:
        return {"existing_token": token.strip()}
    sa_path = os.environ.get(kfp_client.KF_PIPELINES_SA_TOKEN_ENV) or kfp_client.KF_PIPELINES_SA_TOKEN_PATH
    if os.path.isfile(sa_path):
        # kfp reads this token itself only when no host is given; with a host it must be asked to.
        return {"credentials": kfp_client.ServiceAccountTokenVolumeCredentials(sa_path)}
    return {}


def resolve_namespace(namespace: str | None) -> tuple[str | None, str]:
    """(namespace, where it came from): --namespace, else KFP_NAMESPACE, else the namespace of the pod
    this runs in, else the current kube context's; (None, "none") when there is none."""
    if namespace:
        return namespace, "--namespace"
    if os.environ.get(ENV_NAMESPACE):
        return os.environ[ENV_NAMESPACE], ENV_NAMESPACE
    with contextlib.suppress(OSError):
        pod_namespace = Path(POD_NAMESPACE_FILE).read_text().strip()
        if pod_namespace:
            return pod_namespace, "this pod's namespace"
    try:
        from kubernetes import config as kube_config

        # KUBECONFIG read now: the kubernetes package reads it once, when it is first imported
        _, active = kube_config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG") or None)
        context_namespace = (active or {}).get("context", {}).get("namespace")
        if context_namespace:
            return context_namespace, f"kube context {active['name']!r}"
    except Exception:  # noqa: BLE001 — no kubeconfig, or an unreadable one: no namespace from it
        pass
    return None, "none"


def connect(host: str, namespace: str | None = None):
    """A kfp.Client for `host` (see resolve_host) with the environment's credentials."""
    import kfp

    kwargs: dict[str, Any] = {"host": resolve_host(host), **_auth()}
    if namespace:
        kwargs["namespace"] = namespace
    with _quiet(), _api_errors(kwargs["host"]):
        return kfp.Client(**kwargs)


def pipeline_namespace(client, namespace: str | None) -> str | None:
    """The namespace the pipeline lives in: the profile's on multi-user KFP (so that one team's
    upload is not every team's pipeline), none on a standalone install. Refuses multi-user KFP
    without a namespace, before anything is created."""
    with _quiet(), _api_errors("KFP healthz"):
        multi_user = bool(client.get_kfp_healthz().multi_user)
    if not multi_user:
        return None
    if not namespace:
        raise SubmitError(
            "this KFP is multi-user: runs belong to a profile namespace; pass --namespace, set "
            f"{ENV_NAMESPACE}, or run in a pod or kube context of that namespace; nothing was created",
            EXIT_USAGE,
        )
    return namespace


@contextlib.contextmanager
def _api_errors(what: str) -> Iterator[None]:
    """API and connection failures as one readable line (no headers, so no credentials)."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        detail = exc.body
        try:
            body = json.loads(exc.body or "")
            detail = body.get("message") or body.get("error") or exc.body
        except (ValueError, AttributeError):
            pass
        raise SubmitError(f"{what}: KFP API answered {exc.status} {exc.reason}: {detail}") from None
    except urllib3.exceptions.HTTPError as exc:
        raise SubmitError(f"{what}: cannot reach the KFP API: {exc}") from None


def ui_url(host: str, kind: str, ident: str) -> str:
    """Where the UI shows a run or recurring run (KF_PIPELINES_UI_ENDPOINT overrides the host)."""
    base = os.environ.get(ENV_UI) or host
    return f"{base.rstrip('/')}/#/{kind}/details/{ident}"


# -- pipeline and version ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineVersion:
    pipeline_id: str
    version_id: str
    name: str
    uploaded: bool  # False: this content was already there


def _equals(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})


def _find_version(client, pipeline_id: str, name: str) -> str | None:
    resp = client.list_pipeline_versions(pipeline_id, page_size=100, filter=_equals("display_name", name))
    for v in resp.pipeline_versions or []:
        if name in (v.display_name, v.name):
            return v.pipeline_version_id
    return None


def _find_pipeline(client, name: str, namespace: str | None) -> str | None:
    resp = client.list_pipelines(page_size=100, filter=_equals("display_name", name), namespace=namespace)
    for p in resp.pipelines or []:
        if name in (p.display_name, p.name):
            return p.pipeline_id
    return None


def ensure_pipeline_version(client, package: Package, namespace: str | None = None) -> PipelineVersion:
    """The pipeline (created when new, in `namespace` when given) and the version holding exactly
    this package's content."""
    import kfp_server_api

    with _quiet(), _api_errors(f"pipeline {package.pipeline_name!r}"):
        pipeline_id = _find_pipeline(client, package.pipeline_name, namespace)
        if pipeline_id is None:
            try:
                created = client.pipelines.pipeline_service_create_pipeline(
                    pipeline=kfp_server_api.V2beta1Pipeline(
                        display_name=package.pipeline_name,
                        description=package.description,
                        namespace=namespace,
                    )
                )
                pipeline_id = created.pipeline_id
            except kfp_server_api.ApiException as exc:  # created meanwhile by a concurrent submit
                if exc.status != 409:
                    raise
                pipeline_id = _find_pipeline(client, package.pipeline_name, namespace)
        version_id = _find_version(client, pipeline_id, package.version_name)
        if version_id is not None:
            return PipelineVersion(pipeline_id, version_id, package.version_name, uploaded=False)
        try:
            version = client.upload_pipeline_version(
                str(package.path),
                package.version_name,
                pipeline_id=pipeline_id,
                description=f"fulltune {__version__}, package sha256 {package.sha256}",
            )
        except kfp_server_api.ApiException as exc:  # uploaded meanwhile by a concurrent submit
            version_id = (
                _find_version(client, pipeline_id, package.version_name) if exc.status == 409 else None
            )
            if version_id is None:
                raise
            return PipelineVersion(pipeline_id, version_id, package.version_name, uploaded=False)
    return PipelineVersion(pipeline_id, version.pipeline_version_id, package.version_name, uploaded=True)


def ensure_experiment(client, name: str) -> str:
    with _quiet(), _api_errors(f"experiment {name!r}"):
        return client.create_experiment(name).experiment_id  # kfp: get by name, else create


# -- submit -----------------------------------------------------------------------------------------


def create_run(
    client,
    version: PipelineVersion,
    experiment_id: str,
    params: dict,
    run_name: str,
    service_account: str | None,
):
    with _quiet(), _api_errors(f"run {run_name!r}"):
        return client.run_pipeline(
            experiment_id,
            run_name,
            params=params,
            pipeline_id=version.pipeline_id,
            version_id=version.version_id,
            service_account=service_account,
        )


def _state(run) -> str:
    return str(run.state or "RUNTIME_STATE_UNSPECIFIED").upper()


def wait_for_run(
    client,
    run_id: str,
    timeout: float | None,
    poll_interval: float = 15.0,
    seen: Callable[[str], None] = lambda state: None,
):
    """Poll until the run reaches a terminal state (SUCCEEDED, FAILED, SKIPPED, CANCELED); `seen`
    gets each state it is found in.

    kfp's own wait_for_run_completion does not count CANCELED as finished and would wait out its
    timeout on a canceled run, hence this loop.

    Raises:
        SubmitError(EXIT_TIMEOUT): still not finished after `timeout` seconds.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        with _quiet(), _api_errors(f"run {run_id}"):
            run = client.get_run(run_id)
        state = _state(run)
        if state != last:
            log.info("run %s: %s", run_id, state)
            seen(state)
            last = state
        if state in TERMINAL_STATES:
            return run
        if deadline is not None and time.monotonic() >= deadline:
            raise SubmitError(f"run {run_id}: still {state} after {timeout:g}s", EXIT_TIMEOUT)
        time.sleep(poll_interval)


def run_failure(run) -> list[str]:
    """The run's error and each failed task's, as lines for the terminal."""
    lines = []
    if run.error is not None and (run.error.message or run.error.code):
        lines.append(f"error: {run.error.message or f'code {run.error.code}'}")
    details = run.run_details.task_details if run.run_details is not None else None
    for task in details or []:
        if str(task.state or "").upper() == "FAILED":
            msg = task.error.message if task.error is not None and task.error.message else "failed"
            lines.append(f"task {task.display_name}: {msg}")
    return lines


@dataclass
class SubmitResult:
    run_id: str
    url: str
    version: PipelineVersion
    state: str | None = None
    outcome: RunOutcome | None = None  # with --wait, a run that succeeded: verdict, registered version


@dataclass(frozen=True)
class Target:
    """Where runs go and as whom: the KFP API, the profile namespace, the runs' ServiceAccount."""

    host: str
    namespace: str | None
    namespace_source: str
    service_account: str | None

    def describe(self) -> list[str]:
        sa = (
            self.service_account
            or "KFP's default (default-editor in a Kubeflow profile, pipeline-runner standalone)"
        )
        ns = f"{self.namespace} (from {self.namespace_source})" if self.namespace else "none (standalone KFP)"
        return [f"KFP API: {self.host}", f"namespace: {ns}", f"runs' service account: {sa}"]

    def flags(self) -> list[str]:
        """The options that reach this API and namespace again from this machine (a printed command
        must work as pasted: without --host it does only where KFP_HOST is set)."""
        named = ["--namespace", self.namespace] if self.namespace_source == "--namespace" else []
        return ["--host", self.host, *named]


def resolve_target(host: str | None, namespace: str | None, service_account: str | None) -> Target:
    ns, source = resolve_namespace(namespace)
    return Target(
        resolve_host(host), ns, source, service_account or os.environ.get(ENV_SERVICE_ACCOUNT) or None
    )


def submit(
    *,
    host: str | None,
    params_file: str | Path | None = None,
    param: list[str] | tuple[str, ...] = (),
    cluster: ClusterPackage = AS_COMPILED,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    package: str | Path | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    wait: bool = False,
    timeout: float | None = None,
    poll_interval: float = 15.0,
    dry_run: bool = False,
    check_cluster: bool = False,
    out=None,
) -> SubmitResult | DryRun:
    """Validate the parameters, upload the pipeline version if new, create the run; optionally wait.

    Prints what it did to `out` (stdout): where and as whom, pipeline version, run id and UI address,
    final state. With `dry_run` it prints what it would send and sends nothing (returns a `DryRun`). With
    `check_cluster` it first runs the launcher's cluster checks (`check_cluster_for`).
    Raises SubmitError or ConfigError before creating anything when an input is wrong.
    """
    out = out or sys.stdout
    target = resolve_target(host, namespace, service_account)
    with package_file(package, cluster) as pkg:
        request = build_run_request(pkg, params_file, list(param))
        name = run_name or default_run_name(request)
        if check_cluster:
            check_cluster_for(request.config, target, out)
        if dry_run:
            return _dry_run(target, pkg, experiment, f"run {name!r}", request, out)
        with _on_cluster(target, pkg, experiment, out) as (client, version, experiment_id):
            run = create_run(client, version, experiment_id, request.parameters, name, target.service_account)
    result = SubmitResult(run.run_id, ui_url(target.host, "runs", run.run_id), version)
    _say(out, f"run id: {result.run_id}")
    _say(out, f"run url: {result.url}")
    if wait:
        _follow(client, target, result, request.config, timeout, poll_interval, out)
    return result


def _follow(
    client,
    target: Target,
    result: SubmitResult,
    cfg: RunConfig,
    timeout: float | None,
    poll_interval: float,
    out,
):
    """Wait for the run, then report what it came to: SubmitError (with `result`) unless it succeeded.
    Also when the wait itself ends first (--timeout, the API gone): the run exists, and --output json
    still names it, in the state it was last seen in."""
    try:
        finished = wait_for_run(
            client, result.run_id, timeout, poll_interval, seen=lambda state: setattr(result, "state", state)
        )
    except SubmitError as exc:
        exc.result = result
        raise
    result.state = _state(finished)
    _say(out, f"run {result.run_id}: {result.state}")
    if result.state != "SUCCEEDED":
        lines = [
            f"run {result.run_id} {result.state}",
            *run_failure(finished),
            *_retry_hint(cfg, result.run_id, target),
        ]
        raise SubmitError("\n".join(lines), result=result)
    result.outcome = report_outcome(cfg, result.run_id, out)


def _retry_hint(cfg: RunConfig, run_id: str, target: Target) -> list[str]:
    """How to go on from the failed run: a retry from its newest checkpoint when its training saved
    one, unless a step said its failure was the input's (a retry would fail the same way). Read with
    this machine's storage credentials; nothing when they cannot read the work directory."""
    from fulltune.layout import RunLayout
    from fulltune.train import checkpoint

    if permanent := _failed_on_its_input(cfg, run_id):
        return [f"{permanent}: a retry would fail the same way; fix it and submit a new run"]
    try:
        tag = checkpoint.newest_saved(RunLayout.for_run(cfg.work_dir, run_id).checkpoints)
    except (OSError, ValueError):  # StorageError, an unset work_dir
        return []
    if tag is None:
        return []
    return [
        f"training saved a complete checkpoint at step {checkpoint.step_of(tag)}; to go on from it: "
        + shlex.join(["fulltune", "retry", run_id, *target.flags(), "--wait"])
    ]


def _failed_on_its_input(cfg: RunConfig, run_id: str) -> str | None:
    """Which steps of the run failed on their input, and how, as their records say (`fulltune.failure`);
    None when none did, or when the work directory cannot be read here."""
    from fulltune import failure
    from fulltune.layout import RunLayout

    try:
        recorded = failure.failures(RunLayout.for_run(cfg.work_dir, run_id))
    except ValueError:  # an unset work_dir
        return None
    permanent = [f for f in recorded if f.permanent]
    return "; ".join(f"{f.step} failed on its input ({f.error}: {f.first_line})" for f in permanent) or None


RETRYABLE_STATES = ("FAILED", "CANCELED")


def retry(
    *,
    host: str | None,
    run_id: str,
    namespace: str | None = None,
    wait: bool = False,
    timeout: float | None = None,
    poll_interval: float = 15.0,
    force: bool = False,
    out=None,
) -> SubmitResult:
    """Run a failed or canceled run again as the same run (KFP's Retry): its failed steps run again
    under the same run id, so over the same work directory, and train resumes from the run's newest
    complete checkpoint. With `wait`, as `submit --wait`: the final state, then the verdict and the
    registered version. SubmitError when the run is not one KFP can retry, or, unless `force`, when a
    step of it failed on its input: the same parameters over the same data fail the same way, after
    the GPUs were asked for again and the checkpoint loaded."""
    out = out or sys.stdout
    target = resolve_target(host, namespace, None)
    client = connect(target.host, target.namespace)
    with _quiet(), _api_errors(f"run {run_id}"):
        run = client.get_run(run_id)
    state = _state(run)
    if state not in RETRYABLE_STATES:
        raise SubmitError(f"run {run_id} is {state}: only a failed or canceled run can be retried")
    ref = run.pipeline_version_reference  # None for a run made from a spec rather than a version
    version = PipelineVersion(
        ref.pipeline_id if ref else "", ref.pipeline_version_id if ref else "", "", uploaded=False
    )
    try:
        cfg = _config_of(run)  # before the retry: a run it cannot follow is not retried
    except ValueError:
        if wait:
            raise
        cfg = None  # parameters of another version of the pipeline: nothing to read its failures by
    if cfg is not None and not force:
        _refuse_failed_on_its_input(cfg, run_id)
    with _quiet(), _api_errors(f"retrying run {run_id}"):
        client._run_api.run_service_retry_run(run_id)  # kfp.Client has no method of its own for it
    result = SubmitResult(run_id, ui_url(target.host, "runs", run_id), version)
    _say(out, f"retrying run {run_id} ({state}): {result.url}")
    if wait:
        assert cfg is not None
        _follow(client, target, result, cfg, timeout, poll_interval, out)
    return result


def _refuse_failed_on_its_input(cfg: RunConfig, run_id: str) -> None:
    """SubmitError when a step of the run said its failure was the input's (`fulltune.failure`)."""
    if permanent := _failed_on_its_input(cfg, run_id):
        raise SubmitError(
            f"run {run_id}: {permanent}. A retry runs it again with the same parameters and would fail "
            "the same way: fix the input and submit a new run, or, when what it read has changed since "
            "(data replaced at the same URI), retry with --force"
        )


def _config_of(run) -> RunConfig:
    """The config a run's steps work with, from the parameters it was created with (as its configure
    step merges them)."""
    values = dict(run.runtime_config.parameters or {}) if run.runtime_config else {}
    return RunConfig.from_pipeline(parameters.resolve(values.pop(CONFIG_PARAMETER, None), values))


def report_outcome(cfg: RunConfig, run_id: str, out) -> RunOutcome | None:
    """What the finished run came to (a run whose gate refused the model succeeds too), read from its
    work directory and the registry with this machine's storage credentials, and printed; None, and
    a line saying why, when they cannot be read here."""
    from fulltune.outcome import RunOutcome

    try:
        outcome = RunOutcome.from_storage(cfg, run_id)
    except (OSError, ValueError, RuntimeError) as exc:  # StorageError, EvalResultError, RegistryError
        _say(out, f"the run's verdict was not read here ({exc}); its evaluate and register steps show it")
        return None
    for line in outcome.summary(f"run {run_id}").splitlines()[1:]:
        _say(out, line)
    return outcome


def default_run_name(request: RunRequest) -> str:
    return f"{request.config.model.name} {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S}Z"


def _put_version(target: Target, pkg: Package, out) -> tuple[Any, PipelineVersion]:
    """(client, pipeline version): connect, say where and as whom, and upload `pkg` when it is new."""
    client = connect(target.host, target.namespace)
    namespace = pipeline_namespace(client, target.namespace)
    for line in target.describe():
        _say(out, line)
    version = ensure_pipeline_version(client, pkg, namespace)
    where = f" in namespace {namespace}" if namespace else " (shared)"
    _say(out, f"pipeline {pkg.pipeline_name}{where} version {version.name} ({_fresh(version)})")
    return client, version


@contextlib.contextmanager
def _on_cluster(target: Target, pkg: Package, experiment: str, out):
    """(client, pipeline version, experiment id): what a run and a recurring run both start from."""
    client, version = _put_version(target, pkg, out)
    yield client, version, ensure_experiment(client, experiment)


def check_cluster_for(cfg: RunConfig, target: Target, out) -> None:
    """The checks of `fulltune doctor` that need no KFP run (`doctor.launcher_checks`), against the
    Kubernetes API this machine reaches (in-cluster, else the kubeconfig), in the namespace the
    training job will go to, for the runs' ServiceAccount when one is named; each finding printed.
    SubmitError, before anything is created, when one failed or the API cannot be reached."""
    from kubernetes import client
    from kubernetes.config import ConfigException
    from urllib3.exceptions import HTTPError

    from fulltune.doctor import FAIL, Cluster, launcher_checks
    from fulltune.launch.kubernetes import load_configuration

    namespace = cfg.resources.kubernetes.namespace or target.namespace or "default"
    _say(out, f"cluster checks for resources.launcher: {cfg.resources.launcher}, namespace {namespace}")
    try:
        api = client.ApiClient(load_configuration())
        cluster = Cluster(api, namespace, service_account=target.service_account or "")
        findings = launcher_checks(cfg, cluster)
    except (ConfigException, HTTPError, OSError) as exc:
        raise SubmitError(
            f"--check-cluster: cannot reach the Kubernetes API ({exc}); run where kubectl works (a "
            "kubeconfig context, or a pod) or leave out --check-cluster; nothing was submitted"
        ) from None
    for finding in findings:
        _say(out, finding.line())
    failed = [f.check for f in findings if f.status == FAIL]
    if failed:
        raise SubmitError(
            f"the cluster cannot run this config ({', '.join(failed)}: see the fixes above); nothing was submitted"
        )


@dataclass(frozen=True)
class DryRun:
    """What a dry run would have sent, and sent nothing: printed as lines, and with `--output json`
    as one object, so that a CI job reads the parameters it would have run with."""

    target: Target
    pipeline: str
    version: str
    what: str  # "run 'name'", "recurring run 'name', cron ...", "pipeline version"
    parameters: dict[str, Any]  # a run's parameters; an upload's defaults
    experiment: str | None = None  # None: an upload, which starts nothing in any experiment

    def said(self, out) -> DryRun:
        """Print where and what, and that nothing was sent; returns itself."""
        for line in self.target.describe():
            _say(out, line)
        run = f", experiment {self.experiment!r}, {self.what}" if self.experiment is not None else ""
        _say(out, f"pipeline {self.pipeline} version {self.version}{run}")
        label = "parameters" if self.experiment is not None else "parameter defaults"
        _say(out, f"{label}: " + json.dumps(self.parameters, sort_keys=True))
        _say(out, "dry run: nothing was sent")
        return self


def _dry_run(target: Target, pkg: Package, experiment: str, what: str, request: RunRequest, out) -> DryRun:
    """What submit or schedule would send, and nothing sent."""
    dry = DryRun(target, pkg.pipeline_name, pkg.version_name, what, dict(request.parameters), experiment)
    return dry.said(out)


# -- upload -----------------------------------------------------------------------------------------


def upload(
    *,
    host: str | None,
    package: str | Path | None = None,
    cluster: ClusterPackage = AS_COMPILED,
    namespace: str | None = None,
    dry_run: bool = False,
    out=None,
) -> UploadResult | DryRun:
    """Put the pipeline on KFP as a version (with the `cluster`'s images, S3 Secret and defaults) and start
    nothing: for teams that start runs from the Kubeflow UI. Returns a `DryRun` on a dry run."""
    out = out or sys.stdout
    target = resolve_target(host, namespace, None)
    with package_file(package, cluster) as pkg:
        if dry_run:
            defaults = _defaults_of(pkg)
            return DryRun(target, pkg.pipeline_name, pkg.version_name, "pipeline version", defaults).said(out)
        _, version = _put_version(target, pkg, out)
    result = UploadResult(
        ui_url(target.host, "pipelines", f"{version.pipeline_id}/version/{version.version_id}"), version
    )
    _say(out, f"pipeline url: {result.url}")
    return result


@dataclass
class UploadResult:
    url: str
    version: PipelineVersion


def _defaults_of(pkg: Package) -> dict[str, Any]:
    return {name: spec.get("defaultValue") for name, spec in pkg.parameters.items()}


# -- schedule ---------------------------------------------------------------------------------------


@dataclass
class ScheduleResult:
    recurring_run_id: str
    url: str
    action: str  # created | replaced | unchanged | paused | resumed
    cron: str
    version: PipelineVersion


def _recurring_runs(client, experiment_id: str, filter: str | None = None) -> Iterator:  # noqa: A002
    """Every recurring run of the experiment (matching the v2beta1 `filter`), page after page."""
    token = ""
    while True:
        resp = client.list_recurring_runs(
            experiment_id=experiment_id, page_token=token, page_size=100, filter=filter
        )
        yield from resp.recurring_runs or []
        token = resp.next_page_token
        if not token:
            return


def _list_recurring(client, experiment_id: str, name: str) -> list:
    runs = _recurring_runs(client, experiment_id, _equals("display_name", name))
    return [r for r in runs if r.display_name == name]


def _enabled(rr) -> bool:
    status = str(rr.status or "").upper()
    if status in ("ENABLED", "DISABLED"):
        return status == "ENABLED"
    return str(rr.mode or "").upper() == "ENABLE"


def _set_paused(client, rr, paused: bool) -> str:
    """Pause or resume an otherwise unchanged recurring run; returns the action taken."""
    if _enabled(rr) != paused:
        return "unchanged"
    if paused:
        client.disable_recurring_run(rr.recurring_run_id)
        return "paused"
    client.enable_recurring_run(rr.recurring_run_id)
    return "resumed"


def schedule_description(name: str, owner: str | None) -> str:
    """The recurring run's description; with an owner (the chart: "<namespace>/<release>") it marks
    the schedules that owner manages, so a renamed or uninstalled release removes its old ones."""
    text = f"fulltune schedule {name!r}, created by `fulltune schedule`"
    return f"{text}; {OWNER_MARK}{owner}" if owner else text


def _owned_by(client, experiment_id: str, owner: str) -> list:
    mark = f"; {OWNER_MARK}{owner}"
    return [r for r in _recurring_runs(client, experiment_id) if (r.description or "").endswith(mark)]


def _same_definition(rr, version: PipelineVersion, spec: ScheduleSpec) -> bool:
    trigger = rr.trigger.cron_schedule if rr.trigger and rr.trigger.cron_schedule else None
    rr_cron = trigger.cron if trigger else None
    ref = rr.pipeline_version_reference
    rr_version = (ref.pipeline_version_id if ref else None) or rr.pipeline_version_id
    rr_params = (rr.runtime_config.parameters or {}) if rr.runtime_config else {}
    when = spec.when
    return (
        rr_cron == spec.cron
        and rr_version == version.version_id
        and _numbers_as_floats(rr_params) == _numbers_as_floats(spec.params)
        and bool(rr.no_catchup) != when.catchup
        and str(rr.max_concurrency) == str(when.max_concurrency)
        and _time_text(trigger.start_time if trigger else None) == when.start_time
        and _time_text(trigger.end_time if trigger else None) == when.end_time
        and (rr.service_account or None) == spec.service_account
    )


def _numbers_as_floats(value: Any) -> Any:
    """Parameters as the API may return them: JSON has one number type, so 1024 may come back 1024.0."""
    if isinstance(value, dict):
        return {k: _numbers_as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_as_floats(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _time_text(value: Any) -> str | None:
    """A trigger time as the API returns it (datetime or text) in Recurrence's form."""
    return _rfc3339(_utc(value, "the recurring run's trigger time") if isinstance(value, str) else value)


def schedule(
    *,
    host: str | None,
    name: str,
    cron: str,
    params_file: str | Path | None = None,
    param: list[str] | tuple[str, ...] = (),
    cluster: ClusterPackage = AS_COMPILED,
    experiment: str = DEFAULT_EXPERIMENT,
    paused: bool = False,
    package: str | Path | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    owner: str | None = None,
    when: Recurrence = Recurrence(),
    dry_run: bool = False,
    check_cluster: bool = False,
    out=None,
) -> ScheduleResult | DryRun:
    """Create or update the recurring run called `name` in `experiment`; one per name afterwards.

    By default runs start at most one at a time (max_concurrency 1) and missed slots are not
    back-filled (no catchup): a fine-tune that overran its week is not followed by a burst of
    catch-up runs; `when` changes both and bounds the schedule in time.
    With `owner`, the other schedules of that owner in the experiment are deleted once this one
    exists: renaming a release's schedule leaves nothing firing under the old name.
    """
    out = out or sys.stdout
    kfp_cron = to_kfp_cron(cron)
    if not name.strip():
        raise SubmitError("--name must not be empty", EXIT_USAGE)
    target = resolve_target(host, namespace, service_account)
    with package_file(package, cluster) as pkg:
        request = build_run_request(pkg, params_file, list(param), scheduled=True)
        _require_own_dates(request.config)
        if check_cluster:
            check_cluster_for(request.config, target, out)
        if dry_run:
            return _dry_run(
                target, pkg, experiment, f"recurring run {name!r}, cron {kfp_cron!r}", request, out
            )
        spec = ScheduleSpec(name, kfp_cron, request.parameters, paused, target.service_account, owner, when)
        with _on_cluster(target, pkg, experiment, out) as (client, version, experiment_id):
            rr, action = _put_schedule(client, experiment_id, version, spec, out)
    result = ScheduleResult(
        rr.recurring_run_id,
        ui_url(target.host, "recurringruns", rr.recurring_run_id),
        action,
        kfp_cron,
        version,
    )
    state = "paused" if paused else "active"
    _say(out, f"recurring run {name!r}: {action} ({state}), cron {kfp_cron!r} (KFP: seconds first)")
    _say(out, _cycle_summary(request.config))
    _say(out, f"recurring run id: {result.recurring_run_id}")
    _say(out, f"recurring run url: {result.url}")
    return result


def _require_own_dates(cfg) -> None:
    """Refuse a schedule whose config fixes the run's date: `data.as_of` wins over the scheduled
    time, so every run would read the same window again, training on last cycle's data each week."""
    if cfg.data.as_of is None:
        return
    raise SubmitError(
        f"data.as_of: {cfg.data.as_of} would be the date of every run of this schedule, each reading "
        f"the {cfg.data.window_days} day(s) ending then again; leave it out, so that each run takes "
        "the time it was scheduled for (backfill a missed cycle with `fulltune submit` and data.as_of); "
        "nothing was created",
        EXIT_USAGE,
    )


def _cycle_summary(cfg) -> str:
    """What each run of a schedule does about its data and the model in production."""
    from fulltune.data.window import FIELDS, has_placeholder

    windowed = [f for f in FIELDS if has_placeholder(getattr(cfg.data, f))]
    data = (
        f"reads the {cfg.data.window_days} day(s) of {', '.join(windowed)} ending at its scheduled date"
        if windowed
        else "reads the same data URIs every time (no {date} placeholder)"
    )
    judged = (
        "is judged against the version in production and promoted only when not worse"
        if cfg.evaluation.compare_to == "registered"
        else (
            "is judged against the base model only and never promoted over the version in production "
            "(evaluation.compare_to: base)"
        )
    )
    return f"each run {data}, and {judged}"


@dataclass(frozen=True)
class ScheduleSpec:
    """Everything that defines one recurring run besides its pipeline version."""

    name: str
    cron: str  # KFP's six fields
    params: dict[str, Any]
    paused: bool
    service_account: str | None
    owner: str | None
    when: Recurrence


def _put_schedule(client, experiment_id: str, version: PipelineVersion, spec: ScheduleSpec, out):
    """(the recurring run, what was done to it): created, replaced, unchanged, paused or resumed;
    the owner's schedules under other names are deleted afterwards."""
    name, owner, when = spec.name, spec.owner, spec.when
    with _quiet(), _api_errors(f"recurring run {name!r}"):
        existing = _list_recurring(client, experiment_id, name)
        description = schedule_description(name, owner)
        same = len(existing) == 1 and existing[0].description == description
        if same and _same_definition(existing[0], version, spec):
            rr, action = existing[0], _set_paused(client, existing[0], spec.paused)
        else:
            rr = client.create_recurring_run(
                experiment_id,
                name,
                description=description,
                cron_expression=spec.cron,
                max_concurrency=when.max_concurrency,
                no_catchup=not when.catchup,
                start_time=when.start_time,
                end_time=when.end_time,
                params=spec.params,
                pipeline_id=version.pipeline_id,
                version_id=version.version_id,
                enabled=not spec.paused,
                service_account=spec.service_account,
            )
            for old in existing:  # only once the new one exists
                client.delete_recurring_run(old.recurring_run_id)
            action = "replaced" if existing else "created"
        stale = (
            [r for r in _owned_by(client, experiment_id, owner) if r.display_name != name] if owner else []
        )
        for old in stale:
            client.delete_recurring_run(old.recurring_run_id)
            _say(out, f"recurring run {old.display_name!r} of {owner}: deleted (renamed to {name!r})")
    return rr, action


def unschedule(
    *,
    host: str | None,
    experiment: str = DEFAULT_EXPERIMENT,
    name: str | None = None,
    owner: str | None = None,
    namespace: str | None = None,
    out=None,
) -> list[str]:
    """Delete the recurring runs called `name`, or all those `owner` manages, in `experiment`;
    returns the names deleted. Runs already started are left to finish (or to be cancelled)."""
    out = out or sys.stdout
    if bool(name) == bool(owner):
        raise SubmitError("unschedule: give exactly one of --name and --owner", EXIT_USAGE)
    target = resolve_target(host, namespace, None)
    client = connect(target.host, target.namespace)
    pipeline_namespace(client, target.namespace)
    with _quiet(), _api_errors(f"experiment {experiment!r}"):
        try:
            found_experiment = client.get_experiment(experiment_name=experiment, namespace=target.namespace)
        except ValueError:  # kfp: no experiment of that name, so no schedule in it either
            _say(out, f"experiment {experiment!r} does not exist: nothing to delete")
            return []
        eid = found_experiment.experiment_id
        found = _list_recurring(client, eid, name) if name else _owned_by(client, eid, owner)
        for rr in found:
            client.delete_recurring_run(rr.recurring_run_id)
            _say(out, f"recurring run {rr.display_name!r}: deleted")
    if not found:
        _say(out, f"no recurring run {'called ' + repr(name) if name else 'of ' + owner} in {experiment!r}")
    return [rr.display_name for rr in found]


# -- command line -----------------------------------------------------------------------------------


def _say(out, line: str) -> None:
    print(line, file=out, flush=True)


def _fresh(version: PipelineVersion) -> str:
    return "uploaded" if version.uploaded else "already there"


def cli_submit(args) -> int:
    """`fulltune submit`; returns the exit code (EXIT_*)."""
    options = {"run_name": args.run_name, "wait": args.wait, "timeout": args.timeout}
    return _run_cli(
        lambda out: submit(**_shared_options(args), **options, poll_interval=args.poll_interval, out=out),
        args.output,
    )


def cli_retry(args) -> int:
    """`fulltune retry`; returns the exit code (EXIT_*)."""
    options = {"run_id": args.run_id, "namespace": args.namespace, "wait": args.wait, "timeout": args.timeout}
    options |= {"poll_interval": args.poll_interval, "force": args.force}
    return _run_cli(
        lambda out: retry(host=args.host, **options, out=out), args.output, refused="the run was not retried"
    )


def cli_schedule(args) -> int:
    """`fulltune schedule`; returns the exit code (EXIT_*)."""
    options = {"name": args.name, "cron": args.cron, "paused": args.paused, "owner": args.owner}

    def action(out):
        when = recurrence(args.max_concurrency, args.catchup, args.start_time, args.end_time)
        return schedule(**_shared_options(args), **options, when=when, out=out)

    return _run_cli(action, args.output, refused="no recurring run was created or changed")


def result_json(result: SubmitResult | ScheduleResult | UploadResult | DryRun) -> dict[str, Any]:
    """What `--output json` prints: the run's (or recurring run's) id, UI address, state, and the
    pipeline version it runs; for a dry run, where and what it would have sent."""
    if isinstance(result, DryRun):
        return {
            "dry_run": True,
            "kfp_host": result.target.host,
            "namespace": result.target.namespace,
            "pipeline": result.pipeline,
            "pipeline_version_name": result.version,
            "experiment": result.experiment,
            "would_create": result.what,
            "parameters": result.parameters,
        }
    version = {"pipeline_id": result.version.pipeline_id, "version_id": result.version.version_id}
    if isinstance(result, UploadResult):
        return {"url": result.url, "uploaded": result.version.uploaded, "pipeline_version": version}
    if isinstance(result, SubmitResult):
        from fulltune.outcome import outcome_json

        return {
            "run_id": result.run_id,
            "url": result.url,
            "state": result.state,
            **outcome_json(result.outcome),
            "pipeline_version": version,
        }
    return {
        "recurring_run_id": result.recurring_run_id,
        "url": result.url,
        "action": result.action,
        "cron": result.cron,
        "pipeline_version": version,
    }


def cli_upload(args) -> int:
    """`fulltune upload`; returns the exit code (EXIT_*)."""
    options = {"package": args.package, "cluster": cluster_package(args), "namespace": args.namespace}
    return _run_cli(
        lambda out: upload(host=args.host, **options, dry_run=args.dry_run, out=out),
        args.output,
        refused="nothing was uploaded",
    )


def cli_unschedule(args) -> int:
    """`fulltune unschedule`; returns the exit code (EXIT_*)."""
    options = {
        "name": args.name,
        "owner": args.owner,
        "experiment": args.experiment,
        "namespace": args.namespace,
    }
    return _run_cli(lambda out: unschedule(host=args.host, **options, out=out))


def add_cluster_package_arguments(p) -> None:
    """What a cluster changes in the package before it is uploaded (`ClusterPackage`)."""
    p.add_argument(
        "--defaults",
        default=None,
        metavar="FILE",
        help="a RunConfig (or a parameters file, as --params takes) whose values become the uploaded "
        "version's parameter defaults (the cluster's "
        "work directory, registry, launcher, trainer image, S3 Secret): the Kubeflow UI's form starts "
        "from them, so a run started there needs only the model, the data and a name",
    )
    p.add_argument(
        "--image", default=None, metavar="REF", help="the CPU steps' image (default: the package's)"
    )
    p.add_argument(
        "--trainer-image",
        default=None,
        metavar="REF",
        help="the image of the GPU evaluate step and of the training pods (default: the package's)",
    )
    p.add_argument(
        "--s3-secret",
        type=secret_name_argument,
        default=None,
        metavar="NAME",
        help="the Secret every step pod reads S3 credentials from (default: the package's); '' for none",
    )
    p.add_argument(
        "--mlflow-secret",
        type=secret_name_argument,
        default=None,
        metavar="NAME",
        help="the Secret the train, evaluate and register steps and the training pods read the MLflow "
        "server and credentials (MLFLOW_TRACKING_*) from (default: the package's); '' for none",
    )
    p.add_argument(
        "--work-pvc",
        default=None,
        metavar="CLAIM:/PATH",
        help="mount this ReadWriteMany PersistentVolumeClaim into every step pod, for a work_dir on a "
        "volume (default: the package's); '' for none",
    )


def cluster_package(args) -> ClusterPackage:
    """The `ClusterPackage` the command line asks for (all None: the package as it is)."""
    return ClusterPackage(
        args.defaults, args.image, args.trainer_image, args.s3_secret, args.mlflow_secret, args.work_pvc
    )


def add_upload_arguments(p) -> None:
    p.add_argument(
        "--host", default=None, help=f"KFP API address (default: ${ENV_HOST}; in a pod: in-cluster)"
    )
    p.add_argument(
        "--package",
        default=None,
        metavar="FILE",
        help="compiled pipeline YAML (default: compile this fulltune's pipeline)",
    )
    add_cluster_package_arguments(p)
    p.add_argument("--namespace", default=None, help="multi-user KFP: the profile namespace (as for submit)")
    p.add_argument(
        "--output", choices=("text", "json"), default="text", help="json: one JSON object on stdout"
    )
    p.add_argument("--dry-run", action="store_true", help="print the version and its defaults; send nothing")


def add_unschedule_arguments(p) -> None:
    p.add_argument(
        "--host", default=None, help=f"KFP API address (default: ${ENV_HOST}; in a pod: in-cluster)"
    )
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="experiment the schedules are in")
    p.add_argument(
        "--namespace", default=None, help="multi-user KFP: the profile namespace (as for schedule)"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", default=None, help="delete the recurring run of this name")
    which.add_argument(
        "--owner", default=None, help="delete every recurring run `schedule --owner` made for it"
    )


def _shared_options(args) -> dict[str, Any]:
    """The options `add_arguments` gives both sub-commands."""
    return {
        "host": args.host,
        "params_file": args.params,
        "param": args.param or [],
        "cluster": cluster_package(args),
        "experiment": args.experiment,
        "package": args.package,
        "namespace": args.namespace,
        "service_account": args.service_account,
        "dry_run": args.dry_run,
        "check_cluster": args.check_cluster,
    }


def _run_cli(action, output: str = "text", refused: str = "nothing was submitted") -> int:
    """Run `action(out)`; with output json the progress lines go to stderr and stdout gets one JSON
    object (also for a run that failed under --wait), for a CI job to read. `refused`: what a
    refused config left undone, in the command's own words."""
    as_json = output == "json"
    result = None
    try:
        result = action(sys.stderr if as_json else sys.stdout)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(refused, file=sys.stderr)
        return EXIT_USAGE
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if as_json and exc.result is not None:
            print(json.dumps(result_json(exc.result)), flush=True)
        return exc.exit_code
    if as_json and isinstance(result, SubmitResult | ScheduleResult | UploadResult | DryRun):
        print(json.dumps(result_json(result)), flush=True)
    return EXIT_OK


def add_arguments(submit_parser, schedule_parser) -> None:
    """The options of both sub-commands (cli.py owns the sub-command list)."""
    for p in (submit_parser, schedule_parser):
        _add_run_arguments(p)
    _add_submit_arguments(submit_parser)
    _add_schedule_arguments(schedule_parser)


def _add_run_arguments(p) -> None:
    """Where, as whom and with what a run goes: the options submit and schedule share."""
    p.add_argument(
        "--host",
        default=None,
        help=f"KFP API address, e.g. https://kubeflow.example.com/pipeline (default: ${ENV_HOST}; "
        "in a pod: the in-cluster service). The token comes from "
        f"${ENV_TOKEN} or the pod's KFP service-account token, never from an option.",
    )
    p.add_argument(
        "--params",
        default=None,
        metavar="FILE",
        help="the run's parameters (YAML or JSON): a RunConfig (its sections: the pipeline's `config`), "
        "or {typed parameter: value, config: {...}}; merged over the package's defaults",
    )
    p.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="a typed pipeline parameter, repeatable (e.g. learning_rate=2e-5, train_uri=s3://...); wins "
        "over the same parameter in --params, and is an error where the RunConfig sets its field "
        f"differently. Names: {', '.join(parameters.NAMES)}",
    )
    add_cluster_package_arguments(p)
    p.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="json: one JSON object on stdout (run or recurring-run id, UI address, state, pipeline "
        "version) and the progress lines on stderr, for CI",
    )
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="experiment (created when missing)")
    p.add_argument(
        "--package",
        default=None,
        metavar="FILE",
        help="compiled pipeline YAML (default: compile this fulltune's pipeline, the same bytes "
        "as pipelines/full_finetune.yaml)",
    )
    p.add_argument(
        "--namespace",
        default=None,
        help=f"multi-user KFP: the profile namespace the pipeline, experiment and runs go to (default: "
        f"${ENV_NAMESPACE}, else this pod's namespace, else the kube context's)",
    )
    p.add_argument(
        "--service-account",
        default=None,
        metavar="NAME",
        help=f"ServiceAccount the runs' pods use: the one the chart's Role lets launch PyTorchJobs "
        f"(default: ${ENV_SERVICE_ACCOUNT}, else KFP's default)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate and print where, as whom and what; send nothing"
    )
    p.add_argument(
        "--check-cluster",
        action="store_true",
        help="first check, through the Kubernetes API (kubeconfig or in-cluster), that the cluster serves "
        "the job kind of resources.launcher (PyTorchJob or TrainJob), has a TrainJob's runtime and lets "
        "the runs' account launch it (fulltune doctor's checks); refuse the run when one fails. With "
        "--dry-run: check, and send nothing",
    )


def _add_submit_arguments(submit_parser) -> None:
    submit_parser.add_argument("--run-name", default=None, help="default: '<model.name> <UTC time>'")
    _add_wait_arguments(submit_parser)


def _seconds(text: str) -> float:
    """A duration argument: a number of seconds above 0. Checked by argparse (exit 2, nothing
    created) because the wait only reads it after the run exists: a negative interval made
    time.sleep raise there, leaving a started run unfollowed behind a traceback."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r}: a number of seconds above 0")
    return value


def _add_wait_arguments(p) -> None:
    p.add_argument(
        "--wait", action="store_true", help="wait for the run to finish; exit 1 unless it succeeded"
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="S",
        help="with --wait: give up after S seconds (exit 3)",
    )
    p.add_argument(
        "--poll-interval",
        type=_seconds,
        default=15.0,
        metavar="S",
        help="with --wait: seconds between checks",
    )


def add_retry_arguments(p) -> None:
    p.add_argument("run_id", metavar="RUN_ID", help="the failed or canceled run (submit prints its id)")
    p.add_argument(
        "--host", default=None, help=f"KFP API address (default: ${ENV_HOST}; in a pod: in-cluster)"
    )
    p.add_argument("--namespace", default=None, help="multi-user KFP: the profile namespace (as for submit)")
    _add_wait_arguments(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="retry although a step failed on its input (bad data or config: it would fail the same way), "
        "for when what it read has changed since",
    )
    p.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="json: one JSON object on stdout (as submit's), the progress lines on stderr",
    )


def _add_schedule_arguments(schedule_parser) -> None:
    schedule_parser.add_argument(
        "--cron",
        required=True,
        help='when to run: standard 5-field cron ("0 3 * * 0": Sundays 03:00) or KFP\'s 6 fields, seconds first',
    )
    schedule_parser.add_argument(
        "--name", required=True, help="recurring run name; the same name updates that schedule"
    )
    schedule_parser.add_argument(
        "--paused",
        action="store_true",
        help="create the schedule disabled, or pause an existing one (run again without it to resume; "
        "`fulltune unschedule` deletes it)",
    )
    schedule_parser.add_argument(
        "--max-concurrency",
        type=int,
        default=1,
        metavar="N",
        help="runs of this schedule at once (default 1)",
    )
    schedule_parser.add_argument(
        "--catchup",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="back-fill the slots missed while paused or down (default --no-catchup: only the next one runs)",
    )
    schedule_parser.add_argument(
        "--start-time", default=None, metavar="ISO", help="fire no earlier (UTC unless given)"
    )
    schedule_parser.add_argument(
        "--end-time", default=None, metavar="ISO", help="fire no later (UTC unless given)"
    )
    schedule_parser.add_argument(
        "--owner",
        default=None,
        help="who manages this schedule (the chart: <namespace>/<release>); its other schedules in the "
        "experiment are deleted, so a rename leaves nothing behind",
    )
