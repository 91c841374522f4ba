"""Recording a committed registry version in the Kubeflow Model Registry.

After `store.register_model` has committed `<registry.uri>/<name>/v<N>/` (its manifest written), and
when `registry.kubeflow` is configured, the version is also recorded in the Kubeflow Model Registry:

- registered model `model.name` (created when missing, owner = `registry.kubeflow.author`);
- model version `v<N>`, the same name as in the S3/local registry, whose custom properties carry
  the run id, the gate's verdict (and its reasons), its headline numbers from `eval.json`, and the
  sha256 of `manifest.json`, so the Model Registry entry can be checked against the files;
- one model artifact: `uri` = the version's S3/local URI, `modelFormatName` = "safetensors".

Everything is read back from the committed version itself (manifest, eval.json, lineage.json), so
recording can be repeated for any committed version: a retry of the register step, or `fulltune
registry register` run again, finds what already exists and adds only what is missing. A version
already present with the same artifact URI is success; a version of that name pointing elsewhere is
an error naming both URIs. The files are never touched here: if the Model Registry cannot be
reached, the committed version stays and the error names it and the endpoint.

Client: `model_registry.core.ModelRegistryAPIClient` from the `model-registry` package (its typed
wrapper around the generated `mr_openapi` REST client; it speaks `/api/model_registry/v1`), not the
high-level `model_registry.ModelRegistry`. The high-level client can reach a plain-http endpoint
(`is_secure=False`), but `ModelRegistry.register_model` refuses an existing version outright and has
no public call that adds an artifact to a version left without one by an interrupted attempt, so
it cannot resume; its constructor also patches asyncio globally (`nest_asyncio`) and reads its token
from `KF_PIPELINES_SA_TOKEN_PATH`. The lower-level client gives each find/create call on its own,
which is what an idempotent, resumable registration needs, with the same request models.

Authentication: a bearer token from the environment variable `MODEL_REGISTRY_TOKEN`, else the pod's
service-account token file; never a pipeline parameter or command-line argument. `is_secure`
false turns off TLS verification (and an address without a scheme gets `http://`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fulltune import storage
from fulltune.config import KubeflowRegistrySection
from fulltune.evaluate.result import DOMAIN_LOSS_IMPROVEMENT, FORGETTING, EvalResult, MCSection
from fulltune.registry.layout import EVAL, LINEAGE, MANIFEST, RegistryError
from fulltune.registry.pointers import PointerRecord

log = logging.getLogger(__name__)

TOKEN_ENV = "MODEL_REGISTRY_TOKEN"  # noqa: S105 - the variable's name, not a token
SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105
MODEL_FORMAT = "safetensors"


class KubeflowRegistryError(RegistryError):
    """The Kubeflow Model Registry refused or could not be reached; names the version and endpoint."""


def read_token() -> str | None:
    """The bearer token: `$MODEL_REGISTRY_TOKEN`, else the pod's service-account token, else None."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    try:
        return Path(SA_TOKEN_PATH).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def endpoint(section: KubeflowRegistrySection) -> str:
    """`scheme://host:port` of the REST endpoint (`port` unless the address names one)."""
    address = section.server_address.rstrip("/")
    if urlparse(address).scheme not in ("http", "https"):
        address = ("https://" if section.is_secure else "http://") + address
    return address if urlparse(address).port else f"{address}:{section.port}"


API_PREFIX = "/api/model_registry/v1"


def probe(section: KubeflowRegistrySection, timeout: float = 10.0) -> tuple[int | None, str]:
    """Ask the Model Registry for one registered model, as this process's identity: (HTTP status,
    None when it could not be reached; what happened). For `fulltune doctor`: the register step runs
    last, and an endpoint that does not answer would be found only then."""
    import ssl
    import urllib.error
    import urllib.request

    url = f"{endpoint(section)}{API_PREFIX}/registered_models?pageSize=1"
    token = read_token()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    context = None if section.is_secure else ssl._create_unverified_context()  # noqa: S323 - is_secure false
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:  # noqa: S310
            return answer.status, url
    except urllib.error.HTTPError as exc:
        return exc.code, url
    except (urllib.error.URLError, OSError) as exc:
        return None, f"{url}: {getattr(exc, 'reason', exc)}"


