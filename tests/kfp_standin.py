"""A stateful stand-in for the Kubeflow Pipelines v2beta1 REST API, on localhost, for tests.

It serves the endpoints `kfp.Client` uses (healthz, pipelines and their multipart upload, pipeline
versions, experiments, runs, recurring runs) over real HTTP, keeps what was created, answers with
the JSON the real API server sends (snake_case field names, RFC 3339 times, gRPC-style errors), and
records every request (method, path, query, headers, JSON body, uploaded files) so a test can
assert what reached the server. It refuses what the real server refuses where that matters to us:
unknown ids (404), a duplicate pipeline or version name (409), run parameters the pipeline does not
declare or of the wrong type (400), a recurring run without a trigger (400).

Runs move through a script of states, one step per GET: by default PENDING -> RUNNING -> SUCCEEDED;
`script_runs(...)` sets the states (and the error) for the runs created next.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from standin_http import LoopbackServer, send_json

API = "/apis/v2beta1"

# KFP's run-time parameter types and the JSON values they take.
_PARAM_TYPES = {
    "STRUCT": dict,
    "LIST": list,
    "STRING": str,
    "BOOLEAN": bool,
    "NUMBER_INTEGER": int,
    "NUMBER_DOUBLE": (int, float),
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    json: Any = None
    files: dict[str, bytes] = field(default_factory=dict)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


_GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_id() -> str:
    return str(uuid.uuid4())


class KFPStandIn:
    """Start with `with KFPStandIn() as kfp:`; `kfp.url` is the host to give kfp.Client."""

    def __init__(self, *, multi_user: bool = False):
        self.multi_user = multi_user
        self.requests: list[Request] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}  # version id -> version (with pipeline_id)
        self.packages: dict[str, bytes] = {}  # version id -> the uploaded file
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self._scripts: dict[str, list[tuple[str, dict | None]]] = {}
        self._next_script: list[tuple[str, dict | None]] | None = None
        # what the pipeline's steps leave behind (outputs in the work directory, a registered
        # version), done when a run is created: called with the run
        self.on_run: Callable[[dict], None] | None = None
        self._lock = threading.Lock()
        self._http: LoopbackServer | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> KFPStandIn:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                standin._handle(self, "GET")

            def do_POST(self):
                standin._handle(self, "POST")

            def do_DELETE(self):
                standin._handle(self, "DELETE")

            def do_PATCH(self):
                standin._handle(self, "PATCH")

            def log_message(self, *args):  # keep test output quiet
                pass

        self._http = LoopbackServer(Handler)
        self._http.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._http is not None
        self._http.stop()

    @property
    def url(self) -> str:
        assert self._http is not None
        return self._http.url

    # -- test controls ----------------------------------------------------------------------------

    def script_runs(self, states: list[str], *, error: str | None = None, failed_task: str | None = None):
        """The runs created from now on go through `states`; a final FAILED carries `error`."""
        steps: list[tuple[str, dict | None]] = [(s, None) for s in states]
        if error is not None:
            final, _ = steps[-1]
            extra = {"error": {"code": 2, "message": error}}
            if failed_task:
                extra["run_details"] = {
                    "task_details": [
                        {
                            "display_name": failed_task,
                            "state": "FAILED",
                            "error": {"code": 2, "message": error},
                        }
                    ]
                }
            steps[-1] = (final, extra)
        self._next_script = steps

    def calls(self, method: str, path_pattern: str) -> list[Request]:
        """The recorded requests whose method matches and whose path matches the regex (full match)."""
        rx = re.compile(path_pattern)
        return [r for r in self.requests if r.method == method and rx.fullmatch(r.path)]

    def versions_of(self, pipeline_name: str) -> list[dict]:
        pid = next(p["pipeline_id"] for p in self.pipelines.values() if p["display_name"] == pipeline_name)
        return [v for v in self.versions.values() if v["pipeline_id"] == pid]

    # -- HTTP -------------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        req = Request(
            method=method,
            path=parts.path,
            query=parse_qs(parts.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in h.headers.items()},
        )
        ctype = h.headers.get("Content-Type", "")
        try:
            if ctype.startswith("multipart/form-data"):
                req.files = _multipart_files(ctype, body)
            elif body:
                try:
                    req.json = json.loads(body)
                except ValueError:
                    raise ApiError(400, "request body is not JSON") from None
            with self._lock:
                self.requests.append(req)
                status, payload = self._route(req)
        except ApiError as exc:
            status = exc.status
            payload = {"error": exc.message, "message": exc.message, "code": _GRPC_CODES.get(status, 2)}
        send_json(h, status, payload)

    _ROUTES = [
        ("GET", r"/healthz", "healthz"),
        ("GET", r"/pipelines", "list_pipelines"),
        ("POST", r"/pipelines", "create_pipeline"),
        ("POST", r"/pipelines/upload", "upload_pipeline"),
        ("POST", r"/pipelines/upload_version", "upload_version"),
        ("GET", r"/pipelines/(?P<pid>[^/]+)", "get_pipeline"),
        ("GET", r"/pipelines/(?P<pid>[^/]+)/versions", "list_versions"),
        ("GET", r"/pipelines/(?P<pid>[^/]+)/versions/(?P<vid>[^/]+)", "get_version"),
        ("GET", r"/experiments", "list_experiments"),
        ("POST", r"/experiments", "create_experiment"),
        ("GET", r"/experiments/(?P<eid>[^/:]+)", "get_experiment"),
        ("POST", r"/runs", "create_run"),
        ("GET", r"/runs", "list_runs"),
        ("GET", r"/runs/(?P<rid>[^/:]+)", "get_run"),
        ("POST", r"/runs/(?P<rid>[^/:]+):retry", "retry_run"),
        ("GET", r"/recurringruns", "list_recurring_runs"),
        ("POST", r"/recurringruns", "create_recurring_run"),
        ("GET", r"/recurringruns/(?P<rrid>[^/:]+)", "get_recurring_run"),
        ("DELETE", r"/recurringruns/(?P<rrid>[^/:]+)", "delete_recurring_run"),
        ("POST", r"/recurringruns/(?P<rrid>[^/:]+):enable", "enable_recurring_run"),
        ("POST", r"/recurringruns/(?P<rrid>[^/:]+):disable", "disable_recurring_run"),
    ]

    def _route(self, req: Request) -> tuple[int, Any]:
        if not req.path.startswith(API):
            raise ApiError(404, f"no such path {req.path}")
        rest = req.path[len(API) :]
        for method, pattern, name in self._ROUTES:
            m = re.fullmatch(pattern, rest)
            if m and method == req.method:
                return 200, getattr(self, "_" + name)(req, **m.groupdict())
        raise ApiError(404, f"no route for {req.method} {req.path}")

    # -- healthz ----------------------------------------------------------------------------------

    def _healthz(self, req):
        return {"multi_user": self.multi_user, "pipeline_store": "database"}

    # -- pipelines and versions -------------------------------------------------------------------

    def _list_pipelines(self, req):
        # As KFP: a namespace lists that namespace's pipelines; none lists the shared ones.
        namespace = _q(req, "namespace") or ""
        in_scope = [p for p in self.pipelines.values() if p.get("namespace", "") == namespace]
        return _page(_filtered(in_scope, req), req, "pipelines")

    def _create_pipeline(self, req):
        body = req.json or {}
        name = body.get("display_name") or body.get("name")
        if not name:
            raise ApiError(400, "pipeline name is empty")
        return self._new_pipeline(name, body.get("description", ""), body.get("namespace") or "")

    def _new_pipeline(self, name: str, description: str, namespace: str = "") -> dict:
        if any(
            p["display_name"] == name and p.get("namespace", "") == namespace for p in self.pipelines.values()
        ):
            raise ApiError(409, f"pipeline {name!r} already exists")
        p = {
            "pipeline_id": _new_id(),
            "display_name": name,
            "name": name,
            "description": description,
            "namespace": namespace,
            "created_at": _now(),
        }
        self.pipelines[p["pipeline_id"]] = p
        return p

    def _upload_pipeline(self, req):
        spec, raw = _uploaded_spec(req)
        name = _q(req, "display_name") or _q(req, "name") or spec["pipelineInfo"]["name"]
        p = self._new_pipeline(name, _q(req, "description") or "")
        self._new_version(p["pipeline_id"], name, "", spec, raw)
        return p

    def _upload_version(self, req):
        spec, raw = _uploaded_spec(req)
        pid = _q(req, "pipelineid")
        if pid not in self.pipelines:
            raise ApiError(404, f"pipeline {pid!r} not found")
        name = _q(req, "display_name") or _q(req, "name")
        if not name:
            raise ApiError(400, "pipeline version name is empty")
        return self._new_version(pid, name, _q(req, "description") or "", spec, raw)

    def _new_version(self, pid: str, name: str, description: str, spec: dict, raw: bytes) -> dict:
        if any(v["pipeline_id"] == pid and v["display_name"] == name for v in self.versions.values()):
            raise ApiError(409, f"pipeline version {name!r} already exists")
        v = {
            "pipeline_id": pid,
            "pipeline_version_id": _new_id(),
            "display_name": name,
            "name": name,
            "description": description,
            "created_at": _now(),
            "pipeline_spec": spec,
        }
        self.versions[v["pipeline_version_id"]] = v
        self.packages[v["pipeline_version_id"]] = raw
        return v

    def _get_pipeline(self, req, pid):
        return _get(self.pipelines, pid, "pipeline")

    def _list_versions(self, req, pid):
        _get(self.pipelines, pid, "pipeline")
        items = _filtered((v for v in self.versions.values() if v["pipeline_id"] == pid), req)
        return _page(items, req, "pipeline_versions")

    def _get_version(self, req, pid, vid):
        v = _get(self.versions, vid, "pipeline version")
        if v["pipeline_id"] != pid:
            raise ApiError(404, f"pipeline version {vid!r} not found in pipeline {pid!r}")
        return v

    # -- experiments ------------------------------------------------------------------------------

    def _list_experiments(self, req):
        return _page(_filtered(self.experiments.values(), req), req, "experiments")

    def _create_experiment(self, req):
        body = req.json or {}
        name = body.get("display_name")
        if not name:
            raise ApiError(400, "experiment name is empty")
        if self.multi_user and not body.get("namespace"):
            raise ApiError(400, "multi-user mode: an experiment needs a namespace")
        if any(e["display_name"] == name for e in self.experiments.values()):
            raise ApiError(409, f"experiment {name!r} already exists")
        e = {
            "experiment_id": _new_id(),
            "display_name": name,
            "description": body.get("description") or "",
            "namespace": body.get("namespace") or "",
            "created_at": _now(),
            "storage_state": "AVAILABLE",
        }
        self.experiments[e["experiment_id"]] = e
        return e

    def _get_experiment(self, req, eid):
        return _get(self.experiments, eid, "experiment")

    # -- runs -------------------------------------------------------------------------------------

    def _resolve_spec(self, body: dict) -> dict:
        """The pipeline spec a run or recurring run refers to; checks its parameters against it."""
        _get(self.experiments, body.get("experiment_id") or "", "experiment")
        ref = body.get("pipeline_version_reference") or {}
        if ref:
            v = _get(self.versions, ref.get("pipeline_version_id") or "", "pipeline version")
            if v["pipeline_id"] != ref.get("pipeline_id"):
                raise ApiError(400, "pipeline version does not belong to the pipeline")
            spec = v["pipeline_spec"]
        elif body.get("pipeline_spec"):
            spec = body["pipeline_spec"].get("pipeline_spec", body["pipeline_spec"])
        else:
            raise ApiError(400, "neither pipeline_version_reference nor pipeline_spec given")
        declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
        given = (body.get("runtime_config") or {}).get("parameters") or {}
        for name, value in given.items():
            if name not in declared:
                raise ApiError(400, f"parameter {name!r} is not an input of the pipeline")
            want = _PARAM_TYPES.get(declared[name].get("parameterType", ""), object)
            if not isinstance(value, want):
                raise ApiError(400, f"parameter {name!r}: expected {declared[name]['parameterType']}")
        return spec

    def _create_run(self, req):
        body = req.json or {}
        self._resolve_spec(body)
        rid = _new_id()
        run = {
            **{k: body.get(k) for k in ("experiment_id", "display_name", "description", "runtime_config")},
            "pipeline_version_reference": body.get("pipeline_version_reference"),
            "service_account": body.get("service_account") or "",
            "run_id": rid,
            "created_at": _now(),
            "scheduled_at": _now(),
            "storage_state": "AVAILABLE",
            "state": "PENDING",
        }
        self.runs[rid] = run
        if self.on_run is not None:
            self.on_run(run)
        self._scripts[rid] = list(
            self._next_script or [("PENDING", None), ("RUNNING", None), ("SUCCEEDED", None)]
        )
        return run

    def _get_run(self, req, rid):
        run = _get(self.runs, rid, "run")
        script = self._scripts[rid]
        state, extra = script.pop(0) if len(script) > 1 else script[0]
        run["state"] = state
        run.update(extra or {})
        if state in ("SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"):
            run.setdefault("finished_at", _now())
        return run

    def _retry_run(self, req, rid):
        """KFP's Retry: a failed or canceled run runs its failed steps again, under the same id; from
        then on it goes through the next script (`script_runs`), else it succeeds."""
        run = _get(self.runs, rid, "run")
        if run["state"] not in ("FAILED", "CANCELED"):
            raise ApiError(400, f"run {rid} is {run['state']}: cannot retry a run that did not fail")
        for key in ("error", "run_details", "finished_at"):
            run.pop(key, None)
        run["state"] = "RUNNING"
        if self.on_run is not None:
            self.on_run(run)
        self._scripts[rid] = list(self._next_script or [("RUNNING", None), ("SUCCEEDED", None)])
        return {}

    def _list_runs(self, req):
        items = self.runs.values()
        if _q(req, "experiment_id"):
            items = [r for r in items if r["experiment_id"] == _q(req, "experiment_id")]
        return _page(_filtered(items, req), req, "runs")

    # -- recurring runs ---------------------------------------------------------------------------

    def _list_recurring_runs(self, req):
        items = self.recurring_runs.values()
        if _q(req, "experiment_id"):
            items = [r for r in items if r["experiment_id"] == _q(req, "experiment_id")]
        # The proto field is `recurringRuns` (camel case in proto and JSON alike), unlike its siblings.
        return _page(_filtered(items, req), req, "recurringRuns")

    def _create_recurring_run(self, req):
        body = req.json or {}
        self._resolve_spec(body)
        trigger = body.get("trigger") or {}
        cron = (trigger.get("cron_schedule") or {}).get("cron")
        if not cron and not (trigger.get("periodic_schedule") or {}).get("interval_second"):
            raise ApiError(400, "a recurring run needs a cron or periodic trigger")
        if cron and len(cron.split()) not in (5, 6):  # robfig/cron: seconds first, day-of-week optional
            raise ApiError(400, f"invalid cron expression {cron!r}")
        mode = body.get("mode") or "ENABLE"
        rrid = _new_id()
        rr = {
            **{
                k: body.get(k)
                for k in (
                    "display_name",
                    "description",
                    "experiment_id",
                    "pipeline_version_reference",
                    "runtime_config",
                    "trigger",
                    "no_catchup",
                    "service_account",
                )
            },
            "max_concurrency": str(body.get("max_concurrency") or "1"),
            "recurring_run_id": rrid,
            "mode": mode,
            "status": "ENABLED" if mode == "ENABLE" else "DISABLED",
            "created_at": _now(),
            "updated_at": _now(),
        }
        self.recurring_runs[rrid] = rr
        return rr

    def _get_recurring_run(self, req, rrid):
        return _get(self.recurring_runs, rrid, "recurring run")

    def _delete_recurring_run(self, req, rrid):
        _get(self.recurring_runs, rrid, "recurring run")
        del self.recurring_runs[rrid]
        return {}

    def _enable_recurring_run(self, req, rrid):
        rr = _get(self.recurring_runs, rrid, "recurring run")
        rr.update(mode="ENABLE", status="ENABLED", updated_at=_now())
        return {}

    def _disable_recurring_run(self, req, rrid):
        rr = _get(self.recurring_runs, rrid, "recurring run")
        rr.update(mode="DISABLE", status="DISABLED", updated_at=_now())
        return {}


# -- helpers ----------------------------------------------------------------------------------------


def _q(req: Request, name: str) -> str | None:
    values = req.query.get(name)
    return values[0] if values else None


def _get(table: dict, ident: str, what: str) -> dict:
    if ident not in table:
        raise ApiError(404, f"{what} {ident!r} not found")
    return table[ident]


def _filtered(items, req: Request) -> list[dict]:
    """Apply a v2beta1 filter (JSON Filter message) of EQUALS predicates on string fields."""
    items = list(items)
    raw = _q(req, "filter")
    if not raw:
        return items
    try:
        predicates = json.loads(raw).get("predicates", [])
    except (ValueError, AttributeError):
        raise ApiError(400, f"invalid filter {raw!r}") from None
    for p in predicates:
        op = p.get("operation")
        if op not in ("EQUALS", 1):
            raise ApiError(400, f"filter operation {op!r} not supported by the stand-in")
        key = p.get("key")
        if key not in ("display_name", "name"):
            raise ApiError(400, f"invalid filter key {key!r}")
        value = p.get("stringValue", p.get("string_value"))
        items = [i for i in items if i.get(key) == value]
    return items


def _page(items: list[dict], req: Request, field_name: str) -> dict:
    size = int(_q(req, "page_size") or 0) or 20
    start = int(_q(req, "page_token") or 0)
    chunk = items[start : start + size]
    out: dict[str, Any] = {"total_size": len(items)}
    if chunk:
        out[field_name] = chunk
    if start + size < len(items):
        out["next_page_token"] = str(start + size)
    return out


def _multipart_files(content_type: str, body: bytes) -> dict[str, bytes]:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    files = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            files[name] = part.get_payload(decode=True)
    return files


def _uploaded_spec(req: Request) -> tuple[dict, bytes]:
    raw = req.files.get("uploadfile")
    if raw is None:
        raise ApiError(400, "no uploadfile in the multipart request")
    try:
        spec = next(iter(yaml.safe_load_all(raw)), None)
    except yaml.YAMLError:
        spec = None
    if not isinstance(spec, dict) or "pipelineInfo" not in spec or "root" not in spec:
        raise ApiError(400, "the uploaded file is not a KFP v2 pipeline spec")
    return spec, raw
