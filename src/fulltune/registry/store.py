"""The model registry on a local directory or S3: `<registry.uri>/<model.name>/v<N>/`.

A version is written in this order, and nothing is ever overwritten:

1. **claim**: `v<N>/.claim` is created with `storage.create_exclusive` (locally a hard link of the
   written file, a conditional PUT on S3), N one above the highest version present, committed or
   merely claimed.
   A writer that loses the race for N tries N+1, so concurrent registrations get distinct versions.
2. **files**: every file of the model directory (weights, config, tokenizer), then `model_card.md`,
   `lineage.json` and `eval.json`.
3. **commit**: `manifest.json` — every file with its size and sha256, plus name, version and time.
   It is written last; a version without it is invisible to `list_versions`. When anything fails
   before the commit, what was written is removed (best effort) and `RegistryError` names the version.

Only the model the eval result describes is registered (`_require_evaluated`): its verdict and
champion decide the registration and the production move, so evaluate records the sha256 of the
model's `model_manifest.json` and register compares it (and the files with that manifest).

A registration names its pipeline run (`run_id`, kept in the claim and the manifest): a retried step
finds the version its run already committed instead of claiming another, and removes a version an
earlier attempt of its run claimed but never committed (killed mid-copy) before claiming. With `registry.kubeflow` set, the
committed version is then recorded in the Kubeflow Model Registry (`registry/kubeflow.py`), and
where both pointers stand is mirrored there; when that fails the files stay committed, and the retry
records and mirrors it. Once committed, the model's `latest` pointer moves to it, and `production`
when it was never set (`registry/pointers.py`).

Files are hashed by streaming from the source and copied URI to URI (S3 to S3 server-side), so a
registration never stages the model on the step's disk. `verify_version` rehashes a committed
version against its manifest. The version's layout and file names are in `registry/layout.py`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import fulltune
from fulltune import storage
from fulltune.config import RunConfig
from fulltune.evaluate.result import EvalResult
from fulltune.model_identity import MODEL_MANIFEST, manifest_sha256
from fulltune.registry import pointers
from fulltune.registry.card import render_model_card
from fulltune.registry.layout import (
    CARD,
    CLAIM,
    EVAL,
    LINEAGE,
    MANIFEST,
    MANIFEST_FORMAT,
    RESERVED,
    RegistryError,
    model_root,
    version_uri,
)

log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")
_MAX_CLAIM_ATTEMPTS = 1000


# -- registering --------------------------------------------------------------------------------


def register_model(
    cfg: RunConfig,
    model_uri: str,
    eval_result: EvalResult,
    lineage: dict[str, Any],
    *,
    force: bool = False,
    run_id: str = "",
) -> str:
    """Publish the model at `model_uri` as the next version of `cfg.model.name`; returns its URI.

    With `run_id`, registering is idempotent per run: when a committed version of this name was
    already registered by the same run (a retried step), that version is returned, no new one is
    allocated. With `registry.kubeflow` set, the committed version is then also recorded in the
    Kubeflow Model Registry (see `registry.kubeflow`); that half is idempotent too, so a retry
    completes a recording that failed after the files were committed.

    Args:
        cfg: The resolved run config; `registry.uri` is the registry root and `model.name` the name.
        model_uri: The tuned model: a local directory or s3:// prefix in Hugging Face format.
        eval_result: What `evaluate_models` returned for this model; its `verdict` must be true
            unless `force`.
        lineage: Provenance to record (run id, dataset manifest, base model, ...); stored in
            `lineage.json` with the eval result, the config and the fulltune version.
        force: Register although the gate failed; recorded as `forced: true` in the lineage, with
            the gate's reasons as `forced_reasons`.
        run_id: The pipeline run registering the model; recorded in the manifest and used to find
            this run's version again on a retry. Empty: every call allocates a new version.

    Raises:
        RegistryError: the gate failed (and not `force`), `eval_result` is not about this model
            (another manifest digest, files changed since training, or without a digest another
            URI; also with `force`), the model directory is incomplete, or an upload failed (the
            partial version is removed).
        KubeflowRegistryError: the version is committed (and stays), but the Kubeflow Model Registry
            refused it or could not be reached.
        ConfigError: `registry.uri` is empty.
    """
    cfg.require("registry.uri")
    name = cfg.model.name
    if not eval_result.verdict and not force:
        raise RegistryError(
            f"{name}: not registered, the evaluation gate did not pass "
            f"({'; '.join(eval_result.reasons)}); `fulltune registry register --force` registers it anyway "
            "(recorded as forced in its lineage)"
        )
    _require_evaluated(name, model_uri, eval_result)
    if run_id and (done := version_of_run(cfg.registry.uri, name, run_id)) is not None:
        uri = _retried(name, done, model_uri, run_id)
    else:
        forced = force and not eval_result.verdict
        uri = _publish(cfg, model_uri, eval_result, lineage, run_id=run_id, forced=forced)
    version = int(_VERSION_DIR.match(storage.basename(uri)).group(1))
    pointers.on_register(
        cfg.registry.uri,
        name,
        version,
        run_id=run_id,
        promote=_promotion(eval_result),
        passed=eval_result.verdict,
        options=write_options(cfg),
    )
    _record_in_kubeflow(cfg, uri)
    _mirror_pointers(cfg, name)
    return uri


def _require_fixed_base(cfg: RunConfig, model_uri: str) -> None:
    """Refuse a base that is still a `registry://` reference: the lineage and the card would name a
    pointer, not the version the model was trained from, and a later run from this version would
    measure forgetting against the pointer (`original_base_model_uri`). A pipeline run fixed it
    when it started (`steps.run_inputs`); only a config written by hand still holds one. A version
    committed already (a retry recording it in the Model Registry) writes no lineage: not asked."""
    ref = cfg.model.base_model_uri
    if pointers.is_ref(ref):
        raise RegistryError(
            f"{cfg.model.name}: model.base_model_uri is {ref}, a pointer that may have moved since "
            f"{model_uri} was trained; not registering a lineage that names it. Register with the "
            "config the run resolved (fulltune_config.yaml in the model directory), or set "
            "model.base_model_uri to the registered version the run started from"
        )


def _require_evaluated(name: str, model_uri: str, eval_result: EvalResult) -> None:
    """Refuse a model the eval result does not describe: its verdict and champion decide whether the
    version registers and becomes production, so they must be about this model (also with force).

    The evaluated model's manifest digest, when eval.json records one, must be this model's; the same
    files at another location pass. Without one (eval.json from before evaluate recorded it, or a
    model with no manifest) only the URI can tell, so it must be the URI evaluate scored.
    """
    scored, recorded = eval_result.tuned_model_uri, eval_result.tuned_model_manifest_sha256
    if recorded is None:
        if _same_location(scored, model_uri):
            return
        raise RegistryError(
            f"{name}: {model_uri} is not the model the eval result describes ({scored}); not registering "
            "a model that was not evaluated (pass the eval.json of its own evaluate step)"
        )
    digest = manifest_sha256(model_uri)
    if digest != recorded:
        raise RegistryError(
            f"{name}: {model_uri} is not the model the eval result describes: its {MODEL_MANIFEST} has "
            f"sha256 {digest or 'none (no such file)'}, the evaluated {scored} had {recorded}; not "
            "registering a model that was not evaluated"
        )


def _same_location(a: str, b: str) -> bool:
    """The same model directory or S3 prefix, however its URI ends or (locally) is spelled."""
    if storage.is_s3(a) or storage.is_s3(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _promotion(eval_result: EvalResult) -> pointers.Promotion | None:
    """Promote when the gate passed against the version that was serving (the champion it was
    scored with, which production must still name: a compare-and-swap)."""
    champion = eval_result.champion
    if not eval_result.verdict or champion is None or champion.compare_to != "registered":
        return None
    if champion.version is None:
        return pointers.Promotion(None, "first version to pass the gate; nothing was promoted before")
    return pointers.Promotion(champion.version, f"passed the gate against v{champion.version}")


def _retried(name: str, done: dict[str, Any], model_uri: str, run_id: str) -> str:
    """The version run `run_id` already committed, when it was registered from the same model."""
    if done.get("source_model_uri") != model_uri:
        raise RegistryError(
            f"{name}: run {run_id} already registered v{done['version']} from "
            f"{done.get('source_model_uri')}, not {model_uri}"
        )
    log.info(
        "run %s already registered %s v%d at %s: not registering again",
        run_id,
        name,
        done["version"],
        done["uri"],
    )
    return done["uri"]


def _publish(
    cfg: RunConfig,
    model_uri: str,
    eval_result: EvalResult,
    lineage: dict[str, Any],
    *,
    run_id: str,
    forced: bool,
) -> str:
    """Claim the next version, write its files, commit its manifest; a failure removes what was written."""
    _require_fixed_base(cfg, model_uri)
    name = cfg.model.name
    rels = _model_files(model_uri)
    files = [_file_entry(storage.join(model_uri, rel), rel) for rel in rels]
    _require_as_trained(model_uri, files)
    options = write_options(cfg)
    if run_id:
        _remove_abandoned(cfg.registry.uri, name, run_id)
    version, uri = _claim_next_version(cfg.registry.uri, name, options, run_id)
    log.info("registering %s as %s v%d at %s", model_uri, name, version, uri)
    try:
        for rel in rels:
            _copy(storage.join(model_uri, rel), storage.join(uri, rel), options)
        full_lineage = _lineage(cfg, lineage, model_uri, eval_result, run_id=run_id, forced=forced)
        card = render_model_card(
            cfg, version=version, eval_result=eval_result, lineage=full_lineage, forced=forced
        )
        extras = {
            CARD: card.encode("utf-8"),
            LINEAGE: _json_bytes(full_lineage),
            EVAL: _json_bytes(eval_result.to_json()),
        }
        for rel, data in extras.items():
            storage.write_bytes(storage.join(uri, rel), data, options)
            files.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        manifest = _manifest(
            name, version, model_uri, files, run_id=run_id, verdict=eval_result.verdict, forced=forced
        )
        if not storage.create_exclusive(storage.join(uri, MANIFEST), _json_bytes(manifest), options):
            raise RegistryError(
                f"{storage.join(uri, MANIFEST)} appeared while this version was being written"
            )
    except BaseException as exc:
        _remove_partial(uri)
        if isinstance(exc, Exception):
            raise RegistryError(f"{name} v{version}: registration failed, {uri} removed: {exc}") from exc
        raise
    log.info("registered %s v%d (%d files)", name, version, len(files))
    return uri


def _require_as_trained(model_uri: str, files: list[dict[str, Any]]) -> None:
    """Refuse a model whose files are not those its model manifest lists: the digest evaluate
    recorded names that manifest, so a file changed since would otherwise pass as evaluated."""
    try:
        listed = storage.read_json(storage.join(model_uri, MODEL_MANIFEST)).get("files", [])
    except FileNotFoundError:
        return  # not trained by fulltune: nothing says what its files should be
    hashed = {f["path"]: f["sha256"] for f in files}
    changed = [entry["path"] for entry in listed if hashed.get(entry["path"]) != entry["sha256"]]
    if changed:
        raise RegistryError(
            f"{model_uri}: {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} missing or "
            f"not as its {MODEL_MANIFEST} lists them (changed since training?); not registering"
        )


def _lineage(
    cfg: RunConfig,
    lineage: dict[str, Any],
    model_uri: str,
    eval_result: EvalResult,
    *,
    run_id: str,
    forced: bool,
) -> dict[str, Any]:
    """What `lineage.json` holds: the caller's provenance, the eval result, the config, the version."""
    full = {
        **lineage,
        "forced": forced,
        "source_model_uri": model_uri,
        "eval": eval_result.to_json(),
        "fulltune_version": fulltune.__version__,
    }
    if run_id:
        full["run_id"] = run_id
    if forced:
        full["forced_reasons"] = eval_result.reasons
    full.setdefault("config", cfg.to_dict())
    return full