def version_properties(
    manifest: dict[str, Any], manifest_sha256: str, eval_result: EvalResult, run_id: str
) -> dict[str, bool | int | float | str]:
    """Custom properties of the model version: provenance, verdict and the gate's headline numbers."""
    props: dict[str, bool | int | float | str] = {
        "fulltune_run_id": run_id,
        "verdict": eval_result.verdict,
        "verdict_reasons": "; ".join(eval_result.reasons),
        "forced": bool(manifest.get("forced")),
        "manifest_sha256": manifest_sha256,
        "fulltune_version": str(manifest.get("fulltune_version", "")),
    }
    for key, value in sorted(headline_metrics(eval_result).items()):
        # NaN/inf are not JSON numbers: record them as text rather than send an invalid body
        props[key] = value if math.isfinite(value) else str(value)
    return {k: v for k, v in props.items() if v != ""}


def headline_metrics(eval_result: EvalResult) -> dict[str, float]:
    """The gate's headline numbers, named as in KFP Metrics: each set's tuned loss and perplexity,
    `domain_loss_improvement`, `forgetting` and each multiple-choice task's accuracy change."""
    metrics = eval_result.kfp_metrics()
    names = [f"{name}_tuned_{what}" for name in eval_result.sets for what in ("loss", "perplexity")]
    names += [DOMAIN_LOSS_IMPROVEMENT, FORGETTING, *map(MCSection.change_key, eval_result.mc)]
    return {name: metrics[name] for name in names if name in metrics}


def register_version(section: KubeflowRegistrySection, version_uri: str) -> dict[str, str]:
    """Record the committed version at `version_uri` in the Model Registry; idempotent.

    Returns the ids: `registered_model_id`, `model_version_id`, `model_artifact_id`.

    Raises:
        KubeflowRegistryError: the version is not committed, the Model Registry holds a version of
            the same name with a different artifact URI, or a request failed; the message names the
            version, its URI and the endpoint, and says the files are intact.
    """
    try:
        manifest_bytes = storage.read_bytes(storage.join(version_uri, MANIFEST))
    except FileNotFoundError:
        raise KubeflowRegistryError(
            f"{version_uri}: not a committed version (no {MANIFEST}); nothing to record in the Model Registry"
        ) from None
    manifest = json.loads(manifest_bytes)
    eval_result = EvalResult.load(storage.join(version_uri, EVAL))
    lineage = storage.read_json(storage.join(version_uri, LINEAGE))
    name, version = manifest["name"], f"v{manifest['version']}"
    run_id = str(manifest.get("run_id") or lineage.get("pipeline_run_id") or lineage.get("run_id") or "")
    props = version_properties(manifest, hashlib.sha256(manifest_bytes).hexdigest(), eval_result, run_id)
    url = endpoint(section)
    log.info("recording %s %s (%s) in the Kubeflow Model Registry at %s", name, version, version_uri, url)
    try:
        ids = _run(_record(_client(section, url), section.author, name, version, version_uri, props))
    except KubeflowRegistryError as exc:
        raise KubeflowRegistryError(
            f"Kubeflow Model Registry at {url}: {exc}; the files at {version_uri} stay committed"
        ) from None
    except Exception as exc:
        raise KubeflowRegistryError(
            f"{name} {version} is committed at {version_uri} (intact), but recording it in the Kubeflow "
            f"Model Registry at {url} failed: {_describe(exc)}. Retry the register step with the same "
            f"run id (or `fulltune registry register ... --run-id {run_id or '<run id>'}`) to finish."
        ) from exc
    log.info("Model Registry: %s %s -> %s", name, version, ids)
    return ids


def record_pointers(section: KubeflowRegistrySection, name: str, named: dict[str, PointerRecord]) -> None:
    """Mirror the registry's pointers in the Model Registry: on the registered model the custom
    properties `production_version` and `latest_version` (with when, by whom and why production last
    moved), on each version `production` true for the one it names and false for the others that
    carried it. The versions must be recorded already (`register_version`).

    Raises:
        KubeflowRegistryError: the model is not recorded, or a request failed; the pointers in the
            S3/local registry stay as they are (they are the source of truth).
    """
    url = endpoint(section)
    try:
        _run(_mirror(_client(section, url), name, named))
    except KubeflowRegistryError:
        raise
    except Exception as exc:
        raise KubeflowRegistryError(
            f"{name}: the pointers moved in the registry, but mirroring them in the Kubeflow Model Registry at "
            f"{url} failed: {_describe(exc)}; retrying the register step (same run id) repeats it, as does "
            "`fulltune registry promote` with the same version"
        ) from exc


