"""A stand-in for the Kubeflow Model Registry REST API on localhost, for tests.

It serves the endpoints of `/api/model_registry/v1` that fulltune's client calls (the ones the
`model-registry` package's generated client `mr_openapi` sends): find and create a registered model,
find and create a model version, list and add a version's artifacts, list registered models, and
update (PATCH) a registered model or a model version, merging the fields sent.
State lives in memory with server-assigned string ids, as the real server does; a duplicate name is
refused with 409. Every request is recorded (method, path, query, headers, JSON body), and
`fail(n)` makes the next n requests (optionally only those matching a method and path prefix)
answer with an error instead of being served.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from standin_http import LoopbackServer, send_json

PREFIX = "/api/model_registry/v1"


@dataclass
class Recorded:
    method: str
    path: str  # without PREFIX
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class _Failure:
    remaining: int
    status: int
    method: str | None
    path_prefix: str | None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path_prefix is None or path.startswith(self.path_prefix)
        )


@dataclass
class ModelRegistryStandIn:
    """Start with `with ModelRegistryStandIn() as mr:`; `mr.address` and `mr.port` locate it."""

    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    _failures: list[_Failure] = field(default_factory=list)
    _next_id: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- control ---------------------------------------------------------------------------------

    def fail(
        self, times: int, *, status: int = 503, method: str | None = None, path: str | None = None
    ) -> None:
        """Answer the next `times` requests that match (`method`, `path` prefix) with `status`."""
        self._failures.append(_Failure(times, status, method, path))

    def __enter__(self) -> ModelRegistryStandIn:
        handler = type("Handler", (_Handler,), {"standin": self})
        self._http = LoopbackServer(handler)
        self._http.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.stop()

    @property
    def port(self) -> int:
        return self._http.port

    address = "http://127.0.0.1"

    # -- what tests look at ----------------------------------------------------------------------

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method != "GET"]

    def version_named(self, model: str, version: str) -> dict[str, Any] | None:
        model_ids = [m["id"] for m in self.models.values() if m["name"] == model]
        return next(
            (
                v
                for v in self.versions.values()
                if v["registeredModelId"] in model_ids and v["name"] == version
            ),
            None,
        )

    def artifacts_of(self, version_id: str) -> list[dict[str, Any]]:
        return [a for a in self.artifacts.values() if a["_versionId"] == version_id]

    # -- serving ---------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        split = urlsplit(raw_path)
        path = split.path[len(PREFIX) :] if split.path.startswith(PREFIX) else split.path
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        with self._lock:
            self.requests.append(Recorded(method, path, query, headers, body))
            for failure in self._failures:
                if failure.remaining > 0 and failure.matches(method, path):
                    failure.remaining -= 1
                    return failure.status, _error(failure.status, "injected failure")
            if not split.path.startswith(PREFIX):
                return 404, _error(404, f"no such path {split.path}")
            return self._route(method, path, query, body)

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if (method, path) == ("GET", "/registered_models"):
            return 200, _page(list(self.models.values()))
        if (method, path) == ("GET", "/registered_model"):
            found = [m for m in self.models.values() if m["name"] == query.get("name")]
            return (200, found[0]) if found else (404, _error(404, "registered model not found"))
        if (method, path) == ("POST", "/registered_models"):
            if any(m["name"] == body["name"] for m in self.models.values()):
                return 409, _error(409, f"registered model {body['name']!r} already exists")
            return 201, self._store(self.models, {"state": "LIVE", **body})
        if method == "GET" and len(parts) == 3 and parts[0] == "registered_models" and parts[2] == "versions":
            return 200, _page(
                [_public(v) for v in self.versions.values() if v["registeredModelId"] == parts[1]]
            )
        if (method, path) == ("GET", "/model_version"):
            found = [
                v
                for v in self.versions.values()
                if v["name"] == query.get("name") and v["registeredModelId"] == query.get("parentResourceId")
            ]
            return (200, found[0]) if found else (404, _error(404, "model version not found"))
        if (method, path) == ("POST", "/model_versions"):
            if body.get("registeredModelId") not in self.models:
                return 400, _error(400, "registeredModelId: no such registered model")
            if any(
                v["name"] == body["name"] and v["registeredModelId"] == body["registeredModelId"]
                for v in self.versions.values()
            ):
                return 409, _error(409, f"model version {body['name']!r} already exists")
            return 201, self._store(self.versions, {"state": "LIVE", **body})
        if method == "PATCH" and len(parts) == 2 and parts[0] in ("registered_models", "model_versions"):
            table = self.models if parts[0] == "registered_models" else self.versions
            if parts[1] not in table:
                return 404, _error(404, f"{parts[0]} {parts[1]}: not found")
            now = str(int(time.time() * 1000))
            table[parts[1]] = {**table[parts[1]], **body, "lastUpdateTimeSinceEpoch": now}
            return 200, _public(table[parts[1]])
        if len(parts) == 3 and parts[0] == "model_versions" and parts[2] == "artifacts":
            version_id = parts[1]
            if version_id not in self.versions:
                return 404, _error(404, "model version not found")
            if method == "GET":
                return 200, _page([_public(a) for a in self.artifacts_of(version_id)])
            if method == "POST":
                stored = self._store(self.artifacts, {"state": "UNKNOWN", **body, "_versionId": version_id})
                return 201, _public(stored)
        return 404, _error(404, f"{method} {path}: not served by the stand-in")

    def _store(self, table: dict[str, dict[str, Any]], obj: dict[str, Any]) -> dict[str, Any]:
        now = str(int(time.time() * 1000))
        obj = {**obj, "id": str(self._next_id), "createTimeSinceEpoch": now, "lastUpdateTimeSinceEpoch": now}
        self._next_id += 1
        table[obj["id"]] = obj
        return _public(obj)


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _page(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"items": items, "size": len(items), "pageSize": max(len(items), 1), "nextPageToken": ""}


def _error(status: int, message: str) -> dict[str, Any]:
    return {"code": str(status), "message": message}


class _Handler(BaseHTTPRequestHandler):
    standin: ModelRegistryStandIn
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, payload = self.standin.handle(self.command, self.path, headers, body)
        send_json(self, status, payload)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass
