"""Named pointers of a registered model: `production` (what serves) and `latest` (newest committed).

A pointer is a log of small immutable records, one per move, under

    <registry.uri>/<model name>/pointers/<pointer>/<sequence, 8 digits>.json

each naming a committed version, the version it replaced, who moved it, when and why. The record with
the highest sequence is the pointer's value. Moving a pointer is a compare-and-swap on that value:
read the newest record (sequence S, version V), check V is what the caller expects, then create
record S+1 with `storage.create_exclusive` (locally a hard link of the fully written file, on S3 a
conditional PUT `If-None-Match: *`). Of two writers racing from the same S, exactly one creates
S+1; the other re-reads, finds the pointer no longer at V and gets `PointerConflict` instead of
overwriting the winner. Nothing is ever rewritten, so the log is also the audit trail (`history`), and
a rollback is one more move.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import re
import socket
from dataclasses import asdict, dataclass
from typing import Any

from fulltune import storage
from fulltune.registry.layout import LINEAGE, MANIFEST, RegistryError, model_root, version_uri

log = logging.getLogger(__name__)

PRODUCTION = "production"
LATEST = "latest"
POINTERS = (PRODUCTION, LATEST)
POINTER_DIR = "pointers"
_RECORD = re.compile(r"^([0-9]{8})\.json$")
_UNSET = object()


class PointerConflict(RegistryError):
    """The pointer moved since it was read: another cycle or person promoted first."""


@dataclass(frozen=True)
class PointerRecord:
    """One move of a pointer. `previous` is the version it named before (None: it was unset)."""

    pointer: str
    version: int
    sequence: int
    previous: int | None
    action: str  # promote | rollback | register
    reason: str
    by: str
    at: str
    run_id: str = ""

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()


def pointer_root(registry_uri: str, name: str, pointer: str) -> str:
    return storage.join(model_root(registry_uri, name), POINTER_DIR, pointer)


def history(registry_uri: str, name: str, pointer: str) -> list[PointerRecord]:
    """Every move of `pointer`, oldest first."""
    _check_pointer(pointer)
    root = pointer_root(registry_uri, name, pointer)
    records = []
    for uri in storage.list_files(root):
        if not _RECORD.match(storage.basename(uri)):
            continue
        try:
            records.append(PointerRecord(**storage.read_json(uri)))
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"{uri}: not a pointer record ({exc})") from exc
    return records


def current(registry_uri: str, name: str, pointer: str) -> PointerRecord | None:
    """The pointer's newest record, or None when it was never set."""
    records = history(registry_uri, name, pointer)
    return records[-1] if records else None


def move(
    registry_uri: str,
    name: str,
    pointer: str,
    version: int,
    *,
    expected: Any = _UNSET,
    action: str,
    reason: str,
    by: str = "",
    run_id: str = "",
    options: storage.S3WriteOptions = storage.DEFAULT_WRITE,
) -> PointerRecord:
    """Point `pointer` at committed `version`, only if it still names `expected` (a version, or None
    for unset; left out: whatever it names now, read here).

    Raises:
        PointerConflict: the pointer names another version than `expected`, or moved between the
            read and the write (another writer won the race).
        RegistryError: `version` is not a committed version of `name`.
    """
    _check_pointer(pointer)
    _require_committed(registry_uri, name, version)
    now = current(registry_uri, name, pointer)
    now_version = now.version if now else None
    if expected is not _UNSET and now_version != expected:
        raise PointerConflict(
            f"{name}: {pointer} names {_v(now_version)}, not {_v(expected)} as expected: moved meanwhile "
            f"({_describe(now)}); nothing changed"
        )
    record = PointerRecord(
        pointer=pointer,
        version=version,
        sequence=(now.sequence + 1) if now else 1,
        previous=now_version,
        action=action,
        reason=reason,
        by=by or default_actor(),
        at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        run_id=run_id,
    )
    uri = storage.join(pointer_root(registry_uri, name, pointer), f"{record.sequence:08d}.json")
    if not storage.create_exclusive(uri, record.to_json(), options):
        winner = current(registry_uri, name, pointer)
        raise PointerConflict(
            f"{name}: {pointer} was moved by another writer while moving it to v{version} "
            f"({_describe(winner)}); nothing changed"
        )
    return record