def _manifest(
    name: str,
    version: int,
    model_uri: str,
    files: list[dict[str, Any]],
    *,
    run_id: str,
    verdict: bool,
    forced: bool,
) -> dict[str, Any]:
    """`manifest.json`: every file with its size and sha256, and what the version is."""
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "version": version,
        "run_id": run_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source_model_uri": model_uri,
        "verdict": verdict,
        "forced": forced,
        "fulltune_version": fulltune.__version__,
        "files": sorted(files, key=lambda f: f["path"]),
    }


def _file_entry(uri: str, rel: str) -> dict[str, Any]:
    digest, size = _hash_and_size(uri)
    return {"path": rel, "size": size, "sha256": digest}


def version_of_run(registry_uri: str, name: str, run_id: str) -> dict[str, Any] | None:
    """The committed version of `name` that run `run_id` registered, if any."""
    return next((v for v in list_versions(registry_uri, name) if v.get("run_id") == run_id), None)


def _record_in_kubeflow(cfg: RunConfig, uri: str) -> None:
    if cfg.registry.kubeflow is None:
        return
    from fulltune.registry.kubeflow import register_version

    register_version(cfg.registry.kubeflow, uri)


def _mirror_pointers(cfg: RunConfig, name: str) -> None:
    """Mirror where both pointers stand now in the Model Registry, not only what this call moved: a
    registration retried after the Model Registry failed finds its pointers moved already (nothing
    to move), and they must still reach it. What is mirrored already is not written again."""
    if cfg.registry.kubeflow is None:
        return
    from fulltune.registry.kubeflow import record_pointers

    now = {p: r for p in pointers.POINTERS if (r := pointers.current(cfg.registry.uri, name, p)) is not None}
    if now:
        record_pointers(cfg.registry.kubeflow, name, now)