async def _mirror(api: Any, name: str, named: dict[str, PointerRecord]) -> None:
    rm = await api.get_registered_model_by_params(name)
    if rm is None:
        raise KubeflowRegistryError(f"{name}: not in the Model Registry yet; nothing to mark")
    props = dict(rm.custom_properties or {})
    for pointer, record in named.items():
        props[f"{pointer}_version"] = f"v{record.version}"
    if (production := named.get("production")) is not None:
        props.update(
            production_changed_at=production.at,
            production_changed_by=production.by,
            production_reason=production.reason,
        )
    if props != (rm.custom_properties or {}):  # mirrored already (a retry): nothing to write
        rm.custom_properties = props
        await api.upsert_registered_model(rm)
    if production is None:
        return
    # Every version, not only the one production replaced: a move that was never mirrored (`registry
    # rollback` without --config, a mirror that failed) leaves its version marked, and only a look at
    # all of them finds it. Versions recorded before the Model Registry was configured are absent.
    serving_name = f"v{production.version}"
    for mv in await _model_versions(api, rm.id):
        serving = mv.name == serving_name
        if (mv.custom_properties or {}).get("production", False) == serving:
            continue  # marked already (a version never marked is not serving)
        mv.custom_properties = {**(mv.custom_properties or {}), "production": serving}
        await api.upsert_model_version(mv)


async def _model_versions(api: Any, model_id: str) -> list[Any]:
    """Every version of the registered model, page after page."""
    from model_registry.types import ListOptions

    options, found, seen = ListOptions(limit=100), [], set()
    while True:
        page = await api.get_model_versions(model_id, options)
        found += page
        token = options.next_page_token
        if not page or not token or token in seen:
            return found
        seen.add(token)


def _client(section: KubeflowRegistrySection, url: str) -> Any:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from model_registry.core import ModelRegistryAPIClient  # its package calls logging.basicConfig

    root.handlers[:], root.level = handlers, level
    token = read_token()
    if token is None:
        log.warning("no Model Registry token ($%s or %s): sending no Authorization", TOKEN_ENV, SA_TOKEN_PATH)
    if section.is_secure:
        return ModelRegistryAPIClient.secure_connection(url, section.port, user_token=token)  # type: ignore[arg-type]
    return ModelRegistryAPIClient.insecure_connection(url, section.port, token)


def _run(coro: Any) -> Any:
    """Run a coroutine to completion, also from code that already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _record(
    api: Any, author: str, name: str, version: str, uri: str, props: dict[str, Any]
) -> dict[str, str]:
    from model_registry.types import ModelArtifact, ModelVersion, RegisteredModel

    rm = await api.get_registered_model_by_params(name)
    if rm is None:
        rm = await _create_or_find(
            api.upsert_registered_model(RegisteredModel(name=name, owner=author)),
            lambda: api.get_registered_model_by_params(name),
        )
    mv = await api.get_model_version_by_params(rm.id, version)
    if mv is None:
        mv = await _create_or_find(
            api.upsert_model_version(
                ModelVersion(
                    name=version,
                    author=author,
                    description=f"fulltune: {uri}",
                    custom_properties=props,
                ),
                rm.id,
            ),
            lambda: api.get_model_version_by_params(rm.id, version),
        )
    else:
        theirs = (mv.custom_properties or {}).get("manifest_sha256")
        if theirs and theirs != props["manifest_sha256"]:
            raise KubeflowRegistryError(
                f"{name} {version}: the Model Registry already holds this version for a different "
                f"manifest (sha256 {theirs}, this one {props['manifest_sha256']}); not recording {uri}"
            )
    existing = [a for a in await api.get_model_artifacts(mv.id) if a.uri]
    same = [a for a in existing if a.uri == uri]
    if same:
        log.info("%s %s is already in the Model Registry with artifact %s", name, version, uri)
        return {"registered_model_id": rm.id, "model_version_id": mv.id, "model_artifact_id": same[0].id}
    if existing:
        raise KubeflowRegistryError(
            f"{name} {version}: the Model Registry already holds this version with artifact URI "
            f"{existing[0].uri}, not {uri}; refusing to add a second artifact (two registries, or a "
            "model name reused?)"
        )
    artifact = await api.upsert_model_version_artifact(
        ModelArtifact(name=name, uri=uri, model_format_name=MODEL_FORMAT, description=f"{name} {version}"),
        mv.id,
    )
    return {"registered_model_id": rm.id, "model_version_id": mv.id, "model_artifact_id": artifact.id}


async def _create_or_find(create: Any, find: Any) -> Any:
    """Create; when the server says it exists (a concurrent writer won), take the existing one."""
    from mr_openapi.exceptions import ApiException

    try:
        return await create
    except ApiException as exc:
        if exc.status not in (400, 409):
            raise
        found = await find()
        if found is None:
            raise
        return found


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if status is not None:
        body = getattr(exc, "body", None) or ""
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        return f"HTTP {status} {getattr(exc, 'reason', '') or ''} {str(body)[:300]}".rstrip()
    return f"{type(exc).__name__}: {exc}"