def promote(
    registry_uri: str,
    name: str,
    version: int,
    *,
    reason: str,
    by: str = "",
    run_id: str = "",
    expected: Any = _UNSET,
) -> PointerRecord:
    """Make `version` what `production` names (from `expected`, when given)."""
    if not reason.strip():
        raise RegistryError("a promotion needs a reason: it is recorded with who and when")
    return move(
        registry_uri,
        name,
        PRODUCTION,
        version,
        expected=expected,
        action="promote",
        reason=reason,
        by=by,
        run_id=run_id,
    )


def rollback(
    registry_uri: str, name: str, *, reason: str, version: int | None = None, by: str = ""
) -> PointerRecord:
    """Point `production` back at `version`, by default at the version it named before the current one."""
    if not reason.strip():
        raise RegistryError("a rollback needs a reason: it is recorded with who and when")
    now = current(registry_uri, name, PRODUCTION)
    if now is None:
        raise RegistryError(f"{name}: production was never set; nothing to roll back")
    target = version if version is not None else now.previous
    if target is None:
        raise RegistryError(f"{name}: production (v{now.version}) names no earlier version; give --version")
    if target == now.version:
        raise RegistryError(f"{name}: production already names v{target}")
    return move(
        registry_uri, name, PRODUCTION, target, expected=now.version, action="rollback", reason=reason, by=by
    )


def pointers_by_version(registry_uri: str, name: str) -> dict[int, list[str]]:
    """{version: [pointers naming it]} for `registry list`."""
    out: dict[int, list[str]] = {}
    for pointer in POINTERS:
        if (record := current(registry_uri, name, pointer)) is not None:
            out.setdefault(record.version, []).append(pointer)
    return out