def _model_files(model_uri: str) -> list[str]:
    """The model directory's files, relative, minus names the registry writes itself."""
    try:
        rels = _relative_files(model_uri)
    except FileNotFoundError as exc:
        raise RegistryError(f"{model_uri}: no such model directory") from exc
    if "config.json" not in rels:
        raise RegistryError(f"{model_uri}: no config.json, not a Hugging Face model directory")
    if not any(rel.endswith(".safetensors") for rel in rels):
        raise RegistryError(f"{model_uri}: no .safetensors weights")
    skipped = [rel for rel in rels if rel in RESERVED]
    if skipped:
        log.warning("%s: not copying %s (names the registry writes itself)", model_uri, ", ".join(skipped))
    return [rel for rel in rels if rel not in RESERVED]


def _relative_files(root: str) -> list[str]:
    """Every file below `root` (local dir or s3:// prefix) as a sorted '/'-separated relative path."""
    if storage.is_s3(root):
        prefix = root.rstrip("/") + "/"
        return sorted(f[len(prefix) :] for f in storage.list_files(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such directory")
    return sorted(Path(f).relative_to(root).as_posix() for f in storage.list_files(root))


def write_options(cfg: RunConfig) -> storage.S3WriteOptions:
    """S3 integrity and encryption settings for everything a registration writes."""
    reg = cfg.registry
    return storage.S3WriteOptions(
        reg.checksum_algorithm, reg.sse_kms_key_id, reg.request_checksum_calculation
    )


def _copy(src: str, dst: str, options: storage.S3WriteOptions) -> None:
    """One file between any two URIs; S3 to S3 is a server-side copy, nothing passes through here."""
    if storage.is_s3(src) and storage.is_s3(dst):
        storage.copy_object(src, dst, options)
    elif storage.is_s3(src):
        storage.download_file(src, dst)
    else:
        storage.upload_file(src, dst, options)


def _claim_next_version(
    registry_uri: str, name: str, options: storage.S3WriteOptions, run_id: str = ""
) -> tuple[int, str]:
    """Claim the lowest free version above every existing one; returns (version, its URI)."""
    start = max(_version_numbers(model_root(registry_uri, name)), default=0) + 1
    claim = _json_bytes(
        {
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "claimed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    for version in range(start, start + _MAX_CLAIM_ATTEMPTS):
        uri = version_uri(registry_uri, name, version)
        if storage.create_exclusive(storage.join(uri, CLAIM), claim, options):
            return version, uri
        log.info("%s v%d was claimed by another writer, trying the next", name, version)
    raise RegistryError(f"{name}: no free version in v{start}..v{start + _MAX_CLAIM_ATTEMPTS - 1}")


def _remove_abandoned(registry_uri: str, name: str, run_id: str) -> None:
    """Remove the versions an earlier attempt of run `run_id` claimed and never committed. A register
    step killed mid-copy (evicted, OOM-killed, or SIGKILLed after its grace period) cannot remove its
    partial version itself, and KFP starts the retry only once that attempt's pod has ended, so
    nothing is still writing there; left alone, each retry would strand a partial copy of the model."""
    for version in _version_numbers(model_root(registry_uri, name)):
        uri = version_uri(registry_uri, name, version)
        if storage.exists(storage.join(uri, MANIFEST)):
            continue
        try:
            claim = storage.read_json(storage.join(uri, CLAIM))
        except (OSError, ValueError):
            continue  # no claim (being removed) or unreadable: not known to be this run's
        if isinstance(claim, dict) and claim.get("run_id") == run_id:
            log.warning(
                "%s v%d was claimed by an earlier attempt of run %s and never committed: removing it",
                name,
                version,
                run_id,
            )
            _remove_partial(uri)


def _remove_partial(uri: str) -> None:
    """Remove a version that was never committed, its claim last: while the claim stands no other
    writer can take the number, so none can have files of its own removed with these."""
    claim = storage.join(uri, CLAIM)
    try:
        for f in storage.list_files(uri):
            if f != claim:
                storage.remove(f)
        storage.remove(claim)
        if not storage.is_s3(uri):
            _remove_empty_dirs(Path(uri))
    except Exception as exc:  # best effort: the version stays invisible without a manifest
        log.warning("could not remove the partial version %s: %s", uri, exc)


def _remove_empty_dirs(root: Path) -> None:
    """`root` and the directories below it that are empty; one another writer has written into since
    stays."""
    for directory in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            directory.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


# -- reading ------------------------------------------------------------------------------------


def _version_numbers(root: str) -> list[int]:
    """Every N with a `v<N>/` directory (or S3 prefix) under `root`, committed or not, sorted."""
    if storage.is_s3(root):
        bucket, key = storage.split_s3(root)
        prefix = key.rstrip("/") + "/"
        names = []
        paginator = storage.s3_client().get_paginator("list_objects_v2")
        with storage.s3_errors(root):
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                names += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
    else:
        names = [e.name for e in os.scandir(root) if e.is_dir()] if os.path.isdir(root) else []
    return sorted(int(m.group(1)) for n in names if (m := _VERSION_DIR.match(n)))


def list_versions(registry_uri: str, name: str) -> list[dict[str, Any]]:
    """The committed versions of `name` (those with a manifest), oldest first.

    Each entry is the version's manifest (`name`, `version`, `created_at`, `files`, ...) plus `uri`.
    """
    out = []
    for version in _version_numbers(model_root(registry_uri, name)):
        uri = version_uri(registry_uri, name, version)
        try:
            manifest = storage.read_json(storage.join(uri, MANIFEST))
        except FileNotFoundError:
            continue  # claimed or being written: not a version yet
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{uri}/{MANIFEST}: unreadable: {exc}") from exc
        out.append({**manifest, "uri": uri})
    return out


def verify_version(version_uri: str) -> list[str]:
    """Problems found by rehashing every file against the manifest; an empty list means intact.

    Reports missing files, size and sha256 mismatches, and files present but not in the manifest.
    """
    try:
        manifest = storage.read_json(storage.join(version_uri, MANIFEST))
    except FileNotFoundError:
        return [f"{MANIFEST}: missing, the version was never committed"]
    except ValueError as exc:
        return [f"{MANIFEST}: not valid JSON ({exc})"]
    present = set(_relative_files(version_uri))
    problems = []
    listed = set()
    for entry in manifest.get("files", []):
        rel = entry["path"]
        listed.add(rel)
        if rel not in present:
            problems.append(f"{rel}: missing")
            continue
        digest, size = _hash_and_size(storage.join(version_uri, rel))
        if size != entry["size"]:
            problems.append(f"{rel}: size {size} bytes, the manifest says {entry['size']}")
        if digest != entry["sha256"]:
            problems.append(f"{rel}: sha256 {digest[:12]}…, the manifest says {entry['sha256'][:12]}…")
    for rel in sorted(present - listed - {MANIFEST, CLAIM}):
        problems.append(f"{rel}: not in the manifest")
    return problems


def _hash_and_size(uri: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with storage.open_read(uri) as fh:
        while chunk := fh.read(storage.CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