def default_actor() -> str:
    """Who moves a pointer by hand: user@host (a pipeline run passes its run id instead)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _require_committed(registry_uri: str, name: str, version: int) -> None:
    uri = version_uri(registry_uri, name, version)
    if not storage.exists(storage.join(uri, MANIFEST)):
        raise RegistryError(f"{name}: v{version} is not a committed version ({uri} has no {MANIFEST})")


def _check_pointer(pointer: str) -> None:
    if pointer not in POINTERS:
        raise RegistryError(f"unknown pointer {pointer!r}; pointers: {', '.join(POINTERS)}")


def _v(version: Any) -> str:
    return "nothing" if version is None else f"v{version}"


def _describe(record: PointerRecord | None) -> str:
    if record is None:
        return "never set"
    return f"{record.action} to v{record.version} by {record.by} at {record.at}: {record.reason}"


@dataclass(frozen=True)
class Promotion:
    """Move production to the registered version, only from `expected` (the champion it beat)."""

    expected: int | None
    reason: str


def on_register(
    registry_uri: str,
    name: str,
    version: int,
    *,
    run_id: str = "",
    promote: Promotion | None = None,
    passed: bool = True,
    options: storage.S3WriteOptions = storage.DEFAULT_WRITE,
) -> list[PointerRecord]:
    """What a registration does to the pointers once `version` is committed; safe to repeat.

    `latest` moves to `version` unless it already names a newer one, also when another registration
    moved it meanwhile (`_advance_latest`). `production` moves with
    `promote` (the gate passed against the version production named, which it must still name) or
    when it was never set and the version `passed` its gate (the first version of a model serves
    until something beats it; one registered with force despite its gate serves only when someone
    promotes it: `registry promote`). A writer
    that moved production first is not an error here: its move stands, this registration's version
    stays committed, unpromoted, and the log says why.
    """
    by = f"pipeline run {run_id}" if run_id else default_actor()
    moved = []
    if (record := _advance_latest(registry_uri, name, version, by, run_id, options)) is not None:
        moved.append(record)
    now = current(registry_uri, name, PRODUCTION)
    now_version = now.version if now else None
    if now_version == version:
        return moved  # a retried registration already moved it
    if promote is not None:
        expected, reason = promote.expected, promote.reason
    elif now is None and passed:
        expected, reason = None, "first registered version of the model"
    else:
        return moved
    try:
        moved.append(
            move(
                registry_uri,
                name,
                PRODUCTION,
                version,
                expected=expected,
                action="promote",
                reason=reason,
                by=by,
                run_id=run_id,
                options=options,
            )
        )
    except PointerConflict as exc:
        log.warning("%s: not moved to v%d: %s", PRODUCTION, version, exc)
    return moved


_LATEST_ATTEMPTS = 100


def _advance_latest(
    registry_uri: str, name: str, version: int, by: str, run_id: str, options: storage.S3WriteOptions
) -> PointerRecord | None:
    """Move `latest` to `version` unless it names it or a newer one already. Unlike production, no
    one's decision is overridden here: when another registration moved it meanwhile (to an older
    version, whose writer read the pointer at the same time), it is read again and moved on, or
    `latest` would stay behind the newest committed version."""
    for _ in range(_LATEST_ATTEMPTS):
        now = current(registry_uri, name, LATEST)
        now_version = now.version if now else None
        if now_version is not None and now_version >= version:
            return None  # a retried registration moved it already, or a newer version is latest
        try:
            return move(
                registry_uri,
                name,
                LATEST,
                version,
                expected=now_version,
                action="register",
                reason="newest committed version",
                by=by,
                run_id=run_id,
                options=options,
            )
        except PointerConflict as exc:
            log.info("%s: moved meanwhile, reading it again: %s", LATEST, exc)
    log.warning("%s: not moved to v%d: it kept moving (%d attempts)", LATEST, version, _LATEST_ATTEMPTS)
    return None


# -- registry:// references --------------------------------------------------------------------------

REF_SCHEME = "registry://"
_REF = re.compile(r"^registry://([A-Za-z0-9][A-Za-z0-9._-]{0,127})/(production|latest|v[1-9][0-9]*)/?$")


def is_ref(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(REF_SCHEME)


def ref_problem(uri: str) -> str | None:
    """Why `uri` is not a usable `registry://NAME/{production,latest,vN}` reference, else None."""
    if _REF.match(uri) is None:
        return "expected registry://NAME/production, registry://NAME/latest or registry://NAME/vN"
    return None


@dataclass(frozen=True)
class ResolvedRef:
    """A `registry://` reference fixed to one committed version, and the base that version started
    from (what forgetting is measured against, carried from version to version)."""

    uri: str
    name: str
    version: int
    original_base_model_uri: str


def resolve_ref(ref: str, registry_uri: str) -> ResolvedRef:
    """The committed version `ref` names now under `registry_uri`.

    Raises:
        RegistryError: a malformed reference, a pointer never set, or a version not committed.
    """
    m = _REF.match(ref)
    if m is None:
        raise RegistryError(f"{ref}: {ref_problem(ref)}")
    name, which = m.group(1), m.group(2)
    if which.startswith("v"):
        version = int(which[1:])
    elif (record := current(registry_uri, name, which)) is not None:
        version = record.version
    else:
        raise RegistryError(f"{ref}: {name} has no {which} version under {registry_uri}")
    _require_committed(registry_uri, name, version)
    uri = version_uri(registry_uri, name, version)
    lineage = _read_lineage(uri)
    original = lineage.get("original_base_model_uri") or lineage.get("base_model_uri") or uri
    return ResolvedRef(uri, name, version, original)


def _read_lineage(version: str) -> dict[str, Any]:
    try:
        return storage.read_json(storage.join(version, LINEAGE))
    except FileNotFoundError:
        return {}
